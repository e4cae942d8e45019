"""Weight porting: round trips, file formats and clear errors without the reference frameworks,
and ported weights against the frameworks themselves (the oracles, at the end).

Crafted or damaged weight files: each test asserts the error type and that its message names the
file or key. The crafted `.pth` files are written by a small torch-free pickle emitter
(`_pth_pickle`) that follows torch.save's zip layout: `<name>/data.pkl` (a dict of
`_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` calls, storages as
persistent ids ('storage', torch.<Type>Storage, key, location, numel)) and one
`<name>/data/<key>` file per storage.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

# keras 3 on its torch backend (the oracles below), chosen before keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "torch")

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest

import subprocess_env
from benchmarks import common as bench_common
from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax.models import vgg

REPO_ROOT = subprocess_env.REPO

TINY_DENSENET = dict(block_sizes=(1, 2, 1, 1), growth_rate=8, stem_width=16)


def _randomised(variables, seed: int):
  """Variables with every leaf replaced by distinct random values (variances positive)."""
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.uniform(0.5, 1.5, np.shape(x)).astype(np.float32) for x in leaves])


def _assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


@pytest.fixture(scope="module")
def tiny_densenet():
  model = densenet.densenet(num_outputs=1000, head="softmax", input_shape=(32, 32, 3),
                            **TINY_DENSENET)
  variables = jax.jit(model.init)(jax.random.key(0))
  return model, variables


@pytest.fixture(scope="module")
def vgg_abstract():
  """VGG16 variables as zeros of the right shapes (no compile: eval_shape)."""
  model = vgg.vgg16(num_outputs=1000, head="classic", input_shape=(224, 224, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return model, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_layer_lists_cover_every_parameter(tiny_densenet, vgg_abstract):
  for model, variables in (tiny_densenet, vgg_abstract):
    paths = {"/".join(layer.path) for layer in porting.model_layers(model)}
    owners = {"/".join(k.key for k in path[:-1])
              for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    assert owners == paths


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_torchvision_round_trip_is_exact(tiny_densenet, tmp_path, suffix):
  model, variables = tiny_densenet
  original = _randomised(variables, 1)
  state = porting.export_torchvision_state_dict(model, original)
  assert "features.denseblock2.denselayer2.conv2.weight" in state
  assert state["features.conv0.weight"].shape == (16, 3, 7, 7)  # OIHW
  path = str(tmp_path / f"w{suffix}")
  if suffix == ".npz":
    np.savez(path, **state)
  else:
    from safetensors.numpy import save_file
    save_file(state, path)
  ported, report = porting.port_torchvision(model, variables, path)
  _assert_trees_equal(ported, original)
  assert not report.kept_from_init


def test_keras_h5_round_trip_is_exact(tiny_densenet, tmp_path):
  model, variables = tiny_densenet
  original = _randomised(variables, 2)
  path = str(tmp_path / "w.h5")
  porting.export_keras_h5(model, original, path)
  ported, _ = porting.port_keras(model, variables, path)
  _assert_trees_equal(ported, original)


def test_vgg_fc1_is_permuted_from_torch_chw_order(vgg_abstract):
  model, variables = vgg_abstract
  kernel = np.arange(7 * 7 * 512 * 2, dtype=np.float32).reshape(7 * 7 * 512, 2)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  variables["params"]["fc1"]["kernel"] = np.pad(kernel, ((0, 0), (0, 4094)))
  state = porting.export_torchvision_state_dict(model, variables)
  weight = state["classifier.0.weight"]  # [out, C*H*W], flattened channel-first
  # Flax row (h, w, c) must be torch column (c, h, w).
  h, w, c = 3, 5, 100
  np.testing.assert_array_equal(weight[:2, c * 49 + h * 7 + w], kernel[(h * 7 + w) * 512 + c])


def test_include_top_false_keeps_head(tiny_densenet, tmp_path):
  model, variables = tiny_densenet
  sigmoid_model = densenet.densenet(num_outputs=1, head="sigmoid", input_shape=(32, 32, 3),
                                    **TINY_DENSENET)
  sigmoid_vars = jax.jit(sigmoid_model.init)(jax.random.key(3))
  path = str(tmp_path / "w.npz")
  np.savez(path, **porting.export_torchvision_state_dict(model, _randomised(variables, 4)))
  ported, report = porting.port_torchvision(sigmoid_model, sigmoid_vars, path)
  np.testing.assert_array_equal(ported["params"]["classifier"]["predictions"]["kernel"],
                                sigmoid_vars["params"]["classifier"]["predictions"]["kernel"])
  assert report.kept_from_init == ["classifier/predictions"]
  assert any("predictions" in entry for entry in report.ignored)
  with pytest.raises(porting.PortingError, match="include_top=True"):
    porting.port_torchvision(sigmoid_model, sigmoid_vars, path, include_top=True)


def test_wrong_file_lists_missing_unexpected_and_misshaped(tiny_densenet, tmp_path):
  model, variables = tiny_densenet
  other = densenet.densenet(num_outputs=1000, head="softmax", input_shape=(32, 32, 3),
                            block_sizes=(1, 1, 1, 2), growth_rate=8, stem_width=16)
  other_vars = jax.eval_shape(other.init, jax.random.key(0))
  other_vars = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), other_vars)
  path = str(tmp_path / "other.npz")
  np.savez(path, **porting.export_torchvision_state_dict(other, other_vars))
  with pytest.raises(porting.PortingError) as error:
    porting.port_torchvision(model, variables, path)
  message = str(error.value)
  assert "other.npz" in message
  assert "missing" in message and "conv3_block2_1_conv" in message
  assert "unexpected" in message and "denseblock4.denselayer2" in message
  assert "mis-shaped" in message


def test_torch_zip_reader_refuses_code(tmp_path):
  """A .pth whose pickle names any global but tensors/OrderedDict is refused, not run."""
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="system"):
    porting.read_torch_state_dict(str(path))
  assert not marker.exists()
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"x": 1}))
  with pytest.raises(porting.PortingError, match="legacy"):
    porting.read_torch_state_dict(str(legacy))


def test_old_torchvision_densenet_keys_are_renamed(tmp_path):
  """torchvision's published DenseNet files spell 'norm.1'; the reader renames it 'norm1'."""
  path = str(tmp_path / "old.npz")
  np.savez(path, **{"features.denseblock1.denselayer1.norm.1.weight": np.ones(3),
                    "features.norm0.weight": np.ones(3)})
  assert sorted(porting.read_torch_state_dict(path)) == [
      "features.denseblock1.denselayer1.norm1.weight", "features.norm0.weight"]


