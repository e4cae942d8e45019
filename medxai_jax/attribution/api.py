"""The model-agnostic contract every attribution method is written against.

A method explains any JAX-traceable scoring function, whatever framework built it (Flax Linen
or NNX, Equinox, Haiku, or a plain `apply(params, x)` closed over its parameters):

    logits_fn(images [B, H, W, C]) -> logits [B, K]

    method(logits_fn, images, targets, *, key=None, **options) -> maps

Methods that read an inner layer (CAM, Grad-CAM, CRM, activation grids, the CAM family) take a
`Split` instead: the network cut at that layer into `features(images) -> activation` and
`head(activation, images) -> logits`, the network run on from an edited activation. `head`
also receives the images for networks whose later layers read earlier activations (skip
connections past the cut); a sequential network ignores them (`sequential_split`).

The class count K comes from the logits (a one-logit sigmoid model separates two classes:
z for class 1, -z for class 0). Targets are an int array [B], a Python int, or 'predicted'.
The project's models provide both views: `Classifier.logits_fn(variables)` and
`Classifier.split(variables, tap)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]
Targets = jax.Array | np.ndarray | int | str


@dataclasses.dataclass(frozen=True)
class Split:
  """A network cut at an inner layer.

  features: images [B, H, W, C] -> activation at the cut (e.g. [B, h, w, K]).
  head: (activation, images) -> logits [B, classes] of the network run on from `activation`
    (the images are those `activation` was computed from; a sequential head ignores them).
  """

  features: Callable[[jax.Array], jax.Array]
  head: Callable[[jax.Array, jax.Array], jax.Array]

  def logits(self, images: jax.Array) -> jax.Array:
    """Logits of the uncut network: head(features(images), images)."""
    return self.head(self.features(images), images)


def sequential_split(features: Callable[[jax.Array], jax.Array],
                     head: Callable[[jax.Array], jax.Array]) -> Split:
  """A `Split` of a network whose layers after the cut read only the cut's activation."""
  return Split(features=features, head=lambda activation, images: head(activation))


def output_count(logits_fn: LogitsFn, images: jax.Array) -> int:
  """Number of logits K the function returns for these images (from its output shape)."""
  shape = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(jnp.shape(images),
                                                         jnp.result_type(images))).shape
  if len(shape) != 2 or shape[0] != jnp.shape(images)[0]:
    raise ValueError(
        f"logits_fn must map images [B, H, W, C] = {tuple(jnp.shape(images))} to logits [B, K]; "
        f"it returned shape {tuple(shape)}.")
  if shape[1] < 1:
    raise ValueError("logits_fn returned zero logits per image (shape "
                     f"{tuple(shape)}); it needs at least one.")
  return int(shape[1])


def class_count(num_outputs: int) -> int:
  """Classes a model with `num_outputs` logits separates (one sigmoid logit: two)."""
  return 2 if num_outputs == 1 else num_outputs


def predicted_classes(logits: jax.Array) -> jax.Array:
  """Predicted class per row: logit >= 0 for one logit, argmax otherwise."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] >= 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def target_scores(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Score of each image's target class; for one logit z: z for class 1, -z for class 0."""
  if logits.shape[-1] == 1:
    return jnp.where(targets == 1, logits[:, 0], -logits[:, 0])
  return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _check_target_values(values: np.ndarray, count: int, one_logit: bool) -> None:
  """Raises a ValueError naming the first target outside [0, count) and its index."""
  bad = np.flatnonzero((values < 0) | (values >= count))
  if bad.size:
    meaning = (" (a one-logit sigmoid model: 0 = negative, 1 = positive class)"
               if one_logit else "")
    raise ValueError(
        f"target {int(values[bad[0]])} (targets[{int(bad[0])}]) is out of range: targets must "
        f"lie in [0, {count}) for a model with {count} classes{meaning}.")


def resolve_targets(logits_fn: LogitsFn, images: jax.Array, targets: Targets) -> jax.Array:
  """Int32 targets [B] from an int array [B], a Python int, or 'predicted', range-checked
  (when concrete) against the class count of `logits_fn`'s output."""
  batch = jnp.shape(images)[0]
  if isinstance(targets, str):
    if targets != "predicted":
      raise ValueError(f"targets must be an int, an int array [B] or 'predicted'; got {targets!r}.")
    return predicted_classes(logits_fn(images))
  if isinstance(targets, (int, np.integer)):
    targets = jnp.full((batch,), targets, jnp.int32)
  if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
    raise ValueError(f"targets must be integer class indices; got dtype "
                     f"{jnp.result_type(targets)}.")
  if jnp.ndim(targets) != 1 or jnp.shape(targets)[0] != batch:
    raise ValueError(
        f"targets must have shape [B] = ({batch},) to match the images; got shape "
        f"{tuple(jnp.shape(targets))}.")
  if not isinstance(targets, jax.core.Tracer):
    num_outputs = output_count(logits_fn, images)
    _check_target_values(np.asarray(targets), class_count(num_outputs), num_outputs == 1)
  return jnp.asarray(targets, jnp.int32)
