"""CheXlocalize's file formats and evaluation protocol (Saporta et al., "Benchmarking saliency
methods for chest X-ray interpretation", Nature Machine Intelligence 2022;
github.com/rajpurkarlab/cheXlocalize), on top of the per-image scores of `faithfulness`.

Files:
- Annotation JSON (`gt_annotations_*.json`): {image id: {"img_size": [h, w], pathology:
  [[[x, y], ...], ...]}}: per pathology a list of polygons in pixel coordinates (x: column,
  y: row). A pathology an image does not list has an empty mask (as their
  `annotation_to_segmentation.py`).
- Segmentation JSON (`gt_segmentations_*.json`, and predicted segmentations): {image id:
  {pathology: {"size": [h, w], "counts": ...}}}, COCO run-length encoding (RLE): the mask read
  in column-major (Fortran) order as alternating runs of 0s and 1s, starting with a (possibly
  empty) run of 0s. "counts" is either the list of run lengths (COCO's uncompressed RLE) or
  pycocotools' compressed string: each run, from the fourth on minus the run two before it, in
  signed 5-bit groups (low group first, 0x20 marks a continuation, 0x10 the sign of the last
  group), each group plus 48 as one ASCII character. `encode_rle` writes the string form.
- Saliency maps: theirs are PyTorch pickles `<image id>_<pathology>_map.pkl`; here a directory
  holds numpy files instead, either `<image id>_<pathology>_map.npy` (one 2-D map) or
  `<image id>.npz` with one 2-D array per pathology name. Maps of another size than the image
  are resized to it bilinearly with half-pixel centres (their F.interpolate(...,
  mode='bilinear', align_corners=False)); singleton axes ([1, 1, h, w]) are squeezed.
- Thresholds CSV (their `tuning_results.csv`): columns `threshold,task`, one row per pathology.

Polygons to masks (`rasterise_polygons`): their ground truth is drawn with PIL,
`ImageDraw.polygon(points, fill=1, outline=1)` on an image whose pixel (row i, column j) is the
point (x=j, y=i); with outline ink equal to the fill PIL draws only its filled polygon. 'pil'
(default) follows PIL's fill: vertex coordinates are truncated to integers; on every row y from
the top vertex to the bottom one, the crossings x with the non-horizontal edges (an edge counts
on y_low <= y <= y_high, and its crossing twice at y = y_high unless that is the polygon's last
row) are sorted and paired, and each pair fills the columns floor(x_1 + 0.5) .. ceil(x_2 - 0.5);
horizontal edges are drawn whole; polygons are united. It reproduces the benchmark's released
ground truth exactly (the repository's sample gt_annotations_val.json rasterised equals its
gt_segmentations_val.json, every pixel); PIL additionally widens the tips of sliver-thin
corners, so on random 16-pixel polygons about 0.3% of the pixels differ from PIL 13. 'centre'
keeps the float vertices and takes the pixels whose centre lies inside (even-odd rule) or on
the polygon (the rule of skimage.draw.polygon, up to ties on the boundary). pycocotools'
frPyObjects rasterisation (5x upsampled boundary tracing) is not offered: the benchmark's masks
are PIL's.

Saliency maps to segmentations (`segment_maps`, their `heatmap_to_segmentation.py`): the map is
min-max normalised (`faithfulness.normalise_maps`). With a threshold t for the pathology the
segmentation is normalised > t. Otherwise (their default) Otsu's threshold of the map quantised
to floor(255 m) (`faithfulness.binarise_maps`), and then, as they trace the foreground's contours
with OpenCV and fill each contour polygon with PIL: every hole is filled and isolated single
pixels (contours of one point, which they skip) are dropped (`fill_contours`; `contours=False`
keeps the raw Otsu foreground). On random smooth 24x32 maps this equals their OpenCV + PIL
pipeline pixel for pixel (299 of 300 maps; the other differs by 11 pixels in the Otsu level).

Pathologies scored: by default every one the ground-truth file names, and all ten of theirs
(`PATHOLOGIES`) for an annotation file that names only benchmark pathologies (it lists only
those an image shows); `pathologies=` selects some. Columns are sorted by name.

Scores (their `eval.py`):
- IoU per image and pathology: |S & G| / |S | G|. With `true_pos_only` (their default) NaN
  unless both S and G are non-empty; otherwise NaN only when both are empty (an empty S or G
  with the other non-empty scores 0). A prediction file without an image id is an error unless
  `allow_missing`, then the prediction is empty (their convention); with true_pos_only=False
  predicted images without ground truth are scored against an empty mask, as theirs. Predictions
  that are not scored (images without ground truth, pathologies outside the selection) are
  named in a warning.
- Hit per image and pathology ("hitmiss"): 1 when the first maximal pixel (raster order) of the
  resized map lies in G, 0 when not, NaN when G is empty: the hit rate is over the images that
  show the pathology (`faithfulness.hit_rate`, ties='first').
- Bootstrap: 1000 replicates; each draws n of the n images with replacement (the same draw for
  every pathology) and averages each pathology's non-NaN scores. Draws come from numpy's legacy
  RandomState(seed).choice, the generator their `np.random.seed(seed)` seeds, so the same
  per-image table and seed give their replicates. The interval is theirs: the replicate means
  sorted (NaN last), lower = the (int(0.025 R) - 1)-th, upper = the (int(0.975 R) - 1)-th
  (0-based; the 24th and 974th of 1000), mean = the mean of the replicate means; all rounded to
  3 decimals.
- CSVs (their names, `metric` 'iou' or 'hitmiss'): `<metric>_results_per_cxr.csv` (one column per
  pathology, sorted, then `img_id`; rows sorted by image id; NaN written as an empty field, as
  pandas), `<metric>_bootstrap_results_per_cxr.csv` (one row per replicate, one column per
  pathology, in their LOCALIZATION_TASKS order as their `df[LOCALIZATION_TASKS]`, other names
  after it, sorted) and `<metric>_summary_results.csv` (`name,lower,mean,upper`, sorted by name).

Not offered: their probability cutoffs (forcing an empty segmentation below a tuned predicted
probability), box-filter smoothing before Otsu, and the human-benchmark point annotations.
Images differ in size, so each image is one call (its pathologies vmapped together).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medxai_jax.analysis import faithfulness

# Their eval_constants.LOCALIZATION_TASKS, in their order.
PATHOLOGIES = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Airspace Opacity",
               "Edema", "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion",
               "Support Devices")
POLYGON_CONVENTIONS = ("pil", "centre")
METRICS = ("iou", "hitmiss")
NUM_REPLICATES = 1000
CONFIDENCE = 0.95
SIZE_KEY = "img_size"
MAP_SUFFIX = "_map.npy"


# ---------------------------------------------------------------------------------------------
# COCO run-length encoding.


def rle_counts(mask: np.ndarray) -> list[int]:
  """Run lengths of a binary mask [h, w] in column-major order, starting with a run of 0s."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"A mask to encode must be 2-D [h, w]; got shape {mask.shape}.")
  flat = mask.astype(bool).ravel(order="F")
  changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  edges = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(edges).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return [int(c) for c in counts]


