"""Occlusion and RISE: a naive per-window loop, linear-model identities, Captum, chunking, RISE's
expectation, the input contract, and the explain registry.

The Captum comparison needs the `oracle` extra (torch + captum); it is skipped without them
unless MEDXAI_REQUIRE_ORACLES=1 (as in tests/models/test_porting.py).
"""

from __future__ import annotations

import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax import explain
from medxai_jax.attribution import perturbation
from medxai_jax.models import base

SHAPE = (12, 12, 2)
LINEAR_SHAPE = (6, 6, 2)


def _oracle(name: str):
  """The reference module; skipped when absent unless MEDXAI_REQUIRE_ORACLES=1."""
  if os.environ.get("MEDXAI_REQUIRE_ORACLES") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)


class TinyCNN(nn.Module):
  """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> global average -> dense (torch padding 1)."""

  num_outputs: int = 3
  width: int = 4

  def setup(self) -> None:
    self.conv1 = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="conv1")
    self.conv2 = nn.Conv(self.width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                         name="conv2")
    self.dense = nn.Dense(self.num_outputs, name="dense")

  def features(self, x: jax.Array, tap: str = "conv2", train: bool = False) -> jax.Array:
    del tap, train
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    del train
    return self.dense(feature_map.mean(axis=(1, 2)))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.features(x))


class Linear(nn.Module):
  """Logits = flattened image @ kernel + bias."""

  num_outputs: int = 3

  def setup(self) -> None:
    self.dense = nn.Dense(self.num_outputs, name="dense")

  def features(self, x: jax.Array, tap: str = "flat", train: bool = False) -> jax.Array:
    del tap, train
    return x.reshape((x.shape[0], -1))

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    del train
    return self.dense(feature_map)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.features(x))


def _wrap(module: nn.Module, input_shape, num_outputs: int) -> base.Classifier:
  tap = "conv2" if isinstance(module, TinyCNN) else "flat"
  return base.Classifier(module=module, taps=(tap,), aliases={"last_conv": tap},
                         input_shape=tuple(input_shape), num_outputs=num_outputs)


@pytest.fixture(scope="module")
def cnn():
  model = _wrap(TinyCNN(num_outputs=3), SHAPE, 3)
  variables = model.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, *SHAPE))
  return model, variables, images


def _linear(num_outputs: int, shape=LINEAR_SHAPE, seed: int = 0):
  model = _wrap(Linear(num_outputs=num_outputs), shape, num_outputs)
  variables = model.init(jax.random.key(seed))
  kernel = jax.random.normal(jax.random.key(seed + 1), variables["params"]["dense"]["kernel"].shape)
  variables = {"params": {"dense": {"kernel": kernel,
                                    "bias": jnp.arange(num_outputs, dtype=jnp.float32)}}}
  return model, variables


# ----------------------------------------------------------------------------- Occlusion


def _naive_starts(size: int, length: int, stride: int) -> list[int]:
  """Slide from 0 by `stride` until a window reaches the border (the last may be cut)."""
  starts = [0]
  while starts[-1] + length < size:
    starts.append(starts[-1] + stride)
  return starts


def _naive_occlusion(model, variables, images, targets, window, strides, baseline):
  """One forward pass per window, numpy slicing, a per-pixel counter."""
  images = np.asarray(images)
  total = np.zeros_like(images)
  counter = np.zeros(images.shape[1:])
  rows = np.arange(len(images))

  def score(x):
    logits = np.asarray(model.logits(variables, jnp.asarray(x)))
    return logits[rows, targets]

  original = score(images)
  (wh, ww, wc), (sh, sw, sc) = window, strides
  height, width, channels = images.shape[1:]
  for top in _naive_starts(height, wh, sh):
    for left in _naive_starts(width, ww, sw):
      for first in _naive_starts(channels, wc, sc):
        region = np.s_[:, top:top + wh, left:left + ww, first:first + wc]
        occluded = images.copy()
        occluded[region] = baseline
        difference = original - score(occluded)
        total[region] += difference[:, None, None, None]
        counter[region[1:]] += 1
  assert counter.min() >= 1
  return total / counter


