"""The CAM family of pytorch-grad-cam 1.5.7 on the attribution contract (`api.Split`).

Notation: A^k [h, w] is the k-th channel of the activation at the split, S_c the target score
(the logit, `api.target_scores`), g^k = dS_c / dA^k. Every method forms a map [h, w], applies a
ReLU (`relu=True`) and, with `upsample=True`, resizes it bilinearly to the input (half-pixel
centres, as cv2.resize). `normalise_maps` is grad-cam's per-image min-max scaling; applied to the
upsampled maps it gives grad-cam's output (its scale-then-resize-then-scale equals
resize-then-scale, bilinear resizing being affine).

* Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential score): a^k_ij =
  g^2 / (2 g^2 + sum_ab A^k_ab g^3 + 1e-6) where g != 0 (else 0), w_k = sum_ij a^k_ij ReLU(g),
  map sum_k w_k A^k. The factor exp(S_c) of the exponential score is dropped (it rescales the
  map only).
* XGrad-CAM (Fu et al. 2020): w_k = sum_ij g A^k_ij / (sum_ij A^k_ij + 1e-7), map sum_k w_k A^k.
* HiResCAM (Draelos and Carin 2020): map sum_k g^k * A^k (element-wise; for a GAP + dense head it
  is CAM / (h w)).
* LayerCAM (Jiang et al. 2021): map sum_k ReLU(g^k) * A^k.
* Score-CAM (Wang et al. 2020): each channel, upsampled to the input and min-max scaled
  (+1e-8), masks the image; w = softmax over channels of the target logits of the masked images
  (the paper's baseline score is a constant over channels, which the softmax cancels), map
  sum_k w_k A^k. grad-cam upsamples the masks with torch.nn.UpsamplingBilinear2d, i.e. with
  aligned corners (`align_corners=True`, our default); `align_corners=False` uses half-pixel
  centres as the authors' code (F.interpolate) does. The masked forwards run `chunk_size`
  channels at a time, vmapped, under `lax.map` (chunk_size * B images per step).
* Ablation-CAM (Desai and Ramaswamy 2020): w_k = (S_c - S_c^k) / S_c with S_c^k the score when
  channel k of the activation is set to `ablation_value` (0, the paper's choice, and grad-cam's
  whenever the activation's minimum is 0, as after a ReLU; grad-cam substitutes min - 1e7 for
  activations with negative values). The network runs on from the ablated activations
  (`split.head`), `chunk_size` channels at a time, vmapped under `lax.map`. grad-cam's
  experimental `ratio_channels_to_ablate` is not offered (all channels are ablated).
* EigenCAM (Muhammad and Yeasin 2020): the activation [h w, K], centred over cells, projected
  on its first right singular vector. Like grad-cam we take the sign the SVD returns (LAPACK's on
  the CPU; it is arbitrary, and the ReLU keeps only its positive side). `sign_correction=True`
  flips each map whose |min| exceeds its max, as grad-cam's
  `get_2d_projection_with_sign_correction` (Seg-Eigen-CAM, eq. 13). EigenCAM is class-agnostic:
  it takes no targets. grad-cam zeroes NaN activations first; we let them propagate.

Tap choice for torchvision's DenseNet: grad-cam's usual layer is `features[-1]` (norm5), after
which torchvision applies an in-place ReLU, so grad-cam reads the post-ReLU activation A but the
gradient at the ReLU's input, g * 1[A > 0]. Our DenseNet's 'last_conv' tap is that post-ReLU map
with the gradient g at it. The products g * A of HiResCAM, LayerCAM and XGrad-CAM are the same
either way; Grad-CAM++ is not, and `pre_relu_gradients=True` reproduces grad-cam's recipe from
the post-ReLU tap (no pre-ReLU tap is needed). Score-, Ablation- and EigenCAM read activations
only, so 'last_conv' matches grad-cam's norm5 as it is.

All methods compute in the dtype of the activation (float64 works end to end) and return maps
[B, H, W] in the images' dtype ([B, h, w] with `upsample=False`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import common

GRAD_CAM_PLUS_PLUS_EPS = 1e-6
XGRAD_CAM_EPS = 1e-7
SCORE_CAM_EPS = 1e-8
NORMALISE_EPS = 1e-7


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def normalise_maps(maps: jax.Array, eps: float = NORMALISE_EPS) -> jax.Array:
  """Each map [B, ...] min-max scaled to [0, 1]: (m - min) / (max(m - min) + eps) (grad-cam's
  `scale_cam_image`; a constant map becomes 0)."""
  if jnp.ndim(maps) < 2:
    raise ValueError(f"maps must be a batch [B, ...] of maps; got shape {tuple(jnp.shape(maps))}.")
  axes = tuple(range(1, jnp.ndim(maps)))
  shifted = maps - jnp.min(maps, axis=axes, keepdims=True)
  return shifted / (jnp.max(shifted, axis=axes, keepdims=True) + eps)


def upsample_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of maps [B, h, w] to [B, *size] (half-pixel centres, as cv2.resize)."""
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def _interpolation_matrix(size_in: int, size_out: int, align_corners: bool,
                          dtype: jnp.dtype) -> jax.Array:
  """[size_out, size_in] bilinear weights along one axis (edges clamped)."""
  out = np.arange(size_out, dtype=np.float64)
  if align_corners:
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    coords = out * scale
  else:
    coords = np.clip((out + 0.5) * size_in / size_out - 0.5, 0.0, size_in - 1)
  low = np.floor(coords).astype(np.int64)
  high = np.minimum(low + 1, size_in - 1)
  frac = coords - low
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(weights, (np.arange(size_out), high), frac)
  return jnp.asarray(weights, dtype)


