r"""XRAI and Fast XRAI (Kapishnikov et al. 2019, "XRAI: Better Attributions Through Regions").

Notation: phi [H, W] is a pixel attribution (Integrated Gradients summed over channels, averaged
over the baselines), M_1..M_R [H, W] are candidate regions (dilated Felzenszwalb segments at
several scales) and C the pixels covered so far (C = {} at the start).
- XRAI (greedy): repeatedly add the region of highest gain
  g(M) = sum_{p in M \ C} phi_p / |M \ C|, the attribution density of its new pixels; regions that
  add fewer than `min_pixel_diff` new pixels are dropped for good; stop once |C| / (H W) exceeds
  `area_threshold` or no region is left. Every pixel of M \ C takes the value g(M); pixels never
  covered form one last region valued at their own density.
- Fast XRAI: rank the regions once by their full density g_0(M) = mean_{p in M} phi_p, then walk
  that order, giving each region the pixels it adds (skipping regions that add fewer than
  `min_pixel_diff`) valued at the density of those new pixels.
The ranked regions are ordered by value, highest first (the uncovered rest last), as in PAIR
saliency's reference implementation, whose defaults we follow: Felzenszwalb scales 50, 100, 150,
250, 500, 1200, sigma 0.8, min size 150 on the image min-max scaled to [-1, 1] and resized to
224x224 (segments resized back by nearest neighbour), each segment dilated by a disk of radius 5,
min_pixel_diff 50, IG with a black (image minimum) and a white (image maximum) baseline averaged.
Channels: PAIR merges the channels of the (baseline-averaged) attribution by their *max*
(`_attr_aggregation_max`); our default is their *sum* (`channel_reduction='sum'`), the pixel's
total IG, so region gains stay densities of the score change S(x) - S(x') that IG's
completeness splits over the pixels (the max drops the other channels' share, negative or
positive). On one-channel radiographs both are the same map; `channel_reduction='max'` gives
PAIR's convention. IG: PAIR weighs the gradients at linspace(0, 1, steps) equally
(`rule='pair_uniform'`); our default is the trapezoid rule (`integrated.integrated_gradients`,
any of its rules). With the reference's segments and attribution, our maps and ranks equal its
`_xrai` / `_xrai_fast` outputs (checked on phantoms at 48 and 224 px). Baselines are spelled as
IG's: `baseline` is one baseline or a tuple of them, averaged ('black' / 'white' are each
image's minimum / maximum; IG's 'zeros', 'blurred', 'random', numbers and arrays also work).

The model is any `logits_fn(images) -> logits [B, K]` (`api.LogitsFn`). Only the attribution
part is jit-able (`xrai_attributions`); segmentation (scikit-image) and ranking (numpy,
vectorised over regions: one pass per added region, no loop over pixels) run on the host, image
by image. `xrai` / `fast_xrai` / `xrai_regions` jit their IG part afresh on every call, with no
cache kept between calls: a cache outliving the call would have to be keyed on the logits
function, pinning it (and the parameters it closes over) in memory, and would silently miss
for a new closure over the same model. The cost is one IG compilation per call; to explain many
batches, jit `xrai_attributions` once yourself (your function, your cache) and pass its output
as `attributions=`. The extras (region ranks) come from `xrai_regions`, a `Regions` result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from skimage import segmentation as sk_segmentation
from skimage import transform as sk_transform
from skimage.morphology import disk

from medxai_jax.attribution import api
from medxai_jax.attribution import common
from medxai_jax.attribution import integrated
from medxai_jax.observe import progress

XRAI_BASELINE_NAMES = ("black", "white")
DEFAULT_BASELINE = ("black", "white")
CHANNEL_REDUCTIONS = ("sum", "max") + common.CHANNEL_REDUCTIONS
DEFAULT_CHANNEL_REDUCTION = "sum"
DEFAULT_NUM_STEPS = common.NUM_STEPS  # PAIR's XRAIParameters.steps is 100
DEFAULT_RULE = "riemann_trapezoid"
DEFAULT_CHUNK_SIZE = common.CHUNK_SIZE  # IG steps per gradient batch (times baselines, images)
MIN_PIXEL_DIFF = 50
MASK_UNITS = ("regions", "pixels")
Ranking = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
  """Multi-scale Felzenszwalb segmentation as in PAIR saliency's XRAI (its defaults)."""

  scales: tuple[float, ...] = (50, 100, 150, 250, 500, 1200)
  sigma: float = 0.8
  min_size: int = 150
  value_range: tuple[float, float] = (-1.0, 1.0)
  resize_to: tuple[int, int] | None = (224, 224)  # None segments at the image's own size
  dilation_radius: int = 5                         # 0 disables dilation


