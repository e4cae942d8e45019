"""Feature-map figures: activation grids, filter mosaics, channel and CAM/Grad-CAM/CRM overlays.

* 000_09513d2f8ec1fa7b.txt figures 4-11: the 16 most activated maps per tap as 4x4 grids in
  'bwr' (blue near zero, red strongly activated), next to the input;
* 002_5c5237004c36e0a4.txt figure 2: first-layer filters as a mosaic; figure 3: the strongest
  last-conv channel as a 'jet' heat map over the image, pixels under a threshold transparent;
* 004_883d77b264ed2d14.txt figure 5: CAM, Grad-CAM and CRM rows, each shown above 20% of its max.
All functions write a PNG (Agg backend) and return its path; `overlay_image` returns the array.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage import transform  # noqa: E402

from medxai_jax.viz import figures  # noqa: E402


def resize_to(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of one map [h, w] to `size` (no-op when it already has that size)."""
  saliency = np.asarray(saliency, np.float64)
  if saliency.ndim != 2:
    raise ValueError(f"a saliency map must be [h, w]; got shape {saliency.shape}.")
  if saliency.shape == tuple(size):
    return saliency
  return transform.resize(saliency, size, order=1, mode="edge", anti_aliasing=False)


def threshold_map(saliency: np.ndarray, size: tuple[int, int], threshold: float = 0.2
                  ) -> np.ma.MaskedArray:
  """The map at `size`, divided by its maximum, masked where below `threshold` (all if max <= 0)."""
  heat = resize_to(saliency, size)
  peak = heat.max()
  scaled = heat / peak if peak > 0 else np.zeros_like(heat)
  return np.ma.masked_where((scaled < threshold) | (peak <= 0), scaled)


