"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) as a JAX transform.

The network runs forward as usual, but every layer that a composite gives a rule runs through an
op whose custom VJP returns that rule's relevance redistribution instead of the gradient, so one
`jax.vjp` of the logits, seeded with the target logit on the target class (zero elsewhere),
returns the relevance of every input pixel, as Zennit computes it with backward hooks.

Layers are the Flax Linen modules the network calls: `nn.Conv`, `nn.Dense`, `nn.BatchNorm`, and
the parameterless `models.heads.ReLU`, `MaxPool`, `AvgPool` and `GlobalAveragePool`, which the
project's VGG16, DenseNet and dense heads use. A Flax interceptor swaps each call for its rule
op; nothing in the model changes. Everything between layers (concatenations, reshapes, tap
deltas, dtype casts) is differentiated as usual: a concatenation splits relevance by its
inputs, a reshape moves it, an activation read by two branches receives the sum of both.
Activation or pooling *functions* called directly (`nn.relu(x)`) get their gradient.

Rules, with Zennit 0.5.1's formulas (z = layer(x), R the relevance arriving at the output, the
stabiliser s(z) = z + eps * sign(z) with sign(0) = +1):

* `Epsilon(epsilon)`: R_in = x * J^T (R / s(z)); epsilon -> 0 is LRP-0.
* `Gamma(gamma)`: generalised gamma rule: where z > 0, relevance follows the contributions of
  x+ through w + gamma w+ (bias b + gamma b+) and of x- through w + gamma w- (no bias); where
  z < 0, those of x+ through w + gamma w- (bias b + gamma b-) and of x- through w + gamma w+.
* `AlphaBeta(alpha, beta)`: alpha * positive - beta * negative contributions (alpha - beta = 1).
* `ZPlus()`: alpha = 1, beta = 0.
* `ZBox(low, high)`: for a bounded input domain [low, high] (the first layer).
* `Flat()` / `WSquare()`: relevance by unit weights / squared weights (the first layer).
* `Pass()`: relevance passes unchanged (elementwise layers).
* `Norm()`: Epsilon with the stabiliser only, for parameterless layers (the pools).

Parameter modifiers act on the kernel and on the bias, as Zennit's act on weight and bias.

Composites map each layer to a rule. `LayerMap` is Zennit's `SpecialFirstLayerMapComposite`:
a rule per layer kind plus one for the first linear layer; `epsilon_gamma_box(low, high)`,
`epsilon_plus_flat()`, `epsilon_plus()`, `epsilon_alpha2_beta1()` and
`epsilon_alpha2_beta1_flat()` are Zennit's composites of those names, with Zennit's shared base
map: activations Pass, average pools Norm, max pools gradient (winner takes all), BatchNorm
Pass. Any callable `(LayerInfo) -> Rule | None` is a composite (None: the gradient).

