"""The medical modality folders TFDS builder on tiny fake folders in the collection's layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from fake_folders import prepare as _prepare
from fake_folders import records as _records
from medxai_jax.data import preprocess
from medxai_jax.data.builders import modality_folders


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
