"""End-to-end training on tiny phantoms: checkpoints, resumption, selection and bad input."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

import tiny
from resumption import restore_latest
from medxai_jax.data import pipeline
from medxai_jax import runs
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import loop
from medxai_jax.train import schema
from medxai_jax.train import steps


def tiny_config(data_dir: str, **overrides):
  # eval_batch_size 24 is not a divisor of 32: exercises the padded last batch.
  config = tiny.demo_config(data_dir, image_size=48, num_train=96, num_validation=32,
                            num_test=32, batch_size=16, eval_batch_size=24, num_epochs=3,
                            log_every_steps=2)
  # On-device augmentation keyed by the state's rng and step: resumption must stay exact.
  config.augment.update(dict(flip=True, rotation_degrees=10.0, shift_pixels=2.0))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("run") / "full")
  config = tiny_config(data_dir)
  return config, workdir, loop.train_and_evaluate(config, workdir)


def _read_history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_run_writes_metrics_history_and_selects_the_best_validation_epoch(finished_run):
  config, workdir, result = finished_run
  history = _read_history(workdir)
  assert [r["epoch"] for r in history] == [1, 2, 3]
  best = max(history, key=lambda r: r["val_accuracy"])  # first maximum wins ties
  assert result["selected_epoch"] == best["epoch"]
  assert [r["selected"] for r in history].count(True) >= 1
  with open(os.path.join(workdir, "metrics.json")) as f:
    written = json.load(f)
  assert written["test"]["num_examples"] == 32
  assert 0.0 <= written["test"]["accuracy"] <= 1.0
  assert history[-1]["step"] == 3 * (96 // 16)


def test_checkpoint_round_trip_gives_identical_parameters(finished_run, tmp_path):
  config, workdir, _ = finished_run
  state, metadata = restore_latest(config, workdir, step=3)
  store = checkpoint.CheckpointStore(str(tmp_path / "copy"))
  store.save_latest(7, state, metadata)
  again, again_metadata = store.restore_latest(state)
  store.close()
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert again_metadata == json.loads(json.dumps(metadata))


def test_resume_after_a_kill_continues_identically(finished_run, tmp_path):
  config, workdir, result = finished_run
  # Simulate a run killed during epoch 3: its epoch-3 checkpoint never got written.
  killed = str(tmp_path / "killed")
  shutil.copytree(workdir, killed)
  shutil.rmtree(os.path.join(killed, "checkpoints", "latest", "3"))
  resumed = loop.train_and_evaluate(copy.deepcopy(config), killed)
  original_state, _ = restore_latest(config, workdir, step=3)
  resumed_state, _ = restore_latest(config, killed, step=3)
  for a, b in zip(jax.tree_util.tree_leaves(original_state),
                  jax.tree_util.tree_leaves(resumed_state)):
    np.testing.assert_array_equal(a, b)
  timing = ("train_seconds", "images_per_second")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
  assert strip(_read_history(killed)) == strip(_read_history(workdir))
  assert resumed["test"] == result["test"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, num_epochs=2)
  workdir = str(tmp_path / "nan")
  loop.train_and_evaluate(config, workdir)  # two good epochs
  original = steps.classification_loss
  monkeypatch.setattr(steps, "classification_loss",
                      lambda *a, **k: original(*a, **k) * np.nan)
  config.num_epochs = 3
  with pytest.raises(loop.NonFiniteLossError, match=r"epoch 3.*last good checkpoint \(epoch 2\)"):
    loop.train_and_evaluate(config, workdir)
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"))
  assert store.latest_step() == 2
  store.close()


def test_bad_workdir_and_unknown_config_fields(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loop.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "missing" / "run"))
  config = tiny_config(data_dir)
  with config.unlocked():
    config.learnig_rate = 0.1
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['learnig_rate'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  config = tiny_config(data_dir)
  config.selection.metric = "acuracy"
  with pytest.raises(ValueError, match="acuracy"):
    schema.check_config(config)


def test_balanced_class_weights():
  np.testing.assert_allclose(components.resolve_class_weights("balanced", np.array([30, 10])),
                             [40 / 60, 40 / 20])
  np.testing.assert_allclose(components.resolve_class_weights("1,3", np.array([1, 1])), [1, 3])
  assert components.resolve_class_weights("", np.array([1, 1])) is None
  with pytest.raises(ValueError, match="2 classes"):
    components.resolve_class_weights("1,2,3", np.array([1, 1]))


def test_bfloat16_compute_with_gradient_accumulation_end_to_end(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=1)
  config.train.update(dict(compute_dtype="bfloat16", accumulation_steps=2))
  workdir = str(tmp_path / "bf16")
  result = loop.train_and_evaluate(config, workdir)
  assert result["compute_dtype"] == "bfloat16" and result["accumulation_steps"] == 2
  assert (result["num_devices"], result["num_processes"]) == (1, 1)
  assert result["global_batch_size"] == 16 and result["per_device_batch_size"] == 16
  assert _read_history(workdir)[-1]["step"] == 96 // 16  # one optimiser step per global batch
  assert np.isfinite(result["test"]["loss"]) and result["test"]["num_examples"] == 32
  selected, _ = checkpoint.load_variables(os.path.join(workdir, runs.SELECTED_MODEL_DIR))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(selected)} == {np.dtype(np.float32)}
  model = runs.restore_selected_model(config, workdir).model
  assert model.module.dtype == np.float32  # explanations run in float32
  assert components.build_components(config)[0].module.dtype == jax.numpy.bfloat16


def test_filtered_shuffled_label_run_selects_by_training_accuracy(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=2)
  config.augment.update(dict(flip=False, rotation_degrees=0.0, shift_pixels=0.0))
  config.dataset.update(dict(filter="body_part=forearm,hand", shuffle_labels=True,
                             shuffle_labels_seed=1))
  config.selection.metric = "train_accuracy"
  splits = [config.dataset.train_split, config.dataset.validation_split,
            config.dataset.test_split]
  sources = pipeline.load_sources(config.dataset, splits)
  plain = copy.deepcopy(config)
  plain.dataset.update(dict(filter="", shuffle_labels=False))
  unfiltered = pipeline.load_sources(plain.dataset, splits)
  for split in splits:  # every split keeps exactly its forearm (0) and hand (3) records
    parts = pipeline.read_feature(unfiltered[split], "body_part")
    assert len(sources[split]) == int(np.isin(parts, (0, 3)).sum()) > 0
    assert set(pipeline.read_feature(sources[split], "body_part")) <= {0, 3}
  train = sources[config.dataset.train_split]
  true_labels = pipeline.read_feature(train.original_source, "label")
  shuffled = pipeline.read_feature(train, "label")
  assert sorted(shuffled) == sorted(true_labels) and (shuffled != true_labels).any()
  validation_labels = pipeline.read_feature(sources[config.dataset.validation_split], "label")
  np.testing.assert_array_equal(  # only the training labels are shuffled
      validation_labels,
      pipeline.read_feature(unfiltered[config.dataset.validation_split], "label")[
          np.isin(pipeline.read_feature(unfiltered[config.dataset.validation_split],
                                        "body_part"), (0, 3))])

  workdir = str(tmp_path / "shuffled")
  result = loop.train_and_evaluate(config, workdir)
  history = _read_history(workdir)
  best = max(history, key=lambda row: row["train_accuracy"])
  assert result["selected_epoch"] == best["epoch"]
  with pytest.raises(ValueError, match="only a selection metric"):
    schema.check_config(tiny_config(data_dir, early_stopping=dict(
        patience=1, metric="train_accuracy", mode="")))


def _strict_loads(text: str):
  """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  return json.loads(text, parse_constant=refuse)


