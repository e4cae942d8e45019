"""Synthetic limb-radiograph phantoms with lesion masks and an L/R-marker shortcut confounder.

Each phantom is a grayscale "radiograph" of 2-3 bones inside a soft-tissue halo. Abnormal
examples carry one lesion on one bone (a dark fracture crack or bright orthopaedic hardware)
whose pixels are returned as a ground-truth mask. A corner laterality marker ("L" top-left,
"R" top-right) agrees with the label with probability `marker_agreement`, reproducing the
shortcut that MURA-trained models were found to exploit; an optional bright frame is a
second, label-independent artefact.

Example i depends only on (seed, i, config): its parameters are a counter-based hash of
(seed, i) and its pixel noise a per-example shift of seed-keyed noise fields, so any chunking
or `start_index` reproduces the same rows. Geometry is in units of the image size, so one
phantom looks the same at every resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BODY_PARTS: tuple[str, ...] = ("forearm", "lower_leg", "finger", "hand", "elbow")
ABNORMALITY_KINDS: tuple[str, ...] = ("none", "fracture", "hardware")
MARKER_SIDES: tuple[str, ...] = ("L", "R")


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
  """Distribution of the phantoms: image size, label balance and confounder strengths."""

  image_size: int = 128
  positive_fraction: float = 0.5  # P(label == 1)
  marker_agreement: float = 0.9  # P(marker side == label); 0.5 makes the marker uninformative
  frame_probability: float = 0.0  # P(a bright rectangular frame near the border)
  hardware_fraction: float = 0.5  # among positives, share of hardware (vs fracture)
  noise_std: float = 0.04  # pixel noise, in units of the [0, 1] intensity range

  def __post_init__(self) -> None:
    if self.image_size < 32:  # below this the thinnest bones fall between pixel centres
      raise ValueError(f"image_size must be >= 32, got {self.image_size}")
    for name in ("positive_fraction", "marker_agreement", "frame_probability", "hardware_fraction"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if self.noise_std < 0:
      raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


# ----------------------------------------------------------------------------------------------
# Anatomy: bone layouts in the limb frame (along the limb, across it), in units of image size.


@dataclasses.dataclass(frozen=True)
class _Bone:
  """One bone as a hollow capsule: centre, half shaft length, outer radius, axis angle."""

  along: float
  across: float
  half_length: float
  radius: float
  angle: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Layout:
  """A body part: its bones and the half width of the soft tissue around them."""

  bones: tuple[_Bone, ...]
  tissue_half_width: float


# Gaps between bones exceed what the per-bone jitter (+-10% size, +-0.04 rad) can close.
_LAYOUTS: dict[str, _Layout] = {
  # Radius and ulna: two long parallel shafts converging slightly towards the wrist.
  "forearm": _Layout(
    (_Bone(0.0, -0.085, 0.33, 0.043, 0.03), _Bone(0.0, 0.085, 0.33, 0.038, -0.03)), 0.21
  ),
  # Tibia and fibula: one thick and one thin shaft.
  "lower_leg": _Layout(
    (_Bone(0.0, -0.06, 0.34, 0.068, 0.0), _Bone(0.0, 0.12, 0.33, 0.03, -0.03)), 0.23
  ),
  # Proximal, middle and distal phalanx end to end, separated by joint spaces.
  "finger": _Layout(
    (
      _Bone(-0.23, 0.0, 0.1, 0.05, 0.0),
      _Bone(0.071, 0.0, 0.065, 0.045, 0.04),
      _Bone(0.295, 0.0, 0.04, 0.04, 0.08),
    ),
    0.11,
  ),
  # Three metacarpals fanning out from the carpus.
  "hand": _Layout(
    (
      _Bone(0.0, -0.17, 0.2, 0.04, -0.18),
      _Bone(0.02, 0.0, 0.22, 0.042, 0.0),
      _Bone(0.0, 0.17, 0.2, 0.04, 0.18),
    ),
    0.3,
  ),
  # Humerus above the joint; radius and ulna below it, bent at the elbow.
  "elbow": _Layout(
    (
      _Bone(-0.24, 0.0, 0.16, 0.065, 0.0),
      _Bone(0.25, -0.07, 0.15, 0.04, 0.25),
      _Bone(0.25, 0.06, 0.15, 0.036, 0.25),
    ),
    0.24,
  ),
}
assert tuple(_LAYOUTS) == BODY_PARTS

_MAX_BONES = 3


def _layout_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bone parameters [part, bone, 5], bone presence [part, bone] and tissue half widths [part]."""
  bones = np.zeros((len(BODY_PARTS), _MAX_BONES, 5), np.float64)
  present = np.zeros((len(BODY_PARTS), _MAX_BONES), bool)
  for part, layout in enumerate(_LAYOUTS.values()):
    for slot, bone in enumerate(layout.bones):
      bones[part, slot] = dataclasses.astuple(bone)
      present[part, slot] = True
  tissue = np.array([layout.tissue_half_width for layout in _LAYOUTS.values()])
  return bones, present, tissue