def test_missing_file_and_unknown_source(tiny_densenet):
  model, variables = tiny_densenet
  with pytest.raises(FileNotFoundError, match="nowhere.h5"):
    porting.port_keras(model, variables, "/nowhere.h5")
  with pytest.raises(ValueError, match="source"):
    porting.port("caffe", model, variables, "/nowhere.h5")


def test_merge_variables_takes_matching_leaves_and_keeps_the_rest(tiny_densenet):
  model, variables = tiny_densenet
  pretrained = _randomised(variables, 5)
  sigmoid_model = densenet.densenet(num_outputs=1, head="sigmoid", input_shape=(32, 32, 3),
                                    **TINY_DENSENET)
  initial = jax.jit(sigmoid_model.init)(jax.random.key(6))
  merged, loaded, kept = porting.merge_variables(initial, pretrained)
  assert kept == ["params/classifier/predictions/bias", "params/classifier/predictions/kernel"]
  np.testing.assert_array_equal(merged["params"]["backbone"]["bn"]["scale"],
                                pretrained["params"]["backbone"]["bn"]["scale"])
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["bn"]["var"],
                                pretrained["batch_stats"]["backbone"]["bn"]["var"])
  assert len(loaded) + len(kept) == len(jax.tree_util.tree_leaves(initial))
  # A skipped module keeps its initial value even where shapes match.
  merged, _, kept = porting.merge_variables(variables, pretrained, skip_modules=("backbone/bn",))
  np.testing.assert_array_equal(merged["params"]["backbone"]["bn"]["scale"],
                                variables["params"]["backbone"]["bn"]["scale"])
  assert "batch_stats/backbone/bn/mean" in kept


