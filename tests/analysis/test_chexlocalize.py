"""CheXlocalize's formats and protocol: the RLE codec against naive encoders and hand-computed
strings, polygons against PIL (the benchmark's rasteriser) and skimage, the contour step against
an OpenCV + PIL transcription of theirs, IoU / hit NaN rules, the bootstrap against their
RandomState stream and pandas interval, and the binary end to end on small files written here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw

import subprocess_env
from medxai_jax.analysis import chexlocalize as cx
from medxai_jax.analysis import faithfulness


# --- Independent references. -------------------------------------------------------------------


def naive_counts(mask):
  """Run lengths pixel by pixel over the columns (column-major), starting with zeros."""
  counts, current, run = [], 0, 0
  for column in range(mask.shape[1]):
    for row in range(mask.shape[0]):
      value = int(mask[row, column])
      if value == current:
        run += 1
      else:
        counts.append(run)
        current, run = value, 1
  counts.append(run)
  return counts


def naive_string(counts):
  """pycocotools' string with the signed 5-bit groups taken by modular arithmetic."""
  out = ""
  for index, count in enumerate(counts):
    value = count - counts[index - 2] if index > 2 else count
    while True:
      group = value % 32                      # low 5 bits of the two's complement
      rest = (value - group) // 32
      sign_bit = group >= 16
      last = (rest == 0 and not sign_bit) or (rest == -1 and sign_bit)
      out += chr(48 + group + (0 if last else 32))
      if last:
        break
      value = rest
  return out


def pil_polygons(polygons, height, width):
  """Their annotation_to_segmentation.create_mask, with PIL."""
  image = Image.new("1", (width, height))
  for polygon in polygons:
    ImageDraw.Draw(image).polygon([tuple(p) for p in polygon], outline=1, fill=1)
  return np.array(image, dtype=bool)


def their_otsu_segmentation(saliency):
  """Their cam_to_segmentation (Otsu branch) with OpenCV and PIL."""
  m = saliency - saliency.min()
  m = m / m.max()
  levels = np.uint8(255 * m)
  binary = cv2.threshold(levels, 0, int(levels.max()), cv2.THRESH_OTSU)[1]
  contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
  contours = contours[0] if len(contours) == 2 else contours[1]
  polygons = [[tuple(int(v) for v in p[0]) for p in c] for c in contours if len(c) > 1]
  return pil_polygons(polygons, *saliency.shape)


def their_bootstrap(values, seed, replicates):
  """Their bootstrap_metric: np.random.seed, then one choice of n rows per replicate."""
  np.random.seed(seed)
  frame = pd.DataFrame(values)
  out = []
  for _ in range(replicates):
    rows = np.random.choice(len(frame), size=len(frame), replace=True)
    out.append(frame.iloc[rows].mean().to_numpy())
  return np.array(out)


def their_interval(series):
  """Their compute_cis with confidence_level=0.05."""
  ordered = pd.Series(series).sort_values()
  lower = ordered.iloc[int(0.05 / 2 * len(ordered)) - 1].round(3)
  upper = ordered.iloc[int((1 - 0.05 / 2) * len(ordered)) - 1].round(3)
  return lower, round(ordered.mean(), 3), upper


def bilinear_half_pixel(saliency, height, width):
  """F.interpolate(mode='bilinear', align_corners=False) in numpy: clamped half-pixel sampling."""
  h, w = saliency.shape

  def axis(n_out, n_in):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, pos - low

  r0, r1, fr = axis(height, h)
  c0, c1, fc = axis(width, w)
  top = saliency[r0][:, c0] * (1 - fc) + saliency[r0][:, c1] * fc
  bottom = saliency[r1][:, c0] * (1 - fc) + saliency[r1][:, c1] * fc
  return top * (1 - fr[:, None]) + bottom * fr[:, None]


# --- RLE. --------------------------------------------------------------------------------------


