"""Ported weights reproduce Keras and torchvision: logits and every tap, max abs error <= 1e-4.

The reference frameworks build the networks with random weights (BatchNorm statistics and
affine parameters randomised too, so a swapped mean/variance could not pass), save them in their
own file formats, and we port those files. The oracles are the `oracle` extra (keras 3 on its
torch backend, so that its convolutions are not XLA's, and faster to build than on JAX, which
compiles every weight initialiser; torch + torchvision on the CPU); `make test` installs it. Set
MEDXAI_REQUIRE_ORACLES=1 (as `make test` does) to fail instead of skip when they are missing.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from benchmarks import common as bench_common  # pylint: disable=wrong-import-position
from medxai_jax.models import densenet  # pylint: disable=wrong-import-position
from medxai_jax.models import porting  # pylint: disable=wrong-import-position
from medxai_jax.models import vgg  # pylint: disable=wrong-import-position

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