# ----------------------------------------------------------------------------- crafted .pth


def _int(value: int) -> bytes:
  """LONG1: any python int, two's complement little-endian."""
  length = max(1, (value.bit_length() + 8) // 8)
  return b"\x8a" + bytes([length]) + value.to_bytes(length, "little", signed=True)


def _str(value: str) -> bytes:
  data = value.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(storage_type: str, key: str, numel: int, offset: int, size: tuple[int, ...],
            stride: tuple[int, ...]) -> bytes:
  """Opcodes of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""
  storage = _tuple([_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"),
                    _int(numel)]) + b"Q"
  args = [storage, _int(offset), _tuple([_int(n) for n in size]),
          _tuple([_int(s) for s in stride]), b"\x89",
          _global("collections", "OrderedDict") + b")R"]
  return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _pth_pickle(entries: list[tuple[str, bytes]]) -> bytes:
  """A protocol-2 pickle of a dict {key: tensor opcodes}, keys in order (repeats kept)."""
  body = b"".join(_str(key) + value for key, value in entries)
  return b"\x80\x02}(" + body + b"u."


def _write_pth(path, entries: list[tuple[str, bytes]], storages: dict[str, bytes],
               extra_members: tuple[tuple[str, bytes], ...] = ()) -> str:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", _pth_pickle(entries))
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    for key, data in storages.items():
      archive.writestr(f"archive/data/{key}", data)
    for name, data in extra_members:
      archive.writestr(name, data)
  return str(path)


FOUR_FLOATS = np.arange(4, dtype="<f4").tobytes()


def _valid_entries() -> tuple[list[tuple[str, bytes]], dict[str, bytes]]:
  """'a': the 4 floats; 'b': a transposed 2x3 view of 6 floats (stride (1, 2))."""
  six = np.arange(10, 16, dtype="<f4").tobytes()
  return ([("a", _tensor("FloatStorage", "0", 4, 0, (4,), (1,))),
           ("b", _tensor("FloatStorage", "1", 6, 0, (2, 3), (1, 2)))],
          {"0": FOUR_FLOATS, "1": six})


def test_crafted_writer_matches_torch_and_the_reader(tmp_path):
  """The emitter writes what torch.load reads (when torch is installed) and the reader agrees
  with an independent numpy reading of the storages."""
  entries, storages = _valid_entries()
  path = _write_pth(tmp_path / "valid.pth", entries, storages)
  state = porting.read_torch_pth(path)
  np.testing.assert_array_equal(state["a"], [0, 1, 2, 3])
  np.testing.assert_array_equal(state["b"], np.arange(10, 16, dtype=np.float32).reshape(3, 2).T)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  loaded = torch.load(path, weights_only=True)
  for key in ("a", "b"):
    np.testing.assert_array_equal(loaded[key].numpy(), state[key])


def test_real_torch_save_file_reads_like_torch(tmp_path):
  """A file torch.save wrote (non-contiguous and offset views included) reads back exactly."""
  torch = pytest.importorskip("torch")
  base_tensor = torch.arange(24, dtype=torch.float32)
  state = {"w": base_tensor.reshape(2, 3, 4).permute(2, 0, 1), "tail": base_tensor[5:9],
           "i": torch.tensor([3, -1], dtype=torch.int64), "empty": torch.zeros(0, 3)}
  path = str(tmp_path / "real.pth")
  torch.save(state, path)
  ours = porting.read_torch_pth(path)
  assert sorted(ours) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
    assert ours[key].dtype == value.numpy().dtype


# Each crafted case: (file name, entries, storages, extra members, words the error must name).
def _crafted_cases() -> list[tuple[str, list, dict, tuple, tuple[str, ...]]]:
  ok = _tensor("FloatStorage", "0", 4, 0, (4,), (1,))
  return [
      ("oversized_view.pth", [("w", _tensor("FloatStorage", "0", 4, 0, (50_000_000,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "data/0", "49999999")),
      ("sixty_four.pth", [("w", _tensor("FloatStorage", "0", 4, 0, (8, 8), (8, 1)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "data/0", "past the end")),
      ("negative_stride.pth", [("w", _tensor("FloatStorage", "0", 4, 3, (4,), (-1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "negative stride")),
      ("zero_stride.pth", [("w", _tensor("FloatStorage", "0", 4, 0, (4, 2), (1, 0)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "zero stride")),
      ("offset_past_end.pth", [("w", _tensor("FloatStorage", "0", 4, 9, (1,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "offset 9")),
      ("negative_offset.pth", [("w", _tensor("FloatStorage", "0", 4, -2, (2,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "negative")),
      ("negative_size.pth", [("w", _tensor("FloatStorage", "0", 4, 0, (-3,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "negative dimension")),
      ("rank_mismatch.pth", [("w", _tensor("FloatStorage", "0", 4, 0, (2, 2), (1,)))],
       {"0": FOUR_FLOATS}, (), ("'w'", "different lengths")),
      ("unknown_dtype.pth", [("w", _tensor("ComplexFloatStorage", "0", 4, 0, (4,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("torch.ComplexFloatStorage",)),
      ("missing_storage.pth", [("w", ok)], {}, (), ("archive/data/0", "missing")),
      ("short_storage.pth", [("w", _tensor("FloatStorage", "0", 40, 0, (4,), (1,)))],
       {"0": FOUR_FLOATS}, (), ("archive/data/0", "16 bytes", "160 bytes")),
      ("duplicate_key.pth", [("w", ok), ("w", ok)], {"0": FOUR_FLOATS}, (), ("'w'", "twice")),
      ("duplicate_member.pth", [("w", ok)], {"0": FOUR_FLOATS},
       (("archive/data/0", FOUR_FLOATS),), ("archive/data/0", "more than once")),
  ]


_LOAD_EACH = """
import json, sys
from medxai_jax.models import porting
results = {}
for path in sys.argv[1:]:
  try:
    porting.read_torch_state_dict(path)
    results[path] = ["no error", ""]
  except Exception as error:  # the test asserts the type
    kind = "PortingError" if isinstance(error, porting.PortingError) else type(error).__name__
    results[path] = [kind, str(error)]
print(json.dumps(results))
"""


def test_crafted_pth_files_raise_clean_errors_never_crash(tmp_path):
  """Oversized, strided, offset, mistyped, missing and duplicated entries: a PortingError naming
  the file and the entry for each; loaded in a subprocess so that a crash fails the test."""
  cases = _crafted_cases()
  paths = []
  for name, entries, storages, extra, _ in cases:
    import warnings  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # zipfile warns about the duplicate member
      paths.append(_write_pth(tmp_path / name, entries, storages, extra))
  completed = subprocess.run([sys.executable, "-c", _LOAD_EACH, *paths], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, (
      f"the loader process died with status {completed.returncode}: {completed.stderr[-2000:]}")
  results = json.loads(completed.stdout.strip().splitlines()[-1])
  for path, (_, _, _, _, words) in zip(paths, cases):
    error_type, message = results[path]
    assert error_type == "PortingError", (path, error_type, message)
    for word in (path, *words):
      assert word in message, (word, message)


# ----------------------------------------------------------------------------- damaged files


def _truncated_copy(source: str, destination: str, fraction: float = 0.5) -> str:
  data = open(source, "rb").read()
  with open(destination, "wb") as file:
    file.write(data[: int(len(data) * fraction)])
  return destination


def test_truncated_and_foreign_h5_files_name_the_file(tmp_path):
  """A truncated Keras .h5 / .weights.h5 and a text file named .h5: PortingError with the path."""
  import h5py  # pylint: disable=import-outside-toplevel
  whole = str(tmp_path / "whole.h5")
  with h5py.File(whole, "w") as file:
    group = file.create_group("conv1_conv")
    group.create_dataset("conv1_conv/kernel", data=np.ones((64, 64, 16), np.float32))
    group.attrs["weight_names"] = np.array(["conv1_conv/kernel"], dtype="S")
    file.attrs["layer_names"] = np.array(["conv1_conv"], dtype="S")
  assert "conv1_conv" in porting.read_keras_h5(whole)  # the intact file reads
  damaged = [_truncated_copy(whole, str(tmp_path / "truncated.h5")),
             _truncated_copy(whole, str(tmp_path / "truncated.weights.h5"))]
  foreign = tmp_path / "notes.h5"
  foreign.write_text("not an HDF5 file")
  for path, reader in ((damaged[0], porting.read_keras_h5),
                       (damaged[1], porting.read_keras3_weights),
                       (str(foreign), porting.read_keras_h5)):
    with pytest.raises(porting.PortingError) as error:
      reader(path)
    assert path in str(error.value) and "not a readable" in str(error.value)


def test_truncated_npz_safetensors_and_pth_name_the_file(tmp_path):
  """Truncated .npz, .safetensors and .pth state dicts: PortingError naming each file."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = {"features.conv0.weight": np.arange(4096, dtype=np.float32)}
  npz, safetensors_path = str(tmp_path / "w.npz"), str(tmp_path / "w.safetensors")
  np.savez(npz, **state)
  save_file(state, safetensors_path)
  entries, storages = _valid_entries()
  pth = _write_pth(tmp_path / "w.pth", entries, storages)
  for whole in (npz, safetensors_path, pth):
    porting.read_torch_state_dict(whole)  # the intact file reads
    stem, suffix = os.path.splitext(whole)
    for fraction in (0.5, 0.9):
      damaged = _truncated_copy(whole, f"{stem}_cut{int(fraction * 100)}{suffix}", fraction)
      with pytest.raises(porting.PortingError) as error:
        porting.read_torch_state_dict(damaged)
      assert damaged in str(error.value)
  pickled = tmp_path / "pickled.npz"
  pickled.write_bytes(pickle.dumps({"x": 1}))
  with pytest.raises(porting.PortingError, match="pickled.npz"):
    porting.read_torch_state_dict(str(pickled))


def test_view_bounds_agree_with_a_naive_walk_over_every_index():
  """`tensor_view_problem` accepts exactly the views whose every addressed element (found by
  enumerating all multi-indices) lies in the storage, for small random sizes/strides/offsets."""
  rng = np.random.default_rng(0)
  for _ in range(400):
    rank = int(rng.integers(1, 4))
    size = tuple(int(n) for n in rng.integers(0, 4, rank))
    stride = tuple(int(s) for s in rng.integers(-2, 6, rank))
    offset, numel = int(rng.integers(0, 8)), int(rng.integers(0, 24))
    problem = porting.tensor_view_problem(numel, offset, size, stride)
    addresses = [offset + sum(i * s for i, s in zip(index, stride))
                 for index in np.ndindex(*size)]
    in_bounds = offset <= numel and all(0 <= a < numel for a in addresses)
    aliased = any(n > 1 and s < 1 for n, s in zip(size, stride)) and addresses
    assert (problem is None) == (in_bounds and not aliased), (size, stride, offset, numel,
                                                               problem)


# ----------------------------------------------------------------------------------------------
# Ported weights reproduce Keras and torchvision: logits and every tap, max abs error <= 1e-4.
#
# The reference frameworks build the networks with random weights (BatchNorm statistics and
# affine parameters randomised too, so a swapped mean/variance could not pass), save them in their
# own file formats, and we port those files. The oracles are the `oracle` extra (keras 3 on its
# torch backend, so that its convolutions are not XLA's, and faster to build than on JAX, which
# compiles every weight initialiser; torch + torchvision on the CPU); `make test` installs it. Set
# MEDXAI_REQUIRE_ORACLES=1 (as `make test` does) to fail instead of skip when they are missing.

TOLERANCE = 1e-4


def _oracle(name: str):
  """The reference framework module; skipped when absent unless MEDXAI_REQUIRE_ORACLES=1."""
  if os.environ.get("MEDXAI_REQUIRE_ORACLES") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)


