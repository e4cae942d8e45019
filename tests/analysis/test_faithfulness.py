"""Explanation scores against hand-built maps, naive loops, scipy and constructed models."""

from __future__ import annotations

import re
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import skimage.filters

from medxai_jax.analysis import faithfulness as fa
from medxai_jax.attribution import gradients
from medxai_jax.models import base
from medxai_jax.models import custom_cnn

SIZE = 32


def square(top: int, left: int, side: int, size: int = SIZE) -> np.ndarray:
  """A [size, size] bool mask with one filled square."""
  mask = np.zeros((size, size), bool)
  mask[top:top + side, left:left + side] = True
  return mask


# ---------------------------------------------------------------------------------------------
# A model that reads only the pixels of a fixed mask.


class MaskReader(nn.Module):
  """Logit = w * (mean intensity over a fixed mask) + b: the rest of the image is ignored."""

  mask: tuple[tuple[bool, ...], ...]

  def setup(self) -> None:
    self.readout = nn.Dense(1, kernel_init=nn.initializers.constant(12.0),
                            bias_init=nn.initializers.constant(-6.0), name="readout")

  def _pooled(self, x: jax.Array) -> jax.Array:
    mask = jnp.asarray(self.mask, x.dtype)
    return base.perturb_tap(self, "pooled",
                            ((x[..., 0] * mask).sum(axis=(1, 2)) / mask.sum())[:, None])

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.readout(self._pooled(x))

  def features(self, x: jax.Array, tap: str, train: bool = False) -> jax.Array:
    return self._pooled(x)

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    return self.readout(feature_map)


def mask_reader(mask: np.ndarray) -> base.Classifier:
  """MaskReader in the model contract."""
  module = MaskReader(mask=tuple(map(tuple, mask.tolist())))
  return base.Classifier(module=module, taps=("pooled",), aliases={}, input_shape=(*mask.shape, 1),
                         num_outputs=1)


LESION = square(12, 14, 8)          # 64 px = 6.25% of 32 x 32
MARKER = square(1, 1, 5)


@pytest.fixture(scope="module")
def reader():
  model = mask_reader(LESION)
  return model, model.init(jax.random.key(0))


@pytest.fixture(scope="module")
def lesion_images():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.0, 0.4, (4, SIZE, SIZE, 1)).astype(np.float32)
  images[:, LESION] = 1.0
  return jnp.asarray(images)


# ---------------------------------------------------------------------------------------------
# Localisation.


def test_map_equal_to_mask_scores_one_and_inverted_map_zero():
  masks = np.stack([LESION, square(0, 0, 8), square(24, 20, 8)])
  perfect = masks.astype(np.float32)
  inverted = 1.0 - perfect
  for maps, expected in ((perfect, 1.0), (inverted, 0.0)):
    scores = jax.jit(lambda m, g: fa.localisation_scores(m, g, top_percents=(6.25,)))(
        maps, masks)
    for name in ("pointing_game", "energy", "iou_top6.25%", "precision_top6.25%",
                 "iou_mask_size", "rank_accuracy"):
      np.testing.assert_array_equal(np.asarray(scores[name]), expected, err_msg=name)


def test_channel_maps_are_reduced_by_absolute_sum_and_masks_may_have_a_channel_axis():
  maps = np.zeros((1, SIZE, SIZE, 3), np.float32)
  maps[0, 15, 15] = [-3.0, 1.0, 0.0]  # |.|-sum 4 inside the lesion
  maps[0, 0, 31] = [2.0, 1.0, 0.0]    # 3 outside (a signed sum would make it the maximum)
  hit = fa.pointing_game(maps, LESION[None, :, :, None])
  np.testing.assert_array_equal(hit, [1.0])
  np.testing.assert_allclose(fa.energy_pointing_game(maps, LESION[None]), [4 / 7], rtol=1e-6)
  with pytest.raises(ValueError, match="masks"):
    fa.pointing_game(maps, LESION[None, :16])


