"""Hostile and careless inputs: crafted or damaged weight files and bad images for attribution.

Each test asserts the error type and that its message names the file, key, field or index.
The crafted `.pth` files are written by a small torch-free pickle emitter (`_pth_pickle`) that
follows torch.save's zip layout: `<name>/data.pkl` (a dict of `_rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks)` calls, storages as persistent ids ('storage',
torch.<Type>Storage, key, location, numel)) and one `<name>/data/<key>` file per storage.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import subprocess_env
import tiny
from medxai_jax.models import porting

REPO_ROOT = subprocess_env.REPO


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


# ----------------------------------------------------------------------------- attribution inputs

import jax  # noqa: E402  (the porting tests above need no JAX)
import jax.numpy as jnp  # noqa: E402

from medxai_jax.analysis import crm_tables  # noqa: E402
from medxai_jax.attribution import activations  # noqa: E402
from medxai_jax.attribution import cam  # noqa: E402
from medxai_jax.attribution import common  # noqa: E402
from medxai_jax.attribution import crm  # noqa: E402
from medxai_jax.attribution import gradients  # noqa: E402
from medxai_jax.attribution import integrated  # noqa: E402
from medxai_jax.attribution import xrai  # noqa: E402
from medxai_jax.models import custom_cnn  # noqa: E402
from medxai_jax.models import densenet  # noqa: E402
from medxai_jax.models import vgg  # noqa: E402

SIDE = 32
_KEY = jax.random.key(0)
# Every method that takes targets, at its cheapest settings (the errors come before any work).
TARGETED = {
    "vanilla_gradients": lambda m, v, x, t: gradients.vanilla_gradients(m.logits_fn(v), x, t),
    "smoothgrad": lambda m, v, x, t: gradients.smoothgrad(m.logits_fn(v), x, t, key=_KEY,
                                                          num_samples=2, chunk_size=2),
    "integrated_gradients": lambda m, v, x, t: integrated.integrated_gradients(
        m.logits_fn(v), x, t, num_steps=2, chunk_size=2),
    "blur_ig": lambda m, v, x, t: integrated.blur_ig(m.logits_fn(v), x, t, num_steps=2,
                                                     max_sigma=2.0),
    "guided_ig": lambda m, v, x, t: integrated.guided_ig(m.logits_fn(v), x, t, num_steps=2),
    "grad_cam": lambda m, v, x, t: cam.grad_cam(m.split(v), x, t),
    "cam": lambda m, v, x, t: cam.cam(m.split(v), x, t),
    "xrai": lambda m, v, x, t: xrai.xrai(m.logits_fn(v), x, t, num_steps=2),
    "fast_xrai": lambda m, v, x, t: xrai.fast_xrai(m.logits_fn(v), x, t, num_steps=2),
}
# Methods without targets.
UNTARGETED = {
    "crm": lambda m, v, x, t: crm.crm(m.split(v), x),
    "activations_at": lambda m, v, x, t: activations.activations_at(
        activations.model_splits(m, v), x),
}
ALL_METHODS = {**TARGETED, **UNTARGETED}


def _tiny_densenet(num_outputs: int):
  head = "sigmoid" if num_outputs == 1 else "softmax"
  model = tiny.densenet(num_outputs=num_outputs, head=head, input_shape=(SIDE, SIDE, 1))
  return model, jax.jit(model.init)(jax.random.key(1))


@pytest.fixture(scope="module")
def one_logit():
  return _tiny_densenet(1)


@pytest.fixture(scope="module")
def three_class():
  return _tiny_densenet(3)


def _images(batch: int = 2, side: int = SIDE) -> jax.Array:
  return jax.random.uniform(jax.random.key(2), (batch, side, side, 1))


@pytest.mark.parametrize("name", sorted(TARGETED))
def test_out_of_range_targets_are_refused_by_every_method(name, one_logit, three_class):
  """Target 5 on a one-logit model, 9 or -1 on a 3-class model: ValueError naming the target,
  its index and the valid range (grad_cam/cam used to return some other class's map)."""
  method = TARGETED[name]
  cases = [(one_logit, [0, 5], "target 5 (targets[1])", "[0, 2)"),
           (three_class, [9, 0], "target 9 (targets[0])", "[0, 3)"),
           (three_class, [2, -1], "target -1 (targets[1])", "[0, 3)")]
  for (model, variables), targets, names, valid in cases:
    with pytest.raises(ValueError) as error:
      method(model, variables, _images(), jnp.asarray(targets, jnp.int32))
    assert names in str(error.value) and valid in str(error.value), str(error.value)


def test_one_logit_targets_mean_negative_and_positive_class(one_logit):
  """For one logit z, target 1 explains z and target 0 explains -z: the Grad-CAM maps before
  the ReLU (and the input gradients) of the two targets are exact negatives."""
  model, variables = one_logit
  images = _images()
  positive = cam.grad_cam(model.split(variables), images, jnp.ones(2, jnp.int32), relu=False)
  negative = cam.grad_cam(model.split(variables), images, jnp.zeros(2, jnp.int32), relu=False)
  np.testing.assert_allclose(negative, -positive, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(positive).max()) > 0
  grad_one = gradients.vanilla_gradients(model.logits_fn(variables), images, 1)
  grad_zero = gradients.vanilla_gradients(model.logits_fn(variables), images, 0)
  np.testing.assert_allclose(grad_zero, -grad_one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_a_non_finite_pixel_is_refused_naming_the_image(name, three_class):
  """One NaN pixel in image 1 (and an Inf in image 2): ValueError naming images[1], the pixel,
  and the other image; never a NaN map."""
  model, variables = three_class
  images = _images(3).at[1, 7, 11, 0].set(jnp.nan).at[2, 0, 3, 0].set(jnp.inf)
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, images, jnp.zeros(3, jnp.int32))
  message = str(error.value)
  assert "images[1]" in message and "NaN at row 7, column 11" in message, message
  assert "[2]" in message, message


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_integer_images_are_refused_with_the_expected_range(name, dtype, three_class):
  """Raw 0-255 integer images: ValueError naming the dtype and the [0, 1] float input the
  models expect (they used to give maps ~145x larger than for the same images in [0, 1])."""
  model, variables = three_class
  images = np.asarray(_images() * 255, dtype)
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, images, jnp.zeros(2, jnp.int32))
  message = str(error.value)
  assert f"dtype {np.dtype(dtype).name}" in message and "[0, 1]" in message, message


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_an_empty_batch_is_refused(name, three_class):
  model, variables = three_class
  with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 32, 32, 1\)\)"):
    ALL_METHODS[name](model, variables, _images(0), jnp.zeros(0, jnp.int32))


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_images_below_the_architecture_minimum_name_it(name, three_class):
  """16x16 images into a DenseNet whose minimum is 29x29: ValueError naming both sizes (it used
  to be a ZeroDivisionError in the map resize, or NaN logits)."""
  model, variables = three_class
  assert model.min_input_size == 29
  with pytest.raises(ValueError) as error:
    ALL_METHODS[name](model, variables, _images(2, 16), jnp.zeros(2, jnp.int32))
  assert "16x16" in str(error.value) and "29x29" in str(error.value), str(error.value)


