"""Class-selective Relevance Mapping (CRM) of Kim et al. (004_883d77b264ed2d14.txt, eq. 5-8).

Notation of 004: f_k(x, y) is the k-th map of the last convolution (u x v cells, Z = u v), S_c
the score of output node c *before* its softmax/sigmoid (eq. 1: "the input to the softmax or
sigmoid function", i.e. the logits), S_c(l, m) the same score with the spatial element (l, m)
removed from every map (eq. 6), and the CRM (eq. 7)

  R(l, m) = sum_{c=1..N} (S_c - S_c(l, m))^2,

summed over all N output nodes, so it needs no target class. The class-level ROI (eq. 8) pools the
CRMs of a class's images (004 writes a sum; we report the mean, the same map up to the count).

Three exact ways to get S_c(l, m) for every cell at once (`method`):
* 'ablation': zero cell (l, m) in all channels and re-run the head; vmapped over the cells and
  chunked (`chunk_size` cells per step), so it works for any head, RadiNet's dense stack included;
* 'pooled': for a head g(GAP(f)), removing a cell subtracts f(l, m) / Z from the pooled vector,
  so only g runs per cell (on 1x1 maps); exact for non-linear g too;
* 'closed_form': for GAP + one dense layer, S_c - S_c(l, m) = sum_k w_k^c f_k(l, m) / Z, i.e.
  CAM(l, m) / Z, read off the head as cam.py does.
'auto' inspects the head on the given (concrete) images and picks the cheapest that applies.
004 writes eq. 1 and 6 with a spatial *sum* where the network's GAP averages: its R equals ours
times Z^2, a constant factor that the relative thresholds (20% ROI, 70% box) ignore.

At an intermediate spatial tap (004's future work), cell (l, m) is zeroed there and the rest of
the network re-runs (`Classifier.split_at_tap`), vmapped over cells in chunks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.models import base

METHODS = ("auto", "ablation", "pooled", "closed_form")
TABLE_METHODS = ("cam", "grad_cam", "crm")
_TABLE_NAMES = {"cam": "CAM", "grad_cam": "Grad-CAM", "crm": "CRM"}


def _relevance(scores: jax.Array, ablated: jax.Array) -> jax.Array:
  """sum_c (S_c - S_c(l, m))^2 over the last axis; scores [B, N], ablated [..., B, N]."""
  return jnp.square(scores - ablated).sum(axis=-1)


def _cells_to_maps(per_cell: jax.Array, height: int, width: int) -> jax.Array:
  """[h * w, B] cell-major values -> [B, h, w] maps."""
  return per_cell.T.reshape(-1, height, width)


def _map_over_cells(fn, num_cells: int, chunk_size: int) -> jax.Array:
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


def _check_spatial(activation: jax.Array, tap: str) -> None:
  """Raises a ValueError unless the tap's activation is a [B, h, w, C] map."""
  if activation.ndim != 4:
    raise ValueError(f"CRM needs a spatial tap with activations [B, h, w, C]; tap {tap!r} has "
                     f"shape {tuple(activation.shape)}.")


def ablation_relevance(model: base.Classifier, variables: base.Variables,
                       feature_map: jax.Array, chunk_size: int = 32) -> jax.Array:
  """CRM [B, h, w] by zeroing each cell of the last-conv map and re-running the head (any head)."""
  _check_spatial(feature_map, "last_conv")
  _, height, width, _ = feature_map.shape
  scores = model.head(variables, feature_map)

  def one_cell(cell: jax.Array) -> jax.Array:
    mask = _cell_mask(cell, height, width, feature_map.dtype)
    return _relevance(scores, model.head(variables, feature_map * mask))

  per_cell = _map_over_cells(one_cell, height * width, chunk_size)
  return _cells_to_maps(per_cell, height, width)


