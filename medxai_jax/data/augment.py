"""Random training-time augmentation as jit-able JAX ops with explicit keys, run on the device.

Per image: a horizontal flip with probability 1/2 (000's "random lateral inversions"), then one
affine warp about the image centre combining a rotation by a uniform angle in
[-rotation_degrees, rotation_degrees] (positive = counter-clockwise on screen, as np.rot90 and
scipy.ndimage.rotate), an isotropic zoom by a uniform factor in [1 - zoom, 1 + zoom] (> 1
magnifies) and a shift by uniform amounts in [-shift_pixels, shift_pixels] along each axis
(continuous, like Keras' ImageDataGenerator with an integer shift range: 004's +-3 pixels).
The warp samples bilinearly; pixels from outside the image are `fill_value` ('constant') or the
nearest edge pixel ('nearest'). Images are [H, W, C] floats (the loop passes stored images
scaled to [0, 1], before resizing and normalisation, so a fill of 0 is black). A batch draws one
key per image by splitting the batch key, and vmaps over images.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

FILL_MODES = ("constant", "nearest")
AUGMENT_FIELDS = ("flip", "rotation_degrees", "shift_pixels", "zoom", "fill_mode", "fill_value")


def flip_horizontal(image: jax.Array) -> jax.Array:
  """Mirror image of an [H, W, C] image (left <-> right)."""
  return image[:, ::-1, :]


def affine_warp(image: jax.Array, angle: jax.Array, shift: jax.Array, scale: jax.Array,
                fill_mode: str = "constant", fill_value: float = 0.0) -> jax.Array:
  """[H, W, C] image rotated by `angle` radians, zoomed by `scale` and moved by `shift` (dy, dx).

  Output pixel (y, x) reads the input at c + R(-angle) ((y, x) - c - shift) / scale, with
  c = ((H - 1) / 2, (W - 1) / 2), bilinearly.
  """
  if image.ndim != 3:
    raise ValueError(f"affine_warp expects one image [H, W, C], got shape {image.shape}.")
  if fill_mode not in FILL_MODES:
    raise ValueError(f"fill_mode={fill_mode!r} is not one of {list(FILL_MODES)}.")
  height, width, _ = image.shape
  image = image.astype(jnp.float32)
  centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  dy = (rows - centre_y - shift[0]) / scale
  dx = (cols - centre_x - shift[1]) / scale
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  source_rows = centre_y + cos * dy + sin * dx
  source_cols = centre_x - sin * dy + cos * dx

  def warp_channel(channel: jax.Array) -> jax.Array:
    return jax.scipy.ndimage.map_coordinates(channel, [source_rows, source_cols], order=1,
                                             mode=fill_mode, cval=fill_value)

  return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image)


def check_augment_config(augment_config: Mapping[str, Any]) -> dict[str, Any]:
  """Validated augmentation settings (defaults for missing fields); errors name the field."""
  settings = dict(flip=False, rotation_degrees=0.0, shift_pixels=0.0, zoom=0.0,
                  fill_mode="constant", fill_value=0.0)
  unknown = sorted(set(augment_config) - set(AUGMENT_FIELDS))
  if unknown:
    raise ValueError(f"config.augment has unknown field(s) {unknown}; known: "
                     f"{list(AUGMENT_FIELDS)}.")
  settings.update(augment_config)
  settings["flip"] = bool(settings["flip"])
  ranges = {"rotation_degrees": (180.0, "[0, 180]"), "shift_pixels": (math.inf, ">= 0"),
            "zoom": (1.0, "[0, 1)")}
  for field, (upper, text) in ranges.items():
    value = float(settings[field])
    inside = 0.0 <= value <= upper if field == "rotation_degrees" else 0.0 <= value < upper
    if not inside:
      raise ValueError(f"config.augment.{field}={settings[field]} must be {text}.")
    settings[field] = value
  if settings["fill_mode"] not in FILL_MODES:
    raise ValueError(f"config.augment.fill_mode={settings['fill_mode']!r} is not one of "
                     f"{list(FILL_MODES)}.")
  settings["fill_value"] = float(settings["fill_value"])
  return settings


def random_transform(key: jax.Array, *, flip: bool = False, rotation_degrees: float = 0.0,
                     shift_pixels: float = 0.0, zoom: float = 0.0) -> dict[str, jax.Array]:
  """One image's random transform: flip (bool), angle (radians), shift (dy, dx), scale."""
  flip_key, angle_key, shift_key, zoom_key = jax.random.split(key, 4)
  limit = math.radians(rotation_degrees)
  return {
      "flip": jax.random.bernoulli(flip_key) if flip else jnp.zeros((), bool),
      "angle": jax.random.uniform(angle_key, (), minval=-limit, maxval=limit),
      "shift": jax.random.uniform(shift_key, (2,), minval=-shift_pixels, maxval=shift_pixels),
      "scale": jax.random.uniform(zoom_key, (), minval=1.0 - zoom, maxval=1.0 + zoom),
  }


def apply_transform(image: jax.Array, transform: Mapping[str, jax.Array], *, warp: bool = True,
                    fill_mode: str = "constant", fill_value: float = 0.0) -> jax.Array:
  """Applies a `random_transform` to an [H, W, C] image (the warp is skipped if `warp` is False)."""
  image = jnp.where(transform["flip"], flip_horizontal(image), image).astype(jnp.float32)
  if not warp:
    return image
  return affine_warp(image, transform["angle"], transform["shift"], transform["scale"],
                     fill_mode, fill_value)


def augment_batch(key: jax.Array, images: jax.Array, *, flip: bool = False,
                  rotation_degrees: float = 0.0, shift_pixels: float = 0.0, zoom: float = 0.0,
                  fill_mode: str = "constant", fill_value: float = 0.0) -> jax.Array:
  """Independently transformed copies of a [B, H, W, C] batch, one key per image from `key`."""
  if images.ndim != 4:
    raise ValueError(f"augment_batch expects images [B, H, W, C], got shape {images.shape}.")
  warp = bool(rotation_degrees or shift_pixels or zoom)

  def one(image_key: jax.Array, image: jax.Array) -> jax.Array:
    transform = random_transform(image_key, flip=flip, rotation_degrees=rotation_degrees,
                                 shift_pixels=shift_pixels, zoom=zoom)
    return apply_transform(image, transform, warp=warp, fill_mode=fill_mode,
                           fill_value=fill_value)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def make_augment_fn(augment_config: Mapping[str, Any]
                    ) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """`augment(key, images)` for `config.augment`, or None when every augmentation is off."""
  settings = check_augment_config(augment_config)
  if not (settings["flip"] or settings["rotation_degrees"] or settings["shift_pixels"]
          or settings["zoom"]):
    return None

  def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    return augment_batch(key, images, **settings)

  return augment