def _inputs(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, *shape)).astype(np.float32)


def _densenet_taps(block_sizes) -> list[str]:
  taps = ["stem"]
  for index in range(len(block_sizes)):
    taps.append(f"block{index + 1}")
    if index < len(block_sizes) - 1:
      taps.append(f"transition{index + 1}")
  return taps + ["last_conv", "embedding", "logits"]


def _template_variables(model) -> dict:
  """Zero variables of the model's structure: a porting template without compiling `init`
  (the tests assert that porting replaces every leaf, or name the ones it keeps)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def _flax_densenet_outputs(model, variables_list, images) -> list[dict[str, np.ndarray]]:
  """Every DenseNet tap and the logits, for each variables of the list (compiled once)."""

  @jax.jit
  def run(variables, images):
    taps = dict(model.module.apply(
        variables, images, False, method=lambda module, x, train: module.backbone(x, train)))
    taps["logits"] = model.logits(variables, images)
    return taps

  return [jax.tree_util.tree_map(np.asarray, run(variables, images))
          for variables in variables_list]


def _flax_vgg_outputs(model, variables_list, images, taps) -> list[dict[str, np.ndarray]]:
  """The VGG taps, for each variables of the list (compiled once)."""

  @jax.jit
  def run(variables, images):
    return {tap: (model.logits(variables, images) if tap == "logits"
                  else model.features(variables, images, tap)) for tap in taps}

  return [jax.tree_util.tree_map(np.asarray, run(variables, images))
          for variables in variables_list]


def _max_errors(ours: dict, reference: dict) -> dict[str, float]:
  """Max abs error of every reference tap (shapes must agree)."""
  assert set(ours) >= set(reference)
  errors = {}
  for tap, expected in reference.items():
    assert ours[tap].shape == expected.shape, (tap, ours[tap].shape, expected.shape)
    errors[tap] = float(np.max(np.abs(ours[tap] - expected)))
  return errors


def _worst(errors_by_file: dict[str, dict[str, float]]) -> tuple[float, str]:
  """Largest error over files and taps, with where it occurred."""
  return max((error, f"{name}:{tap}") for name, errors in errors_by_file.items()
             for tap, error in errors.items())


# ----------------------------------------------------------------------------- Keras


def _randomise_keras(model, seed: int) -> None:
  """Random BatchNorm statistics/affine parameters and biases (kernels keep Keras' init)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if type(layer).__name__ == "BatchNormalization":
      gamma, beta, mean, var = (w.shape for w in weights)
      layer.set_weights([rng.uniform(0.5, 1.5, gamma), rng.normal(0, 0.1, beta),
                         rng.normal(0, 0.1, mean), rng.uniform(0.5, 1.5, var)])
    elif len(weights) == 2:
      layer.set_weights([weights[0], rng.normal(0, 0.05, weights[1].shape)])


def _keras_outputs(keras, model, names: dict[str, str], images) -> dict[str, np.ndarray]:
  probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names.values()])
  outputs = probe.predict(images, verbose=0, batch_size=len(images))
  return {tap: np.asarray(value) for tap, value in zip(names, outputs)}


