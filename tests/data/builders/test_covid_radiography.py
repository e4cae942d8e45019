"""The COVID-19 Radiography TFDS builder on tiny fake folders in the collection's layout."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from fake_folders import prepare as _prepare
from fake_folders import records as _records
from fake_folders import write_png as _write_png
from medxai_jax.data.builders import covid_radiography


def _xlsx(path, rows: list[list[str]]) -> None:
  """A minimal .xlsx (shared strings + one sheet), as spreadsheet programs write them."""
  strings = sorted({cell for row in rows for cell in row})
  ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
  shared = "".join(f"<si><t>{text}</t></si>" for text in strings)
  sheet_rows = "".join(
    f'<row r="{r + 1}">' + "".join(
      f'<c r="{chr(65 + c)}{r + 1}" t="s"><v>{strings.index(cell)}</v></c>'
      for c, cell in enumerate(row)) + "</row>" for r, row in enumerate(rows))
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("xl/sharedStrings.xml", f"<sst {ns}>{shared}</sst>")
    archive.writestr("xl/worksheets/sheet1.xml",
                     f"<worksheet {ns}><sheetData>{sheet_rows}</sheetData></worksheet>")


def _make_covid(root, per_class: int = 4):
  """The four class folders with images, masks and metadata; returns {image name: class}."""
  rng = np.random.default_rng(4)
  folder = root / "COVID-19_Radiography_Dataset"
  expected = {}
  for name in covid_radiography.CLASS_FOLDERS:
    rows = [["FILE NAME", "FORMAT", "SIZE", "URL"]]
    for number in range(1, per_class + 1):
      shape = (30, 30, 3) if number == 1 else (30, 30)
      _write_png(folder / name / "images" / f"{name}-{number}.png",
                 rng.integers(0, 256, shape, dtype=np.uint8))
      mask = np.zeros((20, 20), np.uint8)
      mask[:, :10] = 255
      _write_png(folder / name / "masks" / f"{name}-{number}.png", mask)
      url = f"https://{name[:5]}.org/{number}"
      rows.append([f"{name.upper()}-{number}", "PNG", "256*256", url])
      expected[f"{name}-{number}.png"] = name
    _xlsx(folder / f"{name}.metadata.xlsx", rows)
  return expected


@pytest.mark.parametrize("base, classes", [
  ("three", ("covid", "lung_opacity", "normal")),
  ("four", ("covid", "lung_opacity", "normal", "viral_pneumonia")),
])
def test_covid_class_sets_masks_and_sources(tmp_path, base, classes):
  expected = _make_covid(tmp_path / "manual")
  config = covid_radiography.make_covid_config(base, image_size=0,
                                               split_fractions=(0.5, 0.25, 0.25))
  builder = _prepare(covid_radiography.CovidRadiography, config, tmp_path, tmp_path / "manual")
  assert tuple(builder.info.features["label"].names) == classes
  records = {split: _records(builder, split) for split in ("train", "validation", "test")}
  assert [len(records[s]) for s in ("train", "validation", "test")] == [
    2 * len(classes), len(classes), len(classes)]
  folder_of = {covid_radiography.canonical_name(name): name
               for name in covid_radiography.CLASS_FOLDERS}
  for record in (r for split_records in records.values() for r in split_records):
    file_name = record["path"].rsplit("/", 1)[1]
    folder = expected[file_name]
    assert folder_of[classes[record["label"]]] == folder
    assert record["path"] == f"COVID-19_Radiography_Dataset/{folder}/images/{file_name}"
    assert record["source_url"] == f"https://{folder[:5]}.org/{file_name.split('-')[-1][:-4]}"
    assert record["image"].shape == (30, 30, 1) and record["lung_mask"].shape == (30, 30, 1)
    np.testing.assert_array_equal(record["lung_mask"][..., 0, ], np.repeat(
      [[1] * 15 + [0] * 15], 30, axis=0))  # 20 -> 30 px, nearest neighbour


def test_covid_missing_class_folder_and_metadata(tmp_path):
  _make_covid(tmp_path / "manual")
  root = tmp_path / "manual" / "COVID-19_Radiography_Dataset"
  (root / "Normal.metadata.xlsx").unlink()
  with pytest.raises(FileNotFoundError, match="Normal.metadata.xlsx"):
    _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
      "three", image_size=16), tmp_path, tmp_path / "manual")
  builder = _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
    "three", image_size=16, read_metadata=False), tmp_path, tmp_path / "manual")
  assert sum(split.num_examples for split in builder.info.splits.values()) == 12
  for path in (root / "Viral Pneumonia").rglob("*.png"):
    path.unlink()
  for path in sorted((root / "Viral Pneumonia").rglob("*"), reverse=True):
    path.rmdir()
  (root / "Viral Pneumonia").rmdir()
  with pytest.raises(FileNotFoundError, match="Viral Pneumonia"):
    _prepare(covid_radiography.CovidRadiography, covid_radiography.make_covid_config(
      "four", image_size=16, read_metadata=False), tmp_path, tmp_path / "manual")