def test_report_files_follow_the_contract(finished_run):
  config, workdir, result = finished_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    written = _strict_loads(f.read())
  assert written["class_names"] == ["normal", "abnormal"]
  test_source = pipeline.load_sources(config.dataset, ["test"])["test"]
  labels = pipeline.read_feature(test_source, "label")
  predictions = np.load(os.path.join(workdir, runs.PREDICTIONS_FILE))
  np.testing.assert_array_equal(predictions["labels"], labels)
  assert predictions["labels"].dtype == np.int64
  assert predictions["logits"].dtype == np.float32 and predictions["logits"].shape == (32, 1)
  probabilities = predictions["probabilities"]
  assert probabilities.dtype == np.float32 and probabilities.shape == (32, 2)
  p = 1.0 / (1.0 + np.exp(-predictions["logits"][:, 0].astype(np.float64)))
  np.testing.assert_allclose(probabilities, np.stack([1 - p, p], axis=1), atol=1e-6)
  naive = np.zeros((2, 2), int)
  for label, abnormal in zip(labels, p >= 0.5):
    naive[label, int(abnormal)] += 1
  assert written["test"]["confusion_matrix"] == naive.tolist()
  from medxai_jax.data import phantoms
  np.testing.assert_array_equal(
      predictions["body_part"],
      [phantoms.BODY_PARTS[k] for k in pipeline.read_feature(test_source, "body_part")])
  assert set(written["test_by_body_part"]) == set(predictions["body_part"].tolist())
  assert "test_by_study" not in written  # the phantoms have no studies
  with open(os.path.join(workdir, runs.SPLITS_FILE)) as f:
    splits = _strict_loads(f.read())
  assert splits["class_names"] == ["normal", "abnormal"]
  sources = pipeline.load_sources(config.dataset, ["train", "validation", "test"])
  for split, source in sources.items():
    assert splits["counts"][split] == np.bincount(pipeline.read_feature(source, "label"),
                                                  minlength=2).tolist()


