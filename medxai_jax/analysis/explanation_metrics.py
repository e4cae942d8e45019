"""Quantus's standard explanation metrics, vmapped: ROAD, MPRT and smooth MPRT, relevance mass and
rank accuracy, sparseness, complexity and max-sensitivity.

Every metric takes plain arrays and JAX callables, so it works with any model: maps M are
[B, H, W] or [B, H, W, C], masks G [B, H, W] (or [B, H, W, 1]), `logits_fn(images) -> [B, K]`
(`medxai_jax.attribution.api`), and the metrics that re-explain take an `explain_fn`. Scores are
per image ([B]); random parts take explicit PRNG keys. Everything runs in the maps' (images')
dtype, float64 included. Definitions follow Quantus 0.6.0 (`quantus.metrics.*`); the oracle
test (tests/analysis/test_explanation_metrics.py) checks each against it on the same weights and
maps.

Attribution preprocessing. Quantus normalises every map by the maximum |a| over the whole batch
passed in (`normalise_by_max` with its default axes: one scalar for all images) and then takes
|a| where a metric's `abs` default says so. Here `absolute` has Quantus's per-metric default,
but `normalise` defaults to False: our scores are per image and must not depend on which other
images share the call. `normalise=True` reproduces Quantus (the batch maximum). It matters only
through the epsilons of sparseness and complexity and for max-sensitivity; ROAD, relevance mass
and rank accuracy and the rank correlations of MPRT are invariant to a positive scale.

Sparseness (Chalasani et al. 2020): the Gini index of a = |M| + epsilon flattened (n values,
sorted ascending a_(1) <= ... <= a_(n)): G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i)); one-hot
maps give (n - 1) / n (epsilon 0), uniform maps 0. Quantus adds epsilon = 1e-7.

Complexity (Bhatt et al. 2020): the entropy of the fractional contribution p = a / sum |a| with
a = |M|: -sum p log(p + 1e-12); a uniform map gives log n.

Relevance mass accuracy (Arras et al. 2022): sum_{G} a / sum a (signed a by Quantus's default,
`absolute=False`); relevance rank accuracy: the share of the |G| highest-valued entries (ties in
raster order; Quantus uses numpy's unstable argsort) that lie in G. Both NaN for an empty mask.
Maps with C channels are compared with the mask repeated over the channels (as Quantus does).

ROAD (Rong et al. 2022, "Evaluating feature attribution: an information-theoretic perspective"):
for each percentage p of `percentages` (Quantus: 1, 3, ..., 99), the n_p = floor(H W p / 100)
pixels ranked first are removed: MoRF (most relevant first, Quantus's only order: descending M)
or LeRF (least relevant first: ascending M). Removed pixels get the noisy linear imputation of
the ROAD paper: each removed value is the weighted mean of its in-image 8-neighbours (weights
1/6 for the 4 axial and 1/12 for the 4 diagonal ones, renormalised at the border), a sparse
linear system whose unknowns are all removed pixels together, solved per channel; then
N(0, noise^2) is added to the removed values (`noise`, Quantus's default 0.01). Quantus solves it
exactly (scipy spsolve); here it is solved by Jacobi-preconditioned conjugate gradients on the
3 x 3 stencil (the system is symmetric positive definite whenever a pixel is kept), vmapped over
images, to ||residual|| <= `tolerance` ||right-hand side|| (at most `max_steps`, default H W C,
iterations). The score after each step is Quantus's: 1 when the model's prediction
(argmax; a one-logit model's sign) equals the target, else 0 (`score='accuracy'`); or the
target-class probability (`score='probability'`). Quantus returns the mean over images per
percentage (`curve.scores.mean(0)` here); the per-image AUC is the trapezoid rule over the
fractions p / 100 (so at most 0.98 for Quantus's grid). A faithful map has a low MoRF AUC and a
high LeRF AUC. Maps must be [B, H, W] (or [B, H, W, 1]): Quantus's ROAD ranks pixels only for
one-channel inputs. Steps run as one `lax.map` over the percentages, `chunk_size` steps vmapped.

MPRT (Adebayo et al. 2018, Quantus's `MPRT`): the parameters of `layers` (forward order) are
replaced by `fresh_params` layer by layer: 'top_down' (Quantus's default: cascading from the
output layer), 'bottom_up' (cascading from the input layer) or 'independent' (one layer at a
time, in forward order). Each step's maps are compared with the original maps by Spearman's rank
correlation of the flattened |M| (`absolute=True`, Quantus's default; average ranks for ties, as
scipy). Quantus re-initialises a torch layer with `reset_parameters()` (BatchNorm: also its
running statistics); here the new values are whatever `fresh_params` holds (for the project's
models: `faithfulness.fresh_parameters`), and other collections (BatchNorm statistics) are kept.
Quantus's `return_average_correlation` averages the layers' scores together with the original
explanation's self-similarity (its code skips a key 'orig' that never exists); `average` here
is the mean over the randomisation steps only.

Smooth MPRT (Hedström et al. 2023): MPRT with every explanation (original and randomised models)
replaced by its mean over `num_samples` explanations of x + eps, eps ~ N(0, sigma^2) with
sigma = noise_magnitude (max x - min x) per image, the last sample noise-free (Quantus's
convention, so one sample is the plain explanation); default order 'bottom_up' as Quantus.
Quantus draws the noise from numpy's global generator; here from `key`, or pass `noise` (the
standard-normal draws) to reproduce another sequence.

Max-sensitivity (Yeh et al. 2019): max over `num_samples` (Quantus: 200) perturbations
x + u, u ~ U(-radius, radius)^d (Quantus's `lower_bound` 0.2, its default) of
||M(x + u) - M(x)||_F / ||M(x)||_F, the maps re-computed by `explain_fn(images) -> maps` and
compared flattened. The draws are `uniform_perturbations(key, ...)`; the samples run as a
`lax.map`, `chunk_size` samples vmapped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.analysis import faithfulness
from medxai_jax.attribution import api

ROAD_ORDERS = ("morf", "lerf")
ROAD_SCORES = ("accuracy", "probability")
MPRT_ORDERS = ("top_down", "bottom_up", "independent")
QUANTUS_ROAD_PERCENTAGES = tuple(range(1, 100, 2))
# The ROAD paper's noisy linear imputation stencil: axial neighbours 1/6, diagonal ones 1/12.
IMPUTATION_WEIGHTS = np.array([[1 / 12, 1 / 6, 1 / 12],
                               [1 / 6, 0.0, 1 / 6],
                               [1 / 12, 1 / 6, 1 / 12]])

ExplainFn = Callable[[jax.Array], jax.Array]
VariablesExplainFn = Callable[[Any, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Inputs.


def _float_dtype(array: jax.Array) -> Any:
  """The array's dtype if floating, else the default float."""
  dtype = jnp.result_type(array)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def check_maps(maps: Any, name: str = "maps") -> jax.Array:
  """Float maps [B, H, W] or [B, H, W, C] (in their own floating dtype)."""
  maps = jnp.asarray(maps)
  if maps.ndim not in (3, 4):
    raise ValueError(f"{name} must be [B, H, W] or [B, H, W, C]; got shape {tuple(maps.shape)}.")
  return maps.astype(_float_dtype(maps))