def counts_to_string(counts: Sequence[int]) -> str:
  """pycocotools' compressed string of RLE run lengths (see the module docstring)."""
  chars = []
  for index, count in enumerate(counts):
    value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
    more = True
    while more:
      group = value & 0x1F
      value >>= 5  # arithmetic shift: a negative value stays negative
      more = value != (-1 if group & 0x10 else 0)
      chars.append(chr(group + (0x20 if more else 0) + 48))
  return "".join(chars)


def string_to_counts(text: str, where: str = "counts") -> list[int]:
  """Run lengths from pycocotools' compressed RLE string; a ValueError names `where`."""
  counts: list[int] = []
  position = 0
  while position < len(text):
    value, shift, more = 0, 0, True
    while more:
      if position >= len(text):
        raise ValueError(f"{where}: the compressed RLE string ends inside a run length.")
      code = ord(text[position]) - 48
      if not 0 <= code < 64:
        raise ValueError(f"{where}: character {text[position]!r} at {position} is not a "
                         "compressed RLE character (ASCII 48-111).")
      value |= (code & 0x1F) << shift
      more = bool(code & 0x20)
      shift += 5
      position += 1
      if not more and code & 0x10:
        value -= 1 << shift  # sign-extend the last group
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
  """COCO RLE {"size": [h, w], "counts": compressed string} of a binary mask [h, w]."""
  mask = np.asarray(mask)
  counts = rle_counts(mask)
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(counts)}


def decode_rle(rle: Mapping[str, Any], where: str = "RLE") -> np.ndarray:
  """The binary mask [h, w] (bool) of a COCO RLE dict (string or list counts)."""
  if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
    raise ValueError(f"{where}: an RLE segmentation must be a dict with 'size' and 'counts'; "
                     f"got {_preview(rle)}.")
  size = rle["size"]
  if (not isinstance(size, (list, tuple)) or len(size) != 2
      or not all(isinstance(v, int) and v >= 0 for v in size)):
    raise ValueError(f"{where}: 'size' must be [height, width] (two non-negative integers); "
                     f"got {size!r}.")
  height, width = size
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  if isinstance(counts, str):
    counts = string_to_counts(counts, where)
  elif not (isinstance(counts, (list, tuple)) and all(isinstance(c, int) for c in counts)):
    raise ValueError(f"{where}: 'counts' must be a compressed string or a list of run lengths; "
                     f"got {_preview(counts)}.")
  counts = np.asarray(counts, np.int64)
  if np.any(counts < 0):
    raise ValueError(f"{where}: negative run length {int(counts[counts < 0][0])} at index "
                     f"{int(np.flatnonzero(counts < 0)[0])}.")
  if int(counts.sum()) != height * width:
    raise ValueError(f"{where}: the run lengths sum to {int(counts.sum())}, not "
                     f"{height} x {width} = {height * width} pixels.")
  values = np.arange(counts.size) % 2 == 1
  flat = np.repeat(values, counts)
  return flat.reshape((height, width), order="F")