def _keras_densenet_names(block_sizes) -> dict[str, str]:
  names = {"stem": "conv1_relu"}
  for index, size in enumerate(block_sizes):
    names[f"block{index + 1}"] = f"conv{index + 2}_block{size}_concat"
    if index < len(block_sizes) - 1:
      names[f"transition{index + 1}"] = f"pool{index + 2}_pool"
  names.update(last_conv="relu", embedding="avg_pool", logits="predictions")
  return names


def _keras_files(keras, model, directory) -> list[str]:
  """The model saved as a Keras 3 `.weights.h5` and as a layer-named legacy `.h5`."""
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  new_format = str(directory / "model.weights.h5")
  model.save_weights(new_format)
  legacy = str(directory / "model_legacy.h5")
  with h5py.File(legacy, "w") as file:
    legacy_h5_format.save_weights_to_hdf5_group(file, model)
  return [new_format, legacy]


def _check_keras_densenet(tmp_path, block_sizes, input_shape, depth=None):
  keras = _oracle("keras")
  from keras.src.applications import densenet as keras_densenet
  keras.utils.set_random_seed(0)
  reference = keras_densenet.DenseNet(list(block_sizes), include_top=True, weights=None,
                                      input_shape=input_shape, classes=1000,
                                      classifier_activation=None)
  _randomise_keras(reference, 1)
  images = _inputs(input_shape)
  expected = _keras_outputs(keras, reference, _keras_densenet_names(block_sizes), images)
  fields = {"depth": depth} if depth else {"block_sizes": tuple(block_sizes)}
  model = densenet.densenet(num_outputs=1000, head="softmax", input_shape=input_shape, **fields)
  variables = _template_variables(model)
  paths, ported = _keras_files(keras, reference, tmp_path), []
  for path in paths:
    variables_of_file, report = porting.port_keras(model, variables, path)
    assert not report.kept_from_init, (path, report.kept_from_init)
    ported.append(variables_of_file)
  return {path: _max_errors(outputs, expected)
          for path, outputs in zip(paths, _flax_densenet_outputs(model, ported, images))}


