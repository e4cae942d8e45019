"""The model contract: every classifier offers logits, features at a named tap, and its head."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Variables = Mapping[str, Any]

# Generic tap names every architecture maps onto its own layers.
GENERIC_TAPS = ("stem", "last_conv", "embedding")


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A Flax module with the three pure views that training and attribution use.

  The module must define `__call__(x, train)`, `features(x, tap, train)` and
  `head(feature_map, train)`; `taps` lists its tap names in forward order and `aliases` maps
  the generic names ('stem', 'last_conv', 'embedding') onto them.
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
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((batch_size, *self.input_shape), jnp.float32)
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)

  def logits(self, variables: Variables, images: jax.Array) -> jax.Array:
    """Inference logits [B, num_outputs] (dropout off, BatchNorm in inference mode)."""
    return self.module.apply(variables, images, train=False)

  def features(self, variables: Variables, images: jax.Array, tap: str) -> jax.Array:
    """Activations at a named tap (inference mode)."""
    return self.module.apply(
        variables, images, self.resolve_tap(tap), train=False, method="features")

  def head(self, variables: Variables, feature_map: jax.Array) -> jax.Array:
    """Logits computed from the 'last_conv' feature map (inference mode)."""
    return self.module.apply(variables, feature_map, train=False, method="head")

  def train_apply(self, variables: Variables, images: jax.Array, dropout_rng: jax.Array
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """Training-mode logits and the updated mutable collections (e.g. batch_stats)."""
    mutable = [name for name in variables if name != "params"]
    logits, updates = self.module.apply(
        variables, images, train=True, rngs={"dropout": dropout_rng}, mutable=mutable)
    return logits, dict(updates)


def predicted_classes(logits: jax.Array) -> jax.Array:
  """Predicted class per row: logit >= 0 for one logit, argmax otherwise."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] >= 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def parameter_count(variables: Variables) -> int:
  """Number of scalars in the 'params' collection."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables["params"]))
