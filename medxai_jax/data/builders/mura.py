"""TFDS builder for MURA v1.1, Stanford's musculoskeletal radiographs (000, 001).

Examples are single images (what 000 and 001 train on) with their study's label, body part,
patient and study ids; `study_groups` / `study_scores` give the study-level view (MURA labels
studies, and its official metric averages the image predictions of a study). Splits: `train` and
`validation` partition the official training set by patient (`validation_fraction` of its
patients, seeded; all images of a patient, whatever the body part, go to one of them), `test` is
the official validation set (the official test set is hidden; MURA's official splits are
patient-disjoint). Files under MURA-v1.1/ that are neither images nor CSVs are listed in
info.metadata['unhandled_files']. To
select epochs on the official validation set as 000 does, set
`--config.dataset.validation_split=test`.

The CSVs are read as UTF-8 (a byte-order mark is accepted); other bytes stop the preparation
naming the file and line. A validation carve left empty by too few patients (with
validation_fraction > 0) is refused at preparation, naming the class counts. EXIF orientations
are applied, transparency is composited on black, and a 16-bit source is refused with the
default storage_bits=8 (pass --config.dataset.builder.storage_bits=16, or
allow_bit_depth_reduction=True).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medxai_jax.data import preprocess
from medxai_jax.data.builders.common import (
  record_split_provenance,
  ImageBuilderConfig,
  ManualImageBuilder,
  assign_splits,
  collection_root,
  config_by_name,
  encode_image,
  fit_to_config,
  group_by_split,
  image_feature,
  list_unhandled,
  manual_dir,
  missing_error,
  read_text_file,
  read_unit_image,
  record_unhandled,
  validate_config,
)

BODY_PARTS: tuple[str, ...] = (
  "elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist",
)  # fmt: skip
LABEL_NAMES = ("normal", "abnormal")  # MURA's negative / positive studies
_FOLDER = "MURA-v1.1"
_OFFICIAL_SPLITS = ("train", "valid")
_IMAGE_PATH = re.compile(
  r"^MURA-v1\.1/(?P<split>train|valid)/XR_(?P<part>[A-Z]+)/(?P<patient>patient\d+)/"
  r"(?P<study>study\d+)_(?P<outcome>positive|negative)/image(?P<view>\d+)\.png$"
)

MURA_INSTRUCTIONS = """\
Register and download MURA v1.1 from https://stanfordmlgroup.github.io/competitions/mura/ and
unzip it so that manual_dir contains the folder MURA-v1.1/ as shipped (or point manual_dir at
MURA-v1.1/ itself):

  MURA-v1.1/train_image_paths.csv       one path a line, no header
  MURA-v1.1/train_labeled_studies.csv   lines like
                                        'MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1'
  MURA-v1.1/valid_image_paths.csv
  MURA-v1.1/valid_labeled_studies.csv
  MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageJ.png
"""


@dataclasses.dataclass(eq=False)
class MuraConfig(ImageBuilderConfig):
  """Body-part subset, validation carving and the optional frame removal of 000.

  body_parts: the parts kept (empty = all seven). validation_fraction: share of the official
  training patients moved to `validation` (the assignment is made over all parts, so a patient
  is in the same split under every body-part config). remove_border: crop uniform frames and
  margins before resizing (000's "simple image cropping"; `preprocess.find_uniform_border`, with
  `border_tolerance` on the [0, 1] scale).
  """

  body_parts: tuple[str, ...] = ()
  validation_fraction: float = 0.1
  remove_border: bool = False
  border_tolerance: float = 0.02


def _config(name: str, description: str, **fields: Any) -> MuraConfig:
  """A named config at 000's 320 x 320, aspect ratio kept by padding."""
  return MuraConfig(name=name, description=description, image_size=320, resize_mode="pad",
                    **fields)


_CONFIGS = [
  _config("all", "All seven body parts, 320 x 320 (padded)."),
  *[_config(part, f"XR_{part.upper()} only, 320 x 320 (padded).", body_parts=(part,))
    for part in BODY_PARTS],
  *[_config(f"{name}_noborder", f"{name} with uniform frames cropped first (000).",
            body_parts=parts, remove_border=True)
    for name, parts in (("all", ()), ("wrist", ("wrist",)), ("finger", ("finger",)))],
]


def make_mura_config(base: str = "all", **fields: Any) -> MuraConfig:
  """The named config `base` with some fields changed (and a name derived from them)."""
  return config_by_name(_CONFIGS, base, "MURA", **fields)


