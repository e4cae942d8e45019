"""The custom CNN of 002: layer shapes and parameter count from the paper's text, LRN, contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.models import base
from medxai_jax.models import custom_cnn
from medxai_jax.models import registry


def _conv_out(size, kernel, stride, pad):
  return (size + 2 * pad - kernel) // stride + 1


def test_faithful_shapes_and_parameter_count_follow_the_paper():
  # 002 section II-B: 227x227x3 input, conv1 96@7x7/2, LRN + 3x3/2 max-pool after conv1 and
  # conv2, conv2 128, conv3-5 256 @3x3, FC 4096-4096-2 (pool5 and paddings as AlexNet).
  model = custom_cnn.custom_cnn(num_outputs=2)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  size = _conv_out(227, 7, 2, 0)            # conv1: 111
  conv_sizes = [size]
  size = _conv_out(size, 3, 2, 0)           # pool1: 55
  conv_sizes.append(size)                   # conv2 keeps 55
  size = _conv_out(size, 3, 2, 0)           # pool2: 27
  conv_sizes += [size] * 3                  # conv3..5: 27
  flat = _conv_out(size, 3, 2, 0) ** 2 * 256  # pool5: 13 -> 43264
  channels = [3, 96, 128, 256, 256, 256]
  kernels = [7, 3, 3, 3, 3]
  expected = sum(k * k * cin * cout + cout
                 for k, cin, cout in zip(kernels, channels[:-1], channels[1:]))
  expected += flat * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 2 + 2
  assert base.parameter_count(variables) == expected == 195_603_202

  images = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)
  for index, (tap, width) in enumerate(zip(custom_cnn.TAPS[:5], channels[1:])):
    shape = jax.eval_shape(lambda v, x: model.features(v, x, tap), variables, images).shape
    assert shape == (2, conv_sizes[index], conv_sizes[index], width), tap
  assert jax.eval_shape(lambda v, x: model.features(v, x, "embedding"),
                        variables, images).shape == (2, 4096)
  assert jax.eval_shape(model.logits, variables, images).shape == (2, 2)


def test_faithful_init_is_normal_with_std_001():
  model = custom_cnn.custom_cnn(num_outputs=2, input_shape=(67, 67, 3),
                                conv_widths=(96, 128, 64, 64, 64), dense_widths=(256, 256))
  params = model.init(jax.random.key(0))["params"]
  kernel = np.asarray(params["conv2"]["kernel"]).ravel()
  assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
  assert not np.asarray(params["conv2"]["bias"]).any()


def _naive_lrn(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
  out = np.empty_like(x)
  channels = x.shape[-1]
  for c in range(channels):
    lo, hi = max(0, c - size // 2), min(channels, c + size // 2 + 1)
    out[..., c] = x[..., c] / (k + alpha / size * np.sum(x[..., lo:hi] ** 2, axis=-1)) ** beta
  return out


def test_local_response_norm_matches_the_formula():
  x = np.random.default_rng(0).normal(scale=30.0, size=(2, 3, 3, 9)).astype(np.float32)
  np.testing.assert_allclose(custom_cnn.local_response_norm(jnp.asarray(x)), _naive_lrn(x),
                             rtol=1e-5)


@pytest.fixture(scope="module")
def small_model():
  model = custom_cnn.custom_cnn(num_outputs=3, input_shape=(48, 48, 1),
                                conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16),
                                init_std=None, use_batchnorm=True)
  return model, model.init(jax.random.key(1))


def test_contract_head_of_last_conv_equals_logits(small_model):
  model, variables = small_model
  images = jax.random.normal(jax.random.key(2), (3, 48, 48, 1))
  feature_map = model.features(variables, images, "last_conv")
  np.testing.assert_allclose(model.head(variables, feature_map),
                             model.logits(variables, images), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.features(variables, images, "stem"),
                             model.features(variables, images, "conv1"))
  assert model.features(variables, images, "embedding").shape == (3, 16)


def test_train_mode_uses_dropout_and_updates_batch_stats(small_model):
  model, variables = small_model
  images = jax.random.normal(jax.random.key(3), (4, 48, 48, 1)) + 2.0
  logits_a, updates = model.train_apply(variables, images, jax.random.key(4))
  logits_b, _ = model.train_apply(variables, images, jax.random.key(5))
  assert not np.allclose(logits_a, logits_b)  # different dropout masks
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_unknown_tap_and_config_field_give_clear_errors(small_model):
  model, _ = small_model
  with pytest.raises(ValueError, match="Unknown tap 'block9'.*conv1"):
    model.resolve_tap("block9")
  with pytest.raises(ValueError, match="config.model has a field"):
    registry.build_model({"name": "custom_cnn", "num_output": 2})
  with pytest.raises(ValueError, match="not a known model"):
    registry.build_model({"name": "resnet7"})
