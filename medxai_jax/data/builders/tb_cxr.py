"""TFDS builder for the NLM tuberculosis chest X-ray sets, Montgomery County and Shenzhen (002).

002 trains on both sets (138 + 662 posterior-anterior radiographs, TB or normal), with the image
"resized to a 1024 x 1024 matrix and contrast-enhanced by applying CLAHE", split 70/20/10 into
train/validation/test; the default config does that (one radiograph per patient, so the split is
patient-wise; stratified by source and label). The label is the last digit of the file name.

Montgomery's PNGs hold 12-bit values in 16-bit files. They are divided by 4095 (not 65535) into
float, resized and equalised in float, and quantised once at the end: to uint8 by default (what
the training pipeline reads), or to uint16 with `storage_bits=16` (config `montgomery_16bit`: no
CLAHE, so the stored values are the original 12-bit ones times 65535/4095 up to resampling). To
train on it, pass `--config.dataset.builder_config=montgomery_16bit` with
`--config.preprocess.bit_depth=16` (the default None infers 16 bits from uint16 as well; 12 would
be wrong here, as the stored values already span 0..65535).
Montgomery's left and right lung masks are combined into one `lung_mask`. Shenzhen's set ships
none, but a separately released set of Shenzhen lung masks is read when present (in
`ChinaSet_AllFiles/` or manual_dir, a folder `mask/`, `masks/` or `extra_lung_masks/` holding
`CHNCXR_####_{0,1}_mask.png` or `CHNCXR_####_{0,1}.png`); a Shenzhen image without one is kept
with an empty mask and `has_lung_mask` False. Masks are binarised at half of their own maximum
value (the Shenzhen masks are antialiased 8-bit PNGs; Montgomery's are 0/255).
Splits are by patient (`patient_id`, the file name without the label digit), so no patient is
in two splits. Files that are not images, readings or ReadMe documents are listed in
info.metadata['unhandled_files']. The clinical reading text is kept whole, with sex
and age parsed from it (unknown / -1 when the text does not say); readings are free text, read as
UTF-8 and, when a file is not UTF-8, as Latin-1 (which decodes any bytes; logged once, with the
count and one file), so no reading is refused or altered with replacement characters.

Bit depth: the 8-bit configs reduce Montgomery's 12 bits to 8 on purpose (002 equalises 8-bit
images), so this builder's `allow_bit_depth_reduction` defaults to True; set it False to have
any 16-bit source refused with storage_bits=8. A split left empty by too few images for its
share stops the preparation, naming the counts per source and label. Images and masks are turned
upright by their EXIF orientation; an image and mask with different orientations stop the
preparation naming both (`common.check_mask_orientation`); transparency is composited on black.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
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
  check_bit_depth_kept,
  check_decoded_depth,
  check_mask_orientation,
  config_by_name,
  encode_image,
  encode_mask,
  fit_to_config,
  group_by_split,
  image_feature,
  list_unhandled,
  manual_dir,
  mask_feature,
  missing_error,
  read_text_file,
  record_unhandled,
  source_bits,
  validate_config,
)

SOURCES: tuple[str, ...] = ("montgomery", "shenzhen")
LABEL_NAMES = ("normal", "tuberculosis")
SEX_NAMES = ("unknown", "female", "male")
_FOLDERS = {"montgomery": "MontgomerySet", "shenzhen": "ChinaSet_AllFiles"}
_PREFIXES = {"montgomery": "MCUCXR", "shenzhen": "CHNCXR"}
_FILE_NAME = re.compile(r"^(?P<prefix>MCUCXR|CHNCXR)_(?P<number>\d+)_(?P<label>[01])\.png$",
                        re.IGNORECASE)

TB_INSTRUCTIONS = """\
Download the Montgomery County and Shenzhen chest X-ray sets from the U.S. National Library of
Medicine (https://lhncbc.nlm.nih.gov/LHC-publications/pubs/TuberculosisChestXrayImageDataSets.html)
and unzip both into manual_dir, keeping their folders as shipped:

  MontgomerySet/CXR_png/MCUCXR_####_{0,1}.png            (last digit 1 = TB)
  MontgomerySet/ManualMask/leftMask/MCUCXR_####_{0,1}.png
  MontgomerySet/ManualMask/rightMask/MCUCXR_####_{0,1}.png
  MontgomerySet/ClinicalReadings/MCUCXR_####_{0,1}.txt
  ChinaSet_AllFiles/CXR_png/CHNCXR_####_{0,1}.png
  ChinaSet_AllFiles/ClinicalReadings/CHNCXR_####_{0,1}.txt
  ChinaSet_AllFiles/mask/CHNCXR_####_{0,1}_mask.png      (optional: the separately released
                                                          Shenzhen lung masks; also accepted as
                                                          masks/ or extra_lung_masks/, directly
                                                          in manual_dir, or named like the image)