# ---------------------------------------------------------------------------------------------
# Segmentation (host, numpy + scikit-image).


def _normalized_for_segmentation(image: np.ndarray, config: SegmentationConfig) -> np.ndarray:
  """The image min-max scaled to config.value_range and resized to config.resize_to."""
  image = np.asarray(image, np.float64)
  low, high = config.value_range
  spread = image.max() - image.min()
  scaled = (image - image.min()) / spread if spread > 0 else np.zeros_like(image)
  scaled = scaled * (high - low) + low
  if config.resize_to is None:
    return scaled
  return sk_transform.resize(scaled, tuple(config.resize_to), order=3, mode="constant",
                             preserve_range=True, anti_aliasing=True)


def _dilated_label_masks(labels: np.ndarray, radius: int) -> np.ndarray:
  """One boolean mask [R, H, W] per label present in `labels` [H, W], each dilated by disk(radius).

  Each mask is dilated inside its bounding box grown by the radius (the image border counts as
  background), so the cost follows the segments' sizes, not R * H * W.
  """
  present = np.unique(labels)
  masks = labels[None] == present[:, None, None]
  if radius <= 0:
    return masks
  footprint = disk(radius).astype(bool)
  height, width = labels.shape
  dilated = np.zeros_like(masks)
  for index, mask in enumerate(masks):
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    top, bottom = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, height)
    left, right = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, width)
    box = (slice(top, bottom), slice(left, right))
    dilated[index][box] = ndimage.binary_dilation(mask[box], structure=footprint)
  return dilated


def segment_masks(image: np.ndarray, config: SegmentationConfig = SegmentationConfig()
                  ) -> np.ndarray:
  """Candidate regions [R, H, W] (bool) of one image [H, W, C]: dilated multi-scale segments.

  Host numpy / scikit-image, not jit-able. Segments that vanish when resized back are dropped.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"segment_masks needs one image [H, W, C]; got shape {image.shape}.")
  if not config.scales:
    raise ValueError("SegmentationConfig.scales must name at least one Felzenszwalb scale.")
  normalized = _normalized_for_segmentation(image, config)
  masks = []
  for scale in config.scales:
    labels = sk_segmentation.felzenszwalb(normalized, scale=scale, sigma=config.sigma,
                                          min_size=config.min_size, channel_axis=-1)
    if config.resize_to is not None:
      labels = sk_transform.resize(labels, image.shape[:2], order=0, mode="constant",
                                   preserve_range=True, anti_aliasing=False).astype(np.int64)
    masks.append(_dilated_label_masks(labels, config.dilation_radius))
  return np.concatenate(masks)


# ---------------------------------------------------------------------------------------------
# Ranking (host numpy, vectorised over regions).


def _check_ranking_inputs(attribution: np.ndarray, masks: np.ndarray, min_pixel_diff: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Float64 attribution [P] and boolean masks [R, P] after checking their shapes."""
  attribution, masks = np.asarray(attribution), np.asarray(masks)
  if attribution.ndim != 2:
    raise ValueError(f"attribution must be one map [H, W]; got shape {attribution.shape}.")
  if masks.ndim != 3 or masks.shape[1:] != attribution.shape:
    raise ValueError(f"masks must have shape [R, H, W] = [R, {attribution.shape[0]}, "
                     f"{attribution.shape[1]}] to match the attribution; got {masks.shape}.")
  if masks.shape[0] == 0:
    raise ValueError("masks must hold at least one region; got R = 0.")
  common.check_positive("min_pixel_diff", min_pixel_diff)
  return attribution.astype(np.float64).ravel(), masks.astype(bool).reshape(masks.shape[0], -1)