def upsample_channels(activation: jax.Array, size: tuple[int, int], *,
                      align_corners: bool = True) -> jax.Array:
  """Bilinear resize of an activation [B, h, w, K] to [B, *size, K]; `align_corners` as
  torch.nn.UpsamplingBilinear2d (corner cells map to corner pixels), else half-pixel centres."""
  _, height, width, _ = activation.shape
  rows = _interpolation_matrix(height, size[0], align_corners, activation.dtype)
  cols = _interpolation_matrix(width, size[1], align_corners, activation.dtype)
  return jnp.einsum("Hh,bhwk,Ww->bHWk", rows, activation, cols,
                    precision=jax.lax.Precision.HIGHEST)


def _check_activation(activation: jax.Array, method: str) -> None:
  """Raises a ValueError unless the split's activation is spatial [B, h, w, K]."""
  if activation.ndim != 4:
    raise ValueError(f"{method} needs a split whose features are a spatial activation "
                     f"[B, h, w, K]; split.features returned shape {tuple(activation.shape)}.")


def _check_chunk_size(chunk_size: int) -> None:
  """Raises a ValueError unless chunk_size is a positive integer."""
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")


def _finish(maps: jax.Array, images: jax.Array, relu: bool, upsample: bool) -> jax.Array:
  """ReLU (optional), bilinear upsampling to the images (optional), the images' dtype."""
  if relu:
    maps = jax.nn.relu(maps)
  if upsample:
    maps = upsample_maps(maps, images.shape[1:3])
  return maps.astype(images.dtype)


