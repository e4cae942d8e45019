"""Matplotlib figures for training runs and explanation maps (Agg backend, PNG files)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: Any, path: str, *, dpi: int = 120, tight_layout: bool = True,
                **savefig_options: Any) -> str:
  """Lays out, writes and closes a matplotlib figure; returns `path`."""
  if tight_layout:
    fig.tight_layout()
  fig.savefig(path, dpi=dpi, **savefig_options)
  plt.close(fig)
  return path


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str,
                         selected_epoch: int | None = None) -> str:
  """Loss and accuracy per epoch (train vs validation), the selected epoch marked."""
  epochs = [record["epoch"] for record in history]
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
  loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
  loss_ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
  acc_ax.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
  acc_ax.plot(epochs, [r["val_accuracy"] for r in history], "s-", label="validation")
  for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
    if selected_epoch:
      ax.axvline(selected_epoch, color="gray", linestyle="--", linewidth=1, label="selected")
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  acc_ax.legend(loc="lower right", fontsize=8)
  return save_figure(fig, path)


def normalise_map(saliency: np.ndarray) -> np.ndarray:
  """Scales a non-negative map to [0, 1] by its maximum (all-zero maps stay zero)."""
  peak = float(np.max(saliency))
  return saliency / peak if peak > 0 else np.zeros_like(saliency)


def plot_heatmap_overlays(images: np.ndarray, maps: np.ndarray, path: str, *,
                          masks: np.ndarray | None = None, titles: Sequence[str] = (),
                          method: str = "Grad-CAM", threshold: float = 0.2,
                          cmap: str = "jet") -> str:
  """Rows of (input with mask outline, heat map over the input); pixels under threshold clear.

  `images` [N,H,W] or [N,H,W,1] in any range, `maps` [N,H,W] non-negative; the heat map is drawn
  with `cmap` where it exceeds `threshold` x its maximum (004's 20% rule).
  """
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[..., 0]
  count = len(images)
  fig, axes = plt.subplots(2, count, figsize=(1.8 * count, 3.9), squeeze=False)
  for column in range(count):
    image = images[column]
    heat = normalise_map(np.asarray(maps[column]))
    for row in range(2):
      axes[row, column].imshow(image, cmap="gray")
      axes[row, column].axis("off")
    if masks is not None and np.any(masks[column]):
      axes[0, column].contour(np.asarray(masks[column]).squeeze(), levels=[0.5], colors="red",
                              linewidths=0.8)
    axes[1, column].imshow(np.ma.masked_less(heat, threshold), cmap=cmap, alpha=0.55,
                           vmin=0, vmax=1)
    if column < len(titles):
      axes[0, column].set_title(titles[column], fontsize=7)
  axes[0, 0].text(-0.08, 0.5, "input (lesion in red)", transform=axes[0, 0].transAxes,
                  rotation=90, va="center", ha="right", fontsize=7)
  axes[1, 0].text(-0.08, 0.5, method, transform=axes[1, 0].transAxes, rotation=90,
                  va="center", ha="right", fontsize=7)
  return save_figure(fig, path)


def magnitude_image(saliency: np.ndarray, percentile: float = 99.0) -> np.ndarray:
  """|map| summed over channels, clipped at its `percentile` and scaled to [0, 1]."""
  magnitude = np.abs(np.asarray(saliency, np.float64))
  if magnitude.ndim == 3:
    magnitude = magnitude.sum(axis=-1)
  top = np.percentile(magnitude, percentile)
  if top <= 0:
    return np.zeros_like(magnitude)
  return np.clip(magnitude / top, 0.0, 1.0)


def plot_attribution_grid(images: np.ndarray, maps_by_method: Mapping[str, np.ndarray],
                          path: str, *, percentile: float = 99.0,
                          masks: np.ndarray | None = None, titles: Sequence[str] = ()) -> str:
  """One row per image: the input, then each method's magnitude map in gray (003, figs 8-9).

  Every map is shown as |map| (summed over channels) clipped at the same `percentile` of its
  own values, so methods with different scales are comparable by shape, not by magnitude.
  """
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[..., 0] if images.shape[-1] == 1 else images.mean(axis=-1)
  methods = list(maps_by_method)
  rows, columns = len(images), 1 + len(methods)
  fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.3),
                           squeeze=False)
  for row in range(rows):
    axes[row, 0].imshow(images[row], cmap="gray")
    if masks is not None and np.any(masks[row]):
      axes[row, 0].contour(np.asarray(masks[row]).squeeze(), levels=[0.5], colors="red",
                           linewidths=0.6)
    if row < len(titles):
      axes[row, 0].set_ylabel(titles[row], fontsize=6)
    for column, method in enumerate(methods, start=1):
      axes[row, column].imshow(magnitude_image(maps_by_method[method][row], percentile),
                               cmap="gray", vmin=0, vmax=1)
  for column, name in enumerate(["input", *methods]):
    axes[0, column].set_title(name, fontsize=7)
  for axis in axes.ravel():
    axis.set_xticks([])
    axis.set_yticks([])
  return save_figure(fig, path, dpi=110)
