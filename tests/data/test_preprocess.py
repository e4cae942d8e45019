"""Tests of the preprocessing functions added for the real datasets (device and host side)."""

from __future__ import annotations

import importlib.util
import io

import jax
import jax.numpy as jnp
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


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  """PNG bytes written by Pillow directly (independent of preprocess.encode_png)."""
  image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


# Device side ---------------------------------------------------------------------------------


def test_scale_to_unit_uses_the_bit_depth():
  pixels = jnp.asarray([0, 2048, 4095], jnp.uint16)
  np.testing.assert_allclose(preprocess.scale_to_unit(pixels, 12), [0.0, 2048 / 4095, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(preprocess.scale_to_unit(pixels, 16), [0.0, 2048 / 65535,
                                                                    4095 / 65535], rtol=1e-6)
  eight = jnp.asarray([0, 17, 255], jnp.uint8)
  np.testing.assert_array_equal(preprocess.scale_to_unit(eight, 8), preprocess.to_unit_range(eight))
  with pytest.raises(ValueError, match="bit_depth"):
    preprocess.scale_to_unit(pixels, 17)


def test_normalize_imagenet_matches_per_pixel_formula():
  images = np.random.default_rng(0).random((2, 3, 4, 3)).astype(np.float32)
  expected = np.empty_like(images)
  for channel in range(3):
    expected[..., channel] = ((images[..., channel] - preprocess.IMAGENET_MEAN[channel])
                              / preprocess.IMAGENET_STD[channel])
  np.testing.assert_allclose(jax.jit(preprocess.normalize_imagenet)(images), expected, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="3 channels"):
    preprocess.normalize_imagenet(images[..., :1])
  with pytest.raises(ValueError, match="do not match"):
    preprocess.normalize(images, (0.1, 0.2), (1.0,))


@pytest.mark.parametrize("height, width, out, expected", [
  (100, 50, (64, 64), (64, 32, 0, 16)),
  (50, 100, (64, 64), (32, 64, 16, 0)),
  (30, 30, (64, 64), (64, 64, 0, 0)),
  (10, 40, (33, 33), (8, 33, 12, 0)),  # 8.25 rounds to 8; odd margin goes to the bottom
  (200, 100, (50, 80), (50, 25, 0, 27)),
])
def test_padded_resize_geometry_keeps_aspect(height, width, out, expected):
  assert preprocess.padded_resize_geometry(height, width, *out) == expected


def test_resize_with_padding_device_places_the_resized_image_between_margins():
  image = jax.random.uniform(jax.random.key(0), (20, 40, 2))
  out = jax.jit(lambda x: preprocess.resize_with_padding(x, 32, 32, pad_value=-1.0))(image)
  assert out.shape == (32, 32, 2)
  # 20 x 40 -> 16 x 32 (aspect 1:2 kept), rows 8..23 hold it.
  direct = jax.image.resize(image, (16, 32, 2), method="bilinear", antialias=True)
  np.testing.assert_allclose(out[8:24], direct, rtol=1e-6)
  np.testing.assert_array_equal(out[:8], -1.0)
  np.testing.assert_array_equal(out[24:], -1.0)
  batch = preprocess.resize_with_padding(jnp.stack([image, image]), 32, 32)
  assert batch.shape == (2, 32, 32, 2)
  np.testing.assert_allclose(batch[1, 8:24], direct, rtol=1e-6)


# Host side -----------------------------------------------------------------------------------


def test_read_image_keeps_12_bit_values_in_16_bit_png():
  values = (np.arange(48).reshape(6, 8) * 85).astype(np.uint16)  # up to 3995 < 4096
  decoded = preprocess.read_image(_png(values))
  assert decoded.dtype == np.uint16 and decoded.shape == (6, 8, 1)
  np.testing.assert_array_equal(decoded[..., 0], values)
  unit = preprocess.to_unit_float(decoded, bit_depth=12)
  np.testing.assert_allclose(unit[..., 0], values / 4095.0, rtol=1e-6)
  np.testing.assert_array_equal(  # 12 -> 16 bits and back loses nothing
    np.rint(preprocess.quantize(unit, 16).astype(np.float64) * 4095 / 65535)[..., 0], values)


def test_read_image_modes():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.read_image(_png(gray))[..., 0], gray)
  rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
  rgba[..., 3] = 255  # opaque: the RGB as stored (transparency: data/builders/test_common.py)
  decoded = preprocess.read_image(_png(rgba))
  assert decoded.shape == (5, 7, 3)
  np.testing.assert_array_equal(decoded, rgba[..., :3])
  palette = Image.fromarray(rgba[..., :3]).convert("P")
  buffer = io.BytesIO()
  palette.save(buffer, format="PNG")
  expected = np.asarray(palette.convert("RGB"))
  np.testing.assert_array_equal(preprocess.read_image(buffer.getvalue()), expected)
  buffer = io.BytesIO()
  Image.fromarray(rgba[..., :3]).save(buffer, format="JPEG", quality=95)
  jpeg = preprocess.read_image(buffer.getvalue())
  assert jpeg.shape == (5, 7, 3) and jpeg.dtype == np.uint8


def test_read_image_reports_corrupt_and_missing_files(tmp_path):
  good = _png(np.zeros((16, 16), np.uint8))
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good[: len(good) // 2])
  with pytest.raises(preprocess.CorruptImageError, match="truncated.png") as error:
    preprocess.read_image(truncated)
  assert error.value.path == str(truncated)
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"not an image at all")
  with pytest.raises(preprocess.CorruptImageError, match="junk.png"):
    preprocess.read_image(junk)
  with pytest.raises(FileNotFoundError):
    preprocess.read_image(tmp_path / "absent.png")


def test_to_unit_float_bit_depths():
  eight = np.asarray([[0, 51, 255]], np.uint8)[..., None]
  np.testing.assert_allclose(preprocess.to_unit_float(eight)[..., 0], [[0.0, 0.2, 1.0]])
  sixteen = np.asarray([[0, 65535]], np.uint16)[..., None]
  np.testing.assert_allclose(preprocess.to_unit_float(sixteen)[..., 0], [[0.0, 1.0]])
  with pytest.raises(ValueError, match="12-bit maximum 4095"):
    preprocess.to_unit_float(sixteen, bit_depth=12)


def test_quantize_rounds_and_clips():
  values = np.asarray([-0.1, 0.0, 0.6 / 255, 0.4 / 255, 0.5, 1.0, 1.2], np.float32)
  np.testing.assert_array_equal(preprocess.quantize(values), [0, 0, 1, 0, 128, 255, 255])
  assert preprocess.quantize(values, 16).dtype == np.uint16
  assert preprocess.quantize(values, 16)[-2] == 65535


def test_gray_and_rgb_conversions():
  rgb = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  gray = preprocess.to_gray(rgb.astype(np.float32) / 255)
  naive = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
  np.testing.assert_allclose(gray[..., 0], naive, rtol=1e-5)
  pillow = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float32) / 255
  np.testing.assert_allclose(gray[..., 0], pillow, atol=1.01 / 255)  # Pillow rounds to 8 bits
  back = preprocess.to_rgb(gray)
  assert back.shape == (4, 5, 3)
  np.testing.assert_array_equal(back[..., 0], back[..., 2])
  assert preprocess.to_rgb(rgb) is rgb and preprocess.to_gray(gray) is gray