def weighted_channel_sum(activation: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k weights[b, k] * activation[b, :, :, k]: maps [B, h, w]."""
  return jnp.einsum("bhwk,bk->bhw", activation, weights.astype(activation.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def _chunked_map(fn: Callable[[jax.Array], jax.Array], num_items: int, chunk_size: int
                 ) -> jax.Array:
  """fn over indices 0..num_items-1, `chunk_size` at a time under lax.map; fn maps int32
  indices [c] to [c, ...]. The last chunk is padded with the last index, whose rows are dropped."""
  chunk_size = min(int(chunk_size), num_items)
  num_chunks = -(-num_items // chunk_size)
  indices = np.minimum(np.arange(num_chunks * chunk_size), num_items - 1)
  outputs = jax.lax.map(fn, jnp.asarray(indices.reshape(num_chunks, chunk_size), jnp.int32))
  return outputs.reshape((num_chunks * chunk_size,) + outputs.shape[2:])[:num_items]


def activations_and_gradients(split: api.Split, images: jax.Array, targets: api.Targets, *,
                              pre_relu_gradients: bool = False
                              ) -> tuple[jax.Array, jax.Array]:
  """The activation A [B, h, w, K] at the split and dS_c/dA of each image's target score.

  pre_relu_gradients: for a split taken just after a ReLU, the gradient at the ReLU's input,
  dS_c/dA * 1[A > 0] (what grad-cam reads at torchvision DenseNet's norm5 hook).
  """
  targets = api.resolve_targets(split.logits, images, targets)
  activation = split.features(images)
  _check_activation(activation, "this CAM method")

  def total_score(fmap: jax.Array) -> jax.Array:
    # Images are independent in inference mode, so the gradient of the sum is per image.
    return api.target_scores(split.head(fmap, images), targets).sum()

  gradients = jax.grad(total_score)(activation)
  if pre_relu_gradients:
    gradients = jnp.where(activation > 0, gradients, jnp.zeros_like(gradients))
  return activation, gradients


# ---------------------------------------------------------------------------------------------
# Gradient methods: maps from (A, dS/dA).


def grad_cam_plus_plus_weights(activation: jax.Array, gradients: jax.Array) -> jax.Array:
  """Grad-CAM++ channel weights [B, K] (eq. 19 of Chattopadhay et al., grad-cam's eps)."""
  squared = gradients ** 2
  cubed = squared * gradients
  sums = jnp.sum(activation, axis=(1, 2), keepdims=True)
  alpha = squared / (2 * squared + sums * cubed + GRAD_CAM_PLUS_PLUS_EPS)
  alpha = jnp.where(gradients != 0, alpha, jnp.zeros_like(alpha))
  return jnp.sum(alpha * jax.nn.relu(gradients), axis=(1, 2))


def xgrad_cam_weights(activation: jax.Array, gradients: jax.Array) -> jax.Array:
  """XGrad-CAM channel weights [B, K]: sum_ij g A / (sum_ij A + 1e-7)."""
  sums = jnp.sum(activation, axis=(1, 2), keepdims=True)
  return jnp.sum(gradients * activation / (sums + XGRAD_CAM_EPS), axis=(1, 2))


def grad_cam_plus_plus(split: api.Split, images: jax.Array, targets: api.Targets, *,
                       relu: bool = True, upsample: bool = True,
                       pre_relu_gradients: bool = False) -> jax.Array:
  """Grad-CAM++ maps [B, H, W] ([B, h, w] without upsample); see the module docstring."""
  activation, gradients = activations_and_gradients(split, images, targets,
                                                    pre_relu_gradients=pre_relu_gradients)
  maps = weighted_channel_sum(activation, grad_cam_plus_plus_weights(activation, gradients))
  return _finish(maps, images, relu, upsample)


def xgrad_cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
              relu: bool = True, upsample: bool = True) -> jax.Array:
  """XGrad-CAM maps [B, H, W] ([B, h, w] without upsample)."""
  activation, gradients = activations_and_gradients(split, images, targets)
  maps = weighted_channel_sum(activation, xgrad_cam_weights(activation, gradients))
  return _finish(maps, images, relu, upsample)


def hires_cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
              relu: bool = True, upsample: bool = True) -> jax.Array:
  """HiResCAM maps [B, H, W]: sum_k dS/dA^k * A^k ([B, h, w] without upsample)."""
  activation, gradients = activations_and_gradients(split, images, targets)
  return _finish(jnp.sum(gradients * activation, axis=-1), images, relu, upsample)


def layer_cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
              relu: bool = True, upsample: bool = True) -> jax.Array:
  """LayerCAM maps [B, H, W]: sum_k ReLU(dS/dA^k) * A^k ([B, h, w] without upsample)."""
  activation, gradients = activations_and_gradients(split, images, targets)
  return _finish(jnp.sum(jax.nn.relu(gradients) * activation, axis=-1), images, relu, upsample)


# ---------------------------------------------------------------------------------------------
# Gradient-free methods.


def score_cam_weights(split: api.Split, images: jax.Array, targets: jax.Array,
                      activation: jax.Array, *, chunk_size: int = common.CHUNK_SIZE,
                      align_corners: bool = True) -> jax.Array:
  """Score-CAM channel weights [B, K]: softmax over channels of the masked images' scores."""
  _check_chunk_size(chunk_size)
  size = images.shape[1:3]
  masked_dtype = jnp.result_type(images, activation)

  def chunk_scores(channels: jax.Array) -> jax.Array:
    upsampled = upsample_channels(activation[..., channels], size,
                                  align_corners=align_corners)       # [B, H, W, c]
    low = upsampled.min(axis=(1, 2), keepdims=True)
    high = upsampled.max(axis=(1, 2), keepdims=True)
    masks = (upsampled - low) / (high - low + SCORE_CAM_EPS)
    masked = (images[None].astype(masked_dtype)
              * jnp.moveaxis(masks, -1, 0)[..., None].astype(masked_dtype))  # [c, B, H, W, C]
    logits = jax.vmap(split.logits)(masked.astype(images.dtype))
    return jax.vmap(lambda rows: api.target_scores(rows, targets))(logits)  # [c, B]

  scores = _chunked_map(chunk_scores, activation.shape[-1], chunk_size)     # [K, B]
  return jax.nn.softmax(scores.T.astype(activation.dtype), axis=-1)


