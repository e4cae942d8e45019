"""TFDS builder for the COVID-19 Radiography Database (Chowdhury, Rahman et al.; 003).

Four class folders (COVID, Normal, Lung_Opacity and 'Viral Pneumonia', with a space), each with
images/ (299 x 299 PNG) and masks/ (256 x 256 lung masks, resized here to the image, nearest
neighbour), plus `<Class>.metadata.xlsx` whose URL column names each image's source repository
(kept as `source_url`: sources differ between classes, a known shortcut). The class set is the
config: `three` (003: COVID, Lung_Opacity, Normal; the default) or `four`. The collection has no
patient ids, so the split is by image, stratified by class: 60/10/30 (003 tests on 30%).

The .xlsx files are read with the standard library (zip + XML), so openpyxl is not needed; an
unreadable sheet stops the preparation naming it. EXIF orientations are applied to images and
masks (an image and mask with different orientations stop the preparation naming both),
transparency is composited on black, and a 16-bit source is refused with the default
storage_bits=8 (pass --config.dataset.builder.storage_bits=16, or allow_bit_depth_reduction=True).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data import preprocess
from medxai_jax.data.builders.common import (
  carved_provenance,
  record_split_provenance,
  ImageBuilderConfig,
  ManualImageBuilder,
  assign_splits,
  canonical_name,
  check_mask_orientation,
  collection_root,
  config_by_name,
  encode_image,
  encode_mask,
  fit_to_config,
  group_by_split,
  image_feature,
  list_images,
  manual_dir,
  mask_feature,
  missing_error,
  option_flag,
  read_unit_image,
  validate_config,
)

CLASS_FOLDERS: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
_FOLDER = "COVID-19_Radiography_Dataset"
_SHEET_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"

COVID_INSTRUCTIONS = """\
Download the COVID-19 Radiography Database (Kaggle: tawsifurrahman/covid19-radiography-database)
and unzip it so that manual_dir contains the folder as shipped (or point manual_dir at it):

  COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/images/<Class>-N.png
  COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/masks/<Class>-N.png
  COVID-19_Radiography_Dataset/<Class>.metadata.xlsx

Config 'three' (003) needs only COVID, Lung_Opacity and Normal. A copy without masks or
metadata sheets, or with other class folders, is prepared with the options
  --config.dataset.builder.with_masks=False --config.dataset.builder.read_metadata=False
  --config.dataset.builder.classes=COVID,Normal,Viral_Pneumonia   (folders by canonical name)
