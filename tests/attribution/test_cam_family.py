"""The CAM family: closed forms on a GAP + dense head, naive loops, float64, bad inputs, and
pytorch-grad-cam 1.5.7 on ported torchvision weights.

The oracle comparisons need the `oracle` extra (torch, torchvision, grad-cam); they are skipped
without it unless MEDXAI_REQUIRE_ORACLES=1 (as in tests/models/test_porting.py). They port a
randomly initialised torchvision DenseNet (DenseNet-121's layer types, block sizes (2, 1, 2, 1),
growth rate 8, 16 stem channels, to keep the suite fast; grad-cam's layer norm5, our
'last_conv') and VGG16 (torchvision's convolutions with the project's GAP head; the gradient
methods at the head's ReLU, Score- and Ablation-CAM at the block-1 pool to bound the torch side's
masked forwards). The full DenseNet-121 (all methods) and VGG16 (gradient methods and EigenCAM,
224 px) comparisons are in benchmarks/cam_family.py. Float32; raw maps agree to
RAW_TOLERANCE relative to each map's maximum (ABLATION_RAW_TOLERANCE for Ablation-CAM), normalised
upsampled maps to NORMALISED_TOLERANCE.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from benchmarks import common as bench_common
from medxai_jax.attribution import api
from medxai_jax.attribution import cam_family
from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax.models import vgg

RAW_TOLERANCE = 2e-4
# Ablation-CAM's weights (S - S^k) / S difference two nearly equal float32 scores, which
# amplifies the frameworks' rounding differences (2.2e-4 measured at VGG16's block-1 pool).
ABLATION_RAW_TOLERANCE = 1e-3
NORMALISED_TOLERANCE = 1e-3
GRADIENT_METHODS = ("grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam")


def _oracle(name: str):
  """The reference module; skipped when absent unless MEDXAI_REQUIRE_ORACLES=1."""
  if os.environ.get("MEDXAI_REQUIRE_ORACLES") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)


# ----------------------------------------------------------------------------- a tiny network


def _conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tiny_weights(dtype=np.float32, channels: int = 5, classes: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {"conv": rng.normal(size=(3, 3, 2, channels)).astype(dtype),
          "conv_bias": rng.normal(0.2, 0.3, size=channels).astype(dtype),
          "dense": rng.normal(size=(channels, classes)).astype(dtype),
          "bias": rng.normal(size=classes).astype(dtype),
          "hidden": rng.normal(size=(channels, 4)).astype(dtype),
          "out": rng.normal(size=(4, classes)).astype(dtype)}


def _tiny_features(weights):
  return lambda images: jax.nn.relu(_conv(images, weights["conv"]) + weights["conv_bias"])


def _gap_dense_split(weights) -> api.Split:
  """conv -> ReLU | global average pool -> dense: CAM's architecture."""
  return api.sequential_split(_tiny_features(weights),
                              lambda a: a.mean(axis=(1, 2)) @ weights["dense"] + weights["bias"])


def _nonlinear_split(weights) -> api.Split:
  """conv -> ReLU | cell-wise dense -> tanh -> mean -> dense (not affine in the activation)."""
  head = lambda a: jnp.tanh(a @ weights["hidden"]).mean(axis=(1, 2)) @ weights["out"]
  return api.sequential_split(_tiny_features(weights), head)


def _tiny_images(dtype=np.float32, batch: int = 2, size: int = 6, seed: int = 1):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 2)).astype(dtype)


def _cam(weights, images, targets):
  """CAM (Zhou et al. eq. 2): sum_k w_k^c A^k, computed directly."""
  activation = np.asarray(_tiny_features(weights)(images), np.float64)
  return np.einsum("bhwk,kb->bhw", activation, np.asarray(weights["dense"])[:, targets])


TARGETS = np.array([2, 0])


