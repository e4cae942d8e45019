"""The loop-friendly convolution: same values and gradients as lax's, in and out of lax.scan."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.models import conv

SPEC = ("NHWC", "HWIO", "NHWC")
HIGHEST = lax.Precision.HIGHEST


def naive_kernel_gradient(images, cotangent, taps, strides, pads):
  """dW by explicit sums over batch and output positions (numpy)."""
  x = np.pad(np.asarray(images, np.float64),
             ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  g = np.asarray(cotangent, np.float64)
  out = np.zeros((taps[0], taps[1], x.shape[-1], g.shape[-1]))
  for a, b in itertools.product(range(taps[0]), range(taps[1])):
    rows = x[:, a:a + strides[0] * (g.shape[1] - 1) + 1:strides[0],
             b:b + strides[1] * (g.shape[2] - 1) + 1:strides[1], :]
    out[a, b] = np.einsum("npqi,npqo->io", rows, g)
  return out


CASES = [((9, 9), 3, 1, "SAME"), ((8, 11), 3, 2, "SAME"), ((14, 14), 7, 2, ((3, 3), (3, 3))),
         ((9, 10), 1, 1, "VALID"), ((10, 10), 3, 2, ((3, 2), (0, 1))), ((6, 6), 2, 2, "VALID")]


@pytest.mark.parametrize("size,taps,stride,padding", CASES)
def test_values_and_gradients_equal_lax(size, taps, stride, padding):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, *size, 3))
  w = jax.random.normal(keys[1], (taps, taps, 3, 4))

  def loss(fn, x, w):
    y = fn(x, w, (stride, stride), padding, dimension_numbers=SPEC, precision=HIGHEST)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

  ours = jax.value_and_grad(lambda x, w: loss(conv.conv_general_dilated, x, w),
                            argnums=(0, 1))(x, w)
  reference = jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w),
                                 argnums=(0, 1))(x, w)
  np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
  for got, want in zip(ours[1], reference[1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,taps,stride,padding", CASES)
def test_kernel_gradient_equals_explicit_sums(size, taps, stride, padding):
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (3, *size, 2))
  pads = conv._explicit_pads(padding, size, (taps, taps), (stride, stride))
  out_shape = lax.conv_general_dilated(x, jnp.zeros((taps, taps, 2, 5)), (stride, stride),
                                       padding, dimension_numbers=SPEC).shape
  g = jax.random.normal(keys[1], out_shape)
  got = conv.kernel_gradient(x, g, (taps, taps), (stride, stride), pads, HIGHEST)
  want = naive_kernel_gradient(x, g, (taps, taps), (stride, stride), pads)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_inside_scan_equal_gradients_outside():
  x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.key(3), (3, 3, 3, 4))

  def loss(x, w):
    return jnp.sum(jnp.tanh(conv.conv_general_dilated(x, w, (2, 2), "SAME",
                                                      dimension_numbers=SPEC)))

  grad = jax.grad(loss, argnums=(0, 1))
  shifts = jnp.arange(4, dtype=jnp.float32) / 4

  def body(total, shift):
    gx, gw = grad(x + shift, w)
    return (total[0] + gx, total[1] + gw), None

  scanned, _ = jax.jit(lambda: lax.scan(body, (jnp.zeros_like(x), jnp.zeros_like(w)),
                                        shifts))()
  looped = [sum(grad(x + s, w)[i] for s in shifts) for i in range(2)]
  for got, want in zip(scanned, looped):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_conv_uses_it_and_unsupported_settings_fall_back():
  module = nn.Conv(4, (3, 3), strides=(2, 2), conv_general_dilated=conv.conv_general_dilated)
  plain = nn.Conv(4, (3, 3), strides=(2, 2))
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
  variables = plain.init(jax.random.key(5), x)
  for fn in (lambda v: module.apply(v, x), lambda v: plain.apply(v, x)):
    assert fn(variables).shape == (2, 4, 4, 4)
  np.testing.assert_allclose(module.apply(variables, x), plain.apply(variables, x), rtol=1e-6)
  ours = jax.grad(lambda v: module.apply(v, x).sum())(variables)
  theirs = jax.grad(lambda v: plain.apply(v, x).sum())(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, theirs)
  # Grouped and dilated convolutions go to lax unchanged.
  w = jnp.ones((3, 3, 1, 4))
  grouped = conv.conv_general_dilated(x[..., :2], w[..., :1, :], (1, 1), "SAME",
                                      dimension_numbers=SPEC, feature_group_count=2)
  np.testing.assert_allclose(grouped, lax.conv_general_dilated(
      x[..., :2], w[..., :1, :], (1, 1), "SAME", dimension_numbers=SPEC,
      feature_group_count=2))
  dilated = conv.conv_general_dilated(x, jnp.ones((3, 3, 3, 4)), (1, 1), "SAME",
                                      rhs_dilation=(2, 2), dimension_numbers=SPEC)
  assert dilated.shape == (2, 8, 8, 4)


def test_bfloat16_gradients_keep_the_dtypes():
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 3)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(7), (3, 3, 3, 4)).astype(jnp.bfloat16)
  gx, gw = jax.grad(lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=SPEC).astype(jnp.float32).sum(),
                    argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
