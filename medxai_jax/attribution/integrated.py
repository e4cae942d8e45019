r"""Path attributions: Integrated Gradients, Blur IG and Guided IG, batched and jit-able.

Notation (S the target score of `common`, x the image, x' the baseline, phi the attribution):
- Integrated Gradients (Sundararajan et al. 2017), on the straight line x(a) = x' + a (x - x'):
  phi_i = (x_i - x'_i) int_0^1 dS(x(a))/dx_i da ~ (x_i - x'_i) sum_k w_k dS(x(a_k))/dx_i,
  with quadrature nodes a_k and weights w_k, the `rule` (N = num_steps evaluations):
    riemann_left      a_k = k/N,            w_k = 1/N       (k = 0..N-1)
    riemann_right     a_k = (k+1)/N,        w_k = 1/N
    riemann_midpoint  a_k = (k+1/2)/N,      w_k = 1/N
    riemann_trapezoid a_k = k/(N-1),        w_k = 1/(N-1), halved at both ends (sum 1)
    gauss_legendre    Gauss-Legendre nodes and weights mapped to [0, 1]
    pair_uniform      a_k = k/(N-1),        w_k = 1/N       (PAIR saliency's IG: linspace(0, 1,
                      N), both ends included, the gradient sum divided by N; sum 1)
    captum_trapezoid  a_k = k/(N-1),        w_k = 1/N, halved at both ends (Captum's
                      'riemann_trapezoid': the weights sum to 1 - 1/N, not 1)
  Captum's `method=` names are accepted as aliases (`RULE_ALIASES`): 'riemann_left',
  'riemann_right' and 'riemann_middle' (= riemann_midpoint) and 'gausslegendre'
  (= gauss_legendre) are the same rules as ours; Captum's 'riemann_trapezoid' is not our
  riemann_trapezoid (ours is the trapezoid rule, weights summing to 1), so it is offered under
  its own name, captum_trapezoid. Completeness: sum_i phi_i = S(x) - S(x') (`completeness_gap`
  reports it).
- Blur IG (Xu et al. 2020), on the scale-space path x_s = G_s * x from s = s_max to 0:
  phi = int_{s_max}^0 dS(x_s)/dx * dx_s/ds ds ~ -sum_k (s_{k+1} - s_k) dx_{s_k}/ds * dS(x_{s_k})/dx,
  with s_k = s_max k / N (or s_max sqrt(k / N)) and dx_s/ds a forward difference of step h
  (the PAIR saliency semantics); completeness is with respect to S(x) - S(G_{s_max} * x).
- Guided IG (Kapishnikov et al. 2021): an adaptive path x^0 = x', ..., x^N = x whose step t
  lowers the L1 distance to x to (1 - t/N) ||x - x'||_1 by moving the fraction p of features
  with the smallest |dS/dx_i| (whatever their sign) towards x, each feature kept within
  a in [t/N - d, t/N + d] (d = max_dist) of the straight line, the anchors;
  phi = sum_t dS(x^{t-1})/dx * (x^t - x^{t-1}). The fraction p is numpy's 'lower' quantile of
  the unbounded features' |dS/dx_i|, ties included, as in PAIR saliency, found as an order
  statistic of the step's ranking (a bisection over the float bit patterns that stops once one
  value is left) rather than by sorting.

Every method takes any scoring function `logits_fn(images) -> logits [B, K]` (`api.LogitsFn`)
and runs in the images' dtype: nodes, weights, blur levels and Guided IG's step counter are
cast to it, so float64 images under jax_enable_x64 give float64 attributions end to end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import common

IG_RULES = ("riemann_left", "riemann_right", "riemann_midpoint", "riemann_trapezoid",
            "gauss_legendre", "pair_uniform", "captum_trapezoid")
# Captum's `method=` names for the rules that are the same as ours.
RULE_ALIASES = {"riemann_middle": "riemann_midpoint", "gausslegendre": "gauss_legendre"}
DEFAULT_NUM_STEPS = common.NUM_STEPS
DEFAULT_CHUNK_SIZE = common.CHUNK_SIZE
BASELINE_NAMES = ("zeros", "blurred", "random")
BLUR_PADDINGS = ("constant", "reflect")
BLUR_MAX_SIGMA = 50.0
SEARCH_UNROLL = 4  # bisection steps per loop iteration of `narrow_bracket`
Baseline = str | float | int | jax.Array | np.ndarray


# ---------------------------------------------------------------------------------------------
# Quadrature and baselines.


def canonical_rule(rule: str) -> str:
  """The rule's name in `IG_RULES` (a Captum alias mapped to ours); ValueError if unknown."""
  name = RULE_ALIASES.get(rule, rule)
  if name not in IG_RULES:
    raise ValueError(f"Unknown integration rule {rule!r}; expected one of {IG_RULES} or a "
                     f"Captum alias {tuple(RULE_ALIASES)}.")
  return name


