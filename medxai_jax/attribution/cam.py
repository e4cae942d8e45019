"""CAM (Zhou et al. 2016) and Grad-CAM (Selvaraju et al. 2017) on the last conv feature map.

Notation of 004_883d77b264ed2d14.txt: A^k is the k-th map of the last convolution, w_k^c the dense
weight from its global average to class c. CAM (eq. 2): M_c(x, y) = sum_k w_k^c A^k(x, y).
Grad-CAM (eq. 3-4): alpha_k^c = (1/Z) sum_{xy} dS_c / dA^k(x, y) and L_c = ReLU(sum_k alpha_k^c
A^k); for a GAP + dense head alpha_k^c = w_k^c / Z, so Grad-CAM before its ReLU is CAM / Z.
Maps are bilinearly resized to the input. Grad-CAM also runs at any spatial tap: the gradient
w.r.t. the tap's activation comes from `Classifier.split_at_tap` (the network re-run from the tap).
004 writes alpha_k^c as a sum over cells; we average (Selvaraju et al.'s 1/Z), a constant factor.
Images and targets follow the contract of `common` (checked and range-checked as for IG).
"""

from __future__ import annotations

import flax.errors
import jax
import jax.numpy as jnp

from medxai_jax.attribution import common
from medxai_jax.models import base

# Score of each image's target class (z for class 1 and -z for class 0 of a one-logit model).
target_scores = common.target_scores


def resize_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, *size]."""
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def _head_at_each_location(model: base.Classifier, variables: base.Variables,
                           feature_map: jax.Array) -> jax.Array:
  """Head logits of every spatial cell's feature vector seen as a 1x1 map: [B, h, w, classes]."""
  batch, height, width, channels = feature_map.shape
  cells = feature_map.reshape(batch * height * width, 1, 1, channels)
  try:
    logits = model.head(variables, cells)
  except (TypeError, ValueError, ZeroDivisionError, flax.errors.FlaxError) as error:
    raise ValueError(
        f"CAM needs a head of global average pooling + one dense layer; the head of "
        f"{type(model.module).__name__} does not accept a 1x1 feature map ({error}).") from error
  return logits.reshape(batch, height, width, -1)


def cam(model: base.Classifier, variables: base.Variables, images: jax.Array,
        targets: jax.Array, *, upsample: bool = True, check_head: bool = True) -> jax.Array:
  """CAM maps [B, H, W] (eq. 2 of 004) for models whose head is GAP + one dense layer.

  The class weights are read off the head itself: for an affine head, head(A(x, y)) - head(0)
  = W A(x, y), so no parameter names are needed. With `check_head` (not under jit) a head that is
  not affine in the pooled features raises a ValueError instead of returning a wrong map.
  """
  targets = common.resolve_inputs(model.logits_fn(variables), images, targets)
  feature_map = model.features(variables, images, "last_conv")
  per_cell = _head_at_each_location(model, variables, feature_map)
  bias = model.head(variables, jnp.zeros_like(feature_map[:, :1, :1]))      # [B, classes]
  if check_head:
    pooled = model.head(variables, feature_map)
    if not jnp.allclose(per_cell.mean(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-4):
      raise ValueError(f"CAM needs a head that is global average pooling + one dense layer; "
                       f"the head of {type(model.module).__name__} is not affine in the pooled "
                       "features. Use grad_cam instead.")
  weighted = per_cell - bias[:, None, None, :]                                 # W A(x, y)
  batch, height, width, classes = weighted.shape
  maps = target_scores(weighted.reshape(-1, classes),
                       jnp.repeat(targets, height * width)).reshape(batch, height, width)
  return resize_maps(maps, images.shape[1:3]) if upsample else maps


def tap_gradients(model: base.Classifier, variables: base.Variables, images: jax.Array,
                  targets: jax.Array, tap: str = "last_conv") -> tuple[jax.Array, jax.Array]:
  """The activation A at `tap` and dS_c/dA (same shape) of each image's target score."""
  targets = common.resolve_inputs(model.logits_fn(variables), images, targets)
  name = model.resolve_tap(tap)
  if name == model.resolve_tap("last_conv"):
    activation = model.features(variables, images, name)
    logits_of = lambda fmap: model.head(variables, fmap)
  else:
    activation, rest = model.split_at_tap(variables, images, name)
    logits_of = lambda fmap: rest(fmap - jax.lax.stop_gradient(activation))

  def total_score(fmap: jax.Array) -> jax.Array:
    # Images are independent in inference mode, so the gradient of the sum is per image.
    return target_scores(logits_of(fmap), targets).sum()

  return activation, jax.grad(total_score)(activation)


def grad_cam(model: base.Classifier, variables: base.Variables, images: jax.Array,
             targets: jax.Array, *, tap: str = "last_conv", relu: bool = True,
             upsample: bool = True) -> jax.Array:
  """Grad-CAM maps [B, H, W] at a spatial `tap` ([B, h, w] at its resolution if not upsample)."""
  feature_map, gradients = tap_gradients(model, variables, images, targets, tap)
  if feature_map.ndim != 4:
    raise ValueError(f"Grad-CAM needs a spatial tap with activations [B, h, w, K]; tap {tap!r} "
                     f"of {type(model.module).__name__} has shape {feature_map.shape}.")
  channel_weights = gradients.mean(axis=(1, 2))                      # [B, K]
  maps = jnp.einsum("bhwk,bk->bhw", feature_map, channel_weights)
  if relu:
    maps = jax.nn.relu(maps)
  return resize_maps(maps, images.shape[1:3]) if upsample else maps
