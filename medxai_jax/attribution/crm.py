"""Class-selective Relevance Mapping (CRM) of Kim et al. (004_883d77b264ed2d14.txt, eq. 5-7).

Notation of 004: f_k(x, y) is the k-th map of the last convolution (u x v cells, Z = u v), S_c
the score of output node c *before* its softmax/sigmoid (eq. 1: "the input to the softmax or
sigmoid function", i.e. the logits), S_c(l, m) the same score with the spatial element (l, m)
removed from every map (eq. 6), and the CRM (eq. 7)

  R(l, m) = sum_{c=1..N} (S_c - S_c(l, m))^2,

summed over all N output nodes, so it takes no target class. The network comes as an `api.Split`
cut at the map f (`features(images) -> f`, `head(f, images) -> logits`; for the project's
models `model.split(variables, tap)`), so any JAX network works and any spatial cut too (004's
future work: at an inner tap the head re-runs the rest of the network from the edited map).

Three exact ways to get S_c(l, m) for every cell at once (`method`):
* 'ablation': zero cell (l, m) in all channels and re-run the head; vmapped over the cells and
  chunked (`chunk_size` cells per step), so it works for any head and any cut;
* 'pooled': for a head g(GAP(f)), removing a cell subtracts f(l, m) / Z from the pooled vector,
  so only g runs per cell (on 1x1 maps); exact for non-linear g too;
* 'closed_form': for GAP + one dense layer, S_c - S_c(l, m) = sum_k w_k^c f_k(l, m) / Z, i.e.
  CAM(l, m) / Z, read off the head as cam.py does.
'auto' inspects the head on the given (concrete) images and picks the cheapest that applies; an
explicit 'pooled' or 'closed_form' is checked the same way on concrete arrays (a head it does not
apply to raises) and trusted under jit. 004 writes eq. 1 and 6 with a spatial *sum* where the
network's GAP averages: its R equals ours times Z^2, a constant factor that relative thresholds
(20% ROI, 70% box) ignore. The class-level tables (eq. 8, Table 3) are in
`medxai_jax.analysis.crm_tables`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import common

METHODS = ("auto", "ablation", "pooled", "closed_form")
# Default cells per vmapped step: the ablation re-runs the head (or the rest of the network).
ABLATION_CHUNK = 8
POOLED_CHUNK = 1024


def _relevance(scores: jax.Array, ablated: jax.Array) -> jax.Array:
  """sum_c (S_c - S_c(l, m))^2 over the last axis; scores [B, N], ablated [..., B, N]."""
  return jnp.square(scores - ablated).sum(axis=-1)


def _cells_to_maps(per_cell: jax.Array, height: int, width: int) -> jax.Array:
  """[h * w, B] cell-major values -> [B, h, w] maps."""
  return per_cell.T.reshape(-1, height, width)


def _map_over_cells(fn: Callable[[jax.Array], jax.Array], num_cells: int,
                    chunk_size: int) -> jax.Array:
  """fn(cell index) -> [B] for every cell, `chunk_size` cells vmapped at a time: [cells, B]."""
  common.check_positive("chunk_size", chunk_size)
  cells = jnp.arange(num_cells, dtype=jnp.int32)
  return jax.lax.map(fn, cells, batch_size=min(chunk_size, num_cells))


def _cell_mask(cell: jax.Array, height: int, width: int, dtype: Any) -> jax.Array:
  """[h, w, 1] mask that is 0 at the flat cell index and 1 elsewhere."""
  return (jnp.arange(height * width) != cell).astype(dtype).reshape(height, width, 1)


def _as_cells(vectors: jax.Array) -> jax.Array:
  """[..., C] vectors as 1x1 feature maps [..., 1, 1, C] (the GAP of a 1x1 map is the vector)."""
  return vectors[..., None, None, :]


def _feature_map(split: api.Split, images: jax.Array, feature_map: jax.Array | None
                 ) -> jax.Array:
  """The split's spatial activation of the images (computed unless given)."""
  feature_map = split.features(images) if feature_map is None else feature_map
  cam.check_spatial(feature_map, "CRM")
  return feature_map


def ablation_relevance(split: api.Split, images: jax.Array, *,
                       feature_map: jax.Array | None = None,
                       chunk_size: int = ABLATION_CHUNK) -> jax.Array:
  """CRM [B, h, w] by zeroing each cell of the split's map and re-running its head (any head).

  `feature_map`: the split's activation of `images`, when already computed.
  """
  feature_map = _feature_map(split, images, feature_map)
  _, height, width, _ = feature_map.shape
  scores = split.head(feature_map, images)

  def one_cell(cell: jax.Array) -> jax.Array:
    mask = _cell_mask(cell, height, width, feature_map.dtype)
    return _relevance(scores, split.head(feature_map * mask, images))

  per_cell = _map_over_cells(one_cell, height * width, chunk_size)
  return _cells_to_maps(per_cell, height, width)


