"""The brain tumour MRI TFDS builder (figshare .mat slices) on tiny fake folders in the
collection's layout."""

from __future__ import annotations

import zipfile

import h5py
import numpy as np
import pytest
from scipy import io as scipy_io

import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from fake_folders import assert_patient_disjoint as _assert_patient_disjoint
from fake_folders import prepare as _prepare
from fake_folders import records as _records
from fake_folders import write_png as _write_png
from medxai_jax.data import preprocess
from medxai_jax.data.builders import brain_tumor_mri


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