def _preview(value: Any, limit: int = 80) -> str:
  """A short repr for error messages."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Polygons.


def _check_polygon(polygon: Any, where: str) -> np.ndarray:
  """A polygon [[x, y], ...] as a float array [V, 2]; a ValueError names `where`."""
  try:
    points = np.asarray(polygon, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: a polygon must be a list of [x, y] points; got "
                     f"{_preview(polygon)}.") from None
  if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 1:
    raise ValueError(f"{where}: a polygon must be a list of [x, y] points; got "
                     f"{_preview(polygon)} (shape {points.shape}).")
  if not np.all(np.isfinite(points)):
    raise ValueError(f"{where}: a polygon has a non-finite coordinate: {_preview(polygon)}.")
  return points


def _fill_spans(rows: np.ndarray, first: np.ndarray, last: np.ndarray, height: int,
                width: int) -> np.ndarray:
  """Pixels [h, w] of the inclusive column spans first..last on the given rows (any counts)."""
  first = np.clip(first, 0, width).astype(np.int64)
  last = np.clip(last + 1, 0, width).astype(np.int64)
  keep = (rows >= 0) & (rows < height) & (last > first)
  rows, first, last = rows[keep].astype(np.int64), first[keep], last[keep]
  steps = np.zeros((height, width + 1), np.int64)
  np.add.at(steps, (rows, first), 1)
  np.add.at(steps, (rows, last), -1)
  return np.cumsum(steps, axis=1)[:, :width] > 0


def _crossings(points: np.ndarray, rows: np.ndarray, closed: bool, pil_ends: bool = False
               ) -> np.ndarray:
  """x of every row's crossings with the polygon's non-horizontal edges [rows, edges] (inf: no
  crossing), sorted per row. A row y crosses an edge spanning y_low..y_high when
  y_low <= y < y_high, or y_low <= y <= y_high when `closed`; `pil_ends` counts a crossing at an
  edge's end y = y_high twice unless it is the polygon's last row (PIL's rule)."""
  start, end = points, np.roll(points, -1, axis=0)
  slanted = start[:, 1] != end[:, 1]
  start, end = start[slanted], end[slanted]
  low, high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
  y = rows[:, None]
  crosses = (low[None] <= y) & ((y <= high[None]) if closed else (y < high[None]))
  slope = (end[:, 0] - start[:, 0]) / (end[:, 1] - start[:, 1])
  x = np.where(crosses, start[None, :, 0] + (y - start[None, :, 1]) * slope[None], np.inf)
  if pil_ends and high.size:
    again = crosses & (y == high[None]) & (y < high.max())
    x = np.concatenate([x, np.where(again, x, np.inf)], axis=1)
  return np.sort(x, axis=1)


def _span_pixels(rows: np.ndarray, x: np.ndarray, height: int, width: int, pil: bool
                 ) -> np.ndarray:
  """Pixels between the 1st and 2nd, 3rd and 4th, ... crossings of each row (even-odd rule):
  PIL's floor(x_l + 0.5)..ceil(x_r - 0.5), or the centres ceil(x_l)..floor(x_r)."""
  pairs = x.shape[1] // 2
  left, right = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
  valid = np.isfinite(right)
  left, right = np.where(valid, left, 0.0), np.where(valid, right, -1.0)
  first, last = ((np.floor(left + 0.5), np.ceil(right - 0.5)) if pil
                 else (np.ceil(left), np.floor(right)))
  row_index = np.broadcast_to(rows[:, None], left.shape)
  return _fill_spans(row_index[valid], first[valid], last[valid], height, width)


def _level_edges(points: np.ndarray, height: int, width: int, pil: bool) -> np.ndarray:
  """The horizontal edges' pixels: all columns between their ends (PIL), or the pixel centres on
  them (only on integer rows)."""
  start, end = points, np.roll(points, -1, axis=0)
  level = (start[:, 1] == end[:, 1]) & (pil | (start[:, 1] == np.round(start[:, 1])))
  low = np.minimum(start[level, 0], end[level, 0])
  high = np.maximum(start[level, 0], end[level, 0])
  if not pil:
    low, high = np.ceil(low), np.floor(high)
  return _fill_spans(start[level, 1], low, high, height, width)


def _pil_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL's filled polygon (fill == outline ink) of integer vertices [V, 2] (see the docstring)."""
  mask = _level_edges(points, height, width, pil=True)
  top = max(int(points[:, 1].min()), 0)
  bottom = min(int(points[:, 1].max()), height - 1)
  if bottom < top:
    return mask
  rows = np.arange(top, bottom + 1, dtype=np.float64)
  x = _crossings(points, rows, closed=True, pil_ends=True)
  return mask | _span_pixels(rows, x, height, width, pil=True)


def _centre_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pixels whose centre (x=j, y=i) lies inside (even-odd rule) or on the polygon."""
  rows = np.arange(height, dtype=np.float64)
  mask = _span_pixels(rows, _crossings(points, rows, closed=False), height, width, pil=False)
  # Centres on a slanted edge (its lower end included) and on the horizontal edges.
  x = _crossings(points, rows, closed=True)
  finite = np.isfinite(x)
  x = np.where(finite, x, 0.0)
  on_edge = finite & (np.abs(x - np.round(x)) <= 1e-9 * np.maximum(1.0, np.abs(x)))
  row_index = np.broadcast_to(rows[:, None], x.shape)
  columns = np.round(np.where(on_edge, x, 0.0))
  mask |= _fill_spans(row_index[on_edge], columns[on_edge], columns[on_edge], height, width)
  return mask | _level_edges(points, height, width, pil=False)


def rasterise_polygons(polygons: Sequence[Any], size: Sequence[int], convention: str = "pil",
                       where: str = "polygons") -> np.ndarray:
  """The union [h, w] (bool) of polygons [[x, y], ...] (x: column, y: row); see the docstring."""
  if convention not in POLYGON_CONVENTIONS:
    raise ValueError(f"convention must be one of {POLYGON_CONVENTIONS}; got {convention!r}.")
  height, width = (int(v) for v in size)
  if not isinstance(polygons, (list, tuple)):
    raise ValueError(f"{where}: expected a list of polygons; got {_preview(polygons)}.")
  mask = np.zeros((height, width), bool)
  for index, polygon in enumerate(polygons):
    points = _check_polygon(polygon, f"{where}, polygon {index}")
    if convention == "pil":
      mask |= _pil_polygon(np.trunc(points), height, width)
    else:
      mask |= _centre_polygon(points, height, width)
  return mask


# ---------------------------------------------------------------------------------------------
# Reading the files.


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """A ground-truth file: per image id its size (h, w) and per pathology its entry."""

  path: str
  kind: str                                   # 'annotations' (polygons) or 'segmentations'
  entries: Mapping[str, Mapping[str, Any]]    # image id -> pathology -> polygons or RLE
  sizes: Mapping[str, tuple[int, int]]        # image id -> (h, w)
  pathologies: tuple[str, ...]                # every pathology the file names, sorted
  convention: str = "pil"                     # polygon rasterisation (annotations)

  def mask(self, image_id: str, pathology: str) -> np.ndarray:
    """The ground-truth mask [h, w] (bool); empty when the image does not list the pathology."""
    entry = self.entries[image_id].get(pathology)
    where = f"{self.path}: image {image_id!r}, pathology {pathology!r}"
    if self.kind == "annotations":
      return rasterise_polygons(entry or [], self.sizes[image_id], self.convention, where)
    if entry is None:
      return np.zeros(self.sizes[image_id], bool)
    return decode_rle(entry, where)


def _load_json(path: str, what: str) -> dict[str, Any]:
  """A JSON object from `path`; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist.")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON ({error}).") from None
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{path}: expected a non-empty JSON object {{image id: {{pathology: ...}}}}; "
                     f"got {_preview(data)}.")
  for image_id, entry in data.items():
    if not isinstance(entry, dict):
      raise ValueError(f"{path}: image {image_id!r} must map pathologies to entries; got "
                       f"{_preview(entry)}.")
  return data


