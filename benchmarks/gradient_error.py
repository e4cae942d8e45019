"""How far a float32 pytree (gradients, logits) is from its float64 reference.

`tree_error(approximate, exact)` is the comparison `benchmarks/model_throughput.py
--float64_check` reports, so that an XLA option can be adopted only when it is no less accurate
than the default path:
  - per leaf, the relative error ||a - e|| / ||e|| (Frobenius norms, in float64);
  - globally, the same over all leaves concatenated, ||a - e||_all / ||e||_all, also in units of
    float32's machine epsilon (2^-23), the scale of one rounding;
  - leaves whose reference norm is below `tiny_fraction` of the global reference norm are
    reported apart: their true gradient is (close to) zero, e.g. a parameter the loss does not
    depend on in exact arithmetic, so their relative error measures roundoff noise of other
    leaves' scale, not the precision of that leaf. Their error is given relative to the global
    norm instead.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
TINY_FRACTION = 1e-4
WORST = 3


def leaf_norms(approximate: Any, exact: Any) -> list[dict]:
  """Per leaf of `exact`: its path name, size, ||e|| and ||a - e|| (float64 on the host).

  Raises ValueError when the two trees differ in structure or in a leaf's shape.
  """
  exact_leaves, exact_tree = jax.tree_util.tree_flatten_with_path(exact)
  approximate_leaves, approximate_tree = jax.tree_util.tree_flatten(approximate)
  if approximate_tree != jax.tree_util.tree_structure(exact):
    raise ValueError(f"The approximate tree {approximate_tree} differs from the reference "
                     f"tree {exact_tree}.")
  rows = []
  for (path, e), a in zip(exact_leaves, approximate_leaves):
    name = jax.tree_util.keystr(path)
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if a.shape != e.shape:
      raise ValueError(f"Leaf {name}: shape {a.shape} against the reference's {e.shape}.")
    rows.append({"name": name, "size": int(e.size), "norm": float(np.linalg.norm(e)),
                 "error": float(np.linalg.norm(a - e))})
  return rows


def _significant(value: float) -> float:
  return float(f"{value:.3g}")


def tree_error(approximate: Any, exact: Any, *, tiny_fraction: float = TINY_FRACTION,
               worst: int = WORST) -> dict:
  """Global, per-leaf and tiny-leaf errors of `approximate` against `exact` (module doc).

  Returns leaves, global_relative_error, global_error_in_float32_eps, the median and max
  per-leaf relative error over the leaves that are not tiny, the `worst` such leaves (name,
  size, norm, relative_error), and the tiny leaves' count, threshold and largest error relative
  to the global norm.
  """
  if not 0 <= tiny_fraction < 1:
    raise ValueError(f"tiny_fraction must be in [0, 1); got {tiny_fraction}.")
  rows = leaf_norms(approximate, exact)
  if not rows:
    raise ValueError("The reference tree has no leaves.")
  global_norm = float(np.sqrt(sum(row["norm"] ** 2 for row in rows)))
  global_error = float(np.sqrt(sum(row["error"] ** 2 for row in rows)))
  if global_norm == 0:
    raise ValueError("The reference tree is zero everywhere; its relative error is undefined.")
  threshold = tiny_fraction * global_norm
  regular = [row for row in rows if row["norm"] > threshold]
  tiny = [row for row in rows if row["norm"] <= threshold]
  if not regular:
    raise ValueError(f"Every leaf's reference norm is at most tiny_fraction={tiny_fraction} of "
                     "the global norm; give a smaller tiny_fraction.")
  relative = np.asarray([row["error"] / row["norm"] for row in regular])
  order = np.argsort(-relative, kind="stable")[:worst]
  global_relative = global_error / global_norm
  return {
      "leaves": len(rows),
      "global_relative_error": _significant(global_relative),
      "global_error_in_float32_eps": _significant(global_relative / FLOAT32_EPS),
      "median_relative_error": _significant(float(np.median(relative))),
      "max_relative_error": _significant(float(relative.max())),
      "worst_leaves": [{"name": regular[i]["name"], "size": regular[i]["size"],
                        "norm": _significant(regular[i]["norm"]),
                        "relative_error": _significant(float(relative[i]))} for i in order],
      "tiny_leaves": {
          "count": len(tiny), "threshold": _significant(threshold),
          "max_error_relative_to_global_norm": _significant(
              max((row["error"] for row in tiny), default=0.0) / global_norm),
          "names": [row["name"] for row in tiny][:worst]},
  }
