"""LRP as a JAX transform: each rule and Zennit's VGG16 composites against zennit 0.5.1 on the same
weights, per-layer conservation, and a tiny DenseNet against an independent numpy implementation.

The zennit comparisons are oracles (skipped when torch/zennit are absent unless
MEDXAI_REQUIRE_ORACLES=1, as in tests/models/test_porting.py).
"""

from __future__ import annotations

import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from medxai_jax.attribution import lrp
from medxai_jax.models import densenet
from medxai_jax.models import heads
from medxai_jax.models import porting
from medxai_jax.models import vgg


def _oracle(name: str):
  """The reference module; skipped when absent unless MEDXAI_REQUIRE_ORACLES=1."""
  if os.environ.get("MEDXAI_REQUIRE_ORACLES") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)


def _nchw_to_nhwc(array) -> np.ndarray:
  return np.transpose(np.asarray(array), (0, 2, 3, 1))


def _relative_error(ours, reference) -> float:
  """Max abs difference over the reference's max abs value."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _zennit_relevance(torch, zennit_attribution, net, composite, images_nhwc, targets, classes):
  """Zennit's relevance (NHWC) seeded with the target logit, as lrp seeds it."""
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))
  one_hot = torch.nn.functional.one_hot(torch.as_tensor(np.asarray(targets)), classes).to(x)
  with zennit_attribution.Gradient(model=net, composite=composite) as attributor:
    _, relevance = attributor(x, lambda output: one_hot * output)
  return _nchw_to_nhwc(relevance.detach().numpy())


# ----------------------------------------------------------------------------- each rule


class _TinyNet(nn.Module):
  """conv-ReLU-maxpool-conv-ReLU-avgpool-flatten-dense-ReLU-dense, a user's own Linen model."""

  @nn.compact
  def __call__(self, x):
    x = heads.ReLU()(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x))
    x = heads.MaxPool((2, 2), (2, 2))(x)
    x = heads.ReLU()(nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x))
    x = heads.AvgPool((2, 2), (2, 2))(x)
    x = x.reshape((x.shape[0], -1))
    x = heads.ReLU()(nn.Dense(6, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


def _tiny_params(seed: int = 0) -> dict:
  """Random float64 weights and biases for _TinyNet."""
  rng = np.random.default_rng(seed)
  shapes = {"conv1": ((3, 3, 3, 4), 4), "conv2": ((3, 3, 4, 5), 5), "fc1": ((20, 6), 6),
            "fc2": ((6, 3), 3)}
  return {name: {"kernel": rng.normal(0, 0.5, kernel), "bias": rng.normal(0, 0.1, bias)}
          for name, (kernel, bias) in shapes.items()}


def _torch_tiny(torch, params):
  """The same network in torch (NCHW), flattening in NHWC order like the Flax model."""

  class Flatten(torch.nn.Module):
    def forward(self, x):
      return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2), Flatten(),
      torch.nn.Linear(20, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double().eval()
  with torch.no_grad():
    for index, name in ((0, "conv1"), (3, "conv2"), (7, "fc1"), (9, "fc2")):
      kernel = params[name]["kernel"]
      weight = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
      net[index].weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
      net[index].bias.copy_(torch.from_numpy(params[name]["bias"]))
  return net


def test_each_rule_matches_zennit_on_a_small_conv_dense_network():
  torch = _oracle("torch")
  zennit_rules = _oracle("zennit.rules")
  zennit_attribution = importlib.import_module("zennit.attribution")
  composites = importlib.import_module("zennit.composites")
  types = importlib.import_module("zennit.types")
  params = _tiny_params()
  net = _torch_tiny(torch, params)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3))
  targets = np.array([0, 2])

  def zennit_composite(conv, dense, first=None):
    base = [(types.Activation, zennit_rules.Pass()), (types.AvgPool, zennit_rules.Norm())]
    layer_map = base + [(types.Convolution, conv), (torch.nn.Linear, dense)]
    if first is None:
      return composites.LayerMapComposite(layer_map=layer_map)
    return composites.SpecialFirstLayerMapComposite(layer_map=layer_map,
                                                    first_map=[(types.Linear, first)])

  # Each composite puts different rules on conv1 (the first layer), conv2, fc1 and fc2; together
  # they cover every rule (three compiled graphs instead of one per rule).
  low, high = -1.0, 1.0
  cases = {
      "zbox_gamma_epsilon": (lrp.ZBox(low, high), lrp.Gamma(0.25), lrp.Epsilon(0.05),
                             zennit_rules.ZBox(low, high), zennit_rules.Gamma(0.25),
                             zennit_rules.Epsilon(0.05)),
      "flat_alpha2beta1_alpha1beta0": (lrp.Flat(), lrp.AlphaBeta(2.0, 1.0),
                                       lrp.AlphaBeta(1.0, 0.0), zennit_rules.Flat(),
                                       zennit_rules.AlphaBeta(2.0, 1.0),
                                       zennit_rules.AlphaBeta(1.0, 0.0)),
      "wsquare_zplus_gamma": (lrp.WSquare(), lrp.ZPlus(), lrp.Gamma(0.5),
                              zennit_rules.WSquare(), zennit_rules.ZPlus(),
                              zennit_rules.Gamma(0.5)),
  }
  with jax.enable_x64(True):
    jax_params = jax.tree_util.tree_map(jnp.asarray, params)
    module = _TinyNet()

    @jax.jit
    def ours(params, images):
      logits_fn = lambda x: module.apply({"params": params}, x)
      return {name: lrp.relevance(logits_fn, images, jnp.asarray(targets), composite=lrp.LayerMap(
          conv=conv, dense=dense, first=first))
              for name, (first, conv, dense, *_) in cases.items()}

    relevance = jax.tree_util.tree_map(np.asarray, ours(jax_params, jnp.asarray(images)))
  assert all(value.dtype == np.float64 for value in relevance.values())
  errors = {}
  for name, (*_, first, conv, dense) in cases.items():
    expected = _zennit_relevance(torch, zennit_attribution, net,
                                 zennit_composite(conv, dense, first), images, targets, 3)
    errors[name] = _relative_error(relevance[name], expected)
  assert max(errors.values()) < 1e-9, errors
  # The composites differ from each other on this network (agreeing with Zennit means something).
  names = list(cases)
  assert _relative_error(relevance[names[0]], relevance[names[1]]) > 1e-2
  assert _relative_error(relevance[names[1]], relevance[names[2]]) > 1e-2