def test_hires_and_xgrad_cam_equal_cam_over_cells_for_a_gap_dense_head():
  weights, images = _tiny_weights(), _tiny_images()
  split = _gap_dense_split(weights)
  cells = images.shape[1] * images.shape[2]
  expected = _cam(weights, images, TARGETS) / cells
  for method in (cam_family.hires_cam, cam_family.xgrad_cam):
    maps = method(split, jnp.asarray(images), TARGETS, relu=False, upsample=False)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5, err_msg=method.__name__)
    relu_maps = method(split, jnp.asarray(images), TARGETS, upsample=False)
    np.testing.assert_allclose(relu_maps, np.maximum(expected, 0), rtol=1e-4, atol=1e-5)


def test_layer_cam_keeps_the_positive_class_weights_of_a_gap_dense_head():
  weights, images = _tiny_weights(), _tiny_images()
  activation = np.asarray(_tiny_features(weights)(images))
  positive = np.maximum(weights["dense"], 0)[:, TARGETS]                   # [K, B]
  expected = np.einsum("bhwk,kb->bhw", activation, positive) / 36
  maps = cam_family.layer_cam(_gap_dense_split(weights), jnp.asarray(images), TARGETS,
                              relu=False, upsample=False)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_plus_plus_closed_form_for_a_gap_dense_head():
  # The gradient is w_k / (h w) at every cell, so eq. 19 has a closed form per channel.
  weights, images = _tiny_weights(), _tiny_images()
  activation = np.asarray(_tiny_features(weights)(images), np.float64)
  g = np.asarray(weights["dense"], np.float64)[:, TARGETS].T / 36            # [B, K]
  sums = activation.sum(axis=(1, 2))
  alpha = np.where(g != 0, g**2 / (2 * g**2 + sums * g**3 + 1e-6), 0)
  channel_weights = 36 * alpha * np.maximum(g, 0)
  expected = np.einsum("bhwk,bk->bhw", activation, channel_weights)
  maps = cam_family.grad_cam_plus_plus(_gap_dense_split(weights), jnp.asarray(images), TARGETS,
                                       relu=False, upsample=False)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_ablation_cam_matches_a_naive_loop_over_channels_for_every_chunk_size():
  weights, images = _tiny_weights(), _tiny_images()
  split = _nonlinear_split(weights)
  activation = np.asarray(split.features(jnp.asarray(images)), np.float64)
  head = lambda a: np.asarray(split.head(jnp.asarray(a, jnp.float32), None), np.float64)
  rows = np.arange(len(TARGETS))
  original = head(activation)[rows, TARGETS]
  channel_weights = np.zeros((2, activation.shape[-1]))
  for k in range(activation.shape[-1]):
    ablated = activation.copy()
    ablated[..., k] = 0.0
    channel_weights[:, k] = (original - head(ablated)[rows, TARGETS]) / original
  expected = np.maximum(np.einsum("bhwk,bk->bhw", activation, channel_weights), 0)
  chunk_sizes = (1, 2, 5, 64)   # one channel, a padded last chunk, all channels, more than all
  run = jax.jit(lambda x: [cam_family.ablation_cam(split, x, TARGETS, upsample=False,
                                                   chunk_size=size) for size in chunk_sizes])
  for chunk_size, maps in zip(chunk_sizes, run(jnp.asarray(images))):
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5, err_msg=str(chunk_size))


