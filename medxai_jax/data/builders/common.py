"""What the manual-download TFDS builders of this package share (MURA, Montgomery/Shenzhen, brain
tumour MRI, COVID-19 Radiography, medical modality folders).

A common config base and its derivation, the manual-folder checks (their errors name the missing
file and repeat the builder's MANUAL_DOWNLOAD_INSTRUCTIONS), image reading and features, the
corrupt-image policy, patient-wise splitting and the ordered, threaded example writer.

Every builder prepares offline in the `array_record` format and is read back with
`builder.as_data_source(split=...)`, like the phantoms. Images are stored as PNG bytes that we
encode with Pillow (8-bit, what the training pipeline reads), or, with `storage_bits=16`, as
zlib-compressed uint16 tensors (tfds cannot decode 16-bit PNGs without OpenCV).

Decoding keeps what the file shows: EXIF orientations are applied, transparency is composited on
black (one warning per split names a file and the count), and a source with more than 8 bits
(16-bit PNG/TIFF, DICOM with BitsStored > 8) is never reduced to 8 bits silently: with
`storage_bits=8` its preparation stops naming the file, unless `allow_bit_depth_reduction=True`
(see `check_bit_depth_kept`). Splits left empty by too few images for their share are refused at
preparation (`empty_split_error`), and text companions that cannot be decoded name the file and
line (`read_text_file`). Corrupt images
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data import preprocess
from medxai_jax.observe import progress

SPLITS = ("train", "validation", "test")
CORRUPT_POLICIES = ("fail", "skip")
RESIZE_MODES = ("pad", "stretch")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif",
                  *preprocess.DICOM_SUFFIXES)  # what read_unit_image reads
_CHUNK = 64  # images decoded at a time (bounded memory, ordered output)

_Item = TypeVar("_Item")


# tfds' BuilderConfig is a mutable dataclass (frozen subclasses are impossible), so configs are
# immutable by convention: derive new ones with `derive_config`.
@dataclasses.dataclass(eq=False)
class ImageBuilderConfig(tfds.core.BuilderConfig):
  """How a manual-download builder stores images; subclasses add their collection's fields.

  image_size: side of the stored square images; 0 keeps every image's own size (then shapes vary
    and the training pipeline, which stacks images, cannot batch them).
  resize_mode: 'pad' scales to fit and centres on black (aspect ratio kept, 001) or 'stretch'.
  storage_bits: 8 stores uint8 PNG; 16 stores uint16 (zlib tensor) for full precision, which
    training scales by 65535 (`--config.preprocess.bit_depth=16`, or the default None). A 16-bit
    PNG/TIFF is stored with its values unchanged, so one holding 12-bit values (0..4095) is
    trained with `--config.preprocess.bit_depth=12`; a DICOM is stored as displayed, its
    BitsStored levels spread over 0..65535 (train with 16 or None).
  allow_bit_depth_reduction: with storage_bits=8, a source of more than 8 bits (16-bit PNG/TIFF,
    DICOM BitsStored > 8) stops the preparation naming the file (False, the default) or is
    quantised to 8 bits (True: its values divided by 65535, or its BitsStored range, times 255).
    16-bit colour or gray+alpha PNGs, which Pillow decodes to 8 bits, are refused whatever
    storage_bits is unless this is True. tb_cxr and brain_tumor_mri default to True (their
    papers' 8-bit configs reduce Montgomery's 12 bits and the int16 MRI slices on purpose).
  on_corrupt: 'fail' stops at the first undecodable image, naming it; 'skip' leaves such images
    out, logs each and lists them in `info.metadata['skipped_files']`.
  split_seed: seed of every split this builder carves.
  """

  image_size: int = 0
  resize_mode: str = "pad"
  storage_bits: int = 8
  allow_bit_depth_reduction: bool = False
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


def config_by_name(configs: Sequence[ImageBuilderConfig], base: str, builder_name: str,
                   **fields: Any) -> ImageBuilderConfig:
  """The config named `base` among `configs` with some fields changed (see `derive_config`)."""
  by_name = {config.name: config for config in configs}
  if base not in by_name:
    raise ValueError(f"Unknown {builder_name} config {base!r}; known: {sorted(by_name)}.")
  return derive_config(by_name[base], **fields)


# Builder options are set on the command line as --config.dataset.builder.<option>=<value>.
OPTION_FLAG_PREFIX = "--config.dataset.builder."


def option_flag(name: str, value: Any) -> str:
  """The command-line spelling of a builder option, e.g. '--config.dataset.builder.with_masks=False'
  (tuples as comma-separated values)."""
  if isinstance(value, (tuple, list)):
    value = ",".join(str(element) for element in value)
  return f"{OPTION_FLAG_PREFIX}{name}={value}"


def validate_split_fractions(fractions: Sequence[float]) -> None:
  """Raises ValueError unless `fractions` are one share per split (train, validation, test),
  each >= 0, summing to 1."""
  values = np.asarray(fractions, np.float64)
  if values.shape != (len(SPLITS),) or (values < 0).any() or abs(values.sum() - 1.0) > 1e-6:
    raise ValueError(
      f"split_fractions must be {len(SPLITS)} shares (for {', '.join(SPLITS)}), each >= 0, "
      f"summing to 1; got {tuple(fractions)} (e.g. "
      f"{option_flag('split_fractions', (0.7, 0.1, 0.2))}).")


def validate_config(config: ImageBuilderConfig) -> None:
  """Raises ValueError for a config field outside its allowed values."""
  if getattr(config, "split_fractions", None) is not None:
    validate_split_fractions(config.split_fractions)
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


def source_bits(image: np.ndarray) -> int:
  """Bits of a decoded PNG/JPEG/TIFF's container: 8 for uint8, 16 for uint16."""
  return preprocess.STORED_BITS[np.dtype(image.dtype)]