The configs 'montgomery' and 'shenzhen' need only their own set.
"""


@dataclasses.dataclass(eq=False)
class TbCxrConfig(ImageBuilderConfig):
  """Sets included, CLAHE, Montgomery's bit depth and the split fractions.

  sources: 'montgomery' and/or 'shenzhen'. clahe: equalise after resizing (002;
  `preprocess.clahe`, MATLAB adapthist's defaults). montgomery_bit_depth: significant bits of
  Montgomery's 16-bit PNGs (12). split_fractions: train/validation/test (002: 70/20/10).
  allow_bit_depth_reduction: True here (unlike the other builders): 002's 8-bit configs quantise
  Montgomery's 12-bit values to 8 bits knowingly; `montgomery_16bit` keeps them.
  """

  allow_bit_depth_reduction: bool = True
  sources: tuple[str, ...] = SOURCES
  clahe: bool = True
  montgomery_bit_depth: int = 12
  split_fractions: tuple[float, ...] = (0.7, 0.2, 0.1)


def _config(name: str, description: str, **fields: Any) -> TbCxrConfig:
  """A named config at 002's 1024 x 1024 (stretched, as 002 resizes to a square matrix)."""
  return TbCxrConfig(name=name, description=description, image_size=1024,
                     resize_mode="stretch", **fields)


_CONFIGS = [
  _config("combined", "Montgomery + Shenzhen, 1024 x 1024, CLAHE (002)."),
  _config("combined_noclahe", "Montgomery + Shenzhen, 1024 x 1024, no CLAHE.", clahe=False),
  _config("montgomery", "Montgomery only, 1024 x 1024, CLAHE.", sources=("montgomery",)),
  _config("shenzhen", "Shenzhen only, 1024 x 1024, CLAHE.", sources=("shenzhen",)),
  _config("montgomery_16bit", "Montgomery only, 1024 x 1024, no CLAHE, stored as uint16 (full "
          "12-bit precision rescaled to 16 bits; train with --config.preprocess.bit_depth=16).",
          sources=("montgomery",), clahe=False, storage_bits=16),
]


def make_tb_config(base: str = "combined", **fields: Any) -> TbCxrConfig:
  """The named config `base` with some fields changed (and a name derived from them)."""
  return config_by_name(_CONFIGS, base, "tb_cxr", **fields)


def parse_reading(text: str) -> tuple[int, int]:
  """(sex index into SEX_NAMES, age in years or -1) from a clinical reading.

  Montgomery writes "Patient's Sex: M" / "Patient's Age: 044Y"; Shenzhen starts with
  "male 35yrs"; ages in months count as 0 years.
  """
  sex = 0
  match = re.search(r"Patient'?s\s+Sex:\s*([MF])", text, re.IGNORECASE)
  if match:
    sex = 1 if match[1].upper() == "F" else 2
  else:
    match = re.search(r"\b(female|male)\b", text, re.IGNORECASE)
    if match:
      sex = 1 if match[1].lower() == "female" else 2
  age = -1
  match = re.search(r"(\d+)\s*(?:y|yr|yrs|year|years)\b", text, re.IGNORECASE)
  if match:
    age = int(match[1])
  elif re.search(r"\d+\s*(?:mo|month|months|d|day|days)\b", text, re.IGNORECASE):
    age = 0
  return sex, age


@dataclasses.dataclass(frozen=True)
class TbImage:
  """One radiograph and the files that belong to it."""

  source: int
  path: pathlib.Path
  label: int
  patient_id: str  # the file name without the label digit, e.g. 'MCUCXR_0001'
  reading: pathlib.Path
  masks: tuple[pathlib.Path, ...]  # left, right (Montgomery), one lung mask (Shenzhen) or none


SHENZHEN_MASK_FOLDERS = ("mask", "masks", "extra_lung_masks")
# Companion files of the releases that are not images: clinical readings and the ReadMe documents.
COMPANION_SUFFIXES = (".txt", ".pdf", ".doc", ".docx")


def find_shenzhen_masks(manual: pathlib.Path, folder: pathlib.Path
                        ) -> dict[str, pathlib.Path]:
  """Image stem ('CHNCXR_0001_0') -> its lung mask, from the mask folders (SHENZHEN_MASK_FOLDERS)
  in the Shenzhen folder or in manual_dir, named '<stem>_mask.png' or '<stem>.png'; a stem with
  two masks raises ValueError naming both."""
  found: dict[str, pathlib.Path] = {}
  for parent in dict.fromkeys((folder, manual)):
    for name in SHENZHEN_MASK_FOLDERS:
      mask_dir = parent / name
      if not mask_dir.is_dir():
        continue
      for path in sorted(mask_dir.iterdir()):
        if path.suffix.lower() != ".png":
          continue
        stem = path.stem[:-len("_mask")] if path.stem.lower().endswith("_mask") else path.stem
        if stem in found:
          raise ValueError(f"tb_cxr: two lung masks for {stem}.png: {found[stem]} and {path}; "
                           "keep one.")
        found[stem] = path
  return found


def read_binary_mask(path: pathlib.Path) -> np.ndarray:
  """[H, W] bool mask: the first channel above half of the mask's own maximum, so 0/1, 0/255 and
  antialiased 0..255 masks all binarise at their edge (an all-zero mask stays empty)."""
  pixels = preprocess.read_image(path)[..., 0]
  return pixels.astype(np.float64) > float(pixels.max()) / 2


def list_source(manual: pathlib.Path, source: str) -> list[TbImage]:
  """Every radiograph of one set with its reading and masks; raises naming any missing file."""
  folder = source_folder(manual, source)
  images_dir = folder / "CXR_png"
  if not images_dir.is_dir():
    raise missing_error("tb_cxr", f"the {source} image folder", images_dir, TB_INSTRUCTIONS)
  images, unmatched = [], []
  shenzhen_masks = find_shenzhen_masks(manual, folder) if source == "shenzhen" else {}
  for path in sorted(images_dir.iterdir()):
    if path.suffix.lower() != ".png":
      continue  # e.g. Thumbs.db
    match = _FILE_NAME.match(path.name)
    if match is None or match["prefix"].upper() != _PREFIXES[source]:
      unmatched.append(path.name)
      continue
    reading = folder / "ClinicalReadings" / f"{path.stem}.txt"
    if not reading.is_file():
      raise missing_error("tb_cxr", f"the clinical reading of {path.name}", reading,
                          TB_INSTRUCTIONS)
    masks: tuple[pathlib.Path, ...] = ()
    if source == "montgomery":
      masks = tuple(folder / "ManualMask" / side / path.name for side in ("leftMask", "rightMask"))
      for mask in masks:
        if not mask.is_file():
          raise missing_error("tb_cxr", f"the lung mask of {path.name}", mask, TB_INSTRUCTIONS)
    elif path.stem in shenzhen_masks:
      masks = (shenzhen_masks[path.stem],)
    images.append(TbImage(source=SOURCES.index(source), path=path, label=int(match["label"]),
                          patient_id=f"{_PREFIXES[source]}_{match['number']}", reading=reading,
                          masks=masks))
  if unmatched:
    logging.warning("tb_cxr: ignoring %d PNG file(s) in %s not named %s_####_{0,1}.png: %s",
                    len(unmatched), images_dir, _PREFIXES[source], unmatched[:5])
  if not images:
    raise missing_error("tb_cxr", f"{_PREFIXES[source]}_####_{{0,1}}.png images", images_dir,
                        TB_INSTRUCTIONS)
  orphans = sorted(set(shenzhen_masks) - {image.path.stem for image in images})
  if orphans:
    logging.warning("tb_cxr: %d Shenzhen lung mask(s) match no image in %s and are not used, "
                    "e.g. %s", len(orphans), images_dir, [str(shenzhen_masks[stem])
                                                          for stem in orphans[:5]])
  if source == "shenzhen":
    logging.info("tb_cxr: %d of %d Shenzhen images have a lung mask.",
                 sum(bool(image.masks) for image in images), len(images))
  return images


READING_FALLBACK_ENCODING = "latin-1"


def read_readings(images: list[TbImage]) -> dict[pathlib.Path, str]:
  """Reading file -> its text (stripped), UTF-8 or else READING_FALLBACK_ENCODING; the files
  that needed the fallback are logged once, with their count and one of them."""
  texts, fallen_back = {}, []
  for image in images:
    text, encoding = read_text_file(image.reading, fallback=READING_FALLBACK_ENCODING)
    texts[image.reading] = text.strip()
    if encoding != "utf-8":
      fallen_back.append(str(image.reading))
  if fallen_back:
    logging.warning("tb_cxr: %d clinical reading(s) are not UTF-8 and were read as %s, e.g. %s.",
                    len(fallen_back), READING_FALLBACK_ENCODING, fallen_back[0])
  return texts


def source_folder(manual: pathlib.Path, source: str) -> pathlib.Path:
  """The folder of one set: manual_dir/<MontgomerySet|ChinaSet_AllFiles>, or manual_dir itself."""
  folder = manual / _FOLDERS[source]
  return manual if not folder.is_dir() and manual.name == _FOLDERS[source] else folder


class TbCxr(ManualImageBuilder):
  """Montgomery County and Shenzhen chest radiographs labelled normal or tuberculosis."""

  LOCALISATION_MASK_KEY = "lung_mask"  # see ManualImageBuilder
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Shenzhen lung masks read when present; masks binarised at half their maximum.",
    "1.2.0": "Readings that are not UTF-8 read as Latin-1 (not with replacement characters); "
             "EXIF orientation applied, transparency composited on black; empty splits refused.",
  }
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "combined"
  MANUAL_DOWNLOAD_INSTRUCTIONS = TB_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: image, label, lung mask, source, patient id, clinical reading, sex, age, path."""
    config = self.builder_config
    validate_config(config)
    if not config.sources or set(config.sources) - set(SOURCES):
      raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {config.sources}.")
    if len(config.split_fractions) != 3:
      raise ValueError(f"split_fractions needs 3 entries, got {config.split_fractions}.")
    return self._image_info(
      {
        "image": image_feature(config, 1),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        "lung_mask": mask_feature(config),
        "has_lung_mask": tfds.features.Scalar(np.bool_),
        "source": tfds.features.ClassLabel(names=list(SOURCES)),
        "patient_id": tfds.features.Text(),
        "clinical_reading": tfds.features.Text(),
        "sex": tfds.features.ClassLabel(names=list(SEX_NAMES)),
        "age": tfds.features.Scalar(np.int32),
        "path": tfds.features.Text(),
      },
      homepage="https://lhncbc.nlm.nih.gov/LHC-publications/pubs/"
      "TuberculosisChestXrayImageDataSets.html",
      citation="Jaeger et al., 'Two public chest X-ray datasets for computer-aided screening of "
      "pulmonary diseases', Quantitative Imaging in Medicine and Surgery 4(6), 2014.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Lists and checks every image, mask and reading before writing anything."""
    config = self.builder_config
    manual = manual_dir(dl_manager, self.name)
    images = [image for source in SOURCES if source in config.sources
              for image in list_source(manual, source)]
    record_split_provenance(self.info, carved_provenance(
        config.split_fractions, config.split_seed, "patient", "source and label"))
    which = assign_splits([image.patient_id for image in images], config.split_fractions,
                          config.split_seed, strata=[(image.source, image.label)
                                                     for image in images])
    readings = read_readings(images)
    record_unhandled(self.info, [
      path for source in SOURCES if source in config.sources
      for path in list_unhandled(source_folder(manual, source), COMPANION_SUFFIXES, manual)],
      manual)

    def make_example(image: TbImage) -> dict[str, Any]:
      raw = preprocess.read_image(image.path)
      bits = config.montgomery_bit_depth if (
        raw.dtype == np.uint16 and SOURCES[image.source] == "montgomery") else None
      check_decoded_depth(image.path, raw, config)
      check_bit_depth_kept(image.path, bits or source_bits(raw), config,
                           int(raw.max()) if raw.size and raw.dtype == np.uint16 else None)
      for path in image.masks:
        check_mask_orientation(image.path, path)
      try:
        pixels = preprocess.to_gray(preprocess.to_unit_float(raw, bits))
      except ValueError as error:
        raise ValueError(f"{image.path}: {error} (set the significant bits with "
                         "--config.dataset.builder.montgomery_bit_depth=N; now "
                         f"{config.montgomery_bit_depth})") from error
      if image.masks:
        parts = [read_binary_mask(path) for path in image.masks]
        for path, part in zip(image.masks, parts):
          if part.shape != pixels.shape[:2]:
            raise ValueError(f"Mask {path} is {part.shape}, its image {image.path} "
                             f"{pixels.shape[:2]}.")
        mask = np.logical_or.reduce(parts)
      else:
        mask = np.zeros(pixels.shape[:2], bool)
      pixels = fit_to_config(pixels, config)
      if config.clahe:
        pixels = preprocess.clahe(np.clip(pixels, 0.0, 1.0))
      text = readings[image.reading]
      sex, age = parse_reading(text)
      return {
        "image": encode_image(pixels, config),
        "label": image.label,
        "lung_mask": encode_mask(mask, config),
        "has_lung_mask": bool(image.masks),
        "source": image.source,
        "patient_id": image.patient_id,
        "clinical_reading": text,
        "sex": sex,
        "age": age,
        "path": image.path.relative_to(manual).as_posix(),
      }

    return self._split_iterators(
      group_by_split(images, which), make_example, fractions=config.split_fractions,
      label_of=lambda image: f"{SOURCES[image.source]} {LABEL_NAMES[image.label]}")