def pooled_relevance(model: base.Classifier, variables: base.Variables,
                     feature_map: jax.Array, chunk_size: int = 1024) -> jax.Array:
  """CRM [B, h, w] for a head g(GAP(f)): removing a cell subtracts f(l, m) / Z from GAP(f)."""
  _check_spatial(feature_map, "last_conv")
  _, height, width, _ = feature_map.shape
  pooled = feature_map.mean(axis=(1, 2))                                   # [B, C]
  scores = model.head(variables, _as_cells(pooled))
  cells = feature_map.reshape(feature_map.shape[0], height * width, -1)    # [B, Z, C]

  def one_cell(cell: jax.Array) -> jax.Array:
    removed = pooled - cells[:, cell] / (height * width)
    return _relevance(scores, model.head(variables, _as_cells(removed)))

  per_cell = _map_over_cells(one_cell, height * width, chunk_size)
  return _cells_to_maps(per_cell, height, width)


def closed_form_relevance(model: base.Classifier, variables: base.Variables,
                          feature_map: jax.Array) -> jax.Array:
  """CRM [B, h, w] for GAP + one dense layer: sum_c (sum_k w_k^c f_k(l, m) / Z)^2 (eq. 6-7)."""
  _check_spatial(feature_map, "last_conv")
  batch, height, width, channels = feature_map.shape
  per_cell = model.head(variables, _as_cells(feature_map.reshape(-1, channels)))   # b + W f
  bias = model.head(variables, jnp.zeros((1, 1, 1, channels), feature_map.dtype))  # b
  contributions = (per_cell - bias) / (height * width)                               # W f / Z
  return jnp.square(contributions).sum(axis=-1).reshape(batch, height, width)


def tap_relevance(model: base.Classifier, variables: base.Variables, images: jax.Array,
                  tap: str, chunk_size: int = 8) -> jax.Array:
  """CRM [B, h, w] at any spatial tap: zero a cell there, re-run the rest of the network."""
  activation, rest = model.split_at_tap(variables, images, tap)
  _check_spatial(activation, tap)
  _, height, width, _ = activation.shape
  scores = model.logits(variables, images)

  def one_cell(cell: jax.Array) -> jax.Array:
    mask = _cell_mask(cell, height, width, activation.dtype)
    return _relevance(scores, rest(activation * mask - activation))

  per_cell = _map_over_cells(one_cell, height * width, chunk_size)
  return _cells_to_maps(per_cell, height, width)


