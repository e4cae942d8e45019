"""CAM and Grad-CAM against 004's equations and an independent computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from medxai_jax.attribution import cam
from medxai_jax.models import custom_cnn


@pytest.fixture(scope="module")
def gap_model():
  model = tiny.densenet(num_outputs=3, head="softmax", input_shape=(64, 64, 1))
  return model, jax.jit(model.init)(jax.random.key(0))


def test_cam_equals_weighted_sum_of_maps_with_the_dense_weights(gap_model):
  model, variables = gap_model
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
  targets = jnp.array([2, 0])
  maps = jax.jit(lambda v, x, t: cam.cam(model.split(v), x, t, upsample=False))(
      variables, images, targets)
  fmap = np.asarray(model.features(variables, images, "last_conv"))
  kernel = np.asarray(variables["params"]["classifier"]["predictions"]["kernel"])  # [K, C]
  expected = np.einsum("bhwk,bk->bhw", fmap, kernel[:, np.asarray(targets)].T)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)


def test_grad_cam_before_relu_is_cam_over_z(gap_model):
  # 004 eq. 4: alpha_k = w_k / Z for a GAP + dense head.
  model, variables = gap_model
  images = jax.random.uniform(jax.random.key(2), (3, 64, 64, 1))
  targets = jnp.array([0, 1, 2])
  split = model.split(variables)
  cam_maps = cam.cam(split, images, targets, upsample=False)
  grad_maps = cam.grad_cam(split, images, targets, relu=False, upsample=False)
  z = cam_maps.shape[1] * cam_maps.shape[2]
  np.testing.assert_allclose(grad_maps, cam_maps / z, rtol=1e-4, atol=1e-6)
  assert cam.gap_head_problem(split, images) is None


def test_predicted_targets_are_the_argmax_of_the_logits(gap_model):
  model, variables = gap_model
  split = model.split(variables)
  images = jax.random.uniform(jax.random.key(13), (3, 64, 64, 1))
  predicted = jnp.argmax(model.logits(variables, images), axis=-1)
  for method in (cam.cam, cam.grad_cam):
    np.testing.assert_array_equal(method(split, images, "predicted", upsample=False),
                                  method(split, images, predicted, upsample=False))
  with pytest.raises(ValueError, match=r"target 3 \(targets\[1\]\)"):
    cam.grad_cam(split, images, jnp.array([0, 3, 1]))


def test_one_logit_targets_flip_the_sign():
  model = tiny.densenet(input_shape=(48, 48, 1))
  variables = jax.jit(model.init)(jax.random.key(3))
  images = jax.random.uniform(jax.random.key(4), (1, 48, 48, 1))
  positive = cam.cam(model.split(variables), images, jnp.array([1]), upsample=False)
  negative = cam.cam(model.split(variables), images, jnp.array([0]), upsample=False)
  np.testing.assert_allclose(positive, -negative, rtol=1e-6)


def test_grad_cam_matches_an_explicit_gradient_for_the_custom_cnn():
  model = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                                dense_widths=(16, 16), init_std=None)
  variables = jax.jit(model.init)(jax.random.key(5))
  image = jax.random.uniform(jax.random.key(6), (1, 48, 48, 1))
  fmap = model.features(variables, image, "last_conv")
  gradient = jax.grad(lambda a: model.head(variables, a)[0, 1])(fmap)
  expected = jax.nn.relu(jnp.einsum("bhwk,k->bhw", fmap, gradient.mean(axis=(0, 1, 2))))
  got = cam.grad_cam(model.split(variables), image, jnp.array([1]), upsample=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  upsampled = cam.grad_cam(model.split(variables), image, jnp.array([1]))
  assert upsampled.shape == (1, 48, 48)


def test_cam_refuses_heads_that_are_not_gap_plus_dense():
  radinet = tiny.densenet(num_outputs=2, head="radinet", head_hidden_widths=(8, 8),
                          input_shape=(128, 128, 1))  # a 4x4 last_conv map
  variables = jax.jit(radinet.init)(jax.random.key(7))
  # Varied inputs so the hidden ReLUs switch between cells (else the head is locally affine).
  images = 20.0 * jax.random.normal(jax.random.key(8), (2, 128, 128, 1))
  with pytest.raises(ValueError, match="not affine"):
    cam.cam(radinet.split(variables), images, jnp.array([0, 1]))
  assert "not affine" in cam.gap_head_problem(radinet.split(variables), images)
  images = images[:, :48, :48]
  flat_head = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1),
                                    conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16))
  flat_split = flat_head.split(jax.jit(flat_head.init)(jax.random.key(9)))
  with pytest.raises(ValueError, match="global average pooling"):
    cam.cam(flat_split, images, jnp.array([0, 1]))
  assert "1x1 feature map" in cam.gap_head_problem(flat_split, images)


def test_grad_cam_at_an_intermediate_tap_matches_a_hand_split_custom_cnn():
  # conv4 -> conv5 (3x3, pad 1) + ReLU -> head, written out with the layers' own parameters.
  model = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                                dense_widths=(16, 16), init_std=None)
  variables = jax.jit(model.init)(jax.random.key(10))
  images = jax.random.uniform(jax.random.key(11), (2, 48, 48, 1))
  targets = jnp.array([1, 0])
  conv5 = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))

  def score(conv4_map, index):
    conv5_map = nn.relu(conv5.apply({"params": variables["params"]["conv5"]}, conv4_map))
    return cam.target_scores(model.head(variables, conv5_map), targets)[index]

  activation = model.features(variables, images, "conv4")
  gradients = jnp.stack([jax.grad(score)(activation, i)[i] for i in range(2)])
  expected = jnp.einsum("bhwk,bk->bhw", activation, gradients.mean(axis=(1, 2)))
  got = jax.jit(lambda v, x, t: cam.grad_cam(model.split(v, "conv4"), x, t, relu=False,
                                             upsample=False))(variables, images, targets)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
  relu_maps = cam.grad_cam(model.split(variables, "conv4"), images, targets)
  assert relu_maps.shape == (2, 48, 48) and float(relu_maps.min()) >= 0.0


def test_grad_cam_at_block4_matches_a_hand_split_densenet(gap_model):
  # block4 -> final BatchNorm (inference) + ReLU = last_conv -> GAP + dense head.
  model, variables = gap_model
  images = jax.random.uniform(jax.random.key(12), (2, 64, 64, 1))
  targets = jnp.array([2, 1])
  bn = nn.BatchNorm(use_running_average=True, epsilon=1.001e-5)
  bn_variables = {"params": variables["params"]["backbone"]["bn"],
                  "batch_stats": variables["batch_stats"]["backbone"]["bn"]}

  def total_score(block4):
    return cam.target_scores(model.head(variables, nn.relu(bn.apply(bn_variables, block4))),
                             targets).sum()

  block4 = model.features(variables, images, "block4")
  gradient = jax.grad(total_score)(block4)
  expected = jnp.einsum("bhwk,bk->bhw", block4, gradient.mean(axis=(1, 2)))
  got = cam.grad_cam(model.split(variables, "block4"), images, targets, relu=False,
                     upsample=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
  # At last_conv Grad-CAM differentiates the head; the tap-delta route gives the same gradient.
  fmap, via_head = cam.tap_gradients(model.split(variables, "last_conv"), images, targets)
  via_delta = jax.grad(lambda d: cam.target_scores(
      model.logits_with_tap_delta(variables, images, "last_conv", d), targets).sum())(
          jnp.zeros_like(fmap))
  np.testing.assert_allclose(via_delta, via_head, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="spatial tap"):
    cam.grad_cam(model.split(variables, "embedding"), images, targets)
