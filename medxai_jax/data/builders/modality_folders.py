"""TFDS builder for medical image-modality folders (004).

`medical_modalities` reads any folder of class-named subfolders (by default 004's seven modality
classes). What the real-data builders share (config base, manual-folder checks, image features,
the corrupt-image policy, patient-wise splitting) lives in `builders/common.py`; its names are
also importable from here, where they used to live.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data import preprocess
from medxai_jax.data.builders.common import (  # noqa: F401  (unused ones: the old import path)
  CORRUPT_POLICIES,
  IMAGE_SUFFIXES,
  RESIZE_MODES,
  SPLITS,
  ImageBuilderConfig,
  ManualImageBuilder,
  assign_splits,
  canonical_name,
  collection_root,
  config_fields,
  derive_config,
  encode_image,
  encode_mask,
  fit_to_config,
  group_by_split,
  image_feature,
  list_images,
  list_unhandled,
  manual_dir,
  mask_feature,
  missing_error,
  process_in_order,
  read_unit_image,
  record_unhandled,
  split_examples,
  validate_config,
)

MODALITIES: tuple[str, ...] = (
  "abdomen_ct", "brain_mri", "cardiac_abdomen_ultrasound", "chest_xray",
  "fluorescence_microscopy", "retinal_funduscopy", "statistical_graph",
)  # fmt: skip; the order of configs/modality_vgg16_gap.py
_SPLIT_FOLDER_NAMES = {
  "train": "train", "training": "train", "val": "validation", "valid": "validation",
  "validation": "validation", "test": "test", "testing": "test",
}  # fmt: skip

MODALITY_INSTRUCTIONS = """\
Any folder of class-named subfolders (004 pooled its images from Open-i, ImageCLEF2013, TCIA,
MESSIDOR and DRIVE; it ships no archive). Point manual_dir at a folder laid out either as

  <manual_dir>/<class>/**/<image>.{png,jpg,jpeg,bmp,tif,tiff,gif,dcm,dicom}
  or, already split,  <manual_dir>/{train,val|validation,test}/<class>/**/<image>

DICOM files are read as displayed (Rescale, VOI LUT or window, MONOCHROME1 inverted; see
medxai_jax.data.preprocess.dicom_to_unit), and their PatientID is kept: splits the builder makes
put all images of one patient into one split (set dicom_patient_ids=False in the builder config
if your PatientIDs were anonymised to one value). Any other file under manual_dir is not read: it
is listed in the prepared dataset's metadata (info.metadata['unhandled_files']) and logged.

Class folders are matched to the config's class names after lower-casing and turning runs of
other characters into '_' ('Abdomen CT' -> 'abdomen_ct'). The default config expects 004's seven
classes: abdomen_ct, brain_mri, cardiac_abdomen_ultrasound, chest_xray, fluorescence_microscopy,
retinal_funduscopy, statistical_graph. For other class sets build the config with
`modality_folders.config_from_folder(path)`.

Bit depth: the default stores 8-bit PNGs. A 16-bit PNG/TIFF or a DICOM with BitsStored > 8 then
stops the preparation, naming the file: pass --config.dataset.builder.storage_bits=16 to keep
every value (train with --config.preprocess.bit_depth=16, or 12 for 12-bit values in 16-bit
PNGs, which are stored unchanged), or --config.dataset.builder.allow_bit_depth_reduction=True to
store 8 bits knowingly. EXIF orientations are applied and transparency is composited on black.
"""


@dataclasses.dataclass(eq=False)
class ModalityFoldersConfig(ImageBuilderConfig):
  """Class names, channels and split fractions of a class-per-folder collection.

  class_names: label order (canonical names, see `canonical_name`). channels: 3 stores RGB (gray
  images repeated), 1 stores gray (BT.601 luma). split_fractions: train/validation/test shares
  for a flat layout, stratified by class (004: 5000/500/500 of 6000 per class); a pre-split
  layout keeps its split folders and carves validation from train only when it has none.
  dicom_patient_ids: group DICOM files by their PatientID in the splits this builder makes (other
  files, and DICOMs without one, are their own group), so no patient is in two splits.
  """

  class_names: tuple[str, ...] = MODALITIES
  channels: int = 3
  split_fractions: tuple[float, ...] = (10 / 12, 1 / 12, 1 / 12)
  dicom_patient_ids: bool = True


_DEFAULT_MODALITY_CONFIG = ModalityFoldersConfig(
  name="seven_modalities", image_size=300, resize_mode="stretch",
  description="004's seven modality classes, RGB, resampled to 300 x 300.",
)


def make_modality_config(**fields: Any) -> ModalityFoldersConfig:
  """The default modality config with some fields changed (and a name derived from them)."""
  return derive_config(_DEFAULT_MODALITY_CONFIG, **fields)


def _class_folders(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Canonical class name -> subfolder of `folder` (hidden folders ignored)."""
  found: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if path.is_dir() and not path.name.startswith("."):
      name = canonical_name(path.name)
      if name in found:
        raise ValueError(f"Folders {found[name]} and {path} both map to class {name!r}.")
      found[name] = path
  return found