def _check_size(value: Any, where: str) -> tuple[int, int]:
  """(h, w) from a [h, w] list of positive integers."""
  if (not isinstance(value, (list, tuple)) or len(value) != 2
      or not all(isinstance(v, int) and v > 0 for v in value)):
    raise ValueError(f"{where}: the size must be [height, width] (positive integers); got "
                     f"{_preview(value)}.")
  return int(value[0]), int(value[1])


def read_ground_truth(path: str, convention: str = "pil") -> GroundTruth:
  """Reads an annotation JSON (polygons + img_size) or a segmentation JSON (RLE) by its content."""
  if convention not in POLYGON_CONVENTIONS:
    raise ValueError(f"convention must be one of {POLYGON_CONVENTIONS}; got {convention!r}.")
  data = _load_json(path, "The ground-truth file")
  annotations = any(SIZE_KEY in entry for entry in data.values())
  sizes, pathologies = {}, set()
  for image_id, entry in data.items():
    where = f"{path}: image {image_id!r}"
    if annotations:
      if SIZE_KEY not in entry:
        raise ValueError(f"{where} has no {SIZE_KEY!r} (an annotation file gives every image "
                         "its [height, width]).")
      sizes[image_id] = _check_size(entry[SIZE_KEY], where)
      for pathology, polygons in entry.items():
        if pathology == SIZE_KEY:
          continue
        for index, polygon in enumerate(polygons if isinstance(polygons, list) else [polygons]):
          _check_polygon(polygon, f"{where}, pathology {pathology!r}, polygon {index}")
        pathologies.add(pathology)
    else:
      if not entry:
        raise ValueError(f"{where} lists no pathology.")
      image_sizes = set()
      for pathology, rle in entry.items():
        if not isinstance(rle, dict) or "size" not in rle:
          raise ValueError(f"{where}, pathology {pathology!r}: expected an RLE dict with 'size' "
                           f"and 'counts'; got {_preview(rle)}.")
        image_sizes.add(_check_size(rle["size"], f"{where}, pathology {pathology!r}"))
        pathologies.add(pathology)
      if len(image_sizes) != 1:
        raise ValueError(f"{where}: its pathologies have different sizes {sorted(image_sizes)}.")
      sizes[image_id] = image_sizes.pop()
  return GroundTruth(path=path, kind="annotations" if annotations else "segmentations",
                     entries=data, sizes=sizes, pathologies=tuple(sorted(pathologies)),
                     convention=convention)