def test_pointing_game_margin_is_a_euclidean_tolerance():
  mask = square(10, 10, 4)[None]                       # rows/cols 10..13
  maps = np.zeros((3, SIZE, SIZE), np.float32)
  maps[0, 11, 16] = 1.0   # 3 px right of the mask: hit from margin 3
  maps[1, 16, 16] = 1.0   # diagonal (3, 3) from the corner: distance 4.24, hit from margin 5
  maps[2, 12, 12] = 1.0   # inside
  masks = np.repeat(mask, 3, axis=0)
  expected = {0: [0, 0, 1], 2: [0, 0, 1], 3: [1, 0, 1], 4: [1, 0, 1], 5: [1, 1, 1]}
  for margin, hits in expected.items():
    np.testing.assert_array_equal(fa.pointing_game(maps, masks, margin), hits, err_msg=margin)
  disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
  np.testing.assert_array_equal(fa.dilate_masks(masks, 3),
                                scipy.ndimage.binary_dilation(masks, disk[None]))


def test_ties_empty_masks_and_maps_without_positive_attribution():
  constant = np.ones((1, SIZE, SIZE), np.float32)
  # A constant map: every pixel is a maximum, the hit share is the mask's area fraction.
  np.testing.assert_allclose(fa.pointing_game(constant, LESION[None]), [64 / SIZE ** 2])
  empty = np.zeros((1, SIZE, SIZE), bool)
  assert np.isnan(fa.pointing_game(constant, empty)[0])
  assert np.isnan(fa.top_region_scores(constant, empty)["iou_top5%"][0])
  assert np.isnan(fa.energy_pointing_game(-constant, LESION[None])[0])