def test_keras_densenet_small(tmp_path):
  error, where = _worst(_check_keras_densenet(tmp_path, (2, 1, 2, 1), (64, 64, 3)))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 320])
def test_keras_densenet169(tmp_path, size):
  error, where = _worst(_check_keras_densenet(tmp_path, densenet.BLOCK_SIZES[169], (size, size, 3), depth=169))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


def _check_keras_vgg16(tmp_path, include_top: bool, size: int):
  keras = _oracle("keras")
  keras.utils.set_random_seed(0)
  reference = keras.applications.VGG16(include_top=include_top, weights=None,
                                       input_shape=(size, size, 3), classifier_activation=None)
  _randomise_keras(reference, 2)
  names = {f"block{b}": f"block{b}_pool" for b in range(1, 6)}
  names["last_conv"] = "block5_conv3"
  if include_top:
    names.update(embedding="fc2", logits="predictions")
  images = _inputs((size, size, 3))
  expected = _keras_outputs(keras, reference, names, images)
  head = "classic" if include_top else "gap"
  model = vgg.vgg16(num_outputs=1000 if include_top else 7, head=head,
                    input_shape=(size, size, 3))
  variables = _template_variables(model)
  if not include_top:  # the gap head's 'block5' is block5_conv3 (no pool); 'last_conv' is new
    expected["block5"] = expected.pop("last_conv")
  paths, ported = _keras_files(keras, reference, tmp_path), []
  for path in paths:
    variables_of_file, report = porting.port_keras(model, variables, path)
    if not include_top:
      assert sorted(report.kept_from_init) == ["gap_conv", "predictions"]
    ported.append(variables_of_file)
  return {path: _max_errors(outputs, expected) for path, outputs
          in zip(paths, _flax_vgg_outputs(model, ported, images, list(names)))}


