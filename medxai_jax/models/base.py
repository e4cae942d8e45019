"""The model contract: every classifier offers logits, features at a named tap, and its head."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from medxai_jax.attribution import api

Variables = Mapping[str, Any]

# Generic tap names every architecture maps onto its own layers.
GENERIC_TAPS = ("stem", "last_conv", "embedding")
# Flax collection holding additive deltas at the taps (never created by `Classifier.init`).
PERTURBATIONS = "perturbations"
_PERTURBATION_SUFFIX = "_delta"


# Largest input side searched for an architecture's minimum input size.
_MAX_SEARCHED_SIZE = 8192


def window_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
  """Output length along one axis of a conv/pool window over `size` cells with `padding` cells
  added in total; 0 when the window does not fit."""
  padded = size + padding
  return 0 if padded < kernel else (padded - kernel) // stride + 1


def smallest_input_size(output_size: Callable[[int], int]) -> int:
  """Smallest side s >= 1 whose output_size(s) >= 1 (output sizes grow with the input)."""
  for size in range(1, _MAX_SEARCHED_SIZE + 1):
    if output_size(size) >= 1:
      return size
  raise ValueError(f"No input side up to {_MAX_SEARCHED_SIZE} gives a non-empty feature map.")


def perturbation_name(tap: str) -> str:
  """Name of the perturbation variable at `tap` (suffixed: tap names may equal layer names)."""
  return tap + _PERTURBATION_SUFFIX


def perturb_tap(module: nn.Module, tap: str, x: jax.Array) -> jax.Array:
  """Marks `x` as the activation at `tap`: x + delta when a delta is supplied, else x.

  Architectures call this at every tap, on the value that flows on through the network; a
  delta lives in the 'perturbations' collection, which only `Classifier.logits_with_tap_delta`
  passes in, so plain inference, training and `init` are unaffected.
  """
  return module.perturb(perturbation_name(tap), x, collection=PERTURBATIONS)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A Flax module with the three pure views that training and attribution use.

  The module must define `__call__(x, train)`, `features(x, tap, train)` and
  `head(feature_map, train)`; `taps` lists its tap names in forward order and `aliases` maps
  the generic names ('stem', 'last_conv', 'embedding') onto them. Each tap's activation passes
  through `perturb_tap` on the way to the logits, so `logits_with_tap_delta` can edit it.
  """

  module: nn.Module
  taps: tuple[str, ...]
  aliases: Mapping[str, str]
  input_shape: tuple[int, int, int]
  num_outputs: int

  @property
  def num_classes(self) -> int:
    """Classes the model separates (a one-logit sigmoid model separates two)."""
    return 2 if self.num_outputs == 1 else self.num_outputs

  @property
  def min_input_size(self) -> int:
    """Smallest image height/width the architecture maps to a non-empty feature map.

    Modules report it through `head_input_size(side) -> int` (the side of the map their
    head reads for a square input of that side); a module without it accepts any size.
    """
    head_input_size = getattr(self.module, "head_input_size", None)
    return 1 if head_input_size is None else smallest_input_size(head_input_size)

  def check_input_shape(self, shape: tuple[int, ...], name: str = "images") -> None:
    """Raises a ValueError naming the minimum when [B, H, W, C] images are too small."""
    if len(shape) != 4:
      raise ValueError(f"{name} must be a rank-4 batch [B, H, W, C]; got shape {tuple(shape)}.")
    height, width = int(shape[1]), int(shape[2])
    minimum = self.min_input_size
    if min(height, width) < minimum:
      raise ValueError(
          f"{name} are {height}x{width} pixels (shape {tuple(shape)}), smaller than the "
          f"{minimum}x{minimum} minimum of {type(self.module).__name__}: its strided layers "
          f"would leave an empty feature map. Use images of at least {minimum}x{minimum} "
          "(config.model.input_shape and the dataset's image size).")

  def resolve_tap(self, tap: str) -> str:
    """Returns the architecture's own name for `tap`, raising on unknown names."""
    name = self.aliases.get(tap, tap)
    if name not in self.taps:
      raise ValueError(
          f"Unknown tap {tap!r} for {type(self.module).__name__}; known taps: "
          f"{list(self.taps)} and aliases {dict(self.aliases)}.")
    return name

  def init(self, rng: jax.Array, batch_size: int = 1) -> Variables:
    """Initialises variables for a batch of the model's input shape."""
    self.check_input_shape((batch_size, *self.input_shape), "input_shape")
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((batch_size, *self.input_shape), jnp.float32)
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False,
                            mutable=flax.core.DenyList(("intermediates", PERTURBATIONS)))

  def logits(self, variables: Variables, images: jax.Array) -> jax.Array:
    """Inference logits [B, num_outputs] (dropout off, BatchNorm in inference mode)."""
    self.check_input_shape(jnp.shape(images))
    return self.module.apply(variables, images, train=False)

  def features(self, variables: Variables, images: jax.Array, tap: str) -> jax.Array:
    """Activations at a named tap (inference mode)."""
    self.check_input_shape(jnp.shape(images))
    return self.module.apply(
        variables, images, self.resolve_tap(tap), train=False, method="features")

  def head(self, variables: Variables, feature_map: jax.Array) -> jax.Array:
    """Logits computed from the 'last_conv' feature map (inference mode)."""
    return self.module.apply(variables, feature_map, train=False, method="head")

  def logits_with_tap_delta(self, variables: Variables, images: jax.Array, tap: str,
                            delta: jax.Array) -> jax.Array:
    """Inference logits when the activation A at `tap` is replaced by A + delta.

    `delta` has the tap's shape (that of `features(variables, images, tap)`); the layers before
    the tap run unchanged, the ones after it see the edited activation. Differentiable in
    `delta` (d logits / d delta at 0 is the gradient w.r.t. the activation) and vmappable over
    a leading axis of deltas with the images fixed (the layers before the tap then run once).
    """
    self.check_input_shape(jnp.shape(images))
    name = perturbation_name(self.resolve_tap(tap))
    apply = lambda v, x: self.module.apply(v, x, train=False, mutable=[PERTURBATIONS])
    _, shapes = jax.eval_shape(apply, {k: v for k, v in variables.items()
                                       if k != PERTURBATIONS}, images)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes[PERTURBATIONS])
    matches = [i for i, (path, _) in enumerate(leaves) if getattr(path[-1], "key", None) == name]
    if len(matches) != 1:
      raise ValueError(
          f"{type(self.module).__name__} marks tap {tap!r} {len(matches)} times with "
          "base.perturb_tap; every tap must be marked exactly once.")
    expected = leaves[matches[0]][1].shape
    if tuple(jnp.shape(delta)) != tuple(expected):
      raise ValueError(f"delta for tap {tap!r} must have the tap's shape {tuple(expected)}; got "
                       f"{tuple(jnp.shape(delta))}.")
    values = [jnp.asarray(delta, leaf.dtype) if i == matches[0]
              else jnp.zeros(leaf.shape, leaf.dtype) for i, (_, leaf) in enumerate(leaves)]
    perturbations = jax.tree_util.tree_unflatten(treedef, values)
    return self.module.apply({**variables, PERTURBATIONS: perturbations}, images, train=False)

  def split_at_tap(self, variables: Variables, images: jax.Array, tap: str
                   ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """The activation A at `tap` and the map delta -> logits of the network run on A + delta."""
    activation = self.features(variables, images, tap)

    def rest(delta: jax.Array) -> jax.Array:
      return self.logits_with_tap_delta(variables, images, tap, delta)

    return activation, rest

  def logits_fn(self, variables: Variables) -> api.LogitsFn:
    """The attribution contract's view of the model: images -> inference logits."""
    return lambda images: self.logits(variables, images)

  def split(self, variables: Variables, tap: str = "last_conv") -> api.Split:
    """The model cut at `tap` (a name or generic alias) as an `api.Split`.

    At 'last_conv' the head is the model's own head; at an inner tap it is the network re-run
    from the images with the tap's activation replaced (`logits_with_tap_delta`).
    """
    name = self.resolve_tap(tap)
    features = lambda images: self.features(variables, images, name)
    if name == self.resolve_tap("last_conv"):
      return api.Split(features=features,
                       head=lambda activation, images: self.head(variables, activation))

    def head(activation: jax.Array, images: jax.Array) -> jax.Array:
      original = jax.lax.stop_gradient(features(images))
      if jnp.shape(activation) != jnp.shape(original):  # no silent broadcasting of a cell
        raise ValueError(f"the activation at tap {tap!r} must have the tap's shape "
                         f"{tuple(jnp.shape(original))}; got {tuple(jnp.shape(activation))}.")
      delta = activation - original
      return self.logits_with_tap_delta(variables, images, name, delta)

    return api.Split(features=features, head=head)

  def train_apply(self, variables: Variables, images: jax.Array, dropout_rng: jax.Array
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """Training-mode logits and the updated mutable collections (e.g. batch_stats)."""
    self.check_input_shape(jnp.shape(images))
    mutable = [name for name in variables if name != "params"]
    logits, updates = self.module.apply(
        variables, images, train=True, rngs={"dropout": dropout_rng}, mutable=mutable)
    return logits, dict(updates)


# Predicted class per row: logit >= 0 for one logit, argmax otherwise.
predicted_classes = api.predicted_classes


def parameter_count(variables: Variables) -> int:
  """Number of scalars in the 'params' collection."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables["params"]))
