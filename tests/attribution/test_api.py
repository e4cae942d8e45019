"""Proof of agnosticism: the logits-only methods explain functions the project did not build.

Three scoring functions, each written here without the project's model code: a plain `jnp`
linear function, a Flax NNX CNN and an Equinox CNN (channels-first inside, vmapped over the
batch). Every logits-only method explains each, and the assertions are properties that could
fail: on the linear function the closed forms (gradient = weights, IG = (x - x') w, the
occlusion score drop, RISE's mask-weighted sum, XRAI's IG part over its black and white
baselines); on the CNNs IG's completeness, Guided IG at
max_dist = 0 equal to a left Riemann IG, gradients against finite differences, SmoothGrad
without noise equal to the gradient, and occlusion / RISE against naive loops calling the
function directly.
"""

from __future__ import annotations

import equinox as eqx
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.attribution import gradients
from medxai_jax.attribution import integrated
from medxai_jax.attribution import perturbation
from medxai_jax.attribution import xrai

SHAPE = (8, 8, 2)
CLASSES = 3
TARGETS = np.asarray([0, 2])


def _images(seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (2, *SHAPE), minval=-1.0, maxval=1.0)


# ------------------------------------------------------------------------- the three functions


def _linear_parts():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
  bias = rng.normal(size=CLASSES).astype(np.float32)
  return kernel, bias


def plain_linear():
  """logits = flatten(x) @ W + b, a closure over numpy weights: no framework at all."""
  kernel, bias = _linear_parts()
  return lambda images: images.reshape((images.shape[0], -1)) @ kernel + bias


class NnxCNN(nnx.Module):
  """conv3x3 -> tanh -> conv3x3 -> tanh -> spatial mean -> dense, in Flax NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(SHAPE[-1], 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(4, CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    hidden = jnp.tanh(self.conv2(jnp.tanh(self.conv1(images))))
    return self.dense(hidden.mean(axis=(1, 2)))


class EqxCNN(eqx.Module):
  """The same architecture in Equinox, channels-first per image, vmapped over the batch."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  dense: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    keys = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(SHAPE[-1], 4, 3, padding=1, key=keys[0])
    self.conv2 = eqx.nn.Conv2d(4, 4, 3, padding=1, key=keys[1])
    self.dense = eqx.nn.Linear(4, CLASSES, key=keys[2])

  def __call__(self, images: jax.Array) -> jax.Array:
    def one(image: jax.Array) -> jax.Array:
      hidden = jnp.tanh(self.conv2(jnp.tanh(self.conv1(jnp.transpose(image, (2, 0, 1))))))
      return self.dense(hidden.mean(axis=(1, 2)))

    return jax.vmap(one)(images)


@pytest.fixture(scope="module")
def cnns():
  """The NNX and Equinox CNNs as plain callables images -> logits [B, K]."""
  return {"nnx": NnxCNN(nnx.Rngs(0)), "equinox": EqxCNN(jax.random.key(1))}


def _scores(logits_fn, images, targets=TARGETS) -> np.ndarray:
  return np.asarray(logits_fn(jnp.asarray(images)))[np.arange(len(targets)), targets]


# ------------------------------------------------------------------------- plain linear function


def _weights(targets=TARGETS) -> np.ndarray:
  kernel, _ = _linear_parts()
  return kernel[:, targets].T.reshape((len(targets), *SHAPE))


def test_gradients_and_smoothgrad_of_a_linear_function_are_its_weights():
  logits_fn, images = plain_linear(), _images()
  np.testing.assert_allclose(gradients.vanilla_gradients(logits_fn, images, TARGETS),
                             _weights(), rtol=1e-6)
  smooth = gradients.smoothgrad(logits_fn, images, TARGETS, key=jax.random.key(0),
                                num_samples=3, chunk_size=2)
  np.testing.assert_allclose(smooth, _weights(), rtol=1e-5)