_BONE_TABLE, _BONE_PRESENT, _TISSUE_HALF_WIDTH = _layout_tables()


# ----------------------------------------------------------------------------------------------
# Laterality marker glyphs: 5x5 bitmaps, drawn bright in a top corner.


def _glyph(rows: tuple[str, ...]) -> np.ndarray:
  """A boolean bitmap from rows of '#' and '.'."""
  return np.array([[char == "#" for char in row] for row in rows], bool)


_GLYPHS = np.stack(
  [
    _glyph(("#....", "#....", "#....", "#....", "#####")),  # "L"
    _glyph(("####.", "#...#", "####.", "#..#.", "#...#")),  # "R"
  ]
)
_GLYPH_CELLS = _GLYPHS.shape[1]


# ----------------------------------------------------------------------------------------------
# Per-example random draws: a counter-based hash of (seed, example index, draw number).

_DRAW_NAMES: tuple[str, ...] = (
  "label", "abnormality", "marker_agreement", "frame", "body_part", "lesion_bone",
  "rotation", "offset_x", "offset_y", "scale",
  "background", "gradient_x", "gradient_y", "tissue", "tissue_width", "bone", "medulla",
  "length_0", "length_1", "length_2", "radius_0", "radius_1", "radius_2",
  "angle_0", "angle_1", "angle_2",
  "lesion_position", "lesion_side", "crack_width", "crack_slope", "crack_jag", "crack_phase",
  "plate_length", "plate_width", "screw_count", "hardware_level",
  "marker_size", "marker_margin_x", "marker_margin_y", "marker_level",
  "frame_inset", "frame_thickness", "frame_level",
  "noise_field", "noise_row", "noise_column",
)  # fmt: skip
_NOISE_STREAM = 0x6E6F697365  # keeps the noise-field generator apart from the parameter hash

Draws = dict[str, np.ndarray]


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a bijective, well-mixing hash of uint64 words."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniform_draws(seed: int, indices: np.ndarray) -> Draws:
  """Uniform [0, 1) draws per example, each a function of (seed, example index, draw name) only."""
  stream_key, step_key = np.random.SeedSequence(seed).generate_state(2, np.uint64)
  streams = _splitmix64(indices.astype(np.uint64) ^ stream_key)
  steps = (np.arange(len(_DRAW_NAMES), dtype=np.uint64) + np.uint64(1)) * (step_key | np.uint64(1))
  bits = _splitmix64(_splitmix64(streams[:, None] + steps[None, :]))
  uniforms = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
  return dict(zip(_DRAW_NAMES, uniforms.T, strict=True))


def _between(draw: np.ndarray, low: float, high: float) -> np.ndarray:
  """Uniform [0, 1) draws mapped linearly onto [low, high)."""
  return low + (high - low) * draw


def _pick(draw: np.ndarray, count: int) -> np.ndarray:
  """Uniform [0, 1) draws mapped onto integers 0 .. count-1."""
  return np.minimum((draw * count).astype(np.int64), count - 1)


def _example_attributes(draws: Draws, config: PhantomConfig) -> dict[str, np.ndarray]:
  """Label, abnormality kind, body part, marker side and frame flag of every example."""
  label = (draws["label"] < config.positive_fraction).astype(np.int64)
  is_hardware = draws["abnormality"] < config.hardware_fraction
  marker_agrees = draws["marker_agreement"] < config.marker_agreement
  return {
    "label": label,
    "abnormality": np.where(label == 1, np.where(is_hardware, 2, 1), 0).astype(np.int64),
    "body_part": _pick(draws["body_part"], len(BODY_PARTS)),
    "marker_side": np.where(marker_agrees, label, 1 - label).astype(np.int64),
    "has_frame": draws["frame"] < config.frame_probability,
  }


