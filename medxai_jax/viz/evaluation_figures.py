"""Figures of the explanation leaderboard: mean deletion / insertion curves, sanity curves."""

from __future__ import annotations

from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medxai_jax.analysis import faithfulness  # noqa: E402
from medxai_jax.viz import figures  # noqa: E402


def plot_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: str,
                contrast: str | None = None) -> str:
  """Mean deletion and insertion curves per method (the `contrast` method, e.g. random, dashed)."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for method, curve in curves.items():
    style = "--" if method == contrast else "-"
    for axis, mode in zip(axes, ("deletion", "insertion")):
      axis.plot(curve["fractions"], curve[mode].mean(axis=0), style, label=method)
  for axis, mode in zip(axes, ("deletion", "insertion")):
    axis.set_xlabel(f"fraction {'removed' if mode == 'deletion' else 'inserted'}")
    axis.set_ylabel("target-class probability")
    axis.set_title(mode, fontsize=9)
    axis.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="lower right")
  return figures.save_figure(fig, path, dpi=110)


def plot_sanity(sanity: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Mean Spearman (of |map|) of original vs randomised maps per layer (Adebayo fig. 2 style)."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
  for axis, mode in zip(axes, faithfulness.RANDOMISATION_MODES):
    for method, result in sanity.items():
      layers = result[mode]["layers"]
      axis.plot(np.arange(len(layers)),
                faithfulness.defined_mean(result[mode]["spearman_abs"], axis=1), "o-",
                label=method)
      axis.set_xticks(np.arange(len(layers)), layers, rotation=60, fontsize=7)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_title(f"{mode} randomisation (output -> input)", fontsize=9)
    axis.grid(alpha=0.3)
  axes[0].set_ylabel("Spearman of |map|")
  axes[1].legend(fontsize=7)
  return figures.save_figure(fig, path, dpi=110)
