"""DenseNet-121/169/201 (Huang et al. 2017) as keras.applications and torchvision build them.

Stem: 7x7/2 conv (64, no bias, padding 3) -> BN -> ReLU -> 3x3/2 max-pool (padding 1). Dense
block layer: BN -> ReLU -> 1x1 conv (4k) -> BN -> ReLU -> 3x3 conv (k), concatenated to its
input; growth k=32. Transition: BN -> ReLU -> 1x1 conv (half the channels) -> 2x2/2 average pool.
Final BN -> ReLU is the 'last_conv' map; global average pooling gives 'embedding'. Module names
follow Keras' layer names (conv2_block1_1_conv, pool2_bn, bn, ...) so porting is a rename.
BatchNorm epsilon is 1.001e-5 as in Keras (torchvision uses 1e-5; set `bn_epsilon`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medxai_jax.models import base
from medxai_jax.models import conv as conv_lib
from medxai_jax.models import heads

BLOCK_SIZES = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32)}
TAPS = ("stem", "block1", "transition1", "block2", "transition2", "block3", "transition3",
        "block4", "last_conv", "embedding")


class DenseNetBackbone(nn.Module):
  """The convolutional part; returns every tap's activation by name (each marked for deltas)."""

  block_sizes: Sequence[int] = BLOCK_SIZES[169]
  growth_rate: int = 32
  stem_width: int = 64
  bottleneck_factor: int = 4
  compression: float = 0.5
  bn_epsilon: float = 1.001e-5
  bn_momentum: float = 0.99
  dtype: jnp.dtype = jnp.float32

  def _bn_relu(self, x: jax.Array, name: str, train: bool) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name=name)(x)
    return heads.ReLU(name=name[:-2] + "relu")(x)  # conv1_bn -> conv1_relu, bn -> relu (Keras)

  def _conv(self, x: jax.Array, features: int, size: int, name: str, stride: int = 1,
            padding: int = 0) -> jax.Array:
    return nn.Conv(features, (size, size), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=False,
                   dtype=self.dtype, conv_general_dilated=conv_lib.conv_general_dilated,
                   name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    taps = {}
    x = self._conv(x.astype(self.dtype), self.stem_width, 7, "conv1_conv", stride=2, padding=3)
    x = base.perturb_tap(self, "stem", self._bn_relu(x, "conv1_bn", train))
    taps["stem"] = x
    x = heads.MaxPool((3, 3), (2, 2), ((1, 1), (1, 1)), name="pool1")(x)
    for block_index, num_layers in enumerate(self.block_sizes):
      stage = block_index + 2  # Keras numbers the dense blocks conv2..conv5
      for layer in range(1, num_layers + 1):
        prefix = f"conv{stage}_block{layer}"
        y = self._bn_relu(x, f"{prefix}_0_bn", train)
        y = self._conv(y, self.bottleneck_factor * self.growth_rate, 1, f"{prefix}_1_conv")
        y = self._bn_relu(y, f"{prefix}_1_bn", train)
        y = self._conv(y, self.growth_rate, 3, f"{prefix}_2_conv", padding=1)
        x = jnp.concatenate([x, y], axis=-1)
      x = base.perturb_tap(self, f"block{block_index + 1}", x)
      taps[f"block{block_index + 1}"] = x
      if block_index < len(self.block_sizes) - 1:
        y = self._bn_relu(x, f"pool{stage}_bn", train)
        y = self._conv(y, int(x.shape[-1] * self.compression), 1, f"pool{stage}_conv")
        x = base.perturb_tap(self, f"transition{block_index + 1}",
                             heads.AvgPool((2, 2), (2, 2), name=f"pool{stage}_pool")(y))
        taps[f"transition{block_index + 1}"] = x
    taps["last_conv"] = base.perturb_tap(self, "last_conv", self._bn_relu(x, "bn", train))
    pooled = heads.GlobalAveragePool(name="avg_pool")(taps["last_conv"])
    taps["embedding"] = base.perturb_tap(self, "embedding", pooled)
    return taps


class DenseNet(nn.Module):
  """DenseNet backbone + a classifier head on globally pooled features."""

  num_outputs: int = 1000
  depth: int = 169
  head_kind: str = "softmax"
  head_hidden_widths: Sequence[int] = ()
  head_dropout_rate: float = 0.0
  bn_epsilon: float = 1.001e-5
  block_sizes: Sequence[int] = ()  # overrides `depth` (small variants for tests and demos)
  growth_rate: int = 32
  stem_width: int = 64
  dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    if not self.block_sizes and self.depth not in BLOCK_SIZES:
      raise ValueError(f"DenseNet depth must be one of {sorted(BLOCK_SIZES)}, got {self.depth}.")
    if self.block_sizes and len(self.block_sizes) != 4:
      raise ValueError(f"DenseNet block_sizes needs four entries, got {tuple(self.block_sizes)}.")
    self.backbone = DenseNetBackbone(
        block_sizes=tuple(self.block_sizes) or BLOCK_SIZES[self.depth],
        growth_rate=self.growth_rate, stem_width=self.stem_width, bn_epsilon=self.bn_epsilon,
        dtype=self.dtype)
    self.classifier = heads.make_head(self.head_kind, self.num_outputs, self.head_hidden_widths,
                                      self.head_dropout_rate, self.dtype)

  def head_input_size(self, side: int) -> int:
    """Side of the 'last_conv' map for a square input of `side` pixels (0: empty)."""
    side = base.window_output_size(side, 7, stride=2, padding=6)        # conv1_conv
    side = base.window_output_size(side, 3, stride=2, padding=2)        # stem max-pool
    for _ in range(len(tuple(self.block_sizes) or BLOCK_SIZES.get(self.depth, ())) - 1):
      side = base.window_output_size(side, 2, stride=2)                 # transition pools
    return side

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_outputs]."""
    return self.classifier(self.backbone(x, train)["embedding"], train)

  def features(self, x: jax.Array, tap: str, train: bool = False) -> jax.Array:
    """Activation at `tap` (a name in TAPS)."""
    return self.backbone(x, train)[tap]

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    """Logits from the 'last_conv' map (global average pool + head)."""
    return self.classifier(heads.global_average_pool(feature_map), train)


def densenet(*, depth: int = 169, num_outputs: int = 1, head: str = "sigmoid",
             input_shape: tuple[int, int, int] = (320, 320, 3), **module_fields
             ) -> base.Classifier:
  """A DenseNet in the model contract (defaults: 000's MURA model, 320x320, one logit)."""
  module = DenseNet(num_outputs=num_outputs, depth=depth, head_kind=head, **module_fields)
  return base.Classifier(module=module, taps=TAPS, aliases={}, input_shape=tuple(input_shape),
                         num_outputs=num_outputs)
