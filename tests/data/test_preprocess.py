"""Tests of the preprocessing functions added for the real datasets (device and host side)."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medxai_jax.data import preprocess


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
  rgba[..., 3] = 255  # opaque: the RGB as stored (transparency is tested in test_decoding.py)
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
