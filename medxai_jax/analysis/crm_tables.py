"""Dataset-level CRM of Kim et al. (004_883d77b264ed2d14.txt): class ROIs (eq. 8) and Table 3.

The class-level ROI (eq. 8) pools the CRMs (`attribution.crm`) of a class's images: 004 writes
a sum; we report the mean, the same map up to the count, with the bounding box of the pixels
>= 70% of its maximum. Table 3 compares the ROI sizes of CAM, Grad-CAM and CRM: per map, the
pixels above 20% of its maximum, averaged per class.

The network comes as an `api.Split` at its last conv map (for the project's models
`model.split(variables)`); the data as (images, labels) arrays or an iterable of batches
(`iterate_batches`). Each table jits one batch step (the split closed over) and runs it batch
by batch on the host, checking every stored batch first.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.attribution import crm
from medxai_jax.attribution import registry

# 004's Table 3 compares these; any registered split method (e.g. the CAM family) can join.
TABLE_METHODS = ("cam", "grad_cam", "crm")
Preprocess = Callable[[jax.Array], jax.Array]


def _check_raw_images(images: np.ndarray, preprocess: Preprocess | None, index: int) -> None:
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


def _prepare(preprocess: Preprocess | None) -> Preprocess:
  """The map from a stored batch to model input (float32 when no preprocess is given)."""
  return preprocess or (lambda x: jnp.asarray(x, jnp.float32))


def _class_count(split: api.Split, inputs: jax.Array, num_classes: int | None) -> int:
  """`num_classes`, or the class count of the split's logits on the first batch."""
  if num_classes is not None:
    common.check_positive("num_classes", num_classes)
    return num_classes
  return api.class_count(api.output_count(split.logits, inputs))


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
  """Raises a ValueError unless every kept label lies in [0, num_classes)."""
  if np.any(labels >= num_classes) or np.any(labels < 0):
    raise ValueError(f"labels must lie in [0, {num_classes}); got {np.unique(labels)}.")


def class_average_crm(split: api.Split, data: Any, *, num_classes: int | None = None,
                      batch_size: int = 16, method: str = "auto", chunk_size: int | None = None,
                      upsample: bool = True, only_correct: bool = False,
                      box_fraction: float = 0.7, preprocess: Preprocess | None = None
                      ) -> dict[str, Any]:
  """Class-level CRM (eq. 8 of 004): the mean CRM of each class's images, with its box.

  `data`: see `iterate_batches`; `preprocess` (optional) maps a batch of images to model input
  inside jit. `only_correct` keeps the images the model classifies correctly (004's class ROI is
  "for the correct prediction"). `method='auto'` is resolved once, on the first batch
  (`crm.resolve_method`). Returns 'maps' [classes, H, W] (zeros for an empty class), 'counts'
  [classes], 'method' (the CRM method used) and 'boxes' (one (top, left, bottom, right) or None
  per class, the region >= box_fraction x the class map's maximum).
  """
  prepare = _prepare(preprocess)
  resolved, compiled = None, None
  sums, counts = None, None
  for batch_index, (images, labels, weights) in enumerate(iterate_batches(data, batch_size)):
    _check_raw_images(images, preprocess, batch_index)
    if compiled is None:
      inputs = prepare(images)
      num_classes = _class_count(split, inputs, num_classes)
      counts = np.zeros(num_classes, np.int64)
      resolved = crm.resolve_method(split, inputs) if method == "auto" else method

      def batch_maps(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        inputs = prepare(images)
        maps = crm.crm(split, inputs, method=resolved, chunk_size=chunk_size, upsample=upsample)
        return maps, api.predicted_classes(split.logits(inputs))

      compiled = jax.jit(batch_maps)
    maps, predicted = jax.device_get(compiled(images))
    keep = np.asarray(weights) > 0
    if only_correct:
      keep &= np.asarray(predicted) == labels
    _check_labels(labels[keep], num_classes)
    if sums is None:
      sums = np.zeros((num_classes, *maps.shape[1:]), np.float64)
    np.add.at(sums, labels[keep], maps[keep].astype(np.float64))
    counts += np.bincount(labels[keep], minlength=num_classes)
  if compiled is None:
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


def roi_size_table(split: api.Split, data: Any, *, methods: Sequence[str] | None = None,
                   num_classes: int | None = None, class_names: Sequence[str] | None = None,
                   targets: str = "label", batch_size: int = 16, fraction: float = 0.2,
                   crm_method: str = "auto", chunk_size: int | None = None,
                   preprocess: Preprocess | None = None) -> dict[str, Any]:
  """004's Table 3: mean ROI pixels (> fraction x max, at input size) per class and method.

  `split` cuts the network at its last conv map. `methods` defaults to CAM (only when the head
  is GAP + dense), Grad-CAM and CRM; CAM/Grad-CAM explain the image's label (targets='label')
  or the predicted class ('predicted'). Returns {'image_size', 'fraction', 'classes', 'rows'}
  where each row is {'method', 'class', 'images', 'mean_pixels', 'percent'} (percent of the
  image's pixels).
  """
  if targets not in ("label", "predicted"):
    raise ValueError(f"targets must be 'label' or 'predicted'; got {targets!r}.")
  prepare = _prepare(preprocess)
  chosen, compiled = None, None
  totals = counts = None
  image_size = names = None
  for batch_index, (images, labels, weights) in enumerate(iterate_batches(data, batch_size)):
    _check_raw_images(images, preprocess, batch_index)
    if compiled is None:
      inputs = prepare(images)
      num_classes = _class_count(split, inputs, num_classes)
      names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
      if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries for {num_classes} classes.")
      resolved = crm.resolve_method(split, inputs) if crm_method == "auto" else crm_method
      chosen = list(methods) if methods is not None else [
          m for m in TABLE_METHODS if m != "cam" or resolved == "closed_form"]
      table_methods = [name for name in registry.names()
                       if registry.get(name).needs in ("split", "gap_split")
                       and registry.get(name).output_rank == 3]
      unknown = [m for m in chosen if m not in table_methods]
      if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from the registered methods that "
                         f"read the last conv map: {table_methods}.")
      if "cam" in chosen:
        problem = cam.gap_head_problem(split, inputs[:1])
        if problem:
          raise ValueError(problem)

      def batch_counts(images: jax.Array, labels: jax.Array) -> jax.Array:
        inputs = prepare(images)
        if targets == "predicted":
          labels = api.predicted_classes(split.logits(inputs))
        per_method = []
        for name in chosen:
          spec = registry.get(name)
          if name == "crm":
            maps = crm.crm(split, inputs, method=resolved, chunk_size=chunk_size)
          else:
            maps = spec(split, inputs, labels if spec.takes_targets else None)
          per_method.append(roi_pixel_counts(maps, fraction))
        return jnp.stack(per_method)

      compiled = jax.jit(batch_counts)
      totals = np.zeros((len(chosen), num_classes), np.float64)
      counts = np.zeros(num_classes, np.int64)
      image_size = tuple(int(d) for d in inputs.shape[1:3])
    keep = np.asarray(weights) > 0
    _check_labels(labels[keep], num_classes)
    pixels = np.asarray(compiled(images, jnp.asarray(labels, jnp.int32)))
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
      rows.append({"method": registry.label(name), "class": names[c], "images": int(counts[c]),
                   "mean_pixels": float(mean), "percent": float(100.0 * mean / area)})
  return {"image_size": list(image_size), "fraction": fraction, "classes": names, "rows": rows}
