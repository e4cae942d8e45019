"""On-device augmentation: flips, rotations, shifts and zoom against exact references and
scipy.ndimage (data/augment.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from medxai_jax.data import augment

def test_flip_is_an_exact_mirror_and_each_image_draws_its_own():
  rng = np.random.default_rng(0)
  image = rng.random((9, 12, 2)).astype(np.float32)
  np.testing.assert_array_equal(augment.flip_horizontal(jnp.asarray(image)), image[:, ::-1])
  batch = jnp.asarray(np.repeat(image[None], 32, axis=0))
  out = np.asarray(augment.augment_batch(jax.random.key(0), batch, flip=True))
  flipped = [np.array_equal(o, image[:, ::-1]) for o in out]
  assert all(f or np.array_equal(o, image) for f, o in zip(flipped, out))
  assert 4 < sum(flipped) < 28


def test_zero_rotation_and_zero_shift_are_identities():
  rng = np.random.default_rng(1)
  image = jnp.asarray(rng.random((16, 20, 3)).astype(np.float32))
  same = augment.affine_warp(image, jnp.float32(0.0), jnp.zeros(2), jnp.float32(1.0))
  np.testing.assert_array_equal(same, image)
  batch = jnp.stack([image, image])
  out = augment.augment_batch(jax.random.key(3), batch, rotation_degrees=0.0, shift_pixels=0.0,
                              zoom=0.0)
  np.testing.assert_array_equal(out, batch)
  assert augment.make_augment_fn({}) is None


def test_rotation_by_90_degrees_matches_rot90_away_from_borders():
  size = 33
  y, x = np.mgrid[:size, :size] - (size - 1) / 2
  # Centred and mirror-symmetric, but not invariant under a quarter turn.
  pattern = np.exp(-(x ** 2 + 4 * y ** 2) / 40.0) + 0.5 * (np.abs(x) < 2)
  image = pattern[..., None].astype(np.float32)
  out = np.asarray(augment.affine_warp(jnp.asarray(image), jnp.float32(np.pi / 2), jnp.zeros(2),
                                       jnp.float32(1.0)))
  expected = np.rot90(image)  # counter-clockwise, as on screen
  np.testing.assert_allclose(out[2:-2, 2:-2], expected[2:-2, 2:-2], atol=1e-4)
  assert np.abs(out - image)[2:-2, 2:-2].max() > 0.3  # the pattern really turned


def test_warp_matches_scipy_ndimage():
  rng = np.random.default_rng(2)
  image = rng.random((21, 26, 1)).astype(np.float32)
  rotated = augment.affine_warp(jnp.asarray(image), jnp.float32(np.deg2rad(17.0)), jnp.zeros(2),
                                jnp.float32(1.0))
  reference = ndi.rotate(image, 17.0, reshape=False, order=1, mode="grid-constant")
  np.testing.assert_allclose(rotated, reference, atol=1e-5)
  shifted = augment.affine_warp(jnp.asarray(image), jnp.float32(0.0), jnp.array([2.5, -3.0]),
                                jnp.float32(1.0), fill_mode="nearest")
  np.testing.assert_allclose(shifted, ndi.shift(image, (2.5, -3.0, 0), order=1, mode="nearest"),
                             atol=1e-5)
  # Zoom by s about the centre c: output(p) = input(c + (p - c) / s).
  scale = 1.3
  centre = (np.array(image.shape[:2]) - 1) / 2
  zoomed = augment.affine_warp(jnp.asarray(image), jnp.float32(0.0), jnp.zeros(2),
                               jnp.float32(scale))
  reference = ndi.affine_transform(image[..., 0], np.eye(2) / scale,
                                   offset=centre - centre / scale, order=1, mode="grid-constant")
  np.testing.assert_allclose(zoomed[..., 0], reference, atol=1e-5)


def test_augmentation_keys_ranges_and_jit():
  rng = np.random.default_rng(3)
  image = rng.random((24, 24, 1)).astype(np.float32)
  batch = jnp.asarray(np.repeat(image[None], 6, axis=0))
  settings = dict(flip=True, rotation_degrees=10.0, shift_pixels=3.0, zoom=0.1)
  fn = jax.jit(augment.make_augment_fn(settings))
  first = np.asarray(fn(jax.random.key(0), batch))
  np.testing.assert_array_equal(first, np.asarray(fn(jax.random.key(0), batch)))
  assert first.shape == batch.shape and first.dtype == np.float32
  assert all(not np.allclose(first[i], first[j]) for i in range(6) for j in range(i))
  assert not np.allclose(first, np.asarray(fn(jax.random.key(1), batch)))
  transforms = jax.vmap(functools.partial(
      augment.random_transform, flip=True, rotation_degrees=10.0, shift_pixels=3.0, zoom=0.1))(
          jax.random.split(jax.random.key(4), 2000))
  limit = np.deg2rad(10.0)
  largest_angle = np.abs(transforms["angle"]).max()
  assert 0.95 * limit < largest_angle <= limit
  assert np.abs(transforms["shift"]).max() <= 3.0 and np.abs(transforms["shift"]).max() > 2.9
  assert 0.9 <= transforms["scale"].min() and transforms["scale"].max() <= 1.1
  assert 0.45 < float(transforms["flip"].mean()) < 0.55


def test_bad_augment_settings_are_named():
  with pytest.raises(ValueError, match=r"config.augment.zoom=1.0 must be \[0, 1\)"):
    augment.make_augment_fn({"zoom": 1.0})
  with pytest.raises(ValueError, match="rotation_degrees"):
    augment.make_augment_fn({"rotation_degrees": -5})
  with pytest.raises(ValueError, match="fill_mode"):
    augment.make_augment_fn({"flip": True, "fill_mode": "wrap"})
  with pytest.raises(ValueError, match="rotaton_degrees"):
    augment.make_augment_fn({"rotaton_degrees": 5})
