"""experiments/progressive_transfer: the four arms of 001's Table 2 on tiny phantoms."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import subprocess_env
import tiny
from configs import progressive_transfer as pt_config
from medxai_jax import runs
from medxai_jax.train import transfer as pt
from medxai_jax.data import phantoms
from medxai_jax.data.builders import mura
from medxai_jax.models import registry
from medxai_jax.train import checkpoint
from medxai_jax.viz import transfer_figures

REPO = subprocess_env.REPO
# The target stage trains only its head, so its backbone must come out bit-identical to the
# weights it started from; the source stage trains everything (no head-only warm-up).
TINY_CONFIG = '''
from configs import progressive_transfer


def get_config():
  config = progressive_transfer.get_config()
  config.dataset.builder.update(dict(image_size=32, num_train=48, num_validation=16,
                                     num_test=32))
  config.model.update(dict(input_shape=(32, 32, 1), block_sizes=(1, 1, 1, 1), growth_rate=4,
                           stem_width=8, head_hidden_widths=(8, 8, 8, 8)))
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 1
  config.train.trainable = "head"
  config.transfer.source.dataset.builder.num_train = 48
  config.transfer.source.num_epochs = 1
  config.transfer.source.train = dict(trainable="all", head_only_epochs=0)
  return config
'''
ARM_DIRS = ("wristnet", "radinetrand_wrist", "imagenet_wrist", "radinet_wrist")
TITLES = ("WristNet", "RadiNetRand_wrist", "ImageNet_wrist", "RadiNet_wrist")
HEAD_LEAVES = 10  # the RadiNet head: four hidden dense layers + the output layer, kernel + bias


def _tiny_model_fields() -> dict:
  return dict(input_shape=(32, 32, 1), **tiny.DENSENET)


def _run(config_path, workdir, data_dir, *args):
  # The target stages of all arms compile the same steps: a persistent cache shares them.
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(data_dir / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run(
      [sys.executable, "-m", "experiments.progressive_transfer", f"--config={config_path}",
       f"--workdir={workdir}", *args], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=900)


def _save_imagenet_stand_in(directory, stem_width: int = 8) -> tuple[str, dict]:
  """A tiny 1000-way DenseNet with random non-default values, saved as port_weights does."""
  model_config = dict(name="densenet", num_outputs=1000, head="softmax",
                      **{**_tiny_model_fields(), "stem_width": stem_width})
  shapes = jax.eval_shape(registry.build_model(model_config).init, jax.random.key(7))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)
  checkpoint.save_variables(str(directory), variables,
                            {"model_config": model_config, "kept_from_init": [],
                             "preprocessing": "stand-in for the test"})
  return str(directory), variables


def _variables(stage_dir) -> dict:
  return checkpoint.load_variables(os.path.join(stage_dir, runs.SELECTED_MODEL_DIR))[0]


def _assert_backbones_equal(a: dict, b: dict, what: str) -> None:
  for collection in ("params", "batch_stats"):
    left = jax.tree_util.tree_flatten_with_path(a[collection]["backbone"])[0]
    right = dict(jax.tree_util.tree_flatten_with_path(b[collection]["backbone"])[0])
    assert len(left) == len(right) > 0
    for path, value in left:
      np.testing.assert_array_equal(right[path], value, err_msg=f"{what} {collection} {path}")


def _num_leaves(variables: dict) -> int:
  return len(jax.tree_util.tree_leaves({k: variables[k] for k in ("params", "batch_stats")}))


def _stage_files(workdir) -> dict:
  """(mtime, content) of every stage's history, metrics and latest checkpoint listing."""
  files = {}
  for arm in ARM_DIRS:
    for role in ("source", "target"):
      stage = workdir / arm / role
      for name in ("history.jsonl", "metrics.json", "config.json"):
        path = stage / name
        if path.exists():
          files[str(path)] = (path.stat().st_mtime_ns, path.read_text())
      if (stage / "checkpoints").exists():
        files[str(stage / "checkpoints")] = sorted(
            os.path.relpath(os.path.join(root, name), stage)
            for root, _, names in os.walk(stage / "checkpoints") for name in names)
  return files


