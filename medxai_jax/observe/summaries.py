"""TensorBoard summaries of a run: `<workdir>/tensorboard/` event files, from process 0 only.

    writer = summaries.create_writer(workdir)   # a no-op writer on processes != 0
    writer.scalars(step, {"train/loss": 0.31, "train/accuracy": 0.9})
    writer.images(step, {"gradcam/0": rgb_uint8_hwc})
    writer.text(0, "config", config.to_json_best_effort(indent=2))
    writer.close()

then `tensorboard --logdir <workdir>/tensorboard` (or a parent of several runs' workdirs).

The writer is tensorboardX's: it writes TensorBoard's event protocol without TensorFlow (clu's
metric writers, used by the Flax examples and Scenic, need TensorFlow for their TensorBoard
writer and clu is not a dependency). Scalars whose value is None (a metric undefined on the
split, warned about where it is computed) are not written: an event holds numbers only.

`grad_cam_overlays` draws Grad-CAM maps (`attribution.cam.grad_cam`) over the images, for the
per-epoch images of a training run.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Protocol

import jax
import numpy as np


TENSORBOARD_DIR = "tensorboard"


class Writer(Protocol):
  """What the binaries write summaries through."""

  def scalars(self, step: int, mapping: Mapping[str, Any]) -> None: ...
  def images(self, step: int, mapping: Mapping[str, np.ndarray]) -> None: ...
  def text(self, step: int, name: str, text: str) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


def _scalar(name: str, value: Any) -> float:
  """`value` as a float; a TypeError naming `name` for anything else (bools are 0/1)."""
  if isinstance(value, np.ndarray) and value.ndim == 0 or isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, (bool, int, float)):
    return float(value)
  raise TypeError(f"Summary scalar {name!r} must be a number, got {type(value).__name__} "
                  f"{value!r}.")


def _image(name: str, image: Any) -> np.ndarray:
  """A summary image as uint8 [H, W, 3] or [H, W, 1]; floats must lie in [0, 1]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Summary image {name!r} must be [H, W], or [H, W, C] with C in 1, 3, 4; "
                     f"got shape {image.shape}.")
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"Summary image {name!r} must be uint8 or float in [0, 1], got "
                     f"{image.dtype}.")
  if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
    raise ValueError(f"Summary image {name!r} is float but not within [0, 1] (range "
                     f"{np.nanmin(image):g}..{np.nanmax(image):g}).")
  return np.round(image * 255).astype(np.uint8)


class TensorBoardWriter:
  """Writes scalars, images and text into event files under `logdir` (tensorboardX).

  The directory and its event file are created on the first write, so a run refused before
  it writes anything leaves no trace.
  """

  def __init__(self, logdir: str, *, flush_seconds: float = 30.0):
    self.logdir = logdir
    self._flush_seconds = flush_seconds
    self._opened: Any = None

  @property
  def _writer(self) -> Any:
    """tensorboardX's SummaryWriter, opened on first use."""
    if self._opened is None:
      from tensorboardX import SummaryWriter  # imports torch: only where summaries are written

      os.makedirs(self.logdir, exist_ok=True)
      self._opened = SummaryWriter(logdir=self.logdir, flush_secs=self._flush_seconds)
    return self._opened

  def scalars(self, step: int, mapping: Mapping[str, Any]) -> None:
    """One scalar per name at `step`; None values are left out (see the module docstring)."""
    for name, value in mapping.items():
      if value is not None:
        self._writer.add_scalar(name, _scalar(name, value), global_step=int(step))

  def images(self, step: int, mapping: Mapping[str, np.ndarray]) -> None:
    """One image per name at `step`: uint8 or [0, 1] float, [H, W] or [H, W, C]."""
    for name, image in mapping.items():
      self._writer.add_image(name, _image(name, image), global_step=int(step),
                             dataformats="HWC")

  def text(self, step: int, name: str, text: str) -> None:
    """Markdown text (TensorBoard's text plugin) at `step`."""
    self._writer.add_text(name, str(text), global_step=int(step))

  def flush(self) -> None:
    if self._opened is not None:
      self._opened.flush()

  def close(self) -> None:
    if self._opened is not None:
      self._opened.close()

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


class NullWriter:
  """The writer of processes that write no summaries: every call does nothing."""

  logdir = None

  def scalars(self, step: int, mapping: Mapping[str, Any]) -> None:
    del step, mapping

  def images(self, step: int, mapping: Mapping[str, np.ndarray]) -> None:
    del step, mapping

  def text(self, step: int, name: str, text: str) -> None:
    del step, name, text

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass

  def __enter__(self) -> "NullWriter":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    pass


def create_writer(workdir: str, *, enabled: bool | None = None) -> TensorBoardWriter | NullWriter:
  """The writer of `<workdir>/tensorboard/`; a `NullWriter` when not `enabled` (default: on
  process 0 only, the process that writes a run's files)."""
  if enabled is None:
    enabled = jax.process_index() == 0
  if not enabled:
    return NullWriter()
  return TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR))


def config_markdown(config_json: str) -> str:
  """A config's JSON as a Markdown code block (TensorBoard renders text as Markdown)."""
  return "\n".join("    " + line for line in config_json.splitlines())


def numeric_items(record: Mapping[str, Any], prefix: str) -> dict[str, float | None]:
  """The number-valued (or None) entries of a flat record as `prefix + key` -> value."""
  return {f"{prefix}{key}": value for key, value in record.items()
          if value is None or (isinstance(value, (int, float, np.number))
                               and not isinstance(value, bool))}


def overlay(gray: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
  """uint8 RGB [H, W, 3]: a [0, 1] gray image under a 'jet' heat map ([H, W], scaled by its
  maximum; an all-zero map leaves the image gray)."""
  from matplotlib import colormaps  # local: keeps this module light to import

  if gray.shape != heat.shape or gray.ndim != 2:
    raise ValueError(f"overlay needs a gray image and a map of the same shape [H, W]; got "
                     f"{gray.shape} and {heat.shape}.")
  peak = float(np.max(heat))
  scaled = np.asarray(heat, np.float64) / peak if peak > 0 and math.isfinite(peak) else \
      np.zeros(heat.shape)
  colour = colormaps["jet"](scaled)[..., :3]
  blended = (1 - alpha * scaled[..., None]) * gray[..., None] + alpha * scaled[..., None] * colour
  return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def grad_cam_overlays(maps: np.ndarray, inputs: np.ndarray) -> dict[str, np.ndarray]:
  """'gradcam/<i>' -> the i-th map [B, H, W] over the i-th model input [B, H, W, C] (shown in
  gray, min-max scaled per image)."""
  from medxai_jax.viz import figures  # local: matplotlib only where images are drawn

  maps, inputs = np.asarray(maps), np.asarray(inputs)
  if maps.shape[:3] != inputs.shape[:3]:
    raise ValueError(f"maps {maps.shape} and inputs {inputs.shape} must share [B, H, W].")
  return {f"gradcam/{index}": overlay(figures.display_image(image), heat)
          for index, (heat, image) in enumerate(zip(maps, inputs))}
