"""On-device preprocessing from stored uint8/uint16 images to model inputs.

The second half holds host-side (numpy) image functions that the dataset builders run once at
prepare time: decoding 8-/16-bit PNG/JPEG and DICOM, bit-depth scaling, gray <-> RGB, resizing
with aspect-preserving padding, CLAHE and removal of a uniform border frame.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Bits of the stored pixel dtypes the training pipeline reads; float images are already [0, 1].
STORED_BITS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}


def check_bit_depth(bit_depth: int | None) -> None:
  """Raises ValueError unless bit_depth is None (infer from the dtype) or an int in [1, 16]."""
  if bit_depth is None:
    return
  if isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or not (
      1 <= bit_depth <= 16):
    raise ValueError(f"config.preprocess.bit_depth must be None (infer from the image dtype) or "
                     f"an integer in [1, 16], got {bit_depth!r}.")


def to_unit_range(images: jax.Array, bit_depth: int | None = None) -> jax.Array:
  """uint8/uint16 (or float) images to float32 in [0, 1], dividing by 2**bits - 1.

  bits is `bit_depth` when given (12 for Montgomery's 12-bit values in 16-bit PNGs), else the
  dtype's: 8 for uint8, 16 for uint16. Float images are taken to be in [0, 1] already and only
  cast. Other dtypes, or a bit depth above the dtype's, raise ValueError naming the dtype. The
  dtype is static, so this is decided at trace time.
  """
  check_bit_depth(bit_depth)
  dtype = np.dtype(images.dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return images.astype(jnp.float32)
  if dtype not in STORED_BITS:
    raise ValueError(f"Images of dtype {dtype} cannot be scaled to [0, 1]: expected uint8, "
                     "uint16 or float (already in [0, 1]).")
  bits = STORED_BITS[dtype] if bit_depth is None else int(bit_depth)
  if bits > STORED_BITS[dtype]:
    raise ValueError(f"config.preprocess.bit_depth={bit_depth} exceeds the {STORED_BITS[dtype]} "
                     f"bits of {dtype} images.")
  return scale_to_unit(images, bits)


def match_channels(images: jax.Array, channels: int) -> jax.Array:
  """Repeats a gray channel to `channels`, or averages RGB to gray when `channels` is 1."""
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1:
    return jnp.repeat(images, channels, axis=-1)
  if channels == 1:
    return images.mean(axis=-1, keepdims=True)
  raise ValueError(f"Cannot map images with {have} channels to {channels} channels.")


def make_preprocess_fn(input_shape: Sequence[int], mean: Sequence[float] = (0.0,),
                       std: Sequence[float] = (1.0,), *, bit_depth: int | None = None
                       ) -> Callable[[jax.Array], jax.Array]:
  """A jit-able map from a stored batch [B,H,W,C] to normalised float32 [B, *input_shape].

  The batch is scaled to [0, 1] by `to_unit_range(images, bit_depth)`: None infers 8 bits for
  uint8 and 16 for uint16 at trace time, an int (12 for raw Montgomery values) divides integer
  images by 2**bit_depth - 1; float input is taken to be in [0, 1] already.
  """
  height, width, channels = input_shape
  check_bit_depth(bit_depth)
  mean_array = jnp.asarray(mean, jnp.float32)
  std_array = jnp.asarray(std, jnp.float32)
  if (std_array <= 0).any():
    raise ValueError(f"config.preprocess.std must be positive, got {tuple(std)}.")

  def preprocess(images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"Expected images [B, H, W, C], got shape {images.shape}.")
    x = match_channels(to_unit_range(images, bit_depth), channels)
    if x.shape[1:3] != (height, width):
      x = jax.image.resize(x, (x.shape[0], height, width, channels), method="bilinear",
                           antialias=True)
    return (x - mean_array) / std_array

  return preprocess


# ---------------------------------------------------------------------------------------------
# Device side (JAX, jit-able): bit depths, normalisation, aspect-preserving resizing.
# ---------------------------------------------------------------------------------------------


def scale_to_unit(images: jax.Array, bit_depth: int) -> jax.Array:
  """Integer images holding `bit_depth`-bit values (8, 12, 16) to float32 in [0, 1].

  A stored uint16 image (16 bits, or 12 bits as in Montgomery) must be scaled with its own
  maximum 2**bit_depth - 1; `to_unit_range` picks the bit depth from the dtype when not given.
  """
  if not 1 <= bit_depth <= 16:
    raise ValueError(f"bit_depth must be in [1, 16], got {bit_depth}.")
  return images.astype(jnp.float32) / float(2**bit_depth - 1)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(images - mean) / std over the last (channel) axis; one mean/std entry or one per channel."""
  mean_array = jnp.asarray(mean, jnp.float32)
  std_array = jnp.asarray(std, jnp.float32)
  if mean_array.size not in (1, images.shape[-1]) or std_array.size not in (1, images.shape[-1]):
    raise ValueError(f"mean {tuple(mean)} / std {tuple(std)} do not match {images.shape[-1]} "
                     "channels.")
  return (images.astype(jnp.float32) - mean_array) / std_array


def normalize_imagenet(images: jax.Array) -> jax.Array:
  """[0, 1] RGB images [..., 3] normalised by the ImageNet mean and std (torchvision's convention)."""
  if images.shape[-1] != 3:
    raise ValueError(f"ImageNet normalisation needs 3 channels, got shape {images.shape}; use "
                     "match_channels(images, 3) first.")
  return normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def padded_resize_geometry(height: int, width: int, out_height: int,
                           out_width: int) -> tuple[int, int, int, int]:
  """(new_height, new_width, top, left): an image scaled to fit out_height x out_width, centred.

  The scale is the largest that fits both sides, so the aspect ratio is kept up to rounding to
  whole pixels; the padding is split evenly, an odd pixel going to the bottom/right.
  """
  if min(height, width, out_height, out_width) <= 0:
    raise ValueError(f"Sizes must be positive: {height}x{width} -> {out_height}x{out_width}.")
  scale = min(out_height / height, out_width / width)
  new_height = min(out_height, max(1, round(height * scale)))
  new_width = min(out_width, max(1, round(width * scale)))
  return new_height, new_width, (out_height - new_height) // 2, (out_width - new_width) // 2


def resize_with_padding(images: jax.Array, height: int, width: int, *, method: str = "bilinear",
                        pad_value: float = 0.0) -> jax.Array:
  """[..., H, W, C] images scaled to fit height x width with their aspect ratio kept, then padded.

  001's "resized ... while maintaining the aspect ratio through padding". Returns float32; the
  image is centred and the margins are `pad_value`. Shapes are static, so this jit-compiles.
  """
  if images.ndim < 3:
    raise ValueError(f"Expected images [..., H, W, C], got shape {images.shape}.")
  *lead, in_height, in_width, channels = images.shape
  new_height, new_width, top, left = padded_resize_geometry(in_height, in_width, height, width)
  resized = images.astype(jnp.float32)
  if (new_height, new_width) != (in_height, in_width):
    resized = jax.image.resize(resized, (*lead, new_height, new_width, channels), method=method,
                               antialias=True)
  padding = [(0, 0)] * len(lead) + [(top, height - new_height - top),
                                    (left, width - new_width - left), (0, 0)]
  return jnp.pad(resized, padding, constant_values=pad_value)


# ---------------------------------------------------------------------------------------------
# Host side (numpy / Pillow / scikit-image): what the dataset builders run once, at prepare time,
# on images of any size. Images are [H, W, C] arrays; "unit" images are float32 in [0, 1].
# ---------------------------------------------------------------------------------------------

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_PIL_RESAMPLING = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
                   "area": "BOX", "lanczos": "LANCZOS"}