def check_bit_depth_kept(path: os.PathLike | str, bits: int, config: ImageBuilderConfig,
                         highest: int | None = None) -> None:
  """Raises ValueError, naming the file and the options, when storing a `bits`-bit source with
  the config's storage_bits would lose precision and the config does not allow that
  (allow_bit_depth_reduction); `highest`, the file's largest value, hints at 12-bit data."""
  if bits <= config.storage_bits or config.allow_bit_depth_reduction:
    return
  training = "--config.preprocess.bit_depth=16 or leave it unset"
  if highest is not None and highest < 2**12:
    training = (f"--config.preprocess.bit_depth=12: its values reach only {highest}, < 4096, so "
                "they are most likely 12-bit values, which are stored unchanged")
  raise ValueError(
    f"{os.fspath(path)} holds {bits}-bit pixels, but the config stores "
    f"storage_bits={config.storage_bits}: preparing would throw away {bits - config.storage_bits} "
    f"bits of every pixel. Keep them with {option_flag('storage_bits', 16)} (then train with "
    f"{training}), or reduce them knowingly with "
    f"{option_flag('allow_bit_depth_reduction', True)}.")


def check_decoded_depth(path: os.PathLike | str, raw: np.ndarray,
                        config: ImageBuilderConfig) -> None:
  """Raises ValueError, naming the file, when a 16-bit colour or gray+alpha PNG was decoded to
  8 bits (Pillow keeps only the top byte of such files, whatever storage_bits is), unless the
  config allows bit-depth reduction."""
  if raw.dtype != np.uint8 or config.allow_bit_depth_reduction:
    return
  if preprocess.png_sample_bits(path) == 16:
    raise ValueError(
      f"{os.fspath(path)} is a 16-bit colour (or gray + alpha) PNG, which the image reader "
      "(Pillow) decodes to its top 8 bits only, whatever storage_bits is. Convert such files to "
      "16-bit gray PNGs without alpha (read as 16 bits; then use "
      f"{option_flag('storage_bits', 16)}), or accept 8 bits with "
      f"{option_flag('allow_bit_depth_reduction', True)}.")


def read_unit_image(path: os.PathLike | str, channels: int = 1,
                    config: ImageBuilderConfig | None = None) -> np.ndarray:
  """An image file as float32 [0, 1] [H, W, channels]: 1 = gray (BT.601 luma), 3 = RGB.

  8-/16-bit PNG/JPEG/... files are decoded by `preprocess.read_image` (EXIF orientation applied,
  transparency composited on black) and scaled by their dtype's maximum; DICOM files (.dcm,
  .dicom, or any name with DICOM's 'DICM' prefix) as displayed, by `preprocess.dicom_to_unit`
  (modality and VOI transforms, MONOCHROME1 inverted, BitsStored kept). With `config`, a source
  of more bits than config.storage_bits is refused (`check_bit_depth_kept`). An undecodable file
  raises `preprocess.CorruptImageError` naming it (the corrupt-image policy then applies); a
  DICOM whose compression needs a missing package raises `preprocess.MissingDicomDecoderError`.
  """
  if preprocess.is_dicom_file(path):
    label = str(path)
    dataset = preprocess.read_dicom_dataset(path, label)
    pixels = preprocess.dicom_stored_pixels(dataset, label)
    if config is not None:
      check_bit_depth_kept(path, preprocess.dicom_bits_stored(dataset), config)
    image = preprocess.dicom_to_unit(dataset, pixels, label)
  else:
    raw = preprocess.read_image(path)
    if config is not None:
      check_decoded_depth(path, raw, config)
      check_bit_depth_kept(path, source_bits(raw), config,
                           int(raw.max()) if raw.size and raw.dtype == np.uint16 else None)
    image = preprocess.to_unit_float(raw)
  return preprocess.to_rgb(image) if channels == 3 else preprocess.to_gray(image)