def _rows(workdir) -> list[dict]:
  with open(workdir / "comparison.csv") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """All four arms (six stages) through the CLI, with a stand-in ImageNet checkpoint."""
  root = tmp_path_factory.mktemp("progressive")
  config_path = root / "tiny_progressive.py"
  config_path.write_text(TINY_CONFIG)
  imagenet_dir, imagenet = _save_imagenet_stand_in(root / "imagenet")
  workdir = root / "run"
  data_dir = root / "tfds"
  result = _run(config_path, workdir, data_dir, f"--config.transfer.imagenet_init={imagenet_dir}")
  return dict(config=config_path, workdir=workdir, data_dir=data_dir, result=result,
              imagenet_dir=imagenet_dir, imagenet=imagenet)


def test_all_four_arms_run_and_write_table_figures_and_report(full_run):
  result, workdir = full_run["result"], full_run["workdir"]
  assert result.returncode == 0, result.stderr[-4000:]
  rows = _rows(workdir)
  assert [row["arm"] for row in rows] == list(TITLES)
  for row in rows:
    assert row["status"] == "done", row
    for metric in pt.METRICS:
      assert math.isfinite(float(row[metric])), (row["arm"], metric)
    assert 0.0 <= float(row["accuracy"]) <= 1.0 and int(row["selected_epoch"]) == 1
  # Only the arms with a source stage report its body-part accuracy.
  assert [bool(row["source_test_accuracy"]) for row in rows] == [False, True, False, True]
  markdown = (workdir / "comparison.md").read_text()
  assert all(f"| {title} |" in markdown for title in TITLES)
  for name in ("training_loss.png", "comparison.png", "report.html"):
    assert (workdir / name).stat().st_size > 0, name
  html = (workdir / "report.html").read_text()
  assert 'src="training_loss.png"' in html and all(title in html for title in TITLES)
  # The metrics in the table are the target stages' test metrics.
  target = json.loads((workdir / "radinet_wrist" / "target" / "metrics.json").read_text())
  assert float(rows[3]["roc_auc"]) == pytest.approx(target["test"]["roc_auc"], abs=1e-4)
  assert target["test"]["num_examples"] == 32


def test_chains_transfer_the_backbone_and_reinitialise_a_resized_head(full_run):
  assert full_run["result"].returncode == 0, full_run["result"].stderr[-4000:]
  workdir = full_run["workdir"]
  source = _variables(workdir / "radinetrand_wrist" / "source")
  target = _variables(workdir / "radinetrand_wrist" / "target")
  wristnet = _variables(workdir / "wristnet" / "target")
  # Head-only target training: the backbone is exactly the source's selected backbone ...
  _assert_backbones_equal(source, target, "RadiNetRand -> RadiNetRand_wrist")
  # ... which the source stage did train (WristNet's frozen backbone is the shared random init).
  assert not np.array_equal(source["params"]["backbone"]["conv1_conv"]["kernel"],
                            wristnet["params"]["backbone"]["conv1_conv"]["kernel"])
  # 5 body parts -> 1 abnormality logit: the output layer cannot be loaded and starts fresh;
  # everything else, the hidden RadiNet head layers included, comes from the source.
  assert source["params"]["classifier"]["predictions"]["kernel"].shape == (8, 5)
  assert target["params"]["classifier"]["predictions"]["kernel"].shape == (8, 1)
  report = json.loads((workdir / "radinetrand_wrist" / "target" / "metrics.json").read_text())
  assert report["init_from"]["init_from"].endswith(os.path.join("radinetrand_wrist", "source",
                                                                "selected_model"))
  assert report["init_from"]["kept_from_init"] == 2
  assert report["init_from"]["loaded"] == _num_leaves(target) - 2
  assert "init_from" not in json.loads((workdir / "wristnet" / "target" / "metrics.json")
                                       .read_text())

  # ImageNet_wrist: the (stand-in) ImageNet backbone, a whole new RadiNet head.
  imagenet = jax.tree_util.tree_map(np.asarray, full_run["imagenet"])
  _assert_backbones_equal(imagenet, _variables(workdir / "imagenet_wrist" / "target"),
                          "ImageNet -> ImageNet_wrist")
  report = json.loads((workdir / "imagenet_wrist" / "target" / "metrics.json").read_text())
  assert report["init_from"]["kept_from_init"] == HEAD_LEAVES
  # RadiNet_wrist: ImageNet -> RadiNet (trained, so it moved away from ImageNet) -> target.
  radinet = _variables(workdir / "radinet_wrist" / "source")
  report = json.loads((workdir / "radinet_wrist" / "source" / "metrics.json").read_text())
  assert report["init_from"]["kept_from_init"] == HEAD_LEAVES
  assert not np.array_equal(radinet["params"]["backbone"]["conv1_conv"]["kernel"],
                            imagenet["params"]["backbone"]["conv1_conv"]["kernel"])
  _assert_backbones_equal(radinet, _variables(workdir / "radinet_wrist" / "target"),
                          "RadiNet -> RadiNet_wrist")
  report = json.loads((workdir / "radinet_wrist" / "target" / "metrics.json").read_text())
  assert report["init_from"]["kept_from_init"] == 2