def test_one_class_test_split_reports_null_auc_with_a_warning(data_dir, tmp_path, caplog):
  config = tiny_config(data_dir, num_epochs=1)
  config.dataset.filter = "label=normal"  # every split holds only class 0
  workdir = str(tmp_path / "one_class")
  with caplog.at_level("WARNING"):
    result = loop.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    text = f.read()
  with pytest.raises(ValueError):
    _strict_loads('{"roc_auc": NaN}')  # the parser used below does refuse NaN
  written = _strict_loads(text)
  test = written["test"]
  assert test["roc_auc"] is None and test["mcc"] is None
  assert (test["cohen_kappa"] is None) == (test["confusion_matrix"][0][1] == 0)
  assert result["test"]["roc_auc"] is None
  assert "roc_auc is undefined on the test split" in caplog.text
  assert "labels hold only class 0" in caplog.text
  for line in open(os.path.join(workdir, "history.jsonl")):
    assert _strict_loads(line)["val_roc_auc"] is None
  assert all(part["image"]["roc_auc"] is None for part in written["test_by_body_part"].values())


def test_restoring_a_missing_run_is_a_clear_error_that_creates_nothing(data_dir, tmp_path):
  config = tiny_config(data_dir)
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match="no_such_run.*does not exist"):
    runs.restore_selected_model(config, str(missing))
  assert not missing.exists()
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    runs.restore_selected_model(config, str(empty))
  assert list(empty.iterdir()) == []


def test_a_finished_run_without_its_selected_model_writes_it_again_without_training(
    finished_run, tmp_path):
  config, workdir, result = finished_run
  old_run = str(tmp_path / "old_run")  # as a run finished before selected_model/ existed
  shutil.copytree(workdir, old_run)
  shutil.rmtree(os.path.join(old_run, runs.SELECTED_MODEL_DIR))
  with pytest.raises(FileNotFoundError, match="has not finished.*Run the same"):
    runs.check_trained(old_run)
  history = _read_history(old_run)
  again = loop.train_and_evaluate(config, old_run)
  assert _read_history(old_run) == history  # no epoch was trained again
  assert again["selected_epoch"] == result["selected_epoch"]
  assert again["test"]["confusion_matrix"] == result["test"]["confusion_matrix"]
  restored = runs.restore_selected_model(config, old_run).variables
  original, _ = checkpoint.load_variables(os.path.join(workdir, runs.SELECTED_MODEL_DIR))
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(original)):
    np.testing.assert_array_equal(np.asarray(got), want)
