"""Tests of the real-collection TFDS builders on tiny fake folders in each collection's layout."""

from __future__ import annotations

import zipfile

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import io as scipy_io

import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from medxai_jax.data import pipeline, preprocess
from medxai_jax.data.builders import brain_tumor_mri, covid_radiography, modality_folders, mura
from medxai_jax.data.builders import tb_cxr


def _write_png(path, array: np.ndarray) -> None:
  """Writes an image with Pillow (uint8 gray/RGB or uint16 gray)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def _prepare(builder_cls, config, tmp_path, manual):
  """Prepares `config` of a builder from `manual` into a fresh data_dir and returns the builder."""
  builder = builder_cls(config=config, data_dir=str(tmp_path / "data"),
                        file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _records(builder, split: str) -> list[dict]:
  """Every decoded example of a split, text features as str."""
  source = builder.as_data_source(split=split)
  records = [source[i] for i in range(len(source))]
  return [{key: value.decode() if isinstance(value, bytes) else value
           for key, value in record.items()} for record in records]


# MURA ----------------------------------------------------------------------------------------

# (official split, part, patient, study, positive, number of images)
MURA_STUDIES = [
  ("train", "WRIST", 1, 1, True, 2), ("train", "WRIST", 1, 2, False, 1),
  ("train", "FINGER", 1, 1, False, 1), ("train", "WRIST", 2, 1, False, 2),
  ("train", "FINGER", 3, 1, True, 1), ("train", "WRIST", 4, 1, True, 1),
  ("train", "ELBOW", 5, 1, False, 2), ("train", "WRIST", 6, 1, False, 1),
  ("train", "WRIST", 7, 1, True, 1), ("train", "HAND", 8, 1, False, 1),
  ("valid", "WRIST", 11, 1, True, 2), ("valid", "FINGER", 12, 1, False, 1),
]  # fmt: skip


def _make_mura(root, framed_image: np.ndarray | None = None):
  """MURA-v1.1/ with CSVs and images; returns {relative path: (label, part, patient, study)}."""
  rng = np.random.default_rng(0)
  folder = root / "MURA-v1.1"
  expected, listing, studies = {}, {"train": [], "valid": []}, {"train": [], "valid": []}
  for split, part, patient, study, positive, count in MURA_STUDIES:
    outcome = "positive" if positive else "negative"
    study_dir = f"MURA-v1.1/{split}/XR_{part}/patient{patient:05d}/study{study}_{outcome}/"
    studies[split].append(f"{study_dir},{int(positive)}")
    for view in range(1, count + 1):
      relative = f"{study_dir}image{view}.png"
      shape = (24 + 4 * view, 30) if view % 2 else (30, 20, 3)  # gray and RGB, varied sizes
      pixels = framed_image if framed_image is not None and patient == 2 and view == 1 else (
        rng.integers(0, 256, shape, dtype=np.uint8))
      _write_png(root / relative, pixels)
      listing[split].append(relative)
      expected[relative] = (int(positive), part.lower(), f"patient{patient:05d}",
                            study_dir[len("MURA-v1.1/"):-1])
  for split in ("train", "valid"):
    order = rng.permutation(len(listing[split]))  # the listing need not group studies
    (folder / f"{split}_image_paths.csv").write_text(
      "\n".join(listing[split][i] for i in order) + "\n")
    (folder / f"{split}_labeled_studies.csv").write_text("\n".join(studies[split]) + "\n")
  return expected


def test_mura_labels_metadata_and_patient_wise_validation(tmp_path):
  expected = _make_mura(tmp_path / "manual")
  config = mura.make_mura_config("all", image_size=32, validation_fraction=0.3)
  builder = _prepare(mura.Mura, config, tmp_path, tmp_path / "manual")
  splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert sum(len(records) for records in splits.values()) == len(expected)
  parts = builder.info.features["body_part"].names
  for records in splits.values():
    for record in records:
      label, part, patient, study = expected[record["path"]]
      assert record["image"].shape == (32, 32, 1) and record["image"].dtype == np.uint8
      assert (record["label"], parts[record["body_part"]]) == (label, part)
      assert (record["patient_id"], record["study_id"]) == (patient, study)
      assert record["view"] == int(record["path"][-5])
  patients = {split: {record["patient_id"] for record in records}
              for split, records in splits.items()}
  assert patients["train"].isdisjoint(patients["validation"])
  assert patients["validation"]  # 30% of 8 training patients
  assert patients["train"] | patients["validation"] == {f"patient{p:05d}" for p in range(1, 9)}
  assert patients["test"] == {"patient00011", "patient00012"}
  # Studies are consecutive records, so the study-level view is a grouping of indices.
  for records in splits.values():
    study_ids = [record["study_id"] for record in records]
    for study, indices in mura.study_groups(study_ids).items():
      np.testing.assert_array_equal(indices, np.arange(indices[0], indices[-1] + 1))
  meta = mura.read_metadata(builder, "test", keys=("study_id", "label"))
  ids, means, labels = mura.study_scores(np.asarray([0.2, 0.6, 0.9]), meta["study_id"],
                                         meta["label"])
  assert ids == ["valid/XR_FINGER/patient00012/study1_negative",
                 "valid/XR_WRIST/patient00011/study1_positive"]
  np.testing.assert_allclose(means, [0.2, 0.75])
  np.testing.assert_array_equal(labels, [0, 1])
  assert builder.info.metadata["skipped_files"] == {"train": [], "validation": [], "test": []}


def _assert_patient_disjoint(splits: dict[str, list[dict]]) -> None:
  """No patient id of the prepared records in two splits; every split non-empty."""
  patients = {split: {r["patient_id"] for r in records} for split, records in splits.items()}
  assert all(patients.values()), {split: len(ids) for split, ids in patients.items()}
  for first in patients:
    for second in patients:
      if first < second:
        assert patients[first].isdisjoint(patients[second]), (first, second)


def test_mura_no_patient_in_two_splits(tmp_path):
  rng = np.random.default_rng(7)
  folder = tmp_path / "manual" / "MURA-v1.1"
  listing, studies = {"train": [], "valid": []}, {"train": [], "valid": []}
  for patient in range(1, 15):  # 3 parts x 2 studies x 2 images of every patient
    split = "valid" if patient > 11 else "train"
    for part in ("WRIST", "HAND", "ELBOW"):
      for study in (1, 2):
        outcome = "positive" if (patient + study) % 2 else "negative"
        study_dir = f"MURA-v1.1/{split}/XR_{part}/patient{patient:05d}/study{study}_{outcome}/"
        studies[split].append(f"{study_dir},{int(outcome == 'positive')}")
        for view in (1, 2):
          _write_png(tmp_path / "manual" / f"{study_dir}image{view}.png",
                     rng.integers(0, 256, (12, 10), dtype=np.uint8))
          listing[split].append(f"{study_dir}image{view}.png")
  for split in listing:
    (folder / f"{split}_image_paths.csv").write_text("\n".join(listing[split]) + "\n")
    (folder / f"{split}_labeled_studies.csv").write_text("\n".join(studies[split]) + "\n")
  (folder / "train" / "XR_WRIST" / "notes.docx").write_bytes(b"x")
  config = mura.make_mura_config("all", image_size=8, validation_fraction=0.4)
  builder = _prepare(mura.Mura, config, tmp_path, tmp_path / "manual")
  splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert sum(len(records) for records in splits.values()) == 14 * 12
  _assert_patient_disjoint(splits)
  assert builder.info.metadata["unhandled_files"] == ["MURA-v1.1/train/XR_WRIST/notes.docx"]
  # A copy whose official listings share a patient is refused, naming the patient.
  with open(folder / "valid_image_paths.csv", "a") as handle:
    handle.write(listing["train"][0].replace("train/", "valid/", 1) + "\n")
  moved = listing["train"][0].replace("train/", "valid/", 1)
  _write_png(tmp_path / "manual" / moved, np.zeros((12, 10), np.uint8))
  with open(folder / "valid_labeled_studies.csv", "a") as handle:
    handle.write(moved.rsplit("/", 1)[0] + "/," + ("1" if "positive" in moved else "0") + "\n")
  with pytest.raises(ValueError, match=r"both the official train and valid.*patient00001"):
    _prepare(mura.Mura, config, tmp_path / "mixed", tmp_path / "manual")


def test_mura_body_part_config_and_frame_removal(tmp_path):
  inner = np.random.default_rng(1).integers(40, 200, (20, 26), dtype=np.uint8)
  framed = np.zeros((30, 34), np.uint8)
  framed[4:24, 3:29] = inner
  expected = _make_mura(tmp_path / "manual", framed_image=framed)
  # Too few patients for a validation carve (refused at preparation): leave validation out.
  config = mura.make_mura_config("wrist_noborder", image_size=0, validation_fraction=0.0)
  builder = _prepare(mura.Mura, config, tmp_path, tmp_path / "manual")
  records = [r for split in builder.info.splits for r in _records(builder, split)]
  assert sorted(r["path"] for r in records) == sorted(
    path for path, (_, part, _, _) in expected.items() if part == "wrist")
  framed_record = next(r for r in records if r["path"].endswith("patient00002/study1_negative/"
                                                                "image1.png"))
  np.testing.assert_array_equal(framed_record["image"][..., 0], inner)


def test_mura_named_config_loads_through_the_pipeline(tmp_path):
  _make_mura(tmp_path / "manual")
  sources = pipeline.load_sources(
    {"name": "mura", "data_dir": str(tmp_path / "data"), "manual_dir": str(tmp_path / "manual"),
     "builder_config": "finger", "builder": {"validation_fraction": 0.0}}, ["train", "test"])
  assert len(sources["test"]) == 1
  record = sources["test"][0]
  assert record["image"].shape == (320, 320, 1) and record["body_part"] == mura.BODY_PARTS.index(
    "finger")


def test_mura_errors_name_what_is_missing(tmp_path):
  config = mura.make_mura_config("all", image_size=16)
  with pytest.raises(FileNotFoundError, match="Register and download MURA") as error:
    _prepare(mura.Mura, config, tmp_path, tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(error.value)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "README").write_text("x")
  with pytest.raises(FileNotFoundError, match="MURA-v1.1") as error:
    _prepare(mura.Mura, config, tmp_path, tmp_path / "other")
  assert "Register and download" in str(error.value)
  _make_mura(tmp_path / "manual")
  (tmp_path / "manual" / "MURA-v1.1" / "valid/XR_FINGER/patient00012/study1_negative/"
   "image1.png").unlink()
  with pytest.raises(FileNotFoundError, match="patient00012/study1_negative/image1.png"):
    _prepare(mura.Mura, config, tmp_path, tmp_path / "manual")


def test_mura_label_disagreeing_with_folder_is_an_error(tmp_path):
  _make_mura(tmp_path / "manual")
  labels = tmp_path / "manual" / "MURA-v1.1" / "valid_labeled_studies.csv"
  labels.write_text(labels.read_text().replace("study1_positive/,1", "study1_positive/,0"))
  with pytest.raises(ValueError, match="folder says positive"):
    _prepare(mura.Mura, mura.make_mura_config("all", image_size=16), tmp_path,
             tmp_path / "manual")


# Montgomery + Shenzhen -----------------------------------------------------------------------


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


# Brain tumour MRI ----------------------------------------------------------------------------


def _matlab_v73(path, fields: dict[str, tuple[np.ndarray, str]]) -> None:
  """A MATLAB v7.3 file as MATLAB writes it: a 512-byte text header, then HDF5 with the struct
  `cjdata` as a group, every field stored column-major (axes reversed) with its MATLAB_class."""
  with h5py.File(path, "w", userblock_size=512) as mat:
    group = mat.create_group("cjdata")
    group.attrs["MATLAB_class"] = np.bytes_("struct")
    for name, (value, matlab_class) in fields.items():
      data = group.create_dataset(name, data=np.asarray(value).T)
      data.attrs["MATLAB_class"] = np.bytes_(matlab_class)
      if matlab_class in ("char", "logical"):
        data.attrs["MATLAB_int_decode"] = np.int32(2 if matlab_class == "char" else 1)
  header = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 "
            b"HDF5 schema 1.00 .")
  with open(path, "r+b") as handle:
    handle.write(header.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")


def _slice(index: int, pid: str, label: int, rng) -> tuple[dict[str, tuple[np.ndarray, str]],
                                                            np.ndarray, np.ndarray, np.ndarray]:
  """The cjdata fields of one non-square slice (so a missing transpose shows)."""
  image = rng.integers(-50, 3000, (24, 32)).astype(np.int16)
  mask = np.zeros((24, 32), np.uint8)
  mask[3 + index % 5:12, 4:20] = 1
  border = rng.uniform(1, 30, 8)
  fields = {
    "label": (np.asarray([[float(label)]]), "double"),
    "PID": (np.asarray([[ord(c) for c in pid]], np.uint16), "char"),
    "image": (image, "int16"),
    "tumorBorder": (border[None, :], "double"),
    "tumorMask": (mask, "logical"),
  }
  return fields, image, mask, border


def _make_brain(root, corrupt: int | None = None):
  """12 slices of 6 patients, some in a zip, cvind.mat (v5); returns the expected values."""
  rng = np.random.default_rng(3)
  root.mkdir(parents=True)
  pids = ["MR001", "100360", "MR003", "MR004", "MR005", "MR006"]
  expected, folds = {}, []
  archive = zipfile.ZipFile(root / "brainTumorDataPublic_1-6.zip", "w")
  for index in range(1, 13):
    patient = (index - 1) // 2
    label = patient % 3 + 1
    fields, image, mask, border = _slice(index, pids[patient], label, rng)
    path = root / "extracted" / f"{index}.mat"
    path.parent.mkdir(exist_ok=True)
    _matlab_v73(path, fields)
    if index == corrupt:
      path.write_bytes(b"MATLAB 7.3 MAT-file" + b"\0" * 600)
    if index <= 6:  # the first six only inside the archive
      archive.write(path, f"{index}.mat")
      path.unlink()
    folds.append(patient % 5 + 1)
    expected[index] = (label - 1, pids[patient], image, mask, border, patient % 5 + 1)
  archive.close()
  scipy_io.savemat(root / "cvind.mat", {"cvind": np.asarray(folds, np.float64)[:, None]})
  return expected


def test_brain_reads_matlab_v73_from_files_and_zips(tmp_path):
  expected = _make_brain(tmp_path / "manual")
  config = brain_tumor_mri.make_brain_config("fold1", image_size=0)
  builder = _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  splits = {split: _records(builder, split) for split in builder.info.splits}
  assert {split: sorted(r["fold"] for r in records) for split, records in splits.items()} == {
    "train": [3, 3, 4, 4, 5, 5], "validation": [2, 2], "test": [1, 1, 1, 1]}
  for record in (r for records in splits.values() for r in records):
    label, pid, image, mask, border, fold = expected[record["index"]]
    assert (record["label"], record["patient_id"], record["fold"]) == (label, pid, fold)
    assert record["image"].shape == (24, 32, 1)  # transposed back from column-major
    naive = np.rint((image - image.min()) / (image.max() - image.min()) * 255)
    np.testing.assert_array_equal(record["image"][..., 0], naive.astype(np.uint8))
    np.testing.assert_array_equal(record["tumor_mask"][..., 0], mask)
    np.testing.assert_allclose(record["tumor_border"], border.reshape(-1, 2).astype(np.float32))
    np.testing.assert_array_equal(record["original_size"], [24, 32])
    assert record["path"].endswith(f"{record['index']}.mat")
    assert ("brainTumorDataPublic_1-6.zip:" in record["path"]) == (record["index"] <= 6)


def test_brain_default_split_is_patient_wise(tmp_path):
  _make_brain(tmp_path / "manual")
  config = brain_tumor_mri.make_brain_config("default", image_size=16,
                                             split_fractions=(0.5, 0.0, 0.5))
  builder = _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  assert set(builder.info.splits) == {"train", "test"}  # the empty validation is not written
  patients = {split: {r["patient_id"] for r in _records(builder, split)}
              for split in ("train", "test")}
  assert patients["train"].isdisjoint(patients["test"])
  assert len(patients["train"]) == len(patients["test"]) == 3  # one patient per type each
  assert all(r["image"].shape == (16, 16, 1) for r in _records(builder, "test"))


def test_brain_default_split_too_small_is_refused_naming_the_counts(tmp_path):
  _make_brain(tmp_path / "manual")  # 6 patients, 2 per tumour type: 10% of 2 rounds to none
  config = brain_tumor_mri.make_brain_config("default", image_size=16)
  with pytest.raises(ValueError, match="split 'validation' came out empty") as error:
    _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  message = str(error.value)
  assert "12 images" in message and "'meningioma': 4" in message and "(0.6, 0.1, 0.3)" in message
  assert "--config.dataset.builder.split_fractions" in message


def test_brain_int16_slices_reduced_to_8_bits_only_when_allowed(tmp_path):
  _make_brain(tmp_path / "manual")
  config = brain_tumor_mri.make_brain_config("fold1", image_size=16,
                                             allow_bit_depth_reduction=False)
  with pytest.raises(ValueError, match=r"\.mat holds 16-bit pixels.*storage_bits=16"):
    _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  kept = brain_tumor_mri.make_brain_config("fold1", image_size=0, storage_bits=16,
                                           allow_bit_depth_reduction=False)
  builder = _prepare(brain_tumor_mri.BrainTumorMri, kept, tmp_path / "kept", tmp_path / "manual")
  assert all(r["image"].dtype == np.uint16 for r in _records(builder, "test"))


def test_brain_no_patient_in_two_splits(tmp_path):
  rng = np.random.default_rng(9)
  root = tmp_path / "manual"
  root.mkdir()
  folds = []
  for index in range(1, 37):  # 12 patients x 3 slices, 4 patients per tumour type
    patient = (index - 1) // 3
    fields, *_ = _slice(index, f"P{patient:03d}", patient % 3 + 1, rng)
    _matlab_v73(root / f"{index}.mat", fields)
    folds.append(patient % 5 + 1)
  scipy_io.savemat(root / "cvind.mat", {"cvind": np.asarray(folds, np.float64)[:, None]})
  (root / "README.txt").write_text("figshare item notes")
  _write_png(root / "slices.png", np.zeros((4, 4), np.uint8))
  for config in (brain_tumor_mri.make_brain_config("default", image_size=8,
                                                   split_fractions=(0.5, 0.25, 0.25)),
                 brain_tumor_mri.make_brain_config("fold2", image_size=8)):
    builder = _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path / config.name, root)
    splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
    assert sum(len(records) for records in splits.values()) == 36
    _assert_patient_disjoint(splits)
  assert builder.info.metadata["unhandled_files"] == ["slices.png"]  # not a .mat or .zip


def test_brain_corrupt_slice_fails_or_is_recorded(tmp_path):
  _make_brain(tmp_path / "manual", corrupt=9)
  with pytest.raises(preprocess.CorruptImageError, match=r"extracted/9\.mat"):
    _prepare(brain_tumor_mri.BrainTumorMri, brain_tumor_mri.make_brain_config(
      "fold1", image_size=16), tmp_path, tmp_path / "manual")
  config = brain_tumor_mri.make_brain_config("fold1", image_size=16, on_corrupt="skip")
  builder = _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path / "skip",
                     tmp_path / "manual")
  assert sum(split.num_examples for split in builder.info.splits.values()) == 11
  skipped = builder.info.metadata["skipped_files"]
  assert [path for paths in skipped.values() for path in paths] == [
    str(tmp_path / "manual" / "extracted" / "9.mat")]
  reloaded = brain_tumor_mri.BrainTumorMri(config=config, data_dir=str(tmp_path / "skip" / "data"))
  assert reloaded.info.metadata["skipped_files"] == skipped  # persisted with the dataset


def test_brain_missing_cvind_and_slices(tmp_path):
  _make_brain(tmp_path / "manual")
  (tmp_path / "manual" / "extracted" / "11.mat").unlink()
  config = brain_tumor_mri.make_brain_config("default", image_size=16)
  with pytest.raises(ValueError, match=r"slice files \[11\] are missing"):
    _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  (tmp_path / "manual" / "cvind.mat").unlink()
  with pytest.raises(FileNotFoundError, match="cvind.mat") as error:
    _prepare(brain_tumor_mri.BrainTumorMri, config, tmp_path, tmp_path / "manual")
  assert "figshare" in str(error.value)


# COVID-19 Radiography ------------------------------------------------------------------------


def _xlsx(path, rows: list[list[str]]) -> None:
  """A minimal .xlsx (shared strings + one sheet), as spreadsheet programs write them."""
  strings = sorted({cell for row in rows for cell in row})
  ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
  shared = "".join(f"<si><t>{text}</t></si>" for text in strings)
  sheet_rows = "".join(
    f'<row r="{r + 1}">' + "".join(
      f'<c r="{chr(65 + c)}{r + 1}" t="s"><v>{strings.index(cell)}</v></c>'
      for c, cell in enumerate(row)) + "</row>" for r, row in enumerate(rows))
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("xl/sharedStrings.xml", f"<sst {ns}>{shared}</sst>")
    archive.writestr("xl/worksheets/sheet1.xml",
                     f"<worksheet {ns}><sheetData>{sheet_rows}</sheetData></worksheet>")


def _make_covid(root, per_class: int = 4):
  """The four class folders with images, masks and metadata; returns {image name: class}."""
  rng = np.random.default_rng(4)
  folder = root / "COVID-19_Radiography_Dataset"
  expected = {}
  for name in covid_radiography.CLASS_FOLDERS:
    rows = [["FILE NAME", "FORMAT", "SIZE", "URL"]]
    for number in range(1, per_class + 1):
      shape = (30, 30, 3) if number == 1 else (30, 30)
      _write_png(folder / name / "images" / f"{name}-{number}.png",
                 rng.integers(0, 256, shape, dtype=np.uint8))
      mask = np.zeros((20, 20), np.uint8)
      mask[:, :10] = 255
      _write_png(folder / name / "masks" / f"{name}-{number}.png", mask)
      url = f"https://{name[:5]}.org/{number}"
      rows.append([f"{name.upper()}-{number}", "PNG", "256*256", url])
      expected[f"{name}-{number}.png"] = name
    _xlsx(folder / f"{name}.metadata.xlsx", rows)
  return expected


@pytest.mark.parametrize("base, classes", [
  ("three", ("covid", "lung_opacity", "normal")),
  ("four", ("covid", "lung_opacity", "normal", "viral_pneumonia")),
])
def test_covid_class_sets_masks_and_sources(tmp_path, base, classes):
  expected = _make_covid(tmp_path / "manual")
  config = covid_radiography.make_covid_config(base, image_size=0,
                                               split_fractions=(0.5, 0.25, 0.25))
  builder = _prepare(covid_radiography.CovidRadiography, config, tmp_path, tmp_path / "manual")
  assert tuple(builder.info.features["label"].names) == classes
  records = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert [len(records[s]) for s in ("train", "validation", "test")] == [
    2 * len(classes), len(classes), len(classes)]
  folder_of = {covid_radiography.canonical_name(name): name
               for name in covid_radiography.CLASS_FOLDERS}
  for record in (r for split_records in records.values() for r in split_records):
    file_name = record["path"].rsplit("/", 1)[1]
    folder = expected[file_name]
    assert folder_of[classes[record["label"]]] == folder
    assert record["path"] == f"COVID-19_Radiography_Dataset/{folder}/images/{file_name}"
    assert record["source_url"] == f"https://{folder[:5]}.org/{file_name.split('-')[-1][:-4]}"
    assert record["image"].shape == (30, 30, 1) and record["lung_mask"].shape == (30, 30, 1)
    np.testing.assert_array_equal(record["lung_mask"][..., 0, ], np.repeat(
      [[1] * 15 + [0] * 15], 30, axis=0))  # 20 -> 30 px, nearest neighbour


def test_covid_missing_class_folder_and_metadata(tmp_path):
  _make_covid(tmp_path / "manual")
  root = tmp_path / "manual" / "COVID-19_Radiography_Dataset"
  (root / "Normal.metadata.xlsx").unlink()
  with pytest.raises(FileNotFoundError, match="Normal.metadata.xlsx"):
    _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
      "three", image_size=16), tmp_path, tmp_path / "manual")
  builder = _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
    "three", image_size=16, read_metadata=False), tmp_path, tmp_path / "manual")
  assert sum(split.num_examples for split in builder.info.splits.values()) == 12
  for path in (root / "Viral Pneumonia").rglob("*.png"):
    path.unlink()
  for path in sorted((root / "Viral Pneumonia").rglob("*"), reverse=True):
    path.rmdir()
  (root / "Viral Pneumonia").rmdir()
  with pytest.raises(FileNotFoundError, match="Viral Pneumonia"):
    _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
      "four", image_size=16, read_metadata=False), tmp_path, tmp_path / "manual")


# Modality folders ----------------------------------------------------------------------------

MODALITY_FOLDERS = ("Abdomen CT", "brain_mri", "Cardiac-Abdomen Ultrasound", "Chest Xray",
                    "fluorescence microscopy", "RETINAL_FUNDUSCOPY", "Statistical Graph")


def _make_modalities(root, folders=MODALITY_FOLDERS, per_class: int = 3):
  """Class folders with PNG/JPEG, gray/colour images (one nested); returns {path: folder}."""
  rng = np.random.default_rng(5)
  expected = {}
  for folder in folders:
    for number in range(per_class):
      relative = f"{folder}/{'sub/' if number == 2 else ''}img{number}." + (
        "jpg" if number == 1 else "png")
      pixels = rng.integers(0, 256, (20, 26) if number == 0 else (26, 20, 3), dtype=np.uint8)
      (root / relative).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(pixels).save(root / relative)
      expected[relative] = folder
  (root / folders[0] / "notes.txt").write_text("not an image")
  return expected


def test_modalities_labels_from_folders(tmp_path):
  expected = _make_modalities(tmp_path / "manual")
  config = modality_folders.make_modality_config(image_size=16, split_fractions=(1 / 3,) * 3)
  builder = _prepare(modality_folders.MedicalModalities, config, tmp_path, tmp_path / "manual")
  names = builder.info.features["label"].names
  assert tuple(names) == modality_folders.MODALITIES
  records = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert all(len(split_records) == 7 for split_records in records.values())  # 1 per class each
  for record in (r for split_records in records.values() for r in split_records):
    assert names[record["label"]] == modality_folders.canonical_name(expected[record["path"]])
    assert record["image"].shape == (16, 16, 3)
  for split_records in records.values():
    assert sorted(r["label"] for r in split_records) == list(range(7))
  assert builder.info.metadata["unhandled_files"] == ["Abdomen CT/notes.txt"]  # not dropped


def test_modalities_any_class_set_and_split_layout(tmp_path):
  manual = tmp_path / "manual"
  _make_modalities(manual / "train", folders=("Cats", "Dogs"), per_class=3)
  _make_modalities(manual / "test", folders=("Cats", "Dogs"), per_class=1)
  with pytest.raises(ValueError, match=r"unexpected \['cats', 'dogs'\]"):
    _prepare(modality_folders.MedicalModalities, modality_folders.make_modality_config(
      image_size=8), tmp_path, manual)
  config = modality_folders.config_from_folder(manual, image_size=8, channels=1,
                                               split_fractions=(0.5, 0.5, 0.0))
  builder = _prepare(modality_folders.MedicalModalities, config, tmp_path, manual)
  assert builder.info.features["label"].names == ["cats", "dogs"]
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {"train": 4, "validation": 2, "test": 2}
  test_paths = sorted(r["path"] for r in _records(builder, "test"))
  assert test_paths == ["test/Cats/img0.png", "test/Dogs/img0.png"]
  assert _records(builder, "train")[0]["image"].shape == (8, 8, 1)


def test_modalities_corrupt_image_fails_or_is_skipped_and_recorded(tmp_path):
  _make_modalities(tmp_path / "manual")
  bad = tmp_path / "manual" / "Chest Xray" / "img0.png"
  bad.write_bytes(bad.read_bytes()[:40])
  config = modality_folders.make_modality_config(image_size=8, split_fractions=(1 / 3,) * 3)
  with pytest.raises(preprocess.CorruptImageError, match="Chest Xray/img0.png"):
    _prepare(modality_folders.MedicalModalities, config, tmp_path, tmp_path / "manual")
  skip = modality_folders.make_modality_config(image_size=8, split_fractions=(1 / 3,) * 3,
                                              on_corrupt="skip")
  builder = _prepare(modality_folders.MedicalModalities, skip, tmp_path / "skip",
                     tmp_path / "manual")
  assert sum(split.num_examples for split in builder.info.splits.values()) == 20
  assert [p for paths in builder.info.metadata["skipped_files"].values() for p in paths] == [
    str(bad)]


def test_modalities_missing_manual_dir_prints_instructions(tmp_path):
  with pytest.raises(FileNotFoundError, match="class-named subfolders") as error:
    _prepare(modality_folders.MedicalModalities, modality_folders.make_modality_config(
      image_size=8), tmp_path, tmp_path / "absent")
  assert str(tmp_path / "absent") in str(error.value)


def test_derived_configs_get_distinct_names():
  first = mura.make_mura_config("wrist", image_size=64)
  assert first.name.startswith("wrist-") and first.image_size == 64
  assert first.body_parts == ("wrist",)
  assert mura.make_mura_config("wrist", image_size=64).name == first.name
  assert mura.make_mura_config("wrist", image_size=128).name != first.name
  assert mura.make_mura_config("wrist", image_size=320).name == "wrist"
  with pytest.raises(TypeError, match="unknown MuraConfig fields"):
    mura.make_mura_config("wrist", size=3)
  with pytest.raises(ValueError, match="resize_mode"):
    mura.make_mura_config("wrist", resize_mode="crop")