# ----------------------------------------------------------------------------------------------
# Placement of the limb and its bones in image coordinates (x right, y down, both in [-0.5, 0.5]).


@dataclasses.dataclass(frozen=True)
class _Placement:
  """Per-example limb pose [n] and bone poses [n, bone]; bone slot 0 carries any lesion."""

  centre_x: np.ndarray
  centre_y: np.ndarray
  cos: np.ndarray
  sin: np.ndarray
  half_length: np.ndarray
  radius: np.ndarray
  present: np.ndarray
  limb_x: np.ndarray
  limb_y: np.ndarray
  limb_cos: np.ndarray
  limb_sin: np.ndarray
  limb_half_length: np.ndarray
  limb_half_width: np.ndarray


def _lesion_bone_first(num_present: np.ndarray, lesion_draw: np.ndarray) -> np.ndarray:
  """Per-example slot permutation [n, bone] that swaps a random present bone into slot 0."""
  lesion_bone = np.minimum((lesion_draw * num_present).astype(np.int64), num_present - 1)[:, None]
  slots = np.arange(_MAX_BONES)[None, :]
  return np.where(slots == 0, lesion_bone, np.where(slots == lesion_bone, 0, slots))


def _place_limb(draws: Draws, body_part: np.ndarray) -> _Placement:
  """Poses the body part's bones with a random rotation, offset, scale and per-bone jitter."""
  present = _BONE_PRESENT[body_part]
  order = _lesion_bone_first(present.sum(axis=1), draws["lesion_bone"])
  present = np.take_along_axis(present, order, axis=1)
  bones = np.take_along_axis(_BONE_TABLE[body_part], order[:, :, None], axis=1)
  along, across, half_length, radius, angle = np.moveaxis(bones, -1, 0)
  per_bone = lambda name: np.take_along_axis(  # noqa: E731
    np.stack([draws[f"{name}_{slot}"] for slot in range(_MAX_BONES)], axis=1), order, axis=1
  )
  half_length = half_length * _between(per_bone("length"), 0.9, 1.1)
  radius = radius * _between(per_bone("radius"), 0.9, 1.1)
  angle = angle + _between(per_bone("angle"), -0.04, 0.04)

  rotation = _between(draws["rotation"], 0.0, 2 * np.pi)[:, None]
  scale = _between(draws["scale"], 0.85, 1.05)[:, None]
  offset_x = _between(draws["offset_x"], -0.05, 0.05)[:, None]
  offset_y = _between(draws["offset_y"], -0.05, 0.05)[:, None]
  cos_rotation, sin_rotation = np.cos(rotation), np.sin(rotation)
  tissue_half_width = _TISSUE_HALF_WIDTH[body_part] * _between(draws["tissue_width"], 0.9, 1.15)
  return _Placement(
    centre_x=offset_x + scale * (along * cos_rotation - across * sin_rotation),
    centre_y=offset_y + scale * (along * sin_rotation + across * cos_rotation),
    cos=np.cos(rotation + angle),
    sin=np.sin(rotation + angle),
    half_length=scale * half_length,
    radius=scale * radius,
    present=present,
    limb_x=offset_x[:, 0],
    limb_y=offset_y[:, 0],
    limb_cos=cos_rotation[:, 0],
    limb_sin=sin_rotation[:, 0],
    limb_half_length=0.75 * scale[:, 0],
    limb_half_width=scale[:, 0] * tissue_half_width,
  )


# ----------------------------------------------------------------------------------------------
# Rendering, in float32 grey levels. Whole-image work is a handful of broadcast operations;
# bones are evaluated only on the pixels of a rectangle around each bone (see `_bone_pixels`).

_GREY_LEVELS = 255.0


def _grey(level: np.ndarray) -> np.ndarray:
  """Absolute intensity in [0, 1] as a grey level, offset by half a step so truncation rounds."""
  return level * _GREY_LEVELS + 0.5