def _is_traced(*arrays: Any) -> bool:
  """True when any leaf is a tracer (inside jit/vmap/grad)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(arrays))


def resolve_method(model: base.Classifier, variables: base.Variables, images: jax.Array | None,
                   rtol: float = 1e-3, *, feature_map: jax.Array | None = None) -> str:
  """'closed_form', 'pooled' or 'ablation': the cheapest exact CRM method for this head.

  Numerical, like cam.cam's check, on the given concrete images: the head is g(GAP(f)) when it
  accepts 1x1 maps and head(f) equals g(mean of f); g is affine when the closed form equals the
  pooled ablation at every cell. Call it outside jit and pass the result to a jitted `crm`.
  A precomputed last-conv `feature_map` of the images may be passed instead of them.
  """
  if _is_traced(variables, images, feature_map):
    raise ValueError("method='auto' inspects the head on concrete arrays; under jit pass "
                     "method='ablation', 'pooled' or 'closed_form' (see crm.resolve_method).")
  if feature_map is None:
    feature_map = model.features(variables, images, "last_conv")
  _check_spatial(feature_map, "last_conv")
  scores = np.asarray(model.head(variables, feature_map))
  try:
    from_mean = np.asarray(model.head(variables, _as_cells(feature_map.mean(axis=(1, 2)))))
  except Exception:  # noqa: BLE001 - any failure on a 1x1 map (shape checks, initialisers that
    return "ablation"  # divide by a zero fan-in, ...) means the head is not g(GAP(f)).
  scale = 1.0 + np.abs(scores).max()
  if from_mean.shape != scores.shape or not np.allclose(from_mean, scores, rtol=rtol,
                                                        atol=rtol * scale):
    return "ablation"
  pooled = np.asarray(pooled_relevance(model, variables, feature_map))
  closed = np.asarray(closed_form_relevance(model, variables, feature_map))
  if np.allclose(closed, pooled, rtol=10 * rtol, atol=10 * rtol * pooled.max() + 1e-12):
    return "closed_form"
  return "pooled"


def crm(model: base.Classifier, variables: base.Variables, images: jax.Array, *,
        tap: str = "last_conv", method: str = "auto", chunk_size: int | None = None,
        upsample: bool = True) -> jax.Array:
  """CRM maps [B, H, W] (eq. 7 of 004), bilinearly upsampled to the input unless upsample=False.

  At 'last_conv' `method` picks 'ablation' (any head), 'pooled' (heads g(GAP(f))),
  'closed_form' (GAP + dense) or 'auto' (resolve_method; needs concrete arrays, not jit). At
  any other spatial tap the cells are ablated there and the rest of the network re-run
  ('auto' or 'ablation'). `chunk_size` bounds how many cells are evaluated at once.
  """
  common.check_inputs(model, images)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  name = model.resolve_tap(tap)
  if name != model.resolve_tap("last_conv"):
    if method not in ("auto", "ablation"):
      raise ValueError(f"method={method!r} applies to the 'last_conv' head only; at tap "
                       f"{tap!r} use 'ablation' (or 'auto').")
    maps = tap_relevance(model, variables, images, name, chunk_size or 8)
  else:
    feature_map = model.features(variables, images, name)
    if method == "auto":
      method = resolve_method(model, variables, None, feature_map=feature_map)
    if method == "ablation":
      maps = ablation_relevance(model, variables, feature_map, chunk_size or 32)
    elif method == "pooled":
      maps = pooled_relevance(model, variables, feature_map, chunk_size or 1024)
    else:
      maps = closed_form_relevance(model, variables, feature_map)
  return cam.resize_maps(maps, images.shape[1:3]) if upsample else maps


# ----------------------------------------------------------------------------- dataset level


def _check_raw_images(images: np.ndarray, preprocess: Callable | None, index: int) -> None:
  """A stored batch before the jitted step: finite, and float unless `preprocess` scales it."""
  if preprocess is not None and not np.issubdtype(np.asarray(images).dtype, np.floating):
    return
  common.check_image_values(images, f"batch {index} images")


def _batch_parts(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, weights) from a dict with 'image'/'label'[/'weight'] or a pair."""
  if isinstance(batch, Mapping):
    if "image" not in batch or "label" not in batch:
      raise ValueError(f"a batch dict needs 'image' and 'label' entries; got keys {list(batch)}.")
    images, labels = batch["image"], batch["label"]
    weights = batch.get("weight")
  elif isinstance(batch, (tuple, list)) and len(batch) == 2:
    (images, labels), weights = batch, None
  else:
    raise ValueError("each batch must be a dict with 'image' and 'label' or an (images, labels) "
                     f"pair; got {type(batch).__name__}.")
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  weights = np.ones(len(labels), np.float32) if weights is None else np.asarray(weights)
  if np.ndim(images) != 4 or len(images) != len(labels) or len(weights) != len(labels):
    raise ValueError(f"a batch needs images [B, H, W, C] with B labels and weights; got images "
                     f"{np.shape(images)}, labels {labels.shape}, weights {weights.shape}.")
  return images, labels, weights


def iterate_batches(data: Any, batch_size: int = 16
                    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """(images, labels, weights) batches from an (images, labels) array pair or an iterable.

  Array pairs are cut into `batch_size` batches, the last padded with weight-0 copies of the
  first image so every batch has one shape (one compilation). An iterable yields dicts
  ('image', 'label', optional 'weight', as the data pipeline does) or (images, labels) pairs.
  """
  if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (tuple, list, dict)):
    images, labels = data
    labels = np.asarray(labels).reshape(-1)
    common.check_positive("batch_size", batch_size)
    if np.ndim(images) != 4 or len(images) != len(labels):
      raise ValueError(f"data must be (images [N, H, W, C], labels [N]); got shapes "
                       f"{np.shape(images)} and {labels.shape}.")
    for start in range(0, len(labels), batch_size):
      chunk = np.asarray(images[start:start + batch_size])
      chunk_labels = labels[start:start + batch_size]
      pad = batch_size - len(chunk_labels)
      weights = np.concatenate([np.ones(len(chunk_labels), np.float32), np.zeros(pad, np.float32)])
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        chunk_labels = np.concatenate([chunk_labels, np.repeat(chunk_labels[:1], pad)])
      yield chunk, chunk_labels.astype(np.int64), weights
    return
  if isinstance(data, (Mapping, np.ndarray)) or not isinstance(data, Iterable):
    raise ValueError("data must be an (images, labels) pair of arrays or an iterable of batches; "
                     f"got {type(data).__name__}.")
  for batch in data:
    yield _batch_parts(batch)


