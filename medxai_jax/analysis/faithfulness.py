"""Scores for explanation maps: localisation against masks, deletion / insertion faithfulness,
parameter- and data-randomisation sanity checks, shortcut reliance, and bootstrap intervals.

Notation: a map M [H, W] explains one image x [H, W, C] for its target class c; a mask G [H, W]
(bool) marks the ground truth (the phantom's lesion, or its L/R marker). Maps given as
[B, H, W, C] are reduced to [B, H, W] by the sum of |.| over channels before any score
(`as_maps`); masks may be [B, H, W] or [B, H, W, 1]. Every score is computed per image (vmapped
over the batch); scores that are undefined for an image (an empty mask, a map without positive
attribution) are NaN, and `bootstrap_interval` drops NaNs.

Localisation:
- Pointing game (Zhang et al. 2018): a hit when the map's maximum lies inside G dilated by a
  tolerance disk of `margin` pixels (Euclidean, between pixel centres). When several pixels tie
  for the maximum the score is the share of them that hit, so a constant map scores the mask's
  (dilated) area fraction, not 0 or 1 by accident of raster order.
- Energy-based pointing game (Wang et al. 2020, Score-CAM): E = sum_{G} M+ / sum M+ with
  M+ = max(M, 0), the share of positive attribution inside the mask.
- Top-k% region: R_k = the round(k/100 * H * W) highest-valued pixels (ties broken in raster
  order); IoU_k = |R_k & G| / |R_k | G| and precision_k = |R_k & G| / |R_k|. With |R| = |G|
  (`mask_sized`), precision is the relevance rank accuracy of Arras et al. (2022).
- CheXlocalize (Saporta et al. 2022, "Benchmarking saliency methods for chest X-ray
  interpretation"): each map is min-max normalised to [0, 1] (a constant map to 0) and binarised
  into a segmentation S. The default is theirs: Otsu's method on the map quantised to 256 levels
  floor(255 m) (OpenCV's THRESH_OTSU: the level t maximising the between-class variance of
  <= t and > t, first maximum; S = levels > t); the alternative is their tuned-threshold option,
  S = m > threshold. 'miou' per image is |S & G| / |S | G|, NaN when G is empty and (their
  default `true_pos_only`) when S is empty; its mean over images is the mIoU. 'hit_rate' per
  image is 1 when the map's maximal pixel lies in G (no tolerance; the first maximum in raster
  order, as numpy's argmax, or the share of tied maxima), NaN when G is empty; its mean is the
  hit rate. Their maps are upsampled to the image first; here maps already have its size.

Faithfulness (Petsiuk et al. 2018, RISE): units (pixels or p x p patches) are ranked by the map
(a patch by its mean value, ties in raster order). Deletion starts from x and replaces the top
units by a replacement image x~ (a Gaussian blur of x, or a constant baseline) in n steps;
insertion starts from x~ and puts x's units back in the same order. After step s,
n_s = round(s U / n) of the U units are changed; the curve is the target-class probability
p_c(x_s) (sigmoid of the target score for a one-logit model, softmax otherwise) against the
changed fraction f_s = n_s / U in [0, 1], and the AUC is the trapezoid rule over f. A faithful
map has a low deletion AUC and a high insertion AUC; a random order (`random_maps`, explicit
key) is the contrast. The n + 1 model evaluations run as one `lax.map` over the steps, vmapped
in chunks of `chunk_size` steps (each a batch of B images), never one call per step.

Sanity checks (Adebayo et al. 2018): a "layer" is a module that directly owns parameters (the
same definition as `train/freeze.py`), listed in forward order. Cascading randomisation replaces
the parameters of the top layer, then the top two, ... down to the input layer; independent
randomisation replaces one layer at a time (both listed from the output towards the input). New
values come from the module's own initialiser (`model.init` with another key) or from
N(0, scale^2). BatchNorm running statistics are kept. For each step the maps of the randomised
model are compared with the original ones by Spearman's rank correlation (average ranks for ties,
as scipy), of the signed maps (channels summed) and of their magnitudes (sum of |.|). The data
randomisation test compares the maps of a model trained on the true labels with one trained on
shuffled labels with the same two correlations (`map_similarity`).

Shortcut reliance: the share of positive (or absolute) attribution inside the marker mask
(optionally dilated by a margin); a uniform map scores the region's area fraction.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.attribution import integrated
from medxai_jax.models import base
from medxai_jax.train import freeze

CURVE_MODES = ("deletion", "insertion")
REPLACEMENTS = ("blur", "baseline")
RANDOMISATION_MODES = ("cascading", "independent")
REINIT_METHODS = ("init", "normal")
SHARE_ATTRIBUTIONS = ("positive", "absolute")
BINARISATIONS = ("otsu", "fixed")
HIT_TIES = ("first", "share")
OTSU_LEVELS = 256  # CheXlocalize quantises the normalised map to uint8 before Otsu
# RISE's replacement blur: sigma 5 at 224 px; scaled to the image size when blur_sigma is None.
RISE_BLUR_SIGMA = 5.0
RISE_IMAGE_SIZE = 224


# ---------------------------------------------------------------------------------------------
# Inputs.


def as_maps(maps: jax.Array, name: str = "maps") -> jax.Array:
  """Float maps [B, H, W]; [B, H, W, C] attributions are reduced by the sum of |.| over C."""
  maps = jnp.asarray(maps)
  if maps.ndim == 4:
    maps = common.reduce_channels(maps, "abs_sum")
  if maps.ndim != 3:
    raise ValueError(f"{name} must be [B, H, W] or [B, H, W, C]; got shape {tuple(maps.shape)}.")
  return maps.astype(jnp.float32)


def as_masks(masks: jax.Array, shape: Sequence[int], name: str = "masks") -> jax.Array:
  """Boolean masks [B, H, W] matching `shape`; a trailing channel axis of 1 is dropped."""
  masks = jnp.asarray(masks)
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  if tuple(masks.shape) != tuple(shape):
    raise ValueError(f"{name} must have the maps' shape [B, H, W] = {tuple(shape)} (or a "
                     f"trailing axis of 1); got shape {tuple(jnp.shape(masks))}.")
  return masks.astype(bool)


def _nan_unless(condition: jax.Array, value: jax.Array) -> jax.Array:
  """`value` where `condition` holds, NaN elsewhere."""
  return jnp.where(condition, value, jnp.nan)


# ---------------------------------------------------------------------------------------------
# Localisation.


def dilate_masks(masks: jax.Array, margin: int) -> jax.Array:
  """Masks [B, H, W] grown by every pixel within Euclidean distance `margin` (pixels)."""
  if not isinstance(margin, (int, np.integer)) or margin < 0:
    raise ValueError(f"margin must be a non-negative integer (pixels); got {margin!r}.")
  masks = jnp.asarray(masks, bool)
  if margin == 0:
    return masks
  offsets = np.arange(-margin, margin + 1)
  disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= margin ** 2).astype(np.float32)
  grown = jax.lax.conv_general_dilated(
      masks[:, None].astype(jnp.float32), jnp.asarray(disk)[None, None], (1, 1),
      ((margin, margin), (margin, margin)))
  return grown[:, 0] > 0.5


def _pointing_hit(saliency: jax.Array, target: jax.Array) -> jax.Array:
  """Share of one map's maximal pixels inside `target`; NaN for an empty target."""
  at_peak = saliency >= saliency.max()
  hits = jnp.sum(at_peak & target) / jnp.maximum(jnp.sum(at_peak), 1)
  return _nan_unless(target.any(), hits)


