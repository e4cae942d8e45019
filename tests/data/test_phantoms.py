"""Tests of the synthetic radiograph phantoms and their TFDS builder."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest

from medxai_jax.data.builders.phantoms import (
  PhantomsBuilderConfig,
  RadiographPhantoms,
  load_phantoms_builder,
  make_builder_config,
  split_phantom_config,
  split_start_indices,
)
from medxai_jax.data.phantoms import ABNORMALITY_KINDS, BODY_PARTS, PhantomConfig, generate_phantoms

SIZE = 64
CONFIG = PhantomConfig(image_size=SIZE)
ARRAY_KEYS = (
  "image", "lesion_mask", "marker_mask", "label", "abnormality", "body_part",
  "marker_side", "marker_agrees", "has_frame", "index",
)  # fmt: skip


@pytest.fixture(scope="module")
def phantoms() -> dict[str, np.ndarray]:
  """A batch of 64 px phantoms shared by the read-only tests."""
  return generate_phantoms(160, seed=11, config=CONFIG)


@pytest.fixture(scope="module")
def paired_phantoms() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The same 80 examples rendered all abnormal and all normal: only lesion and marker differ."""
  abnormal = generate_phantoms(
    80, seed=5, config=dataclasses.replace(CONFIG, positive_fraction=1.0)
  )
  normal = generate_phantoms(80, seed=5, config=dataclasses.replace(CONFIG, positive_fraction=0.0))
  return abnormal, normal