class CorruptImageError(ValueError):
  """An image file that cannot be decoded into pixels; `path` names it."""

  def __init__(self, path: str, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"Cannot decode image {self.path}: {reason}")


# The EXIF tag that says how a camera or scanner held the image (1 = as stored; 2..8 = mirrored
# and/or rotated, TIFF 6.0 / EXIF 2.3).
EXIF_ORIENTATION_TAG = 0x0112

# What decoding may change about a file's pixels, reported once per collection (`DecodeNotes`).
ALPHA_COMPOSITED = "alpha_composited"  # transparent pixels composited on black
EXIF_TRANSPOSED = "exif_transposed"  # rotated/mirrored by the EXIF orientation
DECODE_NOTE_KINDS = (ALPHA_COMPOSITED, EXIF_TRANSPOSED)
_DECODE_NOTE_TEXT = {
  ALPHA_COMPOSITED: "had transparent pixels, composited on black (alpha removed)",
  EXIF_TRANSPOSED: "carried an EXIF orientation and were rotated/mirrored upright as displayed",
}


class DecodeNotes:
  """A thread-safe tally of the files whose pixels decoding changed, per kind (DECODE_NOTE_KINDS),
  so a whole collection is reported with one log line per kind rather than one per image."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._files: dict[str, list[str]] = {kind: [] for kind in DECODE_NOTE_KINDS}

  def add(self, kind: str, file: str) -> None:
    """Records that decoding `file` changed its pixels in the way `kind` names."""
    if kind not in self._files:
      raise ValueError(f"Unknown decode note {kind!r}; known: {list(DECODE_NOTE_KINDS)}.")
    with self._lock:
      self._files[kind].append(str(file))

  def files(self, kind: str) -> list[str]:
    """The files recorded under `kind`, sorted."""
    with self._lock:
      return sorted(self._files[kind])

  def summary(self, where: str) -> list[str]:
    """One sentence per kind with files: the count, what happened and one file, for `where`."""
    lines = []
    for kind in DECODE_NOTE_KINDS:
      files = self.files(kind)
      if files:
        lines.append(f"{where}: {len(files)} image file(s) {_DECODE_NOTE_TEXT[kind]}, e.g. "
                     f"{files[0]}")
    return lines


_ACTIVE_NOTES = threading.local()


@contextlib.contextmanager
def collecting_decode_notes(notes: DecodeNotes) -> Iterator[DecodeNotes]:
  """Within this block, on this thread, `read_image` records what it changes in `notes` instead
  of logging it for every file."""
  previous = getattr(_ACTIVE_NOTES, "notes", None)
  _ACTIVE_NOTES.notes = notes
  try:
    yield notes
  finally:
    _ACTIVE_NOTES.notes = previous


def _note_decoding(kind: str, label: str) -> None:
  """Records a decode note in the active `DecodeNotes`, or logs it when none is collecting."""
  notes = getattr(_ACTIVE_NOTES, "notes", None)
  if notes is not None:
    notes.add(kind, label)
  else:
    logging.warning("%s: the image %s.", label, _DECODE_NOTE_TEXT[kind].replace(" were ", " was "))


def exif_orientation(source: str | os.PathLike | bytes) -> int:
  """The EXIF orientation (1..8) of an image file, 1 when it has none (or is not an image)."""
  from PIL import Image  # host-only dependency, kept local

  handle = io.BytesIO(source) if isinstance(source, bytes) else source
  try:
    with Image.open(handle) as image:
      value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
  except FileNotFoundError:
    raise
  except Exception:  # not an image: reading its pixels reports it, naming the file
    return 1
  return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_sample_bits(source: str | os.PathLike | bytes) -> int | None:
  """Bits per sample (1, 2, 4, 8, 16) of a PNG file, from its IHDR chunk; None for other files.

  Pillow decodes 16-bit gray PNGs as 16 bits but 16-bit colour and gray+alpha PNGs as their top
  8 bits only, so this tells when decoded uint8 pixels came from a 16-bit file.
  """
  if isinstance(source, bytes):
    header = source[:26]
  else:
    with open(source, "rb") as handle:
      header = handle.read(26)
  if len(header) < 26 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
    return None
  return int(header[24])


def composite_on_black(array: np.ndarray) -> np.ndarray:
  """[H, W, C + 1] uint8 colour + alpha to [H, W, C] uint8: round(colour * alpha / 255), i.e.
  the image as displayed over a black background (opaque pixels unchanged, transparent ones 0)."""
  colour = array[..., :-1].astype(np.uint32)
  alpha = array[..., -1:].astype(np.uint32)
  return ((colour * alpha * 2 + 255) // 510).astype(np.uint8)


_EXPANDED_MODES = {"1": "L", "P": "RGB", "PA": "RGBA", "La": "LA", "RGBa": "RGBA",
                   "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
_WITH_ALPHA = {"1": "LA", "L": "LA", "P": "RGBA", "RGB": "RGBA"}


def decoded_mode(mode: str, has_transparency: bool) -> str:
  """The Pillow mode `read_image` converts a `mode` image to before taking its pixels: L, LA, RGB
  or RGBA for the 8-bit modes (with alpha when the file holds transparency: an alpha channel or
  a tRNS entry, `has_transparency`), unchanged for I, I;16* and anything it does not know."""
  if has_transparency and mode in _WITH_ALPHA:
    return _WITH_ALPHA[mode]
  return _EXPANDED_MODES.get(mode, mode)


def read_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
  """Decodes a PNG/JPEG/TIFF (any Pillow format) to [H, W, C] uint8 or uint16, as displayed.

  C is 1 for gray and 3 for colour. 8-bit gray/colour stays uint8; 16-bit gray PNGs (Pillow modes
  I;16*, or I within [0, 65535]) become uint16 with their stored values, so a 12-bit image keeps
  values 0..4095. An EXIF orientation (JPEG, PNG eXIf, TIFF) is applied (Pillow's
  `ImageOps.exif_transpose`), so the array is upright as viewers show it. Transparency (RGBA, LA,
  palette or gray/RGB images with a tRNS entry) is composited on black (`composite_on_black`);
  palette, bilevel and CMYK images are expanded to gray/RGB. Both changes are recorded in the
  active `DecodeNotes` (`collecting_decode_notes`; the builders report one line per split), or
  logged for this file when none is active. Raises CorruptImageError naming the file (`name`,
  else the path) when it cannot be decoded; a missing file raises FileNotFoundError.
  """
  from PIL import Image, ImageOps  # host-only dependency, kept local

  label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
  handle = io.BytesIO(source) if isinstance(source, bytes) else source
  try:
    with Image.open(handle) as image:
      image.load()
      orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
      upright = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
      target = decoded_mode(upright.mode, "transparency" in upright.info)
      if target != upright.mode:
        upright = upright.convert(target)
      mode = upright.mode
      array = np.asarray(upright)
  except FileNotFoundError:
    raise
  except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors...
    raise CorruptImageError(label, f"{type(error).__name__}: {error}") from error
  if orientation not in (None, 1):
    _note_decoding(EXIF_TRANSPOSED, label)
  if mode in ("LA", "RGBA"):
    if (array[..., -1] < 255).any():
      _note_decoding(ALPHA_COMPOSITED, label)
    array = composite_on_black(array)
  elif mode == "I":
    if array.size and (array.min() < 0 or array.max() > 65535):
      raise CorruptImageError(label, f"32-bit integer pixels outside [0, 65535] "
                                     f"({array.min()}..{array.max()})")
    array = array.astype(np.uint16)
  elif mode.startswith("I;16"):
    array = array.astype(np.uint16)
  elif mode not in ("L", "RGB"):
    raise CorruptImageError(label, f"unsupported pixel mode {mode!r}")
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] == 1 or array.shape[-1] == 3:
    return np.ascontiguousarray(array)
  raise CorruptImageError(label, f"unexpected pixel array shape {array.shape}")


DICOM_SUFFIXES = (".dcm", ".dicom")

# Transfer syntaxes pydicom cannot decode without an extra package: UID -> what to install.
_JPEG_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_JPEG_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
DICOM_DECODER_PACKAGES = {
  "1.2.840.10008.1.2.4.51": _JPEG_LIBJPEG,  # JPEG Extended (12-bit)
  "1.2.840.10008.1.2.4.57": _JPEG_LIBJPEG,  # JPEG Lossless
  "1.2.840.10008.1.2.4.70": _JPEG_LIBJPEG,  # JPEG Lossless, first-order prediction
  "1.2.840.10008.1.2.4.80": _JPEG_LIBJPEG + " (or: pip install pyjpegls)",  # JPEG-LS lossless
  "1.2.840.10008.1.2.4.81": _JPEG_LIBJPEG + " (or: pip install pyjpegls)",  # JPEG-LS near-lossless
  "1.2.840.10008.1.2.4.90": _JPEG_OPENJPEG,  # JPEG 2000 lossless
  "1.2.840.10008.1.2.4.91": _JPEG_OPENJPEG,  # JPEG 2000
  "1.2.840.10008.1.2.4.201": _JPEG_OPENJPEG,  # HTJ2K lossless
  "1.2.840.10008.1.2.4.202": _JPEG_OPENJPEG,  # HTJ2K lossless RPCL
  "1.2.840.10008.1.2.4.203": _JPEG_OPENJPEG,  # HTJ2K
}
_ANY_DECODER = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class MissingDicomDecoderError(RuntimeError):
  """A compressed DICOM whose transfer syntax needs a decoder package that is not installed.

  Not a CorruptImageError: the file is fine, so on_corrupt='skip' does not drop it; the message
  names the file, the transfer syntax and the package to install.
  """

  def __init__(self, path: str, syntax: str, install: str, detail: str):
    self.path = str(path)
    self.install = install
    super().__init__(f"Cannot decode DICOM {self.path}: its transfer syntax {syntax} needs a "
                     f"decoder that is not installed; install one with `{install}`. "
                     f"pydicom says: {detail}")


def is_dicom_path(path: str | os.PathLike) -> bool:
  """Whether a file name ends in a DICOM suffix (.dcm, .dicom; any case)."""
  return os.fspath(path).lower().endswith(DICOM_SUFFIXES)


def has_dicom_magic(path: str | os.PathLike) -> bool:
  """Whether a file holds DICOM's 'DICM' prefix after the 128-byte preamble (PACS exports often
  name DICOM files without .dcm, e.g. by their UID or 'IM0001'); False for unreadable files."""
  try:
    with open(path, "rb") as handle:
      return handle.read(132)[128:] == b"DICM"
  except OSError:
    return False


def is_dicom_file(path: str | os.PathLike) -> bool:
  """Whether a file is read as DICOM: a DICOM suffix, or the 'DICM' prefix (`has_dicom_magic`)."""
  return is_dicom_path(path) or has_dicom_magic(path)


def read_dicom_dataset(source: str | os.PathLike | bytes, label: str):
  """A DICOM file parsed by pydicom; one without the 128-byte preamble and 'DICM' prefix is read
  again with force=True. Raises CorruptImageError naming the file when it cannot be parsed or
  holds no PixelData; a missing file raises FileNotFoundError."""
  import pydicom  # host-only dependency, kept local
  from pydicom.errors import InvalidDicomError

  handle = (lambda: io.BytesIO(source)) if isinstance(source, bytes) else (lambda: source)
  try:
    try:
      dataset = pydicom.dcmread(handle())
    except InvalidDicomError:
      dataset = pydicom.dcmread(handle(), force=True)
    has_pixels = "PixelData" in dataset
  except FileNotFoundError:
    raise
  except Exception as error:  # pydicom raises InvalidDicomError, OSError, struct/value errors...
    raise CorruptImageError(label, f"not a readable DICOM file ({type(error).__name__}: "
                                   f"{error})") from error
  if not has_pixels:
    raise CorruptImageError(label, "DICOM file has no PixelData element")
  return dataset


def dicom_stored_pixels(dataset, label: str) -> np.ndarray:
  """The stored pixel values of a single-frame DICOM ([H, W] or [H, W, 3] RGB), decoded.

  Raises MissingDicomDecoderError when its compression needs a package that is not installed,
  CorruptImageError (naming the file) when the pixel data cannot be decoded or has several frames.
  """
  syntax_uid = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "") or "")
  try:
    pixels = dataset.pixel_array
  except RuntimeError as error:
    if "missing dependencies" in str(error) or "no pixel data handlers" in str(error).lower():
      syntax = getattr(dataset.file_meta.TransferSyntaxUID, "name", syntax_uid)
      raise MissingDicomDecoderError(label, f"{syntax} ({syntax_uid})",
                                     DICOM_DECODER_PACKAGES.get(syntax_uid, _ANY_DECODER),
                                     str(error)) from error
    raise CorruptImageError(label, f"undecodable DICOM pixel data ({error})") from error
  except Exception as error:  # truncated data, inconsistent Rows/Columns/BitsAllocated...
    raise CorruptImageError(label, f"undecodable DICOM pixel data ({type(error).__name__}: "
                                   f"{error})") from error
  frames = int(dataset.get("NumberOfFrames", 1) or 1)
  samples = int(dataset.get("SamplesPerPixel", 1))
  if frames != 1:
    raise CorruptImageError(label, f"DICOM holds {frames} frames (NumberOfFrames); only "
                                   "single-frame images are read")
  if pixels.ndim != (2 if samples == 1 else 3):
    raise CorruptImageError(label, f"DICOM pixel array has shape {pixels.shape} for "
                                   f"SamplesPerPixel={samples}")
  return pixels


def dicom_bits_stored(dataset) -> int:
  """The significant bits of a DICOM's pixels: BitsStored, else BitsAllocated, else 8."""
  return int(dataset.get("BitsStored", dataset.get("BitsAllocated", 8)))


