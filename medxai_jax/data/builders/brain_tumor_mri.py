"""TFDS builder for Cheng's figshare brain tumour MRI set (003): 3064 T1-weighted CE-MRI slices.

Each `<n>.mat` is a MATLAB v7.3 file (HDF5) holding the struct `cjdata`: `label` (1 meningioma,
2 glioma, 3 pituitary tumour), `PID` (the patient id as character codes), `image` (int16, mostly
512 x 512), `tumorBorder` ([x1, y1, x2, y2, ...]) and `tumorMask`. h5py reads MATLAB's
column-major arrays with their axes reversed, so images and masks are transposed back; the PID
codes are decoded to text. `cvind.mat` assigns every slice to one of five patient-wise folds.
Older (v5) MAT files are read with scipy as a fallback.

Stored: the image scaled per slice by its own min and max to [0, 1] (MRI intensities have no
fixed scale) and quantised to `storage_bits`; the tumour mask (for scoring explanations); the
border points as shipped (MATLAB's 1-based [x = column, y = row] in the original image);
the original size, fold, patient id and slice number. Splits: the default config splits patients
60/10/30 (003 tests on 30%; its 70% training share gives up 10 points to validation), stratified
by tumour type (a split left empty by too few patients for its share is refused at
preparation); configs `fold1`..`fold5` test on that cvind fold, validate on the next one and
train on the other three. Both are patient-wise: no PID is in two splits (unless cvind.mat
itself spreads a patient over folds, which is logged). Files under manual_dir other than .mat and
.zip files (and .txt notes) are listed in info.metadata['unhandled_files'].
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medxai_jax.data import preprocess
from medxai_jax.data.builders.common import (
  ImageBuilderConfig,
  ManualImageBuilder,
  assign_splits,
  check_bit_depth_kept,
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
  record_unhandled,
  validate_config,
)

LABEL_NAMES = ("meningioma", "glioma", "pituitary")
NUM_FOLDS = 5
_MAT_NAME = re.compile(r"^(\d+)\.mat$")

BRAIN_INSTRUCTIONS = """\
Download the brain tumour dataset of Jun Cheng from figshare
(https://doi.org/10.6084/m9.figshare.1512427, version 5) into manual_dir: the four archives
brainTumorDataPublic_*.zip and cvind.mat. The builder reads the <n>.mat files (1.mat .. 3064.mat,
MATLAB v7.3) straight from those zip archives or, if you extracted them, from anywhere under
manual_dir; cvind.mat (the five patient-wise folds) may be anywhere under manual_dir too. If you
downloaded the whole item as a single zip, extract that outer archive first.
"""


@dataclasses.dataclass(eq=False)
class BrainTumorConfig(ImageBuilderConfig):
  """The split: patient-wise fractions (test_fold=0) or one of cvind's five folds as test.

  test_fold: 0 splits patients by split_fractions (train/validation/test), stratified by tumour
  type and seeded by split_seed; k in 1..5 tests on fold k, validates on fold k % 5 + 1 and
  trains on the rest.
  allow_bit_depth_reduction: True here (unlike the folder builders): the int16 slices are
  min-max scaled per slice and, with the default storage_bits=8, quantised to 8 bits knowingly
  (003 trains on 8-bit images); False refuses that (use storage_bits=16 to keep the levels).
  """

  allow_bit_depth_reduction: bool = True
  test_fold: int = 0
  split_fractions: tuple[float, ...] = (0.6, 0.1, 0.3)


def _config(name: str, description: str, **fields: Any) -> BrainTumorConfig:
  """A named config at the set's native 512 x 512 (the few 256 x 256 slices are upsampled)."""
  return BrainTumorConfig(name=name, description=description, image_size=512,
                          resize_mode="stretch", **fields)


_CONFIGS = [
  _config("default", "Patient-wise 60/10/30 split, stratified by tumour type, 512 x 512."),
  *[_config(f"fold{k}", f"cvind fold {k} as test, fold {k % NUM_FOLDS + 1} as validation.",
            test_fold=k) for k in range(1, NUM_FOLDS + 1)],
]


def make_brain_config(base: str = "default", **fields: Any) -> BrainTumorConfig:
  """The named config `base` with some fields changed (and a name derived from them)."""
  return config_by_name(_CONFIGS, base, "brain_tumor_mri", **fields)


@dataclasses.dataclass(frozen=True)
class MatFile:
  """Where one MAT file lives: a file, or a member of a zip archive."""

  path: pathlib.Path
  member: str | None = None

  @property
  def location(self) -> str:
    """Readable location for messages: '/dir/3.mat' or '/dir/archive.zip:3.mat'."""
    return f"{self.path}:{self.member}" if self.member else str(self.path)

  def read(self) -> bytes:
    """The file's bytes (MAT files are small, about 0.5 MB a slice)."""
    if self.member is None:
      return self.path.read_bytes()
    with zipfile.ZipFile(self.path) as archive:
      return archive.read(self.member)


def is_v5_mat(data: bytes) -> bool:
  """Whether MAT-file bytes are the pre-v7.3 format (text header 'MATLAB 5.0'), not HDF5."""
  return data[:10] == b"MATLAB 5.0"


def find_mat_files(manual: pathlib.Path) -> tuple[dict[int, MatFile], MatFile | None]:
  """Slice number -> MAT file, and cvind.mat, from files and zip archives under `manual`.

  An extracted file wins over the same slice inside an archive (logged); the same slice twice in
  files, or twice in archives, is an error.
  """
  loose: dict[int, MatFile] = {}
  zipped: dict[int, MatFile] = {}
  cvind: list[MatFile] = []
  for path in sorted(manual.rglob("*")):
    if not path.is_file():
      continue
    name = path.name
    if name.lower() == "cvind.mat":
      cvind.append(MatFile(path))
    elif _MAT_NAME.match(name):
      index = int(_MAT_NAME.match(name)[1])
      if index in loose:
        raise ValueError(f"Slice {index} found twice: {loose[index].location} and {path}.")
      loose[index] = MatFile(path)
    elif path.suffix.lower() == ".zip":
      try:
        with zipfile.ZipFile(path) as archive:
          members = [info.filename for info in archive.infolist() if not info.is_dir()]
      except zipfile.BadZipFile as error:
        raise ValueError(f"Cannot read the zip archive {path} ({error}); extract it (e.g. with "
                         "unzip) into manual_dir, or remove it.") from error
      for member in members:
        base = member.rsplit("/", 1)[-1]
        if base.lower() == "cvind.mat":
          cvind.append(MatFile(path, member))
        elif _MAT_NAME.match(base):
          index = int(_MAT_NAME.match(base)[1])
          if index in zipped:
            raise ValueError(f"Slice {index} found twice: {zipped[index].location} and "
                             f"{path}:{member}.")
          zipped[index] = MatFile(path, member)
  if len(cvind) > 1:
    raise ValueError(f"Several cvind.mat files: {[file.location for file in cvind]}.")
  both = sorted(set(loose) & set(zipped))
  if both:
    logging.info("brain_tumor_mri: %d slice(s) exist both extracted and in an archive; using the "
                 "extracted files.", len(both))
  return {**zipped, **loose}, (cvind[0] if cvind else None)


def _mat_field(group: Any, name: str, location: str) -> np.ndarray:
  """One field of an HDF5 MATLAB struct as a numpy array."""
  if name not in group:
    raise preprocess.CorruptImageError(location, f"cjdata has no field {name!r}")
  return np.asarray(group[name])


def read_cjdata(file: MatFile, fields: tuple[str, ...] = ("label", "PID", "image", "tumorBorder",
                                                          "tumorMask")) -> dict[str, Any]:
  """The `cjdata` fields of one slice: label (1..3), PID (str), image/tumorMask (row-major
  [H, W]), tumorBorder ([K, 2] float32). Raises CorruptImageError naming the file."""
  import h5py  # host-only dependency, kept local

  location = file.location
  try:
    data = file.read()
    if is_v5_mat(data):
      raw = _read_cjdata_v5(data, location, fields)
    else:
      with h5py.File(io.BytesIO(data), "r") as mat:
        if "cjdata" not in mat:
          raise preprocess.CorruptImageError(location, "no struct 'cjdata'")
        raw = {name: _mat_field(mat["cjdata"], name, location) for name in fields}
      raw = {name: value.T if name in ("image", "tumorMask") else value  # column-major
             for name, value in raw.items()}
      if "PID" in raw:  # MATLAB chars are stored as uint16 codes
        raw["PID"] = "".join(chr(code) for code in raw["PID"].ravel() if code)
  except (preprocess.CorruptImageError, FileNotFoundError):
    raise
  except Exception as error:  # h5py/scipy raise OSError, ValueError, KeyError, zip errors...
    raise preprocess.CorruptImageError(location, f"{type(error).__name__}: {error}") from error
  result = dict(raw)
  if "label" in raw:
    label = int(np.asarray(raw["label"]).ravel()[0])
    if label not in (1, 2, 3):
      raise preprocess.CorruptImageError(location, f"label {label} is not 1, 2 or 3")
    result["label"] = label
  if "PID" in raw:
    result["PID"] = str(raw["PID"]).strip()
  if "tumorBorder" in raw:
    border = np.asarray(raw["tumorBorder"], np.float32).ravel()
    if border.size % 2:
      raise preprocess.CorruptImageError(location, f"tumorBorder has odd length {border.size}")
    result["tumorBorder"] = border.reshape(-1, 2)
  if "image" in raw and "tumorMask" in raw and raw["image"].shape != raw["tumorMask"].shape:
    raise preprocess.CorruptImageError(location, f"image {raw['image'].shape} and tumorMask "
                                                 f"{raw['tumorMask'].shape} differ in shape")
  if "image" in raw and np.asarray(raw["image"]).ndim != 2:
    raise preprocess.CorruptImageError(location, f"image has shape {raw['image'].shape}")
  return result


def _read_cjdata_v5(data: bytes, location: str, fields: tuple[str, ...]) -> dict[str, Any]:
  """`cjdata` from a pre-v7.3 MAT file with scipy (already row-major)."""
  from scipy import io as scipy_io  # host-only dependency, kept local

  mat = scipy_io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
  if "cjdata" not in mat:
    raise preprocess.CorruptImageError(location, "no struct 'cjdata'")
  struct = mat["cjdata"]
  missing = [name for name in fields if not hasattr(struct, name)]
  if missing:
    raise preprocess.CorruptImageError(location, f"cjdata has no fields {missing}")
  return {name: np.asarray(getattr(struct, name)) if name != "PID" else str(struct.PID)
          for name in fields}


def read_cvind(file: MatFile) -> np.ndarray:
  """The fold (1..5) of every slice, slice n at position n - 1, from cvind.mat (v7.3 or v5)."""
  import h5py  # host-only dependency, kept local
  from scipy import io as scipy_io

  data = file.read()
  try:
    if is_v5_mat(data):
      folds = np.asarray(scipy_io.loadmat(io.BytesIO(data))["cvind"]).ravel()
    else:
      with h5py.File(io.BytesIO(data), "r") as mat:
        folds = np.asarray(mat["cvind"]).ravel()
  except Exception as error:  # h5py/scipy raise OSError, ValueError, KeyError...
    raise ValueError(f"Cannot read the folds from {file.location}: {type(error).__name__}: "
                     f"{error}") from error
  folds = folds.astype(np.int64)
  if folds.size == 0 or not set(np.unique(folds)) <= set(range(1, NUM_FOLDS + 1)):
    raise ValueError(f"{file.location}: cvind must hold folds 1..{NUM_FOLDS}, got "
                     f"{sorted(set(np.unique(folds).tolist()))[:10]}.")
  return folds


def intensity_to_unit(image: np.ndarray) -> np.ndarray:
  """An MRI slice scaled by its own min and max to float32 [0, 1] (a constant slice gives 0)."""
  image = np.asarray(image, np.float64)
  low, high = float(image.min()), float(image.max())
  if high <= low:
    return np.zeros(image.shape, np.float32)
  return ((image - low) / (high - low)).astype(np.float32)


class BrainTumorMri(ManualImageBuilder):
  """T1-weighted CE-MRI slices of meningioma, glioma and pituitary tumours, with tumour masks."""

  LOCALISATION_MASK_KEY = "tumor_mask"  # see ManualImageBuilder
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = BRAIN_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    """Features: image, label, tumour mask and border, patient id, fold, slice index, size, path."""
    config = self.builder_config
    validate_config(config)
    if not 0 <= config.test_fold <= NUM_FOLDS:
      raise ValueError(f"test_fold must be in 0..{NUM_FOLDS}, got {config.test_fold}.")
    if len(config.split_fractions) != 3:
      raise ValueError(f"split_fractions needs 3 entries, got {config.split_fractions}.")
    return self._image_info(
      {
        "image": image_feature(config, 1),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        "tumor_mask": mask_feature(config),
        "tumor_border": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        "patient_id": tfds.features.Text(),
        "fold": tfds.features.Scalar(np.int32),
        "index": tfds.features.Scalar(np.int32),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "path": tfds.features.Text(),
      },
      homepage="https://doi.org/10.6084/m9.figshare.1512427.v5",
      citation="Cheng et al., 'Enhanced Performance of Brain Tumor Classification via Tumor "
      "Region Augmentation and Partition', PLoS ONE 10(10), 2015.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    """Finds every slice, reads labels, patient ids and folds, and splits before writing."""
    config = self.builder_config
    manual = manual_dir(dl_manager, self.name)
    files, cvind_file = find_mat_files(manual)
    if cvind_file is None:
      raise missing_error(self.name, "cvind.mat (the patient-wise folds)", manual,
                          BRAIN_INSTRUCTIONS)
    if not files:
      raise missing_error(self.name, "<n>.mat slices (files or brainTumorDataPublic_*.zip)",
                          manual, BRAIN_INSTRUCTIONS)
    folds = read_cvind(cvind_file)
    record_unhandled(self.info, list_unhandled(manual, (".txt",), read_suffixes=(".mat", ".zip")),
                     manual)
    expected = set(range(1, folds.size + 1))
    missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
    if missing or extra:
      raise ValueError(
        f"{self.name}: {cvind_file.location} lists {folds.size} slices, but slice files "
        f"{missing[:10]}{'...' if len(missing) > 10 else ''} are missing and "
        f"{extra[:10]}{'...' if len(extra) > 10 else ''} are unexpected (found {len(files)} "
        f"under {manual}).")
    indices = sorted(files)
    headers = {}
    for index in indices:  # labels and patient ids, needed for the patient-wise split
      try:
        headers[index] = read_cjdata(files[index], ("label", "PID"))
      except preprocess.CorruptImageError as error:
        if config.on_corrupt == "fail":
          raise
        headers[index] = None  # left for the writer to skip and record
        logging.warning("%s: cannot read %s: %s", self.name, error.path, error.reason)
    readable = [index for index in indices if headers[index] is not None]
    unreadable = [index for index in indices if headers[index] is None]
    self._check_folds(readable, headers, folds)
    if config.test_fold:
      test, validation = config.test_fold, config.test_fold % NUM_FOLDS + 1
      split_of = {index: 2 if folds[index - 1] == test else 1 if folds[index - 1] == validation
                  else 0 for index in readable}
    else:
      which = assign_splits([headers[index]["PID"] for index in readable],
                            config.split_fractions, config.split_seed,
                            strata=[headers[index]["label"] for index in readable])
      split_of = dict(zip(readable, which.tolist()))
    for index in unreadable:  # written nowhere; the train writer records them as skipped
      split_of[index] = 0

    def make_example(index: int) -> dict[str, Any]:
      data = read_cjdata(files[index])
      bits = min(16, 8 * data["image"].dtype.itemsize)  # int16 slices: 16
      check_bit_depth_kept(files[index].location, bits, config)
      image = intensity_to_unit(data["image"])[..., None]
      return {
        "image": encode_image(fit_to_config(image, config), config),
        "label": data["label"] - 1,
        "tumor_mask": encode_mask(data["tumorMask"], config),
        "tumor_border": data["tumorBorder"],
        "patient_id": data["PID"],
        "fold": int(folds[index - 1]),
        "index": index,
        "original_size": np.asarray(data["image"].shape, np.int32),
        "path": files[index].location,
      }

    per_split = group_by_split(indices, [split_of[index] for index in indices])
    if config.test_fold:  # cvind's folds: an empty one is logged and left out
      return self._split_iterators(per_split, make_example)
    return self._split_iterators(
      per_split, make_example, fractions=config.split_fractions,
      label_of=lambda index: (LABEL_NAMES[headers[index]["label"] - 1] if headers[index]
                              else "unreadable"))

  def _check_folds(self, indices: list[int], headers: dict[int, Any], folds: np.ndarray) -> None:
    """Warns if cvind puts one patient's slices into several folds (it should not)."""
    folds_of: dict[str, set[int]] = {}
    for index in indices:
      folds_of.setdefault(headers[index]["PID"], set()).add(int(folds[index - 1]))
    spread = sorted(pid for pid, values in folds_of.items() if len(values) > 1)
    if spread:
      logging.warning("%s: cvind.mat puts %d patient(s) into several folds, e.g. %s; fold "
                      "configs are then not patient-wise.", self.name, len(spread), spread[:5])