def max_normalise(maps: jax.Array) -> jax.Array:
  """Quantus's `normalise_by_max`: maps over the maximum |value| of the whole array (zeros kept)."""
  peak = jnp.max(jnp.abs(maps))
  return maps / jnp.where(peak > 0, peak, 1)


def prepare(maps: Any, *, absolute: bool, normalise: bool, name: str = "maps") -> jax.Array:
  """Quantus's attribution preprocessing: optionally `max_normalise`, then optionally |.|."""
  maps = check_maps(maps, name)
  if normalise:
    maps = max_normalise(maps)
  return jnp.abs(maps) if absolute else maps


def _flat(maps: jax.Array) -> jax.Array:
  """Maps flattened per image: [B, n]."""
  return maps.reshape(maps.shape[0], -1)


def _masks_like(masks: Any, maps: jax.Array, name: str = "masks") -> jax.Array:
  """Boolean masks [B, H, W] broadcast over the maps' channels, flattened to [B, n]."""
  masks = faithfulness.as_masks(masks, maps.shape[:3], name)
  if maps.ndim == 4:
    masks = jnp.broadcast_to(masks[..., None], maps.shape)
  return _flat(masks)


# ---------------------------------------------------------------------------------------------
# Complexity.


def sparseness(maps: Any, *, absolute: bool = True, normalise: bool = False,
               epsilon: float = 1e-7) -> jax.Array:
  """Gini index [B] of each map (Quantus's Sparseness; higher = sparser)."""
  values = _flat(prepare(maps, absolute=absolute, normalise=normalise)) + epsilon
  count = values.shape[-1]
  ordered = jnp.sort(values, axis=-1)
  weights = 2 * jnp.arange(1, count + 1, dtype=values.dtype) - count - 1
  return jnp.sum(weights * ordered, axis=-1) / (count * jnp.sum(ordered, axis=-1))


