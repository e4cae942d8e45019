"""CAM (Zhou et al. 2016) and Grad-CAM (Selvaraju et al. 2017) on a network cut at a conv map.

Notation of 004_883d77b264ed2d14.txt: A^k is the k-th map of the last convolution, w_k^c the dense
weight from its global average to class c. CAM (eq. 2): M_c(x, y) = sum_k w_k^c A^k(x, y).
Grad-CAM (eq. 3-4): alpha_k^c = (1/Z) sum_{xy} dS_c / dA^k(x, y) and L_c = ReLU(sum_k alpha_k^c
A^k); for a GAP + dense head alpha_k^c = w_k^c / Z, so Grad-CAM before its ReLU is CAM / Z.
Maps are bilinearly resized to the input. 004 writes alpha_k^c as a sum over cells; we average
(Selvaraju et al.'s 1/Z), a constant factor.

Every function takes an `api.Split` (`features(images) -> activation`, `head(activation,
images) -> logits`), so any JAX network works; for the project's models `model.split(variables,
tap)`. Grad-CAM runs at any spatial cut (the gradient flows through `split.head`). CAM reads the
class weights off the head itself, no parameter names needed: for a GAP + dense head, head(A(x,
y)) - head(0) on a 1x1 map = W A(x, y). `gap_head_problem` says when a head is not GAP + dense;
`cam` runs it on concrete arrays and raises, and skips it under jit (a traced head cannot be
inspected), where a caller checks once eagerly first. Targets resolve with
`api.resolve_targets(split.logits, ...)` (an int array [B], an int, or 'predicted').
"""

from __future__ import annotations

import flax.errors
import jax
import jax.numpy as jnp

from medxai_jax.attribution import api
from medxai_jax.attribution import common

# Score of each image's target class (z for class 1 and -z for class 0 of a one-logit model).
target_scores = api.target_scores

# Errors a head raises when it cannot take a 1x1 map (shape checks, reshapes, zero fan-ins).
HEAD_ERRORS = (TypeError, ValueError, IndexError, ZeroDivisionError, flax.errors.FlaxError)


def resize_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, *size]."""
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def check_images(images: jax.Array) -> None:
  """The images' side of the contract: a non-empty float [B, H, W, C] batch, finite when
  concrete (the split's own features check any architecture-specific minimum size)."""
  common.check_images(images)
  common.check_image_values(images)


def check_spatial(activation: jax.Array, method: str) -> None:
  """Raises a ValueError unless the split's activation is a spatial map [B, h, w, K]."""
  if jnp.ndim(activation) != 4:
    raise ValueError(f"{method} needs a spatial tap: a split whose features are a map "
                     f"[B, h, w, K]; this split's features have shape "
                     f"{tuple(jnp.shape(activation))}.")


def head_on_cells(split: api.Split, feature_map: jax.Array, images: jax.Array) -> jax.Array:
  """Logits [B, h, w, classes] of the head on every cell's feature vector seen as a 1x1 map.

  Vmapped over the h * w cells, each a batch [B, 1, 1, K] paired with its images.
  """
  batch, height, width, channels = feature_map.shape
  cells = jnp.moveaxis(feature_map.reshape(batch, height * width, channels), 1, 0)
  logits = jax.vmap(lambda cell: split.head(cell[:, None, None, :], images))(cells)
  return jnp.moveaxis(logits, 0, 1).reshape(batch, height, width, -1)


def _head_problem(split: api.Split, feature_map: jax.Array, images: jax.Array
                  ) -> tuple[str | None, jax.Array | None]:
  """(why the head is not GAP + dense or None, the per-cell logits when the head took them)."""
  try:
    per_cell = head_on_cells(split, feature_map, images)
  except HEAD_ERRORS as error:
    return ("CAM needs a head of global average pooling + one dense layer; this split's head "
            f"does not accept a 1x1 feature map ({type(error).__name__}: {error})."), None
  pooled = split.head(feature_map, images)
  if (per_cell.shape[-1] != pooled.shape[-1]
      or not jnp.allclose(per_cell.mean(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-4)):
    return ("CAM needs a head that is global average pooling + one dense layer; this split's "
            "head is not affine in the pooled features (the mean of its per-cell logits differs "
            "from its logits). Use grad_cam instead."), per_cell
  return None, per_cell


def gap_head_problem(split: api.Split, images: jax.Array) -> str | None:
  """Why CAM cannot read this split's head (not global average pooling + one dense layer), or
  None when it can. Numerical, on these concrete images: outside jit only."""
  check_images(images)
  feature_map = split.features(images)
  if common.is_traced(feature_map):
    raise ValueError("gap_head_problem inspects the head on concrete arrays; call it outside "
                     "jit (once, on a sample batch) and jit cam afterwards.")
  if jnp.ndim(feature_map) != 4:
    return (f"CAM needs a split at a spatial map [B, h, w, K]; this split's features have shape "
            f"{tuple(jnp.shape(feature_map))}.")
  return _head_problem(split, feature_map, images)[0]


def cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
        upsample: bool = True) -> jax.Array:
  """CAM maps [B, H, W] (eq. 2 of 004; [B, h, w] if not upsample) for a split at the last conv
  map whose head is GAP + one dense layer.

  On concrete arrays a head that is not raises a ValueError (`gap_head_problem`); under jit the
  check cannot run, so a jitted caller checks once eagerly first.
  """
  check_images(images)
  targets = api.resolve_targets(split.logits, images, targets)
  feature_map = split.features(images)
  check_spatial(feature_map, "CAM")
  if common.is_traced(feature_map):
    per_cell = head_on_cells(split, feature_map, images)
  else:
    problem, per_cell = _head_problem(split, feature_map, images)
    if problem:
      raise ValueError(problem)
  bias = split.head(jnp.zeros_like(feature_map[:, :1, :1]), images)        # [B, classes]
  weighted = per_cell - bias[:, None, None, :]                               # W A(x, y)
  batch, height, width, classes = weighted.shape
  maps = target_scores(weighted.reshape(-1, classes),
                       jnp.repeat(targets, height * width)).reshape(batch, height, width)
  return resize_maps(maps, images.shape[1:3]) if upsample else maps


def tap_gradients(split: api.Split, images: jax.Array, targets: api.Targets
                  ) -> tuple[jax.Array, jax.Array]:
  """The activation A at the split and dS_c/dA (same shape) of each image's target score."""
  check_images(images)
  targets = api.resolve_targets(split.logits, images, targets)
  activation = split.features(images)

  def total_score(edited: jax.Array) -> jax.Array:
    # Images are independent in inference mode, so the gradient of the sum is per image.
    return target_scores(split.head(edited, images), targets).sum()

  return activation, jax.grad(total_score)(activation)


def grad_cam(split: api.Split, images: jax.Array, targets: api.Targets, *, relu: bool = True,
             upsample: bool = True) -> jax.Array:
  """Grad-CAM maps [B, H, W] at a spatial split ([B, h, w] at its resolution if not upsample)."""
  feature_map, gradients = tap_gradients(split, images, targets)
  check_spatial(feature_map, "Grad-CAM")
  channel_weights = gradients.mean(axis=(1, 2))                      # [B, K]
  maps = jnp.einsum("bhwk,bk->bhw", feature_map, channel_weights)
  if relu:
    maps = jax.nn.relu(maps)
  return resize_maps(maps, images.shape[1:3]) if upsample else maps