def pooled_relevance(split: api.Split, images: jax.Array, *,
                     feature_map: jax.Array | None = None,
                     chunk_size: int = POOLED_CHUNK) -> jax.Array:
  """CRM [B, h, w] for a head g(GAP(f)): removing a cell subtracts f(l, m) / Z from GAP(f)."""
  feature_map = _feature_map(split, images, feature_map)
  _, height, width, _ = feature_map.shape
  pooled = feature_map.mean(axis=(1, 2))                                   # [B, C]
  scores = split.head(_as_cells(pooled), images)
  cells = feature_map.reshape(feature_map.shape[0], height * width, -1)    # [B, Z, C]

  def one_cell(cell: jax.Array) -> jax.Array:
    removed = pooled - cells[:, cell] / (height * width)
    return _relevance(scores, split.head(_as_cells(removed), images))

  per_cell = _map_over_cells(one_cell, height * width, chunk_size)
  return _cells_to_maps(per_cell, height, width)


def closed_form_relevance(split: api.Split, images: jax.Array, *,
                          feature_map: jax.Array | None = None) -> jax.Array:
  """CRM [B, h, w] for GAP + one dense layer: sum_c (sum_k w_k^c f_k(l, m) / Z)^2 (eq. 6-7)."""
  feature_map = _feature_map(split, images, feature_map)
  _, height, width, _ = feature_map.shape
  per_cell = cam.head_on_cells(split, feature_map, images)                  # b + W f
  bias = split.head(jnp.zeros_like(feature_map[:, :1, :1]), images)        # b
  contributions = (per_cell - bias[:, None, None, :]) / (height * width)    # W f / Z
  return jnp.square(contributions).sum(axis=-1)


def resolve_method(split: api.Split, images: jax.Array, rtol: float = 1e-3, *,
                   feature_map: jax.Array | None = None) -> str:
  """'closed_form', 'pooled' or 'ablation': the cheapest exact CRM method for this head.

  Numerical, like cam.gap_head_problem, on the given concrete images: the head is g(GAP(f))
  when it accepts 1x1 maps and head(f) equals g(mean of f); g is affine when the closed form
  equals the pooled ablation at every cell. Call it outside jit and pass the result to a
  jitted `crm`. `feature_map`: the split's activation of `images`, when already computed.
  """
  feature_map = _feature_map(split, images, feature_map)
  if common.is_traced(feature_map) or common.is_traced(images):
    raise ValueError("method='auto' inspects the head on concrete arrays; under jit pass "
                     "method='ablation', 'pooled' or 'closed_form' (see crm.resolve_method).")
  scores = np.asarray(split.head(feature_map, images))
  try:
    from_mean = np.asarray(split.head(_as_cells(feature_map.mean(axis=(1, 2))), images))
  except cam.HEAD_ERRORS:  # a head that rejects a 1x1 map is not g(GAP(f))
    return "ablation"
  scale = 1.0 + np.abs(scores).max()
  if from_mean.shape != scores.shape or not np.allclose(from_mean, scores, rtol=rtol,
                                                        atol=rtol * scale):
    return "ablation"
  pooled = np.asarray(pooled_relevance(split, images, feature_map=feature_map))
  closed = np.asarray(closed_form_relevance(split, images, feature_map=feature_map))
  if np.allclose(closed, pooled, rtol=10 * rtol, atol=10 * rtol * pooled.max() + 1e-12):
    return "closed_form"
  return "pooled"


# Methods in order of generality: each applies wherever the ones before it do.
_GENERALITY = ("closed_form", "pooled", "ablation")


def crm(split: api.Split, images: jax.Array, *, method: str = "auto",
        chunk_size: int | None = None, upsample: bool = True) -> jax.Array:
  """CRM maps [B, H, W] (eq. 7 of 004), bilinearly upsampled to the input unless upsample=False
  ([B, h, w] at the split's resolution). No targets: eq. 7 sums every class score.

  `method`: 'ablation' (any head, any spatial cut), 'pooled' (heads g(GAP(f))), 'closed_form'
  (GAP + dense) or 'auto' (`resolve_method`; needs concrete arrays, not jit). `chunk_size`
  bounds how many cells are evaluated at once (default 8 for 'ablation', 1024 for 'pooled').
  """
  cam.check_images(images)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  feature_map = _feature_map(split, images, None)
  concrete = not (common.is_traced(feature_map) or common.is_traced(images))
  if method == "auto" or (concrete and method != "ablation"):
    resolved = resolve_method(split, images, feature_map=feature_map)
    if method != "auto" and _GENERALITY.index(resolved) > _GENERALITY.index(method):
      raise ValueError(
          f"method={method!r} does not apply to this split's head (its cheapest exact method "
          f"is {resolved!r}: 'pooled' needs a head g(global average pool), 'closed_form' GAP + "
          "one dense layer); use method='ablation' or 'auto'.")
    method = resolved if method == "auto" else method
  if method == "ablation":
    maps = ablation_relevance(split, images, feature_map=feature_map,
                              chunk_size=chunk_size or ABLATION_CHUNK)
  elif method == "pooled":
    maps = pooled_relevance(split, images, feature_map=feature_map,
                            chunk_size=chunk_size or POOLED_CHUNK)
  else:
    maps = closed_form_relevance(split, images, feature_map=feature_map)
  return cam.resize_maps(maps, images.shape[1:3]) if upsample else maps