def complexity(maps: Any, *, absolute: bool = True, normalise: bool = False,
               epsilon: float = 1e-12) -> jax.Array:
  """Entropy [B] of each map's fractional contributions a / sum |a| (Quantus's Complexity)."""
  values = _flat(prepare(maps, absolute=absolute, normalise=normalise))
  shares = values / jnp.sum(jnp.abs(values), axis=-1, keepdims=True)
  return -jnp.sum(shares * jnp.log(shares + epsilon), axis=-1)


# ---------------------------------------------------------------------------------------------
# Localisation.


def relevance_mass_accuracy(maps: Any, masks: Any, *, absolute: bool = False,
                            normalise: bool = False) -> jax.Array:
  """Share [B] of the map's (signed) sum inside the mask; NaN for an empty mask."""
  shaped = prepare(maps, absolute=absolute, normalise=normalise)
  values = _flat(shaped)
  inside = _masks_like(masks, shaped)
  mass = jnp.sum(jnp.where(inside, values, 0), axis=-1) / jnp.sum(values, axis=-1)
  return jnp.where(inside.any(axis=-1), mass, jnp.nan)


def relevance_rank_accuracy(maps: Any, masks: Any, *, absolute: bool = False,
                            normalise: bool = False) -> jax.Array:
  """Share [B] of the |mask| highest-valued entries inside the mask; NaN for an empty mask."""
  shaped = prepare(maps, absolute=absolute, normalise=normalise)
  values = _flat(shaped)
  inside = _masks_like(masks, shaped)

  def one(value: jax.Array, mask: jax.Array) -> jax.Array:
    size = jnp.sum(mask)
    order = jnp.argsort(-value, stable=True)
    top = jnp.arange(value.shape[0]) < size
    hits = jnp.sum(top & mask[order])
    return jnp.where(size > 0, hits / jnp.maximum(size, 1), jnp.nan).astype(value.dtype)

  return jax.vmap(one)(values, inside)


# ---------------------------------------------------------------------------------------------
# ROAD.


class RoadCurve(flax.struct.PyTreeNode):
  """A ROAD curve per image."""

  fractions: jax.Array  # [P] removed share p / 100 of the pixels at each step
  scores: jax.Array     # [B, P] accuracy (0/1) or target-class probability after each step
  auc: jax.Array        # [B] trapezoid area under scores over fractions


def _neighbour_sum(values: jax.Array) -> jax.Array:
  """Stencil-weighted sum of each pixel's in-image 8-neighbours, per channel; [H, W, C]."""
  kernel = jnp.asarray(IMPUTATION_WEIGHTS, values.dtype)
  padded = jnp.pad(values, ((1, 1), (1, 1), (0, 0)))
  height, width = values.shape[:2]
  total = jnp.zeros_like(values)
  for row in range(3):
    for column in range(3):
      if IMPUTATION_WEIGHTS[row, column]:
        total = total + kernel[row, column] * padded[row:row + height, column:column + width]
  return total


def _conjugate_gradients(system: Callable[[jax.Array], jax.Array], right: jax.Array,
                         precondition: Callable[[jax.Array], jax.Array], start: jax.Array,
                         tolerance: float, max_steps: int) -> jax.Array:
  """Preconditioned CG for a symmetric positive definite `system`, to ||r|| <= tol ||right||."""
  def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b)

  residual = right - system(start)
  direction = precondition(residual)
  bound = tolerance ** 2 * dot(right, right)

  def unfinished(state) -> jax.Array:
    _, residual, _, _, step = state
    return (dot(residual, residual) > bound) & (step < max_steps)

  def iterate(state):
    solution, residual, direction, product, step = state
    image = system(direction)
    alpha = product / dot(direction, image)
    solution = solution + alpha * direction
    residual = residual - alpha * image
    preconditioned = precondition(residual)
    new_product = dot(residual, preconditioned)
    direction = preconditioned + (new_product / product) * direction
    return solution, residual, direction, new_product, step + 1

  state = (start, residual, direction, dot(residual, direction), 0)
  return jax.lax.while_loop(unfinished, iterate, state)[0]


