"""On-device preprocessing from stored uint8 images to model inputs."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] (or float) images to float32 in [0, 1]."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def match_channels(images: jax.Array, channels: int) -> jax.Array:
  """Repeats a gray channel to `channels`, or averages RGB to gray when `channels` is 1."""
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1:
    return jnp.repeat(images, channels, axis=-1)
  if channels == 1:
    return images.mean(axis=-1, keepdims=True)
  raise ValueError(f"Cannot map images with {have} channels to {channels} channels.")


def make_preprocess_fn(input_shape: Sequence[int], mean: Sequence[float] = (0.0,),
                       std: Sequence[float] = (1.0,)) -> Callable[[jax.Array], jax.Array]:
  """A jit-able map from a uint8 batch [B,H,W,C] to normalised float32 [B, *input_shape]."""
  height, width, channels = input_shape
  mean_array = jnp.asarray(mean, jnp.float32)
  std_array = jnp.asarray(std, jnp.float32)
  if (std_array <= 0).any():
    raise ValueError(f"config.preprocess.std must be positive, got {tuple(std)}.")

  def preprocess(images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"Expected images [B, H, W, C], got shape {images.shape}.")
    x = match_channels(to_unit_range(images), channels)
    if x.shape[1:3] != (height, width):
      x = jax.image.resize(x, (x.shape[0], height, width, channels), method="bilinear",
                           antialias=True)
    return (x - mean_array) / std_array

  return preprocess
