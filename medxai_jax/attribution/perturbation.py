r"""Perturbation attributions without gradients: Occlusion and RISE, batched and memory-bounded.

Notation of `common`: S_c(x) is the target score of image x (the logit z_c; for a one-logit
sigmoid model z for class 1 and -z for class 0), x' a baseline image.

- Occlusion (Zeiler & Fergus 2014), with the semantics of Captum's `Occlusion.attribute`: a
  window of shape (h, w, c) slides over the image [H, W, C] with strides (s_h, s_w, s_c); along
  an axis of size D it starts at 0, s, 2s, ..., i.e. at ceil((D - w) / s) + 1 positions, the
  last of which is cut at the border when (D - w) % s != 0. For each window n,
  d_n = S_c(x) - S_c(x with the window's pixels replaced by x'), and
  phi_i = (sum over windows n covering i of d_n) / (number of windows covering i).
  Captum is channels-first: its sliding_window_shapes (c, h, w) and strides (s_c, s_h, s_w)
  over [C, H, W] are our window (h, w, c) and strides (s_h, s_w, s_c) over [H, W, C]. A window
  (h, w) spans every channel (Captum's (C, h, w)). Captum's `perturbations_per_eval` is our
  `chunk_size`: the number of occluded copies of each image evaluated in one forward pass.
  Captum explains whatever the model returns (logits or probabilities); ours return logits.
- RISE (Petsiuk et al., BMVC 2018): N random masks M_n in [0, 1]^{H x W}, each a grid of
  Bernoulli(p) cells of `cell_size` pixels, upsampled bilinearly and shifted by a random
  offset in [0, cell_size) along each axis; the saliency is
  R(i) = sum_n S_c(x * M_n) M_n(i) / (N p), an unbiased (Monte-Carlo) estimate of
  E[S_c(x * M) | M(i) = 1] for binary masks (RISE, eq. 6). Masking multiplies the
  preprocessed image, so a masked pixel becomes 0: the dataset mean after mean/std
  normalisation. The score is the logit S_c (the paper uses the class probability).

Both take any scoring function `logits_fn(images) -> logits [B, K]` (`api.LogitsFn`); images
and targets follow the contract of `common` (`resolve_inputs`). Both run in the images' dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import common
from medxai_jax.attribution import integrated

AXES = ("height", "width", "channels")
DEFAULT_CHUNK_SIZE = common.CHUNK_SIZE
RISE_GRID = 7  # cells along the shorter side by default (RISE: s = 7 on 224-pixel images)
Window = int | Sequence[int]


# ---------------------------------------------------------------------------------------------
# Occlusion.


def _window_shape(window: Window, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
  """(h, w, c) from an int (square, every channel), (h, w) (every channel) or (h, w, c)."""
  channels = image_shape[-1]
  if isinstance(window, (int, np.integer)):
    shape = (int(window), int(window), channels)
  else:
    shape = tuple(int(v) for v in window)
    if len(shape) == 2:
      shape = (*shape, channels)
    elif len(shape) != 3:
      raise ValueError(f"occlusion window must be an int, (h, w) or (h, w, c); got {window!r}.")
  return shape


def _strides(strides: Window, window: tuple[int, int, int]) -> tuple[int, int, int]:
  """(s_h, s_w, s_c) from an int (every axis, as Captum) or a tuple as long as the window."""
  if isinstance(strides, (int, np.integer)):
    return (int(strides),) * 3
  values = tuple(int(v) for v in strides)
  if len(values) == 2:  # a spatial (h, w) window: the channel axis has one position
    return (*values, window[2])
  if len(values) != 3:
    raise ValueError(f"occlusion strides must be an int, (s_h, s_w) or (s_h, s_w, s_c); got "
                     f"{strides!r}.")
  return values


def occlusion_grid(image_shape: Sequence[int], window: Window, strides: Window = 1
                   ) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
  """Window shape, strides and window positions per axis (H, W, C) of an [H, W, C] image.

  The positions along an axis of size D are Captum's ceil((D - w) / s) + 1. Raises a ValueError
  naming the axis when a window exceeds the image or a stride exceeds its window (which would
  leave pixels no window covers; allowed when the window spans the whole axis).
  """
  image_shape = tuple(int(v) for v in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C); got {image_shape}.")
  shape = _window_shape(window, image_shape)
  steps = _strides(strides, shape)
  counts = []
  for axis, size, length, step in zip(AXES, image_shape, shape, steps):
    if length < 1 or step < 1:
      raise ValueError(f"occlusion window {shape} and strides {steps} must be >= 1 along "
                       f"every axis; got window {length}, stride {step} along {axis}.")
    if length > size:
      raise ValueError(f"occlusion window {shape} exceeds the image {image_shape} along "
                       f"{axis}: {length} > {size} pixels.")
    if step > length and length < size:
      raise ValueError(f"occlusion stride {step} along {axis} is larger than the window "
                       f"({length}): pixels between windows would never be occluded.")
    counts.append(math.ceil((size - length) / step) + 1)
  return shape, steps, tuple(counts)


def window_indicators(size: int, length: int, stride: int, count: int) -> np.ndarray:
  """[count, size] 0/1 rows: row r covers [r * stride, min(r * stride + length, size))."""
  starts = np.arange(count)[:, None] * stride
  cells = np.arange(size)[None, :]
  return ((cells >= starts) & (cells < starts + length)).astype(np.float32)


def occlusion_indicators(image_shape: Sequence[int], window: Window, strides: Window = 1
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Window indicator rows along H, W and C (`window_indicators`); window (i, j, l) occludes
  the pixels where rows_h[i] * rows_w[j] * rows_c[l] is 1."""
  shape, steps, counts = occlusion_grid(image_shape, window, strides)
  return tuple(window_indicators(size, length, step, count) for size, length, step, count
               in zip(tuple(image_shape), shape, steps, counts))