def test_training_and_init_refuse_inputs_below_the_minimum(three_class):
  """config.model.input_shape below the minimum fails at init (VGG16's classic head used to
  raise ZeroDivisionError in its initialiser: a zero fan-in); train_apply checks each batch."""
  with pytest.raises(ValueError, match=r"16x16 .*32x32 minimum of VGG16"):
    vgg.vgg16(num_outputs=2, head="classic", input_shape=(16, 16, 3)).init(jax.random.key(0))
  model, variables = three_class
  with pytest.raises(ValueError, match=r"20x40 .*29x29"):
    model.train_apply(variables, jnp.zeros((1, 20, 40, 1)), jax.random.key(0))


def _head_input_side(model, side: int) -> int:
  """Independent oracle: the side of the map the head reads, by abstract evaluation of the
  module itself (no size arithmetic), 0 for an empty map."""
  channels = model.input_shape[-1]
  variables = jax.eval_shape(model.init, jax.random.key(0))
  module = model.module

  def head_input(v, x):
    feature_map = module.apply(v, x, model.resolve_tap("last_conv"), train=False,
                               method="features")
    if isinstance(module, vgg.VGG16):
      return module.apply(v, feature_map, method=lambda m, f: m._pool_input(f))
    if isinstance(module, custom_cnn.CustomCNN) and module.pool_after[-1]:
      return custom_cnn._max_pool(feature_map)
    return feature_map

  shape = jax.eval_shape(head_input, variables,
                         jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)).shape
  return min(shape[1], shape[2])


