"""TFDS builder for the Kaggle brain-tumour MRI folder release: 4 classes, Training/ and Testing/.

Most users have this release rather than Cheng's figshare `.mat` files (`brain_tumor_mri`, 003):
JPEG slices (gray or RGB, of varied sizes) in one folder per class, already split into
`Training/` and `Testing/`. Two spellings of the class folders are in circulation and both are
accepted: `glioma_tumor`, `meningioma_tumor`, `no_tumor`, `pituitary_tumor` (Bhuvaji et al.) and
`glioma`, `meningioma`, `notumor`, `pituitary` (Nickparvar's). Labels, in this fixed order (the
alphabetical order of either spelling, i.e. Keras' `flow_from_directory` order):
0 glioma, 1 meningioma, 2 no_tumor, 3 pituitary.

Splits: `Testing/` -> test; `Training/` -> train, with `validation_fraction` of its images carved
out as validation, stratified by class and seeded by `split_seed`. The release has no patient
ids, so the carve is by image: slices of one patient can land in train and validation (and the
release's own Training/Testing split is not known to be patient-wise either; Testing/ was
collected apart and scores differ from validation's: info.metadata['split_provenance'] records
each split's origin, and the run report prints it). The release holds
byte-identical copies of some images; the carve keeps such copies together (it groups by content
hash), and every group of identical files, within or across Training/ and Testing/, is logged
and listed in info.metadata['duplicate_files'] (all are kept). Images are stored
as gray (BT.601 luma; the RGB JPEGs hold gray slices) or RGB (`channels=3`), fitted to
`image_size` with their aspect ratio kept (`resize_mode='pad'`). There are no tumour masks.
Files under the release that are not images are listed in info.metadata['unhandled_files'].
A validation carve left empty by too few images (with validation_fraction > 0) stops the
preparation naming the class counts. EXIF orientations are applied, transparency is composited
on black, and a 16-bit source is refused with the default storage_bits=8 (pass
--config.dataset.builder.storage_bits=16, or allow_bit_depth_reduction=True).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data.builders.common import (
  record_split_provenance,
  IMAGE_SUFFIXES,
  ImageBuilderConfig,
  ManualImageBuilder,
  assign_splits,
  canonical_name,
  config_by_name,
  encode_image,
  fit_to_config,
  group_by_split,
  image_feature,
  list_images,
  list_unhandled,
  manual_dir,
  missing_error,
  read_unit_image,
  record_unhandled,
  validate_config,
)

LABEL_NAMES = ("glioma", "meningioma", "no_tumor", "pituitary")
# Canonical class-folder name (both releases' spellings) -> label name.
CLASS_FOLDERS = {
  "glioma_tumor": "glioma", "glioma": "glioma",
  "meningioma_tumor": "meningioma", "meningioma": "meningioma",
  "no_tumor": "no_tumor", "notumor": "no_tumor",
  "pituitary_tumor": "pituitary", "pituitary": "pituitary",
}  # fmt: skip
SPLIT_FOLDERS = {"training": "train", "testing": "test"}

KAGGLE_BRAIN_INSTRUCTIONS = """\
Download the Kaggle brain tumour MRI classification set (e.g. "Brain Tumor Classification (MRI)"
by Sartaj Bhuvaji et al., or "Brain Tumor MRI Dataset" by Masoud Nickparvar) and unzip it so that
manual_dir holds (directly, or inside its one top folder):

  Training/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/<image>.jpg
  Testing/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/<image>.jpg

The spellings glioma, meningioma, notumor, pituitary are accepted too.
"""


@dataclasses.dataclass(eq=False)
class BrainKaggleConfig(ImageBuilderConfig):
  """Stored channels and the validation carve from Training/.

  channels: 1 stores gray (BT.601 luma), 3 stores RGB (gray images repeated).
  validation_fraction: share of Training/'s images moved to validation, per class (seeded by
  split_seed; by image: the release has no patient ids).
  """

  channels: int = 1
  validation_fraction: float = 0.1


_CONFIGS = [
  BrainKaggleConfig(name="default", image_size=512, resize_mode="pad",
                    description="Gray, 512 x 512 (aspect kept by padding), 10% of Training/ "
                    "as validation."),
]


def make_brain_kaggle_config(base: str = "default", **fields: Any) -> BrainKaggleConfig:
  """The named config `base` with some fields changed (and a name derived from them)."""
  return config_by_name(_CONFIGS, base, "brain_tumor_kaggle", **fields)


def find_release_root(manual: pathlib.Path) -> pathlib.Path:
  """The folder holding Training/ and Testing/: manual_dir itself or its one subfolder that does."""

  def has_splits(folder: pathlib.Path) -> bool:
    names = {path.name.lower() for path in folder.iterdir() if path.is_dir()}
    return set(SPLIT_FOLDERS) <= names

  if manual.is_dir() and has_splits(manual):
    return manual
  candidates = [path for path in sorted(manual.iterdir()) if path.is_dir() and has_splits(path)
                ] if manual.is_dir() else []
  if len(candidates) == 1:
    return candidates[0]
  if len(candidates) > 1:
    raise ValueError(f"brain_tumor_kaggle: several folders under {manual} hold Training/ and "
                     f"Testing/: {[str(path) for path in candidates]}; point manual_dir at one.")
  raise missing_error("brain_tumor_kaggle", "the Training/ and Testing/ folders", manual,
                      KAGGLE_BRAIN_INSTRUCTIONS)


def class_images(split_folder: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
  """(image, label) of every image in one split folder; raises naming unknown, missing,
  duplicated or empty class folders."""
  found: dict[str, pathlib.Path] = {}
  unknown = []
  for path in sorted(split_folder.iterdir()):
    if not path.is_dir() or path.name.startswith("."):
      continue
    label_name = CLASS_FOLDERS.get(canonical_name(path.name))
    if label_name is None:
      unknown.append(path.name)
    elif label_name in found:
      raise ValueError(f"brain_tumor_kaggle: folders {found[label_name]} and {path} are both "
                       f"class {label_name!r}.")
    else:
      found[label_name] = path
  missing = [name for name in LABEL_NAMES if name not in found]
  if unknown or missing:
    raise ValueError(f"brain_tumor_kaggle: class folders in {split_folder} must be the four of "
                     f"{sorted(CLASS_FOLDERS)}: unexpected {unknown}, missing {missing}.")
  items = []
  for label, name in enumerate(LABEL_NAMES):
    images = list_images(found[name])
    if not images:
      raise ValueError(f"brain_tumor_kaggle: class folder {found[name]} holds no images "
                       f"({', '.join(IMAGE_SUFFIXES)}).")
    items.extend((path, label) for path in images)
  return items


def content_hashes(paths: list[pathlib.Path]) -> list[str]:
  """SHA-1 of every file's bytes (identical copies share one)."""
  return [hashlib.sha1(path.read_bytes()).hexdigest() for path in paths]