def pointing_game(maps: jax.Array, masks: jax.Array, margin: int = 0) -> jax.Array:
  """Per-image pointing-game hits [B]: is the map's maximum inside the mask dilated by `margin`."""
  maps = as_maps(maps)
  masks = as_masks(masks, maps.shape)
  return jax.vmap(_pointing_hit)(maps, dilate_masks(masks, margin))


def _share_inside(saliency: jax.Array, mask: jax.Array, attribution: str) -> jax.Array:
  """Share of one map's positive (or absolute) attribution inside `mask`; NaN when undefined."""
  weight = jnp.maximum(saliency, 0.0) if attribution == "positive" else jnp.abs(saliency)
  total = weight.sum()
  share = jnp.sum(jnp.where(mask, weight, 0.0)) / jnp.where(total > 0, total, 1.0)
  return _nan_unless((total > 0) & mask.any(), share)


def attribution_share(maps: jax.Array, masks: jax.Array, attribution: str = "positive"
                      ) -> jax.Array:
  """Per-image share [B] of 'positive' (max(M, 0)) or 'absolute' (|M|) attribution in the mask."""
  if attribution not in SHARE_ATTRIBUTIONS:
    raise ValueError(f"attribution must be one of {SHARE_ATTRIBUTIONS}; got {attribution!r}.")
  maps = as_maps(maps)
  masks = as_masks(masks, maps.shape)
  return jax.vmap(lambda m, g: _share_inside(m, g, attribution))(maps, masks)


