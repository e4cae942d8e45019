"""The customised chest-X-ray CNN of Rajaraman et al. (002_5c5237004c36e0a4.txt, section II-B).

Five convolutions and three fully connected layers on 227x227x3 inputs: conv1 has 96 7x7
filters with stride 2; the other convolutions have 3x3 filters (128, 256, 256, 256); local
response normalisation and 3x3/2 max-pooling follow conv1 and conv2; FC 4096-4096-classes with
dropout 0.5 on the first two; weights drawn from N(0, 0.01).

Where the paper is silent we follow AlexNet (its reference [19], which the design mirrors):
conv1 is unpadded, 3x3 convolutions keep the size (padding 1), a 3x3/2 max-pool follows conv5
before the classifier, LRN uses a 5-channel window with k=2, alpha=1e-4, beta=0.75 (alpha scaled
by the window size, as MATLAB, Caffe and PyTorch do) and biases start at zero. Faithful shapes:
227 -> conv1 111 -> pool 55 -> conv2 55 -> pool 27 -> conv3..5 27 -> pool 13 -> 43264 -> 4096.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medxai_jax.models import base
from medxai_jax.models import conv as conv_lib

TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
ALIASES = {"stem": "conv1", "last_conv": "conv5", "embedding": "fc7"}


def local_response_norm(x: jax.Array, size: int = 5, k: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75) -> jax.Array:
  """Cross-channel LRN: x / (k + alpha / size * sum of x^2 over `size` neighbouring channels)^beta."""
  squared = jnp.square(x)
  window_sum = jax.lax.reduce_window(
      squared, 0.0, jax.lax.add,
      window_dimensions=(1,) * (x.ndim - 1) + (size,),
      window_strides=(1,) * x.ndim,
      padding=((0, 0),) * (x.ndim - 1) + ((size // 2, (size - 1) // 2),))
  return x / jnp.power(k + (alpha / size) * window_sum, beta)


def _max_pool(x: jax.Array) -> jax.Array:
  """3x3 max-pooling with stride 2 and no padding."""
  return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class CustomCNN(nn.Module):
  """The 5-conv + 3-FC CNN; widths are configurable so small variants train on a CPU."""

  num_outputs: int = 2
  conv_widths: Sequence[int] = (96, 128, 256, 256, 256)
  first_kernel_size: int = 7
  first_stride: int = 2
  dense_widths: Sequence[int] = (4096, 4096)
  dropout_rate: float = 0.5
  lrn_after: Sequence[bool] = (True, True, False, False, False)
  pool_after: Sequence[bool] = (True, True, False, False, True)
  init_std: float | None = 0.01  # None: He-normal (fan-in) initialisation instead of N(0, 0.01)
  use_batchnorm: bool = False    # not in the paper; for experiments that want BatchNorm
  dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    if len(self.conv_widths) != 5 or len(self.lrn_after) != 5 or len(self.pool_after) != 5:
      raise ValueError(
          "CustomCNN needs five entries in conv_widths, lrn_after and pool_after; got "
          f"{len(self.conv_widths)}, {len(self.lrn_after)} and {len(self.pool_after)}.")
    kernel_init = (nn.initializers.he_normal() if self.init_std is None
                   else nn.initializers.normal(stddev=self.init_std))
    convs = []
    for index, width in enumerate(self.conv_widths):
      first = index == 0
      size = self.first_kernel_size if first else 3
      convs.append(nn.Conv(
          width, (size, size),
          strides=(self.first_stride,) * 2 if first else (1, 1),
          padding="VALID" if first else ((1, 1), (1, 1)),
          kernel_init=kernel_init, dtype=self.dtype,
          conv_general_dilated=conv_lib.conv_general_dilated, name=f"conv{index + 1}"))
    self.convs = convs
    if self.use_batchnorm:
      self.norms = [nn.BatchNorm(momentum=0.9, dtype=self.dtype, name=f"bn{i + 1}")
                    for i in range(5)]
    self.dense = [nn.Dense(width, kernel_init=kernel_init, dtype=self.dtype, name=f"fc{i + 6}")
                  for i, width in enumerate(self.dense_widths)]
    self.classifier = nn.Dense(self.num_outputs, kernel_init=kernel_init, dtype=self.dtype,
                               name=f"fc{len(self.dense_widths) + 6}")
    self.dropout = nn.Dropout(self.dropout_rate)

  def head_input_size(self, side: int) -> int:
    """Side of the map the FC layers flatten (after pool5, if any) for a square input of
    `side` pixels (0: empty)."""
    side = base.window_output_size(side, self.first_kernel_size, stride=self.first_stride)
    for pooled in self.pool_after:                      # 3x3 convs keep the size (padding 1)
      if pooled:
        side = base.window_output_size(side, 3, stride=2)
    return side

  def _conv_stack(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Runs conv1..conv5 and returns each post-ReLU activation by tap name."""
    activations = {}
    x = x.astype(self.dtype)
    for index, conv in enumerate(self.convs):
      if index > 0:
        previous = index - 1
        if self.lrn_after[previous]:
          x = local_response_norm(x)
        if self.pool_after[previous]:
          x = _max_pool(x)
      x = conv(x)
      if self.use_batchnorm:
        x = self.norms[index](x, use_running_average=not train)
      x = base.perturb_tap(self, f"conv{index + 1}", nn.relu(x))
      activations[f"conv{index + 1}"] = x
    return activations

  def _classifier(self, feature_map: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs pool5 (if any), the hidden FC layers and the output layer."""
    x = feature_map
    if self.lrn_after[-1]:
      x = local_response_norm(x)
    if self.pool_after[-1]:
      x = _max_pool(x)
    x = x.reshape((x.shape[0], -1))
    hidden = {}
    for index, dense in enumerate(self.dense):
      x = base.perturb_tap(self, f"fc{index + 6}", nn.relu(dense(x)))
      hidden[f"fc{index + 6}"] = x
      x = self.dropout(x, deterministic=not train)
    return self.classifier(x).astype(jnp.float32), hidden

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_outputs]."""
    activations = self._conv_stack(x, train)
    logits, _ = self._classifier(activations["conv5"], train)
    return logits

  def features(self, x: jax.Array, tap: str, train: bool = False) -> jax.Array:
    """Activation at `tap` (a name in TAPS)."""
    activations = self._conv_stack(x, train)
    if tap in activations:
      return activations[tap]
    _, hidden = self._classifier(activations["conv5"], train)
    return hidden[tap]

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    """Logits from the conv5 feature map."""
    logits, _ = self._classifier(feature_map, train)
    return logits


def custom_cnn(*, num_outputs: int = 2, input_shape: tuple[int, int, int] = (227, 227, 3),
               **module_fields) -> base.Classifier:
  """The custom CNN wrapped in the model contract."""
  module = CustomCNN(num_outputs=num_outputs, **module_fields)
  taps = TAPS[:5] + tuple(f"fc{i + 6}" for i in range(len(module.dense_widths)))
  aliases = dict(ALIASES, embedding=taps[-1]) if len(taps) > 5 else {
      k: v for k, v in ALIASES.items() if k != "embedding"}
  return base.Classifier(module=module, taps=taps, aliases=aliases,
                         input_shape=tuple(input_shape), num_outputs=num_outputs)