def _column(values: np.ndarray) -> np.ndarray:
  """Per-example values [n] as float32 [n, 1, 1], to broadcast over images."""
  return values.astype(np.float32)[:, None, None]


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> np.ndarray:
  """Pixel-centre coordinates [S] in units of image size, centred on the image."""
  return ((np.arange(image_size) + 0.5) / image_size - 0.5).astype(np.float32)


def _film_and_soft_tissue(image_size: int, placement: _Placement, draws: Draws) -> np.ndarray:
  """Film with an exposure gradient plus the projected thickness of an ellipsoidal limb."""
  x, y = _pixel_centres(image_size)[None, None, :], _pixel_centres(image_size)[None, :, None]
  dx, dy = x - _column(placement.limb_x), y - _column(placement.limb_y)
  # tissue**2 * (1 - (along/a)**2 - (across/b)**2) as a quadratic form in (dx, dy).
  tissue = _between(draws["tissue"], 0.13, 0.2) * _GREY_LEVELS
  cos, sin = placement.limb_cos, placement.limb_sin
  along_weight = (tissue / placement.limb_half_length) ** 2
  across_weight = (tissue / placement.limb_half_width) ** 2
  xx = cos**2 * along_weight + sin**2 * across_weight
  yy = sin**2 * along_weight + cos**2 * across_weight
  xy = 2 * cos * sin * (along_weight - across_weight)
  image = (_column(xy) * dy) * dx
  image += _column(xx) * np.square(dx)
  np.subtract(_column(tissue**2) - _column(yy) * np.square(dy), image, out=image)
  np.maximum(image, 0.0, out=image)
  np.sqrt(image, out=image)

  gradient_x = _column(_between(draws["gradient_x"], -0.04, 0.04) * _GREY_LEVELS)
  gradient_y = _column(_between(draws["gradient_y"], -0.04, 0.04) * _GREY_LEVELS)
  image += gradient_x * x
  image += gradient_y * y + _column(_grey(_between(draws["background"], 0.05, 0.09)))
  return image


_BONE_REACH = 1.15  # half width of the evaluated rectangle, in bone radii: covers bone and hardware


@dataclasses.dataclass(frozen=True)
class _BonePixels:
  """Pixels around one bone: flat index into the chunk's images, example, bone-frame coordinates."""

  flat_index: np.ndarray
  example: np.ndarray
  along: np.ndarray
  across: np.ndarray