def test_top_region_iou_and_precision_match_a_numpy_loop():
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(3, SIZE, SIZE)).astype(np.float32)
  maps[0, :4] = 0.5  # ties: broken in raster order
  masks = np.stack([LESION, square(3, 3, 10), square(20, 2, 6)])
  scores = fa.top_region_scores(maps, masks, top_percents=(5, 20))
  for b in range(3):
    order = np.argsort(-maps[b].ravel(), kind="stable")
    for percent in (5, 20):
      count = int(round(percent / 100 * SIZE * SIZE))
      region = np.zeros(SIZE * SIZE, bool)
      region[order[:count]] = True
      truth = masks[b].ravel()
      inter = np.sum(region & truth)
      np.testing.assert_allclose(scores[f"iou_top{percent}%"][b],
                                 inter / np.sum(region | truth), rtol=1e-6)
      np.testing.assert_allclose(scores[f"precision_top{percent}%"][b], inter / count, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# CheXlocalize: binarised maps, mIoU and hit rate.


def naive_levels(saliency: np.ndarray) -> np.ndarray:
  """CheXlocalize's quantisation: uint8(255 * (m - min) / (max - min)) in float32."""
  saliency = saliency.astype(np.float32)
  normalised = (saliency - saliency.min()) / (saliency.max() - saliency.min())
  return np.uint8(np.float32(255) * normalised)


def bimodal_maps(seed: int, count: int = 4) -> np.ndarray:
  """Maps whose values come from two separated normal modes (a 'hot' region and background)."""
  rng = np.random.default_rng(seed)
  hot = rng.random((count, SIZE, SIZE)) < rng.uniform(0.1, 0.5, (count, 1, 1))
  return np.where(hot, rng.normal(4.0, 1.0, hot.shape),
                  rng.normal(0.0, 1.0, hot.shape)).astype(np.float32)


def test_otsu_binarisation_equals_skimage_on_bimodal_maps():
  maps = bimodal_maps(3, count=5)
  segmentations = np.asarray(jax.jit(fa.binarise_maps)(maps))
  for saliency, segmentation in zip(maps, segmentations):
    levels = naive_levels(saliency)
    expected = levels > skimage.filters.threshold_otsu(levels)
    np.testing.assert_array_equal(segmentation, expected)
    assert 0.05 < expected.mean() < 0.6  # a real split of the two modes, not all or nothing


def test_fixed_binarisation_thresholds_the_normalised_map():
  maps = bimodal_maps(4)
  for threshold in (0.2, 0.5, 0.8):
    normalised = np.stack([(m - m.min()) / (m.max() - m.min()) for m in maps])
    np.testing.assert_array_equal(fa.binarise_maps(maps, "fixed", threshold),
                                  normalised > threshold)
  constant = np.full((1, SIZE, SIZE), 3.0, np.float32)
  assert not np.asarray(fa.binarise_maps(constant)).any()
  assert not np.asarray(fa.binarise_maps(constant, "fixed", 0.0)).any()
  with pytest.raises(ValueError, match="binarisation"):
    fa.binarise_maps(maps, "mean")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    fa.binarise_maps(maps, "fixed", 1.5)


def test_segmentation_iou_of_rectangles_and_empty_cases():
  predicted = square(0, 0, 8)      # 64 pixels
  truth = square(4, 4, 8)          # 64 pixels, 16 shared: IoU 16 / 112
  inside = square(2, 2, 4)         # 16 pixels inside `predicted`: IoU 16 / 64
  maps = np.stack([predicted, predicted, predicted, np.zeros_like(predicted)]).astype(np.float32)
  masks = np.stack([truth, inside, np.zeros_like(truth), truth])
  iou = np.asarray(fa.segmentation_iou(maps, masks))
  np.testing.assert_allclose(iou[:2], [16 / 112, 16 / 64], rtol=1e-6)
  assert np.isnan(iou[2])          # empty mask: no score, never 0
  assert np.isnan(iou[3])          # empty segmentation (constant map): left out by default
  counted = np.asarray(fa.segmentation_iou(maps, masks, true_positive_only=False))
  assert np.isnan(counted[2]) and counted[3] == 0.0


def test_segmentation_iou_matches_a_numpy_loop_with_skimage_otsu():
  maps = bimodal_maps(5)
  masks = np.stack([square(0, 0, 16), square(8, 8, 20), square(3, 20, 10), square(16, 0, 16)])
  iou = np.asarray(fa.segmentation_iou(maps, masks))
  for index, (saliency, mask) in enumerate(zip(maps, masks)):
    levels = naive_levels(saliency)
    segmentation = levels > skimage.filters.threshold_otsu(levels)
    expected = (segmentation & mask).sum() / (segmentation | mask).sum()
    assert iou[index] == pytest.approx(expected, rel=1e-6)


def test_hit_rate_is_one_when_the_maximum_is_inside_the_mask():
  mask = square(10, 10, 4)
  maps = np.zeros((4, SIZE, SIZE), np.float32)
  maps[0, 12, 12] = 1.0                      # inside
  maps[1, 9, 12] = 1.0                       # one row above: a miss (no tolerance)
  maps[2, 0, 0] = maps[2, 11, 11] = 1.0      # tied maxima, the first (raster order) outside
  maps[3, 11, 11] = maps[3, 30, 30] = 1.0    # tied maxima, the first inside
  masks = np.repeat(mask[None], 4, axis=0)
  first = np.asarray(fa.hit_rate(maps, masks))
  naive = [float(m[np.unravel_index(np.argmax(s), s.shape)]) for s, m in zip(maps, masks)]
  np.testing.assert_array_equal(first, naive)
  np.testing.assert_array_equal(first, [1, 0, 0, 1])
  np.testing.assert_array_equal(fa.hit_rate(maps, masks, ties="share"), [1, 0, 0.5, 0.5])
  assert np.isnan(fa.hit_rate(maps[:1], np.zeros((1, SIZE, SIZE), bool))[0])
  with pytest.raises(ValueError, match="ties"):
    fa.hit_rate(maps, masks, ties="last")


def test_chexlocalize_scores_are_vmapped_per_image():
  maps = bimodal_maps(6, count=3)
  masks = np.stack([square(0, 0, 16), square(8, 8, 20), np.zeros((SIZE, SIZE), bool)])
  batched = jax.jit(fa.chexlocalize_scores)(maps, masks)
  for index in range(3):
    single = fa.chexlocalize_scores(maps[index:index + 1], masks[index:index + 1])
    for name in ("miou", "hit_rate"):
      np.testing.assert_array_equal(np.asarray(batched[name])[index:index + 1],
                                    np.asarray(single[name]), err_msg=name)
  assert np.isnan(np.asarray(batched["miou"])[2]) and np.isnan(np.asarray(batched["hit_rate"])[2])


# ---------------------------------------------------------------------------------------------
# Deletion and insertion.


def naive_curve(model, variables, images, targets, maps, *, mode, num_steps, patch_size,
                fill):
  """One model call per step, units ranked by numpy over an explicit patch loop."""
  images, maps, fill = np.asarray(images), np.asarray(maps), np.asarray(fill)
  batch, height, width = maps.shape
  scores = np.zeros((batch, num_steps + 1))
  units = [(r, c) for r in range(0, height, patch_size) for c in range(0, width, patch_size)]
  orders = [np.argsort(-np.array([maps[b, r:r + patch_size, c:c + patch_size].mean()
                                  for r, c in units]), kind="stable") for b in range(batch)]
  fractions = []
  for step in range(num_steps + 1):
    count = int(np.round(step * len(units) / num_steps))
    fractions.append(count / len(units))
    changed = np.zeros(maps.shape, bool)
    for b in range(batch):
      for unit in orders[b][:count]:
        r, c = units[unit]
        changed[b, r:r + patch_size, c:c + patch_size] = True
    start, end = (images, fill) if mode == "deletion" else (fill, images)
    x = np.where(changed[..., None], end, start)
    logits = np.asarray(model.logits(variables, jnp.asarray(x)))[:, 0]
    signed = np.where(np.asarray(targets) == 1, logits, -logits)
    scores[:, step] = 1 / (1 + np.exp(-signed))
  return np.asarray(fractions), scores


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_vmapped_curve_equals_a_python_loop_over_steps(mode):
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(size=(2, 30, 30, 1)).astype(np.float32))
  small = mask_reader(LESION[:30, :30])
  variables = small.init(jax.random.key(0))
  maps = rng.normal(size=(2, 30, 30)).astype(np.float32)
  targets = jnp.array([1, 0])
  options = dict(num_steps=7, patch_size=4, replacement="baseline", baseline=0.25,
                 chunk_size=3)
  curve = jax.jit(lambda v, x, t, m: fa.perturbation_curve(small, v, x, t, m, mode=mode,
                                                            **options))(
      variables, images, targets, maps)
  fractions, scores = naive_curve(small, variables, images, targets, maps, mode=mode,
                                  num_steps=7, patch_size=4, fill=np.full(images.shape, 0.25))
  np.testing.assert_allclose(curve.fractions, fractions, rtol=1e-6)
  np.testing.assert_allclose(curve.scores, scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(curve.auc, np.trapezoid(scores, fractions, axis=-1), rtol=1e-5)
  assert curve.fractions[0] == 0 and curve.fractions[-1] == 1


def test_perfect_map_beats_a_random_order_on_a_model_reading_only_the_mask(reader,
                                                                         lesion_images):
  model, variables = reader
  targets = jnp.ones(4, jnp.int32)
  perfect = jnp.broadcast_to(jnp.asarray(LESION, jnp.float32), (4, SIZE, SIZE))
  shuffled = fa.random_maps(jax.random.key(3), perfect.shape)

  @jax.jit
  def aucs(maps):
    options = dict(num_steps=32, patch_size=2, replacement="baseline", baseline=0.0)
    return (fa.deletion_curve(model, variables, lesion_images, targets, maps, **options).auc,
            fa.insertion_curve(model, variables, lesion_images, targets, maps, **options).auc)

  deletion_perfect, insertion_perfect = aucs(perfect)
  deletion_random, insertion_random = aucs(shuffled)
  assert np.all(deletion_perfect < deletion_random - 0.2), (deletion_perfect, deletion_random)
  assert np.all(insertion_perfect > insertion_random + 0.2), (insertion_perfect,
                                                              insertion_random)


def test_blur_replacement_is_a_reflecting_gaussian_filter(lesion_images):
  blurred = fa.replacement_images(lesion_images, "blur", blur_sigma=2.0)
  expected = scipy.ndimage.gaussian_filter(np.asarray(lesion_images, np.float64),
                                           (0, 2.0, 2.0, 0), mode="reflect", truncate=4.0)
  np.testing.assert_allclose(blurred, expected, atol=1e-5)
  with pytest.raises(ValueError, match="replacement"):
    fa.replacement_images(lesion_images, "noise")


def test_probability_is_softmax_for_several_logits():
  logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(fa.target_probabilities(logits, jnp.array([1, 0])),
                             [expected[0, 1], expected[1, 0]], rtol=1e-6)
  np.testing.assert_allclose(fa.target_probabilities(logits[:, :1], jnp.array([1, 0])),
                             [1 / (1 + np.exp(-1.0)), 0.5], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rank correlation and randomisation.


def test_spearman_equals_scipy_with_ties():
  rng = np.random.default_rng(4)
  a = rng.integers(0, 6, (3, 9, 9)).astype(np.float32)
  b = (a + rng.integers(-3, 4, a.shape)).astype(np.float32)
  b[1] = -b[1]
  similarity = jax.jit(fa.map_similarity)(a, b)
  for i in range(3):
    np.testing.assert_allclose(similarity["spearman"][i],
                               scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic,
                               rtol=1e-5)
    np.testing.assert_allclose(
        similarity["spearman_abs"][i],
        scipy.stats.spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel()).statistic, rtol=1e-5)
  assert np.isnan(fa.spearman(jnp.ones(5), jnp.arange(5.0)))


FRESH_KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def small_cnn():
  """The tiny custom CNN, "trained" variables, fresh parameters of both kinds, fc8 re-drawn."""
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1), conv_widths=(4, 4, 4, 4, 4),
                                dense_widths=(8, 8), init_std=None)

  @jax.jit
  def build(key):
    # "Trained" weights: every parameter (biases start at zero) moved off its initial value.
    variables = model.init(key)
    moved = fa.fresh_parameters(model, variables, jax.random.fold_in(key, 1), how="normal",
                                scale=0.05)
    variables = {**variables, "params": jax.tree.map(jnp.add, variables["params"], moved)}
    fresh = {how: fa.fresh_parameters(model, variables, FRESH_KEY, how=how)
             for how in fa.REINIT_METHODS}
    return variables, fresh, fa.randomise_layers(model, variables, ["fc8"], FRESH_KEY)

  return (model, *build(jax.random.key(5)))


