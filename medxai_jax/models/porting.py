"""Ports ImageNet weights from Keras application files and torchvision state dicts to Flax.

Sources:
* Keras `.h5` written by keras.applications (Keras 2 and 3 legacy HDF5: layers named
  'conv1/conv' or 'conv1_conv', weights named 'kernel', 'gamma', 'moving_mean', ...), with or
  without the top, and whole-model `.h5` files (their 'model_weights' group);
* Keras 3 `.weights.h5`, whose groups carry generated names ('layers/conv2d_12/vars/0'); those
  are matched by their order within each layer class, which is the model's layer order;
* torchvision state dicts: `.pth`/`.pt` (a zip written by torch.save, read with a restricted
  unpickler that executes no pickled code), `.safetensors` and `.npz` keyed like the state dict.

Layout changes: torch conv kernels OIHW -> HWIO; torch dense [out, in] -> [in, out]; the first
FC layer of a torchvision VGG reads a (C, H, W)-flattened map and is permuted to our (H, W, C)
order; BatchNorm (gamma, beta, moving mean, moving variance) -> params scale/bias and batch_stats
mean/var. A mismatch raises `PortingError` listing every missing, unexpected and mis-shaped entry.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from medxai_jax.models import base
from medxai_jax.models import densenet as densenet_lib
from medxai_jax.models import vgg as vgg_lib

SOURCES = ("keras", "torchvision")
# Input preprocessing each source's ImageNet weights were trained with.
PREPROCESSING = {
    ("keras", "densenet"): "torch (RGB in [0, 1], ImageNet mean/std)",
    ("keras", "vgg16"): "caffe (BGR, ImageNet mean pixel subtracted on the 0-255 scale)",
    ("torchvision", "densenet"): "torch (RGB in [0, 1], ImageNet mean/std)",
    ("torchvision", "vgg16"): "torch (RGB in [0, 1], ImageNet mean/std)",
}
# BatchNorm epsilon of each source (our DenseNet takes it as `bn_epsilon`).
BN_EPSILON = {"keras": 1.001e-5, "torchvision": 1e-5}


class PortingError(ValueError):
  """A weights file that does not match the model it is loaded into, or cannot be read."""


class RefusedPickleError(PortingError, pickle.UnpicklingError):
  """A .pth pickle that names a global a state dict does not need (never executed)."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One weighted layer: its kind, Flax path, and names in Keras and torchvision."""

  kind: str  # 'conv', 'bn' or 'dense'
  path: tuple[str, ...]
  keras_name: str
  torch_name: str
  is_top: bool = False
  torch_flattened_chw: tuple[int, int, int] | None = None  # VGG fc1 input layout in torch


@dataclasses.dataclass
class PortReport:
  """What a port loaded and what it left at its initial value."""

  loaded: list[str] = dataclasses.field(default_factory=list)
  kept_from_init: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- architectures


def _densenet_layers(block_sizes: tuple[int, ...]) -> Iterator[Layer]:
  """DenseNet layers in forward order (Keras' layer order too)."""

  def backbone(kind: str, name: str, torch_name: str) -> Layer:
    return Layer(kind, ("backbone", name), name, f"features.{torch_name}")

  yield backbone("conv", "conv1_conv", "conv0")
  yield backbone("bn", "conv1_bn", "norm0")
  for block_index, num_layers in enumerate(block_sizes):
    stage = block_index + 2
    for layer in range(1, num_layers + 1):
      keras = f"conv{stage}_block{layer}"
      torch = f"denseblock{block_index + 1}.denselayer{layer}"
      yield backbone("bn", f"{keras}_0_bn", f"{torch}.norm1")
      yield backbone("conv", f"{keras}_1_conv", f"{torch}.conv1")
      yield backbone("bn", f"{keras}_1_bn", f"{torch}.norm2")
      yield backbone("conv", f"{keras}_2_conv", f"{torch}.conv2")
    if block_index < len(block_sizes) - 1:
      yield backbone("bn", f"pool{stage}_bn", f"transition{block_index + 1}.norm")
      yield backbone("conv", f"pool{stage}_conv", f"transition{block_index + 1}.conv")
  yield backbone("bn", "bn", "norm5")
  yield Layer("dense", ("classifier", "predictions"), "predictions", "classifier", is_top=True)


