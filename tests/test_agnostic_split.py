"""The split methods (CAM, Grad-CAM, CRM, activation grids) on networks from outside the project.

Three CNNs written here, each conv -> ReLU -> conv -> ReLU (the cut) -> GAP -> dense, exposed as
an `api.Split`: plain `jnp` (lax.conv_general_dilated), Flax NNX and Equinox. Each is checked
against 004's identities and naive loops that call only the network's own layers.
"""

from __future__ import annotations

import equinox as eqx
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.attribution import activations
from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import crm

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
