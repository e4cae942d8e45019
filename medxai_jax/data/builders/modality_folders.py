"""TFDS builder for medical image-modality folders (004), and what the other builders share.

`medical_modalities` reads any folder of class-named subfolders (by default 004's seven modality
classes); its first half is the plumbing the other real-data builders of this package (MURA,
Montgomery/Shenzhen, brain tumour MRI, COVID-19 Radiography) import: a common config base, the
manual-folder checks, image features, the corrupt-image policy and patient-wise splitting.

Every builder prepares offline in the `array_record` format and is read back with
`builder.as_data_source(split=...)`, like the phantoms. Images are stored as PNG bytes that we
encode with Pillow (8-bit, what the training pipeline reads), or, with `storage_bits=16`, as
zlib-compressed uint16 tensors (tfds cannot decode 16-bit PNGs without OpenCV). Corrupt images
fail the preparation naming the file (`on_corrupt='fail'`, the default) or are left out with a
warning each and listed in `builder.info.metadata['skipped_files'][split]` (`on_corrupt='skip'`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data import preprocess

SPLITS = ("train", "validation", "test")
CORRUPT_POLICIES = ("fail", "skip")
RESIZE_MODES = ("pad", "stretch")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_CHUNK = 64  # images decoded at a time (bounded memory, ordered output)

_Item = TypeVar("_Item")


# ---------------------------------------------------------------------------------------------
# Shared by the manual-download builders.
# ---------------------------------------------------------------------------------------------


# tfds' BuilderConfig is a mutable dataclass (frozen subclasses are impossible), so configs are
# immutable by convention: derive new ones with `derive_config`.
@dataclasses.dataclass(eq=False)
class ImageBuilderConfig(tfds.core.BuilderConfig):
  """How a manual-download builder stores images; subclasses add their collection's fields.

  image_size: side of the stored square images; 0 keeps every image's own size (then shapes vary
    and the training pipeline, which stacks images, cannot batch them).
  resize_mode: 'pad' scales to fit and centres on black (aspect ratio kept, 001) or 'stretch'.
  storage_bits: 8 stores uint8 PNG; 16 stores uint16 (zlib tensor) for full precision, which
    training reads with `preprocess.scale_to_unit(images, 16)` instead of `to_unit_range`.
  on_corrupt: 'fail' stops at the first undecodable image, naming it; 'skip' leaves such images
    out, logs each and lists them in `info.metadata['skipped_files']`.
  split_seed: seed of every split this builder carves.
  """

  image_size: int = 0
  resize_mode: str = "pad"
  storage_bits: int = 8
  on_corrupt: str = "fail"
  split_seed: int = 0


_BASE_FIELDS = {field.name for field in dataclasses.fields(tfds.core.BuilderConfig)}


def config_fields(config: ImageBuilderConfig) -> dict[str, Any]:
  """The non-tfds fields of a config and their values."""
  return {
    field.name: getattr(config, field.name)
    for field in dataclasses.fields(config)
    if field.name not in _BASE_FIELDS
  }


def derive_config(base: ImageBuilderConfig, **changes: Any) -> ImageBuilderConfig:
  """`base` with some fields changed, named `<base>-<hash of the changes>` so settings never share
  a prepared directory (tfds reuses any prepared dataset of the same name and version)."""
  known = config_fields(base)
  unknown = set(changes) - set(known)
  if unknown:
    raise TypeError(f"unknown {type(base).__name__} fields: {sorted(unknown)}; known: "
                    f"{sorted(known)}")
  changes = {key: tuple(value) if isinstance(value, list) else value
             for key, value in changes.items()}
  changed = {key: value for key, value in changes.items() if value != known[key]}
  if not changed:
    return base
  digest = hashlib.sha1(json.dumps(sorted(changed.items()), default=str).encode()).hexdigest()
  config = dataclasses.replace(base, name=f"{base.name}-{digest[:10]}",
                               description=f"{base.name} with {changed}.", **changed)
  validate_config(config)
  return config


def validate_config(config: ImageBuilderConfig) -> None:
  """Raises ValueError for a config field outside its allowed values."""
  if config.image_size < 0:
    raise ValueError(f"image_size must be >= 0 (0 = native size), got {config.image_size}.")
  if config.resize_mode not in RESIZE_MODES:
    raise ValueError(f"resize_mode={config.resize_mode!r} is not one of {list(RESIZE_MODES)}.")
  if config.storage_bits not in (8, 16):
    raise ValueError(f"storage_bits must be 8 or 16, got {config.storage_bits}.")
  if config.on_corrupt not in CORRUPT_POLICIES:
    raise ValueError(f"on_corrupt={config.on_corrupt!r} is not one of {list(CORRUPT_POLICIES)}.")


def image_feature(config: ImageBuilderConfig, channels: int) -> tfds.features.FeatureConnector:
  """The stored-image feature: PNG uint8, or a zlib uint16 tensor when storage_bits is 16."""
  size = config.image_size or None
  shape = (size, size, channels)
  if config.storage_bits == 16:
    return tfds.features.Tensor(shape=shape, dtype=np.uint16, encoding="zlib")
  return tfds.features.Image(shape=shape, encoding_format="png")


def mask_feature(config: ImageBuilderConfig) -> tfds.features.Image:
  """A {0, 1} uint8 mask feature, PNG, in the stored image's geometry."""
  size = config.image_size or None
  return tfds.features.Image(shape=(size, size, 1), encoding_format="png")