def _impute_one(image: jax.Array, removed: jax.Array, tolerance: float,
                max_steps: int | None) -> jax.Array:
  """Linear imputation of one image [H, W, C]: removed pixels as their neighbours' weighted mean."""
  removed = removed[..., None]
  weight_sums = _neighbour_sum(jnp.ones(image.shape[:2] + (1,), image.dtype))

  def system(values: jax.Array) -> jax.Array:
    inner = weight_sums * values - _neighbour_sum(jnp.where(removed, values, 0))
    return jnp.where(removed, inner, values)

  def jacobi(values: jax.Array) -> jax.Array:
    return jnp.where(removed, values / weight_sums, values)

  right = jnp.where(removed, _neighbour_sum(jnp.where(removed, 0, image)), image)
  steps = image.size if max_steps is None else max_steps
  solution = _conjugate_gradients(system, right, jacobi, jacobi(right), tolerance, steps)
  return jnp.where(removed, solution, image)


def noisy_linear_imputation(images: jax.Array, removed: jax.Array, *, noise: float = 0.01,
                            key: jax.Array | None = None, tolerance: float = 1e-6,
                            max_steps: int | None = None) -> jax.Array:
  """Images [B, H, W, C] whose `removed` pixels [B, H, W] are imputed from their neighbours plus
  N(0, noise^2) (the ROAD paper's noisy linear imputation; a key is needed when noise > 0)."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C]; got shape {tuple(images.shape)}.")
  images = images.astype(_float_dtype(images))
  removed = faithfulness.as_masks(removed, images.shape[:3], "removed")
  if noise < 0:
    raise ValueError(f"noise must be >= 0; got {noise}.")
  kept = jnp.sum(~removed, axis=(1, 2))
  if not isinstance(kept, jax.core.Tracer) and bool(jnp.any(kept == 0)):
    raise ValueError(f"removed covers every pixel of image {int(jnp.argmax(kept == 0))}: the "
                     "imputation needs at least one kept pixel.")
  imputed = jax.vmap(lambda x, r: _impute_one(x, r, tolerance, max_steps))(images, removed)
  if noise:
    if key is None:
      raise ValueError("noisy_linear_imputation needs a PRNG key when noise > 0.")
    draws = jax.random.normal(key, images.shape, images.dtype)
    imputed = jnp.where(removed[..., None], imputed + noise * draws, imputed)
  return imputed


def road_counts(height: int, width: int, percentages: Sequence[float]) -> np.ndarray:
  """Pixels removed at each percentage: floor(H W p / 100), as Quantus."""
  percentages = list(percentages)
  if not percentages:
    raise ValueError("percentages must list at least one percentage.")
  bad = [p for p in percentages if not 0 <= p < 100]
  if bad:
    raise ValueError(f"percentages must lie in [0, 100) (one pixel must stay); got {bad}.")
  return np.array([int(height * width * p / 100) for p in percentages], np.int32)


def _pixel_ranks(saliency: jax.Array, order: str) -> jax.Array:
  """Removal rank [H, W] of each pixel: 0 first (highest for MoRF, lowest for LeRF)."""
  flat = saliency.reshape(-1)
  keys = -flat if order == "morf" else flat
  ranking = jnp.argsort(keys, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[ranking].set(jnp.arange(flat.size, dtype=jnp.int32))
  return ranks.reshape(saliency.shape)


def road(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, maps: Any, *,
         key: jax.Array | None = None, order: str = "morf",
         percentages: Sequence[float] = QUANTUS_ROAD_PERCENTAGES, noise: float = 0.01,
         score: str = "accuracy", absolute: bool = False, chunk_size: int = 8,
         tolerance: float = 1e-6, max_steps: int | None = None) -> RoadCurve:
  """ROAD curve per image: pixels removed in MoRF or LeRF order by noisy linear imputation."""
  if order not in ROAD_ORDERS:
    raise ValueError(f"order must be one of {ROAD_ORDERS}; got {order!r}.")
  if score not in ROAD_SCORES:
    raise ValueError(f"score must be one of {ROAD_SCORES}; got {score!r}.")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C]; got shape {tuple(images.shape)}.")
  maps = prepare(maps, absolute=absolute, normalise=False)
  if maps.ndim == 4:
    if maps.shape[-1] != 1:
      raise ValueError(f"ROAD ranks pixels: maps must be [B, H, W] or [B, H, W, 1]; got shape "
                       f"{tuple(maps.shape)} (reduce the channels first).")
    maps = maps[..., 0]
  if maps.shape != images.shape[:3]:
    raise ValueError(f"maps must cover the images: [B, H, W] = {tuple(images.shape[:3])}; got "
                     f"{tuple(maps.shape)}.")
  if noise and key is None:
    raise ValueError("road needs a PRNG key when noise > 0 (the imputation noise).")
  targets = api.resolve_targets(logits_fn, images, targets)
  counts = road_counts(images.shape[1], images.shape[2], percentages)
  ranks = jax.vmap(lambda m: _pixel_ranks(m, order))(maps)
  # Without noise the keys are never used (checked above: a key is required when noise > 0).
  step_keys = jax.random.split(key if key is not None else jax.random.key(0), len(counts))

  def step(count: jax.Array, step_key: jax.Array) -> jax.Array:
    perturbed = noisy_linear_imputation(images, ranks < count, noise=noise, key=step_key,
                                        tolerance=tolerance, max_steps=max_steps)
    logits = logits_fn(perturbed)
    if score == "accuracy":
      return (api.predicted_classes(logits) == targets).astype(_float_dtype(images))
    return faithfulness.target_probabilities(logits, targets)

  scores = jax.lax.map(lambda args: step(*args), (jnp.asarray(counts), step_keys),
                       batch_size=min(chunk_size, len(counts))).T          # [B, P]
  fractions = jnp.asarray(np.asarray(percentages, np.float64) / 100, scores.dtype)
  auc = (jnp.trapezoid(scores, fractions, axis=-1) if len(counts) > 1
         else jnp.zeros(scores.shape[:1], scores.dtype))
  return RoadCurve(fractions, scores, auc)


# ---------------------------------------------------------------------------------------------
# Max-sensitivity.


def uniform_perturbations(key: jax.Array, shape: Sequence[int], num_samples: int,
                          radius: float, dtype: Any = jnp.float32) -> jax.Array:
  """Draws [S, *shape] from U(-radius, radius): max-sensitivity's input perturbations."""
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
  if radius <= 0:
    raise ValueError(f"radius must be > 0; got {radius}.")
  return jax.random.uniform(key, (num_samples, *shape), dtype, -radius, radius)


