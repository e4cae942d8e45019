"""Shared pieces of the attribution methods: input checks, scores, gradients, chunked sums.

Notation: a scoring function `logits_fn(x) -> z(x)` [B, K] (`api.LogitsFn`) for images
x [B, H, W, C]; the explained score of an image is S_c(x) = z_c(x) for its target class c (for
a one-logit model, z for c = 1 and -z for c = 0, as `api.target_scores`), and the gradient
methods are built from the input gradient dS_c/dx (`input_gradients`).

The input contract every method shares (`resolve_inputs`): a non-empty rank-4 float batch,
finite when concrete; targets in [0, K) resolved by `api.resolve_targets`, where a one-logit
(sigmoid) model has the classes {0: negative, 1: positive}. A Classifier's minimum input size
is checked by its callers that know the Classifier (`check_inputs`, explain.run_methods).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.models import base

Targets = api.Targets
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
CHANNEL_REDUCTIONS = ("abs_sum", "sum", "max_abs")
# The one set of defaults of every method (and of the registry): gradient evaluations along a
# path, noise samples, and inputs per gradient batch. PAIR uses 100 steps for XRAI and 200 for
# Guided IG; pass num_steps to reproduce them.
NUM_STEPS = 64
NUM_SAMPLES = 32
CHUNK_SIZE = 16


# Re-exported for the methods that still import it from here; the definition is `api`'s.
target_scores = api.target_scores


def is_traced(array: Any) -> bool:
  """True while `array` is abstract (inside jit, vmap or grad), False for concrete values."""
  return isinstance(array, jax.core.Tracer)


def check_images(images: jax.Array, name: str = "images") -> None:
  """Raises a ValueError unless the array is a non-empty rank-4 [B, H, W, C] batch."""
  if jnp.ndim(images) != 4:
    raise ValueError(
        f"{name} must be a rank-4 batch [B, H, W, C]; got shape {tuple(jnp.shape(images))}.")
  if jnp.shape(images)[0] == 0:
    raise ValueError(f"{name} is an empty batch (shape {tuple(jnp.shape(images))}); pass at "
                     "least one image.")


def _non_finite_message(images: np.ndarray, bad_images: np.ndarray, name: str) -> str:
  """Names the first image with NaN/Inf values, its first such pixel and how many others."""
  first = int(bad_images[0])
  image = images[first]
  row, col, channel = (int(i) for i in np.argwhere(~np.isfinite(image))[0])
  kind = "NaN" if np.isnan(image[row, col, channel]) else "Inf"
  others = (f"; {len(bad_images) - 1} more image(s) too: {bad_images[1:11].tolist()}"
            if len(bad_images) > 1 else "")
  return (f"{name}[{first}] has non-finite values ({kind} at row {row}, column {col}, channel "
          f"{channel}, {int((~np.isfinite(image)).sum())} non-finite values){others}; "
          "attribution maps of such images would be NaN. Fix or drop these images.")


def check_image_values(images: jax.Array, name: str = "images") -> None:
  """Raises a ValueError unless the images are floating point and, when concrete, finite.

  The dtype is checked always (it is static). The finite check runs on concrete arrays only
  and is skipped while `images` is traced: checking inside jit/vmap would need either
  `jax.experimental.checkify`, which makes every caller wrap the method and unpack an error
  value, or a host callback, which raises a JaxRuntimeError asynchronously and syncs the device
  on every call. Every method entry point checks its concrete input, and callers that jit a
  method check the concrete batch first with `check_method_inputs` (explain.run_methods).
  """
  dtype = jnp.result_type(images)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name} have dtype {dtype}; the models take preprocessed float images: pixels scaled "
        "to [0, 1] (8-bit / 255, 16-bit / 65535) then normalised with config.preprocess.mean/std, "
        "as medxai_jax.data.preprocess.make_preprocess_fn does. Preprocess raw integer images "
        "first (on their 0-255 scale the maps come out orders of magnitude too large).")
  if is_traced(images):
    return
  with jax.ensure_compile_time_eval():  # concrete images closed over by a jitted caller
    finite = np.asarray(jnp.isfinite(images).all(axis=(1, 2, 3)))
  if not finite.all():
    raise ValueError(_non_finite_message(np.asarray(images), np.flatnonzero(~finite), name))


def check_inputs(model: base.Classifier, images: jax.Array, name: str = "images") -> None:
  """The images' side of the contract: a non-empty float [B, H, W, C] batch, finite when
  concrete, and at least the architecture's minimum size (`Classifier.min_input_size`)."""
  check_images(images, name)
  check_image_values(images, name)
  model.check_input_shape(tuple(jnp.shape(images)), name)


def check_positive(name: str, value: int) -> None:
  """Raises a ValueError unless the static integer option `name` is >= 1."""
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def resolve_inputs(logits_fn: api.LogitsFn, images: jax.Array, targets: Targets) -> jax.Array:
  """Checks the images (`check_images`, `check_image_values`) and returns the int32 targets [B]
  resolved against `logits_fn` (`api.resolve_targets`): every logits-only method starts here."""
  check_images(images)
  check_image_values(images)
  return api.resolve_targets(logits_fn, images, targets)


def check_method_inputs(logits_fn: api.LogitsFn, images: jax.Array,
                        targets: Targets | None = None) -> None:
  """The whole contract on concrete arrays, for callers that jit or vmap a method: raises what
  the method itself would raise outside jit (images and, if given, targets)."""
  check_images(images)
  check_image_values(images)
  if targets is not None:
    api.resolve_targets(logits_fn, images, targets)


def score_fn(logits_fn: api.LogitsFn) -> ScoreFn:
  """The map (images, targets) -> per-image target scores S_c(x) [B]."""

  def scores(images: jax.Array, targets: jax.Array) -> jax.Array:
    return api.target_scores(logits_fn(images), targets)

  return scores


def input_gradients(logits_fn: api.LogitsFn, images: jax.Array, targets: jax.Array
                    ) -> jax.Array:
  """Input gradients dS_c/dx [B, H, W, C] of each image's target score, in the images' dtype.

  The scores of different images must not depend on each other (inference mode: no batch
  statistics), so the gradient of their sum is each image's own gradient.
  """
  scores = score_fn(logits_fn)
  return jax.grad(lambda x: scores(x, targets).sum())(images).astype(jnp.result_type(images))


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