def test_path_methods_of_a_linear_function_are_input_difference_times_weights():
  logits_fn, images = plain_linear(), _images()
  expected = (np.asarray(images) - 0.3) * _weights()
  for rule in ("riemann_trapezoid", "pair_uniform"):
    maps = integrated.integrated_gradients(logits_fn, images, TARGETS, baseline=0.3,
                                           num_steps=5, rule=rule, chunk_size=2)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6, err_msg=rule)
  # Captum's trapezoid weights sum to 1 - 1/N: its IG is (1 - 1/N) (x - x') w.
  captum = integrated.integrated_gradients(logits_fn, images, TARGETS, baseline=0.3,
                                           num_steps=5, rule="captum_trapezoid")
  np.testing.assert_allclose(captum, (1 - 1 / 5) * expected, rtol=1e-5, atol=1e-6)
  guided = integrated.guided_ig(logits_fn, images, TARGETS, baseline=0.3, num_steps=4)
  np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-6)
  blurred = integrated.gaussian_blur(images, 2.0)
  blur = integrated.blur_ig(logits_fn, images, TARGETS, max_sigma=2.0, num_steps=4,
                            grad_step=None)
  np.testing.assert_allclose(blur, (np.asarray(images) - blurred) * _weights(), rtol=1e-4,
                             atol=1e-5)


def test_occlusion_of_a_linear_function_is_the_closed_form_score_drop():
  # 2x2 windows over both channels, stride 2: each pixel lies in one window, whose score drop
  # is sum over the window of w * (x - baseline).
  logits_fn, images = plain_linear(), _images()
  ours = perturbation.occlusion(logits_fn, images, TARGETS, window=2, strides=2, baseline=0.5)
  drop = (_weights() * (np.asarray(images) - 0.5)).reshape(2, 4, 2, 4, 2, 2).sum(axis=(2, 4, 5))
  expected = np.repeat(np.repeat(drop, 2, axis=1), 2, axis=2)[..., None]
  np.testing.assert_allclose(ours, np.broadcast_to(expected, images.shape), rtol=1e-4,
                             atol=1e-5)


