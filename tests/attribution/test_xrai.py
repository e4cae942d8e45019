"""XRAI and Fast XRAI: ranking against naive loops and hand values, masks, batching, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import morphology
from skimage import segmentation
from skimage import transform

from benchmarks import ig_convergence
from medxai_jax.attribution import integrated
from medxai_jax.attribution import xrai
from medxai_jax.models import base

NUM_STEPS = 16  # IG steps per baseline in the end-to-end tests (cheap; exactness not at stake)

# ----------------------------------------------------------------------------------------------
# Naive references: the published loops, one region and one round at a time.


def naive_xrai(attr, masks, area_threshold=1.0, min_pixel_diff=1):
  """Greedy XRAI written plainly: rescan every remaining mask each round."""
  covered = np.zeros(attr.shape, bool)
  remaining = list(range(len(masks)))
  added = []                                            # (new pixels, gain) in added order
  while covered.mean() <= area_threshold:
    remaining = [r for r in remaining if (masks[r] & ~covered).sum() >= min_pixel_diff]
    if not remaining:
      break
    gains = [attr[masks[r] & ~covered].mean() for r in remaining]
    best = remaining[int(np.argmax(gains))]
    new = masks[best] & ~covered
    added.append((new, max(gains)))
    covered |= new
    remaining.remove(best)
  return _naive_outputs(attr, covered, added)


def naive_fast_xrai(attr, masks, min_pixel_diff=1):
  """Fast XRAI written plainly: sort by full-mask mean, then claim new pixels in that order."""
  order = sorted(range(len(masks)), key=lambda r: -attr[masks[r]].mean())
  covered = np.zeros(attr.shape, bool)
  added = []
  for r in order:
    new = masks[r] & ~covered
    if new.sum() >= min_pixel_diff:
      added.append((new, attr[new].mean()))
      covered |= new
  return _naive_outputs(attr, covered, added)


def _naive_outputs(attr, covered, added):
  """Value map and ranks (sorted by gain, uncovered rest last) from the added regions."""
  values = np.zeros(attr.shape)
  ranks = np.zeros(attr.shape, int)
  for rank, (new, gain) in enumerate(sorted(added, key=lambda item: -item[1]), start=1):
    values[new], ranks[new] = gain, rank
  if not covered.all():
    values[~covered], ranks[~covered] = attr[~covered].mean(), len(added) + 1
  return values, ranks


def random_rectangles(rng, count, height, width):
  """`count` random axis-aligned rectangles [count, H, W], each at least 2x2."""
  masks = np.zeros((count, height, width), bool)
  for mask in masks:
    top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
    mask[top:rng.integers(top + 2, height + 1), left:rng.integers(left + 2, width + 1)] = True
  return masks


# ----------------------------------------------------------------------------------------------
# Fixtures: the small CNN of the IG benchmark on two 48 px phantoms, XRAI run once.


@pytest.fixture(scope="module")
def cnn():
  return ig_convergence.fixed_problem(num_images=2)


@pytest.fixture(scope="module")
def cnn_xrai(cnn):
  """XRAI maps and ranks of both phantoms in one batch (compiles the IG part once)."""
  model, variables, images, targets = cnn
  regions = xrai.xrai_regions(model.logits_fn(variables), images, targets, num_steps=NUM_STEPS)
  return regions.maps, regions.ranks


class Linear(nn.Module):
  """One dense layer on the flattened image: IG from baseline b is exactly (x - b) * w."""

  num_outputs: int = 2

  def features(self, x, tap="hidden", train=False):
    del tap, train
    return x.reshape((x.shape[0], -1))

  def head(self, feature_map, train=False):
    del train
    return nn.Dense(self.num_outputs, name="output")(feature_map)

  @nn.compact
  def __call__(self, x, train=False):
    return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# Ranking.


def test_greedy_order_on_a_hand_built_map():
  """Greedy picks the small dense region before the overlapping one; Fast XRAI does not."""
  attr = np.tile(np.array([10.0, 10.0, 0.0, 0.0, 2.0, 1.0]), (2, 1))
  columns = {"A": [0, 1], "B": [0, 1, 2, 3, 4], "D": [4, 5]}
  masks = np.zeros((3, 2, 6), bool)
  for index, cols in enumerate(columns.values()):
    masks[index][:, cols] = True
  # Greedy: A (10); then D's new pixels {4, 5} (1.5) beat B's {2, 3, 4} (2/3); then B {2, 3} (0).
  values, ranks = xrai.rank_regions(attr, masks, min_pixel_diff=1)
  np.testing.assert_allclose(values[0], [10, 10, 0, 0, 1.5, 1.5])
  np.testing.assert_array_equal(ranks[0], [1, 1, 3, 3, 2, 2])
  # Fast: full densities A 10 > B 4.4 > D 1.5, so B claims {2, 3, 4} (2/3) and D only {5} (1).
  values, ranks = xrai.rank_regions_fast(attr, masks, min_pixel_diff=1)
  np.testing.assert_allclose(values[0], [10, 10, 2 / 3, 2 / 3, 2 / 3, 1])
  np.testing.assert_array_equal(ranks[0], [1, 1, 3, 3, 3, 2])
  # An area threshold of 1/4 stops after A (1/3 of the image); the rest is one region.
  values, ranks = xrai.rank_regions(attr, masks, area_threshold=0.25, min_pixel_diff=1)
  np.testing.assert_allclose(values[0], [10, 10, 0.75, 0.75, 0.75, 0.75])
  np.testing.assert_array_equal(ranks[0], [1, 1, 2, 2, 2, 2])


@pytest.mark.parametrize("area_threshold,min_pixel_diff", [(1.0, 1), (1.0, 6), (0.4, 1)])
def test_greedy_ranking_matches_the_naive_loop(area_threshold, min_pixel_diff):
  rng = np.random.default_rng(int(area_threshold * 10) + min_pixel_diff)
  for _ in range(5):
    attr = rng.standard_normal((12, 10))
    masks = random_rectangles(rng, 15, 12, 10)
    values, ranks = xrai.rank_regions(attr, masks, area_threshold=area_threshold,
                                      min_pixel_diff=min_pixel_diff)
    expected_values, expected_ranks = naive_xrai(attr, masks, area_threshold, min_pixel_diff)
    np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ranks, expected_ranks)


@pytest.mark.parametrize("min_pixel_diff", [1, 6])
def test_fast_ranking_matches_the_naive_loop(min_pixel_diff):
  rng = np.random.default_rng(min_pixel_diff)
  for _ in range(5):
    attr = rng.standard_normal((12, 10))
    masks = random_rectangles(rng, 15, 12, 10)
    values, ranks = xrai.rank_regions_fast(attr, masks, min_pixel_diff=min_pixel_diff)
    expected_values, expected_ranks = naive_fast_xrai(attr, masks, min_pixel_diff)
    np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ranks, expected_ranks)


def test_fast_xrai_on_a_partition_ranks_regions_by_mean_attribution(cnn):
  """With disjoint regions covering the image both XRAIs give each region its mean, in order."""
  model, variables, images, targets = cnn
  height, width = images.shape[1:3]
  rng = np.random.default_rng(3)
  labels = (np.arange(height)[:, None] // 12) * 4 + np.arange(width)[None, :] // 12  # 16 tiles
  segments = labels[None] == rng.permutation(16)[:, None, None]
  attributions = rng.standard_normal((2, height, width)).astype(np.float32)
  means = np.stack([[a[mask].mean() for mask in segments] for a in attributions])   # [2, 16]
  for fast in (True, False):
    regions = xrai.xrai_regions(model.logits_fn(variables), images, targets, fast=fast,
                                attributions=attributions, segments=segments, min_pixel_diff=1)
    maps, ranks = regions.maps, regions.ranks
    method = xrai.fast_xrai if fast else xrai.xrai
    np.testing.assert_array_equal(
        method(model.logits_fn(variables), images, targets, attributions=attributions,
               segments=segments, min_pixel_diff=1), maps)
    for b in range(2):
      np.testing.assert_allclose(maps[b], (segments * means[b][:, None, None]).sum(0),
                                 rtol=1e-5)
      order = np.argsort(-means[b])
      np.testing.assert_array_equal(xrai.region_masks(ranks[b]), segments[order])
      np.testing.assert_array_equal(regions.masks(b), segments[order])


# ----------------------------------------------------------------------------------------------
# Segmentation.


def test_segment_masks_equal_a_direct_scikit_image_construction(cnn):
  """Our bounding-box dilation equals skimage's dilation of each full-size segment mask."""
  image = np.asarray(cnn[2][0])
  config = xrai.SegmentationConfig(scales=(100,))
  scaled = (image - image.min()) / (image.max() - image.min()) * 2 - 1
  resized = transform.resize(scaled, (224, 224), order=3, mode="constant", preserve_range=True,
                             anti_aliasing=True)
  labels = segmentation.felzenszwalb(resized, scale=100, sigma=0.8, min_size=150)
  labels = transform.resize(labels, image.shape[:2], order=0, mode="constant",
                            preserve_range=True, anti_aliasing=False).astype(int)
  expected = [morphology.dilation(labels == label, morphology.disk(5))
              for label in np.unique(labels)]
  np.testing.assert_array_equal(xrai.segment_masks(image, config), np.stack(expected))
  assert len(xrai.segment_masks(image)) > len(expected)  # six scales by default


