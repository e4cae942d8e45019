"""Proof of agnosticism: the logits-only methods explain functions the project did not build.

Three scoring functions, each written here without the project's model code: a plain `jnp`
linear function, a Flax NNX CNN and an Equinox CNN (channels-first inside, vmapped over the
batch). Every logits-only method explains each, and the assertions are properties that could
fail: on the linear function the closed forms (gradient = weights, IG = (x - x') w, the
occlusion score drop, RISE's mask-weighted sum, XRAI's IG part over its black and white
baselines); on the CNNs IG's completeness, Guided IG at
max_dist = 0 equal to a left Riemann IG, gradients against finite differences, SmoothGrad
without noise equal to the gradient, and occlusion / RISE against naive loops calling the
function directly.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medxai_jax.attribution import activations
from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import crm
from medxai_jax.attribution import gradients
from medxai_jax.attribution import integrated
from medxai_jax.attribution import perturbation
from medxai_jax.attribution import xrai

SHAPE = (8, 8, 2)
CLASSES = 3
TARGETS = np.asarray([0, 2])


def _images(seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (2, *SHAPE), minval=-1.0, maxval=1.0)


# ------------------------------------------------------------------------- the three functions


def _linear_parts():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
  bias = rng.normal(size=CLASSES).astype(np.float32)
  return kernel, bias


def plain_linear():
  """logits = flatten(x) @ W + b, a closure over numpy weights: no framework at all."""
  kernel, bias = _linear_parts()
  return lambda images: images.reshape((images.shape[0], -1)) @ kernel + bias


class NnxCNN(nnx.Module):
  """conv3x3 -> tanh -> conv3x3 -> tanh -> spatial mean -> dense, in Flax NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(SHAPE[-1], 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(4, CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    hidden = jnp.tanh(self.conv2(jnp.tanh(self.conv1(images))))
    return self.dense(hidden.mean(axis=(1, 2)))


class EqxCNN(eqx.Module):
  """The same architecture in Equinox, channels-first per image, vmapped over the batch."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  dense: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    keys = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(SHAPE[-1], 4, 3, padding=1, key=keys[0])
    self.conv2 = eqx.nn.Conv2d(4, 4, 3, padding=1, key=keys[1])
    self.dense = eqx.nn.Linear(4, CLASSES, key=keys[2])

  def __call__(self, images: jax.Array) -> jax.Array:
    def one(image: jax.Array) -> jax.Array:
      hidden = jnp.tanh(self.conv2(jnp.tanh(self.conv1(jnp.transpose(image, (2, 0, 1))))))
      return self.dense(hidden.mean(axis=(1, 2)))

    return jax.vmap(one)(images)


@pytest.fixture(scope="module")
def cnns():
  """The NNX and Equinox CNNs as plain callables images -> logits [B, K]."""
  return {"nnx": NnxCNN(nnx.Rngs(0)), "equinox": EqxCNN(jax.random.key(1))}


def _scores(logits_fn, images, targets=TARGETS) -> np.ndarray:
  return np.asarray(logits_fn(jnp.asarray(images)))[np.arange(len(targets)), targets]


# ------------------------------------------------------------------------- plain linear function


def _weights(targets=TARGETS) -> np.ndarray:
  kernel, _ = _linear_parts()
  return kernel[:, targets].T.reshape((len(targets), *SHAPE))


def test_gradients_and_smoothgrad_of_a_linear_function_are_its_weights():
  logits_fn, images = plain_linear(), _images()
  np.testing.assert_allclose(gradients.vanilla_gradients(logits_fn, images, TARGETS),
                             _weights(), rtol=1e-6)
  smooth = gradients.smoothgrad(logits_fn, images, TARGETS, key=jax.random.key(0),
                                num_samples=3, chunk_size=2)
  np.testing.assert_allclose(smooth, _weights(), rtol=1e-5)


def test_path_methods_of_a_linear_function_are_input_difference_times_weights():
  logits_fn, images = plain_linear(), _images()
  expected = (np.asarray(images) - 0.3) * _weights()
  for rule in ("riemann_trapezoid", "pair_uniform"):
    maps = integrated.integrated_gradients(logits_fn, images, TARGETS, baseline=0.3,
                                           num_steps=5, rule=rule, chunk_size=2)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6, err_msg=rule)
  # Captum's trapezoid weights sum to 1 - 1/N: its IG is (1 - 1/N) (x - x') w.
  captum = integrated.integrated_gradients(logits_fn, images, TARGETS, baseline=0.3,
                                           num_steps=5, rule="captum_trapezoid")
  np.testing.assert_allclose(captum, (1 - 1 / 5) * expected, rtol=1e-5, atol=1e-6)
  guided = integrated.guided_ig(logits_fn, images, TARGETS, baseline=0.3, num_steps=4)
  np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-6)
  blurred = integrated.gaussian_blur(images, 2.0)
  blur = integrated.blur_ig(logits_fn, images, TARGETS, max_sigma=2.0, num_steps=4,
                            grad_step=None)
  np.testing.assert_allclose(blur, (np.asarray(images) - blurred) * _weights(), rtol=1e-4,
                             atol=1e-5)


def test_occlusion_of_a_linear_function_is_the_closed_form_score_drop():
  # 2x2 windows over both channels, stride 2: each pixel lies in one window, whose score drop
  # is sum over the window of w * (x - baseline).
  logits_fn, images = plain_linear(), _images()
  ours = perturbation.occlusion(logits_fn, images, TARGETS, window=2, strides=2, baseline=0.5)
  drop = (_weights() * (np.asarray(images) - 0.5)).reshape(2, 4, 2, 4, 2, 2).sum(axis=(2, 4, 5))
  expected = np.repeat(np.repeat(drop, 2, axis=1), 2, axis=2)[..., None]
  np.testing.assert_allclose(ours, np.broadcast_to(expected, images.shape), rtol=1e-4,
                             atol=1e-5)


def test_rise_of_a_linear_function_is_the_mask_weighted_score_sum():
  logits_fn, images = plain_linear(), _images()
  key = jax.random.key(5)
  masks = np.asarray(perturbation.rise_masks(key, 6, 8, 8, cell_size=3, p_keep=0.5))
  kernel, bias = _linear_parts()
  expected = np.zeros((2, 8, 8))
  for mask in masks:
    masked = (np.asarray(images) * mask[None, :, :, None]).reshape(2, -1)
    scores = (masked @ kernel + bias)[np.arange(2), TARGETS]
    expected += scores[:, None, None] * mask[None]
  expected /= 6 * 0.5
  ours = perturbation.rise(logits_fn, images, TARGETS, key=key, num_masks=6, cell_size=3,
                           p_keep=0.5, chunk_size=4)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_xrai_of_a_linear_function_starts_from_the_closed_form_ig():
  # XRAI's input attribution: IG from each image's min ('black') and max ('white'), averaged,
  # channels summed; on a linear function (x - x') w exactly. XRAI then ranks regions of it.
  logits_fn, images = plain_linear(), _images()
  low = np.asarray(images).min(axis=(1, 2, 3), keepdims=True)
  high = np.asarray(images).max(axis=(1, 2, 3), keepdims=True)
  x = np.asarray(images)
  expected = (((x - low) + (x - high)) / 2 * _weights()).sum(axis=-1)
  ours = xrai.xrai_attributions(logits_fn, images, TARGETS, num_steps=2, chunk_size=2)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
  # Each pixel gets the mean attribution of the pixels its region added, and the regions end
  # up covering the image: the maps' sums are the attributions' sums.
  for method in (xrai.xrai, xrai.fast_xrai):
    maps = np.asarray(method(logits_fn, images, TARGETS, attributions=ours))
    assert maps.shape == images.shape[:3] and np.isfinite(maps).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), np.asarray(ours).sum(axis=(1, 2)),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- NNX and Equinox CNNs


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_ig_is_complete_on_each_framework(cnns, framework):
  logits_fn, images = cnns[framework], _images(1)
  maps = integrated.integrated_gradients(logits_fn, images, TARGETS, num_steps=16,
                                         rule="gauss_legendre", chunk_size=8)
  difference = _scores(logits_fn, images) - _scores(logits_fn, np.zeros_like(images))
  assert np.abs(difference).min() > 1e-3
  np.testing.assert_allclose(np.asarray(maps).sum(axis=(1, 2, 3)), difference, rtol=1e-3,
                             atol=1e-5)
  report = integrated.completeness_gap(logits_fn, images, jnp.zeros_like(images), TARGETS,
                                       maps)
  np.testing.assert_allclose(report["score_difference"], difference, rtol=1e-5, atol=1e-6)
  assert float(report["completeness_gap"].max()) <= 1e-3 * np.abs(difference).max() + 1e-5


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_gradient_methods_on_each_framework(cnns, framework):
  logits_fn, images = cnns[framework], _images(2)
  grads = np.asarray(gradients.vanilla_gradients(logits_fn, images, TARGETS))
  # Central finite differences at three pixels of each image.
  step = 1e-2
  for pixel in ((0, 0, 0), (3, 5, 1), (7, 2, 0)):
    offset = np.zeros(images.shape, np.float32)
    offset[(slice(None), *pixel)] = step
    numeric = (_scores(logits_fn, images + offset) - _scores(logits_fn, images - offset)) / (
        2 * step)
    np.testing.assert_allclose(grads[(slice(None), *pixel)], numeric, rtol=2e-2, atol=1e-4)
  noiseless = gradients.smoothgrad(logits_fn, images, TARGETS, key=jax.random.key(0),
                                   num_samples=2, noise_level=0.0)
  np.testing.assert_allclose(noiseless, grads, rtol=1e-5, atol=1e-7)
  # Guided IG confined to the straight line (max_dist = 0) is IG's left Riemann sum.
  guided = integrated.guided_ig(logits_fn, images, TARGETS, num_steps=4, max_dist=0.0)
  left = integrated.integrated_gradients(logits_fn, images, TARGETS, num_steps=4,
                                         rule="riemann_left", chunk_size=8)
  np.testing.assert_allclose(guided, left, rtol=1e-4, atol=1e-6 * float(np.abs(left).max()))
  blur = np.asarray(integrated.blur_ig(logits_fn, images, TARGETS, max_sigma=2.0, num_steps=2))
  assert blur.shape == images.shape and np.isfinite(blur).all() and np.abs(blur).max() > 0


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_perturbation_methods_on_each_framework_match_naive_loops(cnns, framework):
  logits_fn, images = cnns[framework], _images(3)
  base_scores = _scores(logits_fn, images)
  expected = np.zeros(images.shape, np.float32)
  for top in (0, 4):
    for left in (0, 4):
      occluded = np.array(images)
      occluded[:, top:top + 4, left:left + 4] = 0.0
      expected[:, top:top + 4, left:left + 4] = (
          base_scores - _scores(logits_fn, occluded))[:, None, None, None]
  ours = perturbation.occlusion(logits_fn, images, TARGETS, window=4, strides=4)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
  key = jax.random.key(7)
  masks = np.asarray(perturbation.rise_masks(key, 5, 8, 8, cell_size=4, p_keep=0.4))
  naive = sum(_scores(logits_fn, np.asarray(images) * mask[None, :, :, None])[:, None, None]
              * mask[None] for mask in masks) / (5 * 0.4)
  rise = perturbation.rise(logits_fn, images, TARGETS, key=key, num_masks=5, cell_size=4,
                           p_keep=0.4, chunk_size=2)
  np.testing.assert_allclose(rise, naive, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The split methods (CAM, Grad-CAM, CRM, activation grids) on networks from outside the project.
#
# Three CNNs written here, each conv -> ReLU -> conv -> ReLU (the cut) -> GAP -> dense, exposed as
# an `api.Split`: plain `jnp` (lax.conv_general_dilated), Flax NNX and Equinox. Each is checked
# against 004's identities and naive loops that call only the network's own layers.

SIDE, CLASSES = 8, 3


def _conv(x, kernel, bias, stride):
  """NHWC 3x3 conv with SAME padding, kernel HWIO."""
  out = jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + bias


def _jnp_network(dtype, with_params=False):
  """(split, uncut logits_fn, dense kernel [C, K], dense bias [K][, params]) of a jnp CNN."""
  rng = np.random.default_rng(0)  # numpy draws: no JAX compilations to build the network
  params = {"k1": 0.5 * rng.normal(size=(3, 3, 1, 4)), "b1": np.zeros(4),
            "k2": 0.5 * rng.normal(size=(3, 3, 4, 5)), "b2": np.full(5, 0.1),
            "w": rng.normal(size=(5, CLASSES)), "b": np.arange(CLASSES)}
  params = {name: jnp.asarray(value, dtype) for name, value in params.items()}

  def features(x):
    x = jax.nn.relu(_conv(x, params["k1"], params["b1"], 2))
    return jax.nn.relu(_conv(x, params["k2"], params["b2"], 1))

  def head(a):
    return a.mean(axis=(1, 2)) @ params["w"] + params["b"]

  def uncut(x):  # the whole forward pass written out once more
    x = jax.nn.relu(_conv(x, params["k1"], params["b1"], 2))
    x = jax.nn.relu(_conv(x, params["k2"], params["b2"], 1))
    return jnp.einsum("bhwc,ck->bk", x, params["w"]) / (x.shape[1] * x.shape[2]) + params["b"]

  network = (api.sequential_split(features, head), uncut, params["w"], params["b"])
  return network + (params,) if with_params else network


class NnxCnn(nnx.Module):
  """conv(stride 2) -> ReLU -> conv -> ReLU -> GAP -> dense, in Flax NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(4, 5, (3, 3), padding="SAME", rngs=rngs)
    self.dense = nnx.Linear(5, CLASSES, bias_init=nnx.initializers.normal(1.0), rngs=rngs)

  def features(self, x):
    return nnx.relu(self.conv2(nnx.relu(self.conv1(x))))

  def head(self, a):
    return self.dense(a.mean(axis=(1, 2)))

  def __call__(self, x):
    return self.head(self.features(x))


def _nnx_network():
  model = NnxCnn(nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  run = lambda method: lambda x: getattr(nnx.merge(graphdef, state), method)(x)  # noqa: E731
  return (api.sequential_split(run("features"), run("head")), run("__call__"),
          model.dense.kernel.value, model.dense.bias.value)


class EqxCnn(eqx.Module):
  """The same CNN in Equinox (its layers take one CHW image; vmapped over the batch)."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  dense: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 4, 3, stride=2, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(4, 5, 3, padding=1, key=k2)
    self.dense = eqx.nn.Linear(5, CLASSES, key=k3)

  def features(self, images):
    one = lambda x: jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x.transpose(2, 0, 1)))))
    return jax.vmap(one)(images).transpose(0, 2, 3, 1)                  # NHWC

  def head(self, activation):
    return jax.vmap(self.dense)(activation.mean(axis=(1, 2)))

  def __call__(self, images):
    return jax.vmap(lambda x: self.dense(jax.nn.relu(self.conv2(jax.nn.relu(
        self.conv1(x.transpose(2, 0, 1))))).mean(axis=(1, 2))))(images)


def _eqx_network():
  model = EqxCnn(jax.random.key(2))
  return (api.sequential_split(model.features, model.head), model,
          model.dense.weight.T, model.dense.bias)


NETWORKS = {"jnp": lambda: _jnp_network(jnp.float32), "nnx": _nnx_network,
            "equinox": _eqx_network}


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request):
  split, uncut, kernel, bias = NETWORKS[request.param]()
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, SIDE, SIDE, 1)), jnp.float32)
  return split, uncut, np.asarray(kernel), np.asarray(bias), images


def _naive_crm(split, images):
  """Eq. 6-7 cell by cell with the network's own head: zero (l, m), re-run, sum squares."""
  fmap = np.asarray(split.features(images))
  scores = np.asarray(split.head(jnp.asarray(fmap), images))
  relevance = np.zeros(fmap.shape[:3])
  for l in range(fmap.shape[1]):
    for m in range(fmap.shape[2]):
      ablated = fmap.copy()
      ablated[:, l, m, :] = 0.0
      changed = np.asarray(split.head(jnp.asarray(ablated), images))
      relevance[:, l, m] = np.sum((scores - changed) ** 2, axis=-1)
  return relevance


def test_split_logits_equal_the_uncut_network(network):
  split, uncut, _, _, images = network
  np.testing.assert_allclose(split.logits(images), uncut(images), rtol=1e-5, atol=1e-6)


def test_cam_and_grad_cam_obey_004(network):
  split, uncut, kernel, bias, images = network
  targets = jnp.array([2, 0])
  assert cam.gap_head_problem(split, images) is None
  cam_maps = np.asarray(cam.cam(split, images, targets, upsample=False))
  fmap = np.asarray(split.features(images))
  # Eq. 2 with the dense kernel read from the network's own parameters.
  np.testing.assert_allclose(cam_maps, np.einsum("bhwc,bc->bhw", fmap, kernel[:, [2, 0]].T),
                             rtol=1e-4, atol=1e-5)
  # The cells average to the logit minus the bias (GAP is a mean).
  logits = np.asarray(uncut(images))
  np.testing.assert_allclose(cam_maps.mean(axis=(1, 2)),
                             logits[[0, 1], [2, 0]] - bias[[2, 0]], rtol=1e-4, atol=1e-5)
  # 004 eq. 4: Grad-CAM before its ReLU is CAM / Z.
  grad_maps = cam.grad_cam(split, images, targets, relu=False, upsample=False)
  np.testing.assert_allclose(grad_maps, cam_maps / (fmap.shape[1] * fmap.shape[2]), rtol=1e-4,
                             atol=1e-6)
  jitted = jax.jit(lambda x: cam.cam(split, x, "predicted"))(images)
  assert jitted.shape == (2, SIDE, SIDE)
  np.testing.assert_allclose(jitted, cam.cam(split, images, logits.argmax(-1)), rtol=1e-5,
                             atol=1e-6)


def test_crm_equals_the_naive_loop(network):
  split, _, _, _, images = network
  naive = _naive_crm(split, images)
  assert naive.max() > 0
  assert crm.resolve_method(split, images) == "closed_form"
  for method in ("ablation", "pooled", "closed_form"):
    got = crm.crm(split, images, method=method, upsample=False)
    np.testing.assert_allclose(got, naive, rtol=1e-4, atol=1e-5 * naive.max(), err_msg=method)


def test_activation_grids_rank_channels_by_mean(network):
  split, _, _, _, images = network
  grids = activations.activation_grids({"cut": split}, images, k=3)
  fmap = np.asarray(split.features(images))
  expected = np.argsort(-fmap.mean(axis=(1, 2)), axis=-1, kind="stable")[:, :3]
  np.testing.assert_array_equal(grids["cut"][0], expected)
  index, strongest = activations.strongest_channel(split, images)
  np.testing.assert_array_equal(index, expected[:, 0])
  np.testing.assert_array_equal(strongest, fmap[np.arange(2), ..., expected[:, 0]])


def test_a_flattening_head_is_refused_by_cam_and_ablated_by_crm():
  split, _, _, _ = _jnp_network(jnp.float32)
  dense = jnp.asarray(np.random.default_rng(4).normal(size=((SIDE // 2) ** 2 * 5, CLASSES)),
                      jnp.float32)
  flat = api.sequential_split(split.features, lambda a: a.reshape(a.shape[0], -1) @ dense)
  images = jnp.asarray(np.random.default_rng(5).uniform(size=(2, SIDE, SIDE, 1)), jnp.float32)
  assert "1x1 feature map" in cam.gap_head_problem(flat, images)
  with pytest.raises(ValueError, match="global average pooling"):
    cam.cam(flat, images, 0)
  assert crm.resolve_method(flat, images) == "ablation"
  with pytest.raises(ValueError, match="does not apply"):
    crm.crm(flat, images, method="pooled")
  np.testing.assert_allclose(crm.crm(flat, images, upsample=False), _naive_crm(flat, images),
                             rtol=1e-4, atol=1e-7)


def test_float64_runs_end_to_end_and_an_inner_cut_re_runs_the_rest():
  with jax.enable_x64(True):
    split, _, _, _, params = _jnp_network(jnp.float64, with_params=True)
    images = jnp.asarray(np.random.default_rng(6).uniform(size=(2, SIDE, SIDE, 1)))
    targets = jnp.array([1, 2])
    cam_maps = cam.cam(split, images, targets, upsample=False)
    grad_maps = cam.grad_cam(split, images, targets, relu=False, upsample=False)
    relevance = crm.crm(split, images)
    assert {cam_maps.dtype, grad_maps.dtype, relevance.dtype} == {jnp.dtype(jnp.float64)}
    np.testing.assert_allclose(grad_maps, cam_maps / (SIDE // 2) ** 2, rtol=1e-10, atol=1e-14)
    # Cut after the first conv: the head (conv2 + ReLU + GAP + dense) is not g(GAP), so CRM
    # must ablate there, and Grad-CAM's gradient flows through conv2.
    inner = api.sequential_split(
        lambda x: jax.nn.relu(_conv(x, params["k1"], params["b1"], 2)),
        lambda a: split.head(jax.nn.relu(_conv(a, params["k2"], params["b2"], 1)), None))
    np.testing.assert_allclose(inner.logits(images), split.logits(images), rtol=1e-12)
    assert crm.resolve_method(inner, images) == "ablation"
    np.testing.assert_allclose(crm.crm(inner, images, upsample=False), _naive_crm(inner, images),
                               rtol=1e-10, atol=1e-14)
    assert "not affine" in cam.gap_head_problem(inner, images)
    activation, gradient = cam.tap_gradients(inner, images, targets)
    step = 1e-6 * jnp.zeros_like(activation).at[0, 2, 3, 1].set(1.0)
    scores = lambda a: api.target_scores(inner.head(a, images), targets)[0]  # noqa: E731
    central = (scores(activation + step) - scores(activation - step)) / 2e-6
    np.testing.assert_allclose(gradient[0, 2, 3, 1], central, rtol=1e-6, atol=1e-9)