def test_alpha_beta_and_composite_options_are_checked():
  with pytest.raises(ValueError, match="alpha - beta = 1"):
    lrp.AlphaBeta(2.0, 2.0)
  with pytest.raises(ValueError, match="needs low= and high="):
    lrp.make_composite("epsilon_gamma_box")
  with pytest.raises(ValueError, match="is not one of"):
    lrp.make_composite("epsilon_gama_box", low=0, high=1)
  with pytest.raises(ValueError, match=r"\['gamma'\] do not apply"):
    lrp.make_composite("epsilon_plus_flat", gamma=0.5)
  with pytest.raises(ValueError, match="only apply to a composite given by name"):
    lrp.make_composite(lrp.epsilon_plus(), epsilon=0.1)


def test_layers_without_a_rule_bad_images_and_bad_targets_are_refused():
  class WithLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(2, (3, 3), name="conv")(x)
      x = nn.LayerNorm(name="norm")(x)
      return nn.Dense(2, name="dense")(x.reshape((x.shape[0], -1)))

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = heads.ReLU()(nn.Conv(2, (3, 3), name="conv")(x))
      return nn.Dense(2, name="dense")(x.reshape((x.shape[0], -1)))

  conv = {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}
  dense = {"kernel": jnp.ones((32, 2)), "bias": jnp.zeros(2)}
  norm = {"scale": jnp.ones(2), "bias": jnp.zeros(2)}
  images = jnp.ones((1, 4, 4, 1))
  with_norm = lambda x: WithLayerNorm().apply(
      {"params": {"conv": conv, "norm": norm, "dense": dense}}, x)
  plain = lambda x: Plain().apply({"params": {"conv": conv, "dense": dense}}, x)
  with pytest.raises(ValueError, match="no rule for the LayerNorm layer 'norm'"):
    lrp.relevance(with_norm, images, 0)
  with pytest.raises(ValueError, match=r"images must be a batch \[B, H, W, C\]"):
    lrp.relevance(plain, images[0], 0)
  with pytest.raises(ValueError, match=r"targets\[0\]"):
    lrp.relevance(plain, images, jnp.array([5]))
  with pytest.raises(ValueError, match="found no nn.Conv or nn.Dense"):
    lrp.relevance(lambda x: x.reshape((1, -1))[:, :2], images, 0)
  # A jitted logits_fn replays its cached trace, which has no rules in it: refused, not a
  # gradient returned as relevance.
  with pytest.raises(ValueError, match="un-jitted"):
    lrp.relevance(jax.jit(plain), images, 0)