@dataclasses.dataclass(frozen=True)
class MuraImage:
  """One listed image and the metadata its path and the study CSV give."""

  path: str  # as listed, relative to the folder holding MURA-v1.1/
  official_split: str
  body_part: int
  patient_id: str
  study_id: str  # e.g. 'train/XR_WRIST/patient00001/study1_positive'
  label: int
  view: int  # J of imageJ.png


def _read_csv_rows(path: pathlib.Path) -> list[list[str]]:
  """Non-empty rows of a headerless UTF-8 CSV (a byte-order mark is dropped), whitespace
  stripped; undecodable bytes or malformed CSV raise ValueError naming the file and line."""
  text, _ = read_text_file(path)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    rows = [[cell.strip() for cell in row] for row in reader]
  except csv.Error as error:
    raise ValueError(f"{path}, line {reader.line_num}: not a readable CSV line ({error})."
                     ) from None
  return [row for row in rows if row and any(row)]


def read_study_labels(root: pathlib.Path, split: str) -> dict[str, int]:
  """Study folder ('MURA-v1.1/train/.../study1_positive/') -> label, from the study CSV."""
  path = root / f"{split}_labeled_studies.csv"
  if not path.is_file():
    raise missing_error("mura", "the study label file", path, MURA_INSTRUCTIONS)
  labels = {}
  for line, row in enumerate(_read_csv_rows(path), start=1):
    if len(row) != 2 or row[1] not in ("0", "1"):
      raise ValueError(f"{path}, line {line}: expected '<study folder>/,<0|1>', got {row}.")
    labels[row[0].rstrip("/") + "/"] = int(row[1])
  return labels


def read_listing(root: pathlib.Path, split: str) -> list[MuraImage]:
  """Every image of an official split, from its image-paths CSV, checked against its study label."""
  path = root / f"{split}_image_paths.csv"
  if not path.is_file():
    raise missing_error("mura", "the image list", path, MURA_INSTRUCTIONS)
  study_labels = read_study_labels(root, split)
  images, seen = [], set()
  for line, row in enumerate(_read_csv_rows(path), start=1):
    relative = row[0]
    match = _IMAGE_PATH.match(relative)
    if match is None or match["split"] != split:
      raise ValueError(f"{path}, line {line}: {relative!r} is not a "
                       f"MURA-v1.1/{split}/XR_<PART>/patientN/studyK_<outcome>/imageJ.png path.")
    if relative in seen:
      raise ValueError(f"{path}, line {line}: {relative!r} is listed twice.")
    seen.add(relative)
    part = match["part"].lower()
    if part not in BODY_PARTS:
      raise ValueError(f"{path}, line {line}: unknown body part XR_{match['part']}.")
    study_folder = relative.rsplit("/", 1)[0] + "/"
    if study_folder not in study_labels:
      raise ValueError(f"{path}, line {line}: study {study_folder} has no label in "
                       f"{split}_labeled_studies.csv.")
    label = study_labels[study_folder]
    if label != (match["outcome"] == "positive"):
      raise ValueError(f"{path}, line {line}: folder says {match['outcome']} but "
                       f"{split}_labeled_studies.csv labels the study {label}.")
    images.append(MuraImage(
      path=relative, official_split=split, body_part=BODY_PARTS.index(part),
      patient_id=match["patient"], study_id=study_folder[len(_FOLDER) + 1:-1], label=label,
      view=int(match["view"])))
  return images


