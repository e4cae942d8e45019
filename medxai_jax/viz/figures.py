"""Matplotlib figures for training runs and explanation maps (Agg backend, PNG files)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.cm  # noqa: E402
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: Any, path: str, *, dpi: int = 120, tight_layout: bool = True,
                **savefig_options: Any) -> str:
  """Lays out, writes and closes a matplotlib figure; returns `path`."""
  if tight_layout:
    fig.tight_layout()
  fig.savefig(path, dpi=dpi, **savefig_options)
  plt.close(fig)
  return path


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
  """One value per epoch record as float64, a null (None) value as NaN (a gap in the line)."""
  return np.asarray([np.nan if record[key] is None else record[key] for record in history],
                    np.float64)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str,
                         selected_epoch: int | None = None) -> str:
  """Loss and accuracy per epoch (train vs validation), the selected epoch marked."""
  epochs = [record["epoch"] for record in history]
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
  loss_ax.plot(epochs, _series(history, "train_loss"), "o-", label="train")
  loss_ax.plot(epochs, _series(history, "val_loss"), "s-", label="validation")
  acc_ax.plot(epochs, _series(history, "train_accuracy"), "o-", label="train")
  acc_ax.plot(epochs, _series(history, "val_accuracy"), "s-", label="validation")
  for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
    if selected_epoch:
      ax.axvline(selected_epoch, color="gray", linestyle="--", linewidth=1, label="selected")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  acc_ax.legend(loc="best", fontsize=8)
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


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str, *,
                          title: str = "") -> str:
  """Counts per (true row, predicted column), shaded by the share of the true class (recall)."""
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be a square [K, K] matrix; got shape {confusion.shape}.")
  if len(class_names) != confusion.shape[0]:
    raise ValueError(f"{len(class_names)} class names for a {confusion.shape[0]}-class "
                     "confusion matrix.")
  totals = confusion.sum(axis=1, keepdims=True)
  shares = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
  size = 1.2 + 0.75 * len(class_names)
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  for (row, column), count in np.ndenumerate(confusion):
    ax.text(column, row, f"{int(count)}", ha="center", va="center", fontsize=10,
            color="white" if shares[row, column] > 0.5 else "black")
  ticks = np.arange(len(class_names))
  ax.set_xticks(ticks, class_names, rotation=30 if len(class_names) > 2 else 0, ha="right"
                if len(class_names) > 2 else "center", fontsize=9)
  ax.set_yticks(ticks, class_names, fontsize=9)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  if title:
    ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
  return save_figure(fig, path, dpi=130)


def plot_roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str, *,
                    title: str = "") -> str:
  """ROC curves (name -> (fpr, tpr, auc)) on one axis with the chance diagonal."""
  if not curves:
    raise ValueError("plot_roc_curves needs at least one curve.")
  fig, ax = plt.subplots(figsize=(4.6, 4.4))
  ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
  for name, (fpr, tpr, auc) in curves.items():
    ax.step(fpr, tpr, where="post", linewidth=1.6, label=f"{name} (AUC {auc:.3f})")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  return save_figure(fig, path, dpi=130)


def overlay_strength(saliency: np.ndarray, percentile: float = 99.0) -> np.ndarray:
  """A map [H,W] or [H,W,C] as overlay strength in [0, 1]: `magnitude_image` of it.

  Signed maps (gradients, IG) count by magnitude |map| (summed over channels); the map is divided
  by its own `percentile` and clipped, so one hot pixel does not wash out the rest. CAM-type maps
  are non-negative already and are only scaled.
  """
  return magnitude_image(saliency, percentile)


def overlay_rgba(strength: np.ndarray, *, cmap: str = "jet", alpha_max: float = 0.6,
                 low_cut: float = 0.2) -> np.ndarray:
  """[H,W] strength in [0, 1] to the [H,W,4] RGBA layer drawn over the image.

  Colour is `cmap` of the strength; opacity is 0 up to `low_cut` and rises linearly to
  `alpha_max` at strength 1, so weak attribution is fully transparent and the anatomy shows
  through (002: the black of the heat map made transparent).
  """
  strength = np.asarray(strength, np.float64)
  if strength.ndim != 2:
    raise ValueError(f"strength must be a [H, W] map; got shape {strength.shape}.")
  if not 0.0 <= low_cut < 1.0:
    raise ValueError(f"low_cut must lie in [0, 1); got {low_cut}.")
  if not 0.0 < alpha_max <= 1.0:
    raise ValueError(f"alpha_max must lie in (0, 1]; got {alpha_max}.")
  if strength.size and (np.nanmin(strength) < 0 or np.nanmax(strength) > 1):
    raise ValueError(f"strength must lie in [0, 1]; got {np.nanmin(strength):.3g}.."
                     f"{np.nanmax(strength):.3g} (use overlay_strength).")
  rgba = np.array(plt.get_cmap(cmap)(strength), np.float64)
  rgba[..., 3] = alpha_max * np.clip((strength - low_cut) / (1.0 - low_cut), 0.0, 1.0)
  return rgba


def display_image(image: np.ndarray) -> np.ndarray:
  """[H,W] or [H,W,C] pixels as a [H,W] gray image in [0, 1] (channels averaged, min-max)."""
  image = np.asarray(image, np.float64)
  if image.ndim == 3:
    image = image.mean(axis=-1)
  if image.ndim != 2:
    raise ValueError(f"An image must be [H, W] or [H, W, C]; got shape {image.shape}.")
  low, high = float(image.min()), float(image.max())
  return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _map_at_image_size(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [h,w] or [h,w,C] map stretched bilinearly to height x width (as the model's preprocessing
  stretched the image to the map's size); unchanged when the sizes agree."""
  from medxai_jax.data import preprocess  # local: keeps this module light to import

  saliency = np.asarray(saliency, np.float32)
  if saliency.shape[:2] == (height, width):
    return saliency
  planes = saliency if saliency.ndim == 3 else saliency[..., None]
  resized = preprocess.resize_np(planes, height, width)
  return resized if saliency.ndim == 3 else resized[..., 0]


