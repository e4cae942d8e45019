"""Tests of the DICOM reader (preprocess.read_dicom_unit) on synthetic files and on the two real
DICOMs of torchxrayvision's tests, and of DICOM class folders through medical_modalities."""

from __future__ import annotations

import importlib.util

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage

import real_data
from medxai_jax.data import preprocess
from medxai_jax.data.builders import common, modality_folders

MONOCHROME2_FILE = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONOCHROME1_FILE = "Fake_MONOHR1.dcm"


def _write_dicom(path, pixels: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
                 **elements) -> None:
  """An uncompressed single-frame DICOM written by pydicom (16 bits allocated unless uint8)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  dataset = Dataset()
  dataset.file_meta = meta
  dataset.SOPClassUID = meta.MediaStorageSOPClassUID
  dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  dataset.Modality = "CR"
  dataset.Rows, dataset.Columns = pixels.shape[:2]
  dataset.SamplesPerPixel = 1
  dataset.PhotometricInterpretation = photometric
  dataset.BitsAllocated = pixels.dtype.itemsize * 8
  dataset.BitsStored = bits_stored
  dataset.HighBit = bits_stored - 1
  dataset.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
  for keyword, value in elements.items():
    setattr(dataset, keyword, value)
  dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
  dataset.save_as(path, enforce_file_format=True)


def _naive_linear_window(x: float, center: float, width: float) -> float:
  """PS3.3 C.11.2.1.2.1's LINEAR window for one value, written out as the standard states it."""
  if x <= center - 0.5 - (width - 1) / 2:
    return 0.0
  if x > center - 0.5 + (width - 1) / 2:
    return 1.0
  return (x - (center - 0.5)) / (width - 1) + 0.5


def test_window_to_unit_is_the_standards_formula():
  values = np.linspace(-300, 400, 141)
  for center, width in ((40.0, 400.0), (0.0, 2.0), (100.5, 57.0)):
    expected = [_naive_linear_window(x, center, width) for x in values]
    np.testing.assert_allclose(preprocess.window_to_unit(values, center, width), expected,
                               atol=1e-6)
  exact = preprocess.window_to_unit(values, 50.0, 200.0, "LINEAR_EXACT")
  np.testing.assert_allclose(exact, np.clip((values - 50) / 200 + 0.5, 0, 1), atol=1e-6)
  sigmoid = preprocess.window_to_unit(values, 50.0, 200.0, "SIGMOID")
  assert sigmoid[np.argmin(np.abs(values - 50))] == pytest.approx(0.5, abs=1e-6)
  assert np.all(np.diff(sigmoid) > 0) and 0 < sigmoid.min() and sigmoid.max() < 1
  with pytest.raises(ValueError, match="WindowWidth must be >= 1"):
    preprocess.window_to_unit(values, 0.0, 0.5)
  with pytest.raises(ValueError, match="VOILUTFunction"):
    preprocess.window_to_unit(values, 0.0, 5.0, "CUBIC")


