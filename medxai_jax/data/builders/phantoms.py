"""TFDS builder for the synthetic limb-radiograph phantoms of `medxai_jax.data.phantoms`.

Prepares offline (nothing is downloaded) in the `array_record` format, which tfds can write and
read without TensorFlow; read the splits back with `builder.as_data_source(split=...)`.
"""

from __future__ import annotations

import dataclasses
import io
import operator
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from medxai_jax.data.phantoms import (
  ABNORMALITY_KINDS,
  BODY_PARTS,
  MARKER_SIDES,
  PhantomConfig,
  generate_phantoms,
)

_SPLITS = ("train", "validation", "test")
_IMAGE_FEATURES = ("image", "lesion_mask", "marker_mask")
_GENERATION_CHUNK = 500  # examples rendered at a time while writing a split
_DEFAULT_CONFIG_NAME = "default"


# tfds' BuilderConfig is a mutable dataclass and Python forbids frozen subclasses of it, so this
# config is immutable by convention: derive a new one with `make_builder_config` instead.
@dataclasses.dataclass(eq=False)
class PhantomsBuilderConfig(tfds.core.BuilderConfig):
  """Sizes, seed and confounder strengths of one prepared phantom dataset."""

  image_size: int = 128
  num_train: int = 6000
  num_validation: int = 1000
  num_test: int = 2000
  seed: int = 0
  train_marker_agreement: float = 0.9
  validation_marker_agreement: float = 0.9
  test_marker_agreement: float = 0.5
  positive_fraction: float = 0.5
  frame_probability: float = 0.0
  hardware_fraction: float = 0.5
  noise_std: float = 0.04


_TFDS_FIELDS = {field.name for field in dataclasses.fields(tfds.core.BuilderConfig)}
_PHANTOM_FIELDS = tuple(
  field.name
  for field in dataclasses.fields(PhantomsBuilderConfig)
  if field.name not in _TFDS_FIELDS
)
_FIELD_ABBREVIATIONS = {
  "image_size": "size",
  "num_train": "ntrain",
  "num_validation": "nval",
  "num_test": "ntest",
  "seed": "seed",
  "train_marker_agreement": "trainagree",
  "validation_marker_agreement": "valagree",
  "test_marker_agreement": "testagree",
  "positive_fraction": "pos",
  "frame_probability": "frame",
  "hardware_fraction": "hw",
  "noise_std": "noise",
}
assert set(_FIELD_ABBREVIATIONS) == set(_PHANTOM_FIELDS)

_DEFAULT_CONFIG = PhantomsBuilderConfig(
  name=_DEFAULT_CONFIG_NAME,
  description="6000/1000/2000 phantoms at 128 px; the L/R marker agrees with the label on 90% of "
  "train and validation examples and on 50% (uninformative) of test examples.",
)


def _split_sizes(config: PhantomsBuilderConfig) -> dict[str, int]:
  """Number of examples of each split."""
  return {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}


def split_start_indices(config: PhantomsBuilderConfig) -> dict[str, int]:
  """Global index of each split's first example: splits are consecutive, disjoint index ranges."""
  sizes = _split_sizes(config)
  starts = np.concatenate([[0], np.cumsum([sizes[split] for split in _SPLITS])[:-1]])
  return {split: int(start) for split, start in zip(_SPLITS, starts, strict=True)}


def split_phantom_config(config: PhantomsBuilderConfig, split: str) -> PhantomConfig:
  """The phantom distribution of one split (its marker agreement differs between splits)."""
  return PhantomConfig(
    image_size=config.image_size,
    positive_fraction=config.positive_fraction,
    marker_agreement=getattr(config, f"{split}_marker_agreement"),
    frame_probability=config.frame_probability,
    hardware_fraction=config.hardware_fraction,
    noise_std=config.noise_std,
  )


def _normalised_value(name: str, value: float | int) -> float | int:
  """`value` as the type of field `name` (an exact integer for int fields, else a float)."""
  if isinstance(getattr(_DEFAULT_CONFIG, name), int):
    return operator.index(value)
  return float(value)


def _name_part(value: float | int) -> str:
  """An exact, name-safe rendering of a field value (0.25 -> '0p25', 1e-05 -> '1em05')."""
  return repr(value).replace(".", "p").replace("-", "m").replace("+", "")


def make_builder_config(**fields: float | int) -> PhantomsBuilderConfig:
  """A config named after its non-default fields, so different settings never share a directory."""
  unknown = set(fields) - set(_PHANTOM_FIELDS)
  if unknown:
    raise TypeError(f"unknown phantom builder fields: {sorted(unknown)}")
  values = {name: _normalised_value(name, value) for name, value in fields.items()}
  changed = {
    name: value for name, value in values.items() if value != getattr(_DEFAULT_CONFIG, name)
  }
  if not changed:
    return _DEFAULT_CONFIG
  name = "-".join(
    f"{_FIELD_ABBREVIATIONS[field]}{_name_part(changed[field])}"
    for field in _PHANTOM_FIELDS
    if field in changed
  )
  return PhantomsBuilderConfig(name=name, description=f"Phantoms with {changed}.", **changed)