def duplicate_groups(relative_paths: list[str], hashes: list[str]) -> list[list[str]]:
  """Groups (sorted, of two or more) of paths whose files are byte-identical, sorted."""
  by_hash: dict[str, list[str]] = {}
  for path, digest in zip(relative_paths, hashes):
    by_hash.setdefault(digest, []).append(path)
  return sorted(sorted(group) for group in by_hash.values() if len(group) > 1)


class BrainTumorKaggle(ManualImageBuilder):
  """Kaggle brain MRI slices: glioma, meningioma, no tumour, pituitary (folder release)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "EXIF orientation applied, transparency composited on black; sources above "
             "storage_bits refused unless allow_bit_depth_reduction; empty splits refused.",
  }
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = KAGGLE_BRAIN_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: image, label, original size [H, W], path (relative to the release folder)."""
    config = self.builder_config
    validate_config(config)
    if config.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {config.channels}.")
    if not 0 <= config.validation_fraction < 1:
      raise ValueError(f"validation_fraction must be in [0, 1), got "
                       f"{config.validation_fraction}.")
    return self._image_info(
      {
        "image": image_feature(config, config.channels),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "path": tfds.features.Text(),
      },
      homepage="https://www.kaggle.com/datasets/sartajbhuvaji/brain-tumor-classification-mri",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Lists and checks both split folders before writing anything."""
    config = self.builder_config
    root = find_release_root(manual_dir(dl_manager, self.name))
    folders = {SPLIT_FOLDERS[path.name.lower()]: path for path in root.iterdir()
               if path.is_dir() and path.name.lower() in SPLIT_FOLDERS}
    train = class_images(folders["train"])
    test = class_images(folders["test"])
    fraction = config.validation_fraction
    train_hashes = content_hashes([path for path, _ in train])
    which = assign_splits(train_hashes, (1 - fraction, fraction), config.split_seed,
                          strata=[label for _, label in train])
    per_split = {**group_by_split(train, which, ("train", "validation")), "test": test}
    record_unhandled(self.info, list_unhandled(root), root)
    record_split_provenance(self.info, {
        "train": f"{folders['train'].name}/ less the validation carve",
        "validation": f"{fraction:.0%} of {folders['train'].name}/ per class, by content hash "
                      f"(split_seed {config.split_seed})",
        "test": f"the release's {folders['test'].name}/ folder (collected apart from "
                f"{folders['train'].name}/: not drawn from the same pool as train and "
                "validation)"})
    duplicates = duplicate_groups(
      [path.relative_to(root).as_posix() for path, _ in train + test],
      train_hashes + content_hashes([path for path, _ in test]))
    self.info.metadata["duplicate_files"] = duplicates
    if duplicates:
      across = sum(any(p.startswith(folders["train"].name + "/") for p in group)
                   and any(p.startswith(folders["test"].name + "/") for p in group)
                   for group in duplicates)
      logging.warning("%s: %d group(s) of byte-identical images under %s (%d spanning Training/ "
                      "and Testing/), e.g. %s; all are kept and listed in "
                      "info.metadata['duplicate_files'].", self.name, len(duplicates), root,
                      across, duplicates[:3])

    def make_example(item: tuple[pathlib.Path, int]) -> dict[str, Any]:
      path, label = item
      image = read_unit_image(path, config.channels, config)
      return {"image": encode_image(fit_to_config(image, config), config), "label": label,
              "original_size": np.asarray(image.shape[:2], np.int32),
              "path": path.relative_to(root).as_posix()}

    return self._split_iterators(per_split, make_example, validation_fraction=fraction,
                                 label_of=lambda item: LABEL_NAMES[item[1]])