def test_12_bit_dicom_keeps_its_depth_and_monochrome1_is_inverted(tmp_path):
  stored = np.random.default_rng(0).integers(0, 4096, (9, 7)).astype(np.uint16)
  stored[0, 0], stored[0, 1] = 0, 4095
  _write_dicom(tmp_path / "m2.dcm", stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=0)
  _write_dicom(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1")
  mono2 = preprocess.read_dicom_unit(tmp_path / "m2.dcm")
  mono1 = preprocess.read_dicom_unit(tmp_path / "m1.dcm")
  assert mono2.shape == (9, 7, 1) and mono2.dtype == np.float32
  np.testing.assert_allclose(mono2[..., 0], stored / 4095, atol=1e-7)
  np.testing.assert_allclose(mono1[..., 0], 1 - stored / 4095, atol=1e-7)
  # storage_bits=16 keeps all 4096 levels: the stored uint16 maps back to the DICOM values.
  as_uint16 = preprocess.quantize(mono2, 16)[..., 0]
  np.testing.assert_array_equal(np.rint(as_uint16.astype(np.float64) * 4095 / 65535), stored)
  assert len(np.unique(as_uint16)) == len(np.unique(stored))


def test_rescale_window_and_negative_slope(tmp_path):
  stored = np.random.default_rng(1).integers(-2000, 2000, (6, 8)).astype(np.int16)
  _write_dicom(tmp_path / "ct.dcm", stored, bits_stored=16, RescaleSlope=2,
               RescaleIntercept=-1024, WindowCenter=[40, 300], WindowWidth=[400, 1500])
  hounsfield = stored.astype(np.float64) * 2 - 1024
  expected = [[_naive_linear_window(x, 40, 400) for x in row] for row in hounsfield]
  np.testing.assert_allclose(preprocess.read_dicom_unit(tmp_path / "ct.dcm")[..., 0], expected,
                             atol=1e-6)  # the first window of several
  unsigned = np.random.default_rng(2).integers(0, 1024, (5, 5)).astype(np.uint16)
  _write_dicom(tmp_path / "flip.dcm", unsigned, bits_stored=10, RescaleSlope=-1,
               RescaleIntercept=0)
  np.testing.assert_allclose(preprocess.read_dicom_unit(tmp_path / "flip.dcm")[..., 0],
                             1 - unsigned / 1023, atol=1e-7)


def test_voi_lut_sequence_is_looked_up(tmp_path):
  stored = np.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint16)
  lut = Dataset()
  lut.add_new("LUTDescriptor", "US", [8, 0, 12])  # 8 entries from stored value 0, 12 bits out
  table = np.asarray([4095, 3000, 2000, 1000, 500, 100, 10, 0], np.uint16)  # decreasing
  lut.add_new("LUTData", "US", table.tolist())
  _write_dicom(tmp_path / "lut.dcm", stored, bits_stored=3, VOILUTSequence=[lut])
  np.testing.assert_allclose(preprocess.read_dicom_unit(tmp_path / "lut.dcm")[..., 0],
                             table[stored] / 4095, atol=1e-7)