def read_segmentations(path: str) -> dict[str, dict[str, Any]]:
  """A predicted segmentation JSON {image id: {pathology: RLE}} (decoded lazily)."""
  data = _load_json(path, "The segmentation file")
  for image_id, entry in data.items():
    for pathology, rle in entry.items():
      if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{path}: image {image_id!r}, pathology {pathology!r}: expected an RLE "
                         f"dict with 'size' and 'counts'; got {_preview(rle)}.")
  return data


def read_thresholds(path: str) -> dict[str, float]:
  """Per-pathology thresholds from a CSV with columns `threshold` and `task` (their format)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"The thresholds file {path!r} does not exist.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"threshold", "task"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: needs the columns 'threshold' and 'task'; got "
                       f"{reader.fieldnames}.")
    thresholds: dict[str, float] = {}
    for line, row in enumerate(reader, start=2):
      task = row["task"]
      try:
        value = float(row["threshold"])
      except (TypeError, ValueError):
        raise ValueError(f"{path}, line {line}: threshold {row['threshold']!r} of {task!r} is "
                         "not a number.") from None
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{path}, line {line}: threshold {value} of {task!r} must lie in "
                         "[0, 1) (maps are min-max normalised).")
      if task in thresholds:
        raise ValueError(f"{path}, line {line}: pathology {task!r} is listed twice.")
      thresholds[task] = value
  return thresholds


def saliency_files(directory: str) -> dict[str, dict[str, str]]:
  """{image id: {pathology: file}} of `<id>_<pathology>_map.npy` and `<id>.npz` maps (recursive).

  For an .npz file the pathology value is "<file>:<array name>".
  """
  if not os.path.isdir(directory):
    raise NotADirectoryError(f"The saliency directory {directory!r} does not exist.")
  found: dict[str, dict[str, str]] = {}

  def add(image_id: str, pathology: str, source: str) -> None:
    known = found.setdefault(image_id, {})
    if pathology in known:
      raise ValueError(f"{directory}: two maps for image {image_id!r}, pathology "
                       f"{pathology!r}: {known[pathology]} and {source}.")
    known[pathology] = source

  for root, _, names in sorted(os.walk(directory)):
    for name in sorted(names):
      path = os.path.join(root, name)
      if name.endswith(MAP_SUFFIX):
        parts = name[:-len(MAP_SUFFIX)].rsplit("_", 1)
        if len(parts) != 2 or not all(parts):
          raise ValueError(f"{path}: a map file is named <image id>_<pathology>_map.npy.")
        add(parts[0], parts[1], path)
      elif name.endswith(".npz"):
        with np.load(path) as archive:
          for pathology in archive.files:
            add(name[:-len(".npz")], pathology, f"{path}:{pathology}")
  if not found:
    raise ValueError(f"{directory}: no saliency maps (<image id>_<pathology>_map.npy or "
                     "<image id>.npz).")
  return found


def load_map(source: str) -> np.ndarray:
  """A 2-D map from `saliency_files`' source (a .npy path or "<.npz path>:<name>")."""
  if ".npz:" in source:
    path, name = source.rsplit(":", 1)
    with np.load(path) as archive:
      saliency = archive[name]
  else:
    saliency = np.load(source)
  saliency = np.asarray(saliency)
  squeezed = np.squeeze(saliency)
  if squeezed.ndim != 2 or not np.issubdtype(squeezed.dtype, np.number):
    raise ValueError(f"{source}: a saliency map must be a 2-D numeric array (singleton axes "
                     f"allowed); got shape {saliency.shape}, dtype {saliency.dtype}.")
  if not np.all(np.isfinite(squeezed)):
    raise ValueError(f"{source}: the map has non-finite values.")
  return squeezed


# ---------------------------------------------------------------------------------------------
# Maps to segmentations, and scores.