def _assemble(shape: tuple[int, int], region_of: np.ndarray, gains: list[float],
              flat: np.ndarray) -> Ranking:
  """The value map [H, W] and region ranks [H, W] (1 = highest value, uncovered rest last)."""
  gains = np.asarray(gains, np.float64)
  order = np.argsort(-gains, kind="stable")           # highest value first, ties in added order
  rank_of_region = np.empty(len(gains), np.int32)
  rank_of_region[order] = np.arange(1, len(gains) + 1)
  values = np.empty(flat.size, np.float64)
  ranks = np.empty(flat.size, np.int32)
  covered = region_of >= 0
  values[covered] = gains[region_of[covered]]
  ranks[covered] = rank_of_region[region_of[covered]]
  if not covered.all():                               # the rest: one region at its own density
    values[~covered] = flat[~covered].mean()
    ranks[~covered] = len(gains) + 1
  return values.reshape(shape).astype(np.float32), ranks.reshape(shape)


def _cover(masks: np.ndarray, flat: np.ndarray, counts: np.ndarray, sums: np.ndarray,
           covered: np.ndarray, region: int) -> np.ndarray:
  """Marks region's new pixels covered and removes them from every region's count and sum."""
  new = np.flatnonzero(masks[region] & ~covered)
  covered[new] = True
  columns = masks[:, new]
  counts -= columns.sum(axis=1)
  sums -= columns @ flat[new]
  return new


def rank_regions(attribution: np.ndarray, masks: np.ndarray, *, area_threshold: float = 1.0,
                 min_pixel_diff: int = MIN_PIXEL_DIFF) -> Ranking:
  """Greedy XRAI of one image: value map [H, W] (region gains) and region ranks [H, W].

  Each round scores every remaining region at once from running counts and sums of its
  uncovered pixels, so a round costs O(R) plus O(R * new pixels) to update them.
  """
  if not 0.0 <= area_threshold <= 1.0:
    raise ValueError(f"area_threshold must lie in [0, 1]; got {area_threshold}.")
  flat, masks = _check_ranking_inputs(attribution, masks, min_pixel_diff)
  num_pixels = flat.size
  counts = masks.sum(axis=1).astype(np.int64)           # new pixels of each region
  sums = masks.astype(np.float64) @ flat                # attribution over those pixels
  alive = np.ones(len(masks), bool)
  covered = np.zeros(num_pixels, bool)
  region_of = np.full(num_pixels, -1, np.int64)
  gains: list[float] = []
  while covered.sum() / num_pixels <= area_threshold:
    alive &= counts >= min_pixel_diff
    if not alive.any():
      break
    densities = np.where(alive, sums / np.maximum(counts, 1), -np.inf)
    best = int(np.argmax(densities))                  # first of equal gains, as the reference
    region_of[_cover(masks, flat, counts, sums, covered, best)] = len(gains)
    gains.append(float(densities[best]))
    alive[best] = False
  return _assemble(np.shape(attribution), region_of, gains, flat)


def rank_regions_fast(attribution: np.ndarray, masks: np.ndarray, *,
                      min_pixel_diff: int = MIN_PIXEL_DIFF) -> Ranking:
  """Fast XRAI of one image: regions ranked once by full-mask density; value map and ranks."""
  flat, masks = _check_ranking_inputs(attribution, masks, min_pixel_diff)
  counts = masks.sum(axis=1).astype(np.int64)
  sums = masks.astype(np.float64) @ flat
  densities = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
  covered = np.zeros(flat.size, bool)
  region_of = np.full(flat.size, -1, np.int64)
  gains: list[float] = []
  for region in np.argsort(-densities, kind="stable"):
    if counts[region] < min_pixel_diff:                # adds too few new pixels: skipped
      continue
    gain = sums[region] / counts[region]               # density of the pixels it adds
    region_of[_cover(masks, flat, counts, sums, covered, region)] = len(gains)
    gains.append(float(gain))
  return _assemble(np.shape(attribution), region_of, gains, flat)