class Mura(ManualImageBuilder):
  """MURA v1.1: 40,561 upper-extremity radiographs in 14,863 studies labelled normal/abnormal."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "EXIF orientation applied, transparency composited on black; sources above "
             "storage_bits refused unless allow_bit_depth_reduction; empty validation refused; "
             "CSVs with a byte-order mark accepted.",
  }
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MURA_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: gray image, label, body part, patient and study ids, view number, path."""
    config = self.builder_config
    validate_config(config)
    unknown = sorted(set(config.body_parts) - set(BODY_PARTS))
    if unknown:
      raise ValueError(f"Unknown MURA body parts {unknown}; known: {list(BODY_PARTS)}.")
    if not 0 <= config.validation_fraction < 1:
      raise ValueError(f"validation_fraction must be in [0, 1), got "
                       f"{config.validation_fraction}.")
    return self._image_info(  # in item order: images of a study are consecutive records
      {
        "image": image_feature(config, 1),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        "body_part": tfds.features.ClassLabel(names=list(BODY_PARTS)),
        "patient_id": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "view": tfds.features.Scalar(np.int32),
        "path": tfds.features.Text(),
      },
      homepage="https://stanfordmlgroup.github.io/competitions/mura/",
      citation="Rajpurkar et al., 'MURA: Large Dataset for Abnormality Detection in "
      "Musculoskeletal Radiographs', arXiv:1712.06957, 2017.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Reads and checks both listings and every file's presence before writing anything."""
    config = self.builder_config
    root = collection_root(manual_dir(dl_manager, self.name), _FOLDER, self.name,
                           MURA_INSTRUCTIONS)
    base = root.parent
    listings = {split: read_listing(root, split) for split in _OFFICIAL_SPLITS}
    missing = [image.path for images in listings.values() for image in images
               if not (base / image.path).is_file()]
    if missing:
      raise missing_error(self.name, f"{len(missing)} listed image(s), e.g. {missing[:3]},",
                          base, MURA_INSTRUCTIONS)
    shared = sorted({image.patient_id for image in listings["train"]}
                    & {image.patient_id for image in listings["valid"]})
    if shared:
      raise ValueError(f"{self.name}: {len(shared)} patient(s) are in both the official train and "
                       f"valid listings, e.g. {shared[:5]}; MURA's splits are patient-disjoint, "
                       f"so the copy under {root} is mixed up.")
    train = listings["train"]
    carved = assign_splits([image.patient_id for image in train],
                           (1 - config.validation_fraction, config.validation_fraction),
                           config.split_seed)
    per_split = {**group_by_split(train, carved, ("train", "validation")),
                 "test": listings["valid"]}
    record_unhandled(self.info, list_unhandled(root, (".csv",), base), root)
    record_split_provenance(self.info, {
        "train": "MURA's official train listing less the validation carve",
        "validation": f"{config.validation_fraction:.0%} of the official train listing's "
                      f"patients (split_seed {config.split_seed})",
        "test": "MURA's official valid listing (its test set is not public)"})
    parts = {BODY_PARTS.index(part) for part in config.body_parts} or set(range(len(BODY_PARTS)))
    for split, images in per_split.items():
      kept = [image for image in images if image.body_part in parts]
      per_split[split] = sorted(kept, key=lambda image: (image.study_id, image.view))

    def make_example(image: MuraImage) -> dict[str, Any]:
      pixels = read_unit_image(base / image.path, 1, config)
      if config.remove_border:
        pixels = preprocess.remove_uniform_border(pixels, tolerance=config.border_tolerance)
      return {
        "image": encode_image(fit_to_config(pixels, config), config),
        "label": image.label,
        "body_part": image.body_part,
        "patient_id": image.patient_id,
        "study_id": image.study_id,
        "view": image.view,
        "path": image.path,
      }

    return self._split_iterators(per_split, make_example,
                                 validation_fraction=config.validation_fraction,
                                 label_of=lambda image: LABEL_NAMES[image.label])


def read_metadata(builder: tfds.core.DatasetBuilder, split: str,
                  keys: Sequence[str] = ("study_id", "label"),
                  chunk: int = 1024) -> dict[str, np.ndarray]:
  """Non-image features of every example of a prepared split, read without decoding images."""
  source = builder.as_data_source(split=split,
                                  decoders={"image": tfds.decode.SkipDecoding()})
  columns: dict[str, list[Any]] = {key: [] for key in keys}
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      for key in keys:
        value = record[key]
        columns[key].append(value.decode() if isinstance(value, bytes) else value)
  return {key: np.asarray(values) for key, values in columns.items()}


def study_groups(study_ids: Sequence[str]) -> dict[str, np.ndarray]:
  """Example indices of every study, studies in order of first appearance."""
  groups: dict[str, list[int]] = {}
  for index, study in enumerate(study_ids):
    groups.setdefault(study.decode() if isinstance(study, bytes) else str(study), []).append(index)
  return {study: np.asarray(indices) for study, indices in groups.items()}


def study_scores(scores: np.ndarray, study_ids: Sequence[str],
                 labels: Sequence[int] | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
  """(study ids, mean image score per study, study labels or None): MURA's study-level view.

  Rajpurkar et al. average the abnormality probabilities of a study's images; pass probabilities
  (not logits) to reproduce that. Raises if a study's images disagree on the label.
  """
  scores = np.asarray(scores, np.float64)
  groups = study_groups(study_ids)
  means = np.asarray([scores[indices].mean(axis=0) for indices in groups.values()])
  if labels is None:
    return list(groups), means, None
  labels = np.asarray(labels)
  study_labels = []
  for study, indices in groups.items():
    values = np.unique(labels[indices])
    if len(values) != 1:
      raise ValueError(f"Study {study} has images with labels {values.tolist()}.")
    study_labels.append(values[0])
  return list(groups), means, np.asarray(study_labels)