@functools.partial(jax.jit, static_argnames="size")
def _resize(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`resize_maps` of floating maps, compiled once per shape."""
  return jax.image.resize(maps, (maps.shape[0], *size), "linear", antialias=False)


def resize_maps(maps: np.ndarray, size: Sequence[int]) -> jax.Array:
  """Maps [P, h', w'] bilinearly resized to [P, h, w] (half-pixel centres, edges clamped)."""
  maps = jnp.asarray(maps)
  if not jnp.issubdtype(maps.dtype, jnp.floating):
    maps = maps.astype(jnp.result_type(float))
  height, width = (int(v) for v in size)
  if maps.shape[1:] == (height, width):
    return maps
  return _resize(maps, (height, width))


def fill_contours(segmentation: np.ndarray) -> np.ndarray:
  """Their contour step: holes filled, isolated single pixels (8-connectivity) dropped.

  A hole is a 4-connected background region that does not reach the image border.
  """
  segmentation = np.asarray(segmentation, bool)
  ring = np.ones((3, 3), np.uint8)
  ring[1, 1] = 0
  neighbours = ndimage.correlate(segmentation.astype(np.uint8), ring, mode="constant")
  kept = segmentation & (neighbours > 0)
  background, _ = ndimage.label(~kept)
  border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
  outside = np.zeros(int(background.max()) + 1, bool)
  outside[border] = True
  outside[0] = False  # label 0 is the foreground
  return ~outside[background]


@jax.jit
def _binarised(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Otsu segmentations and min-max normalised maps [P, h, w] (one compilation per shape)."""
  return faithfulness.binarise_maps(maps, "otsu"), faithfulness.normalise_maps(maps)


@jax.jit
def _scored(maps: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_binarised` and the peak hits (1 when a map's first maximal pixel lies in its mask, 0 when
  not, NaN for an empty mask) of maps and masks [P, h, w], in one compilation per shape."""
  otsu, normalised = _binarised(maps)
  return otsu, normalised, faithfulness.hit_rate(maps, masks, "first")


def _segments(otsu: np.ndarray, normalised: np.ndarray, thresholds: Sequence[float | None],
              contours: bool) -> np.ndarray:
  """Per map the threshold segmentation, or the Otsu one (contour-filled) where t is None."""
  out = np.empty(otsu.shape, bool)
  for index, threshold in enumerate(thresholds):
    if threshold is None:
      out[index] = fill_contours(otsu[index]) if contours else otsu[index]
    else:
      out[index] = normalised[index] > threshold
  return out


def segment_maps(maps: np.ndarray, thresholds: Sequence[float | None],
                 contours: bool = True) -> np.ndarray:
  """Segmentations [P, h, w] (bool) of maps [P, h, w]: threshold t_p, or Otsu where t_p is None.

  See the module docstring; `contours` applies `fill_contours` to the Otsu segmentations.
  """
  maps = jnp.asarray(maps)
  if maps.ndim != 3:
    raise ValueError(f"maps must be [P, h, w]; got shape {tuple(maps.shape)}.")
  if len(thresholds) != maps.shape[0]:
    raise ValueError(f"Got {len(thresholds)} thresholds for {maps.shape[0]} maps.")
  otsu, normalised = (np.asarray(v) for v in _binarised(maps))
  return _segments(otsu, normalised, thresholds, contours)


def iou(prediction: np.ndarray, truth: np.ndarray, true_pos_only: bool = True) -> float:
  """IoU of two binary masks with eval.py's NaN rules (see the module docstring)."""
  prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
  union = int(np.logical_or(prediction, truth).sum())
  if true_pos_only and (not prediction.any() or not truth.any()):
    return float("nan")
  if union == 0:
    return float("nan")
  return int(np.logical_and(prediction, truth).sum()) / union


# ---------------------------------------------------------------------------------------------
# Protocol: per-image tables, bootstrap, CSVs.


@dataclasses.dataclass
class Table:
  """Per-image scores: rows are image ids (sorted), columns pathologies (sorted)."""

  metric: str
  image_ids: list[str]
  pathologies: list[str]
  values: np.ndarray  # [n, P], NaN where undefined


def _pathologies(truth: GroundTruth, pathologies: Sequence[str] | None) -> list[str]:
  """The pathologies to score (sorted): the given ones, or by default every one the file names,
  and all ten of the benchmark's for an annotation file naming only benchmark pathologies (an
  annotation file lists only the pathologies an image shows; the others are empty)."""
  known = set(truth.pathologies)
  if truth.kind == "annotations" and known <= set(PATHOLOGIES):
    known |= set(PATHOLOGIES)
  if not pathologies:
    return sorted(known)
  unknown = [p for p in pathologies if p not in known]
  if unknown:
    raise ValueError(f"{truth.path}: no image lists pathologies {unknown}; the file names "
                     f"{sorted(known)}.")
  return sorted(set(pathologies))


def _warn_unscored(source: str, what: str, names: Sequence[str]) -> None:
  """Warns that predictions for `names` are not scored (not in the ground truth / selection)."""
  if names:
    shown = ", ".join(repr(n) for n in list(names)[:5]) + (", ..." if len(names) > 5 else "")
    warnings.warn(f"{source}: {len(names)} {what} not scored: {shown}.", stacklevel=3)


def _missing_error(what: str, source: str, missing: Sequence[str]) -> ValueError:
  """An error naming the first missing image ids."""
  shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
  return ValueError(f"{source}: no {what} for {len(missing)} ground-truth image(s): {shown} "
                    "(allow_missing scores them as empty predictions).")


def iou_table_from_segmentations(truth: GroundTruth, predictions: Mapping[str, Mapping[str, Any]],
                                 source: str = "predictions", *,
                                 pathologies: Sequence[str] | None = None,
                                 true_pos_only: bool = True, allow_missing: bool = False
                                 ) -> Table:
  """IoU per image and pathology of predicted RLE segmentations (their get_ious)."""
  names = _pathologies(truth, pathologies)
  ids = sorted(truth.sizes)
  missing = [i for i in ids if i not in predictions]
  if missing and not allow_missing:
    raise _missing_error("segmentations", source, missing)
  extra = sorted(set(predictions) - set(ids))
  if true_pos_only:
    _warn_unscored(source, "predicted image(s) without ground truth (true_pos_only)", extra)
    extra = []
  _warn_unscored(source, "predicted pathologies outside the scored ones", sorted(
      {p for entry in predictions.values() for p in entry} - set(names)))
  rows = []
  for image_id in ids + extra:
    entry = predictions.get(image_id, {})
    row = []
    for pathology in names:
      where = f"{source}: image {image_id!r}, pathology {pathology!r}"
      if image_id in predictions and pathology not in entry and not allow_missing:
        raise ValueError(f"{where}: the prediction file lists the image but not the pathology "
                         "(allow_missing scores it as an empty prediction).")
      gt = truth.mask(image_id, pathology) if image_id in truth.sizes else None
      pred = decode_rle(entry[pathology], where) if pathology in entry else None
      if gt is None and pred is None:  # a predicted-only image without this pathology
        row.append(float("nan"))
        continue
      gt = np.zeros(pred.shape, bool) if gt is None else gt
      pred = np.zeros(gt.shape, bool) if pred is None else pred
      if pred.shape != gt.shape:
        raise ValueError(f"{where}: the predicted segmentation is {pred.shape[0]}x"
                         f"{pred.shape[1]} but the ground truth is {gt.shape[0]}x{gt.shape[1]}.")
      row.append(iou(pred, gt, true_pos_only))
    rows.append(row)
  return Table("iou", ids + extra, names, np.asarray(rows, np.float64).reshape(-1, len(names)))


def tables_from_maps(truth: GroundTruth, saliency_dir: str, *,
                     thresholds: Mapping[str, float] | None = None,
                     pathologies: Sequence[str] | None = None, true_pos_only: bool = True,
                     contours: bool = True, allow_missing: bool = False,
                     thresholds_source: str = "the thresholds table"
                     ) -> tuple[Table, Table, dict[str, dict[str, Any]]]:
  """IoU and hit tables of saliency maps, and their RLE segmentations {id: {pathology: RLE}}.

  `thresholds` (pathology -> t) binarise normalised > t; pathologies without one (all, when None)
  use Otsu. Each image's maps are resized to its size and scored together.
  """
  names = _pathologies(truth, pathologies)
  thresholds = dict(thresholds or {})
  if thresholds:
    lacking = [p for p in names if p not in thresholds]
    if lacking:
      raise ValueError(f"{thresholds_source}: no threshold for pathologies {lacking}.")
  files = saliency_files(saliency_dir)
  ids = sorted(truth.sizes)
  missing = [i for i in ids if i not in files]
  if missing and not allow_missing:
    raise _missing_error("saliency maps", saliency_dir, missing)
  _warn_unscored(saliency_dir, "image(s) without ground truth", sorted(set(files) - set(ids)))
  _warn_unscored(saliency_dir, "pathologies outside the scored ones", sorted(
      {p for found in files.values() for p in found} - set(names)))
  ious, hits, segmentations = [], [], {}
  for image_id in ids:
    size = truth.sizes[image_id]
    found = files.get(image_id, {})
    lacking = [p for p in names if p not in found]
    if found and lacking and not allow_missing:
      raise ValueError(f"{saliency_dir}: image {image_id!r} has no map for pathologies "
                       f"{lacking} (allow_missing scores them as empty predictions).")
    present = [p for p in names if p in found]
    truths = {p: truth.mask(image_id, p) for p in names}
    # Pathologies without a map (allow_missing): an empty segmentation and no hit.
    iou_row = {p: iou(np.zeros(size, bool), truths[p], true_pos_only) for p in names}
    hit_row = {p: 0.0 if truths[p].any() else float("nan") for p in names}
    if present:
      # Each map is resized on its own (an image's maps may come in different sizes).
      maps = jnp.concatenate([resize_maps(load_map(found[p])[None], size) for p in present])
      masks = np.stack([truths[p] for p in present])
      otsu, normalised, peak_hits = (np.asarray(v) for v in _scored(maps, jnp.asarray(masks)))
      segments = _segments(otsu, normalised, [thresholds.get(p) for p in present], contours)
      segmentations[image_id] = {}
      for index, pathology in enumerate(present):
        iou_row[pathology] = iou(segments[index], masks[index], true_pos_only)
        hit_row[pathology] = float(peak_hits[index])
        segmentations[image_id][pathology] = encode_rle(segments[index])
    ious.append([iou_row[p] for p in names])
    hits.append([hit_row[p] for p in names])
  shape = (-1, len(names))
  return (Table("iou", ids, names, np.asarray(ious, np.float64).reshape(shape)),
          Table("hitmiss", ids, names, np.asarray(hits, np.float64).reshape(shape)),
          segmentations)


def bootstrap_replicates(values: np.ndarray, seed: int = 0,
                         num_replicates: int = NUM_REPLICATES) -> np.ndarray:
  """Replicate means [R, P] of a table [n, P]: rows drawn with replacement, NaNs skipped.

  Draws are numpy's legacy RandomState(seed).choice(n, n), replicate after replicate (the stream
  their np.random.seed(seed) + np.random.choice give).
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 2 or values.shape[0] == 0:
    raise ValueError(f"The table must be [images, pathologies] with at least one image; got "
                     f"shape {values.shape}.")
  if num_replicates < 1:
    raise ValueError(f"num_replicates must be positive; got {num_replicates}.")
  n = values.shape[0]
  rows = np.random.RandomState(seed).randint(0, n, size=(num_replicates, n))
  sample = values[rows]                                   # [R, n, P]
  finite = np.isfinite(sample)
  counts = finite.sum(axis=1)
  totals = np.where(finite, sample, 0.0).sum(axis=1)
  return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def confidence_interval(replicates: np.ndarray, confidence: float = CONFIDENCE
                        ) -> tuple[float, float, float]:
  """(lower, mean, upper) of one pathology's replicate means, their way (see the docstring)."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1); got {confidence}.")
  ordered = np.sort(np.asarray(replicates, np.float64))   # NaN last, as pandas' sort_values
  count = ordered.size
  alpha = round(1.0 - confidence, 12)  # their confidence_level (0.05), free of 1 - 0.95 rounding
  # Their indices; a negative one (fewer than 2 / alpha replicates) wraps round, as iloc does.
  lower = ordered[int(alpha / 2 * count) - 1]
  upper = ordered[int((1 - alpha / 2) * count) - 1]
  finite = ordered[np.isfinite(ordered)]
  mean = finite.mean() if finite.size else float("nan")
  return float(np.round(lower, 3)), float(np.round(mean, 3)), float(np.round(upper, 3))


def bootstrap_columns(pathologies: Sequence[str]) -> list[int]:
  """Column order of the bootstrap CSV: theirs (LOCALIZATION_TASKS order), then other names."""
  rank = {name: index for index, name in enumerate(PATHOLOGIES)}
  return sorted(range(len(pathologies)),
                key=lambda i: (rank.get(pathologies[i], len(rank)), pathologies[i]))


def _field(value: float) -> str:
  """A CSV field: empty for NaN (as pandas writes it), else repr precision."""
  return "" if not np.isfinite(value) else repr(float(value))


def write_csvs(table: Table, workdir: str, seed: int = 0,
               num_replicates: int = NUM_REPLICATES) -> dict[str, str]:
  """Writes the per-image, bootstrap and summary CSVs of a table; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  paths = {kind: os.path.join(workdir, f"{table.metric}_{suffix}")
           for kind, suffix in (("per_image", "results_per_cxr.csv"),
                                ("bootstrap", "bootstrap_results_per_cxr.csv"),
                                ("summary", "summary_results.csv"))}
  with open(paths["per_image"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*table.pathologies, "img_id"])
    for image_id, row in zip(table.image_ids, table.values):
      writer.writerow([*(_field(v) for v in row), image_id])
  replicates = bootstrap_replicates(table.values, seed, num_replicates)
  order = bootstrap_columns(table.pathologies)
  with open(paths["bootstrap"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([table.pathologies[i] for i in order])
    writer.writerows([[_field(row[i]) for i in order] for row in replicates])
  with open(paths["summary"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "lower", "mean", "upper"])
    for index, pathology in enumerate(table.pathologies):
      lower, mean, upper = confidence_interval(replicates[:, index])
      writer.writerow([pathology, _field(lower), _field(mean), _field(upper)])
  return paths


def write_segmentations(segmentations: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Writes {image id: {pathology: RLE}} as a segmentation JSON (their eval.py reads it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(segmentations, f)
  return path


def evaluate(annotations: str, workdir: str, *, saliency_dir: str | None = None,
             segmentations: str | None = None, thresholds: str | None = None, seed: int = 0,
             pathologies: Sequence[str] | None = None, true_pos_only: bool = True,
             convention: str = "pil", contours: bool = True, allow_missing: bool = False,
             num_replicates: int = NUM_REPLICATES) -> dict[str, dict[str, str]]:
  """The benchmark on files: IoU (and, from maps, hit rate) CSVs in `workdir`.

  Exactly one of `saliency_dir` (maps; also writes `saliency_segmentations.json`) and
  `segmentations` (a predicted RLE JSON: IoU only) is given; `thresholds` (a CSV) replaces Otsu.
  Returns {metric: {'per_image' | 'bootstrap' | 'summary' | 'segmentations': path}}.
  """
  if (saliency_dir is None) == (segmentations is None):
    raise ValueError("Give exactly one of saliency_dir (maps) and segmentations (an RLE JSON).")
  if segmentations is not None and thresholds is not None:
    raise ValueError("thresholds binarise saliency maps; predicted segmentations are already "
                     "binary.")
  truth = read_ground_truth(annotations, convention)
  if segmentations is not None:
    table = iou_table_from_segmentations(
        truth, read_segmentations(segmentations), segmentations, pathologies=pathologies,
        true_pos_only=true_pos_only, allow_missing=allow_missing)
    return {"iou": write_csvs(table, workdir, seed, num_replicates)}
  table_iou, table_hit, predicted = tables_from_maps(
      truth, saliency_dir, thresholds=read_thresholds(thresholds) if thresholds else None,
      pathologies=pathologies, true_pos_only=true_pos_only, contours=contours,
      allow_missing=allow_missing, thresholds_source=thresholds or "the thresholds table")
  out = {"iou": write_csvs(table_iou, workdir, seed, num_replicates),
         "hitmiss": write_csvs(table_hit, workdir, seed, num_replicates)}
  out["iou"]["segmentations"] = write_segmentations(
      predicted, os.path.join(workdir, "saliency_segmentations.json"))
  return out