def test_score_cam_matches_a_naive_loop_over_channels():
  weights = _tiny_weights()
  images = _tiny_images(size=8)
  split = _nonlinear_split(weights)
  activation = np.asarray(split.features(jnp.asarray(images)), np.float64)
  # A strided feature map so the masks are really upsampled.
  strided = api.Split(features=lambda x: split.features(x)[:, ::2, ::2], head=split.head)
  small = activation[:, ::2, ::2]                                            # [B, 4, 4, K]
  logits = lambda x: np.asarray(strided.logits(jnp.asarray(x, jnp.float32)), np.float64)
  rows = np.arange(len(TARGETS))
  scores = np.zeros((2, small.shape[-1]))
  for k in range(small.shape[-1]):
    # grid_mode=False: corner cells map onto corner pixels (align_corners=True).
    up = np.stack([scipy.ndimage.zoom(channel, 2.0, order=1, grid_mode=False)
                   for channel in small[..., k]])
    low = up.min(axis=(1, 2), keepdims=True)
    mask = (up - low) / (up.max(axis=(1, 2), keepdims=True) - low + 1e-8)
    scores[:, k] = logits(images * mask[..., None])[rows, TARGETS]
  softmax = np.exp(scores - scores.max(axis=1, keepdims=True))
  softmax /= softmax.sum(axis=1, keepdims=True)
  expected = np.maximum(np.einsum("bhwk,bk->bhw", small, softmax), 0)
  for chunk_size in (1, 3, 16):
    maps = cam_family.score_cam(strided, jnp.asarray(images), TARGETS, upsample=False,
                                chunk_size=chunk_size)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6, err_msg=str(chunk_size))


def test_upsample_channels_half_pixel_equals_jax_image_resize():
  activation = _tiny_images(batch=2, size=3)                                 # [2, 3, 3, 2]
  ours = cam_family.upsample_channels(jnp.asarray(activation), (7, 9), align_corners=False)
  expected = jax.image.resize(activation, (2, 7, 9, 2), method="bilinear")
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_eigen_cam_is_the_centred_first_principal_component():
  rng = np.random.default_rng(3)
  u = rng.normal(size=(2, 4, 5))
  v = rng.normal(size=(2, 6))
  offsets = rng.normal(size=(2, 6))
  activation = u[..., None] * v[:, None, None, :] + offsets[:, None, None, :]   # rank 1 + const
  projection = np.asarray(cam_family.first_principal_projection(jnp.asarray(activation,
                                                                            jnp.float32)))
  centred = u - u.mean(axis=(1, 2), keepdims=True)
  expected = centred * np.linalg.norm(v, axis=1)[:, None, None]
  np.testing.assert_allclose(np.abs(projection), np.abs(expected), rtol=1e-3, atol=1e-4)
  corrected = np.asarray(cam_family.first_principal_projection(
      jnp.asarray(activation, jnp.float32), sign_correction=True))
  for image in range(2):
    sign = np.sign(np.sum(projection[image] * expected[image]))
    np.testing.assert_allclose(projection[image], sign * expected[image], rtol=1e-3, atol=1e-4)
    flipped = abs(expected[image].min()) > abs(expected[image].max())
    np.testing.assert_allclose(corrected[image], -expected[image] if flipped else expected[image],
                               rtol=1e-3, atol=1e-4)
  maps = cam_family.eigen_cam(api.sequential_split(lambda x: x, lambda a: a.sum((1, 2))),
                              jnp.asarray(activation, jnp.float32), upsample=False)
  np.testing.assert_allclose(maps, np.maximum(projection, 0), rtol=1e-5, atol=1e-6)


def test_normalise_maps_is_min_max_per_image():
  maps = jnp.asarray([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]])
  np.testing.assert_allclose(cam_family.normalise_maps(maps),
                             [[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]], atol=1e-6)


