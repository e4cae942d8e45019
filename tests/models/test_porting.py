"""Weight porting without the reference frameworks: round trips, file formats, clear errors."""

from __future__ import annotations

import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax.models import vgg

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