def stored_value_range(bits_stored: int, signed: bool) -> tuple[int, int]:
  """(lowest, highest) value a BitsStored-bit pixel can hold (two's complement when signed)."""
  if signed:
    return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
  return 0, 2**bits_stored - 1


def window_to_unit(values: np.ndarray, center: float, width: float,
                   function: str = "LINEAR") -> np.ndarray:
  """Modality values windowed to float32 [0, 1] by DICOM PS3.3 C.11.2.1.2 (VOI LUT Function).

  LINEAR (the default): 0 where x <= c - 0.5 - (w - 1) / 2, 1 where x > c - 0.5 + (w - 1) / 2,
  else (x - (c - 0.5)) / (w - 1) + 0.5 (needs w >= 1). LINEAR_EXACT: (x - c) / w + 0.5 clipped
  to [0, 1]; SIGMOID: 1 / (1 + exp(-4 (x - c) / w)) (both need w > 0).
  """
  x = np.asarray(values, np.float64)
  if function not in _VOI_FUNCTIONS:
    raise ValueError(f"VOILUTFunction {function!r} is not one of {list(_VOI_FUNCTIONS)}.")
  if function == "LINEAR":
    if width < 1:
      raise ValueError(f"WindowWidth must be >= 1 for a LINEAR window, got {width}.")
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    ramp = (x - (center - 0.5)) / max(width - 1, 1e-12) + 0.5
    out = np.where(x <= low, 0.0, np.where(x > high, 1.0, ramp))
  elif width <= 0:
    raise ValueError(f"WindowWidth must be > 0 for a {function} window, got {width}.")
  elif function == "LINEAR_EXACT":
    out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
  else:
    out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  return out.astype(np.float32)