def bounding_box(saliency: np.ndarray, fraction: float = 0.7) -> tuple[int, int, int, int] | None:
  """(top, left, bottom, right), inclusive, of the pixels >= fraction * max; None if max <= 0."""
  saliency = np.asarray(saliency)
  if saliency.ndim != 2:
    raise ValueError(f"bounding_box takes one map [H, W]; got shape {saliency.shape}.")
  peak = float(saliency.max())
  if not peak > 0:
    return None
  rows, cols = np.nonzero(saliency >= fraction * peak)
  return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def class_average_crm(model: base.Classifier, variables: base.Variables, data: Any, *,
                      num_classes: int | None = None, batch_size: int = 16,
                      tap: str = "last_conv", method: str = "auto", chunk_size: int | None = None,
                      upsample: bool = True, only_correct: bool = False,
                      box_fraction: float = 0.7, preprocess=None) -> dict[str, Any]:
  """Class-level CRM (eq. 8 of 004): the mean CRM of each class's images, with its box.

  `data`: see `iterate_batches`; `preprocess` (optional) maps a batch of images to model input
  inside jit. `only_correct` keeps the images the model classifies correctly (004's class ROI is
  "for the correct prediction"). Returns 'maps' [classes, H, W] (zeros for an empty class),
  'counts' [classes] and 'boxes' (one (top, left, bottom, right) or None per class, the region
  >= box_fraction x the class map's maximum).
  """
  num_classes = num_classes or model.num_classes
  prepare = preprocess or (lambda x: jnp.asarray(x, jnp.float32))
  resolved = None
  compiled = None
  sums, counts = None, np.zeros(num_classes, np.int64)
  for batch_index, (images, labels, weights) in enumerate(iterate_batches(data, batch_size)):
    _check_raw_images(images, preprocess, batch_index)
    if compiled is None:
      resolved = method
      if method == "auto" and model.resolve_tap(tap) == model.resolve_tap("last_conv"):
        resolved = resolve_method(model, variables, prepare(images))
      elif method == "auto":
        resolved = "ablation"

      def batch_maps(variables, images):
        inputs = prepare(images)
        maps = crm(model, variables, inputs, tap=tap, method=resolved, chunk_size=chunk_size,
                   upsample=upsample)
        return maps, base.predicted_classes(model.logits(variables, inputs))

      compiled = jax.jit(batch_maps)
    maps, predicted = jax.device_get(compiled(variables, images))
    keep = np.asarray(weights) > 0
    if only_correct:
      keep &= np.asarray(predicted) == labels
    if np.any(labels[keep] >= num_classes) or np.any(labels[keep] < 0):
      raise ValueError(f"labels must lie in [0, {num_classes}); got {np.unique(labels[keep])}.")
    if sums is None:
      sums = np.zeros((num_classes, *maps.shape[1:]), np.float64)
    np.add.at(sums, labels[keep], maps[keep].astype(np.float64))
    counts += np.bincount(labels[keep], minlength=num_classes)
  if sums is None:
    raise ValueError("data yielded no batches.")
  means = sums / np.maximum(counts, 1)[:, None, None]
  return {"maps": means.astype(np.float32), "counts": counts, "method": resolved,
          "boxes": [bounding_box(m, box_fraction) if c else None for m, c in zip(means, counts)]}


def roi_pixel_counts(maps: jax.Array, fraction: float = 0.2) -> jax.Array:
  """Pixels per map [B] strictly above fraction x that map's maximum (0 when the max <= 0).

  004's Table 3 rule: the heat maps show the values above 20% of the maximum score; the
  threshold is on the raw scale, so CAM's negative values never count and CAM and Grad-CAM
  (= ReLU(CAM) / Z) give the same ROI up to interpolation at its border.
  """
  if jnp.ndim(maps) != 3:
    raise ValueError(f"maps must be [B, H, W]; got shape {tuple(jnp.shape(maps))}.")
  peak = maps.max(axis=(1, 2), keepdims=True)
  above = (maps > fraction * peak) & (peak > 0)
  return above.sum(axis=(1, 2))