# ----------------------------------------------------------------------------------------------
# Masks of the top fraction, on the end-to-end XRAI of the CNN.


def test_xrai_regions_partition_the_image_and_the_full_mask_covers_it(cnn_xrai):
  maps, ranks = cnn_xrai
  assert maps.shape == ranks.shape == (2, 48, 48) and maps.dtype == np.float32
  assert np.isfinite(maps).all()
  for b in range(2):
    regions = xrai.region_masks(ranks[b])
    np.testing.assert_array_equal(regions.sum(axis=0), 1)     # every pixel in exactly one
    assert len(regions) > 1
  assert bool(xrai.top_fraction_mask(maps, 1.0).all())
  assert not bool(xrai.top_fraction_mask(maps, 0.0).any())


@pytest.mark.parametrize("unit", xrai.MASK_UNITS)
def test_top_fraction_masks_are_nested(cnn_xrai, unit):
  maps, _ = cnn_xrai
  fractions = np.linspace(0.0, 1.0, 11)
  masks = [np.asarray(xrai.top_fraction_mask(maps, f, unit=unit)) for f in fractions]
  for smaller, larger in zip(masks, masks[1:]):
    assert (smaller <= larger).all()
  areas = np.array([m.mean(axis=(1, 2)) for m in masks])        # [fractions, B]
  assert (np.diff(areas, axis=0) >= 0).all() and np.allclose(areas[-1], 1.0)


