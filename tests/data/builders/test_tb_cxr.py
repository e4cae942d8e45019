"""The Montgomery + Shenzhen TFDS builder (tb_cxr) on tiny fake folders in the collection's
layout, and on a copy of the real Shenzhen sample with its lung masks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import real_data
import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from fake_folders import assert_patient_disjoint as _assert_patient_disjoint
from fake_folders import prepare as _prepare
from fake_folders import records as _records
from fake_folders import write_png as _write_png
from medxai_jax.data import preprocess
from medxai_jax.data.builders import tb_cxr


def _make_tb(root):
  """Both sets, 8 images each (4 TB); returns {patient id: (label, 12-bit or 8-bit pixels)}."""
  rng = np.random.default_rng(2)
  expected = {}
  for number in range(1, 9):
    label = number % 2
    name = f"MCUCXR_{number:04d}_{label}"
    pixels = rng.integers(0, 4096, (36, 28), dtype=np.uint16)  # 12-bit values in 16-bit PNGs
    _write_png(root / "MontgomerySet" / "CXR_png" / f"{name}.png", pixels)
    left, right = np.zeros((36, 28), np.uint8), np.zeros((36, 28), np.uint8)
    left[5:30, 2:12] = 255
    right[6:31, 15:26] = 255
    _write_png(root / "MontgomerySet" / "ManualMask" / "leftMask" / f"{name}.png", left)
    _write_png(root / "MontgomerySet" / "ManualMask" / "rightMask" / f"{name}.png", right)
    (root / "MontgomerySet" / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
    (root / "MontgomerySet" / "ClinicalReadings" / f"{name}.txt").write_text(
      f"Patient's Sex: {'F' if number < 5 else 'M'}\nPatient's Age: 0{30 + number}Y\n"
      f"{'right upper lobe infiltrate' if label else 'normal'}\n")
    expected[f"MCUCXR_{number:04d}"] = (label, pixels, (left > 0) | (right > 0))
  for number in range(1, 9):
    label = number % 2
    name = f"CHNCXR_{number:04d}_{label}"
    shape = (30, 30, 3) if number == 3 else (30, 30)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    _write_png(root / "ChinaSet_AllFiles" / "CXR_png" / f"{name}.png", pixels)
    (root / "ChinaSet_AllFiles" / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
    (root / "ChinaSet_AllFiles" / "ClinicalReadings" / f"{name}.txt").write_text(
      f"{'female' if number == 2 else 'male'} {20 + number}yrs\n"
      f"{'PTB in the left' if label else 'normal'}")
    expected[f"CHNCXR_{number:04d}"] = (label, pixels, None)
  (root / "ChinaSet_AllFiles" / "CXR_png" / "Thumbs.db").write_bytes(b"\0")
  return expected


def test_tb_labels_masks_readings_and_splits(tmp_path):
  expected = _make_tb(tmp_path / "manual")
  config = tb_cxr.make_tb_config("combined_noclahe", image_size=0,
                                 split_fractions=(0.5, 0.25, 0.25))
  builder = _prepare(tb_cxr.TbCxr, config, tmp_path, tmp_path / "manual")
  splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [8, 4, 4]
  ids = [r["patient_id"] for records in splits.values() for r in records]
  assert sorted(ids) == sorted(expected) and len(set(ids)) == 16  # disjoint, complete
  for split, records in splits.items():  # stratified: every (source, label) in every split
    assert len({(r["source"], r["label"]) for r in records}) == 4, split
  for record in (r for records in splits.values() for r in records):
    label, pixels, mask = expected[record["patient_id"]]
    assert record["label"] == label
    if record["patient_id"].startswith("MCUCXR"):
      # 12-bit values scaled by 4095 (not 65535) into uint8.
      np.testing.assert_array_equal(record["image"][..., 0],
                                    np.rint(pixels / 4095 * 255).astype(np.uint8))
      np.testing.assert_array_equal(record["lung_mask"][..., 0], mask.astype(np.uint8))
      assert record["has_lung_mask"] and record["source"] == 0
      number = int(record["patient_id"][-4:])
      assert (record["sex"], record["age"]) == ((1 if number < 5 else 2), 30 + number)
    else:
      gray = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels).convert("L"))
      assert np.abs(record["image"][..., 0].astype(int) - gray).max() <= 1
      assert not record["has_lung_mask"] and record["lung_mask"].max() == 0
      number = int(record["patient_id"][-4:])
      assert (record["sex"], record["age"]) == ((1 if number == 2 else 2), 20 + number)
      assert record["clinical_reading"].endswith("PTB in the left" if label else "normal")


def test_tb_montgomery_16bit_keeps_12_bit_precision(tmp_path):
  expected = _make_tb(tmp_path / "manual")
  config = tb_cxr.make_tb_config("montgomery_16bit", image_size=0,
                                 split_fractions=(0.5, 0.25, 0.25))  # 8 images: no empty split
  builder = _prepare(tb_cxr.TbCxr, config, tmp_path, tmp_path / "manual")
  records = [r for split in builder.info.splits for r in _records(builder, split)]
  assert len(records) == 8
  for record in records:
    assert record["image"].dtype == np.uint16
    recovered = np.rint(record["image"][..., 0].astype(np.float64) * 4095 / 65535)
    np.testing.assert_array_equal(recovered, expected[record["patient_id"]][1])


def test_tb_clahe_and_resize(tmp_path):
  _make_tb(tmp_path / "manual")
  config = tb_cxr.make_tb_config("shenzhen", image_size=24, split_fractions=(0.5, 0.25, 0.25))
  builder = _prepare(tb_cxr.TbCxr, config, tmp_path, tmp_path / "manual")
  records = [r for split in builder.info.splits for r in _records(builder, split)]
  assert len(records) == 8 and all(r["source"] == 1 for r in records)
  for record in records:
    assert record["image"].shape == (24, 24, 1) and record["lung_mask"].shape == (24, 24, 1)
    # Resized to 1024 (here 24) first, then equalised, then quantised once (002's order).
    pixels = preprocess.to_gray(preprocess.to_unit_float(preprocess.read_image(
      tmp_path / "manual" / record["path"])))
    expected = preprocess.quantize(preprocess.clahe(preprocess.resize_np(pixels, 24, 24)))
    np.testing.assert_array_equal(record["image"], expected)


def test_tb_missing_mask_is_named(tmp_path):
  _make_tb(tmp_path / "manual")
  (tmp_path / "manual" / "MontgomerySet" / "ManualMask" / "rightMask" / "MCUCXR_0003_1.png"
   ).unlink()
  with pytest.raises(FileNotFoundError, match="rightMask/MCUCXR_0003_1.png"):
    _prepare(tb_cxr.TbCxr, tb_cxr.make_tb_config("montgomery", image_size=16), tmp_path,
             tmp_path / "manual")
  # Shenzhen alone does not need Montgomery's files.
  builder = _prepare(tb_cxr.TbCxr, tb_cxr.make_tb_config(
    "shenzhen", image_size=16, split_fractions=(0.5, 0.25, 0.25)), tmp_path, tmp_path / "manual")
  assert sum(split.num_examples for split in builder.info.splits.values()) == 8


def test_tb_masks_binarise_at_half_their_maximum(tmp_path):
  shape = np.zeros((6, 8), np.uint8)
  shape[1:5, 2:6] = 1
  soft = shape * 250
  soft[0, 2:6], soft[5, 2:6] = 3, 120  # antialiased fringe below half of 250
  for name, pixels in (("ones", shape), ("full", shape * 255), ("soft", soft)):
    _write_png(tmp_path / f"{name}.png", pixels)
    np.testing.assert_array_equal(tb_cxr.read_binary_mask(tmp_path / f"{name}.png"), shape > 0)
  _write_png(tmp_path / "empty.png", np.zeros((6, 8), np.uint8))
  assert not tb_cxr.read_binary_mask(tmp_path / "empty.png").any()


def test_tb_no_patient_in_two_splits(tmp_path):
  rng = np.random.default_rng(8)
  folder = tmp_path / "manual" / "ChinaSet_AllFiles"
  for number in range(1, 13):  # two images (labels 0 and 1) for each of 12 patient numbers
    for label in (0, 1):
      name = f"CHNCXR_{number:04d}_{label}"
      _write_png(folder / "CXR_png" / f"{name}.png", rng.integers(0, 256, (10, 10), np.uint8))
      (folder / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
      (folder / "ClinicalReadings" / f"{name}.txt").write_text("male 30yrs\nnormal")
  builder = _prepare(tb_cxr.TbCxr, tb_cxr.make_tb_config("shenzhen", image_size=8, clahe=False),
                     tmp_path, tmp_path / "manual")
  splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert sum(len(records) for records in splits.values()) == 24
  _assert_patient_disjoint(splits)
  for records in splits.values():  # both images of a patient stay together
    ids = [r["patient_id"] for r in records]
    assert all(ids.count(patient) == 2 for patient in ids)


def test_parse_reading():
  assert tb_cxr.parse_reading("Patient's Sex: F\nPatient's Age: 044Y\nnormal") == (1, 44)
  assert tb_cxr.parse_reading("male 35yrs\nnormal") == (2, 35)
  assert tb_cxr.parse_reading("female  8 months\nbilateral PTB") == (1, 0)
  assert tb_cxr.parse_reading("no demographics") == (0, -1)


def _shenzhen_copy(tmp_path):
  """The real Shenzhen sample (11 normal images, 11 masks in extra_lung_masks/)."""
  return real_data.copy_real("tb", tmp_path / "manual")


def test_real_shenzhen_masks_are_read(tmp_path):
  manual = _shenzhen_copy(tmp_path)
  config = tb_cxr.make_tb_config("shenzhen", image_size=32, clahe=False,
                                 split_fractions=(0.6, 0.2, 0.2))
  builder = _prepare(tb_cxr.TbCxr, config, tmp_path / "data", manual)
  records = [r for split in ("train", "validation", "test") for r in _records(builder, split)]
  assert len(records) == 11 and all(r["label"] == 0 for r in records)
  for record in records:
    assert record["has_lung_mask"]
    mask = record["lung_mask"][..., 0].astype(bool)
    name = record["path"].rsplit("/", 1)[-1].replace(".png", "_mask.png")
    with Image.open(manual / "ChinaSet_AllFiles" / "extra_lung_masks" / name) as source:
      source_fraction = float((np.asarray(source) > 127).mean())
    assert 0.1 < mask.mean() < 0.45  # the two lungs cover a tenth to under half of a PA film
    assert abs(mask.mean() - source_fraction) < 0.03  # resized, not shifted or cropped
    assert not mask[:, :2].any() and not mask[:, -2:].any()  # inside the film, off its edges
    image = record["image"][..., 0].astype(np.float64)
    rows = mask.any(axis=1)
    between = np.zeros_like(mask)
    between[rows, 14:18] = True  # the mediastinum and spine between the lungs
    between &= ~mask
    assert image[mask].mean() < image[between].mean() - 20  # aerated lungs are dark on the film
    left, right = mask[:, :16].sum(), mask[:, 16:].sum()
    assert min(left, right) > 0.5 * max(left, right)  # a lung on each side
  assert builder.info.metadata["unhandled_files"] == []


def test_shenzhen_images_without_masks_are_kept_and_mask_names_vary(tmp_path):
  manual = _shenzhen_copy(tmp_path)
  china = manual / "ChinaSet_AllFiles"
  shutil.move(china / "extra_lung_masks", china / "mask")
  (china / "mask" / "CHNCXR_0002_0_mask.png").unlink()
  (china / "mask" / "CHNCXR_0003_0_mask.png").rename(china / "mask" / "CHNCXR_0003_0.png")
  (china / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"PK")  # a companion: expected
  (china / "CXR_png" / "scan.xml").write_text("<x/>")  # not: listed
  config = tb_cxr.make_tb_config("shenzhen", image_size=16, clahe=False,
                                 split_fractions=(0.6, 0.2, 0.2))
  builder = _prepare(tb_cxr.TbCxr, config, tmp_path / "data", manual)
  records = {r["patient_id"]: r for split in ("train", "validation", "test")
             for r in _records(builder, split)}
  assert len(records) == 11
  assert not records["CHNCXR_0002"]["has_lung_mask"]
  assert records["CHNCXR_0002"]["lung_mask"].max() == 0
  assert records["CHNCXR_0003"]["has_lung_mask"] and records["CHNCXR_0003"]["lung_mask"].any()
  assert sum(r["has_lung_mask"] for r in records.values()) == 10
  assert builder.info.metadata["unhandled_files"] == ["ChinaSet_AllFiles/CXR_png/scan.xml"]
  shutil.copy(china / "mask" / "CHNCXR_0003_0.png", manual / "CHNCXR_0003_0_mask.png")
  (manual / "masks").mkdir()
  shutil.move(manual / "CHNCXR_0003_0_mask.png", manual / "masks" / "CHNCXR_0003_0_mask.png")
  with pytest.raises(ValueError, match=r"two lung masks for CHNCXR_0003_0\.png"):
    _prepare(tb_cxr.TbCxr, config, tmp_path / "data2", manual)
