"""Training from ported weights: config.init_from, port_weights, and a frozen ported backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import subprocess_env
import tiny
from configs import demo
from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax import runs
from medxai_jax.train import checkpoint
from medxai_jax.train import loop

REPO = subprocess_env.REPO
TINY_DENSENET = tiny.DENSENET


def _tiny_densenet_config(data_dir: str) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.builder.update(dict(image_size=32, num_train=32, num_validation=16,
                                     num_test=16))
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", num_outputs=1, head="sigmoid", input_shape=(32, 32, 3),
      bn_epsilon=porting.BN_EPSILON["torchvision"], **TINY_DENSENET))
  config.batch_size = 16
  config.num_epochs = 1
  config.train.trainable = "head"
  return config


@pytest.fixture(scope="module")
def ported_dir(tmp_path_factory):
  """A torchvision-layout file of a tiny 1000-way DenseNet, ported and saved as init_from does."""
  directory = tmp_path_factory.mktemp("ported")
  imagenet_model = densenet.densenet(num_outputs=1000, head="softmax", input_shape=(32, 32, 3),
                                     bn_epsilon=1e-5, **TINY_DENSENET)
  variables = jax.jit(imagenet_model.init)(jax.random.key(1))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda x: rng.uniform(0.5, 1.5, np.shape(x)).astype(np.float32), variables)
  path = str(directory / "tiny.npz")
  np.savez(path, **porting.export_torchvision_state_dict(imagenet_model, variables))
  ported, report = porting.port_torchvision(imagenet_model, variables, path)
  checkpoint.save_variables(str(directory / "port"), ported,
                            {"kept_from_init": report.kept_from_init})
  return str(directory / "port"), ported


def test_head_training_from_ported_backbone_keeps_it_exactly(tmp_path, ported_dir):
  port_dir, ported = ported_dir
  config = _tiny_densenet_config(str(tmp_path / "tfds"))
  config.init_from = port_dir
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir)
  assert result["init_from"]["kept_from_init"] == 2  # the new one-logit head: kernel and bias
  selected, _ = checkpoint.load_variables(os.path.join(workdir, runs.SELECTED_MODEL_DIR))
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(ported[collection]["backbone"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(selected[collection]["backbone"])[0])
    for path, value in flat:  # frozen backbone: bit-identical to the ported weights
      np.testing.assert_array_equal(got[path], value, err_msg=f"{collection} {path}")
  assert selected["params"]["classifier"]["predictions"]["kernel"].shape == (8, 1)

  # A finished run is itself a valid init_from (progressive transfer chains runs this way).
  config.init_from = workdir
  second = loop.train_and_evaluate(config, str(tmp_path / "second"))
  assert second["init_from"]["kept_from_init"] == 0
  source = second["init_from"]["source_run"]  # read from the first run's config.json
  assert source["directory"] == workdir and source["dataset"] == "radiograph_phantoms"
  assert source["model"]["growth_rate"] == TINY_DENSENET["growth_rate"]
  assert source["test_accuracy"] == result["test"]["accuracy"]
  with open(os.path.join(tmp_path, "second", "metrics.json")) as file:
    assert json.load(file)["init_from"]["source_run"]["model"]["name"] == "densenet"

  # A source run of another architecture is refused, naming both models.
  config.model.growth_rate = 8
  with pytest.raises(ValueError, match=r"config.model cannot start from config.init_from=.*run"
                                       r".*growth_rate: 4 vs 8"):
    loop.train_and_evaluate(config, str(tmp_path / "third"))


def test_init_from_errors_name_the_path(tmp_path, ported_dir):
  config = _tiny_densenet_config(str(tmp_path / "tfds"))
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  config = demo.get_config()  # a custom CNN cannot take DenseNet arrays
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.builder.update(dict(image_size=48, num_train=32, num_validation=16,
                                     num_test=16))
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                           dense_widths=(16, 16)))
  config.init_from = ported_dir[0]
  with pytest.raises(ValueError, match="wrong architecture"):
    loop.train_and_evaluate(config, str(tmp_path / "run2"))


@pytest.mark.slow
def test_port_weights_cli_writes_a_checkpoint_with_metadata(tmp_path):
  """experiments/port_weights on a full-size DenseNet-121 torchvision-layout file."""
  model = densenet.densenet(depth=121, num_outputs=1000, head="softmax",
                            input_shape=(224, 224, 3), bn_epsilon=1e-5)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  values = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
  path = str(tmp_path / "densenet121.safetensors")
  from safetensors.numpy import save_file
  save_file(porting.export_torchvision_state_dict(model, values), path)
  workdir = tmp_path / "ported"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.port_weights", "--source=torchvision",
       "--arch=densenet121", f"--weights={path}", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  metadata = json.loads((workdir / "metadata.json").read_text())
  assert metadata["model_config"]["bn_epsilon"] == 1e-5
  assert metadata["kept_from_init"] == [] and len(metadata["loaded"]) == 242
  variables, _ = checkpoint.load_variables(str(workdir))
  np.testing.assert_array_equal(variables["params"]["backbone"]["conv1_conv"]["kernel"], 0.5)
  wrong = subprocess.run(
      [sys.executable, "-m", "experiments.port_weights", "--source=torchvision",
       "--arch=densenet169", f"--weights={path}", f"--workdir={tmp_path / 'wrong'}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert wrong.returncode != 0 and "missing" in wrong.stderr
