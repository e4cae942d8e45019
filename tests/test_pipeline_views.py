"""Record filters and label-shuffled views of random-access sources (data/pipeline.py)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest

from medxai_jax.data import pipeline


class ListSource:
  """An in-memory random-access source."""

  def __init__(self, records: list[dict[str, Any]]):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self.records[i] for i in indices]


class FakeClassLabel:
  def __init__(self, names):
    self.names = names


def _records(count: int = 50) -> list[dict[str, Any]]:
  rng = np.random.default_rng(0)
  return [{"image": np.full((2, 2, 1), i, np.uint8), "label": int(rng.integers(0, 3)),
           "body_part": i % 5, "study": f"s{i % 7}".encode()} for i in range(count)]


def test_parse_filter_and_errors():
  assert pipeline.parse_filter("body_part=hand, elbow; label=1") == {
      "body_part": ("hand", "elbow"), "label": ("1",)}
  assert pipeline.parse_filter("") == {}
  with pytest.raises(ValueError, match="'body_part'"):
    pipeline.parse_filter("body_part")
  with pytest.raises(ValueError, match="not a class of feature 'body_part'"):
    pipeline.resolve_filter_values({"body_part": ("knee",)},
                                   {"body_part": FakeClassLabel(["forearm", "hand"])})


def test_filter_source_keeps_exactly_the_matching_records():
  records = _records()
  source = ListSource(records)
  features = {"body_part": FakeClassLabel(["forearm", "lower_leg", "finger", "hand", "elbow"])}
  conditions = pipeline.resolve_filter_values(
      pipeline.parse_filter("body_part=hand,0;study=s3"), features)
  assert conditions["body_part"] == {3, 0}
  view = pipeline.filter_source(source, conditions)
  expected = [i for i, r in enumerate(records)
              if r["body_part"] in (0, 3) and r["study"] == b"s3"]
  assert len(view) == len(expected) > 0
  got = [int(r["image"][0, 0, 0]) for r in view.__getitems__(list(range(len(view))))]
  assert got == expected
  with pytest.raises(ValueError, match="keeps no record"):
    pipeline.filter_source(source, {"body_part": frozenset({9})})


def test_label_shuffled_source_permutes_labels_only():
  records = _records(200)
  source = ListSource(records)
  view = pipeline.LabelShuffledSource(source, seed=3)
  shuffled = view.__getitems__(list(range(len(view))))
  original = np.asarray([r["label"] for r in records])
  labels = np.asarray([r["label"] for r in shuffled])
  np.testing.assert_array_equal(np.sort(labels), np.sort(original))  # same label counts
  assert (labels != original).mean() > 0.4  # ~2/3 differ for three balanced classes
  for before, after in zip(records, shuffled):
    np.testing.assert_array_equal(before["image"], after["image"])
  again = pipeline.LabelShuffledSource(source, seed=3)
  np.testing.assert_array_equal(again.labels, view.labels)
  assert not np.array_equal(pipeline.LabelShuffledSource(source, seed=4).labels, view.labels)
  # Batches through iterate_batches carry the shuffled labels.
  batch = next(pipeline.iterate_batches(view, batch_size=200))
  np.testing.assert_array_equal(batch["label"], labels)
