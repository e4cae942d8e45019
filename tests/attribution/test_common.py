"""Careless inputs to the attribution methods (`common`'s input checks): out-of-range targets,
non-finite pixels, integer images, empty batches and images below the architecture's minimum.

Each test asserts the error type and that its message names the field or index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from medxai_jax.attribution import activations
from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.attribution import crm
from medxai_jax.attribution import gradients
from medxai_jax.attribution import integrated
from medxai_jax.attribution import xrai

SIDE = 32
_KEY = jax.random.key(0)
# Every method that takes targets, at its cheapest settings (the errors come before any work).
TARGETED = {
    "vanilla_gradients": lambda m, v, x, t: gradients.vanilla_gradients(m.logits_fn(v), x, t),
    "smoothgrad": lambda m, v, x, t: gradients.smoothgrad(m.logits_fn(v), x, t, key=_KEY,
                                                          num_samples=2, chunk_size=2),
    "integrated_gradients": lambda m, v, x, t: integrated.integrated_gradients(
        m.logits_fn(v), x, t, num_steps=2, chunk_size=2),
    "blur_ig": lambda m, v, x, t: integrated.blur_ig(m.logits_fn(v), x, t, num_steps=2,
                                                     max_sigma=2.0),
    "guided_ig": lambda m, v, x, t: integrated.guided_ig(m.logits_fn(v), x, t, num_steps=2),
    "grad_cam": lambda m, v, x, t: cam.grad_cam(m.split(v), x, t),
    "cam": lambda m, v, x, t: cam.cam(m.split(v), x, t),
    "xrai": lambda m, v, x, t: xrai.xrai(m.logits_fn(v), x, t, num_steps=2),
    "fast_xrai": lambda m, v, x, t: xrai.fast_xrai(m.logits_fn(v), x, t, num_steps=2),
}
# Methods without targets.
UNTARGETED = {
    "crm": lambda m, v, x, t: crm.crm(m.split(v), x),
    "activations_at": lambda m, v, x, t: activations.activations_at(
        activations.model_splits(m, v), x),
}
ALL_METHODS = {**TARGETED, **UNTARGETED}


# The models (`one_logit`, `three_class`: tiny DenseNets at SIDE px) are conftest.py's fixtures.
_images = tiny.uniform_images


@pytest.mark.parametrize("name", sorted(TARGETED))
def test_out_of_range_targets_are_refused_by_every_method(name, one_logit, three_class):
  """Target 5 on a one-logit model, 9 or -1 on a 3-class model: ValueError naming the target,
  its index and the valid range (grad_cam/cam used to return some other class's map)."""
  method = TARGETED[name]
  cases = [(one_logit, [0, 5], "target 5 (targets[1])", "[0, 2)"),
           (three_class, [9, 0], "target 9 (targets[0])", "[0, 3)"),
           (three_class, [2, -1], "target -1 (targets[1])", "[0, 3)")]
  for (model, variables), targets, names, valid in cases:
    with pytest.raises(ValueError) as error:
      method(model, variables, _images(), jnp.asarray(targets, jnp.int32))
    assert names in str(error.value) and valid in str(error.value), str(error.value)


def test_one_logit_targets_mean_negative_and_positive_class(one_logit):
  """For one logit z, target 1 explains z and target 0 explains -z: the Grad-CAM maps before
  the ReLU (and the input gradients) of the two targets are exact negatives."""
  model, variables = one_logit
  images = _images()
  positive = cam.grad_cam(model.split(variables), images, jnp.ones(2, jnp.int32), relu=False)
  negative = cam.grad_cam(model.split(variables), images, jnp.zeros(2, jnp.int32), relu=False)
  np.testing.assert_allclose(negative, -positive, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(positive).max()) > 0
  grad_one = gradients.vanilla_gradients(model.logits_fn(variables), images, 1)
  grad_zero = gradients.vanilla_gradients(model.logits_fn(variables), images, 0)
  np.testing.assert_allclose(grad_zero, -grad_one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_a_non_finite_pixel_is_refused_naming_the_image(name, three_class):
  """One NaN pixel in image 1 (and an Inf in image 2): ValueError naming images[1], the pixel,
  and the other image; never a NaN map."""
  model, variables = three_class
  images = _images(3).at[1, 7, 11, 0].set(jnp.nan).at[2, 0, 3, 0].set(jnp.inf)
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, images, jnp.zeros(3, jnp.int32))
  message = str(error.value)
  assert "images[1]" in message and "NaN at row 7, column 11" in message, message
  assert "[2]" in message, message


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_integer_images_are_refused_with_the_expected_range(name, dtype, three_class):
  """Raw 0-255 integer images: ValueError naming the dtype and the [0, 1] float input the
  models expect (they used to give maps ~145x larger than for the same images in [0, 1])."""
  model, variables = three_class
  images = np.asarray(_images() * 255, dtype)
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, images, jnp.zeros(2, jnp.int32))
  message = str(error.value)
  assert f"dtype {np.dtype(dtype).name}" in message and "[0, 1]" in message, message


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_an_empty_batch_is_refused(name, three_class):
  model, variables = three_class
  with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 32, 32, 1\)\)"):
    ALL_METHODS[name](model, variables, _images(0), jnp.zeros(0, jnp.int32))


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_images_below_the_architecture_minimum_name_it(name, three_class):
  """16x16 images into a DenseNet whose minimum is 29x29: ValueError naming both sizes (it used
  to be a ZeroDivisionError in the map resize, or NaN logits)."""
  model, variables = three_class
  assert model.min_input_size == 29
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, _images(2, 16), jnp.zeros(2, jnp.int32))
  assert "16x16" in str(error.value) and "29x29" in str(error.value), str(error.value)


def test_check_method_inputs_covers_jitted_callers(three_class):
  """When the images are jit arguments the finite check cannot run (they are tracers); a caller
  that jits a method checks the concrete batch with check_method_inputs first, which raises what
  the eager method raises. Images closed over as constants are still checked under jit, and the
  jitted method gives the eager maps on clean images."""
  model, variables = three_class
  clean = _images()
  targets = jnp.asarray([0, 2], jnp.int32)
  jitted = jax.jit(lambda x, t: cam.grad_cam(model.split(variables), x, t))
  np.testing.assert_allclose(jitted(clean, targets),
                             cam.grad_cam(model.split(variables), clean, targets),
                             rtol=1e-5, atol=1e-6)
  common.check_method_inputs(model.logits_fn(variables), clean, targets)
  with_nan = clean.at[0, 1, 1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"images\[0\] has non-finite"):
    common.check_method_inputs(model.logits_fn(variables), with_nan, targets)
  # Concrete images closed over by a jitted function (only the variables traced) are checked.
  with pytest.raises(ValueError, match=r"images\[0\] has non-finite"):
    jax.jit(lambda v: gradients.vanilla_gradients(model.logits_fn(v), with_nan, targets))(
        variables)
  with pytest.raises(ValueError, match=r"target 3 \(targets\[1\]\)"):
    common.check_method_inputs(model.logits_fn(variables), clean, jnp.asarray([0, 3], jnp.int32))