def max_sensitivity(explain_fn: ExplainFn, images: jax.Array, maps: Any, *, key: jax.Array,
                    num_samples: int = 200, radius: float = 0.2, chunk_size: int = 8,
                    absolute: bool = False, normalise: bool = False) -> jax.Array:
  """Max over perturbations [B] of ||M(x + u) - M(x)|| / ||M(x)||, maps re-explained by explain_fn.

  `explain_fn(images [B, H, W, C]) -> maps` of the maps' shape (close over the targets).
  `normalise` divides the original and each perturbed batch of maps by its own maximum |value|
  (Quantus's preprocessing of a_batch and of every re-explanation).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C]; got shape {tuple(images.shape)}.")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
  original = prepare(maps, absolute=absolute, normalise=normalise)
  if original.shape[0] != images.shape[0]:
    raise ValueError(f"maps must have one map per image: {images.shape[0]}; got shape "
                     f"{tuple(original.shape)}.")
  perturbations = uniform_perturbations(key, images.shape, num_samples, radius,
                                        _float_dtype(images))
  reference = _flat(original)
  denominator = jnp.linalg.norm(reference, axis=-1)

  def sensitivity(perturbation: jax.Array) -> jax.Array:
    explained = prepare(explain_fn(images + perturbation), absolute=absolute,
                        normalise=normalise, name="explain_fn's maps")
    if explained.shape != original.shape:
      raise ValueError(f"explain_fn must return maps of the maps' shape {tuple(original.shape)}; "
                       f"got {tuple(explained.shape)}.")
    return jnp.linalg.norm(_flat(explained) - reference, axis=-1) / denominator

  ratios = jax.lax.map(sensitivity, perturbations, batch_size=min(chunk_size, num_samples))
  return jnp.nanmax(ratios, axis=0)


# ---------------------------------------------------------------------------------------------
# MPRT and smooth MPRT.


@flax.struct.dataclass
class MPRTResult:
  """Similarity of the original and the randomised models' maps (a pytree; labels static)."""

  order: str = flax.struct.field(pytree_node=False)
  # Step i: the layer randomised (independent) or reached (cascading).
  layers: tuple[str, ...] = flax.struct.field(pytree_node=False)
  original: jax.Array  # [B] similarity of `maps` with the original model's maps
  scores: jax.Array    # [S, B] similarity with the maps after each randomisation step

  @property
  def last(self) -> jax.Array:
    """[B] similarity after the last step (Quantus's return_last_correlation)."""
    return self.scores[-1]

  @property
  def average(self) -> jax.Array:
    """[B] mean similarity over the randomisation steps."""
    return self.scores.mean(axis=0)