def test_resize_with_padding_host_keeps_aspect_and_mask_values():
  image = np.ones((30, 60, 1), np.float32)
  out = preprocess.resize_with_padding_np(image, 40, 40)
  assert out.shape == (40, 40, 1) and out.dtype == np.float32
  rows = np.flatnonzero(out[:, 20, 0] > 0.5)
  cols = np.flatnonzero(out[20, :, 0] > 0.5)
  assert (rows[0], rows[-1], cols[0], cols[-1]) == (10, 29, 0, 39)  # 20 x 40, centred
  np.testing.assert_allclose(out[10:30], 1.0, rtol=1e-6)
  mask = np.zeros((30, 60, 1), np.uint8)
  mask[:, :30] = 1
  resized = preprocess.resize_with_padding_np(mask, 40, 40, method="nearest")
  assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1}
  np.testing.assert_array_equal(resized[10:30, :20, 0], 1)
  np.testing.assert_array_equal(resized[10:30, 20:, 0], 0)


def test_clahe_range_and_histogram_spread():
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  low_contrast = (0.4 + 0.1 * (0.5 * yy + 0.3 * xx + 0.2 * rng.random((64, 64))))[..., None]
  out = preprocess.clahe(low_contrast.astype(np.float32))
  assert out.shape == (64, 64, 1) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.ptp(out) > 3 * np.ptp(low_contrast)
  bins_before = np.count_nonzero(np.histogram(low_contrast, bins=32, range=(0, 1))[0])
  bins_after = np.count_nonzero(np.histogram(out, bins=32, range=(0, 1))[0])
  assert bins_after > 2 * bins_before
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    preprocess.clahe(low_contrast + 1.0)


