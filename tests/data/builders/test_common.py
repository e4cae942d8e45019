"""Decoding without loss (EXIF orientation, transparency, 16-bit sources), empty splits refused at
preparation, and text companions that cannot be decoded, on tiny fabricated files."""

from __future__ import annotations

import io
import logging
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from fake_folders import prepare as _prepare
import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from medxai_jax.data import preprocess
from medxai_jax.data.builders import (
  brain_tumor_kaggle,
  common,
  covid_radiography,
  modality_folders,
  mura,
  tb_cxr,
)

RNG = np.random.default_rng(15)


def _save(path, image: Image.Image, **options) -> None:
  """Saves a Pillow image, creating its folder; the format follows the suffix."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **options)


def _exif(orientation: int) -> Image.Exif:
  """An EXIF block holding only the orientation tag."""
  exif = Image.Exif()
  exif[preprocess.EXIF_ORIENTATION_TAG] = orientation
  return exif


def _records(builder, split: str) -> dict[str, dict]:
  """path -> decoded example of one split."""
  source = builder.as_data_source(split=split)
  return {source[i]["path"].decode(): source[i] for i in range(len(source))}


def _naive_composite(rgba: np.ndarray) -> np.ndarray:
  """Colour over black, in float64: round(colour * alpha / 255)."""
  colour, alpha = rgba[..., :-1].astype(np.float64), rgba[..., -1:].astype(np.float64)
  return np.floor(colour * alpha / 255 + 0.5).astype(np.uint8)


# Transparency ---------------------------------------------------------------------------------


def test_rgba_png_is_composited_on_black():
  rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
  rgba[2:5, 3:8, 3] = 0  # a fully transparent region
  rgba[6:, :, 3] = 255  # opaque rows
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
  decoded = preprocess.read_image(buffer.getvalue())
  assert decoded.shape == (9, 11, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, _naive_composite(rgba))
  assert (decoded[2:5, 3:8] == 0).all()  # transparent -> black, not its RGB colour
  np.testing.assert_array_equal(decoded[6:], rgba[6:, :, :3])  # opaque pixels unchanged


def test_la_and_palette_transparency_are_composited_on_black():
  la = RNG.integers(0, 256, (6, 7, 2), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(la, "LA").save(buffer, format="PNG")
  decoded = preprocess.read_image(buffer.getvalue())
  assert decoded.shape == (6, 7, 1)
  np.testing.assert_array_equal(decoded, _naive_composite(la))
  indices = RNG.integers(0, 4, (6, 7), dtype=np.uint8)
  palette = Image.fromarray(indices, "P")
  colours = [200, 10, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
  palette.putpalette(colours)
  buffer = io.BytesIO()
  palette.save(buffer, format="PNG", transparency=2)  # index 2 is transparent
  decoded = preprocess.read_image(buffer.getvalue())
  expected = np.asarray(colours, np.uint8).reshape(4, 3)[indices]
  expected[indices == 2] = 0
  np.testing.assert_array_equal(decoded, expected)


def test_builder_warns_once_per_split_with_count_and_file(tmp_path, caplog):
  manual = tmp_path / "manual"
  for number in range(3):
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0
    _save(manual / "alpha" / f"a{number}.png", Image.fromarray(rgba, "RGBA"))
  _save(manual / "plain" / "p0.png", Image.fromarray(RNG.integers(0, 256, (8, 8, 3), np.uint8)))
  config = modality_folders.config_from_folder(manual, image_size=0, channels=3,
                                               split_fractions=(1.0, 0.0, 0.0))
  with caplog.at_level(logging.WARNING):
    builder = _prepare(modality_folders.MedicalModalities, config, tmp_path, manual)
  lines = [record.getMessage() for record in caplog.records
           if "transparent pixels" in record.getMessage()]
  assert len(lines) == 1, lines  # one line for the split, not one per image
  assert "3 image file(s)" in lines[0] and "alpha/a" in lines[0] and "/train" in lines[0]
  records = _records(builder, "train")
  stored = records["alpha/a0.png"]["image"]
  with Image.open(manual / "alpha" / "a0.png") as image:
    np.testing.assert_array_equal(stored, _naive_composite(np.asarray(image)))


# EXIF orientation -----------------------------------------------------------------------------

# EXIF orientation -> what a viewer does to the stored pixels (TIFF 6.0 / EXIF 2.3).
UPRIGHT = {
  2: np.fliplr,
  3: lambda a: np.rot90(a, 2),
  6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
  8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_png_exif_orientation_is_applied(orientation):
  stored = RNG.integers(0, 256, (5, 9), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(stored).save(buffer, format="PNG", exif=_exif(orientation))
  assert preprocess.exif_orientation(buffer.getvalue()) == orientation
  np.testing.assert_array_equal(preprocess.read_image(buffer.getvalue())[..., 0],
                                UPRIGHT[orientation](stored))


def test_jpeg_exif_orientation_6_is_rotated_clockwise(tmp_path):
  stored = np.zeros((16, 24, 3), np.uint8)
  stored[:8, :8] = 255  # a white block in the stored top-left corner
  path = tmp_path / "rotated.jpg"
  _save(path, Image.fromarray(stored), format="JPEG", quality=95, exif=_exif(6))
  with Image.open(path) as image:  # the stored (unrotated) JPEG pixels, naively
    raw = np.asarray(image)
  decoded = preprocess.read_image(path)
  assert decoded.shape == (24, 16, 3)
  np.testing.assert_array_equal(decoded, np.rot90(raw, -1))
  assert decoded[:8, -8:].mean() > 200 and decoded[-8:, :8].mean() < 50  # block now top-right
  unit = common.read_unit_image(path, 3)
  np.testing.assert_allclose(unit, np.rot90(raw, -1) / 255, atol=1e-7)


def test_builder_stores_exif_rotated_jpeg_upright(tmp_path):
  manual = tmp_path / "manual"
  stored = RNG.integers(0, 256, (12, 20), dtype=np.uint8)
  _save(manual / "rot" / "r.jpg", Image.fromarray(stored), format="JPEG", quality=95,
        exif=_exif(6))
  _save(manual / "flat" / "f.png", Image.fromarray(stored))
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1,
                                               split_fractions=(1.0, 0.0, 0.0))
  builder = _prepare(modality_folders.MedicalModalities, config, tmp_path, manual)
  records = _records(builder, "train")
  with Image.open(manual / "rot" / "r.jpg") as image:
    raw = np.asarray(image)
  assert records["rot/r.jpg"]["image"].shape == (20, 12, 1)
  np.testing.assert_array_equal(records["rot/r.jpg"]["image"][..., 0], np.rot90(raw, -1))


def _make_covid(root, rotated: bool) -> None:
  """Three COVID classes of two 12 x 12 PNGs with masks; COVID-0 is EXIF-rotated when asked."""
  base = root / "COVID-19_Radiography_Dataset"
  for folder in ("COVID", "Lung_Opacity", "Normal"):
    for number in range(2):
      name = f"{folder}-{number}.png"
      image = Image.fromarray(RNG.integers(0, 256, (12, 12), dtype=np.uint8))
      options = {"exif": _exif(6)} if rotated and folder == "COVID" and number == 0 else {}
      _save(base / folder / "images" / name, image, **options)
      mask = np.zeros((12, 12), np.uint8)
      mask[:, :4] = 255  # the left third
      _save(base / folder / "masks" / name, Image.fromarray(mask))


def test_image_rotated_by_exif_and_its_mask_not_is_an_error_naming_both(tmp_path):
  _make_covid(tmp_path / "manual", rotated=True)
  config = covid_radiography.make_covid_config("three", image_size=0, read_metadata=False,
                                               split_fractions=(1.0, 0.0, 0.0))
  with pytest.raises(ValueError, match="EXIF orientation 6") as error:
    _prepare(covid_radiography.CovidRadiography, config, tmp_path, tmp_path / "manual")
  message = str(error.value)
  assert "images/COVID-0.png" in message and "masks/COVID-0.png" in message
  _make_covid(tmp_path / "manual2", rotated=False)  # unrotated: prepares, masks as drawn
  builder = _prepare(covid_radiography.CovidRadiography, config, tmp_path / "b",
                     tmp_path / "manual2")
  for record in _records(builder, "train").values():
    assert (record["lung_mask"][:, :4] == 1).all() and (record["lung_mask"][:, 4:] == 0).all()


# 16-bit sources -------------------------------------------------------------------------------


def _twelve_bit_folder(root) -> dict[str, np.ndarray]:
  """Two classes of 16-bit PNGs holding 12-bit values (up to 2048 and 4095)."""
  expected = {}
  for folder in ("ct", "cr"):
    for number in range(2):
      values = RNG.integers(0, 4096, (6, 5)).astype(np.uint16)
      values[0, 0] = 2048
      path = root / folder / f"{number}.png"
      _save(path, Image.fromarray(values))
      expected[f"{folder}/{number}.png"] = values
  return expected


def test_16_bit_png_with_8_bit_storage_is_refused_naming_file_and_options(tmp_path):
  manual = tmp_path / "manual"
  _twelve_bit_folder(manual)
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1,
                                               split_fractions=(1.0, 0.0, 0.0))
  assert config.storage_bits == 8 and not config.allow_bit_depth_reduction
  with pytest.raises(ValueError, match="16-bit pixels") as error:
    _prepare(modality_folders.MedicalModalities, config, tmp_path, manual)
  message = str(error.value)
  assert str(manual) in message and ".png" in message
  assert "--config.dataset.builder.storage_bits=16" in message
  assert "--config.dataset.builder.allow_bit_depth_reduction=True" in message
  assert "--config.preprocess.bit_depth=12" in message  # values below 4096: the 12-bit hint


def test_16_bit_png_keeps_its_values_with_storage_bits_16(tmp_path):
  manual = tmp_path / "manual"
  expected = _twelve_bit_folder(manual)
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1, storage_bits=16,
                                               split_fractions=(1.0, 0.0, 0.0))
  records = _records(_prepare(modality_folders.MedicalModalities, config, tmp_path, manual),
                     "train")
  assert sorted(records) == sorted(expected)
  for path, record in records.items():
    assert record["image"].dtype == np.uint16
    np.testing.assert_array_equal(record["image"][..., 0], expected[path])  # 2048 stays 2048


def test_bit_depth_reduction_when_allowed_quantises_by_65535(tmp_path):
  manual = tmp_path / "manual"
  expected = _twelve_bit_folder(manual)
  config = modality_folders.config_from_folder(manual, image_size=0, channels=1,
                                               allow_bit_depth_reduction=True,
                                               split_fractions=(1.0, 0.0, 0.0))
  records = _records(_prepare(modality_folders.MedicalModalities, config, tmp_path, manual),
                     "train")
  for path, record in records.items():
    assert record["image"].dtype == np.uint8
    naive = np.floor(expected[path].astype(np.float64) / 65535 * 255 + 0.5)
    np.testing.assert_array_equal(record["image"][..., 0], naive)


def test_check_bit_depth_kept_lets_8_bit_sources_and_16_bit_storage_pass():
  config = modality_folders.make_modality_config()
  common.check_bit_depth_kept("a.png", 8, config)  # 8 into 8: nothing lost
  common.check_bit_depth_kept("b.png", 8, common.derive_config(config, storage_bits=16))
  common.check_bit_depth_kept("c.png", 16, common.derive_config(config, storage_bits=16))
  with pytest.raises(ValueError, match="c.png holds 16-bit"):
    common.check_bit_depth_kept("c.png", 16, config, highest=60000)
  with pytest.raises(ValueError) as error:
    common.check_bit_depth_kept("c.png", 16, config, highest=60000)
  assert "12-bit" not in str(error.value)  # values beyond 4095: no 12-bit hint
  assert tb_cxr.make_tb_config("combined").allow_bit_depth_reduction  # 002's 8-bit configs


# Empty splits ---------------------------------------------------------------------------------


def test_flat_modality_folder_too_small_for_a_split_is_refused(tmp_path):
  manual = tmp_path / "manual"
  for folder in ("a", "b"):
    for number in range(3):
      _save(manual / folder / f"{number}.png", Image.fromarray(np.full((4, 4), number, np.uint8)))
  config = modality_folders.config_from_folder(manual, image_size=0,
                                               split_fractions=(0.8, 0.1, 0.1))
  with pytest.raises(ValueError, match="split 'test' came out empty") as error:
    _prepare(modality_folders.MedicalModalities, config, tmp_path, manual)
  message = str(error.value)  # per class: cuts at rint(2.4), rint(2.7), 3 -> 2, 1, 0 images
  assert "{'a': 3, 'b': 3}" in message and "(0.8, 0.1, 0.1)" in message
  assert "{'train': 4, 'validation': 2, 'test': 0}" in message
  assert "--config.dataset.builder.split_fractions" in message
  zero = modality_folders.config_from_folder(manual, image_size=0,
                                             split_fractions=(0.5, 0.0, 0.5))
  builder = _prepare(modality_folders.MedicalModalities, zero, tmp_path / "z", manual)
  assert set(builder.info.splits) == {"train", "test"}  # a share of 0 stays allowed


def test_kaggle_validation_carve_too_small_is_refused(tmp_path):
  root = tmp_path / "manual"
  for split in ("Training", "Testing"):
    for folder in ("glioma", "meningioma", "notumor", "pituitary"):
      for number in range(2):
        _save(root / split / folder / f"{number}.jpg",
              Image.fromarray(RNG.integers(0, 256, (8, 8), dtype=np.uint8)))
  config = brain_tumor_kaggle.make_brain_kaggle_config(image_size=8, validation_fraction=0.1)
  with pytest.raises(ValueError, match="split 'validation' came out empty") as error:
    _prepare(brain_tumor_kaggle.BrainTumorKaggle, config, tmp_path, root)
  message = str(error.value)
  assert "validation_fraction 0.1" in message and "'glioma': 4" in message
  assert "--config.dataset.builder.validation_fraction=" in message
  none = brain_tumor_kaggle.make_brain_kaggle_config(image_size=8, validation_fraction=0.0)
  builder = _prepare(brain_tumor_kaggle.BrainTumorKaggle, none, tmp_path / "z", root)
  assert set(builder.info.splits) == {"train", "test"}


def _make_mura(root, csv_bytes: dict[str, bytes] | None = None) -> None:
  """MURA-v1.1/ with two training patients and one validation patient, one 8 x 8 image each."""
  folder = root / "MURA-v1.1"
  listing = {"train": [], "valid": []}
  studies = {"train": [], "valid": []}
  for split, patient, positive in (("train", 1, True), ("train", 2, False), ("valid", 3, False)):
    study = (f"MURA-v1.1/{split}/XR_WRIST/patient{patient:05d}/study1_"
             f"{'positive' if positive else 'negative'}/")
    _save(root / f"{study}image1.png", Image.fromarray(np.full((8, 8), 9 * patient, np.uint8)))
    listing[split].append(f"{study}image1.png")
    studies[split].append(f"{study},{int(positive)}")
  for split in ("train", "valid"):
    (folder / f"{split}_image_paths.csv").write_text("\n".join(listing[split]) + "\n")
    (folder / f"{split}_labeled_studies.csv").write_text("\n".join(studies[split]) + "\n")
  for name, data in (csv_bytes or {}).items():
    (folder / name).write_bytes(data)


def test_mura_validation_carve_too_small_is_refused(tmp_path):
  _make_mura(tmp_path / "manual")
  config = mura.make_mura_config("all", image_size=8)  # 10% of 2 patients rounds to none
  with pytest.raises(ValueError, match="split 'validation' came out empty") as error:
    _prepare(mura.Mura, config, tmp_path, tmp_path / "manual")
  message = str(error.value)
  assert "'train': 2, 'validation': 0, 'test': 1" in message
  assert "'abnormal': 1" in message and "'normal': 2" in message
  assert "validation_fraction 0.1" in message
  half = mura.make_mura_config("all", image_size=8, validation_fraction=0.5)
  builder = _prepare(mura.Mura, half, tmp_path / "half", tmp_path / "manual")
  assert [builder.info.splits[s].num_examples for s in ("train", "validation", "test")] == [1, 1, 1]


def test_tb_split_too_small_is_refused_naming_source_and_label_counts(tmp_path):
  manual = tmp_path / "manual" / "ChinaSet_AllFiles"
  for number in range(1, 5):
    name = f"CHNCXR_{number:04d}_{number % 2}"
    _save(manual / "CXR_png" / f"{name}.png", Image.fromarray(np.full((8, 8), number, np.uint8)))
    (manual / "ClinicalReadings").mkdir(exist_ok=True)
    (manual / "ClinicalReadings" / f"{name}.txt").write_text("male 30yrs\nnormal")
  config = tb_cxr.make_tb_config("shenzhen", image_size=8, clahe=False)
  with pytest.raises(ValueError, match="came out empty") as error:
    _prepare(tb_cxr.TbCxr, config, tmp_path, tmp_path / "manual")
  assert "'shenzhen normal': 2" in str(error.value)
  assert "'shenzhen tuberculosis': 2" in str(error.value)


# Text files -----------------------------------------------------------------------------------


def test_read_text_file_names_file_line_and_byte(tmp_path):
  path = tmp_path / "listing.csv"
  path.write_bytes(b"first line\nsecond\nthi\xe9rd\n")
  with pytest.raises(ValueError, match="listing.csv, line 3, byte 4 of the line: not UTF-8"):
    common.read_text_file(path)
  assert common.read_text_file(path, fallback="latin-1") == ("first line\nsecond\nthi\u00e9rd\n",
                                                            "latin-1")
  path.write_bytes(b"\xef\xbb\xbfwith a BOM\n")
  assert common.read_text_file(path) == ("with a BOM\n", "utf-8")


def test_mura_csv_with_bom_is_read_and_latin_1_is_an_error_naming_file_and_line(tmp_path):
  root = tmp_path / "manual"
  _make_mura(root)
  folder = root / "MURA-v1.1"
  text = (folder / "train_labeled_studies.csv").read_bytes()
  (folder / "train_labeled_studies.csv").write_bytes(b"\xef\xbb\xbf" + text)
  labels = mura.read_study_labels(folder, "train")
  assert labels == {"MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/": 1,
                    "MURA-v1.1/train/XR_WRIST/patient00002/study1_negative/": 0}
  lines = (folder / "train_image_paths.csv").read_bytes().splitlines(keepends=True)
  lines[1] = lines[1].replace(b"image1", b"im\xe4ge1")
  (folder / "train_image_paths.csv").write_bytes(b"".join(lines))
  with pytest.raises(ValueError, match="train_image_paths.csv, line 2") as error:
    mura.read_listing(folder, "train")
  assert "not UTF-8" in str(error.value)


def test_tb_reading_that_is_not_utf8_is_read_as_latin_1(tmp_path, caplog):
  manual = tmp_path / "manual" / "ChinaSet_AllFiles"
  readings = {}
  for number in range(1, 9):
    name = f"CHNCXR_{number:04d}_{number % 2}"
    _save(manual / "CXR_png" / f"{name}.png", Image.fromarray(np.full((8, 8), number, np.uint8)))
    (manual / "ClinicalReadings").mkdir(exist_ok=True)
    text = f"female {20 + number}yrs\nop\u00e9r\u00e9e {number}"
    encoding = "latin-1" if number in (2, 5) else "utf-8"
    (manual / "ClinicalReadings" / f"{name}.txt").write_bytes(text.encode(encoding))
    readings[name] = text
  config = tb_cxr.make_tb_config("shenzhen", image_size=8, clahe=False,
                                 split_fractions=(0.5, 0.25, 0.25))
  with caplog.at_level(logging.WARNING):
    builder = _prepare(tb_cxr.TbCxr, config, tmp_path, tmp_path / "manual")
  lines = [record.getMessage() for record in caplog.records if "not UTF-8" in record.getMessage()]
  assert len(lines) == 1 and "2 clinical reading(s)" in lines[0] and "latin-1" in lines[0]
  stored = {record["patient_id"].decode(): record for split in builder.info.splits
            for record in _records(builder, split).values()}
  assert len(stored) == 8
  for name, text in readings.items():
    record = stored[name[:-2]]
    assert record["clinical_reading"].decode() == text  # no replacement characters
    assert record["sex"] == tb_cxr.SEX_NAMES.index("female") and record["age"] == 20 + int(
      name[7:11])


def test_covid_metadata_sheet_that_cannot_be_decoded_names_the_file(tmp_path):
  sheet = tmp_path / "COVID.metadata.xlsx"
  with zipfile.ZipFile(sheet, "w") as archive:
    archive.writestr("xl/worksheets/sheet1.xml",
                     b'<?xml version="1.0" encoding="UTF-8"?>\n<worksheet>caf\xe9</worksheet>')
  with pytest.raises(ValueError, match="Cannot read the metadata sheet .*COVID.metadata.xlsx") as e:
    covid_radiography.read_source_urls(sheet)
  assert "line 2" in str(e.value) and "read_metadata=False" in str(e.value)


def _png_16_bit_rgb(values: np.ndarray) -> bytes:
  """A 16-bit RGB PNG written from the specification (Pillow cannot write one)."""
  height, width, _ = values.shape
  big_endian = values.astype(">u2")
  rows = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


def test_16_bit_colour_png_that_pillow_reads_as_8_bits_is_refused(tmp_path):
  values = RNG.integers(0, 65536, (4, 5, 3)).astype(np.uint16)
  path = tmp_path / "colour16.png"
  path.write_bytes(_png_16_bit_rgb(values))
  assert preprocess.png_sample_bits(path) == 16
  np.testing.assert_array_equal(preprocess.read_image(path), values >> 8)  # Pillow's top byte
  for bits in (8, 16):
    config = modality_folders.make_modality_config(storage_bits=bits)
    with pytest.raises(ValueError, match="colour16.png is a 16-bit colour"):
      common.read_unit_image(path, 3, config)
  allowed = modality_folders.make_modality_config(allow_bit_depth_reduction=True)
  np.testing.assert_allclose(common.read_unit_image(path, 3, allowed), (values >> 8) / 255,
                             atol=1e-7)
  eight = tmp_path / "rgb8.png"
  Image.fromarray((values >> 8).astype(np.uint8)).save(eight)
  assert preprocess.png_sample_bits(eight) == 8
  common.read_unit_image(eight, 3, modality_folders.make_modality_config())  # 8 bits: fine
