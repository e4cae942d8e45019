"""Guided IG's selection rounds (`integrated.guided_selection`) against PAIR's literal loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.attribution import integrated

CASES = 24  # random problems per (size, fraction), one vmapped call


def _pair_rounds(ranking, capacity, needed, fraction):
  """PAIR saliency's rounds of one step in numpy, literally: each round the 'lower' quantile
  of |grad| (moved features at +inf), all of it moved while that falls short of the L1 still
  needed, then the fraction gamma of the last selection. Returns (to_bound, part_way, gamma)."""
  grad = np.array(ranking, np.float64)
  to_bound = np.zeros(grad.shape, bool)
  remaining = float(needed)
  while True:
    threshold = np.quantile(grad, fraction, method="lower")
    selected = (grad <= threshold) & (grad != np.inf)
    movable = capacity[selected].sum()
    gamma = remaining / movable if movable > 0 else np.inf
    if gamma <= 1:
      return to_bound, selected, gamma
    to_bound |= selected
    remaining -= movable
    grad[selected] = np.inf


def _problems(size, dtype, seed):
  """Rankings with ties, zeros and +inf (features at their bound), positive capacities, and an
  L1 distance to remove below the total capacity (PAIR's loop never ends above it)."""
  rng = np.random.default_rng(seed)
  ranking = rng.integers(0, 6, (CASES, size)) * 0.37
  ranking[:, ::3] += rng.uniform(0, 2, ranking[:, ::3].shape)       # some distinct values
  ranking[rng.uniform(size=ranking.shape) < rng.uniform(0, 0.6, (CASES, 1))] = np.inf
  ranking[0] = np.inf                                                   # nothing selectable
  capacity = np.where(ranking == np.inf, 0.0, rng.uniform(0.1, 1.0, ranking.shape))
  needed = capacity.sum(axis=1) * rng.uniform(0.0, 0.999, CASES)
  return ranking.astype(dtype), capacity.astype(dtype), needed.astype(dtype)


@pytest.mark.parametrize("dtype, size, fraction", [
    (np.float64, 301, 0.1), (np.float64, 7, 1.0), (np.float32, 301, 0.25)])
def test_guided_selection_matches_pairs_loop_with_ties_and_infinities(dtype, size, fraction):
  with jax.enable_x64(dtype == np.float64):
    ranking, capacity, needed = _problems(size, dtype, seed=size)
    select = jax.jit(jax.vmap(lambda r, c, n: integrated.guided_selection(r, c, n, fraction)))
    to_bound, part_way, gamma = (np.asarray(a) for a in select(ranking, capacity, needed))
    for case in range(1, CASES):
      expected = _pair_rounds(ranking[case], capacity[case].astype(np.float64), needed[case],
                              fraction)
      np.testing.assert_array_equal(to_bound[case], expected[0], err_msg=f"case {case}")
      np.testing.assert_array_equal(part_way[case], expected[1], err_msg=f"case {case}")
      np.testing.assert_allclose(gamma[case], expected[2],
                                 rtol=1e-12 if dtype == np.float64 else 1e-4,
                                 err_msg=f"case {case}")
    several_rounds = to_bound[1:].any(axis=1).sum()    # fraction 1 selects all at once
    assert several_rounds == 0 if fraction == 1.0 else several_rounds >= CASES // 4
    # Nothing selectable: nothing moves (PAIR's loop would not end); a reached target: neither.
    assert not to_bound[0].any() and not part_way[0].any()
    reached = integrated.guided_selection(jnp.asarray(ranking[1]), jnp.asarray(capacity[1]),
                                          needed[1], fraction, reached=True)
    assert not np.asarray(reached[0]).any() and not np.asarray(reached[1]).any()