@pytest.mark.slow
def test_keras_vgg16_with_top_224(tmp_path):
  error, where = _worst(_check_keras_vgg16(tmp_path, include_top=True, size=224))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


@pytest.mark.slow
def test_keras_vgg16_without_top_320(tmp_path):
  error, where = _worst(_check_keras_vgg16(tmp_path, include_top=False, size=320))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


# ----------------------------------------------------------------------------- torchvision


def _nhwc(tensor) -> np.ndarray:
  value = tensor.detach().numpy()
  return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def _torch_densenet_outputs(torch, net, images) -> dict[str, np.ndarray]:
  outputs = {}
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    for name, child in net.features.named_children():
      x = child(x)
      if name == "relu0":
        outputs["stem"] = _nhwc(x)
      elif name.startswith("denseblock"):
        outputs[f"block{name[len('denseblock'):]}"] = _nhwc(x)
      elif name.startswith("transition"):
        outputs[name] = _nhwc(x)
    x = torch.nn.functional.relu(x)
    outputs["last_conv"] = _nhwc(x)
    pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
    outputs["embedding"] = _nhwc(pooled)
    outputs["logits"] = _nhwc(net.classifier(pooled))
  return outputs


def _check_torch_densenet(tmp_path, block_sizes, input_shape, depth=None):
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  torch.manual_seed(0)
  net = torchvision.models.DenseNet(growth_rate=32, block_config=tuple(block_sizes),
                                    num_init_features=64, num_classes=1000).eval()
  bench_common.randomise_torch_model(torch, net, 1)
  images = _inputs(input_shape)
  expected = _torch_densenet_outputs(torch, net, images)
  path = str(tmp_path / "densenet.pth")
  torch.save(net.state_dict(), path)
  fields = {"depth": depth} if depth else {"block_sizes": tuple(block_sizes)}
  model = densenet.densenet(num_outputs=1000, head="softmax", input_shape=input_shape,
                            bn_epsilon=porting.BN_EPSILON["torchvision"], **fields)
  variables = _template_variables(model)
  ported, report = porting.port_torchvision(model, variables, path)
  assert not report.kept_from_init
  return {path: _max_errors(_flax_densenet_outputs(model, [ported], images)[0], expected)}