@pytest.mark.parametrize("window, strides", [
    ((3, 3, 2), (2, 2, 2)),   # (12 - 3) % 2 != 0: the last window is cut at the border
    ((4, 4, 2), (4, 4, 1)),   # tiles exactly
    ((5, 3, 1), (3, 2, 1)),   # uneven in both axes, one channel at a time
    ((12, 2, 2), (5, 1, 1)),  # a window spanning the whole height: any stride
])
def test_occlusion_equals_a_naive_per_window_loop(cnn, window, strides):
  model, variables, images = cnn
  targets = np.asarray([0, 2])
  expected = _naive_occlusion(model, variables, images, targets, window, strides, 0.25)
  ours = perturbation.occlusion(model.logits_fn(variables), images, jnp.asarray(targets),
                                window=window, strides=strides, baseline=0.25, chunk_size=4)
  assert ours.shape == images.shape
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(ours).max()) > 1e-3


def test_window_positions_and_coverage_follow_captums_count():
  """ceil((D - w) / s) + 1 positions per axis; coverage counts windows per pixel, border cut."""
  shape, steps, counts = perturbation.occlusion_grid((12, 10, 3), (3, 4), (2, 3))
  assert shape == (3, 4, 3) and steps == (2, 3, 3) and counts == (6, 3, 1)
  coverage = perturbation.occlusion_coverage((12, 10, 3), (3, 4), (2, 3))
  per_row = [sum(start <= r < start + 3 for start in _naive_starts(12, 3, 2)) for r in range(12)]
  per_col = [sum(start <= c < start + 4 for start in _naive_starts(10, 4, 3)) for c in range(10)]
  np.testing.assert_array_equal(coverage[:, :, 0], np.outer(per_row, per_col))
  # Starts 0, 2, ..., 10: row 11 lies only in the window cut at the border, row 10 also in [8, 11).
  assert [coverage[r, 0, 0] for r in (0, 1, 10, 11)] == [1, 1, 2, 1]


def test_a_one_pixel_window_on_a_linear_model_is_weight_times_input():
  model, variables = _linear(3)
  images = jax.random.uniform(jax.random.key(5), (3, *LINEAR_SHAPE))
  targets = jnp.asarray([2, 0, 1])
  ours = perturbation.occlusion(model.logits_fn(variables), images, targets, window=(1, 1, 1),
                                strides=1, chunk_size=50)
  weights = variables["params"]["dense"]["kernel"].T.reshape(3, *LINEAR_SHAPE)[targets]
  np.testing.assert_allclose(ours, weights * images, rtol=1e-4, atol=1e-5)
  # A 1x1 window over both channels: each channel gets the pixel's sum over channels.
  spatial = perturbation.occlusion(model.logits_fn(variables), images, targets, window=1, strides=1)
  pixel_sums = (weights * images).sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(spatial, np.broadcast_to(pixel_sums, images.shape), rtol=1e-4,
                             atol=1e-5)


def test_one_logit_targets_are_the_logit_and_its_negation():
  model, variables = _linear(1)
  images = jax.random.uniform(jax.random.key(6), (2, *LINEAR_SHAPE))
  positive = perturbation.occlusion(model.logits_fn(variables), images, 1, window=(2, 2), strides=2)
  negative = perturbation.occlusion(model.logits_fn(variables), images, 0, window=(2, 2), strides=2)
  np.testing.assert_allclose(negative, -positive, rtol=1e-6, atol=1e-7)
  weights = variables["params"]["dense"]["kernel"][:, 0].reshape(LINEAR_SHAPE)
  block_sums = (weights * images).reshape(2, 3, 2, 3, 2, 2).sum(axis=(2, 4, 5))
  np.testing.assert_allclose(positive[..., 0], np.repeat(np.repeat(block_sums, 2, 1), 2, 2),
                             rtol=1e-4, atol=1e-5)


def test_occlusion_does_not_depend_on_the_chunk_size(cnn):
  model, variables, images = cnn
  results = [perturbation.occlusion(model.logits_fn(variables), images, "predicted", window=(3, 3),
                                    strides=2, chunk_size=size) for size in (1, 7, 1000)]
  for result in results[1:]:
    np.testing.assert_allclose(result, results[0], rtol=1e-6, atol=1e-7)