def region_masks(ranks: np.ndarray) -> np.ndarray:
  """The ordered region masks [N, H, W] (most important first) of one rank map [H, W]."""
  ranks = np.asarray(ranks)
  if ranks.ndim != 2:
    raise ValueError(f"ranks must be one rank map [H, W]; got shape {ranks.shape}.")
  return ranks[None] == np.arange(1, ranks.max() + 1)[:, None, None]


def top_fraction_mask(maps: jax.Array | np.ndarray, fraction: float, *,
                      unit: str = "regions") -> jax.Array:
  """Boolean masks [B, H, W] of the highest-valued `fraction` of each map (003: 0.3).

  With k = round(fraction * H * W): unit='pixels' keeps exactly k pixels (ties broken in raster
  order); unit='regions' keeps every pixel valued at least the k-th largest value, i.e. whole
  XRAI regions, covering k pixels plus at most one region's worth (the notebook's
  `map >= percentile(map, 70)` up to interpolation at that boundary). Jit-able; nested in fraction.
  """
  if jnp.ndim(maps) != 3:
    raise ValueError(f"maps must be a batch [B, H, W]; got shape {tuple(jnp.shape(maps))}.")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must lie in [0, 1]; got {fraction}.")
  if unit not in MASK_UNITS:
    raise ValueError(f"Unknown unit {unit!r}; expected one of {MASK_UNITS}.")
  batch, height, width = jnp.shape(maps)
  num_pixels = height * width
  keep = int(round(fraction * num_pixels))
  if keep == 0:
    return jnp.zeros((batch, height, width), bool)
  flat = jnp.reshape(jnp.asarray(maps), (batch, num_pixels))
  order = jnp.argsort(-flat, axis=-1, stable=True)
  if unit == "pixels":
    ranks = jnp.argsort(order, axis=-1)
    return (ranks < keep).reshape(batch, height, width)
  threshold = jnp.take_along_axis(flat, order[:, keep - 1:keep], axis=-1)
  return (flat >= threshold).reshape(batch, height, width)


# ---------------------------------------------------------------------------------------------
# Attributions (jit-able).


def _baseline_list(baseline: integrated.Baseline | Sequence[integrated.Baseline]
                   ) -> list[integrated.Baseline]:
  """One baseline or a tuple / list of them as a non-empty list."""
  baselines = list(baseline) if isinstance(baseline, (tuple, list)) else [baseline]
  if not baselines:
    raise ValueError("baseline must be one baseline or a non-empty tuple of baselines; got an "
                     "empty sequence.")
  return baselines


def xrai_baselines(images: jax.Array,
                   baseline: integrated.Baseline | Sequence[integrated.Baseline] = DEFAULT_BASELINE,
                   *, key: jax.Array | None = None,
                   blur_sigma: float = integrated.BLUR_MAX_SIGMA) -> jax.Array:
  """Baselines [K, B, H, W, C] of one baseline or a tuple of K: 'black' / 'white' (each image's
  min / max) or any IG baseline ('zeros', 'blurred', 'random', a number, an array)."""
  common.check_images(images)
  resolved = []
  for index, one in enumerate(_baseline_list(baseline)):
    if isinstance(one, str) and one in XRAI_BASELINE_NAMES:
      reduce = jnp.min if one == "black" else jnp.max
      resolved.append(jnp.broadcast_to(reduce(images, axis=(1, 2, 3), keepdims=True),
                                       images.shape))
    else:
      baseline_key = None if key is None else jax.random.fold_in(key, index)
      resolved.append(integrated.resolve_baseline(images, one, key=baseline_key,
                                                  blur_sigma=blur_sigma))
  return jnp.stack(resolved)