BatchNorm. A BatchNorm whose input is exactly a Conv's or Dense's output is folded into it
(w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta), as Zennit's
`SequentialMergeBatchNorm` canonizer does, and that layer's rule sees the folded weights; the
layer's output must feed only that BatchNorm (as in conv-BN-ReLU stacks). DenseNet's
pre-activation BatchNorms (norm-ReLU-conv after a concatenation) cannot be folded: the
concatenated channels come from many earlier layers and each later layer normalises them with
its own statistics, and a ReLU separates each BatchNorm from the convolution after it. They are
layers of their own, the affine map x * scale + shift, with the composite's `batch_norm` rule
(default Pass, as in Zennit's base map; any rule above applies to the affine map). In DenseNet
the stem's conv1_bn and every bottleneck's *_1_bn follow their convolution and are folded; the
concatenations need nothing (the VJP of a concatenation splits relevance by its inputs).

Differences from Zennit, by design:
* the first layer is the first Conv/Dense in forward order (Zennit: in module registration
  order; the same for sequential networks);
* `GlobalAveragePool` is an average pool (Norm rule); torchvision's DenseNet calls
  `F.adaptive_avg_pool2d`, which Zennit's hooks cannot see (the gradient there);
* the initial relevance is the target logit (Zennit's `attr_output` is the caller's choice;
  `attr_output=lambda out: one_hot * out` gives the same seed). For a one-logit sigmoid model
  class 1 is seeded with z and class 0 with -z.

Relevance is computed in the dtype the layers compute in and returned in the images' dtype
(the project's heads cast logits to float32, so a float64 model's seed carries float32
rounding, 1e-7 relative). Your own Linen model: `relevance(lambda x: module.apply(variables,
x), images, targets)`, with activations and pools written as the `models.heads` layers so that
they get their rules. logits_fn must run its layers un-jitted (jit the whole LRP call): a
jitted logits_fn replays a trace without the rules, and is refused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.models import base
from medxai_jax.models import heads

Params = Mapping[str, jax.Array]
Forward = Callable[[jax.Array, Params], jax.Array]
KINDS = ("conv", "dense", "batch_norm", "activation", "avg_pool", "max_pool")
LINEAR_KINDS = ("conv", "dense")


def stabilize(z: jax.Array, epsilon: float) -> jax.Array:
  """z + epsilon * sign(z), with sign(0) = +1 (Zennit's stabiliser)."""
  return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


def _map_params(params: Params, modify: Callable[[jax.Array], jax.Array],
                zero_bias: bool = False) -> dict[str, jax.Array]:
  """`modify` applied to every parameter, the bias set to zero when `zero_bias`."""
  return {name: (jnp.zeros_like(value) if zero_bias and name == "bias" else modify(value))
          for name, value in params.items()}


def _pullback(forward: Forward, params: Params, point: jax.Array, cotangent: jax.Array
              ) -> jax.Array:
  """J^T cotangent of the layer with `params` (affine in its input, so any point serves)."""
  output, pullback = jax.vjp(lambda x: forward(x, params), point)
  return pullback(cotangent.astype(output.dtype))[0]


def _outputs(forward: Forward, branches: Sequence[tuple[jax.Array, Params]]) -> list[jax.Array]:
  """The layer's output on each (input, parameters) branch."""
  return [forward(point, params) for point, params in branches]


def _pullbacks(forward: Forward, branches: Sequence[tuple[jax.Array, Params]],
               cotangents: Sequence[jax.Array]) -> list[jax.Array]:
  """J_i^T cotangent_i of each branch's modified layer."""
  return [_pullback(forward, params, point, cotangent)
          for (point, params), cotangent in zip(branches, cotangents)]


def _positive(value: jax.Array) -> jax.Array:
  return jnp.maximum(value, 0)


def _negative(value: jax.Array) -> jax.Array:
  return jnp.minimum(value, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A relevance rule: `relevance(forward, x, params, upper)` -> relevance of the input x.

  forward(x, params) is the layer (affine in x for the rules with parameters); upper is the
  relevance of its output.
  """

  def relevance(self, forward: Forward, x: jax.Array, params: Params, upper: jax.Array
                ) -> jax.Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
  """LRP-epsilon: R_in = x * J^T (R / (z + epsilon sign z))."""

  epsilon: float = 1e-6

  def relevance(self, forward, x, params, upper):
    z, pullback = jax.vjp(lambda v: forward(v, params), x)
    return x * pullback(upper.astype(z.dtype) / stabilize(z, self.epsilon))[0]


@dataclasses.dataclass(frozen=True)
class Norm(Rule):
  """Epsilon with `stabilizer` as a stabiliser only (Zennit's rule for average pools)."""

  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    return Epsilon(self.stabilizer).relevance(forward, x, params, upper)


@dataclasses.dataclass(frozen=True)
class Gamma(Rule):
  """Generalised LRP-gamma (Montavon et al. 2019; Andeol et al. 2021) in Zennit's form."""

  gamma: float = 0.25
  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    gamma = self.gamma
    plus = lambda p: p + gamma * _positive(p)
    minus = lambda p: p + gamma * _negative(p)
    x_pos, x_neg = _positive(x), _negative(x)
    branches = [(x_pos, _map_params(params, plus)), (x_neg, _map_params(params, minus, True)),
                (x_pos, _map_params(params, minus)), (x_neg, _map_params(params, plus, True))]
    outputs = _outputs(forward, branches)
    z = forward(x, params)
    upper = upper.astype(z.dtype)
    positive = jnp.where(z > 0, upper, 0) / stabilize(outputs[0] + outputs[1], self.stabilizer)
    negative = jnp.where(z < 0, upper, 0) / stabilize(outputs[2] + outputs[3], self.stabilizer)
    grads = _pullbacks(forward, branches, [positive, positive, negative, negative])
    return x_pos * grads[0] + x_neg * grads[1] + x_pos * grads[2] + x_neg * grads[3]


@dataclasses.dataclass(frozen=True)
class AlphaBeta(Rule):
  """LRP-alpha-beta: alpha * positive - beta * negative contributions; alpha - beta = 1."""

  alpha: float = 2.0
  beta: float = 1.0
  stabilizer: float = 1e-6

  def __post_init__(self):
    if self.alpha < 0 or self.beta < 0:
      raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0; got alpha={self.alpha}, "
                       f"beta={self.beta}.")
    if self.alpha - self.beta != 1:
      raise ValueError(f"AlphaBeta needs alpha - beta = 1 (conservation); got alpha="
                       f"{self.alpha}, beta={self.beta}.")

  def relevance(self, forward, x, params, upper):
    x_pos, x_neg = _positive(x), _negative(x)
    branches = [(x_pos, _map_params(params, _positive)),
                (x_neg, _map_params(params, _negative, True)),
                (x_pos, _map_params(params, _negative)),
                (x_neg, _map_params(params, _positive, True))]
    outputs = _outputs(forward, branches)
    upper = upper.astype(outputs[0].dtype)
    positive = upper / stabilize(outputs[0] + outputs[1], self.stabilizer)
    negative = upper / stabilize(outputs[2] + outputs[3], self.stabilizer)
    grads = _pullbacks(forward, branches, [positive, positive, negative, negative])
    return (self.alpha * (x_pos * grads[0] + x_neg * grads[1])
            - self.beta * (x_pos * grads[2] + x_neg * grads[3]))


@dataclasses.dataclass(frozen=True)
class ZPlus(Rule):
  """LRP-z+ (alpha = 1, beta = 0), negative inputs allowed as in Zennit."""

  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    x_pos, x_neg = _positive(x), _negative(x)
    branches = [(x_pos, _map_params(params, _positive)),
                (x_neg, _map_params(params, _negative, True))]
    outputs = _outputs(forward, branches)
    scaled = upper.astype(outputs[0].dtype) / stabilize(outputs[0] + outputs[1], self.stabilizer)
    grads = _pullbacks(forward, branches, [scaled, scaled])
    return x_pos * grads[0] + x_neg * grads[1]


@dataclasses.dataclass(frozen=True, eq=False)
class ZBox(Rule):
  """LRP-z^B for inputs bounded by [low, high] (scalars, per-channel [C] or [H, W, C])."""

  low: Any
  high: Any
  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    try:
      low = jnp.broadcast_to(jnp.asarray(self.low, x.dtype), x.shape)
      high = jnp.broadcast_to(jnp.asarray(self.high, x.dtype), x.shape)
    except ValueError as error:
      raise ValueError(f"ZBox low {np.shape(self.low)} and high {np.shape(self.high)} must "
                       f"broadcast to the layer input's shape {x.shape} (a scalar, one value "
                       "per channel [C] or [H, W, C]).") from error
    branches = [(x, dict(params)), (low, _map_params(params, _positive)),
                (high, _map_params(params, _negative))]
    outputs = _outputs(forward, branches)
    scaled = upper.astype(outputs[0].dtype) / stabilize(outputs[0] - outputs[1] - outputs[2],
                                                        self.stabilizer)
    grads = _pullbacks(forward, branches, [scaled] * 3)
    return x * grads[0] - low * grads[1] - high * grads[2]


@dataclasses.dataclass(frozen=True)
class Flat(Rule):
  """LRP-flat: relevance spread by unit weights over the receptive field (no bias)."""

  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    ones = _map_params(params, jnp.ones_like, True)
    z = forward(jnp.ones_like(x), ones)
    return _pullback(forward, ones, x, upper.astype(z.dtype) / stabilize(z, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class WSquare(Rule):
  """LRP-w^2: relevance spread by squared weights (the bias squared too, as in Zennit)."""

  stabilizer: float = 1e-6

  def relevance(self, forward, x, params, upper):
    squared = _map_params(params, jnp.square)
    z = forward(jnp.ones_like(x), squared)
    return _pullback(forward, squared, x, upper.astype(z.dtype) / stabilize(z, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class Pass(Rule):
  """Relevance passes unchanged through an elementwise layer."""

  def relevance(self, forward, x, params, upper):
    if upper.shape != x.shape:
      raise ValueError(f"the Pass rule needs an elementwise layer; this one maps {x.shape} to "
                       f"{upper.shape}.")
    return upper.astype(x.dtype)


# ----------------------------------------------------------------------------- composites


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A layer as composites see it.

  path: the module path joined by '/' ('backbone/conv1_conv'); kind: one of KINDS; call:
  which call of that module this is (0 unless the module is reused); linear_index /
  kind_index: its position among the Conv and Dense layers (-1 for other kinds) / among layers
  of its kind, in forward order; folded: the path of the BatchNorm folded into it, if any.
  """

  path: str
  kind: str
  call: int
  linear_index: int
  kind_index: int
  folded: str | None = None


Composite = Callable[[LayerInfo], "Rule | None"]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerMap:
  """A rule per layer kind, and `first` for the first linear layer (Zennit's
  SpecialFirstLayerMapComposite). `first_kinds` says which kinds can be that layer: ('conv',)
  is the first convolution (EpsilonGammaBox), ('conv', 'dense') the first Conv or Dense
  (EpsilonPlusFlat). A rule of None means the gradient."""

  conv: Rule | None
  dense: Rule | None
  first: Rule | None = None
  first_kinds: tuple[str, ...] = ("conv", "dense")
  batch_norm: Rule | None = Pass()
  activation: Rule | None = Pass()
  avg_pool: Rule | None = Norm()
  max_pool: Rule | None = None

  def __post_init__(self):
    if self.first_kinds not in (("conv",), ("dense",), ("conv", "dense")):
      raise ValueError(f"first_kinds must be ('conv',), ('dense',) or ('conv', 'dense'); got "
                       f"{self.first_kinds!r}.")

  def __call__(self, layer: LayerInfo) -> Rule | None:
    if self.first is not None and layer.kind in self.first_kinds:
      index = layer.linear_index if len(self.first_kinds) == 2 else layer.kind_index
      if index == 0:
        return self.first
    return getattr(self, layer.kind)


def _base_map(stabilizer: float) -> dict[str, Rule | None]:
  """Zennit's layer_map_base."""
  return {"batch_norm": Pass(), "activation": Pass(), "avg_pool": Norm(stabilizer),
          "max_pool": None}


def epsilon_gamma_box(low: Any, high: Any, *, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6) -> LayerMap:
  """Zennit's EpsilonGammaBox: ZBox on the first conv, Gamma on convs, Epsilon on dense."""
  return LayerMap(conv=Gamma(gamma, stabilizer), dense=Epsilon(epsilon),
                  first=ZBox(low, high, stabilizer), first_kinds=("conv",),
                  **_base_map(stabilizer))


def epsilon_plus(*, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
  """Zennit's EpsilonPlus: ZPlus on convs, Epsilon on dense."""
  return LayerMap(conv=ZPlus(stabilizer), dense=Epsilon(epsilon), **_base_map(stabilizer))


def epsilon_plus_flat(*, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
  """Zennit's EpsilonPlusFlat: Flat on the first linear layer, ZPlus on convs, Epsilon on
  dense."""
  return LayerMap(conv=ZPlus(stabilizer), dense=Epsilon(epsilon), first=Flat(stabilizer),
                  **_base_map(stabilizer))


def epsilon_alpha2_beta1(*, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
  """Zennit's EpsilonAlpha2Beta1: AlphaBeta(2, 1) on convs, Epsilon on dense."""
  return LayerMap(conv=AlphaBeta(2.0, 1.0, stabilizer), dense=Epsilon(epsilon),
                  **_base_map(stabilizer))


def epsilon_alpha2_beta1_flat(*, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
  """Zennit's EpsilonAlpha2Beta1Flat: as EpsilonAlpha2Beta1, Flat on the first linear layer."""
  return LayerMap(conv=AlphaBeta(2.0, 1.0, stabilizer), dense=Epsilon(epsilon),
                  first=Flat(stabilizer), **_base_map(stabilizer))


COMPOSITES = {"epsilon_gamma_box": epsilon_gamma_box, "epsilon_plus": epsilon_plus,
              "epsilon_plus_flat": epsilon_plus_flat,
              "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
              "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat}


def make_composite(composite: str | Composite, *, low: Any = None, high: Any = None,
                   epsilon: float | None = None, gamma: float | None = None,
                   stabilizer: float | None = None) -> Composite:
  """A composite by name (a key of COMPOSITES, with its options) or the callable itself."""
  options = {"epsilon": epsilon, "gamma": gamma, "stabilizer": stabilizer, "low": low,
             "high": high}
  given = {name: value for name, value in options.items() if value is not None}
  if not isinstance(composite, str):
    if not callable(composite):
      raise ValueError(f"composite must be a name in {sorted(COMPOSITES)} or a callable "
                       f"(LayerInfo) -> Rule | None; got {composite!r}.")
    if given:
      raise ValueError(f"options {sorted(given)} only apply to a composite given by name; "
                       "set them on the rules of your own composite instead.")
    return composite
  if composite not in COMPOSITES:
    raise ValueError(f"composite={composite!r} is not one of {sorted(COMPOSITES)}.")
  if composite == "epsilon_gamma_box":
    if low is None or high is None:
      raise ValueError("composite='epsilon_gamma_box' needs low= and high=, the smallest and "
                       "largest input values (scalars or one per channel), for its ZBox rule.")
  else:
    unused = sorted(set(given) & {"low", "high", "gamma"})
    if unused:
      raise ValueError(f"options {unused} do not apply to composite={composite!r} (only "
                       "'epsilon_gamma_box' takes low, high and gamma).")
  return COMPOSITES[composite](**given)


# ----------------------------------------------------------------------------- rule ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rule_op(rule: Rule, forward: Forward, x: jax.Array, params: Params) -> jax.Array:
  """forward(x, params), whose VJP is `rule`'s relevance redistribution (parameters get zero)."""
  return forward(x, params)


def _rule_op_forward(rule, forward, x, params):
  return forward(x, params), (x, params)


def _rule_op_backward(rule, forward, residuals, upper):
  x, params = residuals
  lower = rule.relevance(forward, x, params, upper).astype(x.dtype)
  return lower, jax.tree_util.tree_map(jnp.zeros_like, params)


_rule_op.defvjp(_rule_op_forward, _rule_op_backward)


def _apply(rule: Rule | None, forward: Forward, x: jax.Array, params: Params) -> jax.Array:
  """The layer with `rule`'s backward pass (None: its gradient)."""
  if rule is None:
    return forward(x, params)
  if not isinstance(rule, Rule):
    raise ValueError(f"a composite must return a Rule or None; got {rule!r}.")
  return _rule_op(rule, forward, x, params)


@dataclasses.dataclass(frozen=True)
class _ConvConfig:
  strides: tuple[int, ...]
  padding: Any
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int
  precision: Any


def _conv_forward(config: _ConvConfig, x: jax.Array, params: Params) -> jax.Array:
  rank = x.ndim - 2
  spec = (0, rank + 1) + tuple(range(1, rank + 1))
  numbers = lax.ConvDimensionNumbers(lhs_spec=spec,
                                     rhs_spec=(rank + 1, rank) + tuple(range(rank)),
                                     out_spec=spec)
  y = lax.conv_general_dilated(x, params["kernel"], config.strides, config.padding,
                               lhs_dilation=config.input_dilation,
                               rhs_dilation=config.kernel_dilation, dimension_numbers=numbers,
                               feature_group_count=config.feature_group_count,
                               precision=config.precision)
  return y + params["bias"] if "bias" in params else y


def _dense_forward(precision: Any, x: jax.Array, params: Params) -> jax.Array:
  y = lax.dot_general(x, params["kernel"], (((x.ndim - 1,), (0,)), ((), ())),
                      precision=precision)
  return y + params["bias"] if "bias" in params else y


def _affine_forward(axis: int, x: jax.Array, params: Params) -> jax.Array:
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return x * params["kernel"].reshape(shape) + params["bias"].reshape(shape)


def _pool_forward(pool: Callable[..., jax.Array], window: tuple[int, ...],
                  strides: tuple[int, ...], padding: Any, x: jax.Array, params: Params
                  ) -> jax.Array:
  del params
  return pool(x, window, strides=strides, padding=padding)


def _parameterless_forward(module: nn.Module) -> Forward:
  """The pure function a models.heads activation or pooling layer computes."""
  if isinstance(module, heads.ReLU):
    return lambda x, params: nn.relu(x)
  if isinstance(module, heads.GlobalAveragePool):
    return lambda x, params: heads.global_average_pool(x)
  pool = nn.max_pool if isinstance(module, heads.MaxPool) else nn.avg_pool
  return functools.partial(_pool_forward, pool, tuple(module.window), tuple(module.strides),
                           module.padding)


def _ints(value: Any, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(int(v) for v in value)


def _promoted(module: nn.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Input and parameters in the dtype the module computes in."""
  params = dict(module.variables["params"])
  dtype = module.dtype or jnp.result_type(x, *params.values())
  return x.astype(dtype), {name: value.astype(dtype) for name, value in params.items()}


def _conv_layer(module: nn.Conv, x: jax.Array) -> tuple[Forward, jax.Array, dict]:
  """The Conv's forward, its (dtype-promoted) input and parameters."""
  if module.mask is not None:
    raise ValueError(f"LRP does not support masked convolutions ({_path(module)!r}).")
  rank = 1 if isinstance(module.kernel_size, int) else len(module.kernel_size)
  if x.ndim != rank + 2:
    raise ValueError(f"LRP needs batched inputs [B, spatial..., C] for Conv {_path(module)!r}; "
                     f"got shape {x.shape}.")
  padding = nn.linear.canonicalize_padding(module.padding, rank)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"LRP supports Conv padding 'SAME', 'VALID' or explicit pads; "
                     f"{_path(module)!r} uses {padding!r}.")
  padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
  config = _ConvConfig(_ints(module.strides, rank), padding, _ints(module.input_dilation, rank),
                       _ints(module.kernel_dilation, rank), int(module.feature_group_count),
                       module.precision)
  return (functools.partial(_conv_forward, config), *_promoted(module, x))


def _dense_layer(module: nn.Dense, x: jax.Array) -> tuple[Forward, jax.Array, dict]:
  return (functools.partial(_dense_forward, module.precision), *_promoted(module, x))


def _batch_norm_affine(module: nn.BatchNorm, x: jax.Array, kwargs: Mapping[str, Any]
                       ) -> tuple[int, jax.Array, jax.Array]:
  """(axis, scale, shift) of an inference-mode BatchNorm: y = x * scale + shift."""
  running = nn.merge_param("use_running_average", module.use_running_average,
                           kwargs.get("use_running_average"))
  if not running:
    raise ValueError(f"LRP explains inference: BatchNorm {_path(module)!r} must use its "
                     "running averages (train=False).")
  if kwargs.get("mask") is not None:
    raise ValueError(f"LRP does not support masked BatchNorm ({_path(module)!r}).")
  if not isinstance(module.axis, int):
    raise ValueError(f"LRP supports BatchNorm over one feature axis; {_path(module)!r} "
                     f"normalises axes {module.axis}.")
  stats = module.variables["batch_stats"]
  params = module.variables.get("params", {})
  dtype = module.dtype or jnp.result_type(x, stats["mean"])
  mean, var = stats["mean"].astype(dtype), stats["var"].astype(dtype)
  scale = params["scale"].astype(dtype) if module.use_scale else jnp.ones_like(mean)
  bias = params["bias"].astype(dtype) if module.use_bias else jnp.zeros_like(mean)
  factor = scale * lax.rsqrt(var + jnp.asarray(module.epsilon, dtype))
  return module.axis % x.ndim, factor, bias - mean * factor


def _fold(params: Mapping[str, jax.Array], factor: jax.Array, shift: jax.Array
          ) -> dict[str, jax.Array]:
  """A linear layer's parameters with y * factor + shift folded in (output axis last)."""
  dtype = params["kernel"].dtype
  kernel = params["kernel"] * factor.astype(dtype)
  bias = params.get("bias", jnp.zeros(shift.shape, dtype)) * factor + shift
  return {"kernel": kernel, "bias": bias.astype(dtype)}


_PARAMETERLESS = {heads.ReLU: "activation", heads.AvgPool: "avg_pool",
                  heads.GlobalAveragePool: "avg_pool", heads.MaxPool: "max_pool"}


def _kind(module: nn.Module) -> str | None:
  """The layer kind of a module LRP handles, None for other modules."""
  if isinstance(module, nn.Conv):
    return "conv"
  if isinstance(module, nn.Dense):
    return "dense"
  if isinstance(module, nn.BatchNorm):
    return "batch_norm"
  return _PARAMETERLESS.get(type(module))


def _unsupported(module: nn.Module) -> bool:
  """A Flax layer with parameters that LRP has no rule for (ConvTranspose, LayerNorm, ...)."""
  cls = type(module)
  return (cls.__module__.startswith("flax.linen") and cls is not nn.Sequential
          and _kind(module) is None and "params" in module.variables)


def _path(module: nn.Module) -> str:
  return "/".join(str(name) for name in module.path)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the recording pass found: layers in forward order, and the BatchNorms to fold."""

  layers: Mapping[tuple[str, int], LayerInfo]
  folded_into: Mapping[tuple[str, int], tuple[str, int]]  # BatchNorm key -> linear layer key


def _record(logits_fn: api.LogitsFn, images: jax.Array) -> _Plan:
  """Traces logits_fn once (shapes only) and lists the layers it calls, in order."""
  order: list[tuple[str, int, str]] = []
  calls: dict[str, int] = {}
  linear_outputs: list[tuple[Any, tuple[str, int]]] = []
  folds: dict[tuple[str, int], tuple[str, int]] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    kind = _kind(module)
    if kind is None:
      if _unsupported(module):
        raise ValueError(f"LRP has no rule for the {type(module).__name__} layer "
                         f"{_path(module)!r}; it handles nn.Conv, nn.Dense, nn.BatchNorm and "
                         "the layers in models/heads.py.")
      return next_fun(*args, **kwargs)
    path = _path(module)
    key = (path, calls.get(path, 0))
    calls[path] = key[1] + 1
    if kind == "batch_norm" and args:
      source = next((k for value, k in linear_outputs if value is args[0]), None)
      if source is not None and source not in folds.values():
        folds[key] = source
    output = next_fun(*args, **kwargs)
    order.append((*key, kind))
    if kind in LINEAR_KINDS:
      linear_outputs.append((output, key))
    return output

  with nn.intercept_methods(interceptor):
    # A fresh function each time: jax.eval_shape caches traces by function, and a cached trace
    # would not run the interceptor.
    jax.eval_shape(lambda x: logits_fn(x), jax.ShapeDtypeStruct(images.shape, images.dtype))
  folded_by = {linear_key: bn_key[0] for bn_key, linear_key in folds.items()}
  layers, counts, linear = {}, {}, 0
  for path, call, kind in order:
    is_linear = kind in LINEAR_KINDS
    layers[(path, call)] = LayerInfo(path, kind, call, linear if is_linear else -1,
                                     counts.get(kind, 0), folded_by.get((path, call)))
    counts[kind] = counts.get(kind, 0) + 1
    linear += is_linear
  if not linear:
    raise ValueError("LRP found no nn.Conv or nn.Dense layer in logits_fn: it explains Flax "
                     "Linen networks built from nn.Conv / nn.Dense / nn.BatchNorm modules, run "
                     "un-jitted inside logits_fn (jit the whole LRP call instead).")
  return _Plan(layers, folds)


def _lrp_interceptor(plan: _Plan, composite: Composite, calls: dict[str, int]
                     ) -> Callable[..., Any]:
  """The interceptor that runs every planned layer through its rule op; counts the calls of
  each layer path in `calls`."""
  pending: dict[tuple[str, int], tuple[Any, Forward, jax.Array, dict]] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or _kind(module) is None:
      return next_fun(*args, **kwargs)
    path = _path(module)
    key = (path, calls.get(path, 0))
    calls[path] = key[1] + 1
    if key not in plan.layers:
      raise ValueError(f"layer {path!r} (call {key[1]}) was not seen when logits_fn was traced; "
                       "LRP needs a network whose layers do not depend on the input values.")
    info = plan.layers[key]
    x = args[0]
    if info.kind in LINEAR_KINDS:
      if len(args) != 1 or kwargs:
        raise ValueError(f"LRP calls layer {path!r} with one input; it got extra arguments.")
      forward, x, params = (_conv_layer if info.kind == "conv" else _dense_layer)(module, x)
      if info.folded is not None:  # the BatchNorm after it applies this layer's rule
        output = forward(x, params)
        pending[key] = (output, forward, x, params)
        return output
      return _apply(composite(info), forward, x, params)
    if info.kind == "batch_norm":
      axis, factor, shift = _batch_norm_affine(module, x, kwargs)
      if key in plan.folded_into:
        output, forward, inner_x, params = pending.pop(plan.folded_into[key])
        if output is not x:
          raise ValueError(f"BatchNorm {path!r} was folded into the layer before it, but its "
                           "input is no longer that layer's output.")
        linear_info = plan.layers[plan.folded_into[key]]
        return _apply(composite(linear_info), forward, inner_x, _fold(params, factor, shift))
      return _apply(composite(info), functools.partial(_affine_forward, axis),
                    x.astype(factor.dtype), {"kernel": factor, "bias": shift})
    return _apply(composite(info), _parameterless_forward(module), x, {})

  return interceptor


def _seed(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Initial relevance on the logits: the target score on the target's column, zero elsewhere."""
  scores = api.target_scores(logits, targets)
  columns = jnp.zeros_like(targets) if logits.shape[-1] == 1 else targets
  return jax.nn.one_hot(columns, logits.shape[-1], dtype=logits.dtype) * scores[:, None]


def _check_images(images: jax.Array) -> None:
  if jnp.ndim(images) != 4:
    raise ValueError(f"images must be a batch [B, H, W, C]; got shape "
                     f"{tuple(jnp.shape(images))}.")
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f"images must be floating point; got dtype {jnp.result_type(images)}.")


def _relevance_of(logits_fn: api.LogitsFn, apply: Callable[[Any], jax.Array], inputs: Any,
                  images: jax.Array, targets: api.Targets, composite: Composite) -> Any:
  """Relevance of every leaf of `inputs` for the targets; apply(inputs) and logits_fn(images)
  compute the same network's logits."""
  plan = _record(logits_fn, images)
  predicted = isinstance(targets, str) and targets == "predicted"
  resolved = None if predicted else api.resolve_targets(logits_fn, images, targets)
  calls: dict[str, int] = {}
  with nn.intercept_methods(_lrp_interceptor(plan, composite, calls)):
    logits, pullback = jax.vjp(apply, inputs)
  if sum(calls.values()) != len(plan.layers):
    raise ValueError(f"LRP saw {sum(calls.values())} layer calls while explaining, but "
                     f"{len(plan.layers)} when logits_fn was traced: a jitted or cached "
                     "logits_fn would be differentiated without the rules; pass the un-jitted "
                     "function (jit the whole LRP call instead).")
  logits = lax.stop_gradient(logits)
  if resolved is None:
    resolved = api.predicted_classes(logits)
  return pullback(_seed(logits, resolved))[0]


def relevance(logits_fn: api.LogitsFn, images: jax.Array, targets: api.Targets, *,
              composite: str | Composite = "epsilon_plus_flat", low: Any = None,
              high: Any = None, epsilon: float | None = None, gamma: float | None = None,
              stabilizer: float | None = None) -> jax.Array:
  """LRP relevance [B, H, W, C] of the images for each image's target class.

  `logits_fn` is any function images -> logits [B, K] that runs Flax Linen layers (the
  project's `Classifier.logits_fn(variables)`, or `lambda x: module.apply(variables, x)` for
  your own Linen model). `composite` is a name in COMPOSITES (with `low`/`high` for
  'epsilon_gamma_box', and optionally `epsilon`, `gamma`, `stabilizer`) or a callable
  (LayerInfo) -> Rule | None. The relevance sums to the target logit, less what biases and
  stabilisers absorb.
  """
  _check_images(images)
  rule_map = make_composite(composite, low=low, high=high, epsilon=epsilon, gamma=gamma,
                            stabilizer=stabilizer)
  lower = _relevance_of(logits_fn, logits_fn, images, images, targets, rule_map)
  return lower.astype(jnp.result_type(images))


def lrp(model: base.Classifier, variables: base.Variables, images: jax.Array,
        targets: api.Targets, *, composite: str | Composite = "epsilon_plus_flat",
        low: Any = None, high: Any = None, epsilon: float | None = None,
        gamma: float | None = None, stabilizer: float | None = None) -> jax.Array:
  """LRP relevance [B, H, W, C] through a project `Classifier` (see `relevance`)."""
  model.check_input_shape(jnp.shape(images))
  return relevance(model.logits_fn(variables), images, targets, composite=composite, low=low,
                   high=high, epsilon=epsilon, gamma=gamma, stabilizer=stabilizer)


def layer_relevance(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: api.Targets, *, composite: str | Composite = "epsilon_plus_flat",
                    low: Any = None, high: Any = None, epsilon: float | None = None,
                    gamma: float | None = None, stabilizer: float | None = None
                    ) -> dict[str, jax.Array]:
  """Relevance at the input ('input') and at every tap of the model, from one backward pass.

  With conserving rules and no biases, every entry sums per image to the target logit (the
  per-layer conservation check).
  """
  _check_images(images)
  model.check_input_shape(jnp.shape(images))
  rule_map = make_composite(composite, low=low, high=high, epsilon=epsilon, gamma=gamma,
                            stabilizer=stabilizer)
  plain = {name: value for name, value in variables.items() if name != base.PERTURBATIONS}
  run = lambda v, x: model.module.apply(v, x, train=False, mutable=[base.PERTURBATIONS])
  _, shapes = jax.eval_shape(run, plain, images)
  deltas = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                                  shapes[base.PERTURBATIONS])

  def apply(inputs: tuple[jax.Array, Any]) -> jax.Array:
    x, perturbations = inputs
    return model.module.apply({**plain, base.PERTURBATIONS: perturbations}, x, train=False)

  lower, at_taps = _relevance_of(lambda x: apply((x, deltas)), apply, (images, deltas), images,
                                 targets, rule_map)
  result = {"input": lower.astype(jnp.result_type(images))}
  for path, value in jax.tree_util.tree_flatten_with_path(at_taps)[0]:
    name = str(getattr(path[-1], "key", path[-1]))
    result[name.removesuffix("_delta")] = value
  return result
