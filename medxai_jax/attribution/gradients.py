"""Vanilla gradients (Simonyan et al. 2014) and SmoothGrad (Smilkov et al. 2017).

Vanilla gradient: M_c(x) = dS_c(x)/dx, the gradient of the target score S_c at the image x.
SmoothGrad: M^_c(x) = 1/n sum_{i=1..n} M_c(x + g_i) with g_i ~ N(0, sigma^2),
sigma = noise_level * (max(x) - min(x)) per image; the squared variant averages M_c(x + g_i)^2.

Both take any scoring function `logits_fn(images) -> logits [B, K]` (`api.LogitsFn`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medxai_jax.attribution import api
from medxai_jax.attribution import common

DEFAULT_NUM_SAMPLES = common.NUM_SAMPLES
DEFAULT_NOISE_LEVEL = 0.15
DEFAULT_CHUNK_SIZE = common.CHUNK_SIZE


def vanilla_gradients(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets
                      ) -> jax.Array:
  """Gradient maps dS_c/dx [B, H, W, C] of each image's target score."""
  targets = common.resolve_inputs(logits_fn, images, targets)
  return common.input_gradients(logits_fn, images, targets)


def noise_scales(images: jax.Array, noise_level: float) -> jax.Array:
  """Per-image noise standard deviations noise_level * (max - min), shaped [B, 1, 1, 1]."""
  spread = images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3))
  return (noise_level * spread)[:, None, None, None]


def smoothgrad(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets, *,
               key: jax.Array, num_samples: int = DEFAULT_NUM_SAMPLES,
               noise_level: float = DEFAULT_NOISE_LEVEL, squared: bool = False,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """SmoothGrad maps [B, H, W, C]: mean (squared) gradient over noisy copies of each image."""
  common.check_positive("num_samples", num_samples)
  if key is None:
    raise ValueError("smoothgrad draws its noise from a PRNG key: pass key=jax.random.key(...).")
  targets = common.resolve_inputs(logits_fn, images, targets)
  scales = noise_scales(images, noise_level)

  def chunk_gradients(sample_indices: jax.Array) -> jax.Array:
    # Sample i draws its noise from fold_in(key, i), one sample at a time (lax.map, not vmap,
    # which changes the bits of 'rbg' keys), so the result does not depend on chunking.
    noise = jax.lax.map(
        lambda index: jax.random.normal(jax.random.fold_in(key, index), images.shape,
                                        images.dtype), sample_indices)
    noisy = images[None] + noise * scales[None]                       # [k, B, H, W, C]
    count = sample_indices.shape[0]
    grads = common.input_gradients(
        logits_fn, noisy.reshape((-1,) + images.shape[1:]), common.tile_batch(targets, count))
    grads = grads.reshape(noisy.shape)
    return jnp.square(grads) if squared else grads

  return common.chunked_sum(chunk_gradients, num_samples, chunk_size) / num_samples