def plot_overlay_grid(images: np.ndarray, maps_by_method: Mapping[str, np.ndarray], path: str,
                      *, titles: Sequence[str] | None = None, masks: np.ndarray | None = None,
                      alpha_max: float = 0.6, low_cut: float = 0.2, percentile: float = 99.0,
                      cmap: str = "jet") -> str:
  """Rows = images; columns = the input, then each method's map over the input in `cmap`.

  `images` [N,H,W(,C)] in any range (shown in gray, min-max scaled); each map [N,h,w(,C)] is
  normalised per image by `overlay_strength` (|map| for signed maps, clipped at its own
  `percentile`), stretched to the image's size when they differ, and drawn with
  `overlay_rgba`: transparent below `low_cut`, opacity rising to `alpha_max` at the maximum.
  `masks` [N,H,W] (optional) are outlined in red on the input column; `titles` label the rows.
  One colour bar serves every panel.
  """
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W] or [N, H, W, 1|3]; got {images.shape}.")
  methods = list(maps_by_method)
  if not methods:
    raise ValueError("plot_overlay_grid needs at least one method's maps.")
  count = len(images)
  for method in methods:
    if len(maps_by_method[method]) != count:
      raise ValueError(f"maps_by_method[{method!r}] holds {len(maps_by_method[method])} maps "
                       f"for {count} images.")
  if titles is not None and len(titles) != count:
    raise ValueError(f"{len(titles)} titles for {count} images.")
  if masks is not None and len(masks) != count:
    raise ValueError(f"{len(masks)} masks for {count} images.")
  columns = 1 + len(methods)
  cell = 2.3
  fig, axes = plt.subplots(count, columns, figsize=(cell * columns + 0.9, cell * count + 0.5),
                           squeeze=False)
  for row in range(count):
    gray = display_image(images[row])
    height, width = gray.shape
    axes[row, 0].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
    if masks is not None and np.asarray(masks[row]).squeeze().shape != (height, width):
      raise ValueError(f"masks[{row}] has shape {np.shape(masks[row])}; its image is "
                       f"{height}x{width}.")
    if masks is not None and np.any(masks[row]):
      axes[row, 0].contour(np.asarray(masks[row]).squeeze(), levels=[0.5], colors="red",
                           linewidths=1.0)
    if titles is not None:
      axes[row, 0].set_ylabel(titles[row], fontsize=9)
    for column, method in enumerate(methods, start=1):
      strength = overlay_strength(_map_at_image_size(maps_by_method[method][row], height, width),
                                  percentile)
      axes[row, column].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
      axes[row, column].imshow(overlay_rgba(strength, cmap=cmap, alpha_max=alpha_max,
                                            low_cut=low_cut), interpolation="bilinear")
  for column, name in enumerate(["input", *methods]):
    axes[0, column].set_title(name, fontsize=10)
  for axis in axes.ravel():
    axis.set_xticks([])
    axis.set_yticks([])
  fig.subplots_adjust(left=0.06, right=0.9, bottom=0.02, top=1 - 0.35 / (cell * count + 0.5),
                      wspace=0.04, hspace=0.06)
  bar_axis = fig.add_axes([0.92, 0.15, 0.015, 0.7])
  scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=cmap)
  bar = fig.colorbar(scale, cax=bar_axis)
  bar.set_label(f"|map| / its {percentile:g}th percentile (clear below {low_cut:g})", fontsize=8)
  bar.ax.axhspan(0, low_cut, color="white", alpha=0.7)
  bar.ax.tick_params(labelsize=8)
  return save_figure(fig, path, dpi=150, tight_layout=False)
