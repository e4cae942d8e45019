"""benchmarks.gradient_error against a naive numpy computation on a tiny pytree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import gradient_error


def _trees():
  rng = np.random.default_rng(0)
  exact = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
           "dense": {"kernel": 1e-3 * rng.normal(size=(5, 2))},
           "norm": {"bias": np.full(3, 1e-12)}}  # a true gradient of ~0: a tiny leaf
  noise = {"conv": {"kernel": 1e-6 * rng.normal(size=(3, 3, 2, 4)),
                    "bias": 1e-5 * rng.normal(size=4)},
           "dense": {"kernel": 1e-7 * rng.normal(size=(5, 2))},
           "norm": {"bias": 1e-8 * rng.normal(size=3)}}
  approximate = {group: {name: (exact[group][name] + noise[group][name]).astype(np.float32)
                         for name in exact[group]} for group in exact}
  return approximate, exact


def test_matches_naive_numpy():
  approximate, exact = _trees()
  result = gradient_error.tree_error(approximate, exact, tiny_fraction=1e-6, worst=2)
  names = [(group, name) for group in sorted(exact) for name in sorted(exact[group])]
  e = [np.asarray(exact[g][n], np.float64).ravel() for g, n in names]
  a = [np.asarray(approximate[g][n], np.float64).ravel() for g, n in names]
  e_all, a_all = np.concatenate(e), np.concatenate(a)
  global_norm = math.sqrt(float(np.sum(e_all ** 2)))
  global_relative = math.sqrt(float(np.sum((a_all - e_all) ** 2))) / global_norm
  assert result["leaves"] == 4
  np.testing.assert_allclose(result["global_relative_error"], global_relative, rtol=5e-3)
  np.testing.assert_allclose(result["global_error_in_float32_eps"],
                             global_relative / 2.0 ** -23, rtol=5e-3)
  # Per leaf relative error over the leaves above 1e-6 of the global norm (the ~0 bias is not).
  relative = {}
  for (g, n), ei, ai in zip(names, e, a):
    norm = math.sqrt(float(np.sum(ei ** 2)))
    if norm > 1e-6 * global_norm:
      relative[f"['{g}']['{n}']"] = math.sqrt(float(np.sum((ai - ei) ** 2))) / norm
  assert len(relative) == 3
  np.testing.assert_allclose(result["median_relative_error"], np.median(list(relative.values())),
                             rtol=5e-3)
  np.testing.assert_allclose(result["max_relative_error"], max(relative.values()), rtol=5e-3)
  expected_worst = sorted(relative, key=relative.get, reverse=True)[:2]
  assert [leaf["name"] for leaf in result["worst_leaves"]] == expected_worst
  assert result["worst_leaves"][0]["size"] == {"['conv']['bias']": 4, "['conv']['kernel']": 72,
                                               "['dense']['kernel']": 10}[expected_worst[0]]
  tiny = result["tiny_leaves"]
  assert tiny["count"] == 1 and tiny["names"] == ["['norm']['bias']"]
  tiny_error = math.sqrt(float(np.sum((a[-1] - e[-1]) ** 2))) / global_norm
  np.testing.assert_allclose(tiny["max_error_relative_to_global_norm"], tiny_error, rtol=5e-3)
  # Without the tiny-leaf split the ~0 leaf's relative error (~1e4) dominates the max.
  everything = gradient_error.tree_error(approximate, exact, tiny_fraction=0.0)
  assert everything["tiny_leaves"]["count"] == 0
  assert everything["max_relative_error"] > 1e3
  assert everything["worst_leaves"][0]["name"] == "['norm']['bias']"


def test_exact_copy_has_zero_error():
  _, exact = _trees()
  result = gradient_error.tree_error(exact, exact)
  assert result["global_relative_error"] == 0 and result["max_relative_error"] == 0


def test_bad_trees_are_named_errors():
  approximate, exact = _trees()
  with pytest.raises(ValueError, match="differs from the reference"):
    gradient_error.tree_error({"conv": approximate["conv"]}, exact)
  wrong = {g: dict(leaves) for g, leaves in approximate.items()}
  wrong["dense"]["kernel"] = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*\(2, 5\)"):
    gradient_error.tree_error(wrong, exact)
  with pytest.raises(ValueError, match="zero everywhere"):
    gradient_error.tree_error(approximate, {g: {n: 0 * v for n, v in leaves.items()}
                                            for g, leaves in exact.items()})
  with pytest.raises(ValueError, match="tiny_fraction"):
    gradient_error.tree_error(approximate, exact, tiny_fraction=1.0)