def check_mask_orientation(image_path: os.PathLike | str, mask_path: os.PathLike | str) -> None:
  """Raises ValueError naming both files when an image and its mask carry different EXIF
  orientations: each is turned upright by its own, so the mask would no longer lie on the image
  (whether it was drawn on the stored or the displayed image cannot be told from the files)."""
  image_orientation = preprocess.exif_orientation(image_path)
  mask_orientation = preprocess.exif_orientation(mask_path)
  if image_orientation != mask_orientation:
    raise ValueError(
      f"{os.fspath(image_path)} has EXIF orientation {image_orientation} but its mask "
      f"{os.fspath(mask_path)} has {mask_orientation}: images and masks are turned upright by "
      "their own EXIF orientation, so these two would disagree. Save both with the same "
      "orientation (e.g. apply it to the image's pixels and remove its EXIF tag).")


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


def group_by_split(items: Sequence[_Item], which: Sequence[int],
                   names: Sequence[str] = SPLITS) -> dict[str, list[_Item]]:
  """Split name -> its items in their order, item i going to names[which[i]] (`assign_splits`)."""
  if len(items) != len(which):
    raise ValueError(f"{len(items)} items but {len(which)} split indices.")
  return {name: [item for item, index in zip(items, which) if index == position]
          for position, name in enumerate(names)}


def process_in_order(fn: Callable[[_Item], dict[str, Any]], items: Sequence[_Item], *,
                     on_corrupt: str, skipped: list[str],
                     notes: preprocess.DecodeNotes | None = None) -> Iterator[dict[str, Any]]:
  """fn(item) for every item, computed on threads (Pillow releases the GIL), yielded in order.

  A `preprocess.CorruptImageError` raised by fn is re-raised (on_corrupt='fail') or logged and
  its path appended to `skipped` (on_corrupt='skip'); other errors always propagate. What
  decoding changed (transparency, EXIF orientation) is recorded in `notes` when given.
  """

  def guarded(item: _Item) -> dict[str, Any] | preprocess.CorruptImageError:
    try:
      if notes is None:
        return fn(item)
      with preprocess.collecting_decode_notes(notes):
        return fn(item)
    except preprocess.CorruptImageError as error:
      return error

  with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for start in range(0, len(items), _CHUNK):
      for result in pool.map(guarded, items[start:start + _CHUNK]):
        if isinstance(result, preprocess.CorruptImageError):
          if on_corrupt == "fail":
            raise preprocess.CorruptImageError(
              result.path, f"{result.reason} ({option_flag('on_corrupt', 'skip')} leaves such "
              "files out and lists them in info.metadata['skipped_files'])") from result
          logging.warning("Skipping corrupt image %s: %s", result.path, result.reason)
          skipped.append(result.path)
          continue
        yield result