def overlay_image(image: np.ndarray, saliency: np.ndarray, *, threshold: float = 0.2,
                  cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
  """RGB [H, W, 3] in [0, 1]: the gray image with `cmap`(map / max) blended where map >= threshold.

  `saliency` may be at feature resolution; it is bilinearly resized to the image's H x W, and
  pixels under the threshold stay the plain image (transparent heat map, 002 fig. 3 / 004 fig. 5).
  """
  gray = figures.display_image(image)
  heat = threshold_map(saliency, gray.shape, threshold)
  colours = matplotlib.colormaps[cmap](heat.filled(0.0))[..., :3]
  weight = np.where(np.ma.getmaskarray(heat), 0.0, alpha)[..., None]
  return (1.0 - weight) * gray[..., None] + weight * colours


def _grid_shape(count: int, columns: int) -> tuple[int, int]:
  return max(1, math.ceil(count / columns)), min(columns, max(count, 1))


def plot_activation_grid(maps: np.ndarray, path: str, *, title: str = "",
                         channels: Sequence[int] | None = None, columns: int = 4,
                         cmap: str = "bwr") -> str:
  """One tap's maps [h, w, k] as a grid (4x4 for k=16), each scaled 0..its max in 'bwr'."""
  maps = np.asarray(maps)
  if maps.ndim != 3:
    raise ValueError(f"maps must be [h, w, k] for one image; got shape {maps.shape}.")
  rows, cols = _grid_shape(maps.shape[-1], columns)
  fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.3), squeeze=False)
  for index, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if index < maps.shape[-1]:
      _show_activation(ax, maps[..., index], cmap)
      if channels is not None:
        ax.set_title(f"ch {int(channels[index])}", fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  return figures.save_figure(fig, path)


def _show_activation(ax, activation: np.ndarray, cmap: str) -> None:
  """Draws one activation map from 0 (blue) to its maximum (red)."""
  peak = float(np.max(activation))
  ax.imshow(activation, cmap=cmap, vmin=0.0, vmax=peak if peak > 0 else 1.0)


def plot_layer_activations(image: np.ndarray, grids: Mapping[str, np.ndarray], path: str, *,
                           cam_map: np.ndarray | None = None, columns: int = 4,
                           cmap: str = "bwr") -> str:
  """000's figure 4 layout for one image: input (and CAM), then a top-k grid per tap.

  `grids` maps tap name -> [h, w, k] (e.g. the maps of `activations.activation_grids` for one
  image), in forward order.
  """
  panels = (1 if cam_map is None else 2) + len(grids)
  fig = plt.figure(figsize=(2.3 * panels, 2.6))
  outer = fig.add_gridspec(1, panels, wspace=0.15)
  gray = figures.display_image(image)
  ax = fig.add_subplot(outer[0])
  ax.imshow(gray, cmap="gray")
  ax.set_title("input", fontsize=8)
  ax.axis("off")
  offset = 1
  if cam_map is not None:
    ax = fig.add_subplot(outer[1])
    ax.imshow(overlay_image(image, cam_map, threshold=0.0, alpha=0.45))
    ax.set_title("CAM", fontsize=8)
    ax.axis("off")
    offset = 2
  for panel, (tap, maps) in enumerate(grids.items()):
    maps = np.asarray(maps)
    if maps.ndim != 3:
      raise ValueError(f"grids[{tap!r}] must be [h, w, k]; got shape {maps.shape}.")
    rows, cols = _grid_shape(maps.shape[-1], columns)
    inner = outer[offset + panel].subgridspec(rows, cols, wspace=0.04, hspace=0.04)
    for index in range(rows * cols):
      ax = fig.add_subplot(inner[index // cols, index % cols])
      ax.axis("off")
      if index < maps.shape[-1]:
        _show_activation(ax, maps[..., index], cmap)
      if index == (cols - 1) // 2:
        ax.set_title(tap, fontsize=8)
  return figures.save_figure(fig, path, tight_layout=False, bbox_inches="tight")


def plot_filter_mosaic(filters: np.ndarray, path: str, *, columns: int = 12,
                       title: str = "") -> str:
  """First-layer filters [F, kh, kw, C] (each in [0, 1]) as a mosaic; RGB when C == 3, else gray."""
  filters = np.asarray(filters)
  if filters.ndim != 4:
    raise ValueError(f"filters must be [F, kh, kw, C]; got shape {filters.shape}.")
  rows, cols = _grid_shape(len(filters), columns)
  fig, axes = plt.subplots(rows, cols, figsize=(0.6 * cols, 0.6 * rows + 0.3), squeeze=False)
  for index, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if index < len(filters):
      tile = filters[index]
      if tile.shape[-1] == 3:
        ax.imshow(np.clip(tile, 0, 1), interpolation="nearest")
      else:
        ax.imshow(tile.mean(axis=-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  if title:
    fig.suptitle(title, fontsize=9)
  return figures.save_figure(fig, path)


def plot_channel_overlays(images: np.ndarray, channel_maps: np.ndarray, path: str, *,
                          channels: Sequence[int] | None = None, threshold: float = 0.05,
                          cmap: str = "jet", alpha: float = 0.6) -> str:
  """002's figure 3: per image, the input and its strongest channel as a 'jet' overlay.

  `channel_maps` [N, h, w] (any resolution); pixels under `threshold` x max (the black of the
  heat map) are transparent.
  """
  images, channel_maps = np.asarray(images), np.asarray(channel_maps)
  if len(images) != len(channel_maps):
    raise ValueError(f"{len(images)} images but {len(channel_maps)} channel maps.")
  fig, axes = plt.subplots(2, len(images), figsize=(1.9 * len(images), 4.0), squeeze=False)
  for column, (image, channel_map) in enumerate(zip(images, channel_maps)):
    axes[0, column].imshow(figures.display_image(image), cmap="gray")
    axes[1, column].imshow(overlay_image(image, channel_map, threshold=threshold, cmap=cmap,
                                         alpha=alpha))
    if channels is not None:
      axes[1, column].set_title(f"channel {int(channels[column])}", fontsize=7)
    for row in range(2):
      axes[row, column].axis("off")
  return figures.save_figure(fig, path)


def plot_method_comparison(images: np.ndarray, maps: Mapping[str, np.ndarray], path: str, *,
                           threshold: float = 0.2, cmap: str = "jet", alpha: float = 0.5,
                           titles: Sequence[str] = ()) -> str:
  """004's figure 5: one row per method (e.g. CAM, Grad-CAM, CRM), one column per image.

  Each map [N, h, w] is shown over its image where it exceeds `threshold` x its maximum.
  """
  images = np.asarray(images)
  for name, method_maps in maps.items():
    if len(method_maps) != len(images):
      raise ValueError(f"maps[{name!r}] has {len(method_maps)} maps for {len(images)} images.")
  fig, axes = plt.subplots(len(maps), len(images),
                           figsize=(1.9 * len(images), 1.9 * len(maps) + 0.2), squeeze=False)
  for row, (name, method_maps) in enumerate(maps.items()):
    for column, image in enumerate(images):
      ax = axes[row, column]
      ax.imshow(overlay_image(image, np.asarray(method_maps[column]), threshold=threshold,
                              cmap=cmap, alpha=alpha))
      ax.set_xticks([])
      ax.set_yticks([])
      if column == 0:
        ax.set_ylabel(name, fontsize=8)
      if row == 0 and column < len(titles):
        ax.set_title(titles[column], fontsize=7)
  return figures.save_figure(fig, path)