def _split_folders(manual: pathlib.Path) -> dict[str, pathlib.Path]:
  """Split name -> folder, if `manual` is laid out as train/val/test folders; else {}."""
  folders = {path.name.lower(): path for path in manual.iterdir() if path.is_dir()}
  return {_SPLIT_FOLDER_NAMES[name]: path for name, path in folders.items()
          if name in _SPLIT_FOLDER_NAMES}


def patient_of(path: pathlib.Path, use_dicom_ids: bool) -> str:
  """The patient id of an image: a DICOM's PatientID (when `use_dicom_ids`), else ''."""
  if use_dicom_ids and preprocess.is_dicom_file(path):
    return preprocess.read_dicom_patient_id(path)
  return ""


def split_groups(paths: list[pathlib.Path], patients: list[str]) -> list[str]:
  """The group of every image for `assign_splits`: its patient, or its own path without one."""
  return [f"patient:{patient}" if patient else f"file:{path}"
          for path, patient in zip(paths, patients)]


def warn_dominant_patient(patients: list[str], where: pathlib.Path) -> None:
  """Logs when one PatientID holds over a quarter of the images (anonymised ids, most likely)."""
  named = [patient for patient in patients if patient]
  if len(named) < 8:
    return
  top = max(set(named), key=named.count)
  if named.count(top) > len(patients) / 4:
    logging.warning("medical_modalities: PatientID %r holds %d of the %d images under %s, so "
                    "they all go to one split; if the ids were anonymised, set "
                    "dicom_patient_ids=False in the builder config.", top, named.count(top),
                    len(patients), where)


def config_from_folder(folder: str | os.PathLike, **fields: Any) -> ModalityFoldersConfig:
  """A config whose classes are the (canonical, sorted) subfolder names of `folder` (or of its
  train/ folder if it is split), so any folder of class-named subfolders can be prepared."""
  root = pathlib.Path(folder)
  splits = _split_folders(root)
  names = tuple(sorted(_class_folders(splits.get("train", root))))
  if not names:
    raise ValueError(f"No class subfolders found in {root}.")
  return make_modality_config(class_names=names, **fields)