def test_every_method_runs_in_float64_and_upsamples_its_relu_map():
  with jax.enable_x64(True):
    weights, images = _tiny_weights(np.float64), _tiny_images(np.float64)
    large = _tiny_images(np.float64, size=12, seed=2)
    split = _gap_dense_split(weights)
    strided = api.Split(features=lambda x: split.features(x)[:, ::2, ::2], head=split.head)
    expected = _cam(weights, images, TARGETS) / 36

    @jax.jit
    def run(x, x_large):
      methods = {name: functools.partial(getattr(cam_family, name), strided, x_large, TARGETS)
                 for name in (*GRADIENT_METHODS, "score_cam", "ablation_cam")}
      methods["eigen_cam"] = functools.partial(cam_family.eigen_cam, strided, x_large)
      maps = {name: (fn(), fn(upsample=False)) for name, fn in methods.items()}
      hires = cam_family.hires_cam(split, x, TARGETS, relu=False, upsample=False)
      return maps, hires, cam_family.normalise_maps(maps["eigen_cam"][0])

    maps, hires, normalised = run(jnp.asarray(images), jnp.asarray(large))
    assert hires.dtype == jnp.float64
    np.testing.assert_allclose(hires, expected, rtol=1e-12, atol=1e-14)
    assert normalised.dtype == jnp.float64 and normalised.min() == 0 and normalised.max() <= 1
    for name, (upsampled, raw) in maps.items():
      assert upsampled.dtype == raw.dtype == jnp.float64 and upsampled.shape == (2, 12, 12), name
      assert raw.shape == (2, 6, 6) and raw.min() >= 0 and raw.max() > 0, name
      np.testing.assert_allclose(upsampled, jax.image.resize(raw, (2, 12, 12), "bilinear"),
                                 rtol=1e-12, atol=1e-14, err_msg=name)


def test_bad_inputs_raise_errors_that_name_them():
  weights, images = _tiny_weights(), jnp.asarray(_tiny_images())
  split = _gap_dense_split(weights)
  for method in (cam_family.score_cam, cam_family.ablation_cam):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer; got 0"):
      method(split, images, TARGETS, chunk_size=0)
  flat = api.sequential_split(lambda x: x.reshape(x.shape[0], -1), lambda a: a[:, :3])
  for name in (*GRADIENT_METHODS, "score_cam", "ablation_cam"):
    with pytest.raises(ValueError, match=r"spatial activation \[B, h, w, K\].*\(2, 72\)"):
      getattr(cam_family, name)(flat, images, TARGETS)
  with pytest.raises(ValueError, match=r"targets\[1\]"):
    cam_family.hires_cam(split, images, np.array([0, 3]))
  with pytest.raises(ValueError, match="maps must be a batch"):
    cam_family.normalise_maps(jnp.zeros(4))


# ----------------------------------------------------------------------------- pytorch-grad-cam