def test_an_array_baseline_replaces_each_pixel_by_its_own_value(cnn):
  """A per-pixel baseline [H, W, C]: the naive loop with the same array."""
  model, variables, images = cnn
  baseline = np.asarray(jax.random.uniform(jax.random.key(7), SHAPE))
  targets = np.asarray([1, 1])
  window, strides = (4, 4, 2), (3, 3, 2)
  images_np = np.asarray(images)
  total, counter = np.zeros_like(images_np), np.zeros(SHAPE)
  logits = lambda x: np.asarray(model.logits(variables, jnp.asarray(x)))[:, 1]  # noqa: E731
  for top in _naive_starts(12, 4, 3):
    for left in _naive_starts(12, 4, 3):
      occluded = images_np.copy()
      occluded[:, top:top + 4, left:left + 4] = baseline[top:top + 4, left:left + 4]
      total[:, top:top + 4, left:left + 4] += (logits(images_np) - logits(occluded))[:, None,
                                                                                    None, None]
      counter[top:top + 4, left:left + 4] += 1
  ours = perturbation.occlusion(model.logits_fn(variables), images, jnp.asarray(targets),
                                window=window, strides=strides, baseline=jnp.asarray(baseline))
  np.testing.assert_allclose(ours, total / counter, rtol=1e-5, atol=1e-6)