def _first_value(value) -> float:
  """The first of a multi-valued DICOM number (WindowCenter may list several windows)."""
  try:
    return float(value[0])
  except TypeError:
    return float(value)


def dicom_to_unit(dataset, pixels: np.ndarray, label: str) -> np.ndarray:
  """Stored DICOM pixels to float32 [0, 1] [H, W, 1] (gray) or [H, W, 3] (RGB), as displayed.

  Gray (MONOCHROME1/2), in the standard's order: the modality transform (RescaleSlope /
  RescaleIntercept, or a Modality LUT; pydicom's apply_modality_lut), then the VOI transform:
  - a VOI LUT Sequence (pydicom's apply_voi_lut, first LUT): entries / (2**LUT bits - 1);
  - else a window (first WindowCenter / WindowWidth, VOILUTFunction): `window_to_unit`;
  - else the full range the BitsStored bits can hold, after the modality transform, maps linearly
    onto [0, 1]: without a Modality LUT that is (stored - lowest) / (2**BitsStored - 1), lowest
    being 0 (unsigned) or -2**(BitsStored-1) (signed), so a 12-bit image is divided by 4095 and
    keeps its 4096 levels (exact in uint16 with storage_bits=16); a negative RescaleSlope flips it.
  Then MONOCHROME1 (white is low) is inverted: 1 - value. RGB / YBR (converted to RGB by pydicom)
  is divided by 2**BitsStored - 1. Raises CorruptImageError naming the file and the field for
  an unsupported PhotometricInterpretation, values outside BitsStored or a malformed window.
  """
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # host-only dependency

  photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
  bits = dicom_bits_stored(dataset)
  signed = int(dataset.get("PixelRepresentation", 0)) == 1
  lowest, highest = stored_value_range(bits, signed)
  if pixels.size and (int(pixels.min()) < lowest or int(pixels.max()) > highest):
    raise CorruptImageError(label, f"pixel values {int(pixels.min())}..{int(pixels.max())} "
                                   f"exceed BitsStored={bits} ({lowest}..{highest})")
  if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
    return ((pixels.astype(np.float64) - lowest) / (highest - lowest)).astype(np.float32)
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise CorruptImageError(label, f"unsupported PhotometricInterpretation {photometric!r} "
                                   "(MONOCHROME1, MONOCHROME2, RGB and YBR are read)")
  try:
    values = np.asarray(apply_modality_lut(pixels, dataset), np.float64)
    if "VOILUTSequence" in dataset and len(dataset.VOILUTSequence):
      lut_bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
      integral = np.array_equal(values, np.rint(values))  # LUTs index integers
      voi = np.asarray(apply_voi_lut(values.astype(np.int64) if integral else values, dataset,
                                     index=0, prefer_lut=True), np.float64)
      unit = (voi / (2**lut_bits - 1)).astype(np.float32)
    elif "WindowCenter" in dataset or "WindowWidth" in dataset:
      if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        raise ValueError("WindowCenter and WindowWidth must both be present")
      function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
      unit = window_to_unit(values, _first_value(dataset.WindowCenter),
                            _first_value(dataset.WindowWidth), function)
    else:
      if "ModalityLUTSequence" in dataset and len(dataset.ModalityLUTSequence):
        low, high = 0.0, float(2 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
      else:
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        # A negative slope flips `values` already; the range is sorted so it stays flipped.
        low, high = sorted((slope * lowest + intercept, slope * highest + intercept))
      unit = ((values - low) / (high - low)).astype(np.float32)
  except CorruptImageError:
    raise
  except Exception as error:  # malformed LUT descriptors, windows, slopes...
    raise CorruptImageError(label, f"cannot apply the DICOM modality/VOI transform "
                                   f"({type(error).__name__}: {error})") from error
  if unit.size and (unit.min() < 0 or unit.max() > 1):
    raise CorruptImageError(label, f"DICOM values map to {unit.min():.4g}..{unit.max():.4g}, "
                                   "outside [0, 1] (Modality/VOI LUT entries beyond their bits)")
  if photometric == "MONOCHROME1":
    unit = 1.0 - unit
  return unit[..., None]


def read_dicom_unit(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
  """A single-frame DICOM image as displayed, float32 [0, 1] [H, W, 1|3] (see `dicom_to_unit`).

  Raises CorruptImageError naming the file (`name`, else the path) when it is not a readable
  DICOM, MissingDicomDecoderError when its compression needs a package that is not installed.
  """
  label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
  dataset = read_dicom_dataset(source, label)
  return dicom_to_unit(dataset, dicom_stored_pixels(dataset, label), label)


def read_dicom_patient_id(path: str | os.PathLike) -> str:
  """The PatientID of a DICOM file (header only, stripped), or '' when it has none or the header
  cannot be parsed (reading its pixels then raises CorruptImageError, naming it)."""
  import pydicom  # host-only dependency, kept local

  try:
    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"],
                              force=True)
    return str(dataset.get("PatientID", "") or "").strip()
  except FileNotFoundError:
    raise
  except Exception:  # an unreadable header: the image read reports it under the corrupt policy
    return ""


def to_unit_float(image: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
  """uint8/uint16 pixels to float32 in [0, 1] by their bit depth (default 8 / 16 by dtype).

  A 12-bit image stored in a uint16 PNG (Montgomery) needs bit_depth=12: it is divided by 4095, so
  no precision is lost before later float processing. Values above the bit depth's maximum raise.
  Float input is returned as float32 unchanged.
  """
  if np.issubdtype(image.dtype, np.floating):
    return image.astype(np.float32)
  if image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"Expected uint8 or uint16 pixels, got {image.dtype}.")
  bits = bit_depth or (8 if image.dtype == np.uint8 else 16)
  maximum = 2**bits - 1
  if image.size and int(image.max()) > maximum:
    raise ValueError(f"Pixel values reach {int(image.max())}, above the {bits}-bit maximum "
                     f"{maximum}.")
  return image.astype(np.float32) / np.float32(maximum)


def quantize(image: np.ndarray, bits: int = 8) -> np.ndarray:
  """[0, 1] float pixels to uint8 (bits=8) or uint16 (bits=16), rounded and clipped."""
  if bits not in (8, 16):
    raise ValueError(f"bits must be 8 or 16, got {bits}.")
  maximum = 2**bits - 1
  scaled = np.clip(np.rint(np.asarray(image, np.float64) * maximum), 0, maximum)
  return scaled.astype(np.uint8 if bits == 8 else np.uint16)


def to_gray(image: np.ndarray) -> np.ndarray:
  """[H, W, 1|3] float image to [H, W, 1]: colour by the BT.601 luma weights, gray unchanged."""
  if image.shape[-1] == 1:
    return image
  if image.shape[-1] != 3:
    raise ValueError(f"Expected 1 or 3 channels, got shape {image.shape}.")
  weights = np.asarray(LUMA_WEIGHTS, np.float32)
  return (image.astype(np.float32) @ weights)[..., None]


def to_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W, 1|3] image to [H, W, 3]: gray repeated into three channels, colour unchanged."""
  if image.shape[-1] == 3:
    return image
  if image.shape[-1] != 1:
    raise ValueError(f"Expected 1 or 3 channels, got shape {image.shape}.")
  return np.repeat(image, 3, axis=-1)


def resize_np(image: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
  """[H, W, C] image resized to height x width per channel with Pillow (antialiased when shrinking).

  Float input stays float32; integer input (e.g. a {0, 1} mask with method='nearest') keeps its
  dtype, rounded back after interpolation.
  """
  from PIL import Image  # host-only dependency, kept local

  if method not in _PIL_RESAMPLING:
    raise ValueError(f"method={method!r} is not one of {sorted(_PIL_RESAMPLING)}.")
  if image.shape[:2] == (height, width):
    return image.copy()
  resample = getattr(Image.Resampling, _PIL_RESAMPLING[method])
  channels = [  # one 32-bit float ("F") plane per channel, so 16-bit precision survives
    np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
      (width, height), resample=resample))
    for c in range(image.shape[-1])
  ]
  resized = np.stack(channels, axis=-1)
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(resized), info.min, info.max).astype(image.dtype)
  return resized.astype(np.float32)


def resize_with_padding_np(image: np.ndarray, height: int, width: int, *,
                           method: str = "bilinear", pad_value: float = 0.0) -> np.ndarray:
  """Host version of `resize_with_padding` for one [H, W, C] image of any size (keeps dtype)."""
  new_height, new_width, top, left = padded_resize_geometry(*image.shape[:2], height, width)
  resized = resize_np(image, new_height, new_width, method)
  out = np.full((height, width, image.shape[-1]), pad_value, dtype=resized.dtype)
  out[top:top + new_height, left:left + new_width] = resized
  return out


def clahe(image: np.ndarray, *, clip_limit: float = 0.01, kernel_size: int | None = None,
          nbins: int = 256) -> np.ndarray:
  """Contrast Limited Adaptive Histogram Equalisation (002) of a [0, 1] image [H, W, 1|3].

  Host side, by scikit-image's `equalize_adapthist`, whose defaults (tiles of 1/8 of each side,
  clip limit 0.01, 256 bins) are MATLAB adapthist's (8 x 8 tiles, ClipLimit 0.01, NBins 256),
  which 002 presumably used. Colour images are equalised on their HSV value channel. Returns
  float32 in [0, 1] of the input's shape.
  """
  from skimage import exposure  # host-only dependency, kept local

  image = np.asarray(image, np.float32)
  if image.size and (image.min() < 0 or image.max() > 1):
    raise ValueError(f"clahe expects [0, 1] input, got {image.min()}..{image.max()}.")
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  plane = image[..., 0] if squeeze else image
  out = exposure.equalize_adapthist(plane, kernel_size=kernel_size, clip_limit=clip_limit,
                                    nbins=nbins).astype(np.float32)
  return out[..., None] if squeeze else out


def find_uniform_border(image: np.ndarray, *, tolerance: float = 0.02,
                        min_fraction: float = 0.95,
                        max_fraction: float = 0.25) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) widths of the uniform frame around a [0, 1] image [H, W, C].

  000 found a rectangular frame around MURA images steering DenseNet's attention. An edge row or
  column belongs to the frame when at least `min_fraction` of its pixels (within the part of the
  image not yet peeled) lie within `tolerance` of the line's median, in every channel; rows and
  columns are peeled from all four sides in turn until no edge line is uniform, at most
  `max_fraction` of the height/width from each side. A frame made of several bands of different
  uniform values (a dark margin, then a light line) is peeled band by band; empty uniform margins
  count as frame too.
  """
  if image.ndim != 3:
    raise ValueError(f"Expected one image [H, W, C], got shape {image.shape}.")
  height, width = image.shape[:2]
  limits = (int(height * max_fraction), int(width * max_fraction))
  top = bottom = left = right = 0

  def uniform(line: np.ndarray) -> bool:
    close = np.abs(line - np.median(line, axis=0)) <= tolerance  # [N, C]
    return bool(close.all(axis=-1).mean() >= min_fraction)

  changed = True
  while changed:
    changed = False
    window = image[top:height - bottom, left:width - right]
    if top < limits[0] and uniform(window[0]):
      top, changed = top + 1, True
    window = image[top:height - bottom, left:width - right]
    if bottom < limits[0] and uniform(window[-1]):
      bottom, changed = bottom + 1, True
    window = image[top:height - bottom, left:width - right]
    if left < limits[1] and uniform(window[:, 0]):
      left, changed = left + 1, True
    window = image[top:height - bottom, left:width - right]
    if right < limits[1] and uniform(window[:, -1]):
      right, changed = right + 1, True
  return top, bottom, left, right


def remove_uniform_border(image: np.ndarray, **kwargs: float) -> np.ndarray:
  """The image inside its uniform frame (see `find_uniform_border` for the keyword arguments)."""
  top, bottom, left, right = find_uniform_border(image, **kwargs)
  height, width = image.shape[:2]
  return image[top:height - bottom, left:width - right]


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of an [H, W, 1|3] uint8 image or an [H, W, 1] uint16 image (Pillow)."""
  from PIL import Image  # host-only dependency, kept local

  if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3:
    raise ValueError(f"Expected [H, W, C] uint8/uint16, got {image.dtype} {image.shape}.")
  if image.dtype == np.uint16 and image.shape[-1] != 1:
    raise ValueError("Pillow writes 16-bit PNGs for gray images only.")
  plane = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG")
  return buffer.getvalue()