def by_layer(params: Any) -> dict[str, list[np.ndarray]]:
  """Leaves of a params tree grouped by their layer name."""
  grouped: dict[str, list[np.ndarray]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    grouped.setdefault("/".join(k.key for k in path[:-1]), []).append(np.asarray(leaf))
  return grouped


def replace_layers(params: Any, fresh: Any, names: set[str]) -> Any:
  """params with the leaves of the named layers taken from fresh (a plain tree walk)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, old, new: new if "/".join(k.key for k in path[:-1]) in names else old,
      params, fresh)


@pytest.mark.parametrize("mode", ["cascading", "independent"])
@pytest.mark.parametrize("how", ["init", "normal"])
def test_randomisation_changes_exactly_the_scheduled_layers(small_cnn, mode, how):
  model, variables, fresh, _ = small_cnn
  layers = fa.parameter_layers(model)
  assert layers == ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
  labels, schedule = fa.randomisation_schedule(layers, mode)
  assert labels == layers[::-1]
  leaf_layers = fa.leaf_layer_indices(variables["params"], layers)
  original = by_layer(variables["params"])
  for step, row in enumerate(schedule):
    expected = set(layers[-(step + 1):]) if mode == "cascading" else {layers[-(step + 1)]}
    assert {layers[i] for i in np.flatnonzero(row)} == expected
    randomised = by_layer(fa.select_layers(variables, fresh[how], leaf_layers, row)["params"])
    for name in layers:
      for before, after in zip(original[name], randomised[name]):
        if name in expected:
          assert np.all(before != after), (mode, step, name)
        else:
          np.testing.assert_array_equal(before.view(np.uint32), after.view(np.uint32))


def test_randomise_layers_uses_the_initialisers_and_rejects_unknown_layers(small_cnn):
  model, variables, fresh, randomised = small_cnn
  expected = replace_layers(variables["params"], fresh["init"], {"fc8"})
  jax.tree.map(np.testing.assert_array_equal, randomised["params"], expected)
  assert not np.array_equal(by_layer(variables["params"])["fc8"][1],
                            by_layer(randomised["params"])["fc8"][1])   # the kernel changed
  with pytest.raises(ValueError, match="fc9"):
    fa.randomise_layers(model, variables, ["fc9"], FRESH_KEY)


def test_randomisation_test_equals_explicit_per_step_maps_and_scipy(small_cnn):
  model, variables, fresh, _ = small_cnn
  images = jax.random.uniform(jax.random.key(9), (2, 48, 48, 1))
  targets = jnp.array([1, 0])
  explain = jax.jit(lambda v: gradients.vanilla_gradients(model.logits_fn(v), images, targets))
  layers = ("conv4", "fc6", "fc8")
  result = jax.jit(lambda v: fa.randomisation_test(model, v, explain, FRESH_KEY,
                                                   mode="cascading", layers=layers))(variables)
  assert result.layers == ("fc8", "fc6", "conv4")
  original = np.asarray(explain(variables))[..., 0]
  for step, reached in enumerate(result.layers):
    names = set(layers[layers.index(reached):])
    params = replace_layers(variables["params"], fresh["init"], names)
    maps = np.asarray(explain({**variables, "params": params}))[..., 0]
    for b in range(2):
      expected = scipy.stats.spearmanr(original[b].ravel(), maps[b].ravel()).statistic
      np.testing.assert_allclose(result.spearman[step, b], expected, rtol=1e-4, atol=1e-5)


def test_data_randomisation_scores_identical_and_unrelated_maps():
  rng = np.random.default_rng(11)
  maps = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
  same = fa.data_randomisation_scores(maps, maps)
  np.testing.assert_allclose(same["spearman"], 1.0, rtol=1e-6)
  other = fa.data_randomisation_scores(maps, rng.normal(size=maps.shape).astype(np.float32))
  assert np.all(np.abs(other["spearman"]) < 0.3)


# ---------------------------------------------------------------------------------------------
# Shortcut reliance and the bootstrap.


def test_marker_share_of_the_marker_mask_is_one_and_separates_readers():
  masks = np.stack([MARKER, MARKER])
  reliance = fa.marker_reliance(masks.astype(np.float32), masks)
  np.testing.assert_array_equal(reliance["per_image"], [1.0, 1.0])
  assert float(reliance["mean"]) == 1.0
  images = jax.random.uniform(jax.random.key(12), (2, SIZE, SIZE, 1))
  targets = jnp.ones(2, jnp.int32)
  shares = {}
  for name, mask in (("marker", MARKER), ("lesion", LESION)):
    model = mask_reader(mask)
    maps = gradients.vanilla_gradients(model.logits_fn(model.init(jax.random.key(0))), images,
                                       targets)
    for attribution in ("positive", "absolute"):
      shares[name, attribution] = float(fa.marker_reliance(maps, masks, attribution)["mean"])
  assert shares["marker", "positive"] == pytest.approx(1.0)
  assert shares["lesion", "positive"] == pytest.approx(0.0)
  assert shares["marker", "absolute"] == pytest.approx(1.0)


def test_marker_margin_widens_the_region():
  shifted = np.roll(MARKER, 2, axis=1)[None].astype(np.float32)   # 5 x 5 glyph moved 2 px right
  exact = fa.marker_reliance(shifted, MARKER[None])["per_image"]
  np.testing.assert_allclose(exact, [15 / 25])                    # 3 of its 5 columns overlap
  np.testing.assert_allclose(fa.marker_reliance(shifted, MARKER[None], margin=2)["per_image"],
                             [1.0])


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_samples():
  rng = np.random.default_rng(13)
  few = rng.normal(0.5, 0.2, 20)
  many = rng.normal(0.5, 0.2, 2000)
  narrow = fa.bootstrap_interval(many, seed=1)
  wide = fa.bootstrap_interval(np.append(few, np.nan), seed=1)
  assert wide.count == 20 and wide.mean == pytest.approx(few.mean())
  for interval in (narrow, wide):
    assert interval.low < interval.mean < interval.high
  assert (narrow.high - narrow.low) < 0.4 * (wide.high - wide.low)
  # The 95% interval of the mean is about +-1.96 sd / sqrt(n).
  assert narrow.high - narrow.low == pytest.approx(2 * 1.96 * many.std() / np.sqrt(2000), rel=0.15)
  assert fa.bootstrap_interval(many, seed=1) == narrow
  assert np.isnan(fa.bootstrap_interval([np.nan]).mean)


def test_defined_mean_skips_nan_and_is_nan_without_warning_where_nothing_is_defined():
  values = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    means = fa.defined_mean(values, axis=1)
    overall = fa.defined_mean(values)
  np.testing.assert_allclose(means[0], 2.0)
  assert np.isnan(means[1])
  np.testing.assert_allclose(overall, 2.0)


def test_leaderboard_tags_are_legal_tensorboard_names():
  from medxai_jax.analysis import evaluation
  interval = fa.Interval(0.5, 0.4, 0.6, 3)
  tags = evaluation.leaderboard_scalars({"ig": {"iou_top5%": interval, "auc": interval}})
  assert set(tags) == {"leaderboard/iou_top5pct/ig", "leaderboard/auc/ig"}
  assert all(re.fullmatch(r"[A-Za-z0-9_./-]+", tag) for tag in tags)