# ----------------------------------------------------------------------------- VGG16


VGG_SIZE = 32
VGG_LOW = np.array([-1.0, -1.1, -1.2])
VGG_HIGH = np.array([1.0, 1.1, 1.2])


def _torch_vgg16(torch, torchvision):
  """torchvision's VGG16 layers at a 32-pixel input: block-5 pool 1x1, so fc1 reads 512
  features (torchvision's 7x7 adaptive pool, which replicates a 1x1 map, left out)."""

  class VGG16(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
      self.classifier = torch.nn.Sequential(
          torch.nn.Linear(512, 4096), torch.nn.ReLU(True), torch.nn.Dropout(),
          torch.nn.Linear(4096, 4096), torch.nn.ReLU(True), torch.nn.Dropout(),
          torch.nn.Linear(4096, 1000))

    def forward(self, x):
      return self.classifier(torch.flatten(self.features(x), 1))

  torch.manual_seed(0)
  net = VGG16().eval()
  with torch.no_grad():
    for layer in net.modules():
      if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        layer.bias.normal_(0, 0.05)
  return net


def _without_biases(variables):
  """The same weights with every bias zero (nothing absorbs relevance)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.zeros_like(leaf) if path[-1].key == "bias" else leaf, variables)


@pytest.fixture(scope="module")
def vgg_case(tmp_path_factory):
  """A random torch VGG16, the same weights ported to ours, and our relevance at every tap for
  EpsilonGammaBox and EpsilonPlusFlat (one compiled function, reused with other weights)."""
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  net = _torch_vgg16(torch, torchvision)
  path = str(tmp_path_factory.mktemp("lrp_vgg") / "vgg16.pth")
  torch.save(net.state_dict(), path)
  model = vgg.vgg16(num_outputs=1000, input_shape=(VGG_SIZE, VGG_SIZE, 3))
  variables, report = porting.port_torchvision(model, _zeros_like_init(model), path,
                                               include_top=True)
  assert not report.kept_from_init

  @jax.jit
  def relevance(variables, images, targets):
    return {"epsilon_gamma_box": lrp.layer_relevance(
                model, variables, images, targets, composite="epsilon_gamma_box",
                low=VGG_LOW, high=VGG_HIGH),
            "epsilon_plus_flat": lrp.layer_relevance(
                model, variables, images, targets, composite="epsilon_plus_flat"),
            "logits": model.logits(variables, images)}

  rng = np.random.default_rng(0)
  images = (rng.uniform(0, 1, (1, VGG_SIZE, VGG_SIZE, 3)) * (VGG_HIGH - VGG_LOW)
            + VGG_LOW).astype(np.float32)
  targets = np.array([907])
  as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
  return dict(torch=torch, net=net, images=images, targets=targets,
              ours=as_numpy(relevance(variables, images, targets)),
              without_biases=as_numpy(relevance(_without_biases(variables), images, targets)))


def _zeros_like_init(model):
  """Zero variables of the model's shapes (what porting overwrites), without running init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def test_vgg16_composites_match_zennit_on_the_same_weights(vgg_case):
  torch = vgg_case["torch"]
  zennit_attribution = _oracle("zennit.attribution")
  composites = importlib.import_module("zennit.composites")
  ours = {name: value for name, value in vgg_case["ours"].items() if name != "logits"}
  zennit_composites = {
      "epsilon_gamma_box": composites.EpsilonGammaBox(
          low=torch.tensor(VGG_LOW, dtype=torch.float32).view(1, 3, 1, 1),
          high=torch.tensor(VGG_HIGH, dtype=torch.float32).view(1, 3, 1, 1)),
      "epsilon_plus_flat": composites.EpsilonPlusFlat()}
  errors = {}
  for name, composite in zennit_composites.items():
    expected = _zennit_relevance(torch, zennit_attribution, vgg_case["net"], composite,
                                 vgg_case["images"], vgg_case["targets"], 1000)
    errors[name] = _relative_error(ours[name]["input"], expected)
  # float32 through 16 layers: agreement to 1e-4 of the map's largest magnitude.
  assert max(errors.values()) < 1e-4, errors
  assert _relative_error(ours["epsilon_gamma_box"]["input"],
                         ours["epsilon_plus_flat"]["input"]) > 1e-1


def test_vgg16_relevance_is_conserved_at_every_layer_without_biases(vgg_case):
  targets = vgg_case["targets"]
  relevance = dict(vgg_case["without_biases"])
  batch = np.arange(len(targets))
  target_logits = np.asarray(relevance.pop("logits"), np.float64)[batch, targets]
  for name, per_layer in relevance.items():
    assert set(per_layer) == {"input", *vgg.TAPS}
    for tap, value in per_layer.items():
      sums = np.asarray(value, np.float64).reshape(len(targets), -1).sum(axis=1)
      np.testing.assert_allclose(sums, target_logits, rtol=2e-4, err_msg=f"{name} at {tap}")
  # With biases, relevance is absorbed: the sums move away from the logit.
  biased = vgg_case["ours"]
  sums = np.asarray(biased["epsilon_plus_flat"]["input"]).reshape(len(targets), -1).sum(axis=1)
  biased_logits = np.asarray(biased["logits"])[batch, targets]
  assert np.all(np.abs(sums - biased_logits) > 1e-3 * np.abs(sums))


# ----------------------------------------------------------------------------- DenseNet


DENSE_SIZE = 32
DENSE_EPSILON = 1e-12
BN_EPSILON = 1.001e-5


def _tiny_densenet():
  return tiny.densenet(num_outputs=3, head="softmax", dtype=jnp.float64,
                       input_shape=(DENSE_SIZE, DENSE_SIZE, 3))


def _randomised(shapes, seed: int):
  """float64 variables of these shapes: He-normal kernels, random BatchNorm statistics and
  affines, random dense biases; the stem's BatchNorm shifts by +3 so its ReLU keeps every unit
  (no ties in the max-pool after it)."""
  rng = np.random.default_rng(seed)

  def leaf(path, value):
    keys = [p.key for p in path]
    shape = np.shape(value)
    if keys[-1] == "mean":
      return rng.normal(0, 0.1, shape)
    if keys[-1] == "var":
      return rng.uniform(0.5, 1.5, shape)
    if keys[-1] == "scale":
      return rng.uniform(0.5, 1.5, shape)
    if keys[-1] == "bias":
      return rng.normal(0, 0.1, shape) + (3.0 if "conv1_bn" in keys else 0.0)
    return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)  # He-normal kernels

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _folded_biases_zero(variables):
  """Biases chosen so that nothing absorbs relevance: dense bias 0 and, for the BatchNorms
  folded into the convolution before them, beta = mean * g / sqrt(var + eps) (the
  pre-activation BatchNorms keep their shifts: Pass ignores them)."""
  variables = jax.tree_util.tree_map(np.array, variables)
  backbone_params = variables["params"]["backbone"]
  for name, stats in variables["batch_stats"]["backbone"].items():
    if name == "conv1_bn" or name.endswith("_1_bn"):
      factor = backbone_params[name]["scale"] / np.sqrt(stats["var"] + BN_EPSILON)
      backbone_params[name]["bias"] = stats["mean"] * factor
  variables["params"]["classifier"]["predictions"]["bias"][:] = 0
  return variables


