"""A 2-D convolution whose gradients stay fast inside `lax.scan` on XLA:CPU.

`lax.conv_general_dilated`'s own VJP writes the input gradient as a convolution with a kernel
spec 'HWOI' and the weight gradient with a transposed batch/feature spec. Outside a loop XLA
turns these into layout changes; inside a while loop (`lax.scan`, `lax.map`: chunked
attributions, gradient accumulation) XLA:CPU keeps them as they are and runs a slow generic
convolution, 2x (input gradient) to 60x (weight gradient) slower than the same step called from
Python (JAX issue #12868; measured in BUILD_NOTES.md). Here both gradients are written as plain
NHWC/HWIO convolutions of explicitly transposed arrays, which XLA runs at full speed in and out
of loops and which give the same numbers. Flax's `nn.Conv(..., conv_general_dilated=
conv_general_dilated)` uses it; configurations other than NHWC/HWIO without input dilation or
feature groups fall back to `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp

_SPEC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], ...]


def _is_unit(values: Sequence[int] | None) -> bool:
  return values is None or all(int(v) == 1 for v in values)


def _is_nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  """Whether `dimension_numbers` describe NHWC images and an HWIO kernel."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  if dimension_numbers is None:  # lax's default is NCHW / OIHW
    return False
  wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _SPEC)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return tuple(given) == tuple(wanted)


def _explicit_pads(padding: str | Sequence[Sequence[int]], in_spatial: Sequence[int],
                   kernel_spatial: Sequence[int], strides: Sequence[int]) -> Pads:
  """Padding as ((low, high), (low, high)) pairs."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(in_spatial), tuple(kernel_spatial), tuple(strides),
                               padding)
  else:
    pads = padding
  return tuple((int(low), int(high)) for low, high in pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(images: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads,
          precision: Any) -> jax.Array:
  return lax.conv_general_dilated(images, kernel, strides, pads, dimension_numbers=_SPEC,
                                  precision=precision)


def _conv_forward(images, kernel, strides, pads, precision):
  return _conv(images, kernel, strides, pads, precision), (images, kernel)


def input_gradient(kernel: jax.Array, cotangent: jax.Array, images_shape: Sequence[int],
                   strides: tuple[int, int], pads: Pads, precision: Any = None) -> jax.Array:
  """d<cotangent, conv(x, kernel)>/dx as a convolution with a standard HWIO kernel spec."""
  swapped = jnp.swapaxes(kernel, 2, 3)  # stored HWOI, so the transposed conv reads it as HWIO
  transpose = jax.linear_transpose(
      lambda x: lax.conv_general_dilated(x, swapped, strides, pads,
                                         dimension_numbers=("NHWC", "HWOI", "NHWC"),
                                         precision=precision),
      jax.ShapeDtypeStruct(tuple(images_shape), cotangent.dtype))
  return transpose(cotangent)[0]


def kernel_gradient(images: jax.Array, cotangent: jax.Array, kernel_spatial: Sequence[int],
                    strides: tuple[int, int], pads: Pads, precision: Any = None) -> jax.Array:
  """d<cotangent, conv(images, w)>/dw [kh, kw, I, O] as one NHWC/HWIO convolution.

  dW[a, b, i, o] = sum_{n, p, q} x[n, p*s + a - low, q*s + b - low, i] g[n, p, q, o]: the
  images with channels as batch and batch as features, convolved with the cotangent as a
  [Ho, Wo, N, O] kernel dilated by the strides.
  """
  lhs = jnp.transpose(images, (3, 1, 2, 0))     # [I, H, W, N]
  rhs = jnp.transpose(cotangent, (1, 2, 0, 3))  # [Ho, Wo, N, O]
  conv_pads = []
  for size, taps, stride, (low, _), out in zip(images.shape[1:3], kernel_spatial, strides, pads,
                                               cotangent.shape[1:3]):
    # Output length size + low + high - (out - 1) * stride must be exactly `taps`.
    conv_pads.append((low, taps + (out - 1) * stride - size - low))
  gradient = lax.conv_general_dilated(lhs, rhs, (1, 1), conv_pads, rhs_dilation=strides,
                                      dimension_numbers=_SPEC, precision=precision)
  return jnp.transpose(gradient, (1, 2, 0, 3)).astype(images.dtype)


def _conv_backward(strides, pads, precision, residuals, cotangent):
  images, kernel = residuals
  return (input_gradient(kernel, cotangent, images.shape, strides, pads, precision
                         ).astype(images.dtype),
          kernel_gradient(images, cotangent, kernel.shape[:2], strides, pads, precision
                          ).astype(kernel.dtype))


_conv.defvjp(_conv_forward, _conv_backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[Sequence[int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` with loop-friendly gradients for NHWC/HWIO convolutions."""
  supported = (_is_nhwc_hwio(lhs, rhs, dimension_numbers) and _is_unit(lhs_dilation)
               and _is_unit(rhs_dilation) and feature_group_count == 1
               and batch_group_count == 1 and preferred_element_type is None
               and (not isinstance(padding, str) or padding in ("SAME", "VALID")))
  if not supported:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  return _conv(lhs, rhs, strides, pads, precision)