def _vgg16_layers(with_classic_top: bool) -> Iterator[Layer]:
  """VGG16 layers in forward order; torchvision numbers them inside `features`/`classifier`."""
  torch_index = 0
  for block_index, widths in enumerate(vgg_lib.BLOCK_WIDTHS):
    for conv_index in range(len(widths)):
      name = f"block{block_index + 1}_conv{conv_index + 1}"
      yield Layer("conv", (name,), name, f"features.{torch_index}")
      torch_index += 2  # conv, ReLU
    torch_index += 1  # max-pool
  if with_classic_top:
    yield Layer("dense", ("fc1",), "fc1", "classifier.0", is_top=True,
                torch_flattened_chw=(512, 7, 7))
    yield Layer("dense", ("fc2",), "fc2", "classifier.3", is_top=True)
    yield Layer("dense", ("predictions",), "predictions", "classifier.6", is_top=True)


def architecture_of(model: base.Classifier) -> str:
  """'densenet' or 'vgg16' for a model we can port into."""
  if isinstance(model.module, densenet_lib.DenseNet):
    return "densenet"
  if isinstance(model.module, vgg_lib.VGG16):
    return "vgg16"
  raise PortingError(f"No ImageNet weights to port into {type(model.module).__name__}; "
                     "porting supports DenseNet and VGG16.")


def model_layers(model: base.Classifier) -> list[Layer]:
  """The model's weighted layers that the published ImageNet files hold, in forward order."""
  module = model.module
  if architecture_of(model) == "densenet":
    sizes = tuple(module.block_sizes) or densenet_lib.BLOCK_SIZES[module.depth]
    return list(_densenet_layers(sizes))
  return list(_vgg16_layers(with_classic_top=module.head_kind == "classic"))


def _head_matches_imagenet(model: base.Classifier) -> bool:
  """Whether the model's top is the 1000-way ImageNet classifier the files carry."""
  module = model.module
  if model.num_outputs != 1000:
    return False
  if isinstance(module, densenet_lib.DenseNet):
    return module.head_kind == "softmax" and not module.head_hidden_widths
  return module.head_kind == "classic"


# ----------------------------------------------------------------------------- readers


_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile,
                zlib.error)


@contextlib.contextmanager
def _reading(path: str, kind: str, extra_errors: tuple[type[Exception], ...] = ()
             ) -> Iterator[None]:
  """Re-raises a low-level reader error (h5py, zipfile, safetensors) as a PortingError that
  names the file; a missing file stays a FileNotFoundError."""
  try:
    yield
  except (PortingError, FileNotFoundError):
    raise
  except _READ_ERRORS + extra_errors as error:
    raise PortingError(f"{path} is not a readable {kind} file (truncated or another format?): "
                       f"{type(error).__name__}: {error}") from error


def _keras_weight_kind(name: str) -> str:
  """'kernel', 'gamma', ... from 'conv1/bn/gamma:0' or 'conv1_bn/gamma'."""
  return name.rsplit("/", 1)[-1].split(":", 1)[0]


def _normalise_keras_layer_name(name: str) -> str:
  """Keras 2 DenseNet names ('conv1/conv', 'fc1000') in Keras 3 spelling."""
  name = name.replace("/", "_")
  return "predictions" if name == "fc1000" else name


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
  """Layer name -> {weight kind: array} from a layer-named Keras HDF5 weights file."""
  import h5py  # pylint: disable=import-outside-toplevel
  layers = {}
  with _reading(path, "Keras HDF5"), h5py.File(path, "r") as file:
    group = file["model_weights"] if "layer_names" not in file.attrs and (
        "model_weights" in file) else file
    if "layer_names" not in group.attrs:
      raise PortingError(f"{path} is not a layer-named Keras HDF5 weights file (no "
                         "'layer_names' attribute); Keras 3 '.weights.h5' files need a name "
                         "ending in '.weights.h5'.")
    for raw_name in group.attrs["layer_names"]:
      layer_name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
      layer_group = group[layer_name]
      weight_names = [n.decode() if isinstance(n, bytes) else str(n)
                      for n in layer_group.attrs.get("weight_names", [])]
      if weight_names:
        layers[_normalise_keras_layer_name(layer_name)] = {
            _keras_weight_kind(n): np.asarray(layer_group[n]) for n in weight_names}
  return layers