def layer_schedule(layers: Sequence[str], order: str = "top_down"
                   ) -> tuple[tuple[str, ...], np.ndarray]:
  """Step labels and a bool matrix [S, L]: which of `layers` (forward order) step s replaces.

  'top_down': the top s + 1 layers (`faithfulness.randomisation_schedule`'s cascading);
  'bottom_up': the first s + 1; 'independent': layer s alone (forward order, as Quantus).
  """
  if order not in MPRT_ORDERS:
    raise ValueError(f"order must be one of {MPRT_ORDERS}; got {order!r}.")
  if order == "top_down":
    return faithfulness.randomisation_schedule(layers, "cascading")
  count = len(layers)
  if not count:
    raise ValueError("layers must name at least one layer with parameters.")
  steps = np.arange(count)[:, None]
  columns = np.arange(count)[None]
  chosen = columns <= steps if order == "bottom_up" else columns == steps
  return tuple(layers), chosen


def _average_ranks(values: jax.Array) -> jax.Array:
  """Ranks 1..n of a vector, ties given their average rank (scipy.stats.rankdata), in its dtype."""
  ordered = jnp.sort(values)
  first = jnp.searchsorted(ordered, values, side="left")
  last = jnp.searchsorted(ordered, values, side="right")
  return (first + last + 1).astype(_float_dtype(values)) / 2


def _spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman's rank correlation of two vectors (NaN if either is constant)."""
  ra = _average_ranks(a)
  rb = _average_ranks(b)
  ra = ra - ra.mean()
  rb = rb - rb.mean()
  denominator = jnp.sqrt(jnp.sum(ra * ra) * jnp.sum(rb * rb))
  return jnp.where(denominator > 0, jnp.sum(ra * rb) / jnp.where(denominator > 0, denominator, 1),
                   jnp.nan)


def rank_similarity(maps_a: Any, maps_b: Any, *, absolute: bool = True) -> jax.Array:
  """Per-image Spearman correlation [B] of two sets of maps, flattened (of |.| by default)."""
  a = _flat(prepare(maps_a, absolute=absolute, normalise=False, name="maps_a"))
  b = _flat(prepare(maps_b, absolute=absolute, normalise=False, name="maps_b"))
  if a.shape != b.shape:
    raise ValueError(f"maps_a and maps_b must have the same shape; got {tuple(a.shape)} and "
                     f"{tuple(b.shape)} (flattened).")
  return jax.vmap(_spearman)(a, b)


def _randomised_variables(variables: Any, fresh_params: Any, layers: Sequence[str]
                          ) -> Callable[[jax.Array], Any]:
  """chosen [L] -> variables whose `layers` marked in `chosen` take `fresh_params`."""
  if not isinstance(variables, dict) or "params" not in variables:
    raise ValueError("variables must be a dict with a 'params' collection (Flax style).")
  if jax.tree.structure(fresh_params) != jax.tree.structure(variables["params"]):
    raise ValueError("fresh_params must have the structure of variables['params'].")
  leaf_layers = faithfulness.leaf_layer_indices(variables["params"], layers)
  known = {index for index in jax.tree.leaves(leaf_layers) if index >= 0}
  missing = [name for i, name in enumerate(layers) if i not in known]
  if missing:
    raise ValueError(f"layers {missing} own no parameters in variables['params'] (layer names "
                     "are module paths 'a/b', forward order).")
  return lambda chosen: faithfulness.select_layers(variables, fresh_params, leaf_layers, chosen)