def test_rise_of_a_linear_function_is_the_mask_weighted_score_sum():
  logits_fn, images = plain_linear(), _images()
  key = jax.random.key(5)
  masks = np.asarray(perturbation.rise_masks(key, 6, 8, 8, cell_size=3, p_keep=0.5))
  kernel, bias = _linear_parts()
  expected = np.zeros((2, 8, 8))
  for mask in masks:
    masked = (np.asarray(images) * mask[None, :, :, None]).reshape(2, -1)
    scores = (masked @ kernel + bias)[np.arange(2), TARGETS]
    expected += scores[:, None, None] * mask[None]
  expected /= 6 * 0.5
  ours = perturbation.rise(logits_fn, images, TARGETS, key=key, num_masks=6, cell_size=3,
                           p_keep=0.5, chunk_size=4)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_xrai_of_a_linear_function_starts_from_the_closed_form_ig():
  # XRAI's input attribution: IG from each image's min ('black') and max ('white'), averaged,
  # channels summed; on a linear function (x - x') w exactly. XRAI then ranks regions of it.
  logits_fn, images = plain_linear(), _images()
  low = np.asarray(images).min(axis=(1, 2, 3), keepdims=True)
  high = np.asarray(images).max(axis=(1, 2, 3), keepdims=True)
  x = np.asarray(images)
  expected = (((x - low) + (x - high)) / 2 * _weights()).sum(axis=-1)
  ours = xrai.xrai_attributions(logits_fn, images, TARGETS, num_steps=2, chunk_size=2)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
  # Each pixel gets the mean attribution of the pixels its region added, and the regions end
  # up covering the image: the maps' sums are the attributions' sums.
  for method in (xrai.xrai, xrai.fast_xrai):
    maps = np.asarray(method(logits_fn, images, TARGETS, attributions=ours))
    assert maps.shape == images.shape[:3] and np.isfinite(maps).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), np.asarray(ours).sum(axis=(1, 2)),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- NNX and Equinox CNNs


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_ig_is_complete_on_each_framework(cnns, framework):
  logits_fn, images = cnns[framework], _images(1)
  maps = integrated.integrated_gradients(logits_fn, images, TARGETS, num_steps=16,
                                         rule="gauss_legendre", chunk_size=8)
  difference = _scores(logits_fn, images) - _scores(logits_fn, np.zeros_like(images))
  assert np.abs(difference).min() > 1e-3
  np.testing.assert_allclose(np.asarray(maps).sum(axis=(1, 2, 3)), difference, rtol=1e-3,
                             atol=1e-5)
  report = integrated.completeness_gap(logits_fn, images, jnp.zeros_like(images), TARGETS,
                                       maps)
  np.testing.assert_allclose(report["score_difference"], difference, rtol=1e-5, atol=1e-6)
  assert float(report["completeness_gap"].max()) <= 1e-3 * np.abs(difference).max() + 1e-5


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_gradient_methods_on_each_framework(cnns, framework):
  logits_fn, images = cnns[framework], _images(2)
  grads = np.asarray(gradients.vanilla_gradients(logits_fn, images, TARGETS))
  # Central finite differences at three pixels of each image.
  step = 1e-2
  for pixel in ((0, 0, 0), (3, 5, 1), (7, 2, 0)):
    offset = np.zeros(images.shape, np.float32)
    offset[(slice(None), *pixel)] = step
    numeric = (_scores(logits_fn, images + offset) - _scores(logits_fn, images - offset)) / (
        2 * step)
    np.testing.assert_allclose(grads[(slice(None), *pixel)], numeric, rtol=2e-2, atol=1e-4)
  noiseless = gradients.smoothgrad(logits_fn, images, TARGETS, key=jax.random.key(0),
                                   num_samples=2, noise_level=0.0)
  np.testing.assert_allclose(noiseless, grads, rtol=1e-5, atol=1e-7)
  # Guided IG confined to the straight line (max_dist = 0) is IG's left Riemann sum.
  guided = integrated.guided_ig(logits_fn, images, TARGETS, num_steps=4, max_dist=0.0)
  left = integrated.integrated_gradients(logits_fn, images, TARGETS, num_steps=4,
                                         rule="riemann_left", chunk_size=8)
  np.testing.assert_allclose(guided, left, rtol=1e-4, atol=1e-6 * float(np.abs(left).max()))
  blur = np.asarray(integrated.blur_ig(logits_fn, images, TARGETS, max_sigma=2.0, num_steps=2))
  assert blur.shape == images.shape and np.isfinite(blur).all() and np.abs(blur).max() > 0


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_perturbation_methods_on_each_framework_match_naive_loops(cnns, framework):
  logits_fn, images = cnns[framework], _images(3)
  base_scores = _scores(logits_fn, images)
  expected = np.zeros(images.shape, np.float32)
  for top in (0, 4):
    for left in (0, 4):
      occluded = np.array(images)
      occluded[:, top:top + 4, left:left + 4] = 0.0
      expected[:, top:top + 4, left:left + 4] = (
          base_scores - _scores(logits_fn, occluded))[:, None, None, None]
  ours = perturbation.occlusion(logits_fn, images, TARGETS, window=4, strides=4)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
  key = jax.random.key(7)
  masks = np.asarray(perturbation.rise_masks(key, 5, 8, 8, cell_size=4, p_keep=0.4))
  naive = sum(_scores(logits_fn, np.asarray(images) * mask[None, :, :, None])[:, None, None]
              * mask[None] for mask in masks) / (5 * 0.4)
  rise = perturbation.rise(logits_fn, images, TARGETS, key=key, num_masks=5, cell_size=4,
                           p_keep=0.4, chunk_size=2)
  np.testing.assert_allclose(rise, naive, rtol=1e-4, atol=1e-6)