def quadrature(rule: str, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Float64 nodes a_k in [0, 1] and weights w_k of a rule with num_steps evaluations (the
  weights sum to 1, except captum_trapezoid's: 1 - 1/num_steps)."""
  common.check_positive("num_steps", num_steps)
  method = canonical_rule(rule)
  steps = np.arange(num_steps, dtype=np.float64)
  if method in ("riemann_trapezoid", "pair_uniform", "captum_trapezoid") and num_steps < 2:
    raise ValueError(f"rule {rule!r} needs num_steps >= 2 (both end points); got {num_steps}.")
  if method == "riemann_left":
    nodes, weights = steps / num_steps, np.full(num_steps, 1.0 / num_steps)
  elif method == "riemann_right":
    nodes, weights = (steps + 1) / num_steps, np.full(num_steps, 1.0 / num_steps)
  elif method == "riemann_midpoint":
    nodes, weights = (steps + 0.5) / num_steps, np.full(num_steps, 1.0 / num_steps)
  elif method == "riemann_trapezoid":
    nodes = steps / (num_steps - 1)
    weights = np.full(num_steps, 1.0 / (num_steps - 1))
    weights[[0, -1]] /= 2
  elif method == "pair_uniform":
    nodes, weights = steps / (num_steps - 1), np.full(num_steps, 1.0 / num_steps)
  elif method == "captum_trapezoid":
    nodes = steps / (num_steps - 1)
    weights = np.full(num_steps, 1.0 / num_steps)
    weights[[0, -1]] /= 2
  else:  # gauss_legendre
    points, point_weights = np.polynomial.legendre.leggauss(num_steps)
    nodes, weights = (points + 1) / 2, point_weights / 2
  return nodes, weights


def _check_baseline_array(images: jax.Array, baseline: jax.Array) -> jax.Array:
  """A baseline array [B, H, W, C] or [H, W, C] broadcast to the images' shape."""
  shape = tuple(jnp.shape(baseline))
  if shape not in (tuple(images.shape), tuple(images.shape[1:])):
    raise ValueError(
        f"baseline array must have shape {tuple(images.shape)} or {tuple(images.shape[1:])}; "
        f"got {shape}.")
  return jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)


def resolve_baseline(images: jax.Array, baseline: Baseline, *, key: jax.Array | None = None,
                     blur_sigma: float = BLUR_MAX_SIGMA) -> jax.Array:
  """Baseline images x' [B, H, W, C] from a name, a constant or an array."""
  common.check_images(images)
  if isinstance(baseline, str):
    if baseline == "zeros":
      return jnp.zeros_like(images)
    if baseline == "blurred":
      return gaussian_blur(images, blur_sigma)
    if baseline == "random":
      if key is None:
        raise ValueError("baseline='random' needs a PRNG key: pass key=jax.random.key(...).")
      low = images.min(axis=(1, 2, 3), keepdims=True)
      high = images.max(axis=(1, 2, 3), keepdims=True)
      return jax.random.uniform(key, images.shape, images.dtype, low, high)
    raise ValueError(
        f"Unknown baseline {baseline!r}; expected one of {BASELINE_NAMES}, a number or an array.")
  if isinstance(baseline, (int, float)):
    return jnp.full_like(images, baseline)
  return _check_baseline_array(images, baseline)


# ---------------------------------------------------------------------------------------------
# Gaussian blur: scipy.ndimage.gaussian_filter over the two spatial axes (its mode: padding).


def _gaussian_weights(offsets: jax.Array, sigma: jax.Array, radius_bound: int,
                      truncate: float) -> jax.Array:
  """Truncated, normalised 1-D Gaussian taps at integer offsets (radius int(truncate s + 0.5))."""
  safe_sigma = jnp.maximum(sigma, 1e-6)  # sigma = 0 leaves only the centre tap: the identity

  def taps(distance: jax.Array) -> jax.Array:
    inside = jnp.abs(distance) <= truncate * sigma + 0.5
    return jnp.where(inside, jnp.exp(-0.5 * jnp.square(distance / safe_sigma)), 0.0)

  all_offsets = jnp.arange(-radius_bound, radius_bound + 1, dtype=offsets.dtype)
  return taps(offsets) / taps(all_offsets).sum()


def blur_matrix(size: int, sigma: jax.Array, *, radius_bound: int, padding: str = "constant",
                truncate: float = 4.0, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The [size, size] matrix (in `dtype`) of a 1-D Gaussian blur with zero ('constant') or
  'reflect' padding."""
  sigma = jnp.asarray(sigma, dtype)
  rows = jnp.arange(size, dtype=dtype)[:, None]
  cols = jnp.arange(size, dtype=dtype)[None, :]
  if padding == "constant":
    return _gaussian_weights(cols - rows, sigma, radius_bound, truncate)
  if padding == "reflect":
    # Half-sample reflection (d c b a | a b c d | d c b a) has period 2 * size: input j is read
    # at offsets j - i + 2 size m and -1 - j - i + 2 size m for every integer m.
    periods = radius_bound // (2 * size) + 2
    shifts = 2.0 * size * jnp.arange(-periods, periods + 1, dtype=dtype)[:, None, None]
    direct = _gaussian_weights(cols - rows + shifts, sigma, radius_bound, truncate)
    mirrored = _gaussian_weights(-1.0 - cols - rows + shifts, sigma, radius_bound, truncate)
    return (direct + mirrored).sum(axis=0)
  raise ValueError(f"Unknown blur padding {padding!r}; expected one of {BLUR_PADDINGS}.")


def gaussian_blur(images: jax.Array, sigma: float | jax.Array, *, max_sigma: float | None = None,
                  padding: str = "constant", truncate: float = 4.0) -> jax.Array:
  """Spatial Gaussian blur G_sigma * x of images [B, H, W, C]; sigma = 0 is the identity.

  `max_sigma` (static) bounds a traced `sigma`; without it `sigma` must be a concrete number.
  """
  common.check_images(images)
  bound = float(sigma) if max_sigma is None else float(max_sigma)
  if bound < 0:
    raise ValueError(f"Blur sigma must be >= 0; got {bound}.")
  radius_bound = int(truncate * bound + 0.5)
  sigma = jnp.asarray(sigma, images.dtype)
  _, height, width, _ = images.shape
  along_height = blur_matrix(height, sigma, radius_bound=radius_bound, padding=padding,
                             truncate=truncate, dtype=images.dtype)
  along_width = blur_matrix(width, sigma, radius_bound=radius_bound, padding=padding,
                            truncate=truncate, dtype=images.dtype)
  highest = jax.lax.Precision.HIGHEST
  blurred = jnp.einsum("ij,bjwc->biwc", along_height, images, precision=highest)
  return jnp.einsum("kw,biwc->bikc", along_width, blurred, precision=highest).astype(images.dtype)


# ---------------------------------------------------------------------------------------------
# Completeness.


def completeness_gap(logits_fn: api.LogitsFn, images: jax.Array, baselines: jax.Array,
                     targets: common.Targets, attributions: jax.Array) -> dict[str, jax.Array]:
  """Completeness report of path attributions [B, H, W, C] from `baselines` to `images`:
  per-image sum of attributions, S(x) - S(x') and their absolute difference, each [B].

  For Blur IG the baselines are the maximally blurred images (`blur_ig_baselines`).
  """
  common.check_images(attributions, "attributions")
  if jnp.shape(attributions) != jnp.shape(images):
    raise ValueError(f"attributions must have the images' shape {tuple(jnp.shape(images))}; "
                     f"got {tuple(jnp.shape(attributions))}.")
  targets = common.resolve_inputs(logits_fn, images, targets)
  baselines = _check_baseline_array(images, baselines)
  scores = common.score_fn(logits_fn)
  score_difference = scores(images, targets) - scores(baselines, targets)
  total = attributions.sum(axis=(1, 2, 3))
  return {"sum_attributions": total, "score_difference": score_difference,
          "completeness_gap": jnp.abs(total - score_difference)}


def _flat_gradients(logits_fn: api.LogitsFn, points: jax.Array, targets: jax.Array
                    ) -> jax.Array:
  """Input gradients at points [K, B, H, W, C], evaluated as one batch of K * B images."""
  flat = points.reshape((-1,) + points.shape[2:])
  repeated_targets = common.tile_batch(targets, points.shape[0])
  grads = common.input_gradients(logits_fn, flat, repeated_targets)
  return grads.reshape(points.shape)


def _broadcast_steps(values: jax.Array) -> jax.Array:
  """Per-step scalars [K] shaped [K, 1, 1, 1, 1] to scale [K, B, H, W, C] stacks."""
  return values[:, None, None, None, None]


# ---------------------------------------------------------------------------------------------
# Integrated Gradients.


def integrated_gradients(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets,
                         *, baseline: Baseline = "zeros", num_steps: int = DEFAULT_NUM_STEPS,
                         rule: str = "riemann_trapezoid", chunk_size: int = DEFAULT_CHUNK_SIZE,
                         key: jax.Array | None = None, blur_sigma: float = BLUR_MAX_SIGMA
                         ) -> jax.Array:
  """IG maps [B, H, W, C] on the straight line from the baseline to each image.

  num_steps is the number of gradient evaluations per image for every rule; `rule` is one of
  `IG_RULES` or a Captum alias (module docstring). baseline: 'zeros', 'blurred' (Gaussian blur
  of sigma blur_sigma), 'random' (uniform in each image's range, from `key`), a number or an
  array [H, W, C] / [B, H, W, C]. The completeness report is `completeness_gap`.
  """
  nodes, weights = quadrature(rule, num_steps)
  targets = common.resolve_inputs(logits_fn, images, targets)
  baselines = resolve_baseline(images, baseline, key=key, blur_sigma=blur_sigma)
  difference = images - baselines
  nodes, weights = jnp.asarray(nodes, images.dtype), jnp.asarray(weights, images.dtype)

  def weighted_gradients(step_indices: jax.Array) -> jax.Array:
    alphas = _broadcast_steps(nodes[step_indices])
    points = baselines[None] + alphas * difference[None]
    grads = _flat_gradients(logits_fn, points, targets)
    return grads * _broadcast_steps(weights[step_indices])

  path_average = common.chunked_sum(weighted_gradients, num_steps, chunk_size)
  return difference * path_average


# ---------------------------------------------------------------------------------------------
# Blur IG.


def blur_sigmas(max_sigma: float, num_steps: int, sqrt: bool) -> np.ndarray:
  """The num_steps + 1 float64 blur levels s_0 = 0 < ... < s_N = max_sigma (linear or sqrt).

  PAIR's sqrt spacing, sqrt(k max_sigma / N), ends at sqrt(max_sigma); ours ends at max_sigma.
  """
  fractions = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  return max_sigma * (np.sqrt(fractions) if sqrt else fractions)


def blur_ig_baselines(images: jax.Array, *, max_sigma: float = BLUR_MAX_SIGMA,
                      padding: str = "constant") -> jax.Array:
  """Blur IG's start points G_{max_sigma} * x [B, H, W, C], the baselines of its completeness."""
  return gaussian_blur(images, max_sigma, padding=padding)


def blur_ig(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets, *,
            max_sigma: float = BLUR_MAX_SIGMA, num_steps: int = DEFAULT_NUM_STEPS,
            grad_step: float | None = 0.01, sqrt: bool = False,
            chunk_size: int = DEFAULT_CHUNK_SIZE, padding: str = "constant") -> jax.Array:
  """Blur IG maps [B, H, W, C] along the blur path from G_{max_sigma} * x to x.

  grad_step is the forward-difference step of dx_s/ds (PAIR saliency); None replaces
  (s_{k+1} - s_k) dx_{s_k}/ds by the exact path increment x_{s_{k+1}} - x_{s_k}. The
  completeness report is `completeness_gap` with `blur_ig_baselines(images, ...)`.
  """
  common.check_positive("num_steps", num_steps)
  if max_sigma <= 0:
    raise ValueError(f"max_sigma must be > 0; got {max_sigma}.")
  if grad_step is not None and grad_step <= 0:
    raise ValueError(f"grad_step must be > 0 or None; got {grad_step}.")
  targets = common.resolve_inputs(logits_fn, images, targets)
  sigmas = blur_sigmas(max_sigma, num_steps, sqrt)
  sigma_steps = jnp.asarray(np.diff(sigmas), images.dtype)
  sigmas = jnp.asarray(sigmas, images.dtype)
  bound = max_sigma + (grad_step or 0.0)

  def blur_at(levels: jax.Array) -> jax.Array:
    return jax.vmap(lambda s: gaussian_blur(images, s, max_sigma=bound, padding=padding))(levels)

  def step_attributions(step_indices: jax.Array) -> jax.Array:
    levels = sigmas[step_indices]
    points = blur_at(levels)                                        # [K, B, H, W, C]
    if grad_step is None:
      increments = blur_at(sigmas[step_indices + 1]) - points
    else:
      slopes = (blur_at(levels + grad_step) - points) / grad_step
      increments = slopes * _broadcast_steps(sigma_steps[step_indices])
    # The path runs from s_max down to 0, so each step moves by minus the increment in s.
    return -increments * _flat_gradients(logits_fn, points, targets)

  return common.chunked_sum(step_attributions, num_steps, chunk_size)


# ---------------------------------------------------------------------------------------------
# Guided IG.


def _inner_iteration_limit(num_features: int, rank: int) -> int:
  """Upper bound on the selection rounds one Guided IG step needs to reach its L1 target."""
  # Every unfinished round moves at least rank + 1 features to their bound, and once at most
  # `rank` features remain unbounded the threshold is infinite and they all move at once.
  return math.ceil(num_features / (rank + 1)) + 2


def _sortable_bits(values: jax.Array) -> jax.Array:
  """The bit patterns of non-negative floats (+inf included) as integers of the same width,
  which order exactly as the values do."""
  bits = jnp.finfo(values.dtype).bits
  return jax.lax.bitcast_convert_type(values, jnp.int64 if bits == 64 else jnp.int32)


def _infinity_key(keys: jax.Array) -> jax.Array:
  """The bit pattern of +inf in the float type whose patterns `keys` holds."""
  float_type = np.float64 if keys.dtype == jnp.int64 else np.float32
  return jnp.asarray(int(np.array(np.inf, float_type).view(np.dtype(keys.dtype))), keys.dtype)


def _count_at_most(keys: jax.Array, pivot: jax.Array) -> jax.Array:
  """count(keys <= pivot), in the keys' integer type.

  Summed as float32 below 2^24 keys (every partial sum is an integer below 2^24, so exact in
  any order): XLA:CPU reduces floats about 1.5x faster than integers.
  """
  count_type = jnp.float32 if keys.size < 2 ** 24 else keys.dtype
  return jnp.where(keys <= pivot, 1, 0).astype(count_type).sum().astype(keys.dtype)


Bracket = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _bracket_settled(bracket: Bracket) -> jax.Array:
  """Whether (low, high] holds one key value only: adjacent patterns, or a single key."""
  low, low_count, high, high_count = bracket
  return (high - low <= 1) | (high_count - low_count <= 1)


def narrow_bracket(keys: jax.Array, wanted: jax.Array, bracket: Bracket) -> Bracket:
  """The bracket (low, low_count, high, high_count) around K, the wanted-th smallest of the
  integer keys [F], narrowed until (low, high] holds K's value only.

  In and out: low < K <= high, low_count = count(keys <= low) < wanted <= high_count =
  count(keys <= high). On return {keys <= high} = {keys <= K} (high_count its size, ties
  included), which is all a selection by K needs; `kth_smallest` reads K itself. Bisection
  over the patterns, stopping as soon as one key is left: ~18 counts for 4096 float32
  gradients instead of 31.
  """

  def halve(bracket: Bracket) -> Bracket:
    low, low_count, high, high_count = bracket
    middle = low + (high - low) // 2
    count = _count_at_most(keys, middle)
    enough = count >= wanted
    halved = (jnp.where(enough, low, middle), jnp.where(enough, low_count, count),
              jnp.where(enough, middle, high), jnp.where(enough, count, high_count))
    settled = _bracket_settled(bracket)
    return tuple(jnp.where(settled, old, new) for old, new in zip(bracket, halved))

  def halvings(bracket: Bracket) -> Bracket:
    for _ in range(SEARCH_UNROLL):  # a few per iteration: each is tiny next to loop overhead
      bracket = halve(bracket)
    return bracket

  return jax.lax.while_loop(lambda bracket: ~_bracket_settled(bracket), halvings, bracket)


def _bracket_above(keys: jax.Array, wanted: jax.Array, finite_count: jax.Array,
                   low: jax.Array | int = -1, low_count: jax.Array | int = 0) -> Bracket:
  """The bracket from (low, low_count) up to +inf for the wanted-th smallest key, already
  settled at +inf when wanted exceeds the finite keys (the +inf patterns are the largest)."""
  infinity = _infinity_key(keys)
  past_finite = wanted > finite_count
  return (jnp.where(past_finite, infinity - 1, low),
          jnp.where(past_finite, finite_count, low_count),
          infinity, jnp.asarray(keys.size, keys.dtype))


def kth_smallest(values: jax.Array, index: jax.Array) -> jax.Array:
  """np.sort(values)[index] of non-negative values [F] (+inf allowed); +inf when index >= F.

  Exact, ties included, without sorting: `narrow_bracket` over the values' bit patterns, then
  the largest value in the final bracket.
  """
  keys = _sortable_bits(values)
  wanted = jnp.minimum(jnp.asarray(index).astype(keys.dtype) + 1, keys.size)
  finite_count = (keys != _infinity_key(keys)).sum(dtype=keys.dtype)
  _, _, high, _ = narrow_bracket(keys, wanted, _bracket_above(keys, wanted, finite_count))
  found = jnp.where(keys <= high, keys, -1).max()
  return jnp.where(jnp.asarray(index) >= keys.size, jnp.asarray(jnp.inf, values.dtype),
                   jax.lax.bitcast_convert_type(found, values.dtype))


def _l1_reached(l1_current: jax.Array, l1_target: jax.Array) -> jax.Array:
  """Whether the L1 distance has come down to its target (PAIR: math.isclose, 1e-9 relative
  and absolute; float32 sums carry rounding of ~1e-6, so their relative tolerance is 8 eps)."""
  relative = max(1e-9, 8 * float(jnp.finfo(l1_current.dtype).eps))
  tolerance = jnp.maximum(relative * jnp.maximum(l1_current, l1_target), 1e-9)
  return l1_current - l1_target <= tolerance


def guided_selection(ranking: jax.Array, capacity: jax.Array, needed: jax.Array,
                     fraction: float, *, reached: jax.Array | bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The published loop's selection rounds of one Guided IG step, on flat features [F].

  ranking: |dS/dx_i|, +inf for features at the band's upper edge (never selected); capacity:
  the L1 distance each feature can still move (0 where ranking is +inf); needed: the L1
  distance the step must remove; reached: the target is met already (no round runs).
  Returns (to_bound, part_way, gamma): the features moved to the upper edge, and those moved
  the fraction gamma <= 1 of the way there by the last round.

  Each round moves the lower `fraction` quantile (numpy's 'lower' method, ties included) of
  the ranking, with the features moved so far at +inf. They are the smallest-ranked ones, so
  after rounds that moved c features the next threshold is the (rank + c)-th smallest of the
  step's ranking: every round narrows a bracket in the same bit patterns
  (`narrow_bracket`), starting above the previous round's threshold.
  """
  keys = _sortable_bits(ranking)
  selectable = keys != _infinity_key(keys)
  finite_count = selectable.sum(dtype=keys.dtype)
  rank = int(math.floor(fraction * (keys.size - 1)))  # np.quantile(..., fraction, 'lower')
  dtype = capacity.dtype

  def selection_round(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    moved_count, saturated, saturated_capacity, _, _, _, rounds = state
    wanted = rank + moved_count + 1
    bracket = _bracket_above(keys, wanted, finite_count, saturated, moved_count)
    _, _, threshold, chosen_count = narrow_bracket(keys, wanted, bracket)
    chosen_count = jnp.minimum(chosen_count, finite_count)   # +inf selects the finite ones
    chosen_capacity = jnp.where((keys <= threshold) & selectable, capacity, 0.0).sum()
    enough = chosen_capacity >= needed           # gamma <= 1: this round is the last
    stuck = chosen_count == moved_count          # nothing left to move (all at x_max)
    go_on = ~enough & ~stuck
    return (jnp.where(go_on, chosen_count, moved_count),
            jnp.where(go_on, threshold, saturated),
            jnp.where(go_on, chosen_capacity, saturated_capacity),
            threshold, chosen_capacity, ~go_on, rounds + 1)

  limit = _inner_iteration_limit(keys.size, rank)
  no_threshold = jnp.asarray(-1, keys.dtype)     # below every pattern: selects nothing
  initial = (jnp.asarray(0, keys.dtype), no_threshold, jnp.asarray(0.0, dtype), no_threshold,
             jnp.asarray(0.0, dtype), jnp.asarray(reached), jnp.asarray(0))
  _, saturated, saturated_capacity, last, last_capacity, _, _ = jax.lax.while_loop(
      lambda state: ~state[5] & (state[6] < limit), selection_round, initial)
  to_bound = (keys <= saturated) & selectable
  part_way = (keys <= last) & selectable & ~to_bound
  extra = last_capacity - saturated_capacity
  gamma = jnp.where(extra > 0, (needed - saturated_capacity) / jnp.where(extra > 0, extra, 1.0),
                    1.0)
  return to_bound, part_way, jnp.minimum(gamma, 1.0)


def _guided_step(x: jax.Array, grad: jax.Array, x_input: jax.Array, x_baseline: jax.Array,
                 alpha: jax.Array, *, fraction: float, max_dist: float | jax.Array) -> jax.Array:
  """One Guided IG step of one image: the point x^t reached from x^{t-1} with gradient grad
  (anchors first, then `guided_selection`'s rounds)."""
  dtype = x.dtype
  difference = x_input - x_baseline
  moving = difference != 0
  max_dist = jnp.asarray(max_dist, dtype)
  alpha_min = jnp.maximum(alpha - max_dist, 0.0)
  alpha_max = jnp.minimum(alpha + max_dist, 1.0)
  x_min = x_baseline + difference * alpha_min
  x_max = x_baseline + difference * alpha_max
  x_alpha = jnp.where(moving, (x - x_baseline) / jnp.where(moving, difference, 1.0), alpha_max)
  x = jnp.where(x_alpha < alpha_min, x_min, x)     # anchors: nothing lags behind alpha_min
  l1_target = jnp.abs(difference).sum() * (1.0 - alpha)
  l1_current = jnp.abs(x - x_input).sum()
  # Ranked by magnitude (a negative gradient counts as its size); features already at their
  # upper bound rank +inf and are never selected.
  ranking = jnp.where(x == x_max, jnp.inf, jnp.abs(grad)).ravel()
  capacity = jnp.where(ranking != jnp.inf, jnp.abs(x - x_max).ravel(), 0.0)
  to_bound, part_way, gamma = guided_selection(
      ranking, capacity, l1_current - l1_target, fraction,
      reached=_l1_reached(l1_current, l1_target))
  to_bound, part_way = to_bound.reshape(x.shape), part_way.reshape(x.shape)
  return jnp.where(to_bound, x_max, jnp.where(part_way, x + gamma * (x_max - x), x))


def guided_ig(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets, *,
              baseline: Baseline = "zeros", num_steps: int = DEFAULT_NUM_STEPS,
              fraction: float = 0.25, max_dist: float = 0.02, key: jax.Array | None = None,
              blur_sigma: float = BLUR_MAX_SIGMA) -> jax.Array:
  """Guided IG maps [B, H, W, C] (the completeness report is `completeness_gap`).

  The step counter and every path quantity are in the images' dtype (float64 images under
  jax_enable_x64 reproduce the published float64 loop). Completeness is approximate on ReLU
  networks: picking the features of smallest |gradient| steers the path onto ReLU kinks, where
  the gradient taken at the start of a step misses the change across the kink. The gap grows
  with max_dist and shrinks only slowly with num_steps.
  """
  common.check_positive("num_steps", num_steps)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1]; got {fraction}.")
  if isinstance(max_dist, (int, float)) and not 0.0 <= max_dist <= 1.0:  # may be traced
    raise ValueError(f"max_dist must lie in [0, 1]; got {max_dist}.")
  targets = common.resolve_inputs(logits_fn, images, targets)
  baselines = resolve_baseline(images, baseline, key=key, blur_sigma=blur_sigma)
  dtype = images.dtype
  step = jax.vmap(lambda x, grad, x_input, x_baseline, alpha: _guided_step(
      x, grad, x_input, x_baseline, alpha, fraction=fraction, max_dist=max_dist),
      in_axes=(0, 0, 0, 0, None))

  def advance(state: tuple[jax.Array, jax.Array], t: jax.Array):
    x, attributions = state
    grads = common.input_gradients(logits_fn, x, targets).astype(dtype)
    alpha = (t + 1).astype(dtype) / jnp.asarray(num_steps, dtype)
    x_next = step(x, grads, images, baselines, alpha)
    return (x_next, attributions + (x_next - x) * grads), None

  initial = (baselines, jnp.zeros_like(images))
  steps = jnp.arange(num_steps, dtype=jnp.int64 if dtype == jnp.float64 else jnp.int32)
  (_, attributions), _ = jax.lax.scan(advance, initial, steps)
  return attributions