def test_remove_uniform_border_recovers_the_inner_image():
  rng = np.random.default_rng(4)
  inner = rng.uniform(0.2, 0.8, (40, 50, 1)).astype(np.float32)
  framed = np.zeros((40 + 3 + 6, 50 + 4 + 2, 1), np.float32)  # black margin ...
  framed[1:-4, 1:-1] = 1.0  # ... then a white line inside it (two bands on each side)
  framed[3:-6, 4:-2] = inner
  found = preprocess.find_uniform_border(framed)
  assert found == (3, 6, 4, 2)
  np.testing.assert_array_equal(preprocess.remove_uniform_border(framed), inner)
  np.testing.assert_array_equal(preprocess.remove_uniform_border(inner), inner)
  flat = np.full((40, 40, 1), 0.5, np.float32)  # all uniform: at most a quarter per side
  assert preprocess.remove_uniform_border(flat).shape == (20, 20, 1)


def test_remove_uniform_border_handles_differently_coloured_sides_and_rgb():
  rng = np.random.default_rng(5)
  inner = rng.uniform(0.2, 0.8, (30, 30, 3)).astype(np.float32)
  framed = np.full((36, 36, 3), 0.0, np.float32)
  framed[:, :3] = 1.0  # a white left band overlapping the black top band's corner
  framed[3:33, 3:33] = inner
  assert preprocess.find_uniform_border(framed) == (3, 3, 3, 3)
  np.testing.assert_array_equal(preprocess.remove_uniform_border(framed), inner)


def test_encode_png_round_trip():
  rng = np.random.default_rng(6)
  for image in (rng.integers(0, 256, (5, 6, 1), dtype=np.uint8),
                rng.integers(0, 256, (5, 6, 3), dtype=np.uint8),
                rng.integers(0, 65536, (5, 6, 1), dtype=np.uint16)):
    decoded = np.asarray(Image.open(io.BytesIO(preprocess.encode_png(image))))
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)
  with pytest.raises(ValueError):
    preprocess.encode_png(np.zeros((2, 2, 3), np.uint16))


# Bit depth in the training pipeline -----------------------------------------------------------


def test_preprocess_fn_scales_uint16_by_the_inferred_or_given_bit_depth():
  images = np.asarray([0, 4095, 65535], np.uint16).reshape(1, 1, 3, 1)
  inferred = jax.jit(preprocess.make_preprocess_fn((1, 3, 1)))(images)
  np.testing.assert_allclose(inferred.ravel(), [0.0, 4095 / 65535, 1.0], rtol=1e-6)
  twelve = jax.jit(preprocess.make_preprocess_fn((1, 2, 1), bit_depth=12))(images[:, :, :2])
  np.testing.assert_allclose(twelve.ravel(), [0.0, 1.0], rtol=1e-6)


def test_preprocess_fn_keeps_uint8_and_passes_float_through():
  images = np.random.default_rng(7).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
  fn = jax.jit(preprocess.make_preprocess_fn((4, 4, 1), (0.25,), (0.5,)))
  # The formula before bit depths existed, compiled the same way (XLA may use a reciprocal).
  old = jax.jit(lambda x: (x.astype(jnp.float32) / 255.0 - 0.25) / 0.5)(images)
  np.testing.assert_array_equal(fn(images), old)
  unit = images.astype(np.float32) / 255.0
  expected = (unit - np.float32(0.25)) / np.float32(0.5)
  np.testing.assert_allclose(fn(unit), expected, rtol=1e-6, atol=1e-6)
  explicit = jax.jit(preprocess.make_preprocess_fn((4, 4, 1), (0.25,), (0.5,), bit_depth=16))
  np.testing.assert_array_equal(explicit(unit), fn(unit))  # float input ignores the bit depth


def test_preprocess_fn_names_a_bad_dtype_or_bit_depth():
  fn = preprocess.make_preprocess_fn((2, 2, 1))
  with pytest.raises(ValueError, match="int32"):
    fn(np.zeros((1, 2, 2, 1), np.int32))
  with pytest.raises(ValueError, match="bit_depth"):
    preprocess.make_preprocess_fn((2, 2, 1), bit_depth=17)
  with pytest.raises(ValueError, match="uint8"):
    preprocess.make_preprocess_fn((2, 2, 1), bit_depth=12)(np.zeros((1, 2, 2, 1), np.uint8))


def test_build_components_reads_config_preprocess_bit_depth():
  from configs import demo
  from medxai_jax.train import components

  config = demo.get_config()
  assert config.preprocess.bit_depth is None
  shape = (1, *config.model.input_shape)
  _, _, fn = components.build_components(config)
  np.testing.assert_allclose(jax.jit(fn)(np.full(shape, 65535, np.uint16)), 3.0, rtol=1e-6)
  config.preprocess.bit_depth = 12  # as --config.preprocess.bit_depth=12 sets it
  _, _, fn = components.build_components(config)
  np.testing.assert_allclose(jax.jit(fn)(np.full(shape, 4095, np.uint16)), 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Tests of the DICOM reader (preprocess.read_dicom_unit) on synthetic files and on the two real
# DICOMs of torchxrayvision's tests, and of DICOM class folders through medical_modalities.

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