def test_torchvision_densenet_small(tmp_path):
  error, where = _worst(_check_torch_densenet(tmp_path, (2, 1, 2, 1), (64, 64, 3)))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 320])
def test_torchvision_densenet169(tmp_path, size):
  error, where = _worst(_check_torch_densenet(tmp_path, densenet.BLOCK_SIZES[169], (size, size, 3), depth=169))
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"


@pytest.mark.slow
def test_torchvision_vgg16_224(tmp_path):
  torch = _oracle("torch")
  torchvision = _oracle("torchvision")
  torch.manual_seed(0)
  net = torchvision.models.vgg16(weights=None).eval()
  bench_common.randomise_torch_model(torch, net, 2)
  images = _inputs((224, 224, 3))
  expected = {}
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    block = 0
    for child in net.features.children():
      x = child(x)
      if isinstance(child, torch.nn.MaxPool2d):
        block += 1
        expected[f"block{block}"] = _nhwc(x)
    hidden = net.classifier[:5](torch.flatten(net.avgpool(x), 1))
    expected["embedding"] = _nhwc(hidden)
    expected["logits"] = _nhwc(net.classifier[5:](hidden))
  path = str(tmp_path / "vgg16.safetensors")
  from safetensors.torch import save_file
  save_file(net.state_dict(), path)
  model = vgg.vgg16(num_outputs=1000, head="classic", input_shape=(224, 224, 3))
  variables = _template_variables(model)
  ported, _ = porting.port_torchvision(model, variables, path)
  error, where = _worst({path: _max_errors(
      _flax_vgg_outputs(model, [ported], images, list(expected))[0], expected)})
  assert error <= TOLERANCE, f"max abs error {error:.2e} at {where}"