def check_channel_reduction(how: str) -> None:
  """Raises a ValueError unless `how` is one of `CHANNEL_REDUCTIONS`."""
  if how not in CHANNEL_REDUCTIONS:
    raise ValueError(f"Unknown channel_reduction {how!r}; expected one of {CHANNEL_REDUCTIONS}.")


def reduce_attribution_channels(attributions: jax.Array, how: str = DEFAULT_CHANNEL_REDUCTION
                                ) -> jax.Array:
  """Maps [B, H, W] from [B, H, W, C]: 'sum', 'max' (PAIR's) or a `common` reduction."""
  check_channel_reduction(how)
  common.check_images(attributions, "attributions")
  if how == "max":
    return attributions.max(axis=-1)
  return common.reduce_channels(attributions, how)


def _mean_ig(logits_fn: api.LogitsFn, images: jax.Array, baselines: jax.Array,
             targets: jax.Array, *, num_steps: int, rule: str, chunk_size: int,
             channel_reduction: str) -> jax.Array:
  """IG maps [B, H, W] averaged over baselines [K, B, ...], all K * B images in one batch."""
  count = baselines.shape[0]
  attributions = integrated.integrated_gradients(
      logits_fn, common.tile_batch(images, count), common.tile_batch(targets, count),
      baseline=baselines.reshape((-1,) + images.shape[1:]), num_steps=num_steps, rule=rule,
      chunk_size=chunk_size)
  mean = attributions.reshape(baselines.shape).mean(axis=0)
  return reduce_attribution_channels(mean, channel_reduction)


def xrai_attributions(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
                      baseline: integrated.Baseline | Sequence[integrated.Baseline] = (
                          DEFAULT_BASELINE),
                      num_steps: int = DEFAULT_NUM_STEPS, rule: str = DEFAULT_RULE,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, key: jax.Array | None = None,
                      blur_sigma: float = integrated.BLUR_MAX_SIGMA,
                      channel_reduction: str = DEFAULT_CHANNEL_REDUCTION) -> jax.Array:
  """XRAI's input attribution [B, H, W]: IG averaged over the baselines, channels reduced.

  Jit-able (jit it once to explain many batches and pass the result to `xrai` as
  attributions=). One gradient batch holds chunk_size * len(baseline) * B images.
  """
  check_channel_reduction(channel_reduction)
  integrated.quadrature(rule, num_steps)
  targets = common.resolve_inputs(logits_fn, images, targets)
  stack = xrai_baselines(images, baseline, key=key, blur_sigma=blur_sigma)
  return _mean_ig(logits_fn, images, stack, targets, num_steps=num_steps, rule=rule,
                  chunk_size=chunk_size, channel_reduction=channel_reduction)


# ---------------------------------------------------------------------------------------------
# XRAI and Fast XRAI.


@dataclasses.dataclass(frozen=True)
class Regions:
  """XRAI's output with its regions: value maps [B, H, W] (float32 region gains) and region
  ranks [B, H, W] (int32, 1 = most important; `masks(b)` gives image b's ordered masks)."""

  maps: np.ndarray
  ranks: np.ndarray

  def masks(self, index: int) -> np.ndarray:
    """The ordered region masks [N, H, W] of image `index` (most important first)."""
    return region_masks(self.ranks[index])


def _checked_attributions(attributions: Any, images: jax.Array, channel_reduction: str
                          ) -> np.ndarray:
  """User-given attributions as float maps [B, H, W] matching the images."""
  attributions = np.asarray(attributions)
  if attributions.ndim == 4:
    attributions = np.asarray(reduce_attribution_channels(jnp.asarray(attributions),
                                                          channel_reduction))
  if attributions.shape != tuple(images.shape[:3]):
    raise ValueError(
        f"attributions must have shape [B, H, W] = {tuple(images.shape[:3])} or [B, H, W, C]; "
        f"got {attributions.shape}.")
  return attributions


