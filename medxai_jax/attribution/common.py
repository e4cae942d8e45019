"""Shared pieces of the gradient attribution methods: targets, scores, gradients, chunked sums.

Notation: a classifier with logits z(x) for images x [B, H, W, C]; the explained score of an
image is S_c(x) = z_c(x) for its target class c (for a one-logit model, z for c = 1 and -z for
c = 0, as `cam.target_scores`), and every method is built from the input gradient dS_c/dx.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import cam
from medxai_jax.models import base

Targets = jax.Array | np.ndarray | int | str
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
CHANNEL_REDUCTIONS = ("abs_sum", "sum", "max_abs")


def check_images(images: jax.Array, name: str = "images") -> None:
  """Raises a ValueError unless the array is a rank-4 [B, H, W, C] batch."""
  if jnp.ndim(images) != 4:
    raise ValueError(
        f"{name} must be a rank-4 batch [B, H, W, C]; got shape {tuple(jnp.shape(images))}.")


def check_positive(name: str, value: int) -> None:
  """Raises a ValueError unless the static integer option `name` is >= 1."""
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _concrete_values(targets: jax.Array) -> np.ndarray | None:
  """The targets as a numpy array, or None while they are traced under jit."""
  if isinstance(targets, jax.core.Tracer):
    return None
  return np.asarray(targets)


def _check_target_values(values: np.ndarray, count: int) -> None:
  """Raises a ValueError naming the first target outside [0, count)."""
  invalid = values[(values < 0) | (values >= count)]
  if invalid.size:
    raise ValueError(
        f"target {int(invalid[0])} is out of range: targets must lie in [0, {count}) for a "
        f"model with {count} classes.")


def resolve_targets(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: Targets) -> jax.Array:
  """Int32 targets [B] from an array [B], a python int, or "predicted"."""
  check_images(images)
  batch = images.shape[0]
  if isinstance(targets, str):
    if targets != "predicted":
      raise ValueError(f"targets must be an int, an int array [B] or 'predicted'; got {targets!r}.")
    return base.predicted_classes(model.logits(variables, images))
  if isinstance(targets, (int, np.integer)):
    targets = jnp.full((batch,), targets, jnp.int32)
  if jnp.ndim(targets) != 1 or jnp.shape(targets)[0] != batch:
    raise ValueError(
        f"targets must have shape [B] = ({batch},) to match the images; got shape "
        f"{tuple(jnp.shape(targets))}.")
  values = _concrete_values(targets)
  if values is not None:
    _check_target_values(values, model.num_classes)
  return jnp.asarray(targets, jnp.int32)


def score_fn(model: base.Classifier, variables: base.Variables) -> ScoreFn:
  """The map (images, targets) -> per-image target scores S_c(x) [B]."""

  def scores(images: jax.Array, targets: jax.Array) -> jax.Array:
    return cam.target_scores(model.logits(variables, images), targets)

  return scores


def input_gradients(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: jax.Array) -> jax.Array:
  """Input gradients dS_c/dx [B, H, W, C] of each image's target score."""
  scores = score_fn(model, variables)
  # Images are independent in inference mode, so the gradient of the sum is per image.
  return jax.grad(lambda x: scores(x, targets).sum())(images)


def tile_batch(array: jax.Array, copies: int) -> jax.Array:
  """Repeats a batch `copies` times along axis 0 (copy-major), matching a reshape of [k, B]."""
  return jnp.tile(array, (copies,) + (1,) * (array.ndim - 1))


def chunked_sum(fn: Callable[[jax.Array], Any], num_items: int, chunk_size: int) -> Any:
  """Sum over items 0..num_items-1 of fn's per-item outputs, one chunk in memory at a time.

  `fn` maps int32 item indices [k] to a pytree whose leaves have a leading axis k. The last
  chunk is padded with copies of the last index whose outputs are masked out.
  """
  check_positive("num_items", num_items)
  check_positive("chunk_size", chunk_size)
  chunk_size = min(chunk_size, num_items)
  num_chunks = -(-num_items // chunk_size)
  indices = np.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size)
  valid = jnp.asarray(indices < num_items)
  indices = jnp.asarray(np.minimum(indices, num_items - 1), jnp.int32)

  def masked_chunk_sum(chunk_indices: jax.Array, chunk_valid: jax.Array) -> Any:
    outputs = fn(chunk_indices)
    return jax.tree.map(
        lambda leaf: jnp.where(chunk_valid.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf,
                               jnp.zeros_like(leaf)).sum(axis=0),
        outputs)

  first = masked_chunk_sum(indices[0], valid[0])
  if num_chunks == 1:
    return first

  def accumulate(total: Any, chunk: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
    return jax.tree.map(jnp.add, total, masked_chunk_sum(*chunk)), None

  total, _ = jax.lax.scan(accumulate, first, (indices[1:], valid[1:]))
  return total


def reduce_channels(maps: jax.Array, how: str = "abs_sum") -> jax.Array:
  """Display maps [B, H, W] from attributions [B, H, W, C]: 'abs_sum', 'sum' or 'max_abs'."""
  check_images(maps, "maps")
  if how == "abs_sum":
    return jnp.abs(maps).sum(axis=-1)
  if how == "sum":
    return maps.sum(axis=-1)
  if how == "max_abs":
    return jnp.abs(maps).max(axis=-1)
  raise ValueError(f"Unknown channel reduction {how!r}; expected one of {CHANNEL_REDUCTIONS}.")