def score_cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
              relu: bool = True, upsample: bool = True, chunk_size: int = common.CHUNK_SIZE,
              align_corners: bool = True) -> jax.Array:
  """Score-CAM maps [B, H, W] ([B, h, w] without upsample); chunk_size channels per forward
  (chunk_size * B masked images), align_corners for the mask upsampling (module docstring)."""
  _check_chunk_size(chunk_size)
  targets = api.resolve_targets(split.logits, images, targets)
  activation = split.features(images)
  _check_activation(activation, "Score-CAM")
  weights = score_cam_weights(split, images, targets, activation, chunk_size=chunk_size,
                              align_corners=align_corners)
  return _finish(weighted_channel_sum(activation, weights), images, relu, upsample)


def ablation_scores(split: api.Split, images: jax.Array, targets: jax.Array,
                    activation: jax.Array, *, chunk_size: int = common.CHUNK_SIZE,
                    ablation_value: float = 0.0) -> jax.Array:
  """Target scores [B, K] of the network run on from `activation` with channel k set to
  `ablation_value`, `chunk_size` channels per vmapped step."""
  _check_chunk_size(chunk_size)
  num_channels = activation.shape[-1]
  fill = jnp.asarray(ablation_value, activation.dtype)

  def chunk_scores(channels: jax.Array) -> jax.Array:
    ablate = jnp.arange(num_channels)[None, :] == channels[:, None]          # [c, K]
    ablated = jnp.where(ablate[:, None, None, None, :], fill, activation[None])
    logits = jax.vmap(lambda fmap: split.head(fmap, images))(ablated)
    return jax.vmap(lambda rows: api.target_scores(rows, targets))(logits)   # [c, B]

  return _chunked_map(chunk_scores, num_channels, chunk_size).T


def ablation_cam(split: api.Split, images: jax.Array, targets: api.Targets, *,
                 relu: bool = True, upsample: bool = True, chunk_size: int = common.CHUNK_SIZE,
                 ablation_value: float = 0.0) -> jax.Array:
  """Ablation-CAM maps [B, H, W] ([B, h, w] without upsample): w_k = (S - S^k) / S."""
  _check_chunk_size(chunk_size)
  targets = api.resolve_targets(split.logits, images, targets)
  activation = split.features(images)
  _check_activation(activation, "Ablation-CAM")
  original = api.target_scores(split.head(activation, images), targets)[:, None]   # [B, 1]
  ablated = ablation_scores(split, images, targets, activation, chunk_size=chunk_size,
                            ablation_value=ablation_value)
  original = original.astype(activation.dtype)
  weights = (original - ablated.astype(activation.dtype)) / original
  return _finish(weighted_channel_sum(activation, weights), images, relu, upsample)


def first_principal_projection(activation: jax.Array, *, sign_correction: bool = False
                               ) -> jax.Array:
  """Cells of each activation [B, h, w, K], centred over cells, projected on the first right
  singular vector: maps [B, h, w] (SVD sign; or flipped where |min| > max with sign_correction)."""
  batch, height, width, channels = activation.shape
  cells = activation.reshape(batch, height * width, channels)
  cells = cells - cells.mean(axis=1, keepdims=True)
  _, _, right = jnp.linalg.svd(cells, full_matrices=False)
  projection = jnp.einsum("bnk,bk->bn", cells, right[:, 0, :],
                          precision=jax.lax.Precision.HIGHEST)
  if sign_correction:
    flip = jnp.abs(projection.min(axis=1)) > jnp.abs(projection.max(axis=1))
    projection = jnp.where(flip[:, None], -projection, projection)
  return projection.reshape(batch, height, width)


def eigen_cam(split: api.Split, images: jax.Array, *, relu: bool = True, upsample: bool = True,
              sign_correction: bool = False) -> jax.Array:
  """EigenCAM maps [B, H, W] ([B, h, w] without upsample); class-agnostic (no targets)."""
  activation = split.features(images)
  _check_activation(activation, "EigenCAM")
  maps = first_principal_projection(activation, sign_correction=sign_correction)
  return _finish(maps, images, relu, upsample)
