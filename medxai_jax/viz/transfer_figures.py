"""Figures comparing training runs side by side: loss per epoch (001 figure 11) and test
metrics per run (001 figure 10)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from medxai_jax.viz import figures  # noqa: E402

LOSS_PANELS: tuple[tuple[str, str], ...] = (("train_loss", "training loss"),
                                           ("val_loss", "validation loss"))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_loss_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str, *,
                     panels: Sequence[tuple[str, str]] = LOSS_PANELS,
                     title: str = "") -> str:
  """One panel per (history key, label), one line per run: loss against epoch.

  `histories` maps a run's name to its `history.jsonl` records (each with 'epoch' and the keys
  of `panels`); runs keep the mapping's order and colour across panels.
  """
  if not histories:
    raise ValueError("plot_loss_curves needs at least one run's history.")
  for name, history in histories.items():
    if not history:
      raise ValueError(f"The history of {name!r} is empty.")
    for key, _ in panels:
      if any(key not in record for record in history):
        raise ValueError(f"The history of {name!r} lacks {key!r} in some epoch.")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
  for index, (name, history) in enumerate(histories.items()):
    epochs = [record["epoch"] for record in history]
    for ax, (key, _) in zip(axes[0], panels):
      ax.plot(epochs, [record[key] for record in history], marker=_MARKERS[index % len(_MARKERS)],
              markersize=4, color=f"C{index}", label=name)
  for ax, (_, label) in zip(axes[0], panels):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return figures.save_figure(fig, path)


def plot_metric_bars(scores: Mapping[str, Mapping[str, float]], metrics: Sequence[str], path: str,
                     *, labels: Sequence[str] = (), title: str = "") -> str:
  """Grouped bars: one group per metric, one bar per run (NaN metrics are left out)."""
  if not scores:
    raise ValueError("plot_metric_bars needs at least one run's scores.")
  labels = list(labels) or list(metrics)
  if len(labels) != len(metrics):
    raise ValueError(f"{len(labels)} labels for {len(metrics)} metrics.")
  table = np.asarray([[float(values.get(metric, np.nan)) for metric in metrics]
                      for values in scores.values()])
  width = 0.8 / len(scores)
  positions = np.arange(len(metrics))
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.4))
  for index, (name, heights) in enumerate(zip(scores, table)):
    shown = np.isfinite(heights)
    ax.bar((positions + (index - (len(scores) - 1) / 2) * width)[shown], heights[shown], width,
           color=f"C{index}", label=name)
  ax.set_xticks(positions, labels)
  finite = table[np.isfinite(table)]
  ax.set_ylim(min(0.0, float(finite.min())) if finite.size else 0.0, 1.0)
  ax.axhline(0.0, color="black", linewidth=0.6)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  if title:
    ax.set_title(title, fontsize=10)
  return figures.save_figure(fig, path)