def _columns_within(
  offset: np.ndarray, slope: np.ndarray, reach: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per image row, the column range [first, stop) where |offset + slope * x| < reach."""
  safe_slope = np.where(np.abs(slope) < 1e-9, 1e-9, slope)  # slope 0: all columns or none
  bound_a, bound_b = (-reach - offset) / safe_slope, (reach - offset) / safe_slope
  to_column = lambda x: (x + 0.5) * image_size - 0.5  # noqa: E731  (inverse of _pixel_centres)
  first = np.clip(np.ceil(to_column(np.minimum(bound_a, bound_b))), 0, image_size)
  stop = np.clip(np.floor(to_column(np.maximum(bound_a, bound_b))) + 1, 0, image_size)
  return first.astype(np.int64), stop.astype(np.int64)


def _row_runs(
  first: np.ndarray, counts: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices of the pixels in runs [first, first + count) on image rows, and their rows."""
  row = np.repeat(np.arange(counts.size), counts)
  run_offset = np.arange(counts.size) * image_size + first - (np.cumsum(counts) - counts)
  return np.arange(counts.sum()) + np.repeat(run_offset, counts), row


def _bone_pixels(image_size: int, placement: _Placement, slot: int) -> _BonePixels:
  """The pixels with |along| < half length + reach and |across| < reach around bone `slot`."""
  y = _pixel_centres(image_size).astype(np.float64)
  cos, sin = placement.cos[:, slot, None], placement.sin[:, slot, None]
  centre_x, centre_y = placement.centre_x[:, slot, None], placement.centre_y[:, slot, None]
  reach = _BONE_REACH * placement.radius[:, slot, None]
  # On image row y the bone-frame coordinates are linear in x:
  # along = row_along + cos * x and across = row_across - sin * x.
  row_along = (y - centre_y) * sin - centre_x * cos
  row_across = (y - centre_y) * cos + centre_x * sin
  first_across, stop_across = _columns_within(row_across, -sin, reach, image_size)
  first_along, stop_along = _columns_within(
    row_along, cos, placement.half_length[:, slot, None] + reach, image_size
  )
  first = np.maximum(first_across, first_along)
  stop = np.where(placement.present[:, slot, None], np.minimum(stop_across, stop_along), 0)

  flat_index, row = _row_runs(first.ravel(), np.maximum(stop - first, 0).ravel(), image_size)
  example = row // image_size
  x = _pixel_centres(image_size)[flat_index % image_size]
  along = row_along.astype(np.float32).ravel()[row] + cos[:, 0].astype(np.float32)[example] * x
  across = row_across.astype(np.float32).ravel()[row] - sin[:, 0].astype(np.float32)[example] * x
  return _BonePixels(flat_index, example, along, across)


def _tube_profile(
  along: np.ndarray,
  across: np.ndarray,
  half_length: np.ndarray,
  radius: np.ndarray,
  medulla: np.ndarray,
  brightness: np.ndarray,
) -> np.ndarray:
  """X-ray path length through a hollow capsule: `brightness` at the inner cortex, 0 outside."""
  shaft_excess = np.maximum(np.abs(along) - half_length, 0.0)
  distance_squared = np.square(shaft_excess) + np.square(across)
  outer_squared, inner_squared = np.square(radius), np.square(medulla * radius)
  outer_chord = np.sqrt(np.maximum(outer_squared - distance_squared, 0.0))
  inner_chord = np.sqrt(np.maximum(inner_squared - distance_squared, 0.0))
  return (outer_chord - inner_chord) * (brightness / np.sqrt(outer_squared - inner_squared))


def _bone_profile(
  pixels: _BonePixels, placement: _Placement, slot: int, medulla: np.ndarray, brightness: np.ndarray
) -> np.ndarray:
  """Grey-level contribution of bone `slot` at its pixels."""
  at_pixels = lambda values: values.astype(np.float32)[pixels.example]  # noqa: E731
  return _tube_profile(
    pixels.along,
    pixels.across,
    at_pixels(placement.half_length[:, slot]),
    at_pixels(placement.radius[:, slot]),
    at_pixels(medulla),
    at_pixels(brightness),
  )


def _triangle_wave(phase: np.ndarray) -> np.ndarray:
  """Zig-zag of period 1 and amplitude 0.5."""
  return np.abs(phase - np.round(phase)) * 2.0 - 0.5


def _crack_parameters(
  draws: Draws, placement: _Placement, image_size: int
) -> dict[str, np.ndarray]:
  """Per-example shape of a fracture crack across bone slot 0."""
  width = np.maximum(_between(draws["crack_width"], 0.026, 0.038), 1.6 / image_size)
  return {
    "position": _between(draws["lesion_position"], -0.55, 0.55) * placement.half_length[:, 0],
    "slope": _between(draws["crack_slope"], -0.6, 0.6),
    "half_width": width / 2,
    "jag_amplitude": np.minimum(
      _between(draws["crack_jag"], 0.2, 0.8) * width, 0.4 * placement.radius[:, 0]
    ),
    "jag_frequency": 1.0 / (0.8 * placement.radius[:, 0]),
    "jag_phase": draws["crack_phase"],
  }


def _crack_centre_pixel(
  placement: _Placement, crack: dict[str, np.ndarray], image_size: int
) -> np.ndarray:
  """Flat index of the pixel containing each crack's centre on the bone axis."""
  x = placement.centre_x[:, 0] + crack["position"] * placement.cos[:, 0]
  y = placement.centre_y[:, 0] + crack["position"] * placement.sin[:, 0]
  column, row = (
    np.clip(np.floor((coordinate + 0.5) * image_size), 0, image_size - 1).astype(np.int64)
    for coordinate in (x, y)
  )
  return (np.arange(len(x)) * image_size + row) * image_size + column


def _in_crack(along: np.ndarray, across: np.ndarray, crack: dict[str, np.ndarray]) -> np.ndarray:
  """Whether points lie in a jagged, oblique band across the bone axis."""
  zigzag = _triangle_wave(across * crack["jag_frequency"] + crack["jag_phase"])
  offset = along - crack["position"] - across * crack["slope"] - zigzag * crack["jag_amplitude"]
  return np.abs(offset) < crack["half_width"]


def _hardware_parameters(
  draws: Draws, placement: _Placement, image_size: int
) -> dict[str, np.ndarray]:
  """Per-example shape of a plate held by 2-4 screws on bone slot 0."""
  radius, half_length = placement.radius[:, 0], placement.half_length[:, 0]
  pixel = 1.0 / image_size
  plate_length = np.maximum(_between(draws["plate_length"], 0.6, 1.0) * half_length, 2.0 * pixel)
  plate_width = np.maximum(_between(draws["plate_width"], 0.45, 0.65) * radius, 2.0 * pixel)
  return {
    "position": _between(draws["lesion_position"], -0.45, 0.45) * half_length,
    "half_length": plate_length / 2,
    "side": np.where(draws["lesion_side"] < 0.5, -1.0, 1.0) * (radius - 0.3 * plate_width),
    "half_width": plate_width / 2,
    "screw_spacing": plate_length / (2 + np.floor(3 * draws["screw_count"])),
    "screw_half_width": np.maximum(0.4 * plate_width, 1.5 * pixel) / 2,
    "screw_reach": 1.1 * radius,
  }


def _on_hardware(
  along: np.ndarray, across: np.ndarray, hardware: dict[str, np.ndarray]
) -> np.ndarray:
  """Whether points lie on a plate along the bone or on the screws through it."""
  from_position = along - hardware["position"]
  plate = np.abs(across - hardware["side"]) < hardware["half_width"]
  screw_phase = (
    np.mod(from_position + hardware["half_length"], hardware["screw_spacing"])
    - hardware["screw_spacing"] / 2
  )
  screws = (np.abs(screw_phase) < hardware["screw_half_width"]) & (
    np.abs(across) < hardware["screw_reach"]
  )
  return (np.abs(from_position) < hardware["half_length"]) & (plate | screws)


def _lesion_pixels(
  pixels: _BonePixels,
  of_examples: np.ndarray,
  parameters: dict[str, np.ndarray],
  in_lesion: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], np.ndarray],
) -> np.ndarray:
  """Which bone pixels of the examples flagged in `of_examples` lie inside their lesion."""
  selected = np.flatnonzero(of_examples[pixels.example])
  example = pixels.example[selected]
  at_pixels = {name: values.astype(np.float32)[example] for name, values in parameters.items()}
  lesion = np.zeros(len(pixels.example), bool)
  lesion[selected] = in_lesion(pixels.along[selected], pixels.across[selected], at_pixels)
  return lesion