def test_top_30_percent_mask_area(cnn_xrai):
  """Pixels: exactly round(0.3 H W); regions: whole regions, at least that, < one region more."""
  maps, ranks = cnn_xrai
  keep = round(0.3 * 48 * 48)
  by_pixels = np.asarray(xrai.top_fraction_mask(maps, 0.3, unit="pixels"))
  np.testing.assert_array_equal(by_pixels.sum(axis=(1, 2)), keep)
  by_regions = np.asarray(xrai.top_fraction_mask(maps, 0.3))
  assert (by_pixels <= by_regions).all()
  for b in range(2):
    regions = xrai.region_masks(ranks[b])
    inside = np.array([by_regions[b][r].all() for r in regions])
    outside = np.array([not by_regions[b][r].any() for r in regions])
    assert (inside | outside).all()                             # regions are the unit
    # Expected: the regions in value order until `keep` pixels are covered, with any region
    # tied in value with the last one.
    values = np.array([maps[b][r][0] for r in regions])
    order = np.argsort(-values, kind="stable")
    cumulative = np.cumsum(regions[order].sum(axis=(1, 2)))
    last = int(np.searchsorted(cumulative, keep))
    chosen = values >= values[order[last]]
    np.testing.assert_array_equal(by_regions[b], regions[chosen].any(axis=0))
    assert keep <= by_regions[b].sum() < keep + regions[chosen].sum(axis=(1, 2)).max()