def _torch_twin(torch, flax_params):
  """The torch network of TinyCNN (NCHW) with the Flax weights copied in."""
  net = torch.nn.Sequential(
      torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
      torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
      torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731  (a writable copy)
  with torch.no_grad():
    for index, name in ((0, "conv1"), (2, "conv2")):
      net[index].weight.copy_(tensor(np.transpose(flax_params[name]["kernel"], (3, 2, 0, 1))))
      net[index].bias.copy_(tensor(flax_params[name]["bias"]))
    net[6].weight.copy_(tensor(np.asarray(flax_params["dense"]["kernel"]).T))
    net[6].bias.copy_(tensor(flax_params["dense"]["bias"]))
  return net


@pytest.mark.parametrize("window, strides, baseline", [
    ((3, 3), 2, 0.0),                 # Captum (2, 3, 3), stride 2: cut border windows
    ((4, 4), (4, 4), 0.5),            # Captum (2, 4, 4), strides (2, 4, 4): exact tiling
    ((2, 2, 1), (1, 1, 1), -0.3),     # Captum (1, 2, 2): one channel at a time
    ((5, 3), (3, 2), "array"),        # Captum (2, 5, 3), strides (2, 3, 2); a tensor baseline
])
def test_occlusion_matches_captum(cnn, window, strides, baseline):
  torch = _oracle("torch")
  captum_attr = _oracle("captum.attr")
  model, variables, images = cnn
  # Larger head weights: attributions of order 0.1-1, so the tolerance is a relative one too.
  params = jax.tree.map(np.asarray, variables["params"])
  params["dense"]["kernel"] = params["dense"]["kernel"] * 20.0
  variables = {"params": params}
  net = _torch_twin(torch, params)
  nchw = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    np.testing.assert_allclose(net(nchw).numpy(), model.logits(variables, images), atol=1e-5)
  if baseline == "array":
    baseline = np.asarray(jax.random.uniform(jax.random.key(8), SHAPE))
    torch_baseline = torch.from_numpy(baseline.transpose(2, 0, 1)[None].copy())
  else:
    torch_baseline = baseline
  shape, steps, _ = perturbation.occlusion_grid(SHAPE, window, strides)
  to_captum = lambda hwc: (hwc[2], hwc[0], hwc[1])  # noqa: E731
  targets = [2, 0]
  expected = captum_attr.Occlusion(net).attribute(
      nchw, sliding_window_shapes=to_captum(shape), strides=to_captum(steps),
      baselines=torch_baseline, target=targets, perturbations_per_eval=3)
  expected = expected.detach().numpy().transpose(0, 2, 3, 1)
  ours = perturbation.occlusion(model.logits_fn(variables), images, jnp.asarray(targets),
                                window=window, strides=strides, baseline=jnp.asarray(baseline), chunk_size=5)
  assert float(np.abs(expected).max()) > 0.05
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_occlusion_refuses_bad_windows_naming_the_axis(cnn):
  model, variables, images = cnn
  cases = [(dict(window=(13, 3)), "exceeds the image (12, 12, 2) along height: 13 > 12"),
           (dict(window=(3, 3), strides=(2, 4)), "stride 4 along width is larger than the "
                                                  "window (3)"),
           (dict(window=(3, 0)), "along width"),
           (dict(window=(3, 3, 1, 1)), "must be an int, (h, w) or (h, w, c)"),
           (dict(window=(3, 3), strides=(1, 1, 1, 1)), "strides must be an int")]
  for options, message in cases:
    with pytest.raises(ValueError) as error:
      perturbation.occlusion(model.logits_fn(variables), images, 0, **options)
    assert message in str(error.value), str(error.value)


# ----------------------------------------------------------------------------- RISE


def test_rise_equals_a_naive_loop_over_the_same_masks(cnn):
  model, variables, images = cnn
  key, targets = jax.random.key(3), np.asarray([1, 2])
  masks = np.asarray(perturbation.rise_masks(key, 24, 12, 12, cell_size=4, p_keep=0.4))
  expected = np.zeros(images.shape[:3])
  for mask in masks:
    logits = np.asarray(model.logits(variables, images * mask[None, :, :, None]))
    expected += logits[np.arange(2), targets][:, None, None] * mask[None]
  expected /= 24 * 0.4
  ours = perturbation.rise(model.logits_fn(variables), images, jnp.asarray(targets), key=key,
                           num_masks=24, cell_size=4, p_keep=0.4, chunk_size=5)
  assert ours.shape == images.shape[:3]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_rise_masks_are_smooth_cells_with_mean_p_keep():
  masks = np.asarray(perturbation.rise_masks(jax.random.key(4), 3000, 16, 16, cell_size=4,
                                             p_keep=0.3))
  assert masks.shape == (3000, 16, 16) and masks.min() >= 0 and masks.max() <= 1
  # Bilinear upsampling of Bernoulli(p) cells: every pixel has mean p (std 0.46 / sqrt(3000)).
  np.testing.assert_allclose(masks.mean(axis=0), 0.3, atol=0.04)
  assert len({m.tobytes() for m in masks[:50]}) == 50           # every mask differs
  assert np.abs(np.diff(masks, axis=1)).max() <= 1 / 4 + 1e-6   # at most one cell per 4 pixels


def test_rise_is_unbiased_on_a_linear_model():
  """S(x * M) = w x_j M_j + b for a model reading one pixel j: E[R(i)] = w x_j p + b at pixels
  two cells or more from j (independent mask values), and b + w x_j E[M_j^2] / p at j."""
  shape = (16, 16, 1)
  model, variables = _linear(1, shape)
  weight, bias = 2.0, 0.5
  kernel = jnp.zeros((16 * 16, 1)).at[16 * 1 + 1, 0].set(weight)
  variables = {"params": {"dense": {"kernel": kernel, "bias": jnp.asarray([bias])}}}
  images = jnp.ones((1, *shape))
  p_keep, cell = 0.5, 4
  saliency = np.asarray(perturbation.rise(model.logits_fn(variables), images, 1,
                                          key=jax.random.key(9), num_masks=4000, cell_size=cell, p_keep=p_keep,
                                          chunk_size=500))[0]
  far = saliency[2 * cell + 1:, 2 * cell + 1:]
  np.testing.assert_allclose(far.mean(), weight * p_keep + bias, rtol=0.03)
  np.testing.assert_allclose(far, weight * p_keep + bias, rtol=0.15)
  masks = np.asarray(perturbation.rise_masks(jax.random.key(10), 4000, 16, 16, cell_size=cell,
                                             p_keep=p_keep))
  at_pixel = bias + weight * np.mean(masks[:, 1, 1] ** 2) / p_keep
  np.testing.assert_allclose(saliency[1, 1], at_pixel, rtol=0.05)


def test_rise_does_not_depend_on_the_chunk_size(cnn):
  model, variables, images = cnn
  results = [perturbation.rise(model.logits_fn(variables), images, 0, key=jax.random.key(11),
                               num_masks=12, cell_size=3, chunk_size=size) for size in (1, 5, 12)]
  for result in results[1:]:
    np.testing.assert_allclose(result, results[0], rtol=1e-5, atol=1e-6)


def test_rise_refuses_bad_options(cnn):
  model, variables, images = cnn
  for options, message in [(dict(p_keep=0.0), "p_keep"), (dict(p_keep=1.5), "p_keep"),
                           (dict(num_masks=0), "num_masks"), (dict(cell_size=0), "cell_size")]:
    with pytest.raises(ValueError, match=message):
      perturbation.rise(model.logits_fn(variables), images, 0, key=jax.random.key(0), **options)


# ----------------------------------------------------------------------------- the contract


METHODS = {
    "occlusion": lambda m, v, x, t: perturbation.occlusion(m.logits_fn(v), x, t, window=(3, 3),
                                                           strides=3),
    "rise": lambda m, v, x, t: perturbation.rise(m.logits_fn(v), x, t, key=jax.random.key(0),
                                                 num_masks=2, cell_size=4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_input_contract_is_enforced(name, cnn):
  model, variables, images = cnn
  method = METHODS[name]
  with pytest.raises(ValueError, match=r"target 3 \(targets\[1\]\) is out of range.*\[0, 3\)"):
    method(model, variables, images, jnp.asarray([0, 3], jnp.int32))
  with pytest.raises(ValueError, match=r"images\[1\] has non-finite values \(NaN at row 4"):
    method(model, variables, images.at[1, 4, 5, 0].set(jnp.nan), 0)
  with pytest.raises(ValueError, match=r"dtype uint8.*\[0, 1\]"):
    method(model, variables, np.zeros((2, *SHAPE), np.uint8), 0)
  with pytest.raises(ValueError, match=r"empty batch"):
    method(model, variables, images[:0], jnp.zeros(0, jnp.int32))


def test_registered_in_explain_with_the_options(cnn):
  model, variables, images = cnn
  overrides = {"occlusion": {"window": 4, "strides": 2}, "rise": {"num_masks": 8},
               "chunk_size": 3}
  assert perturbation.grid_cell_size(images.shape, perturbation.RISE_GRID) == 2  # ceil(12 / 7)
  targets = jnp.asarray([0, 1])
  key = jax.random.key(12)
  maps, info = explain.run_methods(model, variables, images, targets, ["occlusion", "rise"],
                                   key, overrides)
  np.testing.assert_allclose(maps["occlusion"], perturbation.occlusion(
      model.logits_fn(variables), images, targets, window=4, strides=2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps["rise"], perturbation.rise(
      model.logits_fn(variables), images, targets, key=jax.random.fold_in(key, 1), num_masks=8,
      cell_size=2), rtol=1e-5, atol=1e-6)
  assert info["occlusion"]["options"]["window"] == 4
  assert info["rise"]["options"]["chunk_size"] == 3
  assert info["rise"]["seconds_per_image"] > 0


@pytest.mark.slow
def test_occlusion_matches_captum_on_a_real_chest_xray_with_a_ported_densenet(tmp_path):
  """A real 8-bit chest X-ray (COVID-19 Radiography Database, Normal) at 48x48, a torchvision
  DenseNet with random weights ported by `porting.port_torchvision`: occlusion with cut border
  windows ((48 - 8) % 6 != 0) agrees with Captum to the porting tolerance."""
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  captum_attr = _oracle("captum.attr")
  import real_data
  from PIL import Image
  from medxai_jax.models import densenet
  from medxai_jax.models import porting
  copy = real_data.copy_real("covid/COVID-19_Radiography_Dataset", tmp_path / "covid",
                             keep=["Normal/images/Normal-1.jpg"])
  side = 48
  with Image.open(copy / "Normal/images/Normal-1.jpg") as image:
    gray = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), np.float32) / 255
  images = np.repeat(((gray - 0.5) / 0.25)[None, :, :, None], 3, axis=-1)
  torch.manual_seed(0)
  net = torchvision.models.DenseNet(growth_rate=8, block_config=(1, 1, 1, 1),
                                    num_init_features=16, num_classes=2).eval()
  torch.save(net.state_dict(), tmp_path / "densenet.pth")
  model = densenet.densenet(num_outputs=2, head="softmax", input_shape=(side, side, 3),
                            block_sizes=(1, 1, 1, 1), growth_rate=8, stem_width=16,
                            bn_epsilon=porting.BN_EPSILON["torchvision"])
  variables, report = porting.port_torchvision(model, jax.jit(model.init)(jax.random.key(0)),
                                               str(tmp_path / "densenet.pth"))
  assert report.kept_from_init == ["classifier/predictions"]  # a 2-class head is not ported
  params = dict(variables["params"])
  params["classifier"] = {**params["classifier"], "predictions": {
      "kernel": jnp.asarray(net.classifier.weight.detach().numpy().T),
      "bias": jnp.asarray(net.classifier.bias.detach().numpy())}}
  variables = {**variables, "params": params}
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    np.testing.assert_allclose(net(nchw).numpy(), jax.jit(model.logits)(variables, images),
                               atol=1e-4)
    expected = captum_attr.Occlusion(net).attribute(
        nchw, sliding_window_shapes=(3, 8, 8), strides=(3, 6, 6), baselines=0.0, target=1,
        perturbations_per_eval=16).numpy().transpose(0, 2, 3, 1)
  ours = jax.jit(lambda v, x: perturbation.occlusion(model.logits_fn(v), x, jnp.asarray([1]),
                                                     window=8, strides=6, chunk_size=16))(
      variables, jnp.asarray(images))
  scale = float(np.abs(expected).max())
  assert scale > 0
  np.testing.assert_allclose(ours, expected, atol=1e-4 * scale)