def test_rle_hand_computed_strings():
  # [[0, 1], [1, 1]] read by columns is 0, 1, 1, 1: runs [1, 3], characters 48 + 1, 48 + 3.
  mask = np.array([[0, 1], [1, 1]], bool)
  assert cx.rle_counts(mask) == [1, 3]
  assert cx.encode_rle(mask) == {"size": [2, 2], "counts": "13"}
  # 100 = 3 * 32 + 4: group 4 with the continuation bit (4 + 32 + 48 = 'T'), then 3 ('3').
  assert cx.counts_to_string([100]) == "T3"
  # From the fourth run on, the difference to the run two before: 1 - 2 = -1 is one group
  # 31 (sign bit set, nothing left): 'O'.
  assert cx.counts_to_string([5, 2, 9, 1]) == "529O"
  assert cx.string_to_counts("529O") == [5, 2, 9, 1]
  # A mask starting with 1 starts with an empty run of zeros.
  assert cx.rle_counts(np.ones((2, 3), bool)) == [0, 6]


def test_rle_round_trips_both_forms_against_naive_encoders():
  rng = np.random.default_rng(0)
  masks = [rng.uniform(size=(17, 23)) < p for p in (0.05, 0.5, 0.95)]
  masks += [np.zeros((5, 7), bool), np.ones((6, 4), bool), rng.uniform(size=(1, 40)) < 0.5]
  big = np.zeros((64, 64), bool)
  big[3:60, 10:50] = True  # long runs: multi-group and negative differences
  masks.append(big)
  for mask in masks:
    counts = naive_counts(mask)
    assert cx.rle_counts(mask) == counts
    text = naive_string(counts)
    assert cx.counts_to_string(counts) == text
    assert cx.string_to_counts(text) == counts
    size = list(mask.shape)
    np.testing.assert_array_equal(cx.decode_rle({"size": size, "counts": text}), mask)
    np.testing.assert_array_equal(cx.decode_rle({"size": size, "counts": counts}), mask)
    np.testing.assert_array_equal(cx.decode_rle(cx.encode_rle(mask)), mask)


def test_bad_rle_is_named():
  with pytest.raises(ValueError, match=r"f.json: image 'a'.*sum to 5, not 2 x 2 = 4"):
    cx.decode_rle({"size": [2, 2], "counts": [2, 3]}, "f.json: image 'a'")
  with pytest.raises(ValueError, match="not a compressed RLE character"):
    cx.decode_rle({"size": [2, 2], "counts": "1 3"})
  with pytest.raises(ValueError, match="ends inside a run"):
    cx.decode_rle({"size": [10, 10], "counts": "T"})
  with pytest.raises(ValueError, match="negative run length"):
    cx.decode_rle({"size": [2, 2], "counts": [5, -1]})
  with pytest.raises(ValueError, match="'size' and 'counts'"):
    cx.decode_rle({"counts": "13"})


# --- Polygons. ---------------------------------------------------------------------------------


POLYGONS = [
    [[3.2, 2.7], [20.6, 4.1], [17.9, 15.3], [6.4, 13.8]],                       # convex
    [[2.5, 2.5], [12.5, 2.5], [12.5, 6.5], [6.5, 6.5], [6.5, 14.5], [2.5, 14.5]],  # L-shape
    [[25.3, 3.1], [38.7, 9.9], [30.2, 10.4], [34.8, 17.6], [24.1, 16.2]],       # concave
]


def test_pil_convention_equals_pil_and_centre_convention_equals_skimage():
  for polygon in POLYGONS:
    np.testing.assert_array_equal(cx.rasterise_polygons([polygon], (20, 40)),
                                  pil_polygons([polygon], 20, 40), err_msg=str(polygon))
    # skimage fills the pixel centres (row, col) inside; generic float vertices have no
    # centre on the boundary, so the pixel sets (and areas) agree exactly.
    reference = np.zeros((20, 40), bool)
    points = np.asarray(polygon)
    reference[draw.polygon(points[:, 1], points[:, 0], (20, 40))] = True
    centre = cx.rasterise_polygons([polygon], (20, 40), "centre")
    assert centre.sum() == reference.sum()
    np.testing.assert_array_equal(centre, reference)
  # Several polygons are united; the integer square 1..4 covers rows and columns 1..4 in PIL.
  square = [[1, 1], [4, 1], [4, 4], [1, 4]]
  union = cx.rasterise_polygons([square, POLYGONS[2]], (20, 40))
  np.testing.assert_array_equal(union, pil_polygons([square, POLYGONS[2]], 20, 40))
  assert union[1:5, 1:5].all() and union[:6, :6].sum() == 16