def test_rerun_reuses_finished_stages_and_skips_imagenet_arms_without_weights(full_run):
  assert full_run["result"].returncode == 0, full_run["result"].stderr[-4000:]
  workdir = full_run["workdir"]
  before = _stage_files(workdir)
  assert len([path for path in before if path.endswith("metrics.json")]) == 6
  rows_before = _rows(workdir)

  again = _run(full_run["config"], workdir, full_run["data_dir"],
               f"--config.transfer.imagenet_init={full_run['imagenet_dir']}")
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stderr.count("reusing it") == 6 and "Training " not in again.stderr
  assert _stage_files(workdir) == before
  assert _rows(workdir) == rows_before

  # Without ImageNet weights the ImageNet arms are marked skipped, not faked (their old
  # results stay on disk but are not reported); the other two are reused.
  skipped = _run(full_run["config"], workdir, full_run["data_dir"])
  assert skipped.returncode == 0, skipped.stderr[-4000:]
  assert _stage_files(workdir) == before
  rows = _rows(workdir)
  assert [row["status"] for row in rows] == ["done", "done", "skipped", "skipped"]
  for row in rows[2:]:
    assert "imagenet_init" in row["note"]
    assert all(row[metric] == "" for metric in pt.METRICS)
  assert rows[:2] == rows_before[:2]
  markdown = (workdir / "comparison.md").read_text()
  assert markdown.count("skipped: no ImageNet weights given") == 2
  assert "Not run: ImageNet_wrist" in (workdir / "report.html").read_text()

  # A finished stage is never silently reused under a different setting.
  changed = _run(full_run["config"], workdir, full_run["data_dir"],
                 "--config.learning_rate=0.01")
  assert changed.returncode != 0
  assert "different config" in changed.stderr and "learning_rate" in changed.stderr
  assert _stage_files(workdir) == before


def _tiny_experiment_config() -> ml_collections.ConfigDict:
  config = pt_config.get_config()
  config.model.update(dict(**_tiny_model_fields(), head_hidden_widths=(8, 8, 8, 8)))
  return config


def test_plan_sets_each_stages_start_and_warm_up(tmp_path):
  config = _tiny_experiment_config()
  target, transfer = pt.split_config(config)
  source = pt.apply_overrides(target, transfer.source.to_dict())
  assert (source.dataset.label_key, source.model.num_outputs) == (
      "body_part", len(phantoms.BODY_PARTS))
  assert source.dataset.builder.seed != target.dataset.builder.seed  # disjoint images
  assert (target.dataset.label_key, target.model.num_outputs) == ("label", 1)
  assert target.train.head_only_epochs == 1
  plans = {arm.name: pt.plan_arm(arm, target, source, "/weights/imagenet", str(tmp_path))
           for arm in pt.ARMS}
  starts = {name: [(s.role, s.config.init_from, s.config.train.head_only_epochs) for s in stages]
            for name, stages in plans.items()}
  source_dir = lambda arm: str(tmp_path / arm / "source")  # noqa: E731
  assert starts == {
      "wristnet": [("target", "", 0)],
      "radinetrand_wrist": [("source", "", 0), ("target", source_dir("radinetrand_wrist"), 1)],
      "imagenet_wrist": [("target", "/weights/imagenet", 1)],
      "radinet_wrist": [("source", "/weights/imagenet", 1),
                        ("target", source_dir("radinet_wrist"), 1)],
  }
  assert plans["radinet_wrist"][1].workdir == str(tmp_path / "radinet_wrist" / "target")
  assert [arm.name for arm in pt.selected_arms("radinet_wrist, wristnet")] == [
      "wristnet", "radinet_wrist"]


