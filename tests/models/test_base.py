"""The Classifier contract (`models/base.py`): the architecture's minimum input size, refused
below it at init and in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import tiny
from medxai_jax.models import custom_cnn
from medxai_jax.models import densenet
from medxai_jax.models import vgg


def test_training_and_init_refuse_inputs_below_the_minimum(three_class):
  """config.model.input_shape below the minimum fails at init (VGG16's classic head used to
  raise ZeroDivisionError in its initialiser: a zero fan-in); train_apply checks each batch."""
  with pytest.raises(ValueError, match=r"16x16 .*32x32 minimum of VGG16"):
    vgg.vgg16(num_outputs=2, head="classic", input_shape=(16, 16, 3)).init(jax.random.key(0))
  model, variables = three_class
  with pytest.raises(ValueError, match=r"20x40 .*29x29"):
    model.train_apply(variables, jnp.zeros((1, 20, 40, 1)), jax.random.key(0))


def _head_input_side(model, side: int) -> int:
  """Independent oracle: the side of the map the head reads, by abstract evaluation of the
  module itself (no size arithmetic), 0 for an empty map."""
  channels = model.input_shape[-1]
  variables = jax.eval_shape(model.init, jax.random.key(0))
  module = model.module

  def head_input(v, x):
    feature_map = module.apply(v, x, model.resolve_tap("last_conv"), train=False,
                               method="features")
    if isinstance(module, vgg.VGG16):
      return module.apply(v, feature_map, method=lambda m, f: m._pool_input(f))
    if isinstance(module, custom_cnn.CustomCNN) and module.pool_after[-1]:
      return custom_cnn._max_pool(feature_map)
    return feature_map

  shape = jax.eval_shape(head_input, variables,
                         jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)).shape
  return min(shape[1], shape[2])


@pytest.mark.parametrize("model", [
    tiny.densenet(input_shape=(64, 64, 1)),
    densenet.densenet(depth=121, input_shape=(224, 224, 3)),
    vgg.vgg16(head="gap", num_outputs=2, input_shape=(64, 64, 3)),
    vgg.vgg16(head="classic", num_outputs=2, input_shape=(224, 224, 3)),
    custom_cnn.custom_cnn(num_outputs=2, input_shape=(64, 64, 1), conv_widths=(4, 4, 4, 4, 4),
                          dense_widths=(4,)),
    custom_cnn.custom_cnn(num_outputs=2, input_shape=(64, 64, 1), conv_widths=(4, 4, 4, 4, 4),
                          first_kernel_size=11, first_stride=4,
                          pool_after=(True, False, False, False, False), dense_widths=(4,)),
], ids=["densenet_tiny", "densenet121", "vgg_gap", "vgg_classic", "custom_cnn", "custom_cnn_k11"])
def test_min_input_size_is_the_smallest_side_with_a_non_empty_map(model):
  """min_input_size s: the module's own head input is non-empty at s and empty at s - 1."""
  minimum = model.min_input_size
  assert _head_input_side(model, minimum) >= 1
  assert _head_input_side(model, minimum - 1) == 0