"""


@dataclasses.dataclass(eq=False)
class CovidRadiographyConfig(ImageBuilderConfig):
  """Class folders (in label order), masks, metadata and split fractions."""

  classes: tuple[str, ...] = CLASS_FOLDERS[:3]
  with_masks: bool = True
  read_metadata: bool = True
  split_fractions: tuple[float, ...] = (0.6, 0.1, 0.3)


_CONFIGS = [
  CovidRadiographyConfig(name="three", image_size=299, resize_mode="stretch",
                         description="003's three classes: COVID, Lung_Opacity, Normal."),
  CovidRadiographyConfig(name="four", image_size=299, resize_mode="stretch",
                         classes=CLASS_FOLDERS, description="All four classes."),
]


def make_covid_config(base: str = "three", **fields: Any) -> CovidRadiographyConfig:
  """The named config `base` with some fields changed (and a name derived from them)."""
  return config_by_name(_CONFIGS, base, "covid_radiography", **fields)


def _column_index(reference: str) -> int:
  """0-based column of a cell reference ('A1' -> 0, 'AB7' -> 27)."""
  letters = re.match(r"[A-Z]+", reference.upper())
  if letters is None:
    raise ValueError(f"Bad cell reference {reference!r}.")
  index = 0
  for letter in letters[0]:
    index = index * 26 + ord(letter) - ord("A") + 1
  return index - 1


def read_xlsx_rows(path: pathlib.Path) -> list[list[str]]:
  """The rows of an .xlsx file's first worksheet as strings, with the standard library only."""
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    shared: list[str] = []
    if "xl/sharedStrings.xml" in names:
      root = ElementTree.fromstring(archive.read("xl/sharedStrings.xml"))
      for item in root.iter(f"{_SHEET_NS}si"):
        shared.append("".join(text.text or "" for text in item.iter(f"{_SHEET_NS}t")))
    sheets = sorted((name for name in names if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", name)),
                    key=lambda name: int(re.search(r"\d+", name.rsplit("/", 1)[1])[0]))
    if not sheets:
      raise ValueError(f"{path} has no worksheet.")
    root = ElementTree.fromstring(archive.read(sheets[0]))
  rows = []
  for row in root.iter(f"{_SHEET_NS}row"):
    cells: dict[int, str] = {}
    for position, cell in enumerate(row.iter(f"{_SHEET_NS}c")):
      column = _column_index(cell.get("r")) if cell.get("r") else position
      kind, value = cell.get("t"), cell.find(f"{_SHEET_NS}v")
      if kind == "s":
        text = shared[int(value.text)] if value is not None else ""
      elif kind == "inlineStr":
        text = "".join(part.text or "" for part in cell.iter(f"{_SHEET_NS}t"))
      else:
        text = value.text if value is not None and value.text is not None else ""
      cells[column] = text.strip()
    rows.append([cells.get(column, "") for column in range(max(cells, default=-1) + 1)])
  return rows


def read_source_urls(path: pathlib.Path) -> dict[str, str]:
  """Image name (lower case, no extension) -> URL, from a `<Class>.metadata.xlsx` file."""
  try:
    rows = read_xlsx_rows(path)
  except (zipfile.BadZipFile, ElementTree.ParseError, ValueError, KeyError) as error:
    raise ValueError(f"Cannot read the metadata sheet {path}: {error} "
                     f"({option_flag('read_metadata', False)} skips the metadata).") from error
  for number, row in enumerate(rows):
    header = [cell.upper() for cell in row]
    if "FILE NAME" in header and "URL" in header:
      name_column, url_column = header.index("FILE NAME"), header.index("URL")
      return {
        _image_key(row[name_column]): row[url_column] if url_column < len(row) else ""
        for row in rows[number + 1:] if name_column < len(row) and row[name_column]
      }
  raise ValueError(f"{path}: no header row with 'FILE NAME' and 'URL' columns.")


def _image_key(name: str) -> str:
  """Case-insensitive image name without extension ('NORMAL-1', 'Normal-1.png' -> 'normal-1')."""
  name = name.strip().lower()
  return name[:-4] if name.endswith(".png") else name


def _find_child(folder: pathlib.Path, name: str, suffix: str = "") -> pathlib.Path | None:
  """The entry of `folder` named `name + suffix`, also if spaces and '_' are swapped."""
  exact = folder / f"{name}{suffix}"
  if exact.exists():
    return exact
  for path in folder.iterdir():
    if path.name.lower().endswith(suffix.lower()) and canonical_name(
        path.name[:len(path.name) - len(suffix)]) == canonical_name(name):
      return path
  return None


class CovidRadiography(ManualImageBuilder):
  """Chest radiographs: COVID-19, lung opacity, normal (and viral pneumonia), with lung masks."""

  LOCALISATION_MASK_KEY = "lung_mask"  # see ManualImageBuilder
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "EXIF orientation applied, transparency composited on black; sources above "
             "storage_bits refused unless allow_bit_depth_reduction.",
  }
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "three"
  MANUAL_DOWNLOAD_INSTRUCTIONS = COVID_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: gray image, label, lung mask, source URL, path."""
    config = self.builder_config
    validate_config(config)
    known = {canonical_name(name) for name in CLASS_FOLDERS}
    names = [canonical_name(name) for name in config.classes]
    if not names or len(set(names)) != len(names) or set(names) - known:
      raise ValueError(f"classes must be distinct names from {CLASS_FOLDERS}, got "
                       f"{config.classes}.")
    return self._image_info(
      {
        "image": image_feature(config, 1),
        "label": tfds.features.ClassLabel(names=names),
        "lung_mask": mask_feature(config),
        "source_url": tfds.features.Text(),
        "path": tfds.features.Text(),
      },
      homepage="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
      citation="Chowdhury et al., 'Can AI help in screening viral and COVID-19 pneumonia?', IEEE "
      "Access 8, 2020; Rahman et al., 'Exploring the effect of image enhancement techniques on "
      "COVID-19 detection using chest X-ray images', Computers in Biology and Medicine 132, 2021.",
    )

  def _list_class(self, root: pathlib.Path, folder_name: str,
                  label: int) -> list[tuple[pathlib.Path, pathlib.Path | None, int, str]]:
    """(image, mask or None, label, source URL) of one class, checked for missing files."""
    config = self.builder_config
    folder = _find_child(root, folder_name)
    if folder is None or not folder.is_dir():
      raise missing_error(self.name, f"the class folder {folder_name!r} (the classes are "
                          f"{option_flag('classes', config.classes)}; set the option to the "
                          "folders you have)", root / folder_name, COVID_INSTRUCTIONS)
    images_dir = folder / "images"
    if not images_dir.is_dir():
      raise missing_error(self.name, f"the images folder of {folder_name!r}", images_dir,
                          COVID_INSTRUCTIONS)
    images = list_images(images_dir)
    if not images:
      raise missing_error(self.name, f"images of {folder_name!r}", images_dir,
                          COVID_INSTRUCTIONS)
    urls: dict[str, str] = {}
    if config.read_metadata:
      sheet = _find_child(root, folder.name, ".metadata.xlsx")
      if sheet is None:
        raise missing_error(self.name, f"the metadata sheet of {folder_name!r} "
                            f"({option_flag('read_metadata', False)} does without it)",
                            root / f"{folder.name}.metadata.xlsx", COVID_INSTRUCTIONS)
      urls = read_source_urls(sheet)
      unlisted = [path.name for path in images if _image_key(path.name) not in urls]
      if unlisted:
        logging.warning("%s: %d image(s) of %s have no row in %s (source_url left empty), e.g. "
                        "%s", self.name, len(unlisted), folder_name, sheet.name, unlisted[:3])
    items = []
    for path in images:
      mask = None
      if config.with_masks:
        mask = folder / "masks" / path.name
        if not mask.is_file():
          raise missing_error(self.name, f"the lung mask of {path.name} "
                              f"({option_flag('with_masks', False)} does without masks)", mask,
                              COVID_INSTRUCTIONS)
      items.append((path, mask, label, urls.get(_image_key(path.name), "")))
    return items

  def _check_layout(self, root: pathlib.Path) -> None:
    """Raises one FileNotFoundError listing every class folder, metadata sheet and masks/ folder
    the config needs and `root` lacks, each with the option that does without it."""
    config = self.builder_config
    folders = {name: _find_child(root, name) for name in config.classes}
    absent = [name for name, folder in folders.items() if folder is None or not folder.is_dir()]
    present = [folder for folder in folders.values() if folder is not None and folder.is_dir()]
    problems = []
    if absent:
      available = [path.name.replace(" ", "_") for path in sorted(root.iterdir())
                   if path.is_dir() and canonical_name(path.name) in
                   {canonical_name(name) for name in CLASS_FOLDERS}]
      problems.append(f"class folder(s) {absent} (the classes are "
                      f"{option_flag('classes', config.classes)}; set it to the folders you "
                      f"have: {option_flag('classes', available)})")
    if config.read_metadata:
      sheets = [f"{folder.name}.metadata.xlsx" for folder in present
                if _find_child(root, folder.name, ".metadata.xlsx") is None]
      if sheets:
        problems.append(f"metadata sheet(s) {sheets} ({option_flag('read_metadata', False)} "
                        "does without them)")
    if config.with_masks:
      unmasked = [folder.name for folder in present if not (folder / "masks").is_dir()]
      if unmasked:
        problems.append(f"the masks/ folder of {unmasked} ({option_flag('with_masks', False)} "
                        "does without masks)")
    if problems:
      listing = "".join(f"\n  - {problem}" for problem in problems)
      raise FileNotFoundError(f"{self.name}: {root} lacks what the config needs:{listing}\n"
                              f"Download instructions:\n{COVID_INSTRUCTIONS}")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Lists and checks every image, mask and metadata sheet before writing anything."""
    config = self.builder_config
    manual = manual_dir(dl_manager, self.name)
    root = collection_root(manual, _FOLDER, self.name, COVID_INSTRUCTIONS)
    self._check_layout(root)
    items = [item for label, folder in enumerate(config.classes)
             for item in self._list_class(root, folder, label)]
    record_split_provenance(self.info, carved_provenance(
        config.split_fractions, config.split_seed, "image", "class"))
    which = assign_splits([str(item[0]) for item in items], config.split_fractions,
                          config.split_seed, strata=[item[2] for item in items])

    def make_example(item: tuple[pathlib.Path, pathlib.Path | None, int, str]) -> dict[str, Any]:
      path, mask_path, label, url = item
      pixels = read_unit_image(path, 1, config)
      if mask_path is None:
        mask = np.zeros(pixels.shape[:2] + (1,), np.uint8)
      else:
        check_mask_orientation(path, mask_path)
        mask = (preprocess.read_image(mask_path)[..., :1] > 0).astype(np.uint8)
        mask = preprocess.resize_np(mask, *pixels.shape[:2], method="nearest")
      return {
        "image": encode_image(fit_to_config(pixels, config), config),
        "label": label,
        "lung_mask": encode_mask(mask, config),
        "source_url": url,
        "path": path.relative_to(root.parent).as_posix(),
      }

    return self._split_iterators(group_by_split(items, which), make_example,
                                 fractions=config.split_fractions,
                                 label_of=lambda item: config.classes[item[2]])
