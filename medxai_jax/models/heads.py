"""Classifier heads on pooled features: one-logit sigmoid, softmax, and RadiNet's dense stack.

001_1a0a1523609161bb.txt (section 3.3) puts "five dense layers on top" of DenseNet-169; we read
that as four hidden ReLU layers plus the output layer, with widths set by config.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

RADINET_HIDDEN_WIDTHS = (1024, 512, 256, 128)


class DenseHead(nn.Module):
  """Hidden ReLU dense layers (with dropout) then the output layer 'predictions'."""

  num_outputs: int
  hidden_widths: Sequence[int] = ()
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_outputs] from pooled features [B, C]."""
    x = pooled
    for index, width in enumerate(self.hidden_widths):
      x = ReLU(name=f"dense{index + 1}_relu")(
          nn.Dense(width, dtype=self.dtype, name=f"dense{index + 1}")(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="predictions")(x).astype(jnp.float32)


def make_head(kind: str, num_outputs: int, hidden_widths: Sequence[int] = (),
              dropout_rate: float = 0.0, dtype: jnp.dtype = jnp.float32) -> DenseHead:
  """'sigmoid' (one logit), 'softmax' (num_outputs logits) or 'radinet' (dense stack)."""
  if kind == "sigmoid":
    if num_outputs != 1:
      raise ValueError(f"A sigmoid head has one logit; got num_outputs={num_outputs}.")
    return DenseHead(1, tuple(hidden_widths), dropout_rate, dtype)
  if kind == "softmax":
    if num_outputs < 2:
      raise ValueError(f"A softmax head needs num_outputs >= 2; got {num_outputs}.")
    return DenseHead(num_outputs, tuple(hidden_widths), dropout_rate, dtype)
  if kind == "radinet":
    widths = tuple(hidden_widths) or RADINET_HIDDEN_WIDTHS
    return DenseHead(num_outputs, widths, dropout_rate, dtype)
  raise ValueError(f"head={kind!r} is not one of 'sigmoid', 'softmax', 'radinet'.")


def global_average_pool(feature_map: jax.Array) -> jax.Array:
  """Mean over the spatial axes of [B, H, W, C] (any input size)."""
  return feature_map.mean(axis=(1, 2))


# Parameterless layers for the activation and pooling functions the architectures use, so that
# transforms that intercept Flax modules (attribution/lrp.py gives each a relevance rule) see
# them as layers. They hold no variables: checkpoints and parameter trees are unchanged.


class ReLU(nn.Module):
  """nn.relu as a layer."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(x)


class MaxPool(nn.Module):
  """nn.max_pool as a layer."""

  window: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any = "VALID"

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.max_pool(x, self.window, strides=self.strides, padding=self.padding)


class AvgPool(nn.Module):
  """nn.avg_pool as a layer (padding cells count as zeros, as in nn.avg_pool)."""

  window: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any = "VALID"

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, self.window, strides=self.strides, padding=self.padding)


class GlobalAveragePool(nn.Module):
  """`global_average_pool` as a layer."""

  def __call__(self, feature_map: jax.Array) -> jax.Array:
    return global_average_pool(feature_map)