@pytest.fixture(scope="module")
def one_torch_thread():
  """torch on one thread while the oracles run (its spinning threads cost more than they save
  on these small inputs), restored afterwards."""
  torch = _oracle("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _zeros_like_init(model):
  """Variables of the model's shapes (every leaf then comes from the port)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def _grad_cam_maps(pytorch_grad_cam, method_class, net, layer, images, targets, **attributes):
  """grad-cam's normalised upsampled maps and its raw maps (after its ReLU) [B, h, w]."""
  torch = importlib.import_module("torch")
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
  raw = []
  with method_class(model=net, target_layers=[layer]) as explainer:
    for name, value in attributes.items():
      setattr(explainer, name, value)
    original = explainer.get_cam_image

    def recording_get_cam_image(*args, **kwargs):
      raw.append(original(*args, **kwargs))
      return raw[-1]

    explainer.get_cam_image = recording_get_cam_image
    inputs = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    normalised = explainer(inputs, [ClassifierOutputTarget(int(t)) for t in targets])
  return np.asarray(normalised), np.maximum(np.asarray(raw[0]), 0)


def _our_maps(model, variables, tap, images, targets, methods: dict):
  """Every method's raw maps in one jitted call (the variables are arguments, not constants),
  and their bilinear upsampling, which is what upsample=True returns
  (test_every_method_runs_in_float64_and_upsamples_its_relu_map checks that)."""

  @jax.jit
  def run(variables, x):
    split = model.split(variables, tap)
    return {name: fn(split, x, targets, upsample=False) for name, fn in methods.items()}

  raw = run(variables, jnp.asarray(images))
  return {name: (np.asarray(maps), np.asarray(cam_family.upsample_maps(maps, images.shape[1:3])))
          for name, maps in raw.items()}


def _our_methods(prefix_options: dict | None = None) -> dict:
  options = prefix_options or {}
  methods = {name: functools.partial(getattr(cam_family, name), **options.get(name, {}))
             for name in (*GRADIENT_METHODS, "score_cam", "ablation_cam")}
  methods["eigen_cam"] = lambda split, x, targets, **kw: cam_family.eigen_cam(split, x, **kw)
  return methods


GRAD_CAM_CLASSES = {"grad_cam_plus_plus": "GradCAMPlusPlus", "xgrad_cam": "XGradCAM",
                    "hires_cam": "HiResCAM", "layer_cam": "LayerCAM", "score_cam": "ScoreCAM",
                    "ablation_cam": "AblationCAM", "eigen_cam": "EigenCAM"}


def _errors(theirs, ours, method: str) -> tuple[float, float]:
  """(raw error relative to grad-cam's map maximum, max normalised-map error) of one method."""
  (their_normalised, their_raw), (our_raw, our_upsampled) = theirs, ours
  assert our_raw.shape == their_raw.shape, (method, our_raw.shape, their_raw.shape)
  scale = np.abs(their_raw).max(axis=(1, 2), keepdims=True)
  assert np.all(scale > 0), f"{method}: grad-cam's raw map is all zero; the case tests nothing"
  raw_error = float(np.max(np.abs(our_raw - their_raw) / scale))
  normalised_error = float(np.max(np.abs(cam_family.normalise_maps(our_upsampled)
                                         - their_normalised)))
  return raw_error, normalised_error


def _raw_tolerance(method: str) -> float:
  return ABLATION_RAW_TOLERANCE if method == "ablation_cam" else RAW_TOLERANCE


@pytest.fixture(scope="module")
def densenet_case(tmp_path_factory, one_torch_thread):
  """A torchvision DenseNet (DenseNet-121's layers, blocks (2, 1, 2, 1)) ported; both libraries'
  maps at norm5 / 'last_conv' for every method, 96 px, two images."""
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  pytorch_grad_cam = _oracle("pytorch_grad_cam")
  torch.manual_seed(0)
  net = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 1, 2, 1),
                                    num_init_features=16, num_classes=1000).eval()
  bench_common.randomise_torch_model(torch, net, 1)
  path = str(tmp_path_factory.mktemp("cam_family") / "densenet.pth")
  torch.save(net.state_dict(), path)
  model = densenet.densenet(num_outputs=1000, head="softmax", input_shape=(96, 96, 3),
                            block_sizes=(2, 1, 2, 1), growth_rate=8, stem_width=16,
                            bn_epsilon=porting.BN_EPSILON["torchvision"])
  variables, report = porting.port_torchvision(model, _zeros_like_init(model), path)
  assert not report.kept_from_init
  images = np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32)
  targets = np.asarray(api.predicted_classes(jax.jit(model.logits)(variables, images)))
  methods = _our_methods({"grad_cam_plus_plus": {"pre_relu_gradients": True}})
  methods["grad_cam_plus_plus_post_relu"] = cam_family.grad_cam_plus_plus
  ours = _our_maps(model, variables, "last_conv", images, targets, methods)
  theirs = {name: _grad_cam_maps(pytorch_grad_cam, getattr(pytorch_grad_cam, cls), net,
                                 net.features[-1], images, targets)
            for name, cls in GRAD_CAM_CLASSES.items()}
  return ours, theirs