def _patches(x, size, stride, pad):
  """[B, Ho, Wo, size*size*C] patches of NHWC x (zero padding), in HWIO kernel order."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = (x.shape[1] - size) // stride + 1
  rows = [x[:, i:i + stride * out:stride, j:j + stride * out:stride, :]
          for i in range(size) for j in range(size)]
  return np.concatenate(rows, axis=-1) if rows else None


def _unpatch(grads, shape, size, stride, pad):
  """Adjoint of _patches: patch-entry values summed back onto the (unpadded) image."""
  batch, height, width, channels = shape
  image = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels))
  out = grads.shape[1]
  for index in range(size * size):
    i, j = divmod(index, size)
    image[:, i:i + stride * out:stride, j:j + stride * out:stride, :] += (
        grads[..., index * channels:(index + 1) * channels])
  return image[:, pad:pad + height, pad:pad + width, :]


def _stab(z, epsilon):
  return z + np.where(z >= 0, epsilon, -epsilon)


class _NumpyConv:
  """A convolution (BatchNorm after it folded in) and its LRP rules, written with patches."""

  def __init__(self, kernel, bias, stride=1, pad=0):
    self.size, self.stride, self.pad = kernel.shape[0], stride, pad
    self.matrix = kernel.reshape(-1, kernel.shape[-1])
    self.bias = np.zeros(kernel.shape[-1]) if bias is None else bias

  def __call__(self, x):
    self.x = x
    return _patches(x, self.size, self.stride, self.pad) @ self.matrix + self.bias

  def zplus(self, upper):
    p = _patches(self.x, self.size, self.stride, self.pad)
    pos, neg = np.maximum(p, 0), np.minimum(p, 0)
    w_pos, w_neg = np.maximum(self.matrix, 0), np.minimum(self.matrix, 0)
    z = pos @ w_pos + neg @ w_neg + np.maximum(self.bias, 0)
    c = upper / _stab(z, DENSE_EPSILON)
    return _unpatch(pos * (c @ w_pos.T) + neg * (c @ w_neg.T), self.x.shape, self.size,
                    self.stride, self.pad)

  def flat(self, upper):
    ones = _patches(np.ones_like(self.x), self.size, self.stride, self.pad)
    z = ones @ np.ones_like(self.matrix)
    c = upper / _stab(z, DENSE_EPSILON)
    return _unpatch(c @ np.ones_like(self.matrix).T, self.x.shape, self.size, self.stride,
                    self.pad)


def _numpy_densenet_lrp(variables, images, targets):
  """EpsilonPlusFlat LRP of the tiny DenseNet, written out layer by layer in numpy: Flat on the
  stem conv (conv1_bn folded), ZPlus on convs (*_1_bn folded), Pass on ReLUs and the other
  BatchNorms, max-pool relevance to the window's maximum, Norm on the average pools, Epsilon on
  the dense layer. Returns (input relevance, logits)."""
  params = variables["params"]["backbone"]
  stats = variables["batch_stats"]["backbone"]

  def bn(name):
    factor = params[name]["scale"] / np.sqrt(stats[name]["var"] + BN_EPSILON)
    return factor, params[name]["bias"] - stats[name]["mean"] * factor

  def folded(conv_name, bn_name, **kw):
    factor, shift = bn(bn_name)
    return _NumpyConv(params[conv_name]["kernel"] * factor, shift, **kw)

  relu = lambda v: np.maximum(v, 0)
  stem = folded("conv1_conv", "conv1_bn", stride=2, pad=3)
  a = relu(stem(images))
  # 3x3/2 max-pool, padding 1 (padding never wins: the stem's ReLU outputs are positive).
  padded = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out = (padded.shape[1] - 3) // 2 + 1
  windows = np.stack([padded[:, i:i + 2 * out:2, j:j + 2 * out:2, :]
                      for i in range(3) for j in range(3)], axis=-1)
  x = windows.max(-1)
  winner = windows.argmax(-1)
  layers = []
  for block in range(4):
    stage = block + 2
    prefix = f"conv{stage}_block1"
    factor, shift = bn(f"{prefix}_0_bn")
    conv1 = folded(f"{prefix}_1_conv", f"{prefix}_1_bn")
    conv2 = _NumpyConv(params[f"{prefix}_2_conv"]["kernel"], None, pad=1)
    y = conv2(relu(conv1(relu(x * factor + shift))))
    layers.append((x.shape[-1], conv1, conv2))
    x = np.concatenate([x, y], axis=-1)
    if block < 3:
      factor, shift = bn(f"pool{stage}_bn")
      conv = _NumpyConv(params[f"pool{stage}_conv"]["kernel"], None)
      t = conv(relu(x * factor + shift))
      pooled = t.reshape(t.shape[0], t.shape[1] // 2, 2, t.shape[2] // 2, 2, -1).mean((2, 4))
      layers.append((t, conv, pooled))
      x = pooled
  factor, shift = bn("bn")
  last = relu(x * factor + shift)
  embedding = last.mean((1, 2))
  dense = variables["params"]["classifier"]["predictions"]
  logits = embedding @ dense["kernel"] + dense["bias"]
  # Backward: the target logit on the target class.
  batch = np.arange(len(targets))
  upper = np.zeros_like(logits)
  upper[batch, targets] = logits[batch, targets]
  upper = embedding * ((upper / _stab(logits, DENSE_EPSILON)) @ dense["kernel"].T)  # Epsilon
  r = last * (upper / _stab(embedding, DENSE_EPSILON))[:, None, None, :] / (
      last.shape[1] * last.shape[2])  # Norm on the global average pool; Pass on ReLU and BN
  for entry in reversed(layers):
    if isinstance(entry[0], np.ndarray):  # transition: Norm on the 2x2 average pool, ZPlus
      t, conv, pooled = entry
      up = np.repeat(np.repeat(r / _stab(pooled, DENSE_EPSILON), 2, 1), 2, 2) / 4
      r = conv.zplus(t * up)
    else:  # dense layer: concatenation split, ZPlus on both convs, Pass on BN and ReLU
      channels, conv1, conv2 = entry
      r_new = conv1.zplus(conv2.zplus(r[..., channels:]))
      r = r[..., :channels] + r_new
  r_pool_input = np.zeros_like(a)
  for index in range(9):
    i, j = divmod(index, 3)
    chosen = np.where(winner == index, r, 0)
    target = np.zeros((a.shape[0], a.shape[1] + 2, a.shape[2] + 2, a.shape[3]))
    target[:, i:i + 2 * out:2, j:j + 2 * out:2, :] += chosen
    r_pool_input += target[:, 1:-1, 1:-1, :]
  return stem.flat(r_pool_input), logits


# LRP-0 with Flat on the first layer: every rule conserves exactly (no bias, epsilon -> 0). The
# z+ rules of EpsilonPlusFlat do not: an output none of whose inputs meets a positive weight
# (all ReLUs before it off) has z+ = 0 and its relevance is dropped, as in Zennit.
CONSERVING = lrp.LayerMap(conv=lrp.Epsilon(DENSE_EPSILON), dense=lrp.Epsilon(DENSE_EPSILON),
                          first=lrp.Flat(DENSE_EPSILON), avg_pool=lrp.Norm(DENSE_EPSILON))


@pytest.fixture(scope="module")
def dense_case():
  """The tiny DenseNet in float64 and its jitted per-layer relevance (EpsilonPlusFlat and the
  conserving composite, one compiled function)."""
  with jax.enable_x64(True):
    model = _tiny_densenet()
    variables = _randomised(jax.eval_shape(model.init, jax.random.key(0)), 1)

    @jax.jit
    def relevance(variables, images, targets):
      return (lrp.layer_relevance(model, variables, images, targets,
                                  composite="epsilon_plus_flat", epsilon=DENSE_EPSILON,
                                  stabilizer=DENSE_EPSILON),
              lrp.layer_relevance(model, variables, images, targets, composite=CONSERVING),
              model.logits(variables, images))

    images = np.random.default_rng(2).normal(size=(2, DENSE_SIZE, DENSE_SIZE, 3))
  return dict(model=model, variables=variables, relevance=relevance, images=images,
              targets=np.array([0, 2]))


def test_densenet_relevance_matches_an_independent_numpy_implementation(dense_case):
  with jax.enable_x64(True):
    per_layer, _, logits = dense_case["relevance"](
        dense_case["variables"], dense_case["images"], dense_case["targets"])
  ours = per_layer["input"]
  expected, numpy_logits = _numpy_densenet_lrp(
      jax.tree_util.tree_map(np.asarray, dense_case["variables"]), dense_case["images"],
      dense_case["targets"])
  np.testing.assert_allclose(logits, numpy_logits, rtol=1e-6)  # the model's float32 logits
  assert np.asarray(ours).dtype == np.float64
  # Our seed is the model's float32 logit: agreement to float32 rounding of one scalar.
  assert _relative_error(ours, expected) < 1e-6


def test_densenet_relevance_is_conserved_at_every_layer(dense_case):
  with jax.enable_x64(True):
    variables = _folded_biases_zero(dense_case["variables"])
    images, targets = dense_case["images"], dense_case["targets"]
    plus_flat, relevance, logits = dense_case["relevance"](variables, images, targets)
  logits = np.asarray(logits, np.float64)
  target_logits = logits[np.arange(2), targets]
  assert set(relevance) == {"input", *densenet.TAPS}
  sums = {tap: np.asarray(value).reshape(2, -1).sum(axis=1) for tap, value in relevance.items()}
  for tap, value in sums.items():
    # float64 everywhere but the float32 logits that seed the relevance.
    np.testing.assert_allclose(value, sums["input"], rtol=1e-9, err_msg=tap)
    np.testing.assert_allclose(value, target_logits, rtol=1e-6, err_msg=tap)
  # EpsilonPlusFlat conserves from the logit down to the last transition's z+ layer.
  for tap in ("embedding", "last_conv", "block4", "transition3"):
    np.testing.assert_allclose(np.asarray(plus_flat[tap]).reshape(2, -1).sum(axis=1),
                               target_logits, rtol=1e-6, err_msg=tap)