@pytest.mark.parametrize("model", [
    tiny.densenet(input_shape=(64, 64, 1)),
    densenet.densenet(depth=121, input_shape=(224, 224, 3)),
    vgg.vgg16(head="gap", num_outputs=2, input_shape=(64, 64, 3)),
    vgg.vgg16(head="classic", num_outputs=2, input_shape=(224, 224, 3)),
    custom_cnn.custom_cnn(num_outputs=2, input_shape=(64, 64, 1), conv_widths=(4, 4, 4, 4, 4),
                          dense_widths=(4,)),
    custom_cnn.custom_cnn(num_outputs=2, input_shape=(64, 64, 1), conv_widths=(4, 4, 4, 4, 4),
                          first_kernel_size=11, first_stride=4,
                          pool_after=(True, False, False, False, False), dense_widths=(4,)),
], ids=["densenet_tiny", "densenet121", "vgg_gap", "vgg_classic", "custom_cnn", "custom_cnn_k11"])
def test_min_input_size_is_the_smallest_side_with_a_non_empty_map(model):
  """min_input_size s: the module's own head input is non-empty at s and empty at s - 1."""
  minimum = model.min_input_size
  assert _head_input_side(model, minimum) >= 1
  assert _head_input_side(model, minimum - 1) == 0


def test_check_method_inputs_covers_jitted_callers(three_class):
  """When the images are jit arguments the finite check cannot run (they are tracers); a caller
  that jits a method checks the concrete batch with check_method_inputs first, which raises what
  the eager method raises. Images closed over as constants are still checked under jit, and the
  jitted method gives the eager maps on clean images."""
  model, variables = three_class
  clean = _images()
  targets = jnp.asarray([0, 2], jnp.int32)
  jitted = jax.jit(lambda x, t: cam.grad_cam(model.split(variables), x, t))
  np.testing.assert_allclose(jitted(clean, targets),
                             cam.grad_cam(model.split(variables), clean, targets),
                             rtol=1e-5, atol=1e-6)
  common.check_method_inputs(model.logits_fn(variables), clean, targets)
  with_nan = clean.at[0, 1, 1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"images\[0\] has non-finite"):
    common.check_method_inputs(model.logits_fn(variables), with_nan, targets)
  # Concrete images closed over by a jitted function (only the variables traced) are checked.
  with pytest.raises(ValueError, match=r"images\[0\] has non-finite"):
    jax.jit(lambda v: gradients.vanilla_gradients(model.logits_fn(v), with_nan, targets))(
        variables)
  with pytest.raises(ValueError, match=r"target 3 \(targets\[1\]\)"):
    common.check_method_inputs(model.logits_fn(variables), clean, jnp.asarray([0, 3], jnp.int32))


def test_class_average_crm_refuses_nan_and_unscaled_integer_batches(three_class):
  """The dataset-level CRM jits its step, so it checks each stored batch on the host: a NaN
  batch names the batch and image; integer images without a preprocess are refused."""
  model, variables = three_class
  images = np.asarray(_images(4))
  labels = np.zeros(4, np.int64)
  bad = images.copy()
  bad[3, 2, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"batch 1 images\[1\] has non-finite"):
    crm_tables.class_average_crm(model.split(variables), (bad, labels), batch_size=2,
                                 method="ablation")
  with pytest.raises(ValueError, match="dtype uint8"):
    crm_tables.class_average_crm(model.split(variables), ((images * 255).astype(np.uint8),
                                                          labels), batch_size=2, method="ablation")