@pytest.fixture(scope="module")
def vgg_case(tmp_path_factory, one_torch_thread):
  """torchvision VGG16's convolutions + the project's GAP head, in both frameworks; gradient and
  Eigen maps at the head's ReLU ('last_conv', 2x2 at 32 px, two images), Score/Ablation at the
  block-1 pool (8x8 at 16 px, one image: 64 masked forwards of VGG16 per method and library)."""
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  pytorch_grad_cam = _oracle("pytorch_grad_cam")
  torch.manual_seed(0)
  backbone = torchvision.models.vgg16(weights=None).eval()
  bench_common.randomise_torch_model(torch, backbone, 2)
  gap_conv, dense = torch.nn.Conv2d(512, 512, 3, padding=1), torch.nn.Linear(512, 5)
  bench_common.randomise_torch_model(torch, torch.nn.Sequential(gap_conv, dense), 3)
  relu = torch.nn.ReLU()
  net = torch.nn.Sequential(backbone.features[:30], gap_conv, relu, torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), dense).eval()
  path = str(tmp_path_factory.mktemp("cam_family") / "vgg16.pth")
  torch.save(backbone.state_dict(), path)
  results = {}
  for size, batch, tap, layer, names in (
      (32, 2, "last_conv", relu, (*GRADIENT_METHODS, "eigen_cam")),
      (16, 1, "block1", backbone.features[4], ("score_cam", "ablation_cam"))):
    model = vgg.vgg16(num_outputs=5, head="gap", input_shape=(size, size, 3))
    variables, report = porting.port_torchvision(model, _zeros_like_init(model), path)
    assert sorted(report.kept_from_init) == ["gap_conv", "predictions"]
    params = dict(variables["params"])
    params["gap_conv"] = {"kernel": gap_conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                          "bias": gap_conv.bias.detach().numpy()}
    params["predictions"] = {"kernel": dense.weight.detach().numpy().T,
                             "bias": dense.bias.detach().numpy()}
    variables = {**variables, "params": params}
    images = np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)
    targets = np.asarray(api.predicted_classes(jax.jit(model.logits)(variables, images)))
    methods = {name: fn for name, fn in _our_methods().items() if name in names}
    ours = _our_maps(model, variables, tap, images, targets, methods)
    for name in names:
      theirs = _grad_cam_maps(pytorch_grad_cam, getattr(pytorch_grad_cam, GRAD_CAM_CLASSES[name]),
                              net, layer, images, targets)
      results[name] = (theirs, ours[name])
  return results


@pytest.mark.parametrize("method", list(GRAD_CAM_CLASSES))
def test_densenet_maps_match_pytorch_grad_cam_at_norm5(densenet_case, method):
  ours, theirs = densenet_case
  raw_error, normalised_error = _errors(theirs[method], ours[method], method)
  assert raw_error <= _raw_tolerance(method), f"{method}: raw maps differ by {raw_error:.2e}"
  assert normalised_error <= NORMALISED_TOLERANCE, (
      f"{method}: normalised upsampled maps differ by {normalised_error:.2e}")


def test_grad_cam_plus_plus_needs_pre_relu_gradients_to_match_grad_cam_at_norm5(densenet_case):
  ours, theirs = densenet_case
  their_raw = theirs["grad_cam_plus_plus"][1]
  post_relu_raw = ours["grad_cam_plus_plus_post_relu"][0]
  error = np.max(np.abs(post_relu_raw - their_raw) / np.abs(their_raw).max())
  assert error > 100 * RAW_TOLERANCE, error


@pytest.mark.parametrize("method", list(GRAD_CAM_CLASSES))
def test_vgg16_maps_match_pytorch_grad_cam(vgg_case, method):
  theirs, ours = vgg_case[method]
  raw_error, normalised_error = _errors(theirs, ours, method)
  assert raw_error <= _raw_tolerance(method), f"{method}: raw maps differ by {raw_error:.2e}"
  assert normalised_error <= NORMALISED_TOLERANCE, (
      f"{method}: normalised upsampled maps differ by {normalised_error:.2e}")


def test_align_corners_upsampling_matches_torch():
  torch = _oracle("torch")
  activation = np.random.default_rng(4).normal(size=(2, 3, 4, 5)).astype(np.float32)
  inputs = torch.from_numpy(activation.transpose(0, 3, 1, 2).copy())
  for align_corners in (True, False):
    expected = torch.nn.functional.interpolate(inputs, size=(7, 10), mode="bilinear",
                                               align_corners=align_corners)
    ours = cam_family.upsample_channels(jnp.asarray(activation), (7, 10),
                                        align_corners=align_corners)
    np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), atol=1e-5)
