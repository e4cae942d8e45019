"""VGG16 (Simonyan and Zisserman 2015) with the classic FC head or the CRM paper's GAP head.

Five blocks of 3x3 'same' convolutions with ReLU (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3),
each followed by 2x2/2 max-pooling. Heads:
* 'classic': flatten the block-5 pool -> FC 4096 -> FC 4096 -> output (dropout optional);
* 'gap' (004_883d77b264ed2d14.txt, section 2.2, figure 2): truncate at the deepest convolution
  (block5_conv3, no block-5 pool), add a 512-filter 3x3 convolution with ReLU, global average
  pooling and one dense layer, the CAM-compatible architecture.
Module names follow keras.applications.VGG16 (block1_conv1, fc1, fc2, predictions).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medxai_jax.models import base
from medxai_jax.models import conv as conv_lib
from medxai_jax.models import heads

BLOCK_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAPS = ("block1", "block2", "block3", "block4", "block5", "last_conv", "embedding")


class VGG16(nn.Module):
  """VGG16 with `head_kind` 'classic' or 'gap'."""

  num_outputs: int = 1000
  head_kind: str = "classic"
  dropout_rate: float = 0.0
  gap_conv_width: int = 512
  dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    if self.head_kind not in ("classic", "gap"):
      raise ValueError(f"VGG16 head must be 'classic' or 'gap', got {self.head_kind!r}.")
    self.convs = [[nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           conv_general_dilated=conv_lib.conv_general_dilated,
                           name=f"block{b + 1}_conv{c + 1}") for c, width in enumerate(widths)]
                  for b, widths in enumerate(BLOCK_WIDTHS)]
    if self.head_kind == "classic":
      self.fc1 = nn.Dense(4096, dtype=self.dtype)
      self.fc2 = nn.Dense(4096, dtype=self.dtype)
    else:
      self.gap_conv = nn.Conv(self.gap_conv_width, (3, 3), padding=((1, 1), (1, 1)),
                              dtype=self.dtype, conv_general_dilated=conv_lib.conv_general_dilated)
    self.predictions = nn.Dense(self.num_outputs, dtype=self.dtype)
    self.relu = heads.ReLU()
    self.pool = heads.MaxPool((2, 2), (2, 2))
    self.gap = heads.GlobalAveragePool()
    self.dropout = nn.Dropout(self.dropout_rate)

  def head_input_size(self, side: int) -> int:
    """Side of the map the head reads (the block-5 pool for 'classic', 'last_conv' for 'gap')
    for a square input of `side` pixels (0: empty)."""
    pools = len(BLOCK_WIDTHS) if self.head_kind == "classic" else len(BLOCK_WIDTHS) - 1
    for _ in range(pools):
      side = base.window_output_size(side, 2, stride=2)
    return side

  def _backbone(self, x: jax.Array) -> dict[str, jax.Array]:
    """Block outputs (after pooling) and the 'last_conv' map, each marked for tap deltas."""
    taps = {}
    x = x.astype(self.dtype)
    for block_index, block in enumerate(self.convs):
      for conv in block:
        x = self.relu(conv(x))
      last_block = block_index == len(self.convs) - 1
      if last_block and self.head_kind == "gap":
        taps["block5"] = x = base.perturb_tap(self, "block5", x)
        taps["last_conv"] = base.perturb_tap(self, "last_conv", self.relu(self.gap_conv(x)))
      else:
        if last_block:
          taps["last_conv"] = x = base.perturb_tap(self, "last_conv", x)
        x = self.pool(x)
        taps[f"block{block_index + 1}"] = x = base.perturb_tap(self, f"block{block_index + 1}", x)
    return taps

  def _pool_input(self, feature_map: jax.Array) -> jax.Array:
    """What the classic head flattens (the block-5 pool) or the GAP head averages."""
    if self.head_kind == "gap":
      return feature_map
    return self.pool(feature_map)

  def _hidden(self, pooled_map: jax.Array, train: bool) -> jax.Array:
    """Features the output layer reads ('embedding') from `_pool_input`'s output."""
    if self.head_kind == "gap":
      return self.gap(pooled_map)
    x = pooled_map.reshape((pooled_map.shape[0], -1))
    x = self.dropout(self.relu(self.fc1(x)), deterministic=not train)
    return self.dropout(self.relu(self.fc2(x)), deterministic=not train)

  def _embedding(self, taps: dict[str, jax.Array], train: bool) -> jax.Array:
    """The marked 'embedding' from the backbone taps (classic: from the marked block-5 pool)."""
    pooled = taps["last_conv"] if self.head_kind == "gap" else taps["block5"]
    return base.perturb_tap(self, "embedding", self._hidden(pooled, train))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_outputs]."""
    return self.predictions(self._embedding(self._backbone(x), train)).astype(jnp.float32)

  def features(self, x: jax.Array, tap: str, train: bool = False) -> jax.Array:
    """Activation at `tap` (a name in TAPS)."""
    taps = self._backbone(x)
    if tap == "embedding":
      return self._embedding(taps, train)
    return taps[tap]

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    """Logits from the 'last_conv' map."""
    hidden = self._hidden(self._pool_input(feature_map), train)
    return self.predictions(hidden).astype(jnp.float32)


def vgg16(*, num_outputs: int = 1000, head: str = "classic",
          input_shape: tuple[int, int, int] = (224, 224, 3), **module_fields) -> base.Classifier:
  """VGG16 in the model contract ('gap' head: 004's modality classifier at 300x300)."""
  module = VGG16(num_outputs=num_outputs, head_kind=head, **module_fields)
  return base.Classifier(module=module, taps=TAPS, aliases={"stem": "block1"},
                         input_shape=tuple(input_shape), num_outputs=num_outputs)