def test_malformed_polygons_are_named(tmp_path):
  path = tmp_path / "gt.json"
  path.write_text(json.dumps({"img1": {"img_size": [8, 8], "Edema": [[[1, 1], [2]]]}}))
  with pytest.raises(ValueError, match=r"image 'img1', pathology 'Edema', polygon 0"):
    cx.read_ground_truth(str(path))
  path.write_text(json.dumps({"img1": {"img_size": [8, 8]}, "img2": {"Edema": []}}))
  with pytest.raises(ValueError, match=r"image 'img2' has no 'img_size'"):
    cx.read_ground_truth(str(path))
  with pytest.raises(ValueError, match="convention must be"):
    cx.rasterise_polygons([], (4, 4), "coco")


# --- Segmentations and scores. -----------------------------------------------------------------


def test_otsu_with_contours_equals_their_opencv_pil_pipeline():
  rng = np.random.default_rng(3)
  for sigma in (1.0, 2.0, 3.0):
    saliency = ndimage.gaussian_filter(rng.normal(size=(24, 32)), sigma).astype(np.float32)
    ours = cx.segment_maps(saliency[None], [None])[0]
    np.testing.assert_array_equal(ours, their_otsu_segmentation(saliency), err_msg=str(sigma))
  # The contour step by hand: a ring's hole is filled, a lone pixel dropped, a pair kept.
  raw = np.zeros((10, 12), bool)
  raw[1:6, 1:6] = True
  raw[3, 3] = False
  raw[8, 8] = True
  raw[1, 9:11] = True
  expected = raw.copy()
  expected[3, 3], expected[8, 8] = True, False
  np.testing.assert_array_equal(cx.fill_contours(raw), expected)
  # Holes as scipy fills them, on random masks without isolated pixels.
  for seed in range(3):
    noisy = ndimage.binary_opening(np.random.default_rng(seed).uniform(size=(30, 30)) < 0.6)
    np.testing.assert_array_equal(cx.fill_contours(noisy), ndimage.binary_fill_holes(noisy))


def test_threshold_segmentation_and_iou_hit_rules():
  rng = np.random.default_rng(4)
  maps = rng.uniform(size=(3, 12, 12))
  maps[0] = np.arange(144.0).reshape(12, 12) + 7.0
  # Map 0 normalised is k / 143 for pixel k (raster order): > 0.5 keeps k >= 72, rows 6-11.
  np.testing.assert_array_equal(cx.segment_maps(maps, [0.5, None, None])[0],
                                np.arange(144).reshape(12, 12) >= 72)
  prediction = np.zeros((4, 4), bool)
  prediction[0:2, 0:2] = True           # 4 pixels
  truth = np.zeros((4, 4), bool)
  truth[1:3, 0:3] = True                # 6 pixels, 2 shared: IoU 2 / 8
  assert cx.iou(prediction, truth) == 0.25
  empty = np.zeros((4, 4), bool)
  assert np.isnan(cx.iou(empty, truth)) and np.isnan(cx.iou(prediction, empty))
  # Without true_pos_only an empty side scores 0 and only both empty is undefined.
  assert cx.iou(empty, truth, False) == 0.0 and cx.iou(prediction, empty, False) == 0.0
  assert np.isnan(cx.iou(empty, empty, False))
  # true_pos_only IoU of an Otsu segmentation is faithfulness.segmentation_iou without contours.
  masks = rng.uniform(size=(3, 12, 12)) < 0.3
  segments = cx.segment_maps(maps, [None] * 3, contours=False)
  np.testing.assert_allclose([cx.iou(s, m) for s, m in zip(segments, masks)],
                             jax.jit(faithfulness.segmentation_iou)(maps, masks), rtol=1e-6)


def test_resize_matches_half_pixel_bilinear():
  saliency = np.random.default_rng(5).uniform(size=(4, 6))
  np.testing.assert_allclose(cx.resize_maps(saliency[None], (10, 9))[0],
                             bilinear_half_pixel(saliency, 10, 9), rtol=1e-5, atol=1e-6)