def test_top_fraction_mask_pixels_by_hand():
  maps = np.array([[[4.0, 1.0, 3.0], [2.0, 3.0, 0.0]]])        # 6 pixels, a tie at 3
  np.testing.assert_array_equal(xrai.top_fraction_mask(maps, 0.5, unit="pixels")[0],
                                [[True, False, True], [False, True, False]])
  np.testing.assert_array_equal(xrai.top_fraction_mask(maps, 2 / 6)[0],
                                [[True, False, True], [False, True, False]])  # tie kept whole
  np.testing.assert_array_equal(xrai.top_fraction_mask(maps, 3 / 6)[0],
                                [[True, False, True], [False, True, False]])  # no overshoot
  jitted = jax.jit(functools.partial(xrai.top_fraction_mask, fraction=3 / 6, unit="pixels"))
  np.testing.assert_array_equal(jitted(maps), xrai.top_fraction_mask(maps, 3 / 6, unit="pixels"))
  np.testing.assert_array_equal(xrai.top_fraction_mask(maps, 2 / 6, unit="pixels")[0],
                                [[True, False, True], [False, False, False]])


# ----------------------------------------------------------------------------------------------
# Attributions, batching, targets.


def test_xrai_attributions_of_a_linear_model_use_the_black_and_white_mean():
  model = base.Classifier(module=Linear(), taps=("hidden",), aliases={}, input_shape=(5, 4, 3),
                          num_outputs=2)
  variables = ig_convergence.random_variables(model, seed=1)
  images = jax.random.uniform(jax.random.key(0), (3, 5, 4, 3))
  targets = jnp.array([0, 1, 1])
  maps = jax.jit(lambda v, x, t: xrai.xrai_attributions(model.logits_fn(v), x, t, num_steps=3))(
      variables, images, targets)
  kernel = np.asarray(variables["params"]["output"]["kernel"])          # [60, 2]
  weights = kernel[:, np.asarray(targets)].T.reshape(images.shape)
  flat = np.asarray(images).reshape(3, -1)
  middle = ((flat.min(1) + flat.max(1)) / 2)[:, None, None, None]
  np.testing.assert_allclose(maps, ((np.asarray(images) - middle) * weights).sum(-1),
                             rtol=1e-4, atol=1e-6)
  reference_max = jax.jit(lambda v, x, t: xrai.xrai_attributions(
      model.logits_fn(v), x, t, num_steps=3, channel_reduction="max"))(variables, images, targets)
  np.testing.assert_allclose(reference_max, ((np.asarray(images) - middle) * weights).max(-1),
                             rtol=1e-4, atol=1e-6)


def test_xrai_of_a_plain_jnp_function_with_one_baseline_and_either_channel_convention():
  """A linear logits_fn written in jnp: IG from the black baseline is exactly (x - min) * w, and
  XRAI on a fixed partition gives each region its mean of the channel-reduced attribution."""
  weights = jax.random.normal(jax.random.key(3), (2, 6, 8, 3))
  logits_fn = lambda x: jnp.einsum("bhwc,khwc->bk", x, weights)  # noqa: E731
  images = jax.random.uniform(jax.random.key(4), (2, 6, 8, 3))
  targets = jnp.array([1, 0])
  exact = (np.asarray(images) - np.asarray(images).min(axis=(1, 2, 3), keepdims=True)) * \
      np.asarray(weights)[[1, 0]]
  segments = np.zeros((2, 6, 8), bool)
  segments[0, :, :4], segments[1, :, 4:] = True, True
  for reduction, reduce in (("sum", np.sum), ("max", np.max)):
    maps = xrai.xrai_attributions(logits_fn, images, targets, baseline="black", num_steps=2,
                                  channel_reduction=reduction)
    np.testing.assert_allclose(maps, reduce(exact, axis=-1), rtol=1e-4, atol=1e-6)
    values = xrai.xrai(logits_fn, images, targets, baseline="black", num_steps=2,
                       segments=segments, min_pixel_diff=1, channel_reduction=reduction)
    expected = reduce(exact, axis=-1)
    for b in range(2):
      for mask in segments:
        np.testing.assert_allclose(values[b][mask], expected[b][mask].mean(), rtol=1e-4)


