"""Run loading (medxai_jax/runs.py): an old, sparse config.json resolves to base_config's
defaults, and a run's selected model is the one artefact that inference and init_from read."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import demo
from medxai_jax import runs
from medxai_jax.observe import profiling
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import schema

# The fallbacks train/loop.py wrote out before base_config became their one source (the values
# an old run without these fields was trained with).
OLD_TRAIN_FALLBACK = dict(trainable="all", num_trainable_layers=0, head_only_epochs=0,
                          compute_dtype="float32", accumulation_steps=1)
OLD_SUMMARIES_FALLBACK = {"enabled": True, "num_images": 4}


def tiny_config():
  config = demo.get_config()
  config.model.update(dict(input_shape=(40, 40, 1), conv_widths=(4, 4, 4, 4, 4),
                           dense_widths=(8, 8)))
  return config


def _write_config_json(directory, content) -> str:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, runs.CONFIG_FILE), "w") as file:
    json.dump(content, file)
  return str(directory)


def test_a_sparse_old_config_json_resolves_to_the_old_fallbacks(tmp_path):
  full = tiny_config()
  content = json.loads(full.to_json_best_effort())
  # A run written before these fields existed.
  for section in ("augment", "train", "summaries", "profile_steps", "init_from"):
    del content[section]
  del content["checkpoint"]["every_steps"]
  del content["schedule"]["mode"], content["selection"]["mode"]
  del content["preprocess"]["bit_depth"]
  builder = content["dataset"].pop("builder")  # the phantoms' settings were their own section
  content["dataset"]["phantoms"] = {name: value for name, value in builder.items()
                                    if value is not None}
  read = runs.read_run_config(_write_config_json(tmp_path / "old", content))

  assert schema.train_settings(read) == OLD_TRAIN_FALLBACK
  assert schema.summary_settings(read) == OLD_SUMMARIES_FALLBACK
  assert not read.augment.flip and read.augment.rotation_degrees == 0.0
  assert read.augment.shift_pixels == 0.0 and read.augment.zoom == 0.0  # no augmentation
  assert read.checkpoint.every_steps == 0 and read.init_from == ""
  assert profiling.parse_steps(read.profile_steps) is None and read.preprocess.bit_depth is None
  assert schema.monitor_mode(read.selection.metric, read.selection.mode) == "max"  # accuracy
  assert schema.monitor_mode(read.schedule.metric, read.schedule.mode) == "min"  # loss
  # What the file holds is kept (the demo's own sections included), the rest is the default:
  # the sparse file reads back as the full config it came from.
  assert read.learning_rate == 3e-3 and read.explain.num_scored == 16
  assert runs.config_differences(read, full) == []
  schema.check_config(read)


def test_defaults_fill_a_copy_and_typos_are_still_refused():
  config = tiny_config()
  with config.unlocked():
    del config["augment"]
    config.augmnet = {"flip": True}
  filled = schema.with_defaults(config)
  assert "augment" not in config and filled.augment.flip is False  # the input is unchanged
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['augmnet'\]"):
    schema.check_config(config)
  config = tiny_config()
  config.train.trainabel = "head"  # a typo of trainable
  with pytest.raises(ValueError, match=r"config.train has unknown field\(s\) \['trainabel'\]"):
    schema.check_config(config)
  config = tiny_config()
  config.eval_batch_size = 0  # once 'the training batch size'; now a refused value
  with pytest.raises(ValueError, match="config.eval_batch_size must be a positive integer"):
    schema.check_config(config)


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
  """A run directory as training leaves it: config.json and selected_model/ (random weights)."""
  config = tiny_config()
  config.train.compute_dtype = "bfloat16"  # inference still computes in float32
  run_dir = str(tmp_path_factory.mktemp("run"))
  with open(runs.config_path(run_dir), "w") as file:
    file.write(config.to_json_best_effort(indent=2))
  model = components.build_model(config, compute_dtype="float32")
  rng = np.random.default_rng(7)  # random arrays of the model's shapes (nothing compiled)
  variables = jax.tree_util.tree_map(
      lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype),
      jax.eval_shape(model.init, jax.random.key(0)))
  checkpoint.save_variables(os.path.join(run_dir, runs.SELECTED_MODEL_DIR), variables,
                            {"model_config": config.model.to_dict(), "selected_epoch": 3,
                             "kept_from_init": []})
  return config, run_dir, variables


def test_the_selected_model_is_restored_with_its_preprocessing(selected_run):
  config, run_dir, saved = selected_run
  run = runs.load_run(run_dir)
  selected = run.restore_selected_model()
  assert selected.epoch == 3 and selected.model.module.dtype == np.float32
  assert (jax.tree_util.tree_structure(selected.variables)
          == jax.tree_util.tree_structure(saved))
  for got, want in zip(jax.tree_util.tree_leaves(selected.variables),
                       jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), want)
  stored = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 1), dtype=np.uint8)
  np.testing.assert_allclose(  # demo: mean 0.25, std 0.25 on the [0, 1] scale
      np.asarray(selected.preprocess(stored)), (stored / 255.0 - 0.25) / 0.25, rtol=1e-5,
      atol=1e-6)
  # init_from reads the same artefact.
  assert runs.resolve_init_from(run_dir) == os.path.join(run_dir, runs.SELECTED_MODEL_DIR)


def test_a_selected_model_that_does_not_fit_the_config_names_the_arrays(selected_run):
  config, run_dir, _ = selected_run
  other = tiny_config()
  other.model.dense_widths = (8, 6)
  with pytest.raises(ValueError, match=r"selected_model/variables does not match the model of "
                     r"config.model.*\['params'\]\['fc7'\]\['kernel'\]: \(8, 8\), "
                     r"expected \(8, 6\)"):
    runs.restore_selected_model(other, run_dir)


def test_runs_without_a_selected_model_say_what_to_do(tmp_path):
  config = tiny_config()
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match="no_such_run.*does not exist"):
    runs.restore_selected_model(config, str(missing))
  assert not missing.exists()
  unfinished = tmp_path / "unfinished"
  (unfinished / "checkpoints" / "best" / "2").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"has no checkpoint in .*selected_model: its "
                     r"training has not finished.*Run the same"):
    runs.restore_selected_model(config, str(unfinished))
  assert sorted(os.listdir(unfinished)) == ["checkpoints"]  # nothing created