@functools.lru_cache(maxsize=8)
def _border_distance(image_size: int) -> np.ndarray:
  """Distance in pixels [S, S] from each pixel to the nearest image border."""
  to_edge = np.minimum(np.arange(image_size), image_size - 1 - np.arange(image_size))
  return np.minimum.outer(to_edge, to_edge)


def _frame_ring(draws: Draws, image_size: int) -> np.ndarray:
  """Boolean [n, S, S] rectangle 1-3 px thick (at 128 px) a few pixels inside the border."""
  inset = np.maximum(np.round(_between(draws["frame_inset"], 0.015, 0.045) * image_size), 1)
  thickness = np.maximum(
    np.round(_between(draws["frame_thickness"], 0.6, 3.4) * image_size / 128), 1
  )
  distance = _border_distance(image_size)[None]
  return (distance >= inset[:, None, None]) & (distance < (inset + thickness)[:, None, None])


def _marker_pixels(
  marker_side: np.ndarray, draws: Draws, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(example, row, column) of the glyph pixels: "L" in the top-left or "R" in the top-right."""
  glyph_size = np.round(_between(draws["marker_size"], 0.08, 0.12) * image_size)
  glyph_size = np.maximum(glyph_size, _GLYPH_CELLS).astype(np.int64)
  margin_x = np.round(_between(draws["marker_margin_x"], 0.03, 0.07) * image_size).astype(np.int64)
  top = np.round(_between(draws["marker_margin_y"], 0.03, 0.07) * image_size).astype(np.int64)
  left = np.where(marker_side == 0, margin_x, image_size - margin_x - glyph_size)
  box = np.arange(int(glyph_size.max(initial=_GLYPH_CELLS)))
  cell = (box[None, :] * _GLYPH_CELLS) // glyph_size[:, None]  # [n, box]; too large past the glyph
  inside = cell < _GLYPH_CELLS
  cell = np.minimum(cell, _GLYPH_CELLS - 1)
  glyph = _GLYPHS[marker_side[:, None, None], cell[:, :, None], cell[:, None, :]]
  glyph &= inside[:, :, None] & inside[:, None, :]
  example, row, column = np.nonzero(glyph)
  return example, top[example] + row, left[example] + column


@functools.lru_cache(maxsize=4)
def _noise_windows(
  seed: int, image_size: int, noise_std: float, num_fields: int = 32
) -> np.ndarray:
  """Read-only view [field, row, column, S, S] of all S x S windows of periodic noise fields."""
  fields = np.random.default_rng([seed, _NOISE_STREAM]).standard_normal(
    (num_fields, image_size, image_size), np.float32
  )
  fields *= np.float32(noise_std * _GREY_LEVELS)
  periodic = np.tile(fields, (1, 2, 2))[:, :-1, :-1]
  return np.lib.stride_tricks.sliding_window_view(periodic, (image_size, image_size), axis=(1, 2))


def _pixel_noise(windows: np.ndarray, draws: Draws) -> np.ndarray:
  """Gaussian noise [n, S, S]: a per-example cyclic shift of one of the seed's noise fields."""
  num_fields, image_size = windows.shape[0], windows.shape[-1]
  return windows[
    _pick(draws["noise_field"], num_fields),
    _pick(draws["noise_row"], image_size),
    _pick(draws["noise_column"], image_size),
  ]


def _render_chunk(
  draws: Draws, attributes: dict[str, np.ndarray], config: PhantomConfig, seed: int
) -> dict[str, np.ndarray]:
  """Image (uint8), lesion mask and marker mask (bool), all [n, S, S], for a chunk of examples."""
  size = config.image_size
  placement = _place_limb(draws, attributes["body_part"])
  medulla = _between(draws["medulla"], 0.45, 0.6)
  brightness = _between(draws["bone"], 0.36, 0.5) * _GREY_LEVELS
  abnormality = attributes["abnormality"]

  image = _film_and_soft_tissue(size, placement, draws)
  lesion = np.zeros(image.shape, bool)
  flat_image, flat_lesion = image.reshape(-1), lesion.reshape(-1)

  lesion_bone = _bone_pixels(size, placement, 0)
  lesion_bone_profile = _bone_profile(lesion_bone, placement, 0, medulla, brightness)
  crack_parameters = _crack_parameters(draws, placement, size)
  crack = _lesion_pixels(lesion_bone, abnormality == 1, crack_parameters, _in_crack)
  # The pixel at the crack's centre always cracks, so thin cracks on small images never vanish.
  crack_centres = _crack_centre_pixel(placement, crack_parameters, size)[abnormality == 1]
  crack |= np.isin(lesion_bone.flat_index, crack_centres)
  crack &= lesion_bone_profile > 0
  hardware_parameters = _hardware_parameters(draws, placement, size)
  hardware = _lesion_pixels(lesion_bone, abnormality == 2, hardware_parameters, _on_hardware)
  lesion_bone_profile[crack] = 0.0  # the crack removes the bone down to soft tissue
  flat_image[lesion_bone.flat_index] += lesion_bone_profile
  for slot in range(1, _MAX_BONES):
    bone = _bone_pixels(size, placement, slot)
    flat_image[bone.flat_index] += _bone_profile(bone, placement, slot, medulla, brightness)
  metal = _grey(_between(draws["hardware_level"], 0.97, 1.03))
  flat_image[lesion_bone.flat_index[hardware]] = metal[lesion_bone.example[hardware]]
  flat_lesion[lesion_bone.flat_index[crack | hardware]] = True

  # Frame and marker are drawn under the lesion, which (rarely, on small images) reaches a corner.
  framed = np.flatnonzero(attributes["has_frame"])
  if framed.size:
    framed_draws = {name: values[framed] for name, values in draws.items()}
    ring = _frame_ring(framed_draws, size) & ~lesion[framed]
    frame_level = _column(_grey(_between(framed_draws["frame_level"], 0.9, 1.0)))
    image[framed] = np.where(ring, frame_level, image[framed])

  example, row, column = _marker_pixels(attributes["marker_side"], draws, size)
  uncovered = ~lesion[example, row, column]
  example, row, column = example[uncovered], row[uncovered], column[uncovered]
  marker = np.zeros(image.shape, bool)
  marker[example, row, column] = True
  image[example, row, column] = _grey(_between(draws["marker_level"][example], 0.92, 1.02))

  if config.noise_std > 0:
    image += _pixel_noise(_noise_windows(seed, size, config.noise_std), draws)
  np.clip(image, 0.0, _GREY_LEVELS, out=image)
  return {"image": image.astype(np.uint8), "lesion_mask": lesion, "marker_mask": marker}


# ----------------------------------------------------------------------------------------------
# Public entry point.

# Pixels rendered at a time: 2 MiB float32 temporaries, cache-friendly and below the 4 MiB at
# which numpy asks for (here slow to fault in) transparent huge pages.
_PIXELS_PER_CHUNK = 2**19


def _worker_count() -> int:
  """Rendering threads: the CPU cores available to this process, at most 8."""
  if hasattr(os, "sched_getaffinity"):
    return max(1, min(len(os.sched_getaffinity(0)), 8))
  return max(1, min(os.cpu_count() or 1, 8))


def _map_chunks(render: Callable[[slice], None], num_examples: int, chunk_size: int) -> None:
  """Calls `render` on consecutive chunks of examples, in threads (numpy releases the GIL)."""
  chunks = [
    slice(start, min(start + chunk_size, num_examples))
    for start in range(0, num_examples, chunk_size)
  ]
  workers = min(_worker_count(), len(chunks))
  if workers <= 1:
    for chunk in chunks:
      render(chunk)
    return
  with ThreadPoolExecutor(max_workers=workers) as pool:
    list(pool.map(render, chunks))


def _zeros_uint8(shape: tuple[int, ...]) -> np.ndarray:
  """A zero-filled, writable uint8 array."""
  # Plain heap memory: numpy requests transparent huge pages for large arrays, and on some
  # virtual machines their first-touch compaction costs more than rendering the images.
  return np.frombuffer(bytearray(math.prod(shape)), np.uint8).reshape(shape)


def generate_phantoms(
  num_examples: int, *, seed: int, config: PhantomConfig = PhantomConfig(), start_index: int = 0
) -> dict[str, np.ndarray]:
  """Returns a dict of arrays for examples start_index .. start_index+num_examples-1."""
  if num_examples < 0 or start_index < 0 or seed < 0:
    raise ValueError("num_examples, start_index and seed must be non-negative")
  size = config.image_size
  indices = np.arange(start_index, start_index + num_examples, dtype=np.int64)
  draws = _uniform_draws(seed, indices)
  attributes = _example_attributes(draws, config)
  outputs = {
    key: _zeros_uint8((num_examples, size, size, 1))
    for key in ("image", "lesion_mask", "marker_mask")
  }
  if config.noise_std > 0:
    _noise_windows(seed, size, config.noise_std)  # fill the cache before threads share it

  def render(chunk: slice) -> None:
    rendered = _render_chunk(
      {name: values[chunk] for name, values in draws.items()},
      {name: values[chunk] for name, values in attributes.items()},
      config,
      seed,
    )
    outputs["image"][chunk, :, :, 0] = rendered["image"]
    for key in ("lesion_mask", "marker_mask"):
      outputs[key][chunk].reshape(-1)[np.flatnonzero(rendered[key])] = 1

  _map_chunks(render, num_examples, chunk_size=max(1, _PIXELS_PER_CHUNK // (size * size)))
  return {
    **outputs,
    "label": attributes["label"],
    "abnormality": attributes["abnormality"],
    "body_part": attributes["body_part"],
    "marker_side": attributes["marker_side"],
    "marker_agrees": attributes["marker_side"] == attributes["label"],
    "has_frame": attributes["has_frame"],
    "index": indices,
  }
