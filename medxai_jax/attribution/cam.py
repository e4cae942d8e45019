"""Grad-CAM (Selvaraju et al. 2017) on the last convolutional feature map, batched and jit-able.

For a feature map A (channels k) and a class score y_c, the channel weights are the spatially
averaged gradients alpha_k = mean_{ij} dy_c / dA_ij^k, and the map is ReLU(sum_k alpha_k A^k),
bilinearly resized to the input. CAM and intermediate taps arrive with the feature-map issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medxai_jax.models import base


def target_scores(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Score of each image's target class; for one logit z: z for class 1, -z for class 0."""
  if logits.shape[-1] == 1:
    return jnp.where(targets == 1, logits[:, 0], -logits[:, 0])
  return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def resize_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, *size]."""
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def grad_cam(model: base.Classifier, variables: base.Variables, images: jax.Array,
             targets: jax.Array, *, relu: bool = True, upsample: bool = True) -> jax.Array:
  """Grad-CAM maps [B, H, W] (or [B, h, w] at feature resolution when upsample=False)."""
  feature_map = model.features(variables, images, "last_conv")

  def total_score(fmap: jax.Array) -> jax.Array:
    # Images are independent in inference mode, so the gradient of the sum is per image.
    return target_scores(model.head(variables, fmap), targets).sum()

  gradients = jax.grad(total_score)(feature_map)
  channel_weights = gradients.mean(axis=(1, 2))                      # [B, K]
  maps = jnp.einsum("bhwk,bk->bhw", feature_map, channel_weights)
  if relu:
    maps = jax.nn.relu(maps)
  return resize_maps(maps, images.shape[1:3]) if upsample else maps