_KERAS3_VARIABLE_ORDER = {
    "conv": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
}
_KERAS3_CLASS = {"conv": "conv2d", "dense": "dense", "bn": "batch_normalization"}


def read_keras3_weights(path: str) -> dict[str, list[list[np.ndarray]]]:
  """Layer class ('conv2d', ...) -> each layer's variables, in the model's layer order."""
  import h5py  # pylint: disable=import-outside-toplevel
  by_class: dict[str, list[tuple[int, list[np.ndarray]]]] = collections.defaultdict(list)
  with _reading(path, "Keras 3 .weights.h5"), h5py.File(path, "r") as file:
    if "layers" not in file:
      raise PortingError(f"{path} has no 'layers' group: not a Keras 3 '.weights.h5' file.")
    for name, group in file["layers"].items():
      if "vars" not in group or not len(group["vars"]):
        continue
      match = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
      layer_class, index = match.group(1), int(match.group(2) or 0)
      variables = [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))]
      by_class[layer_class].append((index, variables))
  return {cls: [v for _, v in sorted(entries, key=lambda e: e[0])]
          for cls, entries in by_class.items()}


_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One storage file of the archive ('data/<key>') as a flat little-endian array."""

  key: str
  values: np.ndarray


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor the pickle asks for: a strided view of a storage, not made until checked."""

  storage: _Storage
  offset: Any
  size: Any
  stride: Any


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_tuple(value: Any) -> tuple[int, ...] | None:
  """`value` as a tuple of ints, or None when it is not a tuple/list of ints."""
  if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
    return None
  return tuple(int(v) for v in value)


def tensor_view_problem(storage_numel: int, offset: Any, size: Any, stride: Any) -> str | None:
  """Why (offset, size, stride) is not an in-bounds view of a storage of `storage_numel`
  elements, or None when every element it addresses lies inside the storage.

  Zero-element tensors address nothing; otherwise every stride of a dimension longer than one
  must be >= 1 (a zero stride aliases elements, a negative one reads backwards) and the last
  addressed element, offset + sum((size_i - 1) * stride_i), must be < storage_numel.
  """
  sizes, strides = _int_tuple(size), _int_tuple(stride)
  if not _is_int(offset):
    return f"storage offset {offset!r} is not an integer"
  if sizes is None or strides is None:
    return f"size {size!r} and stride {stride!r} must be tuples of integers"
  if len(sizes) != len(strides):
    return f"size {sizes} and stride {strides} have different lengths"
  if any(n < 0 for n in sizes):
    return f"size {sizes} has a negative dimension"
  if offset < 0:
    return f"storage offset {offset} is negative"
  if offset > storage_numel:
    return f"storage offset {offset} is past the end of the storage ({storage_numel} elements)"
  if 0 in sizes:
    return None
  bad = [(n, s) for n, s in zip(sizes, strides) if n > 1 and s < 1]
  if bad:
    return f"stride {strides} has a {'zero' if bad[0][1] == 0 else 'negative'} stride"
  last = offset + sum((n - 1) * s for n, s in zip(sizes, strides))
  if last >= storage_numel:
    return (f"size {sizes} with stride {strides} at offset {offset} reads element {last}, "
            f"past the end of the storage ({storage_numel} elements)")
  return None


def _materialise(ref: _TensorRef, path: str, name: str) -> np.ndarray:
  """A copy of the checked strided view `ref` (entry `name` of the file at `path`)."""
  values = ref.storage.values
  problem = tensor_view_problem(values.size, ref.offset, ref.size, ref.stride)
  if problem:
    raise PortingError(f"{path}: tensor {name!r} (storage data/{ref.storage.key}): {problem}.")
  sizes, strides = _int_tuple(ref.size), _int_tuple(ref.stride)
  if 0 in sizes:
    return np.zeros(sizes, values.dtype)
  itemsize = values.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      values[int(ref.offset):], shape=sizes, strides=tuple(s * itemsize for s in strides),
      writeable=False)
  return np.array(view)