def test_configuration_errors_name_the_field(tmp_path):
  config = _tiny_experiment_config()
  target, _ = pt.split_config(config)
  with pytest.raises(ValueError, match=r"config.transfer.source.modle is not a field"):
    pt.apply_overrides(target, {"modle": {"num_outputs": 5}})
  with pytest.raises(ValueError, match=r"config.transfer.source.dataset.labelkey"):
    pt.apply_overrides(target, {"dataset": {"labelkey": "body_part"}})
  with pytest.raises(ValueError, match="cannot be overridden"):
    pt.apply_overrides(target, {"init_from": "/x"})
  with pytest.raises(ValueError, match=r"config.transfer.arms='wristnet,radnet'.*radnet"):
    pt.selected_arms("wristnet,radnet")
  bad = _tiny_experiment_config()
  bad.init_from = "/some/port"
  with pytest.raises(ValueError, match="config.transfer.imagenet_init"):
    pt.split_config(bad)
  with pytest.raises(ValueError, match=r"config.transfer has unknown field\(s\) \['extra'\]"):
    with bad.unlocked():
      bad.init_from = ""
      bad.transfer.extra = 1
    pt.split_config(bad)
  with pytest.raises(ValueError, match=r"config.transfer is missing"):
    pt.split_config(target)  # a plain training config
  # ImageNet weights of another architecture are refused before anything trains.
  directory, _ = _save_imagenet_stand_in(tmp_path / "wide", stem_width=16)
  with pytest.raises(ValueError, match=r"imagenet_init=.*wide.*does not hold the backbone"):
    pt.check_imagenet_weights(target.model, directory)
  matching, _ = _save_imagenet_stand_in(tmp_path / "same")
  assert pt.check_imagenet_weights(target.model, matching)["preprocessing"] == (
      "stand-in for the test")


def test_the_configs_build_and_the_mura_preset_is_001s_recipe():
  for preset in ("phantoms", "mura"):
    target, transfer = pt.split_config(pt_config.get_config(preset))
    source = pt.apply_overrides(target, transfer.source.to_dict())
    for stage in (source, target):
      model = registry.build_model(stage.model)
      shapes = jax.eval_shape(model.init, jax.random.key(0))
      assert shapes["params"]["classifier"]["predictions"]["kernel"].shape[-1] == (
          stage.model.num_outputs)
  target, transfer = pt.split_config(pt_config.get_config("mura"))
  source = pt.apply_overrides(target, transfer.source.to_dict())
  assert (source.dataset.name, source.dataset.builder_config, source.dataset.label_key) == (
      "mura", "all", "body_part")
  assert source.model.num_outputs == len(mura.BODY_PARTS) == 7
  assert (target.dataset.builder_config, target.model.depth, target.model.head) == (
      "wrist", 169, "radinet")
  assert target.learning_rate == 1e-4 and target.train.head_only_epochs == 25
  assert (target.schedule.name, target.schedule.factor, target.schedule.patience,
          target.schedule.min_learning_rate) == ("plateau", 0.1, 3, 1e-7)
  assert target.early_stopping.patience == 10 and target.class_weights == "balanced"
  with pytest.raises(ValueError, match="progressive_transfer.py:imagenet"):
    pt_config.get_config("imagenet")


def test_loss_curves_refuse_incomplete_histories(tmp_path):
  with pytest.raises(ValueError, match="'WristNet' lacks 'val_loss'"):
    transfer_figures.plot_loss_curves({"WristNet": [{"epoch": 1, "train_loss": 0.7}]},
                                      str(tmp_path / "loss.png"))
  path = transfer_figures.plot_loss_curves(
      {"A": [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6},
             {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55}]}, str(tmp_path / "loss.png"))
  assert os.path.getsize(path) > 0
