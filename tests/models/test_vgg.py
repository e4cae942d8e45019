"""VGG16: parameter counts against keras.applications (models/vgg.py)."""

import tiny
from medxai_jax.models import vgg

_shapes = tiny.variable_shapes
_size = tiny.size

def test_vgg16_parameter_counts_match_keras():
  classic = _shapes(vgg.vgg16(num_outputs=1000))["params"]
  assert _size(classic) == 138_357_544
  convs = {k: v for k, v in classic.items() if k.startswith("block")}
  assert _size(convs) == 14_714_688  # include_top=False
  gap = _shapes(vgg.vgg16(num_outputs=7, head="gap", input_shape=(300, 300, 3)))["params"]
  # 004: truncated VGG16 + conv 512 3x3 + GAP + dense(7).
  assert _size(gap) == 14_714_688 + (3 * 3 * 512 * 512 + 512) + (512 * 7 + 7)