def test_corrupt_dicom_is_named(tmp_path):
  (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all " * 10)
  with pytest.raises(preprocess.CorruptImageError, match="junk.dcm"):
    preprocess.read_dicom_unit(tmp_path / "junk.dcm")
  stored = np.zeros((16, 16), np.uint16)
  _write_dicom(tmp_path / "whole.dcm", stored, bits_stored=12)
  data = (tmp_path / "whole.dcm").read_bytes()
  (tmp_path / "cut.dcm").write_bytes(data[:-200])  # pixel data shorter than Rows x Columns
  with pytest.raises(preprocess.CorruptImageError, match="cut.dcm"):
    preprocess.read_dicom_unit(tmp_path / "cut.dcm")
  _write_dicom(tmp_path / "frames.dcm", np.zeros((8, 4), np.uint16), bits_stored=12, Rows=4,
               NumberOfFrames=2)  # two 4 x 4 frames
  with pytest.raises(preprocess.CorruptImageError, match=r"frames.dcm.*2 frames"):
    preprocess.read_dicom_unit(tmp_path / "frames.dcm")
  _write_dicom(tmp_path / "palette.dcm", np.zeros((4, 4), np.uint16), bits_stored=12,
               photometric="PALETTE COLOR")
  with pytest.raises(preprocess.CorruptImageError, match=r"palette.dcm.*'PALETTE COLOR'"):
    preprocess.read_dicom_unit(tmp_path / "palette.dcm")
  with pytest.raises(FileNotFoundError):
    preprocess.read_dicom_unit(tmp_path / "absent.dcm")


@pytest.mark.skipif(any(importlib.util.find_spec(name) for name in ("pylibjpeg", "jpeg_ls",
                                                                     "gdcm")),
                    reason="a JPEG-LS decoder is installed here")
def test_compressed_dicom_without_its_decoder_names_the_package(tmp_path):
  path = real_data.copy_real(f"torchxrayvision_tests/{MONOCHROME2_FILE}", tmp_path / "x.dcm")
  dataset = pydicom.dcmread(path)
  dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
  dataset.save_as(tmp_path / "jpegls.dcm")
  with pytest.raises(preprocess.MissingDicomDecoderError, match=r"jpegls\.dcm.*JPEG-LS") as error:
    preprocess.read_dicom_unit(tmp_path / "jpegls.dcm")
  assert "pip install pylibjpeg pylibjpeg-libjpeg" in str(error.value)
  assert not isinstance(error.value, preprocess.CorruptImageError)  # never skipped as corrupt


def _lung_and_spine_means(image: np.ndarray) -> tuple[float, float]:
  """Mean of the two lung fields and of the mediastinum/spine column of a PA chest image."""
  height, width = image.shape[:2]
  rows = slice(height // 4, 3 * height // 4)
  lungs = np.concatenate([image[rows, width // 8:width // 3].ravel(),
                          image[rows, 2 * width // 3:7 * width // 8].ravel()])
  spine = image[rows, 2 * width // 5:3 * width // 5]
  return float(lungs.mean()), float(spine.mean())


def test_real_torchxrayvision_dicoms(tmp_path):
  folder = real_data.copy_real("torchxrayvision_tests", tmp_path / "tx", keep=["*.dcm"])
  mono2_path, mono1_path = folder / MONOCHROME2_FILE, folder / MONOCHROME1_FILE
  raw2, raw1 = pydicom.dcmread(mono2_path), pydicom.dcmread(mono1_path)
  assert (raw2.PhotometricInterpretation, raw1.PhotometricInterpretation) == (
    "MONOCHROME2", "MONOCHROME1")
  # Fake_MONOHR1 is the other file with only the tag changed: identical stored pixels.
  np.testing.assert_array_equal(raw1.pixel_array, raw2.pixel_array)
  mono2 = common.read_unit_image(mono2_path)
  mono1 = common.read_unit_image(mono1_path)
  # 8 bits stored, no rescale or window: the 8-bit values / 255, unchanged.
  np.testing.assert_array_equal(np.rint(mono2[..., 0] * 255).astype(np.uint8), raw2.pixel_array)
  lungs, spine = _lung_and_spine_means(mono2[..., 0])
  assert lungs < spine - 0.1  # as displayed (MONOCHROME2): lungs dark, spine bright
  # MONOCHROME1 is inverted, so the relabelled copy shows exactly the inverse picture.
  np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-7)
  lungs1, spine1 = _lung_and_spine_means(mono1[..., 0])
  assert lungs1 > spine1 + 0.1


def test_real_png_and_jpeg_reading_is_unchanged(tmp_path):
  folder = real_data.copy_real("torchxrayvision_tests", tmp_path / "tx",
                               keep=["00000001_000.png", "16747_3_1.jpg"])
  for path in sorted(folder.iterdir()):
    with Image.open(path) as image:
      pillow = np.asarray(image.convert("L") if image.mode == "L" else image)
    ours = common.read_unit_image(path, channels=1 if pillow.ndim == 2 else 3)
    np.testing.assert_allclose(ours.squeeze(-1) if pillow.ndim == 2 else ours, pillow / 255,
                               atol=1e-7)


def test_dicom_class_folder_prepares_with_unhandled_files_listed(tmp_path):
  manual = tmp_path / "manual"
  real_data.copy_real("torchxrayvision_tests", manual / "dicom", keep=["*.dcm"])
  # A PACS export names its files by UID or 'IM0001', without .dcm: found by the 'DICM' prefix.
  (manual / "dicom" / MONOCHROME2_FILE).rename(manual / "dicom" / MONOCHROME2_FILE[:-4])
  real_data.copy_real("torchxrayvision_tests", manual / "Plain Films",
                      keep=["00000001_000.png", "16747_3_1.jpg"])
  (manual / "dicom" / "report.docx").write_bytes(b"PK\x03\x04 not read")
  (manual / "Plain Films" / "Thumbs.db").write_bytes(b"\0")  # system clutter, not listed
  config = modality_folders.config_from_folder(manual, image_size=32, channels=1,
                                               split_fractions=(1.0, 0.0, 0.0))
  builder = modality_folders.MedicalModalities(config=config, data_dir=str(tmp_path / "data"),
                                               file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert builder.info.features["label"].names == ["dicom", "plain_films"]
  source = builder.as_data_source(split="train")
  records = {source[i]["path"].decode(): source[i] for i in range(len(source))}
  renamed = f"dicom/{MONOCHROME2_FILE[:-4]}"
  assert sorted(records) == sorted([f"dicom/{MONOCHROME1_FILE}", renamed,
                                    "Plain Films/00000001_000.png", "Plain Films/16747_3_1.jpg"])
  mono2 = records[renamed]["image"][..., 0].astype(np.float64)
  mono1 = records[f"dicom/{MONOCHROME1_FILE}"]["image"][..., 0].astype(np.float64)
  assert records[renamed]["image"].shape == (32, 32, 1)
  lungs, spine = _lung_and_spine_means(mono2)
  assert lungs < spine - 25  # on the 0..255 scale
  assert np.abs(mono1 + mono2 - 255).max() <= 1  # the inverse, up to rounding
  for path, record in records.items():
    expected = pydicom.dcmread(manual / path).PatientID if path.startswith("dicom/") else ""
    assert record["patient_id"].decode() == expected
  assert builder.info.metadata["unhandled_files"] == ["dicom/report.docx"]
  reloaded = modality_folders.MedicalModalities(config=config, data_dir=str(tmp_path / "data"))
  assert reloaded.info.metadata["unhandled_files"] == ["dicom/report.docx"]  # persisted


def test_12_bit_dicom_with_8_bit_storage_is_refused_unless_reduction_is_allowed(tmp_path):
  manual = tmp_path / "manual"
  stored = {}
  for folder in ("ct", "cr"):
    (manual / folder).mkdir(parents=True)
    stored[f"{folder}/a.dcm"] = np.random.default_rng(4).integers(0, 4096, (6, 5)).astype(
      np.uint16)
    _write_dicom(manual / folder / "a.dcm", stored[f"{folder}/a.dcm"], bits_stored=12)
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1,
                                               split_fractions=(1.0, 0.0, 0.0))
  with pytest.raises(ValueError, match="a.dcm holds 12-bit pixels") as error:
    modality_folders.MedicalModalities(
      config=config, data_dir=str(tmp_path / "data"), file_format="array_record"
    ).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert "--config.dataset.builder.storage_bits=16" in str(error.value)
  allowed = modality_folders.config_from_folder(manual, image_size=0, channels=1,
                                                allow_bit_depth_reduction=True,
                                                split_fractions=(1.0, 0.0, 0.0))
  builder = modality_folders.MedicalModalities(config=allowed, data_dir=str(tmp_path / "data"),
                                               file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  source = builder.as_data_source(split="train")
  for record in (source[i] for i in range(len(source))):
    assert record["image"].dtype == np.uint8  # the 4096 levels quantised to 256, as displayed
    naive = np.floor(stored[record["path"].decode()] / 4095 * 255 + 0.5)
    np.testing.assert_array_equal(record["image"][..., 0], naive)


def test_dicom_class_folders_split_by_patient_and_keep_12_bits(tmp_path):
  rng = np.random.default_rng(3)
  manual = tmp_path / "manual"
  expected = {}
  for label, folder in enumerate(("ct", "cr")):
    (manual / folder).mkdir(parents=True)
    for patient in range(8):
      for number in range(3):  # three images of every patient
        stored = rng.integers(0, 4096, (6, 5)).astype(np.uint16)
        name = f"{folder}/p{patient}_{number}.dcm"
        _write_dicom(manual / name, stored, bits_stored=12, PatientID=f"{folder.upper()}{patient}")
        expected[name] = stored
  (manual / "cr" / "broken.dcm").write_bytes(b"\0" * 300)
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1, storage_bits=16,
                                               split_fractions=(0.5, 0.25, 0.25),
                                               on_corrupt="skip")
  builder = modality_folders.MedicalModalities(config=config, data_dir=str(tmp_path / "data"),
                                               file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  patients = {}
  for split in ("train", "validation", "test"):
    source = builder.as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
    patients[split] = {record["patient_id"].decode() for record in records}
    for record in records:
      stored = expected[record["path"].decode()]
      assert record["image"].dtype == np.uint16  # 12 bits kept: x / 4095 * 65535, exactly back
      np.testing.assert_array_equal(
        np.rint(record["image"][..., 0].astype(np.float64) * 4095 / 65535), stored)
  assert sum(len(ids) for ids in patients.values()) == 16  # every patient in exactly one split
  assert set().union(*patients.values()) == {f"{c}{p}" for c in ("CT", "CR") for p in range(8)}
  assert all(patients.values())
  skipped = [path for paths in builder.info.metadata["skipped_files"].values() for path in paths]
  assert skipped == [str(manual / "cr" / "broken.dcm")]
