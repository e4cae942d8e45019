"""The MURA TFDS builder on tiny fake folders in the collection's layout."""

from __future__ import annotations

import numpy as np
import pytest

import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from fake_folders import assert_patient_disjoint as _assert_patient_disjoint
from fake_folders import prepare as _prepare
from fake_folders import records as _records
from fake_folders import write_png as _write_png
from medxai_jax.data import pipeline
from medxai_jax.data.builders import mura


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