# --- Bootstrap. --------------------------------------------------------------------------------


def test_bootstrap_replicates_and_interval_are_theirs():
  rng = np.random.default_rng(6)
  values = rng.uniform(size=(9, 3))
  values[rng.uniform(size=values.shape) < 0.3] = np.nan
  ours = cx.bootstrap_replicates(values, seed=7, num_replicates=1000)
  np.testing.assert_allclose(ours, their_bootstrap(values, 7, 1000), rtol=1e-12)
  for column in range(3):
    lower, mean, upper = cx.confidence_interval(ours[:, column])
    assert (lower, mean, upper) == their_interval(ours[:, column])
    assert lower <= mean <= upper
    finite = values[:, column][np.isfinite(values[:, column])]
    assert lower <= round(finite.mean(), 3) <= upper  # the sample mean lies inside
  with pytest.raises(ValueError, match="at least one image"):
    cx.bootstrap_replicates(np.zeros((0, 2)))


# --- Files and the binary. ---------------------------------------------------------------------

SIZES = {"p1_study1_view1_frontal": (24, 32), "p2_study1_view1_frontal": (24, 32),
         "p3_study1_view1_frontal": (32, 24)}
NAMES = ("Cardiomegaly", "Edema", "Lung Lesion")


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory):
  """An annotation JSON (polygons on 2 of 3 images), maps at 8x8 (npy and npz), thresholds."""
  root = tmp_path_factory.mktemp("chexlocalize")
  rng = np.random.default_rng(8)
  annotations = {}
  for index, (image_id, (h, w)) in enumerate(SIZES.items()):
    entry = {"img_size": [h, w]}
    if index < 2:
      entry["Cardiomegaly"] = [[[2.3, 3.1], [w - 4.2, 2.8], [w - 6.7, h - 3.4], [4.1, h - 5.2]]]
      entry["Lung Lesion"] = [[[1.5, 1.5], [8.5, 1.5], [5.5, 7.5]],
                              [[w - 7.5, h - 7.5], [w - 1.5, h - 6.5], [w - 3.5, h - 1.5]]]
    annotations[image_id] = entry  # Edema: never present
  (root / "gt.json").write_text(json.dumps(annotations))
  maps_dir = root / "maps"
  maps_dir.mkdir()
  maps = {}
  for index, image_id in enumerate(SIZES):
    maps[image_id] = {name: ndimage.gaussian_filter(rng.normal(size=(8, 8)), 1.0)
                      for name in NAMES}
    if index == 2:
      np.savez(maps_dir / f"{image_id}.npz", **maps[image_id])
    else:
      for name, saliency in maps[image_id].items():
        np.save(maps_dir / f"{image_id}_{name}_map.npy", saliency[None, None])
  thresholds = {"Cardiomegaly": 0.3, "Edema": 0.5, "Lung Lesion": 0.6}
  with open(root / "thresholds.csv", "w") as f:
    f.write("threshold,task\n" + "".join(f"{t},{n}\n" for n, t in thresholds.items()))
  return root, annotations, maps, thresholds


REPO = subprocess_env.REPO