def mprt(explain_fn: VariablesExplainFn, variables: Any, images: jax.Array, fresh_params: Any,
         layers: Sequence[str], *, maps: Any = None, order: str = "top_down",
         absolute: bool = True) -> MPRTResult:
  """Quantus's MPRT: Spearman [S, B] of `maps` with the maps after each randomisation step.

  `explain_fn(variables, images) -> maps` explains the images with the given variables;
  `maps` default to the original model's. Steps run as one `lax.map` over the schedule.
  """
  labels, schedule = layer_schedule(layers, order)
  randomised = _randomised_variables(variables, fresh_params, layers)
  original_maps = explain_fn(variables, images)
  reference = original_maps if maps is None else maps

  def similarity(chosen: jax.Array) -> jax.Array:
    return rank_similarity(reference, explain_fn(randomised(chosen), images), absolute=absolute)

  scores = jax.lax.map(similarity, jnp.asarray(schedule))
  return MPRTResult(order, labels, rank_similarity(reference, original_maps, absolute=absolute),
                    scores)


def smoothed_explanations(explain_fn: VariablesExplainFn, variables: Any, images: jax.Array,
                          noise: jax.Array, noise_magnitude: float) -> jax.Array:
  """Mean of explain_fn over images + sigma eps_n (noise: eps [N - 1, *images.shape]) and the
  noise-free images, sigma = noise_magnitude (max - min) per image (Quantus's smooth MPRT)."""
  axes = tuple(range(1, images.ndim))
  sigma = noise_magnitude * (images.max(axis=axes, keepdims=True)
                             - images.min(axis=axes, keepdims=True))
  samples = jnp.concatenate([noise, jnp.zeros((1, *images.shape), noise.dtype)])
  explained = jax.lax.map(lambda eps: explain_fn(variables, images + sigma * eps), samples)
  return explained.mean(axis=0)


def smooth_mprt(explain_fn: VariablesExplainFn, variables: Any, images: jax.Array,
                fresh_params: Any, layers: Sequence[str], *, key: jax.Array | None = None,
                noise: jax.Array | None = None, maps: Any = None, num_samples: int = 50,
                noise_magnitude: float = 0.1, order: str = "bottom_up",
                absolute: bool = True) -> MPRTResult:
  """Quantus's SmoothMPRT: MPRT of explanations averaged over `num_samples` noisy inputs.

  noise: standard-normal draws [S + 1, num_samples - 1, *images.shape] (row 0 for the original
  model, row s + 1 for step s); default drawn from `key`. `maps` default to the original
  model's smoothed maps.
  """
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
  images = jnp.asarray(images)
  labels, schedule = layer_schedule(layers, order)
  shape = (len(labels) + 1, num_samples - 1, *images.shape)
  if noise is None:
    if key is None:
      raise ValueError("smooth_mprt needs a PRNG key (or explicit noise).")
    noise = jax.random.normal(key, shape, _float_dtype(images))
  elif tuple(jnp.shape(noise)) != shape:
    raise ValueError(f"noise must have shape [S + 1, num_samples - 1, B, H, W, C] = {shape}; got "
                     f"{tuple(jnp.shape(noise))}.")
  noise = jnp.asarray(noise, _float_dtype(images))
  randomised = _randomised_variables(variables, fresh_params, layers)
  original_maps = smoothed_explanations(explain_fn, variables, images, noise[0], noise_magnitude)
  reference = original_maps if maps is None else maps

  def similarity(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    chosen, draws = args
    smoothed = smoothed_explanations(explain_fn, randomised(chosen), images, draws,
                                     noise_magnitude)
    return rank_similarity(reference, smoothed, absolute=absolute)

  scores = jax.lax.map(similarity, (jnp.asarray(schedule), noise[1:]))
  return MPRTResult(order, labels, rank_similarity(reference, original_maps, absolute=absolute),
                    scores)