def _segments_per_image(segments: Any, images: jax.Array, config: SegmentationConfig
                        ) -> list[np.ndarray]:
  """Candidate regions per image: computed, one shared [R, H, W] array, or B arrays."""
  batch, height, width = images.shape[:3]
  if segments is None:
    host_images = np.asarray(images)
    return [segment_masks(image, config) for image in progress.track(
        host_images, desc="XRAI segmentation", unit="images")]
  if isinstance(segments, (np.ndarray, jax.Array)) and np.ndim(segments) == 3:
    segments = [np.asarray(segments)] * batch
  if len(segments) != batch:
    raise ValueError(f"segments must be one array [R, H, W] or a list of B = {batch} of them; "
                     f"got a list of {len(segments)}.")
  per_image = [np.asarray(masks, bool) for masks in segments]
  for index, masks in enumerate(per_image):
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
      raise ValueError(f"segments[{index}] must have shape [R, {height}, {width}]; got "
                       f"{masks.shape}.")
  return per_image


def _jitted_attributions(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
                         baseline: Any, num_steps: int, rule: str, chunk_size: int,
                         key: jax.Array | None, blur_sigma: float,
                         channel_reduction: str) -> jax.Array:
  """`xrai_attributions`, jitted for this call (compiled on every call: no cache outlives it)."""
  common.check_positive("num_steps", num_steps)
  integrated.quadrature(rule, num_steps)  # rejects unknown rules before compiling
  named = targets if isinstance(targets, str) else None
  if named is None:
    targets = common.resolve_inputs(logits_fn, images, targets)   # range-checked, concrete
  stack = xrai_baselines(images, baseline, key=key, blur_sigma=blur_sigma)

  def attribute(images: jax.Array, stack: jax.Array, targets: jax.Array | None) -> jax.Array:
    resolved = api.resolve_targets(logits_fn, images, named) if named else targets
    return _mean_ig(logits_fn, images, stack, resolved, num_steps=num_steps, rule=rule,
                    chunk_size=chunk_size, channel_reduction=channel_reduction)

  return jax.jit(attribute)(images, stack, None if named else targets)


def _run_xrai(rank_fn: Callable[[np.ndarray, np.ndarray], Ranking], logits_fn: api.LogitsFn,
              images: jax.Array, targets: api.Targets, *, attributions: Any, segments: Any,
              segmentation: SegmentationConfig, **ig_options: Any) -> Regions:
  """Attributions (jitted, batched), then segmentation and ranking image by image on the host."""
  if isinstance(images, jax.core.Tracer):
    raise ValueError("xrai/fast_xrai segment on the host and cannot run under jit or vmap; "
                     "jit xrai_attributions instead and pass its output as attributions=.")
  common.check_images(images)
  common.check_image_values(images)
  check_channel_reduction(ig_options["channel_reduction"])
  if attributions is None:
    attributions = _jitted_attributions(logits_fn, images, targets, **ig_options)
  elif not isinstance(targets, str):  # the targets are checked even when attributions are given
    common.resolve_inputs(logits_fn, images, targets)
  elif targets != "predicted":
    raise ValueError(f"targets must be an int, an int array [B] or 'predicted'; got {targets!r}.")
  maps = _checked_attributions(attributions, images, ig_options["channel_reduction"])
  rankings = [rank_fn(attribution, masks) for attribution, masks in
              zip(maps, _segments_per_image(segments, images, segmentation))]
  return Regions(maps=np.stack([ranking[0] for ranking in rankings]),
                 ranks=np.stack([ranking[1] for ranking in rankings]))