def _assert_same_arrays(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
  """Asserts two phantom dicts hold identical arrays."""
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_arrays_have_documented_shapes_and_dtypes(phantoms):
  num = len(phantoms["label"])
  assert set(phantoms) == set(ARRAY_KEYS)
  for key in ("image", "lesion_mask", "marker_mask"):
    assert phantoms[key].shape == (num, SIZE, SIZE, 1) and phantoms[key].dtype == np.uint8, key
  for key in ("label", "abnormality", "body_part", "marker_side", "index"):
    assert phantoms[key].shape == (num,) and phantoms[key].dtype == np.int64, key
  for key in ("marker_agrees", "has_frame"):
    assert phantoms[key].shape == (num,) and phantoms[key].dtype == np.bool_, key
  assert set(np.unique(phantoms["lesion_mask"])) <= {0, 1}
  assert set(np.unique(phantoms["marker_mask"])) == {0, 1}
  np.testing.assert_array_equal(phantoms["index"], np.arange(num))


def test_same_seed_reproduces_and_other_seed_changes_images():
  first = generate_phantoms(12, seed=3, config=CONFIG)
  _assert_same_arrays(first, generate_phantoms(12, seed=3, config=CONFIG))
  other = generate_phantoms(12, seed=4, config=CONFIG)
  differing = [
    not np.array_equal(a, b) for a, b in zip(first["image"], other["image"], strict=True)
  ]
  assert all(differing)


def test_examples_do_not_depend_on_batch_size_or_start_index():
  full = generate_phantoms(20, seed=9, config=CONFIG)
  middle = generate_phantoms(10, seed=9, config=CONFIG, start_index=5)
  _assert_same_arrays({key: value[5:15] for key, value in full.items()}, middle)
  halves = [generate_phantoms(10, seed=9, config=CONFIG, start_index=start) for start in (0, 10)]
  _assert_same_arrays(full, {key: np.concatenate([half[key] for half in halves]) for key in full})


def test_lesion_mask_and_abnormality_follow_label(phantoms):
  has_lesion = phantoms["lesion_mask"].reshape(len(phantoms["label"]), -1).any(axis=1)
  np.testing.assert_array_equal(has_lesion, phantoms["label"] == 1)
  np.testing.assert_array_equal(phantoms["abnormality"] == 0, phantoms["label"] == 0)
  assert set(phantoms["abnormality"][phantoms["label"] == 1]) == {1, 2}
  assert not (phantoms["lesion_mask"] & phantoms["marker_mask"]).any()


def test_lesion_changes_exactly_the_masked_pixels(paired_phantoms):
  abnormal, normal = paired_phantoms
  assert (abnormal["label"] == 1).all() and (normal["label"] == 0).all()
  untouched = (abnormal["lesion_mask"] | abnormal["marker_mask"] | normal["marker_mask"]) == 0
  np.testing.assert_array_equal(abnormal["image"][untouched], normal["image"][untouched])
  for example in range(len(abnormal["label"])):
    lesion = abnormal["lesion_mask"][example] == 1
    change = abnormal["image"][example][lesion].astype(float) - normal["image"][example][lesion]
    if abnormal["abnormality"][example] == 1:  # the crack removes bone: every pixel darker
      assert (change < 0).mean() > 0.9 and change.mean() < -20, example
    else:  # hardware is brighter than the bone and tissue it covers
      assert (change > 0).mean() > 0.9 and change.mean() > 20, example


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of a [H, W] mask by a square of the given radius."""
  padded = np.pad(mask, radius)
  height, width = mask.shape
  shifts = [
    padded[dy : dy + height, dx : dx + width]
    for dy in range(2 * radius + 1)
    for dx in range(2 * radius + 1)
  ]
  return np.logical_or.reduce(shifts)


def test_fracture_crack_is_darker_than_surrounding_bone(phantoms):
  fractures = np.flatnonzero(phantoms["abnormality"] == 1)
  assert fractures.size >= 10
  for example in fractures:
    image = phantoms["image"][example, ..., 0].astype(float)
    crack = phantoms["lesion_mask"][example, ..., 0] == 1
    neighbourhood = (
      _dilate(crack, 2) & ~crack
    )  # bone on both sides of the crack, tissue at its ends
    assert image[crack].mean() < np.percentile(image[neighbourhood], 75) - 15, example


def test_hardware_is_among_the_brightest_pixels(phantoms):
  hardware = np.flatnonzero(phantoms["abnormality"] == 2)
  assert hardware.size >= 10
  for example in hardware:
    image = phantoms["image"][example, ..., 0].astype(float)
    metal = phantoms["lesion_mask"][example, ..., 0] == 1
    rest = ~metal & (phantoms["marker_mask"][example, ..., 0] == 0)
    assert image[metal].mean() > 235 and image[metal].mean() > np.percentile(image[rest], 99.5), (
      example
    )


def test_marker_is_bright_and_in_the_top_corner_of_its_side(phantoms):
  half = SIZE // 2
  for example, side in enumerate(phantoms["marker_side"]):
    marker = phantoms["marker_mask"][example, ..., 0] == 1
    rows, columns = np.nonzero(marker)
    assert rows.size >= 9
    assert rows.max() < half
    assert (columns.max() < half) if side == 0 else (columns.min() >= half)
    assert phantoms["image"][example, ..., 0][marker].mean() > 200


def test_marker_glyphs_differ_between_sides(phantoms):
  def glyph(example: int) -> np.ndarray:
    rows, columns = np.nonzero(phantoms["marker_mask"][example, ..., 0])
    return phantoms["marker_mask"][
      example, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1, 0
    ]

  left, right = (np.flatnonzero(phantoms["marker_side"] == side)[0] for side in (0, 1))
  assert glyph(left).shape != glyph(right).shape or not np.array_equal(glyph(left), glyph(right))


@pytest.mark.parametrize("agreement", [0.9, 0.5])
def test_marker_agreement_rate_matches_config(agreement):
  small = generate_phantoms(
    2000, seed=1, config=PhantomConfig(image_size=32, marker_agreement=agreement)
  )
  np.testing.assert_array_equal(small["marker_agrees"], small["marker_side"] == small["label"])
  assert abs(small["marker_agrees"].mean() - agreement) < 0.03
  assert abs(small["label"].mean() - 0.5) < 0.04


def _bright_border_row_fraction(images: np.ndarray, band: int) -> np.ndarray:
  """Per image, the largest bright fraction of any line within `band` px of the sides or bottom."""
  bright = images[..., 0] >= 215
  lines = [
    bright[:, -band:, :],
    np.swapaxes(bright[:, :, :band], 1, 2),
    np.swapaxes(bright[:, :, -band:], 1, 2),
  ]
  return np.max([line.mean(axis=2).max(axis=1) for line in lines], axis=0)


def test_frame_probability_controls_a_bright_border_ring():
  framed = generate_phantoms(40, seed=2, config=dataclasses.replace(CONFIG, frame_probability=1.0))
  plain = generate_phantoms(40, seed=2, config=CONFIG)
  assert framed["has_frame"].all() and not plain["has_frame"].any()
  assert (_bright_border_row_fraction(framed["image"], band=6) > 0.6).all()
  assert (_bright_border_row_fraction(plain["image"], band=6) < 0.5).all()


def test_body_parts_and_abnormality_kinds_are_all_used(phantoms):
  assert len(BODY_PARTS) >= 4 and ABNORMALITY_KINDS == ("none", "fracture", "hardware")
  np.testing.assert_array_equal(np.unique(phantoms["body_part"]), np.arange(len(BODY_PARTS)))
  np.testing.assert_array_equal(
    np.unique(phantoms["abnormality"]), np.arange(len(ABNORMALITY_KINDS))
  )


def test_invalid_configs_are_rejected():
  with pytest.raises(ValueError):
    PhantomConfig(marker_agreement=1.5)
  with pytest.raises(ValueError):
    PhantomConfig(image_size=8)
  with pytest.raises(ValueError):
    generate_phantoms(4, seed=-1)


def test_make_builder_config_names_identify_settings():
  small = make_builder_config(image_size=32, num_train=12)
  assert small.name == make_builder_config(num_train=12, image_size=32).name
  assert small.name != make_builder_config(image_size=32, num_train=13).name
  assert (
    small.name != make_builder_config(image_size=32, num_train=12, test_marker_agreement=0.6).name
  )
  assert make_builder_config(noise_std=0.02).name != make_builder_config(noise_std=0.03).name
  assert make_builder_config().name == "default" == make_builder_config(image_size=128).name
  assert isinstance(small, PhantomsBuilderConfig) and (small.image_size, small.num_train) == (
    32,
    12,
  )
  assert "." not in make_builder_config(positive_fraction=0.25).name
  assert (
    make_builder_config(positive_fraction=1).name == make_builder_config(positive_fraction=1.0).name
  )
  assert (
    make_builder_config(noise_std=0.1234567).name != make_builder_config(noise_std=0.1234568).name
  )
  with pytest.raises(TypeError):
    make_builder_config(colour="red")


@pytest.fixture
def no_network(monkeypatch):
  """Makes any attempt to open a network connection fail."""

  def refuse(*args, **kwargs):
    raise OSError("network access attempted during an offline test")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def test_builder_prepares_offline_and_matches_the_generator(tmp_path, no_network):
  fields = dict(
    image_size=32, num_train=12, num_validation=4, num_test=6, seed=3, frame_probability=0.5
  )
  builder = load_phantoms_builder(str(tmp_path), **fields)
  assert isinstance(builder, RadiographPhantoms) and builder.name == "radiograph_phantoms"
  config = builder.builder_config
  starts = split_start_indices(config)
  assert starts == {"train": 0, "validation": 12, "test": 16}
  assert split_phantom_config(config, "test").marker_agreement == 0.5
  for split, size in (("train", 12), ("validation", 4), ("test", 6)):
    source = builder.as_data_source(split=split)
    assert len(source) == size
    expected = generate_phantoms(
      size, seed=3, config=split_phantom_config(config, split), start_index=starts[split]
    )
    records = source.__getitems__(list(range(size)))
    for row, record in enumerate(records):
      assert record["image"].shape == (32, 32, 1) and record["image"].dtype == np.uint8
      for key in ARRAY_KEYS:
        np.testing.assert_array_equal(
          record[key], expected[key][row], err_msg=f"{split}[{row}].{key}"
        )
    assert set(source[0]) == set(ARRAY_KEYS)
  reloaded = load_phantoms_builder(str(tmp_path), **fields)  # reuses the prepared files
  assert reloaded.data_dir == builder.data_dir