def run_binary(**flag_values) -> subprocess.CompletedProcess:
  """experiments/chexlocalize_eval.py run as a user runs it, with --name=value flags."""
  argv = [f"--{name}={','.join(value) if isinstance(value, list) else value}"
          for name, value in flag_values.items()]
  return subprocess.run([sys.executable, "-m", "experiments.chexlocalize_eval", *argv],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def read_rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_binary_with_thresholds_matches_an_independent_computation(benchmark_files, tmp_path):
  root, annotations, maps, thresholds = benchmark_files
  workdir = tmp_path / "out"
  result = run_binary(annotations=root / "gt.json", saliency_dir=root / "maps",
                      thresholds=root / "thresholds.csv", workdir=workdir, seed=3,
                      pathologies=list(NAMES))
  assert result.returncode == 0, result.stderr
  ids = sorted(SIZES)
  expected_iou, expected_hit = [], []
  for image_id in ids:
    h, w = SIZES[image_id]
    iou_row, hit_row = [], []
    for name in NAMES:
      truth = pil_polygons(annotations[image_id].get(name, []), h, w)
      saliency = bilinear_half_pixel(maps[image_id][name], h, w)
      normalised = (saliency - saliency.min()) / (saliency.max() - saliency.min())
      segment = normalised > thresholds[name]
      both = segment.any() and truth.any()
      iou_row.append((segment & truth).sum() / (segment | truth).sum() if both else np.nan)
      peak = np.unravel_index(np.argmax(saliency), saliency.shape)
      hit_row.append(float(truth[peak]) if truth.any() else np.nan)
    expected_iou.append(iou_row)
    expected_hit.append(hit_row)
  for metric, expected in (("iou", expected_iou), ("hitmiss", expected_hit)):
    rows = read_rows(workdir / f"{metric}_results_per_cxr.csv")
    assert rows[0] == [*NAMES, "img_id"]
    assert [row[-1] for row in rows[1:]] == ids
    got = np.array([[float(v) if v else np.nan for v in row[:-1]] for row in rows[1:]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=metric)
    bootstrap = read_rows(workdir / f"{metric}_bootstrap_results_per_cxr.csv")
    # Their column order (LOCALIZATION_TASKS: Cardiomegaly, Lung Lesion, ..., Edema).
    assert bootstrap[0] == ["Cardiomegaly", "Lung Lesion", "Edema"]
    assert len(bootstrap) == 1 + cx.NUM_REPLICATES
    summary = read_rows(workdir / f"{metric}_summary_results.csv")
    assert summary[0] == ["name", "lower", "mean", "upper"]
    assert [row[0] for row in summary[1:]] == list(NAMES)
    replicates = np.array([[float(v) if v else np.nan for v in row] for row in bootstrap[1:]])
    for row in summary[1:]:
      want = their_interval(replicates[:, bootstrap[0].index(row[0])])
      got_row = [float(v) if v else np.nan for v in row[1:]]
      np.testing.assert_allclose(got_row, want, equal_nan=True)
  assert np.isnan(np.array(expected_iou)[:, 1]).all()  # Edema is absent everywhere: NaN
  assert (workdir / "saliency_segmentations.json").exists()


def test_otsu_segmentations_round_trip_through_the_segmentation_route(benchmark_files,
                                                                     tmp_path):
  root, _, maps, _ = benchmark_files
  first = cx.evaluate(str(root / "gt.json"), str(tmp_path / "maps"),
                      saliency_dir=str(root / "maps"), pathologies=list(NAMES), seed=1)
  predicted = json.loads(open(first["iou"]["segmentations"]).read())
  image_id = "p3_study1_view1_frontal"
  resized = np.asarray(cx.resize_maps(maps[image_id]["Edema"][None], SIZES[image_id])[0])
  np.testing.assert_array_equal(cx.decode_rle(predicted[image_id]["Edema"]),
                                their_otsu_segmentation(resized))
  second = cx.evaluate(str(root / "gt.json"), str(tmp_path / "segs"),
                       segmentations=first["iou"]["segmentations"], pathologies=list(NAMES),
                       seed=1)
  for kind in ("per_image", "bootstrap", "summary"):
    assert read_rows(first["iou"][kind]) == read_rows(second["iou"][kind]), kind
  # true_pos_only=False (their other mode): empty sides score 0, predicted-only images count.
  extra_mask = np.zeros((6, 6), bool)
  extra_mask[1:3, 1:3] = True
  predicted["p9_study1_view1_frontal"] = {"Edema": cx.encode_rle(extra_mask),
                                          "Lung Lesion": cx.encode_rle(~np.ones((6, 6), bool))}
  predicted["p1_study1_view1_frontal"]["Lung Lesion"] = cx.encode_rle(np.zeros((24, 32), bool))
  (tmp_path / "with_extra.json").write_text(json.dumps(predicted))
  loose = cx.evaluate(str(root / "gt.json"), str(tmp_path / "loose"),
                      segmentations=str(tmp_path / "with_extra.json"), pathologies=list(NAMES),
                      true_pos_only=False, allow_missing=True)
  rows = {row[-1]: row[:-1] for row in read_rows(loose["iou"]["per_image"])[1:]}
  assert rows["p9_study1_view1_frontal"] == ["", "0.0", ""]
  assert rows["p1_study1_view1_frontal"][2] == "0.0"  # empty prediction, lesion present
  with pytest.warns(UserWarning, match="1 predicted image"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "strict"),
                segmentations=str(tmp_path / "with_extra.json"), pathologies=list(NAMES),
                allow_missing=True)
  # An annotation file naming only benchmark pathologies is scored on all ten by default.
  default = cx.evaluate(str(root / "gt.json"), str(tmp_path / "all"),
                        segmentations=first["iou"]["segmentations"], allow_missing=True)
  assert read_rows(default["iou"]["per_image"])[0] == [*sorted(cx.PATHOLOGIES), "img_id"]


def test_errors_name_the_file_image_and_pathology(benchmark_files, tmp_path):
  root, annotations, _, _ = benchmark_files
  only_one = tmp_path / "only_one"
  only_one.mkdir()
  np.save(only_one / "p1_study1_view1_frontal_Edema_map.npy", np.ones((4, 4)))
  with pytest.raises(ValueError, match=r"only_one: no saliency maps for 2 ground-truth "
                     r"image\(s\): 'p2_study1_view1_frontal', 'p3_study1_view1_frontal'"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "o1"), saliency_dir=str(only_one),
                pathologies=list(NAMES))
  edema_only = tmp_path / "edema_only"
  edema_only.mkdir()
  for image_id in SIZES:
    np.save(edema_only / f"{image_id}_Edema_map.npy", np.eye(8))
  with pytest.raises(ValueError, match=r"edema_only: image 'p1_study1_view1_frontal' has no map "
                     r"for pathologies \['Cardiomegaly', 'Lung Lesion'\]"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "o1"), saliency_dir=str(edema_only),
                pathologies=list(NAMES))
  # allow_missing: a missing map is an empty segmentation and a miss where the pathology shows;
  # a map of an image the ground truth lacks is named, not silently dropped.
  np.save(edema_only / "p9_study1_view1_frontal_Edema_map.npy", np.eye(8))
  with pytest.warns(UserWarning, match=r"1 image\(s\) without ground truth not scored: "
                    r"'p9_study1_view1_frontal'"):
    out = cx.evaluate(str(root / "gt.json"), str(tmp_path / "o1"), saliency_dir=str(edema_only),
                      pathologies=list(NAMES), allow_missing=True)
  hits = read_rows(out["hitmiss"]["per_image"])
  assert hits[1] == ["0.0", "", "0.0", "p1_study1_view1_frontal"]
  assert hits[3] == ["", "", "", "p3_study1_view1_frontal"]
  wrong = {i: {n: cx.encode_rle(np.zeros((5, 5), bool)) for n in NAMES} for i in SIZES}
  (tmp_path / "pred.json").write_text(json.dumps(wrong))
  with pytest.raises(ValueError, match=r"pred.json: image 'p1_study1_view1_frontal', pathology "
                     r"'Cardiomegaly': the predicted segmentation is 5x5 but the ground truth is "
                     r"24x32"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "o2"),
                segmentations=str(tmp_path / "pred.json"), pathologies=list(NAMES))
  bad = {i: {n: {"size": list(SIZES[i]), "counts": "!!"} for n in NAMES} for i in SIZES}
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"bad.json: image 'p1_study1_view1_frontal', pathology "
                     r"'Cardiomegaly': character '!'"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "o3"),
                segmentations=str(tmp_path / "bad.json"), pathologies=list(NAMES))
  (tmp_path / "t.csv").write_text("threshold,task\n0.4,Edema\n")
  with pytest.raises(ValueError, match=r"t.csv: no threshold for pathologies "
                     r"\['Cardiomegaly', 'Lung Lesion'\]"):
    cx.evaluate(str(root / "gt.json"), str(tmp_path / "o4"), saliency_dir=str(root / "maps"),
                thresholds=str(tmp_path / "t.csv"), pathologies=list(NAMES))
  result = run_binary(annotations=root / "gt.json", saliency_dir=root / "maps",
                      segmentations=tmp_path / "pred.json", workdir=tmp_path)
  assert result.returncode != 0
  assert "exactly one of --saliency_dir and --segmentations" in result.stderr, result.stderr