def xrai_regions(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
                 fast: bool = False, attributions: Any = None, segments: Any = None,
                 area_threshold: float = 1.0, min_pixel_diff: int = MIN_PIXEL_DIFF,
                 segmentation: SegmentationConfig = SegmentationConfig(),
                 baseline: integrated.Baseline | Sequence[integrated.Baseline] = (
                     DEFAULT_BASELINE),
                 num_steps: int = DEFAULT_NUM_STEPS, rule: str = DEFAULT_RULE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, key: jax.Array | None = None,
                 blur_sigma: float = integrated.BLUR_MAX_SIGMA,
                 channel_reduction: str = DEFAULT_CHANNEL_REDUCTION) -> Regions:
  """XRAI (or Fast XRAI with fast=True) value maps and region ranks of each image (`Regions`).

  Not jit-able (host segmentation). Its IG part is jitted on every call (see the module
  docstring); `attributions` ([B, H, W] or [B, H, W, C], e.g. from a jitted
  `xrai_attributions`) skips IG and `segments` (one [R, H, W] bool array or a list of B) skips
  segmentation. `area_threshold` applies to the greedy XRAI only.
  """
  if not 0.0 <= area_threshold <= 1.0:
    raise ValueError(f"area_threshold must lie in [0, 1]; got {area_threshold}.")
  if fast and area_threshold != 1.0:
    raise ValueError("area_threshold applies to the greedy XRAI only; Fast XRAI ranks every "
                     f"region (got fast=True with area_threshold={area_threshold}).")
  common.check_positive("min_pixel_diff", min_pixel_diff)
  if fast:
    rank_fn = functools.partial(rank_regions_fast, min_pixel_diff=min_pixel_diff)
  else:
    rank_fn = functools.partial(rank_regions, area_threshold=area_threshold,
                                min_pixel_diff=min_pixel_diff)
  return _run_xrai(rank_fn, logits_fn, images, targets, attributions=attributions,
                   segments=segments, segmentation=segmentation, baseline=baseline,
                   num_steps=num_steps, rule=rule, chunk_size=chunk_size, key=key,
                   blur_sigma=blur_sigma, channel_reduction=channel_reduction)


def xrai(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
         attributions: Any = None, segments: Any = None, area_threshold: float = 1.0,
         min_pixel_diff: int = MIN_PIXEL_DIFF,
         segmentation: SegmentationConfig = SegmentationConfig(),
         baseline: integrated.Baseline | Sequence[integrated.Baseline] = DEFAULT_BASELINE,
         num_steps: int = DEFAULT_NUM_STEPS, rule: str = DEFAULT_RULE,
         chunk_size: int = DEFAULT_CHUNK_SIZE, key: jax.Array | None = None,
         blur_sigma: float = integrated.BLUR_MAX_SIGMA,
         channel_reduction: str = DEFAULT_CHANNEL_REDUCTION) -> np.ndarray:
  """XRAI maps [B, H, W] (float32 region gains); the regions: `xrai_regions`.

  Same options as `xrai_regions` (not jit-able; IG jitted per call).
  """
  return xrai_regions(logits_fn, images, targets, attributions=attributions, segments=segments,
                      area_threshold=area_threshold, min_pixel_diff=min_pixel_diff,
                      segmentation=segmentation, baseline=baseline, num_steps=num_steps,
                      rule=rule, chunk_size=chunk_size, key=key, blur_sigma=blur_sigma,
                      channel_reduction=channel_reduction).maps


def fast_xrai(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
              attributions: Any = None, segments: Any = None,
              min_pixel_diff: int = MIN_PIXEL_DIFF,
              segmentation: SegmentationConfig = SegmentationConfig(),
              baseline: integrated.Baseline | Sequence[integrated.Baseline] = DEFAULT_BASELINE,
              num_steps: int = DEFAULT_NUM_STEPS, rule: str = DEFAULT_RULE,
              chunk_size: int = DEFAULT_CHUNK_SIZE, key: jax.Array | None = None,
              blur_sigma: float = integrated.BLUR_MAX_SIGMA,
              channel_reduction: str = DEFAULT_CHANNEL_REDUCTION) -> np.ndarray:
  """Fast XRAI maps [B, H, W]: one ranking by region density; the regions:
  `xrai_regions(..., fast=True)`. Same options as `xrai`, without an area threshold."""
  return xrai_regions(logits_fn, images, targets, fast=True, attributions=attributions,
                      segments=segments, min_pixel_diff=min_pixel_diff,
                      segmentation=segmentation, baseline=baseline, num_steps=num_steps,
                      rule=rule, chunk_size=chunk_size, key=key, blur_sigma=blur_sigma,
                      channel_reduction=channel_reduction).maps