def _png_bytes(image: np.ndarray) -> bytes:
  """PNG encoding of one [S, S, 1] uint8 image."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format="PNG")
  return buffer.getvalue()


def _tfds_examples(
  arrays: dict[str, np.ndarray], pool: ThreadPoolExecutor
) -> Iterator[tuple[int, dict[str, object]]]:
  """(key, feature dict) pairs of a batch of generated phantoms, images as PNG bytes."""
  png = {key: list(pool.map(_png_bytes, arrays[key])) for key in _IMAGE_FEATURES}  # GIL released
  for row, index in enumerate(arrays["index"]):
    yield (
      int(index),
      {
        **{key: png[key][row] for key in _IMAGE_FEATURES},
        "label": int(arrays["label"][row]),
        "body_part": int(arrays["body_part"][row]),
        "abnormality": int(arrays["abnormality"][row]),
        "marker_side": int(arrays["marker_side"][row]),
        "marker_agrees": bool(arrays["marker_agrees"][row]),
        "has_frame": bool(arrays["has_frame"][row]),
        "index": int(index),
      },
    )


class RadiographPhantoms(tfds.core.GeneratorBasedBuilder):
  """Synthetic limb radiographs with lesion masks and an L/R-marker shortcut confounder.

  Each image shows 2-3 bones of one of several body parts inside soft tissue; abnormal images
  carry a fracture crack or orthopaedic hardware whose pixels form `lesion_mask`. A laterality
  marker ("L" top-left, "R" top-right, pixels in `marker_mask`) encodes the label with a
  per-split probability, so a classifier can take the marker as a shortcut: by default it
  agrees on 90% of train/validation examples and is uninformative on test.
  """

  # Bump VERSION whenever phantoms.py renders differently: tfds reuses any prepared dataset
  # of the same name and version, so a stale one would silently be trained on.
  # The mask feature localisation scores compare maps with (None: no such mask), and the
  # shortcut-marker mask (None: none); see `builders.mask_keys`.
  LOCALISATION_MASK_KEY: str | None = "lesion_mask"
  MARKER_MASK_KEY: str | None = "marker_mask"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_DEFAULT_CONFIG]
  DEFAULT_CONFIG_NAME = _DEFAULT_CONFIG_NAME

  def _info(self) -> tfds.core.DatasetInfo:
    """Features and metadata of the dataset."""
    size = self.builder_config.image_size
    image = lambda: tfds.features.Image(shape=(size, size, 1), encoding_format="png")  # noqa: E731
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__class__.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": image(),
          "lesion_mask": image(),
          "marker_mask": image(),
          "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
          "body_part": tfds.features.ClassLabel(names=list(BODY_PARTS)),
          "abnormality": tfds.features.ClassLabel(names=list(ABNORMALITY_KINDS)),
          "marker_side": tfds.features.ClassLabel(names=list(MARKER_SIDES)),
          "marker_agrees": tfds.features.Scalar(np.bool_),
          "has_frame": tfds.features.Scalar(np.bool_),
          "index": tfds.features.Scalar(np.int64),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,  # record i of a split is its i-th example; shuffle when reading
      homepage="https://stanfordmlgroup.github.io/competitions/mura/",
      citation="Synthetic phantoms generated by medxai_jax.data.phantoms; the shortcut design "
      "follows the MURA dataset: Rajpurkar et al., 'MURA: Large Dataset for Abnormality "
      "Detection in Musculoskeletal Radiographs', arXiv:1712.06957, 2017.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """One generator per split, over disjoint ranges of example indices; nothing is downloaded."""
    del dl_manager
    config = self.builder_config
    starts, sizes = split_start_indices(config), _split_sizes(config)
    return {split: self._generate_examples(split, starts[split], sizes[split]) for split in _SPLITS}

  def _generate_examples(
    self, split: str, start_index: int, num_examples: int
  ) -> Iterator[tuple[int, dict]]:
    """Examples of one split, rendered in chunks to bound memory."""
    phantom_config = split_phantom_config(self.builder_config, split)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
      for offset in range(0, num_examples, _GENERATION_CHUNK):
        arrays = generate_phantoms(
          min(_GENERATION_CHUNK, num_examples - offset),
          seed=self.builder_config.seed,
          config=phantom_config,
          start_index=start_index + offset,
        )
        yield from _tfds_examples(arrays, pool)


def load_phantoms_builder(data_dir: str, **fields: float | int) -> RadiographPhantoms:
  """The phantom builder for these settings, prepared (offline) in `data_dir` as array_record."""
  builder = RadiographPhantoms(
    config=make_builder_config(**fields), data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare()
  return builder