def test_xrai_ig_part_is_the_mean_of_two_integrated_gradients(cnn):
  model, variables, images, targets = cnn
  maps = xrai.xrai_attributions(model.logits_fn(variables), images, targets,
                                num_steps=NUM_STEPS)
  low = images.min(axis=(1, 2, 3), keepdims=True) * jnp.ones_like(images)
  high = images.max(axis=(1, 2, 3), keepdims=True) * jnp.ones_like(images)
  ig = functools.partial(integrated.integrated_gradients, model.logits_fn(variables), images,
                         targets,
                         num_steps=NUM_STEPS)
  expected = (ig(baseline=low) + ig(baseline=high)).sum(-1) / 2
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_batched_xrai_equals_per_image(cnn, cnn_xrai):
  model, variables, images, targets = cnn
  maps, ranks = cnn_xrai
  for b in range(2):
    single = xrai.xrai_regions(model.logits_fn(variables), images[b:b + 1], targets[b:b + 1],
                               num_steps=NUM_STEPS)
    np.testing.assert_allclose(single.maps[0], maps[b], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(single.ranks[0], ranks[b])


def test_batched_fast_xrai_equals_per_image_and_predicted_targets(cnn):
  model, variables, images, _ = cnn
  attributions = np.random.default_rng(0).standard_normal(images.shape[:3]).astype(np.float32)
  logits_fn = model.logits_fn(variables)
  maps = xrai.fast_xrai(logits_fn, images, "predicted", attributions=attributions)
  for b in range(2):
    single = xrai.fast_xrai(logits_fn, images[b:b + 1], "predicted",
                            attributions=attributions[b:b + 1])
    np.testing.assert_array_equal(single[0], maps[b])
  predicted = base.predicted_classes(model.logits(variables, images))
  by_name = xrai.xrai_attributions(logits_fn, images, "predicted", num_steps=4)
  by_index = xrai.xrai_attributions(logits_fn, images, predicted, num_steps=4)
  np.testing.assert_allclose(by_name, by_index, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors.


def test_bad_inputs_give_clear_errors(cnn):
  model, variables, images, targets = cnn
  run = functools.partial(xrai.xrai, model.logits_fn(variables))
  attributions = np.zeros(images.shape[:3], np.float32)
  with pytest.raises(ValueError, match="rank-4"):
    run(images[0], targets, attributions=attributions)
  with pytest.raises(ValueError, match="out of range"):
    run(images, jnp.array([0, 7]), num_steps=2)
  with pytest.raises(ValueError, match="num_steps"):
    run(images, targets, num_steps=0)
  with pytest.raises(ValueError, match="attributions must have shape"):
    run(images, targets, attributions=attributions[:, :10])
  with pytest.raises(ValueError, match=r"segments\[0\] must have shape"):
    run(images, targets, attributions=attributions, segments=[np.ones((2, 5, 5), bool)] * 2)
  with pytest.raises(ValueError, match="area_threshold"):
    run(images, targets, attributions=attributions, area_threshold=1.5)
  with pytest.raises(ValueError, match="channel_reduction"):
    run(images, targets, attributions=attributions, channel_reduction="mean")
  with pytest.raises(ValueError, match="non-empty tuple of baselines"):
    xrai.xrai_baselines(images, ())
  with pytest.raises(ValueError, match="Unknown baseline 'grey'"):
    xrai.xrai_baselines(images, ("black", "grey"))
  with pytest.raises(ValueError, match="area_threshold applies to the greedy XRAI only"):
    xrai.xrai_regions(model.logits_fn(variables), images, targets, fast=True,
                      attributions=attributions, area_threshold=0.5)
  with pytest.raises(ValueError, match="fraction"):
    xrai.top_fraction_mask(attributions, 1.2)
  with pytest.raises(ValueError, match=r"maps must be a batch \[B, H, W\]"):
    xrai.top_fraction_mask(attributions[0], 0.3)
  with pytest.raises(ValueError, match="masks must have shape"):
    xrai.rank_regions(attributions[0], np.ones((3, 4, 4), bool))
  with pytest.raises(ValueError, match="cannot run under jit"):
    jax.jit(lambda x: xrai.fast_xrai(model.logits_fn(variables), x, targets,
                                     attributions=attributions))(images)
