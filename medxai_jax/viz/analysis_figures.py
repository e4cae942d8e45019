"""Figures for representation analysis: layer x layer similarity heat maps (001, figure 14) and
embedding scatter plots coloured by class (003, figures 6-7). Agg backend, PNG files."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medxai_jax.viz import figures  # noqa: E402


def plot_similarity_matrix(matrix: np.ndarray, taps_a: Sequence[str], taps_b: Sequence[str],
                           path: str, *, label_a: str = "model a", label_b: str = "model b",
                           title: str = "", annotate: bool | None = None, cmap: str = "magma",
                           vmin: float = 0.0, vmax: float = 1.0) -> str:
  """Heat map of a [len(taps_a), len(taps_b)] similarity matrix: model a's layers on the x axis,
  model b's on the y axis (first layers at the origin), a colour bar, values in the cells.

  `annotate` writes each value in its cell (default: when both sides have at most 16 layers).
  """
  matrix = np.asarray(matrix, np.float64)
  if matrix.shape != (len(taps_a), len(taps_b)):
    raise ValueError(f"matrix has shape {matrix.shape}; expected (len(taps_a), len(taps_b)) = "
                     f"({len(taps_a)}, {len(taps_b)}).")
  if annotate is None:
    annotate = max(matrix.shape) <= 16
  size = 1.2 + 0.42 * max(matrix.shape)
  fig, ax = plt.subplots(figsize=(size + 1.4, size))
  image = ax.imshow(matrix.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
  ax.set_xticks(range(len(taps_a)), list(taps_a), rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(len(taps_b)), list(taps_b), fontsize=7)
  ax.set_xlabel(label_a)
  ax.set_ylabel(label_b)
  if title:
    ax.set_title(title, fontsize=9)
  if annotate:
    middle = 0.5 * (vmin + vmax)
    for i in range(matrix.shape[0]):
      for j in range(matrix.shape[1]):
        value = matrix[i, j]
        ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="black" if np.isfinite(value) and value > middle else "white")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  return figures.save_figure(fig, path, dpi=130)


def _scatter(ax: plt.Axes, points: np.ndarray, labels: np.ndarray,
             class_names: Sequence[str] | None, title: str) -> None:
  """Draws one embedding panel, one colour per class."""
  points = np.asarray(points)
  labels = np.asarray(labels)
  if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
    raise ValueError(f"points must be [n, 2] with one label each; got points "
                     f"{points.shape} and labels {labels.shape}.")
  colours = plt.get_cmap("viridis")
  classes = np.unique(labels)
  for rank, value in enumerate(classes):
    chosen = labels == value
    name = (class_names[int(value)] if class_names is not None and 0 <= int(value) <
            len(class_names) else str(value))
    ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.75, label=name,
               color=colours(rank / max(len(classes) - 1, 1)), edgecolors="none")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)


def plot_embedding(points: np.ndarray, labels: np.ndarray, path: str, *,
                   class_names: Sequence[str] | None = None, title: str = "") -> str:
  """Scatter plot of a 2-D embedding [n, 2] coloured by class (003, figure 6)."""
  return plot_embedding_panels([(points, title)], labels, path, class_names=class_names)


def plot_embedding_panels(panels: Sequence[tuple[np.ndarray, str]], labels: np.ndarray,
                          path: str, *, class_names: Sequence[str] | None = None) -> str:
  """Side-by-side 2-D embeddings of the same examples, e.g. before vs after training (003,
  figure 7); `panels` holds (points [n, 2], title) pairs, `labels` [n] colours every panel."""
  if not panels:
    raise ValueError("panels must hold at least one (points, title) pair.")
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.4, 3.6),
                           squeeze=False)
  for ax, (points, title) in zip(axes[0], panels):
    _scatter(ax, points, labels, class_names, title)
  axes[0, -1].legend(loc="best", fontsize=7, markerscale=2, frameon=True)
  return figures.save_figure(fig, path, dpi=130)


def plot_before_after(before: np.ndarray, after: np.ndarray, labels: np.ndarray, path: str, *,
                      class_names: Sequence[str] | None = None,
                      titles: tuple[str, str] = ("before training", "after training")) -> str:
  """The "before vs after training" pair of embedding panels."""
  return plot_embedding_panels([(before, titles[0]), (after, titles[1])], labels, path,
                               class_names=class_names)