class MedicalModalities(ManualImageBuilder):
  """Medical images labelled by modality, one subfolder per class (004's seven by default)."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "DICOM files; patient_id (DICOM PatientID) and patient-wise splits; non-image "
             "files listed in metadata['unhandled_files'].",
    "1.2.0": "EXIF orientation applied, transparency composited on black; sources above "
             "storage_bits refused unless allow_bit_depth_reduction; empty splits refused.",
  }
  BUILDER_CONFIGS = [_DEFAULT_MODALITY_CONFIG]
  DEFAULT_BUILDER_CONFIG_NAME = _DEFAULT_MODALITY_CONFIG.name
  MANUAL_DOWNLOAD_INSTRUCTIONS = MODALITY_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: image, label (the class folder), patient id (a DICOM's PatientID, else ''),
    path (relative to manual_dir)."""
    config = self.builder_config
    validate_config(config)
    if config.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {config.channels}.")
    names = [canonical_name(name) for name in config.class_names]
    if len(set(names)) != len(names) or not names:
      raise ValueError(f"class_names must be distinct and non-empty, got {config.class_names}.")
    return self._image_info(
      {
        "image": image_feature(config, config.channels),
        "label": tfds.features.ClassLabel(names=names),
        "patient_id": tfds.features.Text(),
        "path": tfds.features.Text(),
      },
      citation="Kim, Rajaraman and Antani, 'Visual Interpretation of Convolutional Neural "
      "Network Predictions in Classifying Medical Image Modalities', Diagnostics, 2019.",
    )

  def _class_images(self, folder: pathlib.Path) -> list[tuple[pathlib.Path, int, str]]:
    """(image path, label, patient id) of every image in a folder of class subfolders; checks
    the classes."""
    names = self.info.features["label"].names
    found = _class_folders(folder)
    unknown = sorted(set(found) - set(names))
    missing = sorted(set(names) - set(found))
    if unknown or missing:
      raise ValueError(
        f"{self.name}: class folders in {folder} do not match the config's classes {names}: "
        f"unexpected {unknown}, missing {missing} (folders are matched by canonical name; for "
        f"this folder's classes set --config.dataset.builder.class_names={','.join(sorted(found))}"
        ", or build the config with modality_folders.config_from_folder).")
    items = []
    for label, name in enumerate(names):
      images = list_images(found[name])
      if not images:
        raise ValueError(f"{self.name}: class folder {found[name]} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
      use_ids = self.builder_config.dicom_patient_ids
      items.extend((path, label, patient_of(path, use_ids)) for path in images)
    return items

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Lists and checks every file first, so a malformed folder fails before anything is written;
    files that are not images are listed in info.metadata['unhandled_files']."""
    config = self.builder_config
    manual = manual_dir(dl_manager, self.name)
    split_folders = _split_folders(manual)
    fractions = config.split_fractions
    if split_folders:
      if "train" not in split_folders or "test" not in split_folders:
        raise missing_error(self.name, "train/ and test/ split folders (a split layout needs "
                            "both)", manual, MODALITY_INSTRUCTIONS)
      per_split = {split: self._class_images(folder) for split, folder in split_folders.items()}
      self._warn_shared_patients(per_split)
      if "validation" not in per_split:
        train = per_split["train"]
        share = fractions[1] / (fractions[0] + fractions[1])
        warn_dominant_patient([patient for _, _, patient in train], split_folders["train"])
        which = assign_splits(split_groups([path for path, _, _ in train],
                                           [patient for _, _, patient in train]),
                              (1 - share, share), config.split_seed,
                              strata=[label for _, label, _ in train])
        per_split.update(group_by_split(train, which, ("train", "validation")))
    else:
      items = self._class_images(manual)
      warn_dominant_patient([patient for _, _, patient in items], manual)
      which = assign_splits(split_groups([path for path, _, _ in items],
                                         [patient for _, _, patient in items]),
                            fractions, config.split_seed,
                            strata=[label for _, label, _ in items])
      per_split = group_by_split(items, which)

    record_unhandled(self.info, list_unhandled(manual), manual)

    def make_example(item: tuple[pathlib.Path, int, str]) -> dict[str, Any]:
      path, label, patient = item
      relative = path.relative_to(manual).as_posix()
      image = read_unit_image(path, config.channels, config)
      return {"image": encode_image(fit_to_config(image, config), config), "label": label,
              "patient_id": patient, "path": relative}

    names = self.info.features["label"].names
    return self._split_iterators(
      {split: per_split[split] for split in SPLITS if split in per_split}, make_example,
      fractions=fractions, label_of=lambda item: names[item[1]])

  def _warn_shared_patients(self, per_split: dict[str, list[tuple[pathlib.Path, int, str]]]
                            ) -> None:
    """Warns when the user's own split folders put one PatientID into two splits (kept as given)."""
    patients = {split: {patient for _, _, patient in items if patient}
                for split, items in per_split.items()}
    shared = sorted({patient for first in patients for second in patients if first < second
                     for patient in patients[first] & patients[second]})
    if shared:
      logging.warning("%s: the split folders put %d PatientID(s) into more than one split, e.g. "
                      "%s; the folders are kept as given.", self.name, len(shared), shared[:5])