def energy_pointing_game(maps: jax.Array, masks: jax.Array) -> jax.Array:
  """Per-image energy-based pointing game [B]: sum of M+ inside the mask over the sum of M+."""
  return attribution_share(maps, masks, "positive")


def _pixel_ranks(saliency: jax.Array) -> jax.Array:
  """Rank of every pixel of one map, 0 = highest value, ties in raster order; shape [H, W]."""
  flat = saliency.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return ranks.reshape(saliency.shape)


def _region_overlap(saliency: jax.Array, mask: jax.Array, count: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """IoU and precision of one map's top-`count` pixels against `mask` (NaN for an empty mask)."""
  region = _pixel_ranks(saliency) < count
  intersection = jnp.sum(region & mask)
  union = jnp.sum(region | mask)
  valid = mask.any()
  return (_nan_unless(valid, intersection / jnp.maximum(union, 1)),
          _nan_unless(valid, intersection / jnp.maximum(count, 1)))


def top_region_scores(maps: jax.Array, masks: jax.Array,
                      top_percents: Sequence[float] = (5, 10, 20), mask_sized: bool = True
                      ) -> dict[str, jax.Array]:
  """IoU and precision [B] of each top-k% region, keyed 'iou_top{k}%' and 'precision_top{k}%'.

  With `mask_sized`, also 'iou_mask_size' and 'rank_accuracy': the region of |G| pixels.
  """
  maps = as_maps(maps)
  masks = as_masks(masks, maps.shape)
  pixels = maps.shape[1] * maps.shape[2]
  scores = {}
  for percent in top_percents:
    if not 0 < percent <= 100:
      raise ValueError(f"top_percents must lie in (0, 100]; got {percent}.")
    count = jnp.full((maps.shape[0],), max(1, int(round(percent / 100 * pixels))), jnp.int32)
    iou, precision = jax.vmap(_region_overlap)(maps, masks, count)
    scores[f"iou_top{percent:g}%"] = iou
    scores[f"precision_top{percent:g}%"] = precision
  if mask_sized:
    counts = masks.sum(axis=(1, 2)).astype(jnp.int32)
    iou, precision = jax.vmap(_region_overlap)(maps, masks, counts)
    scores["iou_mask_size"] = iou
    scores["rank_accuracy"] = precision
  return scores


def localisation_scores(maps: jax.Array, masks: jax.Array, *, margin: int = 0,
                        top_percents: Sequence[float] = (5, 10, 20)) -> dict[str, jax.Array]:
  """Every localisation score [B] of maps against masks: pointing game, energy, top-k% region."""
  return {"pointing_game": pointing_game(maps, masks, margin),
          "energy": energy_pointing_game(maps, masks),
          **top_region_scores(maps, masks, top_percents)}


# ---------------------------------------------------------------------------------------------
# CheXlocalize: maps binarised into a segmentation (Saporta et al. 2022).


def normalise_maps(maps: jax.Array) -> jax.Array:
  """Maps [B, H, W] min-max scaled per image to [0, 1]; a constant map becomes all zeros."""
  maps = as_maps(maps)
  low = maps.min(axis=(1, 2), keepdims=True)
  span = maps.max(axis=(1, 2), keepdims=True) - low
  return jnp.where(span > 0, (maps - low) / jnp.where(span > 0, span, 1.0), 0.0)


def otsu_level(levels: jax.Array, num_levels: int = OTSU_LEVELS) -> jax.Array:
  """Otsu's threshold t of one integer image (values 0..num_levels - 1): foreground is > t.

  t maximises the between-class variance w0 w1 (mu0 - mu1)^2 of the classes <= t and > t (the
  first such t; num_levels - 1, so nothing is foreground, when the image has a single value).
  """
  counts = jnp.zeros(num_levels, jnp.float32).at[levels.reshape(-1)].add(1.0)
  share = counts / levels.size
  below = jnp.cumsum(share)                                    # w0(t)
  moment = jnp.cumsum(share * jnp.arange(num_levels, dtype=jnp.float32))
  above = 1.0 - below
  valid = (below > 0) & (above > 0)
  between = (moment[-1] * below - moment) ** 2 / jnp.where(valid, below * above, 1.0)
  between = jnp.where(valid, between, -1.0)
  return jnp.where(valid.any(), jnp.argmax(between), num_levels - 1)


def binarise_maps(maps: jax.Array, method: str = "otsu", threshold: float = 0.5) -> jax.Array:
  """CheXlocalize's segmentation [B, H, W] (bool) of each min-max normalised map.

  'otsu' (their default): the normalised map quantised to uint8 levels floor(255 m), foreground
  where the level exceeds Otsu's threshold of that image. 'fixed' (their tuned-threshold
  option): foreground where the normalised map exceeds `threshold`.
  """
  if method not in BINARISATIONS:
    raise ValueError(f"binarisation must be one of {BINARISATIONS}; got {method!r}.")
  normalised = normalise_maps(maps)
  if method == "fixed":
    if not 0.0 <= threshold < 1.0:
      raise ValueError(f"A fixed binarisation threshold must lie in [0, 1) (the maps are "
                       f"min-max normalised); got {threshold}.")
    return normalised > threshold
  levels = jnp.floor(normalised * (OTSU_LEVELS - 1)).astype(jnp.int32)
  thresholds = jax.vmap(otsu_level)(levels)
  return levels > thresholds[:, None, None]


def _segmentation_iou(segmentation: jax.Array, mask: jax.Array, true_positive_only: bool
                      ) -> jax.Array:
  """IoU of one binary segmentation with a mask; NaN for an empty mask (or segmentation)."""
  intersection = jnp.sum(segmentation & mask)
  union = jnp.sum(segmentation | mask)
  valid = mask.any() & (segmentation.any() if true_positive_only else True)
  return _nan_unless(valid, intersection / jnp.maximum(union, 1))


def segmentation_iou(maps: jax.Array, masks: jax.Array, method: str = "otsu",
                     threshold: float = 0.5, true_positive_only: bool = True) -> jax.Array:
  """Per-image IoU [B] of the binarised map with the mask (its mean over images is the mIoU).

  NaN where the mask is empty; with `true_positive_only` (CheXlocalize's default) also where
  the segmentation is empty, otherwise such an image scores 0.
  """
  maps = as_maps(maps)
  masks = as_masks(masks, maps.shape)
  segmentations = binarise_maps(maps, method, threshold)
  return jax.vmap(lambda s, g: _segmentation_iou(s, g, true_positive_only))(segmentations, masks)


def _first_peak_hit(saliency: jax.Array, mask: jax.Array) -> jax.Array:
  """Whether one map's first maximal pixel (raster order) lies in the mask; NaN if it is empty."""
  peak = jnp.argmax(saliency.reshape(-1))
  return _nan_unless(mask.any(), mask.reshape(-1)[peak].astype(jnp.float32))


def hit_rate(maps: jax.Array, masks: jax.Array, ties: str = "first") -> jax.Array:
  """Per-image hit [B] of CheXlocalize's hit rate: the map's maximum inside the mask (no margin).

  ties='first' takes the first maximal pixel in raster order (numpy's argmax, as CheXlocalize);
  'share' scores the share of the maximal pixels inside (`pointing_game` with margin 0).
  """
  if ties not in HIT_TIES:
    raise ValueError(f"ties must be one of {HIT_TIES}; got {ties!r}.")
  if ties == "share":
    return pointing_game(maps, masks, 0)
  maps = as_maps(maps)
  masks = as_masks(masks, maps.shape)
  return jax.vmap(_first_peak_hit)(maps, masks)


def chexlocalize_scores(maps: jax.Array, masks: jax.Array, *, binarisation: str = "otsu",
                        threshold: float = 0.5, true_positive_only: bool = True,
                        ties: str = "first") -> dict[str, jax.Array]:
  """Per-image 'miou' (IoU of the binarised map) and 'hit_rate' (peak inside the mask) [B]."""
  return {"hit_rate": hit_rate(maps, masks, ties),
          "miou": segmentation_iou(maps, masks, binarisation, threshold, true_positive_only)}


# ---------------------------------------------------------------------------------------------
# Deletion and insertion.


class Curve(NamedTuple):
  """A deletion or insertion curve per image."""

  fractions: jax.Array  # [S + 1] changed share of the units after each step, 0 .. 1
  scores: jax.Array     # [B, S + 1] target-class probability after each step
  auc: jax.Array        # [B] trapezoid area under scores over fractions


def target_probabilities(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Target-class probability [B]: sigmoid of the target score (one logit) or softmax."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(cam.target_scores(logits, targets))
  probabilities = jax.nn.softmax(logits, axis=-1)
  return jnp.take_along_axis(probabilities, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def unit_grid(height: int, width: int, patch_size: int = 1) -> tuple[np.ndarray, int]:
  """Unit index of every pixel [H, W] for square patches of `patch_size` (edge patches smaller)."""
  common.check_positive("patch_size", patch_size)
  columns = -(-width // patch_size)
  rows = -(-height // patch_size)
  grid = (np.arange(height)[:, None] // patch_size) * columns + np.arange(width)[None] // patch_size
  return grid.astype(np.int32), rows * columns


def unit_ranks(maps: jax.Array, patch_size: int = 1) -> jax.Array:
  """Removal rank [B, H, W] of each pixel's unit: 0 for the unit with the highest mean value."""
  maps = as_maps(maps)
  grid, num_units = unit_grid(maps.shape[1], maps.shape[2], patch_size)
  sizes = np.bincount(grid.reshape(-1), minlength=num_units).astype(np.float32)
  flat_grid = jnp.asarray(grid.reshape(-1))

  def ranks_of(saliency: jax.Array) -> jax.Array:
    means = jnp.zeros(num_units, jnp.float32).at[flat_grid].add(saliency.reshape(-1)) / sizes
    order = jnp.argsort(-means, stable=True)
    ranks = jnp.zeros(num_units, jnp.int32).at[order].set(jnp.arange(num_units, dtype=jnp.int32))
    return ranks[flat_grid].reshape(saliency.shape)

  return jax.vmap(ranks_of)(maps)


def step_counts(num_units: int, num_steps: int) -> np.ndarray:
  """Units changed after each of the steps 0..num_steps: round(s * U / n), from 0 to U."""
  common.check_positive("num_steps", num_steps)
  return np.round(np.arange(num_steps + 1) * num_units / num_steps).astype(np.int32)


def curve_fractions(height: int, width: int, patch_size: int, num_steps: int) -> np.ndarray:
  """The share of units changed after each step of a deletion / insertion curve [S + 1]."""
  _, num_units = unit_grid(height, width, patch_size)
  return (step_counts(num_units, num_steps) / num_units).astype(np.float32)


def replacement_images(images: jax.Array, replacement: str = "blur", *,
                       blur_sigma: float | None = None, baseline: Any = 0.0) -> jax.Array:
  """The image x~ that deleted units take (and insertion starts from): a blur or a baseline."""
  common.check_images(images)
  if replacement == "blur":
    if blur_sigma is None:
      blur_sigma = RISE_BLUR_SIGMA * max(images.shape[1:3]) / RISE_IMAGE_SIZE
    return integrated.gaussian_blur(images, float(blur_sigma), padding="reflect")
  if replacement == "baseline":
    baseline = jnp.asarray(baseline, images.dtype)
    try:
      return jnp.broadcast_to(baseline, images.shape)
    except ValueError as error:
      raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the "
                       f"images' shape {tuple(images.shape)}.") from error
  raise ValueError(f"replacement must be one of {REPLACEMENTS}; got {replacement!r}.")


def perturbation_curve(model: base.Classifier, variables: base.Variables, images: jax.Array,
                       targets: common.Targets, maps: jax.Array, *, mode: str = "deletion",
                       num_steps: int = 100, patch_size: int = 1, replacement: str = "blur",
                       blur_sigma: float | None = None, baseline: Any = 0.0,
                       chunk_size: int = 16) -> Curve:
  """Deletion or insertion curve and AUC per image, the steps evaluated in vmapped chunks."""
  if mode not in CURVE_MODES:
    raise ValueError(f"mode must be one of {CURVE_MODES}; got {mode!r}.")
  common.check_positive("chunk_size", chunk_size)
  common.check_images(images)
  maps = as_maps(maps)
  if maps.shape != images.shape[:3]:
    raise ValueError(f"maps must cover the images: [B, H, W] = {tuple(images.shape[:3])}; got "
                     f"{tuple(maps.shape)}.")
  targets = common.resolve_inputs(model.logits_fn(variables), images, targets)
  ranks = unit_ranks(maps, patch_size)[..., None]                        # [B, H, W, 1]
  _, num_units = unit_grid(images.shape[1], images.shape[2], patch_size)
  counts = step_counts(num_units, num_steps)
  filled = replacement_images(images, replacement, blur_sigma=blur_sigma, baseline=baseline)
  start, end = (images, filled) if mode == "deletion" else (filled, images)

  def scores_after(count: jax.Array) -> jax.Array:
    stepped = jnp.where(ranks < count, end, start)
    return target_probabilities(model.logits(variables, stepped), targets)

  scores = jax.lax.map(scores_after, jnp.asarray(counts),
                       batch_size=min(chunk_size, len(counts))).T     # [B, S + 1]
  fractions = jnp.asarray(curve_fractions(images.shape[1], images.shape[2], patch_size,
                                          num_steps))
  return Curve(fractions, scores, jnp.trapezoid(scores, fractions, axis=-1))


def deletion_curve(model: base.Classifier, variables: base.Variables, images: jax.Array,
                   targets: common.Targets, maps: jax.Array, **options: Any) -> Curve:
  """Deletion curve: the most attributed units replaced first; lower AUC = more faithful."""
  return perturbation_curve(model, variables, images, targets, maps, mode="deletion", **options)


def insertion_curve(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: common.Targets, maps: jax.Array, **options: Any) -> Curve:
  """Insertion curve: the most attributed units restored first; higher AUC = more faithful."""
  return perturbation_curve(model, variables, images, targets, maps, mode="insertion",
                            **options)


def random_maps(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Uniform random maps [B, H, W]: a random removal order (iid values, so any patch order too)."""
  if len(shape) < 3:
    raise ValueError(f"shape must start with [B, H, W]; got {tuple(shape)}.")
  return jax.random.uniform(key, tuple(shape[:3]))


# ---------------------------------------------------------------------------------------------
# Rank correlation.


def average_ranks(values: jax.Array) -> jax.Array:
  """Ranks 1..n of a vector with ties given their average rank (scipy.stats.rankdata)."""
  values = jnp.ravel(values)
  ordered = jnp.sort(values)
  first = jnp.searchsorted(ordered, values, side="left")
  last = jnp.searchsorted(ordered, values, side="right")
  return (first + last + 1).astype(jnp.float32) / 2.0


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman's rank correlation of two equally sized arrays (NaN if either is constant)."""
  if jnp.size(a) != jnp.size(b):
    raise ValueError(f"spearman needs arrays of equal size; got shapes {tuple(jnp.shape(a))} "
                     f"and {tuple(jnp.shape(b))}.")
  ra = average_ranks(a)
  rb = average_ranks(b)
  ra = ra - ra.mean()
  rb = rb - rb.mean()
  denominator = jnp.sqrt(jnp.sum(ra * ra) * jnp.sum(rb * rb))
  return _nan_unless(denominator > 0, jnp.sum(ra * rb) / jnp.where(denominator > 0,
                                                                    denominator, 1.0))


def _signed_and_magnitude(maps: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  """Signed maps (channels summed) and magnitude maps (sum of |.|), both [B, H, W]."""
  maps = jnp.asarray(maps, jnp.float32)
  if maps.ndim == 4:
    return maps.sum(axis=-1), jnp.abs(maps).sum(axis=-1)
  if maps.ndim != 3:
    raise ValueError(f"{name} must be [B, H, W] or [B, H, W, C]; got shape {tuple(maps.shape)}.")
  return maps, jnp.abs(maps)


def map_similarity(maps_a: jax.Array, maps_b: jax.Array) -> dict[str, jax.Array]:
  """Per-image Spearman correlation [B] of two sets of maps: 'spearman' (signed), 'spearman_abs'."""
  signed_a, magnitude_a = _signed_and_magnitude(maps_a, "maps_a")
  signed_b, magnitude_b = _signed_and_magnitude(maps_b, "maps_b")
  if signed_a.shape != signed_b.shape:
    raise ValueError(f"maps_a and maps_b must have the same [B, H, W]; got "
                     f"{tuple(signed_a.shape)} and {tuple(signed_b.shape)}.")
  return {"spearman": jax.vmap(spearman)(signed_a, signed_b),
          "spearman_abs": jax.vmap(spearman)(magnitude_a, magnitude_b)}


def data_randomisation_scores(maps_trained: jax.Array, maps_shuffled_labels: jax.Array
                              ) -> dict[str, jax.Array]:
  """Adebayo's data test: Spearman [B] of the maps of a model and of one fit to shuffled labels."""
  return map_similarity(maps_trained, maps_shuffled_labels)


# ---------------------------------------------------------------------------------------------
# Model-parameter randomisation.


@flax.struct.dataclass
class SanityResult:
  """Similarity of original and randomised maps, one row per step (a pytree; labels static)."""

  mode: str = flax.struct.field(pytree_node=False)
  # Step i: the layer randomised (independent) or reached (cascading).
  layers: tuple[str, ...] = flax.struct.field(pytree_node=False)
  spearman: jax.Array      # [S, B] signed maps
  spearman_abs: jax.Array  # [S, B] magnitude maps


def layer_name(path: Sequence[str]) -> str:
  """A layer's module path as 'a/b/c'."""
  return "/".join(path)


def parameter_layers(model: base.Classifier) -> tuple[str, ...]:
  """Names of the modules that directly own parameters, in forward order."""
  return tuple(layer_name(path) for path in freeze.param_layers(model))


def leaf_layer_indices(params: Any, layers: Sequence[str]) -> Any:
  """Params-shaped tree of Python ints: each leaf's layer index in `layers` (-1: not listed)."""
  index = {name: i for i, name in enumerate(layers)}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: index.get(layer_name([k.key for k in path[:-1]]), -1), params)


def randomisation_schedule(layers: Sequence[str], mode: str = "cascading"
                           ) -> tuple[tuple[str, ...], np.ndarray]:
  """Step labels and a bool matrix [S, L]: which of `layers` (forward order) step s replaces.

  Steps run from the output layer towards the input: cascading step s replaces the top s + 1
  layers, independent step s only the layer L - 1 - s.
  """
  if mode not in RANDOMISATION_MODES:
    raise ValueError(f"mode must be one of {RANDOMISATION_MODES}; got {mode!r}.")
  count = len(layers)
  if not count:
    raise ValueError("layers must name at least one layer with parameters.")
  depth = count - 1 - np.arange(count)                  # layer index reached at step s
  columns = np.arange(count)[None]
  rows = depth[:, None]
  chosen = columns >= rows if mode == "cascading" else columns == rows
  return tuple(layers[i] for i in depth), chosen


def fresh_parameters(model: base.Classifier, variables: base.Variables, key: jax.Array, *,
                     how: str = "init", scale: float = 0.01) -> Any:
  """New values for every parameter: the modules' initialisers ('init') or N(0, scale^2)."""
  params = variables["params"]
  if how == "init":
    fresh = model.init(key)["params"]
    expected = jax.tree.map(jnp.shape, params)
    if jax.tree.map(jnp.shape, fresh) != expected:
      raise ValueError("model.init gives parameters of another structure or shape than "
                       "variables['params']; pass the variables of this model.")
    return fresh
  if how == "normal":
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        scale * jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
        for k, leaf in zip(keys, leaves)])
  raise ValueError(f"how must be one of {REINIT_METHODS}; got {how!r}.")


def select_layers(variables: base.Variables, fresh: Any, leaf_layers: Any,
                  chosen: jax.Array) -> dict[str, Any]:
  """Variables whose params take `fresh` values in the layers where `chosen` [L] is True.

  `leaf_layers` is the params-shaped tree of layer indices (`leaf_layer_indices`); leaves of
  unlisted layers and every other collection are passed through untouched (bit-identical).
  """
  chosen = jnp.asarray(chosen, bool)

  def pick(original: jax.Array, new: jax.Array, index: int) -> jax.Array:
    return original if index < 0 else jnp.where(chosen[index], new, original)

  params = jax.tree.map(pick, variables["params"], fresh, leaf_layers)
  return {**variables, "params": params}


def _check_layers(model: base.Classifier, layers: Sequence[str] | None) -> tuple[str, ...]:
  """The requested layers in forward order (default: all), raising on unknown names."""
  known = parameter_layers(model)
  if layers is None:
    return known
  unknown = [name for name in layers if name not in known]
  if unknown:
    raise ValueError(f"Unknown layers {unknown}; layers with parameters: {list(known)}.")
  return tuple(name for name in known if name in set(layers))


def randomise_layers(model: base.Classifier, variables: base.Variables, layers: Sequence[str],
                     key: jax.Array, *, how: str = "init", scale: float = 0.01) -> dict[str, Any]:
  """Variables with the parameters of `layers` re-drawn from `key`, the rest unchanged."""
  layers = _check_layers(model, layers)
  fresh = fresh_parameters(model, variables, key, how=how, scale=scale)
  return select_layers(variables, fresh, leaf_layer_indices(variables["params"], layers),
                       np.ones(len(layers), bool))


def randomisation_similarities(model: base.Classifier, variables: base.Variables,
                               explain_fn: Callable[[base.Variables], jax.Array],
                               key: jax.Array, schedule: jax.Array, layers: Sequence[str], *,
                               how: str = "init", scale: float = 0.01) -> dict[str, jax.Array]:
  """Spearman of original vs randomised maps per step of `schedule` [S, L] (a bool matrix over
  `layers`, as `randomisation_schedule` gives): 'spearman' and 'spearman_abs' [S, B].

  The schedule is an argument, not a constant, so one compiled program serves both modes.
  """
  original = explain_fn(variables)
  fresh = fresh_parameters(model, variables, key, how=how, scale=scale)
  leaf_layers = leaf_layer_indices(variables["params"], layers)

  def similarity(chosen: jax.Array) -> dict[str, jax.Array]:
    return map_similarity(original, explain_fn(select_layers(variables, fresh, leaf_layers,
                                                             chosen)))

  return jax.lax.map(similarity, jnp.asarray(schedule))


def randomisation_test(model: base.Classifier, variables: base.Variables,
                       explain_fn: Callable[[base.Variables], jax.Array], key: jax.Array, *,
                       mode: str = "cascading", layers: Sequence[str] | None = None,
                       how: str = "init", scale: float = 0.01) -> SanityResult:
  """Adebayo's model-parameter randomisation: Spearman of original vs randomised maps per step.

  `explain_fn(variables) -> maps [B, H, W(, C)]` explains a fixed batch (close over the images,
  targets and any key). The randomised maps are computed with one `lax.map` over the steps.
  """
  layers = _check_layers(model, layers)
  labels, schedule = randomisation_schedule(layers, mode)
  scores = randomisation_similarities(model, variables, explain_fn, key, schedule, layers,
                                      how=how, scale=scale)
  return SanityResult(mode, labels, scores["spearman"], scores["spearman_abs"])


# ---------------------------------------------------------------------------------------------
# Shortcut reliance.


def marker_reliance(maps: jax.Array, marker_masks: jax.Array, attribution: str = "positive",
                    margin: int = 0) -> dict[str, jax.Array]:
  """Share of attribution on the shortcut marker: 'per_image' [B] and their NaN-free 'mean'.

  `margin` (pixels) dilates the marker's glyph into a region, so coarse maps (Grad-CAM at a
  12 x 12 layer) that light the marker are not scored by its few glyph pixels alone.
  """
  maps = as_maps(maps)
  region = dilate_masks(as_masks(marker_masks, maps.shape, "marker_masks"), margin)
  shares = attribution_share(maps, region, attribution)
  return {"per_image": shares, "mean": jnp.nanmean(shares)}


# ---------------------------------------------------------------------------------------------
# Bootstrap.


def defined_mean(values: Any, axis: int | None = None) -> Any:
  """Mean over the defined (non-NaN) entries; NaN without a warning where none is (Spearman is
  undefined against a constant map, e.g. Grad-CAM once a randomised layer zeroes it)."""
  values = np.asarray(values, np.float64)
  count = np.sum(~np.isnan(values), axis=axis)
  total = np.nansum(values, axis=axis)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class Interval(NamedTuple):
  """A mean with a percentile bootstrap interval."""

  mean: float
  low: float
  high: float
  count: int  # finite scores used


BOOTSTRAP_BLOCK = 1 << 24  # resampled indices drawn at once (128 MiB of int64)


def bootstrap_interval(scores: Any, seed: int = 0, *, num_resamples: int = 2000,
                       confidence: float = 0.95) -> Interval:
  """Mean of the finite per-image scores and its percentile bootstrap interval (host side).

  The resamples are drawn in blocks of at most `BOOTSTRAP_BLOCK` indices (one block below
  that), so a whole split's scores need no [num_resamples, N] array at once.
  """
  common.check_positive("num_resamples", num_resamples)
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must lie in (0, 1); got {confidence}.")
  values = np.asarray(scores, np.float64).ravel()
  values = values[np.isfinite(values)]
  if not values.size:
    return Interval(float("nan"), float("nan"), float("nan"), 0)
  rng = np.random.default_rng(seed)
  rows = max(1, BOOTSTRAP_BLOCK // values.size)
  means = np.concatenate([
      values[rng.integers(0, values.size, (min(rows, num_resamples - start), values.size))
             ].mean(axis=1) for start in range(0, num_resamples, rows)])
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return Interval(float(values.mean()), float(low), float(high), int(values.size))


def summarise(scores: Mapping[str, Any], seed: int = 0, **options: Any) -> dict[str, Interval]:
  """`bootstrap_interval` of every per-image score array in a dict (seed folded per metric)."""
  return {name: bootstrap_interval(values, seed + index, **options)
          for index, (name, values) in enumerate(scores.items())}