def fit_to_config(image: np.ndarray, config: ImageBuilderConfig,
                  method: str = "bilinear") -> np.ndarray:
  """[H, W, C] image resized to the config's square size ('pad' or 'stretch'); 0 keeps it."""
  size = config.image_size
  if not size:
    return image
  if config.resize_mode == "pad":
    return preprocess.resize_with_padding_np(image, size, size, method=method)
  return preprocess.resize_np(image, size, size, method)


def encode_image(image: np.ndarray, config: ImageBuilderConfig) -> bytes | np.ndarray:
  """A [0, 1] float image in its stored form: PNG bytes (8 bits) or a uint16 array (16 bits)."""
  pixels = preprocess.quantize(image, config.storage_bits)
  return preprocess.encode_png(pixels) if config.storage_bits == 8 else pixels


def encode_mask(mask: np.ndarray, config: ImageBuilderConfig) -> bytes:
  """PNG bytes of a mask as {0, 1} uint8, resized (nearest neighbour) as the image was."""
  binary = (np.asarray(mask) > 0).astype(np.uint8)
  if binary.ndim == 2:
    binary = binary[..., None]
  return preprocess.encode_png(fit_to_config(binary, config, method="nearest"))


def manual_dir(dl_manager: tfds.download.DownloadManager, builder_name: str) -> pathlib.Path:
  """The manual download folder; a missing or empty one raises FileNotFoundError with the path and
  the builder's MANUAL_DOWNLOAD_INSTRUCTIONS."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as error:  # tfds' message names the folder and gives the instructions
    raise FileNotFoundError(f"{builder_name}: {error}") from None


def missing_error(builder_name: str, what: str, path: os.PathLike | str,
                  instructions: str) -> FileNotFoundError:
  """A FileNotFoundError naming what is missing, where it was looked for, and how to get it."""
  return FileNotFoundError(f"{builder_name}: {what} not found at {os.fspath(path)}.\n"
                           f"Download instructions:\n{instructions}")


def collection_root(manual: pathlib.Path, folder: str, builder_name: str,
                    instructions: str) -> pathlib.Path:
  """`manual/folder`, or `manual` itself when the user pointed manual_dir at `folder`."""
  if (manual / folder).is_dir():
    return manual / folder
  if manual.name == folder and manual.is_dir():
    return manual
  raise missing_error(builder_name, f"the collection folder {folder!r}", manual / folder,
                      instructions)


def canonical_name(name: str) -> str:
  """Lower case with runs of other characters as '_': 'Viral Pneumonia' -> 'viral_pneumonia'."""
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def assign_splits(groups: Sequence[str], fractions: Sequence[float], seed: int,
                  strata: Sequence[Any] | None = None) -> np.ndarray:
  """Split index (into `fractions`) of every example; all examples of a group share one split.

  Groups (patients; an example's own id where each patient has one image) are sorted, then within
  each stratum (a group's stratum is its first example's; None = one stratum) shuffled with
  `default_rng(seed)` and cut at the cumulative fractions, rounded to whole groups. The result
  depends only on the set of groups, their strata, the fractions and the seed, not on file order.
  """
  fractions = np.asarray(fractions, np.float64)
  if (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
    raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions.tolist()}.")
  stratum_of: dict[str, Any] = {}
  for index, group in enumerate(groups):
    stratum_of.setdefault(group, None if strata is None else strata[index])
  rng = np.random.default_rng(seed)
  split_of: dict[str, int] = {}
  for stratum in sorted({repr(value) for value in stratum_of.values()}):
    members = sorted(group for group, value in stratum_of.items() if repr(value) == stratum)
    order = rng.permutation(len(members))
    bounds = np.rint(np.cumsum(fractions) * len(members)).astype(int)
    for rank, member_index in enumerate(order):
      split_of[members[member_index]] = int(np.searchsorted(bounds, rank, side="right"))
  return np.asarray([split_of[group] for group in groups], np.int64)


def process_in_order(fn: Callable[[_Item], dict[str, Any]], items: Sequence[_Item], *,
                     on_corrupt: str, skipped: list[str]) -> Iterator[dict[str, Any]]:
  """fn(item) for every item, computed on threads (Pillow releases the GIL), yielded in order.

  A `preprocess.CorruptImageError` raised by fn is re-raised (on_corrupt='fail') or logged and
  its path appended to `skipped` (on_corrupt='skip'); other errors always propagate.
  """

  def guarded(item: _Item) -> dict[str, Any] | preprocess.CorruptImageError:
    try:
      return fn(item)
    except preprocess.CorruptImageError as error:
      return error

  with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for start in range(0, len(items), _CHUNK):
      for result in pool.map(guarded, items[start:start + _CHUNK]):
        if isinstance(result, preprocess.CorruptImageError):
          if on_corrupt == "fail":
            raise preprocess.CorruptImageError(
              result.path, f"{result.reason} (a builder config with on_corrupt='skip' leaves "
              "such files out and lists them in info.metadata['skipped_files'])") from result
          logging.warning("Skipping corrupt image %s: %s", result.path, result.reason)
          skipped.append(result.path)
          continue
        yield result


def split_examples(info: tfds.core.DatasetInfo, split: str, items: Sequence[_Item],
                   make_example: Callable[[_Item], dict[str, Any]],
                   on_corrupt: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(key, example) pairs of one split in item order (integer keys keep that order on disk);
  skipped corrupt files are recorded in `info.metadata['skipped_files'][split]`."""
  skipped: list[str] = []
  key = 0
  for example in process_in_order(make_example, items, on_corrupt=on_corrupt, skipped=skipped):
    yield key, example
    key += 1
  info.metadata.setdefault("skipped_files", {})[split] = sorted(skipped)
  if skipped:
    logging.warning("%s/%s: skipped %d corrupt image(s), listed in the dataset's metadata.json "
                    "(info.metadata['skipped_files']).", info.full_name, split, len(skipped))


class ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download builders: each split is a list of items and a function that
  turns one item into an example (run on threads, in order, under the corrupt-image policy)."""

  def _generate_examples(self, split: str, items: Sequence[Any],
                         make_example: Callable[[Any], dict[str, Any]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(key, example) pairs of one split, in item order."""
    yield from split_examples(self.info, split, items, make_example,
                              self.builder_config.on_corrupt)

  def _split_iterators(self, per_split: dict[str, Sequence[Any]],
                       make_example: Callable[[Any], dict[str, Any]]
                       ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    """Generators of the splits that have items; empty ones are dropped with a warning."""
    result = {}
    for split, items in per_split.items():
      if not items:
        logging.warning("%s: split %r has no examples and is not written.", self.info.full_name,
                        split)
        continue
      result[split] = self._generate_examples(split, items, make_example)
    return result


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `folder` (recursively, by suffix, hidden files excluded), sorted."""
  return sorted(
    path for path in folder.rglob("*")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    and not any(part.startswith(".") for part in path.relative_to(folder).parts)
  )


# ---------------------------------------------------------------------------------------------
# The medical modality folders builder (004).
# ---------------------------------------------------------------------------------------------

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

  <manual_dir>/<class>/**/<image>.{png,jpg,jpeg,bmp,tif,tiff,gif}
  or, already split,  <manual_dir>/{train,val|validation,test}/<class>/**/<image>

Class folders are matched to the config's class names after lower-casing and turning runs of
other characters into '_' ('Abdomen CT' -> 'abdomen_ct'). The default config expects 004's seven
classes: abdomen_ct, brain_mri, cardiac_abdomen_ultrasound, chest_xray, fluorescence_microscopy,
retinal_funduscopy, statistical_graph. For other class sets build the config with
`modality_folders.config_from_folder(path)`.
"""


@dataclasses.dataclass(eq=False)
class ModalityFoldersConfig(ImageBuilderConfig):
  """Class names, channels and split fractions of a class-per-folder collection.

  class_names: label order (canonical names, see `canonical_name`). channels: 3 stores RGB (gray
  images repeated), 1 stores gray (BT.601 luma). split_fractions: train/validation/test shares
  for a flat layout, stratified by class (004: 5000/500/500 of 6000 per class); a pre-split
  layout keeps its split folders and carves validation from train only when it has none.
  """

  class_names: tuple[str, ...] = MODALITIES
  channels: int = 3
  split_fractions: tuple[float, ...] = (10 / 12, 1 / 12, 1 / 12)


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

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_DEFAULT_MODALITY_CONFIG]
  DEFAULT_BUILDER_CONFIG_NAME = _DEFAULT_MODALITY_CONFIG.name
  MANUAL_DOWNLOAD_INSTRUCTIONS = MODALITY_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: image, label (the class folder), path (relative to manual_dir)."""
    config = self.builder_config
    validate_config(config)
    if config.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {config.channels}.")
    names = [canonical_name(name) for name in config.class_names]
    if len(set(names)) != len(names) or not names:
      raise ValueError(f"class_names must be distinct and non-empty, got {config.class_names}.")
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__class__.__doc__,
      features=tfds.features.FeaturesDict({
        "image": image_feature(config, config.channels),
        "label": tfds.features.ClassLabel(names=names),
        "path": tfds.features.Text(),
      }),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
      citation="Kim, Rajaraman and Antani, 'Visual Interpretation of Convolutional Neural "
      "Network Predictions in Classifying Medical Image Modalities', Diagnostics, 2019.",
    )

  def _class_images(self, folder: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    """(image path, label) of every image in a folder of class subfolders; checks the classes."""
    names = self.info.features["label"].names
    found = _class_folders(folder)
    unknown = sorted(set(found) - set(names))
    missing = sorted(set(names) - set(found))
    if unknown or missing:
      raise ValueError(
        f"{self.name}: class folders in {folder} do not match the config's classes {names}: "
        f"unexpected {unknown}, missing {missing} (folders are matched by canonical name; use "
        "modality_folders.config_from_folder for another class set).")
    items = []
    for label, name in enumerate(names):
      images = list_images(found[name])
      if not images:
        raise ValueError(f"{self.name}: class folder {found[name]} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
      items.extend((path, label) for path in images)
    return items

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Lists and checks every file first, so a malformed folder fails before anything is written."""
    config = self.builder_config
    manual = manual_dir(dl_manager, self.name)
    split_folders = _split_folders(manual)
    fractions = config.split_fractions
    if split_folders:
      if "train" not in split_folders or "test" not in split_folders:
        raise missing_error(self.name, "train/ and test/ split folders (a split layout needs "
                            "both)", manual, MODALITY_INSTRUCTIONS)
      per_split = {split: self._class_images(folder) for split, folder in split_folders.items()}
      if "validation" not in per_split:
        train = per_split["train"]
        share = fractions[1] / (fractions[0] + fractions[1])
        which = assign_splits([str(path) for path, _ in train], (1 - share, share),
                              config.split_seed, strata=[label for _, label in train])
        per_split["train"] = [item for item, w in zip(train, which) if w == 0]
        per_split["validation"] = [item for item, w in zip(train, which) if w == 1]
    else:
      items = self._class_images(manual)
      which = assign_splits([str(path) for path, _ in items], fractions, config.split_seed,
                            strata=[label for _, label in items])
      per_split = {split: [item for item, w in zip(items, which) if w == index]
                   for index, split in enumerate(SPLITS)}

    def make_example(item: tuple[pathlib.Path, int]) -> dict[str, Any]:
      path, label = item
      relative = path.relative_to(manual).as_posix()
      image = preprocess.to_unit_float(preprocess.read_image(path))
      image = preprocess.to_rgb(image) if config.channels == 3 else preprocess.to_gray(image)
      return {"image": encode_image(fit_to_config(image, config), config), "label": label,
              "path": relative}

    return self._split_iterators(
      {split: per_split[split] for split in SPLITS if split in per_split}, make_example)