def roi_size_table(model: base.Classifier, variables: base.Variables, data: Any, *,
                   methods: Sequence[str] | None = None, num_classes: int | None = None,
                   class_names: Sequence[str] | None = None, targets: str = "label",
                   batch_size: int = 16, fraction: float = 0.2, crm_method: str = "auto",
                   chunk_size: int | None = None, preprocess=None) -> dict[str, Any]:
  """004's Table 3: mean ROI pixels (> fraction x max, at input size) per class and method.

  `methods` defaults to CAM (only when the head is GAP + dense), Grad-CAM and CRM, all at
  'last_conv'; CAM/Grad-CAM explain the image's label (targets='label') or the predicted class
  ('predicted'). Returns {'image_size', 'fraction', 'classes', 'rows'} where each row is
  {'method', 'class', 'images', 'mean_pixels', 'percent'} (percent of the image's pixels).
  """
  if targets not in ("label", "predicted"):
    raise ValueError(f"targets must be 'label' or 'predicted'; got {targets!r}.")
  num_classes = num_classes or model.num_classes
  names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"class_names has {len(names)} entries for {num_classes} classes.")
  prepare = preprocess or (lambda x: jnp.asarray(x, jnp.float32))
  chosen, compiled = None, None
  totals = counts = None
  image_size = None
  for batch_index, (images, labels, weights) in enumerate(iterate_batches(data, batch_size)):
    _check_raw_images(images, preprocess, batch_index)
    if compiled is None:
      inputs = prepare(images)
      resolved = crm_method
      if crm_method == "auto":
        resolved = resolve_method(model, variables, inputs)
      chosen = list(methods) if methods is not None else [
          m for m in TABLE_METHODS if m != "cam" or resolved == "closed_form"]
      unknown = [m for m in chosen if m not in TABLE_METHODS]
      if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {TABLE_METHODS}.")
      if "cam" in chosen:  # raises a clear error when the head is not GAP + dense
        cam.cam(model, variables, inputs[:1], jnp.zeros((1,), jnp.int32), upsample=False)

      def batch_counts(variables, images, labels):
        inputs = prepare(images)
        if targets == "predicted":
          labels = base.predicted_classes(model.logits(variables, inputs))
        per_method = []
        for name in chosen:
          if name == "cam":
            maps = cam.cam(model, variables, inputs, labels, check_head=False)
          elif name == "grad_cam":
            maps = cam.grad_cam(model, variables, inputs, labels)
          else:
            maps = crm(model, variables, inputs, method=resolved, chunk_size=chunk_size)
          per_method.append(roi_pixel_counts(maps, fraction))
        return jnp.stack(per_method)

      compiled = jax.jit(batch_counts)
      totals = np.zeros((len(chosen), num_classes), np.float64)
      counts = np.zeros(num_classes, np.int64)
      image_size = tuple(int(d) for d in inputs.shape[1:3])
    keep = np.asarray(weights) > 0
    if np.any(labels[keep] >= num_classes) or np.any(labels[keep] < 0):
      raise ValueError(f"labels must lie in [0, {num_classes}); got {np.unique(labels[keep])}.")
    pixels = np.asarray(compiled(variables, images, jnp.asarray(labels, jnp.int32)))
    for row, name in enumerate(chosen):
      np.add.at(totals[row], labels[keep], pixels[row][keep])
    counts += np.bincount(labels[keep], minlength=num_classes)
  if compiled is None:
    raise ValueError("data yielded no batches.")
  area = image_size[0] * image_size[1]
  rows = []
  for row, name in enumerate(chosen):
    for c in range(num_classes):
      mean = totals[row, c] / counts[c] if counts[c] else float("nan")
      rows.append({"method": _TABLE_NAMES[name], "class": names[c], "images": int(counts[c]),
                   "mean_pixels": float(mean), "percent": float(100.0 * mean / area)})
  return {"image_size": list(image_size), "fraction": fraction, "classes": names, "rows": rows}