def occlusion_coverage(image_shape: Sequence[int], window: Window, strides: Window = 1
                       ) -> np.ndarray:
  """Number of windows covering each pixel [H, W, C] (Captum's normalising weights)."""
  rows_h, rows_w, rows_c = occlusion_indicators(image_shape, window, strides)
  return np.einsum("h,w,c->hwc", rows_h.sum(0), rows_w.sum(0), rows_c.sum(0))


def _chunked_map(fn, num_items: int, chunk_size: int) -> jax.Array:
  """fn over item indices 0..num_items-1, `chunk_size` at a time (lax.map over the chunks); fn
  maps int32 indices [k] to [k, ...]. The last chunk is padded with the last index, dropped."""
  common.check_positive("chunk_size", chunk_size)
  chunk_size = min(chunk_size, num_items)
  num_chunks = -(-num_items // chunk_size)
  indices = np.minimum(np.arange(num_chunks * chunk_size), num_items - 1)
  outputs = jax.lax.map(fn, jnp.asarray(indices.reshape(num_chunks, chunk_size), jnp.int32))
  return outputs.reshape((num_chunks * chunk_size,) + outputs.shape[2:])[:num_items]


def _resolve_baseline(images: jax.Array, baseline: integrated.Baseline) -> jax.Array:
  """Baseline images [B, H, W, C]: a number or rank-0 array fills them, anything else goes to
  `integrated.resolve_baseline`."""
  if not isinstance(baseline, str) and jnp.ndim(baseline) == 0:
    return jnp.full_like(images, baseline)
  return integrated.resolve_baseline(images, baseline)


def occlusion(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets, *,
              window: Window, strides: Window = 1, baseline: integrated.Baseline = 0.0,
              chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """Occlusion attributions [B, H, W, C] with Captum's semantics (see the module docstring).

  window: int (square, every channel), (h, w) (every channel) or (h, w, c); strides: an int
  (every axis) or a tuple as long as the window. baseline: a number, 'zeros', 'blurred' or an
  array [H, W, C] / [B, H, W, C] (`integrated.resolve_baseline`). chunk_size: windows whose
  occluded copies of the batch go through the model in one forward pass (chunk_size * B images).
  """
  targets = common.resolve_inputs(logits_fn, images, targets)
  rows_h, rows_w, rows_c = occlusion_indicators(images.shape[1:], window, strides)
  coverage = occlusion_coverage(images.shape[1:], window, strides)
  baselines = _resolve_baseline(images, baseline)
  counts = (len(rows_h), len(rows_w), len(rows_c))
  scores = common.score_fn(logits_fn)
  table_h, table_w, table_c = (jnp.asarray(rows, images.dtype)
                               for rows in (rows_h, rows_w, rows_c))

  def occluded_scores(window_indices: jax.Array) -> jax.Array:
    i, j, l = jnp.unravel_index(window_indices, counts)
    masks = (table_h[i][:, :, None, None] * table_w[j][:, None, :, None]
             * table_c[l][:, None, None, :])                                # [k, H, W, C]
    occluded = jnp.where(masks[:, None] > 0, baselines[None], images[None])  # [k, B, H, W, C]
    count = window_indices.shape[0]
    flat = occluded.reshape((-1,) + images.shape[1:])
    return scores(flat, common.tile_batch(targets, count)).reshape(count, -1)

  num_windows = int(np.prod(counts))
  differences = scores(images, targets)[None] - _chunked_map(occluded_scores, num_windows,
                                                             chunk_size)    # [N, B]
  differences = differences.T.reshape((-1, *counts))
  totals = jnp.einsum("bijl,ih,jw,lc->bhwc", differences, table_h, table_w, table_c,
                      precision=jax.lax.Precision.HIGHEST)
  return (totals / jnp.asarray(coverage, images.dtype)).astype(images.dtype)


# ---------------------------------------------------------------------------------------------
# RISE.


def _check_rise_options(num_masks: int, cell_size: int, p_keep: float) -> None:
  """Raises a ValueError for a non-positive mask count or cell size, or p_keep outside (0, 1]."""
  common.check_positive("num_masks", num_masks)
  common.check_positive("cell_size", cell_size)
  if not 0.0 < float(p_keep) <= 1.0:
    raise ValueError(f"p_keep (the probability of keeping a RISE grid cell) must lie in (0, 1]; "
                     f"got {p_keep!r}.")


def grid_cell_size(image_shape: Sequence[int], grid: int) -> int:
  """RISE cell size in pixels for `grid` cells along the shorter side of [B, H, W, C] images
  (the paper's s x s grid, s = 7 on 224-pixel images)."""
  common.check_positive("grid", grid)
  return -(-min(int(image_shape[1]), int(image_shape[2])) // grid)


def rise_mask(key: jax.Array, height: int, width: int, cell_size: int, p_keep: float,
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """One RISE mask [height, width] in [0, 1] (in `dtype`): Bernoulli(p_keep) cells of cell_size
  pixels, upsampled bilinearly and cropped at a random offset in [0, cell_size) per axis."""
  rows, cols = -(-height // cell_size) + 1, -(-width // cell_size) + 1
  grid_key, shift_key = jax.random.split(key)
  grid = jax.random.bernoulli(grid_key, p_keep, (rows, cols)).astype(dtype)
  upsampled = jax.image.resize(grid, (rows * cell_size, cols * cell_size), method="linear")
  shift = jax.random.randint(shift_key, (2,), 0, cell_size)
  return jax.lax.dynamic_slice(upsampled, (shift[0], shift[1]), (height, width))


def rise_masks(key: jax.Array, num_masks: int, height: int, width: int, *, cell_size: int,
               p_keep: float = 0.5, indices: jax.Array | None = None,
               dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """RISE masks [N, height, width]; mask n is `rise_mask(fold_in(key, n), ...)`, so any chunk
  of `indices` (default 0..num_masks-1) draws the same masks as the whole."""
  _check_rise_options(num_masks, cell_size, p_keep)
  if indices is None:
    indices = jnp.arange(num_masks, dtype=jnp.int32)
  # One mask at a time (lax.map, not vmap, which changes the bits of 'rbg' keys).
  return jax.lax.map(lambda index: rise_mask(jax.random.fold_in(key, index), height, width,
                                             cell_size, p_keep, dtype), indices)


def rise(logits_fn: api.LogitsFn, images: jax.Array, targets: common.Targets, *,
         key: jax.Array, num_masks: int = 1000, cell_size: int | None = None,
         p_keep: float = 0.5, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """RISE saliency maps [B, H, W]: sum_n S_c(x * M_n) M_n / (N p_keep) (module docstring).

  cell_size: grid cell side in pixels; None is the paper's 7 x 7 grid along the shorter side
  (`grid_cell_size(images.shape, RISE_GRID)`: 32 pixels at 224).

  chunk_size: masks applied to the whole batch in one forward pass (chunk_size * B images);
  the result does not depend on it.
  """
  common.check_images(images)
  if cell_size is None:
    cell_size = grid_cell_size(images.shape, RISE_GRID)
  _check_rise_options(num_masks, cell_size, p_keep)
  if key is None:
    raise ValueError("rise draws its masks from a PRNG key: pass key=jax.random.key(...).")
  targets = common.resolve_inputs(logits_fn, images, targets)
  _, height, width, _ = images.shape
  scores = common.score_fn(logits_fn)

  def chunk_saliency(mask_indices: jax.Array) -> jax.Array:
    masks = rise_masks(key, num_masks, height, width, cell_size=cell_size, p_keep=p_keep,
                       indices=mask_indices, dtype=images.dtype)            # [k, H, W]
    masked = images[None] * masks[:, None, :, :, None]                     # [k, B, H, W, C]
    count = mask_indices.shape[0]
    masked_scores = scores(masked.reshape((-1,) + images.shape[1:]),
                           common.tile_batch(targets, count)).reshape(count, -1)
    return masked_scores[:, :, None, None] * masks[:, None]                 # [k, B, H, W]

  total = common.chunked_sum(chunk_saliency, num_masks, chunk_size)
  return total / (num_masks * p_keep)
