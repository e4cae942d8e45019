"""Tiny fake collections for the TFDS builders' tests: writing them and reading a prepared
builder back (tests/data/builders/)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def write_png(path, array: np.ndarray) -> None:
  """Writes an image with Pillow (uint8 gray/RGB or uint16 gray)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def prepare(builder_cls, config, tmp_path, manual):
  """Prepares `config` of a builder from `manual` into a fresh data_dir and returns the builder."""
  builder = builder_cls(config=config, data_dir=str(tmp_path / "data"),
                        file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def records(builder, split: str) -> list[dict]:
  """Every decoded example of a split, text features as str."""
  source = builder.as_data_source(split=split)
  records = [source[i] for i in range(len(source))]
  return [{key: value.decode() if isinstance(value, bytes) else value
           for key, value in record.items()} for record in records]


def assert_patient_disjoint(splits: dict[str, list[dict]]) -> None:
  """No patient id of the prepared records in two splits; every split non-empty."""
  patients = {split: {r["patient_id"] for r in records} for split, records in splits.items()}
  assert all(patients.values()), {split: len(ids) for split, ids in patients.items()}
  for first in patients:
    for second in patients:
      if first < second:
        assert patients[first].isdisjoint(patients[second]), (first, second)