class _TorchUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Reads a torch.save state dict as numpy arrays; refuses every other pickled global.

  The pure-Python unpickler, so that a dict key set twice (which pickle would silently
  overwrite) is an error. Tensors come back as unchecked `_TensorRef`s; `read_torch_pth`
  checks each against its storage before making the view.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return self._rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    if module == "torch" and name in _TORCH_DTYPES:
      return _StorageType(_TORCH_DTYPES[name])
    if module == "torch" and name == "BFloat16Storage":
      raise RefusedPickleError(
          f"{self._path} stores bfloat16 tensors; convert the state dict to float32 first.")
    if module == "torch" and name.endswith("Storage"):
      raise RefusedPickleError(
          f"{self._path} stores tensors of the unsupported storage type torch.{name}; "
          f"supported: {sorted(n for n in _TORCH_DTYPES if n.endswith('Storage'))}.")
    raise RefusedPickleError(
        f"{self._path} pickles {module}.{name}, which a weights file does not need and which "
        "is not executed here; save `model.state_dict()` (tensors only) instead.")

  def _set_item(self, mapping: Any, key: Any, value: Any) -> None:
    """mapping[key] = value, refusing a key the pickle already set."""
    if isinstance(mapping, Mapping) and key in mapping:
      raise PortingError(f"{self._path}: the pickle sets key {key!r} twice; the file is "
                         "corrupt or crafted (a state dict has each key once).")
    mapping[key] = value

  def _load_setitem(self) -> None:
    value, key = self.stack.pop(), self.stack.pop()
    self._set_item(self.stack[-1], key, value)

  def _load_setitems(self) -> None:
    items = self.pop_mark()
    for index in range(0, len(items), 2):
      self._set_item(self.stack[-1], items[index], items[index + 1])

  dispatch[pickle.SETITEM[0]] = _load_setitem
  dispatch[pickle.SETITEMS[0]] = _load_setitems

  def _read_storage(self, storage_type: Any, key: Any, numel: Any) -> _Storage:
    """The storage file data/<key>, checked against its dtype and element count."""
    if not isinstance(key, str) or not key:
      raise PortingError(f"{self._path}: storage key {key!r} is not a non-empty string.")
    if not isinstance(storage_type, _StorageType):
      raise PortingError(f"{self._path}: storage data/{key} has an unknown dtype "
                         f"{storage_type!r}.")
    if not _is_int(numel) or numel < 0:
      raise PortingError(f"{self._path}: storage data/{key} has an invalid element count "
                         f"{numel!r}.")
    member = f"{self._prefix}data/{key}"
    try:
      raw = self._archive.read(member)
    except KeyError:
      raise PortingError(f"{self._path}: storage {member!r} (key {key!r}) is missing from the "
                         "archive.") from None
    dtype = np.dtype(storage_type.dtype).newbyteorder("<")
    if len(raw) != int(numel) * dtype.itemsize:
      raise PortingError(
          f"{self._path}: storage {member!r} holds {len(raw)} bytes, but the pickle declares "
          f"{int(numel)} {dtype.name} elements ({int(numel) * dtype.itemsize} bytes).")
    return _Storage(key, np.frombuffer(raw, dtype=dtype))

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
      raise PortingError(f"{self._path}: unknown persistent id {pid!r} (a torch.save storage "
                         "is ('storage', type, key, location, numel)).")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = self._read_storage(storage_type, key, numel)
    elif self._storages[key].values.size != numel:
      raise PortingError(f"{self._path}: storage data/{key} is declared with "
                         f"{self._storages[key].values.size} and {numel} elements.")
    return self._storages[key]

  def _rebuild_tensor(self, storage: Any, offset: Any = None, size: Any = None,
                      stride: Any = None, *unused: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
      raise PortingError(f"{self._path}: a tensor is rebuilt from {type(storage).__name__}, "
                         "not from a storage of the archive.")
    return _TensorRef(storage, offset, size, stride)


def _materialise_state(state: Any, path: str, prefix: str = "") -> Any:
  """`state` with every `_TensorRef` (in nested mappings) replaced by its checked array."""
  if isinstance(state, _TensorRef):
    return _materialise(state, path, prefix or "<top level>")
  if isinstance(state, Mapping):
    return type(state)((key, _materialise_state(value, path, f"{prefix}{key}" if not prefix
                                                 else f"{prefix}.{key}"))
                       for key, value in state.items())
  return state


def _duplicate_members(names: list[str]) -> list[str]:
  """Archive member names that occur more than once."""
  counts = collections.Counter(names)
  return sorted(name for name, count in counts.items() if count > 1)


def read_torch_pth(path: str) -> dict[str, np.ndarray]:
  """State dict of a torch.save zip file as numpy arrays, without executing pickled code.

  Every tensor's size, stride and offset are checked against its storage (whose byte length
  must match the declared element count) before a view is made, so a crafted or truncated
  file raises a `PortingError` naming the file, the tensor and the storage.
  """
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as file:
      if file.read(4) == b"PK\x03\x04":
        raise PortingError(f"{path} is a damaged zip archive (truncated?): it starts like one "
                           "but has no readable directory; download or copy it again.")
    raise PortingError(f"{path} is not a torch.save zip archive (torch < 1.6 legacy format?); "
                       "re-save it with a recent torch or export it as .safetensors.")
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      duplicates = _duplicate_members(names)
      if duplicates:
        raise PortingError(f"{path}: the archive holds {duplicates} more than once; the file is "
                           "corrupt or crafted.")
      pickles = [n for n in names if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise PortingError(f"{path}: expected one data.pkl in the archive, found {pickles}.")
      prefix = pickles[0][: -len("data.pkl")]
      with archive.open(pickles[0]) as file:
        state = _TorchUnpickler(file, archive, prefix, path).load()
  except (zipfile.BadZipFile, EOFError, zlib.error) as error:
    raise PortingError(f"{path} is a damaged zip archive (truncated?): {error}") from error
  except PortingError:
    raise
  except pickle.UnpicklingError as error:
    if path in str(error):
      raise
    raise PortingError(f"{path}: data.pkl is not a readable torch.save pickle ({error})."
                       ) from error
  except (ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
    raise PortingError(f"{path}: data.pkl is not a readable torch.save pickle "
                       f"({type(error).__name__}: {error}).") from error
  return _unwrap_state_dict(_materialise_state(state, path), path)


def _unwrap_state_dict(state: Any, path: str) -> dict[str, np.ndarray]:
  """The tensor dict inside {'state_dict': ...}/{'model': ...}, 'module.' prefixes removed."""
  for wrapper in ("state_dict", "model"):
    if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise PortingError(f"{path} holds a {type(state).__name__}, not a state dict.")
  arrays = {}
  for key, value in state.items():
    if isinstance(value, np.ndarray):
      arrays[key[len("module."):] if key.startswith("module.") else key] = value
  return arrays


# torchvision's published DenseNet files spell 'norm.1' for 'norm1' (see its _load_state_dict).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
    r"running_var))$")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision state dict from .pth/.pt, .safetensors or .npz, keys normalised."""
  if path.endswith(".safetensors"):
    import safetensors  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    with _reading(path, ".safetensors", (safetensors.SafetensorError,)):
      state = dict(load_file(path))
  elif path.endswith(".npz"):
    with _reading(path, ".npz"), np.load(path, allow_pickle=False) as data:
      state = {key: data[key] for key in data.files}
  elif path.endswith((".pth", ".pt", ".bin")):
    state = read_torch_pth(path)
  else:
    raise PortingError(f"{path}: torchvision weights must be .pth, .pt, .safetensors or .npz.")
  normalised = {}
  for key, value in state.items():
    match = _OLD_DENSENET_KEY.match(key)
    normalised[match.group(1) + match.group(2) if match else key] = np.asarray(value)
  return normalised


# ----------------------------------------------------------------------------- conversion


def _keras_entries(layer: Layer, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flax-named arrays ('params/kernel', 'batch_stats/mean', ...) of one Keras layer."""
  if layer.kind == "bn":
    names = {"gamma": "params/scale", "beta": "params/bias", "moving_mean": "batch_stats/mean",
             "moving_variance": "batch_stats/var"}
  else:
    names = {"kernel": "params/kernel", "bias": "params/bias"}
  return {names.get(kind, f"?{kind}"): value for kind, value in weights.items()}


def _torch_entries(layer: Layer, state: Mapping[str, np.ndarray], used: set[str]
                   ) -> dict[str, np.ndarray]:
  """Flax-named arrays of one torchvision layer, layouts converted; marks keys used."""
  entries = {}
  for suffix, flax_name in (("weight", None), ("bias", "params/bias"),
                            ("running_mean", "batch_stats/mean"),
                            ("running_var", "batch_stats/var"),
                            ("num_batches_tracked", None)):
    key = f"{layer.torch_name}.{suffix}"
    if key not in state:
      continue
    used.add(key)
    value = state[key]
    if suffix == "num_batches_tracked":
      continue
    if suffix == "weight":
      if layer.kind == "bn":
        flax_name = "params/scale"
      elif layer.kind == "conv":
        flax_name, value = "params/kernel", value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
      else:
        flax_name = "params/kernel"
        if layer.torch_flattened_chw and value.ndim == 2:
          channels, height, width = layer.torch_flattened_chw
          if value.shape[1] == channels * height * width:
            value = value.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
            value = value.reshape(value.shape[0], -1)
        value = value.T
    entries[flax_name] = value
  return entries


def _expected_entries(layer: Layer, variables: base.Variables) -> dict[str, tuple[int, ...]]:
  """Shapes the model holds for one layer ('params/kernel' -> shape)."""
  shapes = {}
  for collection in ("params", "batch_stats"):
    node = variables.get(collection, {})
    for part in layer.path:
      node = node.get(part, {}) if isinstance(node, Mapping) else {}
    if isinstance(node, Mapping):
      for name, value in node.items():
        shapes[f"{collection}/{name}"] = tuple(np.shape(value))
  return shapes


def _set_leaf(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for part in path[:-1]:
    tree = tree[part]
  tree[path[-1]] = value


def _copy_tree(tree: Any) -> Any:
  """Nested dicts with numpy copies of every leaf (the input is left untouched)."""
  if isinstance(tree, Mapping):
    return {key: _copy_tree(value) for key, value in tree.items()}
  return np.array(tree)


def _assemble(model: base.Classifier, variables: base.Variables, source_entries: dict,
              include_top: bool | None, unexpected: list[str], path: str
              ) -> tuple[dict, PortReport]:
  """Writes each layer's source arrays into a copy of `variables`, checking names and shapes."""
  layers = model_layers(model)
  head_compatible = _head_matches_imagenet(model)
  file_has_top = any(layer.is_top and source_entries.get(layer) for layer in layers)
  if include_top is None:
    load_top = file_has_top and head_compatible
  else:
    load_top = include_top
    if include_top and not head_compatible:
      raise PortingError(
          f"include_top=True, but the model's head ({model.num_outputs} outputs, "
          f"{getattr(model.module, 'head_kind', '?')}) is not the 1000-way ImageNet classifier "
          f"in {path}; use include_top=False to keep the head at its initial value.")
  new_variables = _copy_tree(variables)
  report = PortReport()
  missing, mis_shaped = [], []
  for layer in layers:
    name = "/".join(layer.path)
    entries = source_entries.get(layer) or {}
    if layer.is_top and not load_top:
      if entries:
        report.ignored.append(f"{layer.keras_name} (top)")
      continue
    expected = _expected_entries(layer, variables)
    if not entries:
      missing.append(f"{name} ({layer.keras_name} / {layer.torch_name})")
      continue
    for entry_name, value in entries.items():
      if entry_name not in expected:
        unexpected.append(f"{name}: {entry_name.lstrip('?')}")
      elif tuple(value.shape) != expected[entry_name]:
        mis_shaped.append(f"{name}/{entry_name}: file {tuple(value.shape)}, model "
                          f"{expected[entry_name]}")
      else:
        collection, leaf = entry_name.split("/")
        _set_leaf(new_variables[collection], (*layer.path, leaf),
                  value.astype(np.asarray(_leaf(variables, collection, layer.path, leaf)).dtype))
    for entry_name in expected:
      if entry_name not in entries:
        missing.append(f"{name}/{entry_name}")
    report.loaded.append(name)
  problems = [("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)]
  if any(items for _, items in problems):
    lines = [f"{path} does not match {type(model.module).__name__}:"]
    for label, items in problems:
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {len(items)} {label}: " + "; ".join(shown))
    raise PortingError("\n".join(lines))
  loaded = set(report.loaded)
  for collection in ("params", "batch_stats"):
    for key_path, _ in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      module_path = "/".join(k.key for k in key_path[:-1])
      if module_path not in loaded and module_path not in report.kept_from_init:
        report.kept_from_init.append(module_path)
  return new_variables, report


def _leaf(variables: base.Variables, collection: str, path: tuple[str, ...], leaf: str) -> Any:
  node = variables[collection]
  for part in (*path, leaf):
    node = node[part]
  return node


def port_keras(model: base.Classifier, variables: base.Variables, path: str, *,
               include_top: bool | None = None) -> tuple[dict, PortReport]:
  """Variables of `model` with the weights of a Keras application file loaded into them.

  `include_top=None` loads the classifier when the file has it and the model's head is the
  1000-way ImageNet one; False keeps the model's head at its initial value.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Keras weights file not found: {path}")
  layers = model_layers(model)
  unexpected: list[str] = []
  source: dict[Layer, dict[str, np.ndarray]] = {}
  if path.endswith(".weights.h5"):
    by_class = read_keras3_weights(path)
    for kind, cls in _KERAS3_CLASS.items():
      ours = [layer for layer in layers if layer.kind == kind]
      theirs = by_class.pop(cls, [])
      if len(theirs) > len(ours):  # a file with a top loaded into a model without one
        extra = theirs[len(ours):]
        if not (kind == "dense" and all(v[0].ndim == 2 for v in extra)):
          unexpected += [f"{cls}_{i}" for i in range(len(ours), len(theirs))]
      for layer, values in zip(ours, theirs):
        names = _KERAS3_VARIABLE_ORDER[kind][: len(values)]
        source[layer] = _keras_entries(layer, dict(zip(names, values)))
    unexpected += [f"layers/{cls} ({len(v)} layers)" for cls, v in by_class.items()]
  else:
    by_name = read_keras_h5(path)
    known = {layer.keras_name for layer in layers} | {"fc1", "fc2", "predictions"}
    for layer in layers:
      if layer.keras_name in by_name:
        source[layer] = _keras_entries(layer, by_name[layer.keras_name])
    unexpected += [name for name in by_name if name not in known]
  return _assemble(model, variables, source, include_top, unexpected, path)


def port_torchvision(model: base.Classifier, variables: base.Variables, path: str, *,
                     include_top: bool | None = None) -> tuple[dict, PortReport]:
  """Variables of `model` with a torchvision state dict (.pth/.safetensors/.npz) loaded."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"torchvision weights file not found: {path}")
  state = read_torch_state_dict(path)
  used: set[str] = set()
  source = {layer: _torch_entries(layer, state, used) for layer in model_layers(model)}
  top_prefixes = ("classifier.",)
  unexpected = [key for key in state if key not in used and not key.startswith(top_prefixes)]
  return _assemble(model, variables, source, include_top, unexpected, path)


def port(source: str, model: base.Classifier, variables: base.Variables, path: str, *,
         include_top: bool | None = None) -> tuple[dict, PortReport]:
  """`port_keras` or `port_torchvision` by `source` ('keras' or 'torchvision')."""
  if source == "keras":
    return port_keras(model, variables, path, include_top=include_top)
  if source == "torchvision":
    return port_torchvision(model, variables, path, include_top=include_top)
  raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")


# ----------------------------------------------------------------------------- export (tests)


def _flax_layer_arrays(layer: Layer, variables: base.Variables) -> dict[str, np.ndarray]:
  """One layer's arrays by Flax entry name ('params/kernel', ...)."""
  return {name: np.asarray(_leaf(variables, *name.split("/")[:1], layer.path,
                                 name.split("/")[1]))
          for name in _expected_entries(layer, variables)}


def export_torchvision_state_dict(model: base.Classifier, variables: base.Variables
                                  ) -> dict[str, np.ndarray]:
  """The inverse of `port_torchvision`: a torchvision-keyed numpy state dict."""
  state = {}
  for layer in model_layers(model):
    arrays = _flax_layer_arrays(layer, variables)
    if not arrays:
      continue
    for name, value in arrays.items():
      if name == "params/kernel" and layer.kind == "conv":
        value = value.transpose(3, 2, 0, 1)
      elif name == "params/kernel":
        value = value.T
        if layer.torch_flattened_chw:
          channels, height, width = layer.torch_flattened_chw
          value = value.reshape(-1, height, width, channels).transpose(0, 3, 1, 2)
          value = value.reshape(value.shape[0], -1)
      suffix = {"params/kernel": "weight", "params/scale": "weight", "params/bias": "bias",
                "batch_stats/mean": "running_mean", "batch_stats/var": "running_var"}[name]
      state[f"{layer.torch_name}.{suffix}"] = np.ascontiguousarray(value)
  return state


def export_keras_h5(model: base.Classifier, variables: base.Variables, path: str) -> None:
  """Writes a layer-named Keras HDF5 weights file (the inverse of `port_keras`)."""
  import h5py  # pylint: disable=import-outside-toplevel
  keras_names = {"params/kernel": "kernel", "params/bias": "bias", "params/scale": "gamma",
                 "batch_stats/mean": "moving_mean", "batch_stats/var": "moving_variance"}
  order = ("gamma", "beta", "moving_mean", "moving_variance", "kernel", "bias")
  with h5py.File(path, "w") as file:
    names = []
    for layer in model_layers(model):
      arrays = _flax_layer_arrays(layer, variables)
      if not arrays:
        continue
      group = file.create_group(layer.keras_name)
      weights = {}
      for name, value in arrays.items():
        kind = keras_names[name]
        if layer.kind == "bn" and kind == "bias":
          kind = "beta"
        weights[kind] = value
      weight_names = [f"{layer.keras_name}/{k}" for k in order if k in weights]
      for kind in order:
        if kind in weights:
          group.create_dataset(f"{layer.keras_name}/{kind}", data=weights[kind])
      group.attrs["weight_names"] = np.array(weight_names, dtype="S")
      names.append(layer.keras_name)
    file.attrs["layer_names"] = np.array(names, dtype="S")


def merge_variables(initial: base.Variables, pretrained: Mapping[str, Any],
                    skip_modules: tuple[str, ...] = ()) -> tuple[dict, list[str], list[str]]:
  """`initial` with every leaf that `pretrained` holds at the same path and shape taken from it.

  Leaves under a module path in `skip_modules` (e.g. a head a port left at its random
  initialisation) keep their initial value. Returns (variables, loaded, kept) where loaded/kept
  list 'collection/module/.../leaf' paths.
  """
  loaded, kept = [], []

  def pick(path, value):
    names = [k.key for k in path]
    node = pretrained
    for name in names:
      node = node.get(name) if isinstance(node, Mapping) else None
      if node is None:
        break
    label = "/".join(names)
    module = "/".join(names[1:-1])
    if (node is None or np.shape(node) != np.shape(value)
        or any(module == s or module.startswith(s + "/") for s in skip_modules)):
      kept.append(label)
      return value
    loaded.append(label)
    return np.asarray(node).astype(np.asarray(value).dtype)

  merged = jax.tree_util.tree_map_with_path(pick, _copy_tree(initial))
  return merged, loaded, kept