def split_examples(info: tfds.core.DatasetInfo, split: str, items: Sequence[_Item],
                   make_example: Callable[[_Item], dict[str, Any]],
                   on_corrupt: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(key, example) pairs of one split in item order (integer keys keep that order on disk);
  skipped corrupt files are recorded in `info.metadata['skipped_files'][split]`, and what decoding
  changed (transparency composited, EXIF orientation applied) is logged once per kind."""
  skipped: list[str] = []
  notes = preprocess.DecodeNotes()
  key = 0
  for example in progress.track(
      process_in_order(make_example, items, on_corrupt=on_corrupt, skipped=skipped, notes=notes),
      total=len(items), desc=f"{info.full_name}/{split}: decoding", unit="images"):
    yield key, example
    key += 1
  for line in notes.summary(f"{info.full_name}/{split}"):
    logging.warning("%s", line)
  info.metadata.setdefault("skipped_files", {})[split] = sorted(skipped)
  if skipped:
    logging.warning("%s/%s: skipped %d corrupt image(s), listed in the dataset's metadata.json "
                    "(info.metadata['skipped_files']).", info.full_name, split, len(skipped))


def class_counts(items: Sequence[Any], label_of: Callable[[Any], str]) -> dict[str, int]:
  """Class -> number of items, in order of first appearance."""
  counts: dict[str, int] = {}
  for item in items:
    label = label_of(item)
    counts[label] = counts.get(label, 0) + 1
  return counts


def empty_split_error(builder_name: str, split: str, per_split: Mapping[str, Sequence[Any]],
                      fractions: Sequence[float],
                      label_of: Callable[[Any], str] | None = None, *,
                      validation_fraction: float | None = None) -> ValueError:
  """The error for a split left empty by too few images for its share: it names the split, the
  images per class and per split, the shares and the option to change (split_fractions, or
  validation_fraction for builders that carve validation out of a given train split)."""
  all_items = [item for items in per_split.values() for item in items]
  per_class = (f"; images per class: {class_counts(all_items, label_of)}"
               if label_of is not None else "")
  sizes = {name: len(items) for name, items in per_split.items()}
  if validation_fraction is not None:
    shares = (f"validation_fraction {validation_fraction} (the share of the train split carved "
              f"out as validation) gives {sizes}")
    change = (f"raise it with {OPTION_FLAG_PREFIX}validation_fraction=F (0 < F < 1), or leave "
              f"validation out with {option_flag('validation_fraction', 0.0)}")
  else:
    shares = f"split fractions {tuple(fractions)} (train, validation, test) give {sizes}"
    change = (f"change the fractions with {OPTION_FLAG_PREFIX}split_fractions=TRAIN,VALIDATION,"
              "TEST (a share of 0 leaves that split out)")
  return ValueError(
    f"{builder_name}: split {split!r} came out empty: {len(all_items)} images{per_class}; "
    f"{shares}. Add images, or {change}; each share is rounded to whole images, or patients, "
    "within each class.")


def read_text_file(path: os.PathLike | str, *, fallback: str | None = None) -> tuple[str, str]:
  """(text, encoding) of a text file: UTF-8 (a byte-order mark is dropped), else `fallback`
  (e.g. 'latin-1', which decodes any bytes) when given. Without a fallback, bytes that are not
  UTF-8 raise ValueError naming the file, the line and the byte offset."""
  data = pathlib.Path(path).read_bytes()
  try:
    return data.decode("utf-8-sig"), "utf-8"
  except UnicodeDecodeError as error:
    if fallback is not None:
      return data.decode(fallback), fallback
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    raise ValueError(
      f"{os.fspath(path)}, line {line}, byte {column} of the line: not UTF-8 (byte "
      f"{data[error.start:error.start + 1]!r}: {error.reason}); save the file as UTF-8 (e.g. "
      "`iconv -f latin1 -t utf-8`).") from None


class ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download builders: each split is a list of items and a function that
  turns one item into an example (run on threads, in order, under the corrupt-image policy)."""

  # The mask feature localisation scores compare maps with (None: no such mask), and the
  # shortcut-marker mask (None: none); see `builders.mask_keys`. Subclasses set theirs.
  LOCALISATION_MASK_KEY: str | None = None
  MARKER_MASK_KEY: str | None = None

  def _image_info(self, features: Mapping[str, tfds.features.FeatureConnector],
                  **fields: Any) -> tfds.core.DatasetInfo:
    """DatasetInfo with what every manual builder needs: supervised ('image', 'label') pairs,
    records kept in item order (integer keys, no shuffling) and a metadata dict, where
    `split_examples` lists the skipped corrupt files; `fields` adds homepage, citation, ..."""
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__class__.__doc__,
      features=tfds.features.FeaturesDict(dict(features)),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
      **fields,
    )

  def _generate_examples(self, split: str, items: Sequence[Any],
                         make_example: Callable[[Any], dict[str, Any]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(key, example) pairs of one split, in item order."""
    yield from split_examples(self.info, split, items, make_example,
                              self.builder_config.on_corrupt)

  def _split_iterators(self, per_split: dict[str, Sequence[Any]],
                       make_example: Callable[[Any], dict[str, Any]], *,
                       fractions: Sequence[float] | None = None,
                       label_of: Callable[[Any], str] | None = None,
                       validation_fraction: float | None = None,
                       ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    """Generators of the splits that have items.

    With `fractions` (the shares the items were split by, in SPLITS order), a split that came out
    empty although its share is > 0 raises `empty_split_error` (with images per class when
    `label_of` names an item's class); other empty splits are dropped with a warning. Builders
    that carve validation out of a given train split pass `validation_fraction` instead: then
    only validation is checked (an empty given split is dropped with a warning, as before).
    """
    if validation_fraction is not None:
      fractions = (0.0, validation_fraction, 0.0)
    result = {}
    for split, items in per_split.items():
      if not items:
        share = fractions[SPLITS.index(split)] if fractions is not None else 0.0
        if share > 0:
          raise empty_split_error(self.name, split, per_split, fractions, label_of,
                                  validation_fraction=validation_fraction)
        logging.warning("%s: split %r has no examples and is not written.", self.info.full_name,
                        split)
        continue
      result[split] = self._generate_examples(split, items, make_example)
    return result


def is_image_file(path: pathlib.Path) -> bool:
  """Whether `read_unit_image` reads a file: an IMAGE_SUFFIXES suffix, or DICOM's 'DICM' prefix
  whatever the name (`preprocess.has_dicom_magic`)."""
  return path.suffix.lower() in IMAGE_SUFFIXES or preprocess.has_dicom_magic(path)


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `folder` (recursively, by `is_image_file`, so DICOMs named without .dcm
  too; hidden files excluded), sorted; `list_unhandled` names the files this leaves out."""
  return sorted(
    path for path in folder.rglob("*")
    if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    and is_image_file(path)
  )


# Operating-system clutter that is never data (matched by lower-cased file name).
SYSTEM_FILE_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})


def list_unhandled(folder: pathlib.Path, expected_suffixes: Sequence[str] = (),
                   relative_to: pathlib.Path | None = None, *,
                   read_suffixes: Sequence[str] | None = None) -> list[str]:
  """Files under `folder` that no reader handles, as sorted posix paths relative to `relative_to`
  (default `folder`): every file (hidden ones too) that the builder does not read, by suffix
  (`read_suffixes`) or, by default (None), by `is_image_file` (images and DICOMs), and whose
  suffix is not one of `expected_suffixes` (a builder's companions such as '.txt' readings or
  '.csv' listings), except operating-system clutter (SYSTEM_FILE_NAMES)."""
  base = relative_to or folder
  expected = {suffix.lower() for suffix in expected_suffixes}
  read = None if read_suffixes is None else {suffix.lower() for suffix in read_suffixes}

  def unhandled(path: pathlib.Path) -> bool:
    if path.suffix.lower() in expected or path.name.lower() in SYSTEM_FILE_NAMES:
      return False
    return not is_image_file(path) if read is None else path.suffix.lower() not in read

  return sorted(path.relative_to(base).as_posix() for path in folder.rglob("*")
                if path.is_file() and unhandled(path))


def record_split_provenance(info: tfds.core.DatasetInfo, provenance: Mapping[str, str]) -> None:
  """Records where each split's images come from, one line per split, in
  `info.metadata['split_provenance']` (saved with the dataset; training copies it into the run's
  splits.json and the run report prints it beside the test metrics)."""
  info.metadata["split_provenance"] = {split: str(line) for split, line in provenance.items()}


def carved_provenance(fractions: Sequence[float], seed: int, unit: str, strata: str = ""
                      ) -> dict[str, str]:
  """The provenance of train / validation / test carved by `assign_splits` from one pool."""
  by = f"by {unit}" + (f", stratified by {strata}" if strata else "")
  return {split: f"{share:.0%} of the images, drawn {by} (split_seed {seed})"
          for split, share in zip(SPLITS, fractions)}


def record_unhandled(info: tfds.core.DatasetInfo, unhandled: Sequence[str], where: os.PathLike | str
                     ) -> None:
  """Lists files no reader handles in `info.metadata['unhandled_files']` (saved with the dataset)
  and logs their count with a few examples, so nothing under the image folders is left out
  silently."""
  info.metadata["unhandled_files"] = sorted(unhandled)
  if unhandled:
    logging.warning("%s: %d file(s) under %s are not images and were not read, e.g. %s; all are "
                    "listed in the dataset's metadata.json (info.metadata['unhandled_files']).",
                    info.full_name, len(unhandled), os.fspath(where), list(unhandled)[:5])
