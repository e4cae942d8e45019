"""Runs read back from their directories, fair image choice, and MURA's study-level metrics."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import tiny

from configs import demo
from configs import mura_densenet169
from medxai_jax import explain
from medxai_jax import runs
from medxai_jax.data import pipeline
from medxai_jax.data.builders import mura
from medxai_jax.observe import profiling
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import loop
from medxai_jax.train import schema


def _write_run_config(directory, config: ml_collections.ConfigDict) -> str:
  """config.json exactly as loop.train_and_evaluate writes it."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as file:
    file.write(config.to_json_best_effort(indent=2))
  return str(directory)


def _strict_loads(text: str):
  """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  return json.loads(text, parse_constant=refuse)


# --- reading a run's config back


def test_run_config_round_trips_tuples_nulls_and_values(tmp_path):
  config = mura_densenet169.get_config()  # tuples (input_shape, boundaries), a None placeholder
  config.model.update(dict(num_outputs=2, head="softmax"))
  config.learning_rate = 3e-5
  run_dir = _write_run_config(tmp_path / "run", config)
  read = runs.read_run_config(run_dir)
  assert read.model.input_shape == (320, 320, 3) and isinstance(read.model.input_shape, tuple)
  assert isinstance(read.schedule.boundaries, tuple) and read.schedule.divisors == (10.0, 50.0,
                                                                                    100.0)
  assert read.preprocess.bit_depth is None and "bit_depth" in read.preprocess
  assert (read.model.num_outputs, read.learning_rate) == (2, 3e-5)
  assert runs.config_differences(read, config) == []
  schema.check_config(read)  # a valid training config again
  config.preprocess.bit_depth = 12
  again = runs.read_run_config(_write_run_config(tmp_path / "run12", config))
  assert again.preprocess.bit_depth == 12 and isinstance(again.preprocess.bit_depth, int)


def test_run_config_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    runs.read_run_config(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "config.json")):
    runs.read_run_config(str(tmp_path / "empty"))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text('{"seed": 0, "model": {}}')
  with pytest.raises(ValueError, match=r"other/config.json is not a training config.*dataset"):
    runs.read_run_config(str(tmp_path / "other"))
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "config.json").write_text('{"seed": ')
  with pytest.raises(ValueError, match="broken/config.json is not valid JSON"):
    runs.read_run_config(str(tmp_path / "broken"))


def test_differences_are_listed_and_the_given_config_is_applied(tmp_path, capsys):
  trained = demo.get_config()
  trained.model.conv_widths = (4, 8, 8, 8, 8)
  trained.model.num_outputs = 2
  run_dir = _write_run_config(tmp_path / "run", trained)
  given = demo.get_config()
  given.dataset.data_dir = "/elsewhere"
  with given.unlocked():
    del given["annotation"]  # a field only the run's config has survives the merge
  differences = runs.config_differences(runs.read_run_config(run_dir), given)
  by_path = {d.path: d for d in differences}
  assert set(by_path) == {"dataset.data_dir", "model.conv_widths", "model.num_outputs",
                          "annotation.num_reports", "annotation.label_noise",
                          "annotation.unlabelled_fraction", "annotation.num_folds"}
  assert (by_path["model.num_outputs"].run_value, by_path["model.num_outputs"].given_value) == (
      2, 1)
  assert str(by_path["dataset.data_dir"]) == "dataset.data_dir: '' -> '/elsewhere'"
  merged = runs.resolve_config(run_dir, given)
  printed = capsys.readouterr().out
  assert "differs from" in printed and "model.num_outputs: 2 -> 1" in printed
  assert merged.model.num_outputs == 1 and merged.dataset.data_dir == "/elsewhere"
  assert merged.model.conv_widths == (32, 64, 64, 64, 64)
  assert merged.annotation.num_folds == trained.annotation.num_folds
  assert runs.resolve_config(run_dir).model.num_outputs == 2  # without --config: the run's
  (tmp_path / "by_hand").mkdir()  # checkpoints made elsewhere, no config.json: --config alone
  assert runs.resolve_config(str(tmp_path / "by_hand"), given) is given
  assert "using --config as given" in capsys.readouterr().out


def test_flatten_config_and_read_json_agree_with_a_naive_walk(tmp_path):
  config = ml_collections.ConfigDict(
      {"a": {"b": 1, "c": {"d": (2, 3)}}, "e": "x", "empty": {}})
  # Naive: every leaf path joined by dots; an empty section is one leaf.
  expected = {"a.b": 1, "a.c.d": (2, 3), "e": "x", "empty": {}}
  assert runs.flatten_config(config) == expected
  assert runs.flatten_config(config.to_dict()) == expected
  path = tmp_path / "m.json"
  path.write_text(json.dumps({"test": {"accuracy": 0.5}}))
  assert runs.read_json(str(path)) == {"test": {"accuracy": 0.5}}
  path.write_text("{not json")
  with pytest.raises(ValueError, match="m.json is not valid JSON"):
    runs.read_json(str(path))


def test_incompatible_init_from_architecture_names_both_models():
  source = dict(name="densenet", depth=169, num_outputs=7, head="softmax",
                input_shape=(320, 320, 3))
  target = dict(source, num_outputs=1, head="sigmoid", input_shape=(224, 224, 3))
  assert runs.check_compatible_models(source, target, source_name="a", target_name="b") == [
      "head", "input_shape", "num_outputs"]
  with pytest.raises(ValueError, match=r"b cannot start from a.*depth: 169 vs 121"):
    runs.check_compatible_models(source, dict(target, depth=121), source_name="a",
                                 target_name="b")
  with pytest.raises(ValueError, match=r"name: 'densenet' vs 'vgg'"):
    runs.check_compatible_models(source, dict(name="vgg", depth=16), source_name="a",
                                 target_name="b")


# --- which test images are explained


def test_label_minus_one_takes_a_class_balanced_seeded_sample():
  labels = np.repeat([0, 1, 2], [50, 30, 20])  # stored in class order, as builders write them
  for num_images in (1, 5, 10, 30):
    chosen = explain.choose_indices(labels, num_images, -1, seed=3)
    assert len(chosen) == num_images == len(set(chosen.tolist()))
    per_class = np.bincount(labels[chosen], minlength=3)
    assert per_class.max() - per_class.min() <= 1 if num_images >= 3 else per_class.max() == 1
    assert set(labels[chosen[:3]].tolist()) == set(range(min(3, num_images)))
    np.testing.assert_array_equal(chosen, explain.choose_indices(labels, num_images, -1, seed=3))
  assert not np.array_equal(explain.choose_indices(labels, 10, -1, seed=0),
                            explain.choose_indices(labels, 10, -1, seed=1))
  scarce = np.repeat([0, 1], [50, 2])  # a class with too few images leaves its turns to others
  chosen = explain.choose_indices(scarce, 10, -1)
  assert np.bincount(scarce[chosen]).tolist() == [8, 2]
  assert len(explain.choose_indices(scarce, 80, -1)) == 52  # all there are


def test_a_label_takes_a_seeded_sample_of_that_label_and_bad_input_is_refused():
  labels = np.repeat([0, 1], [40, 40])
  chosen = explain.choose_indices(labels, 6, 1, seed=2)
  assert (labels[chosen] == 1).all() and len(set(chosen.tolist())) == 6
  np.testing.assert_array_equal(explain.choose_indices(labels, 3, 0, indices=[5, 1, 70]),
                                [5, 1, 70])
  with pytest.raises(ValueError, match="No test image has label 2"):
    explain.choose_indices(labels, 3, 2)
  with pytest.raises(ValueError, match=r"\[0, 80\)"):
    explain.choose_indices(labels, 3, 0, indices=[80])
  with pytest.raises(ValueError, match="class index or -1"):
    explain.choose_indices(labels, 3, -2)


# --- MURA: study-level and per-body-part metrics

# (body part, patient, study, positive, images) of the fake official validation (= test) split.
_VALID_STUDIES = [
    ("WRIST", 21, 1, True, 3), ("WRIST", 22, 1, False, 2), ("WRIST", 23, 1, True, 1),
    ("WRIST", 24, 1, False, 1), ("FINGER", 25, 1, False, 2), ("FINGER", 26, 1, True, 2),
    ("FINGER", 26, 2, False, 1), ("ELBOW", 27, 1, False, 1),
]


def _make_fake_mura(root, num_train_patients: int = 6) -> None:
  """MURA-v1.1/ with both CSVs per official split and small random gray PNGs."""
  rng = np.random.default_rng(0)
  parts = ["WRIST", "FINGER", "ELBOW"] * num_train_patients
  studies = {"train": [(parts[p], p, 1, p % 2 == 0, 2) for p in range(1, num_train_patients + 1)],
             "valid": _VALID_STUDIES}
  for split, rows in studies.items():
    paths, labelled = [], []
    for part, patient, study, positive, count in rows:
      folder = (f"MURA-v1.1/{split}/XR_{part}/patient{patient:05d}/"
                f"study{study}_{'positive' if positive else 'negative'}/")
      labelled.append(f"{folder},{int(positive)}")
      for view in range(1, count + 1):
        path = root / folder / f"image{view}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 16), dtype=np.uint8)).save(path)
        paths.append(f"{folder}image{view}.png")
    (root / "MURA-v1.1" / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
    (root / "MURA-v1.1" / f"{split}_labeled_studies.csv").write_text("\n".join(labelled) + "\n")


def _naive_study_view(probabilities, study_ids, labels):
  """Per study (in any order): mean P(abnormal) over its images, and its label; a plain loop."""
  means, study_labels = {}, {}
  for p, study, label in zip(probabilities, study_ids, labels):
    means.setdefault(study, []).append(float(p))
    study_labels[study] = int(label)
  studies = sorted(means)
  return (np.asarray([sum(means[s]) / len(means[s]) for s in studies]),
          np.asarray([study_labels[s] for s in studies]))


def _naive_accuracy_and_kappa(scores, labels):
  """Accuracy and Cohen's kappa of 'abnormal when score >= 0.5', from the textbook formula."""
  predicted = [int(s >= 0.5) for s in scores]
  n = len(labels)
  observed = sum(int(p == t) for p, t in zip(predicted, labels)) / n
  expected = sum((sum(int(t == k) for t in labels) / n) * (sum(int(p == k) for p in predicted) / n)
                 for k in (0, 1))
  kappa = None if expected == 1 else (observed - expected) / (1 - expected)
  return observed, kappa


@pytest.fixture(scope="module")
def mura_run(tmp_path_factory):
  """A tiny CNN trained one epoch on a fake MURA folder (test split = official validation)."""
  root = tmp_path_factory.mktemp("mura")
  _make_fake_mura(root / "manual")
  config = demo.get_config()
  config.dataset.builder = pipeline.builder_options_config()  # not the demo's phantom options
  config.dataset.update(dict(name="mura", data_dir=str(root / "tfds"),
                             manual_dir=str(root / "manual"), builder_config="all",
                             validation_split="test"))
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 4, 4, 4, 4),
                           dense_widths=(8, 8)))
  config.update(dict(batch_size=2, eval_batch_size=4, num_epochs=1, log_every_steps=10))
  workdir = str(root / "run")
  return workdir, loop.train_and_evaluate(config, workdir)


def test_mura_study_and_body_part_metrics_equal_a_naive_computation(mura_run):
  workdir, result = mura_run
  with open(os.path.join(workdir, "metrics.json")) as file:
    written = _strict_loads(file.read())
  predictions = np.load(os.path.join(workdir, "predictions_test.npz"))
  p_abnormal = predictions["probabilities"][:, 1].astype(np.float64)
  labels, studies, parts = predictions["labels"], predictions["study_id"], predictions["body_part"]
  assert len(labels) == sum(row[-1] for row in _VALID_STUDIES) == 13
  assert sorted(set(parts.tolist())) == ["elbow", "finger", "wrist"]
  assert set(predictions["patient_id"].tolist()) == {f"patient{p:05d}" for p in range(21, 28)}
  assert all(path.startswith("MURA-v1.1/valid/") for path in predictions["path"].tolist())
  scores, study_labels = _naive_study_view(p_abnormal, studies, labels)
  assert len(scores) == len(_VALID_STUDIES)
  np.testing.assert_array_equal(np.sort(study_labels), sorted(int(r[3]) for r in _VALID_STUDIES))
  accuracy, kappa = _naive_accuracy_and_kappa(scores, study_labels)
  by_study = written["test_by_study"]
  assert by_study["num_examples"] == 8
  assert by_study["accuracy"] == pytest.approx(accuracy)
  assert (by_study["cohen_kappa"] is None) == (kappa is None)
  if kappa is not None:
    assert by_study["cohen_kappa"] == pytest.approx(kappa)
  for part in ("elbow", "finger", "wrist"):
    rows = parts == part
    part_scores, part_labels = _naive_study_view(p_abnormal[rows], studies[rows], labels[rows])
    entry = written["test_by_body_part"][part]
    assert entry["study"]["accuracy"] == pytest.approx(
        _naive_accuracy_and_kappa(part_scores, part_labels)[0])
    assert entry["image"]["accuracy"] == pytest.approx(
        _naive_accuracy_and_kappa(p_abnormal[rows], labels[rows])[0])
    assert entry["image"]["num_examples"] == int(rows.sum())
  # The elbow has one normal study: AUC, MCC cannot be computed there and are null.
  elbow = written["test_by_body_part"]["elbow"]
  assert elbow["image"]["roc_auc"] is None and elbow["study"]["roc_auc"] is None
  assert elbow["image"]["mcc"] is None
  assert result["test_by_study"] == written["test_by_study"]


def test_mura_metadata_in_predictions_matches_the_builder(mura_run):
  workdir, _ = mura_run
  config = runs.read_run_config(workdir)
  builder = loop.pipeline.load_builder(config.dataset)
  meta = mura.read_metadata(builder, "test", keys=("study_id", "label", "body_part"))
  predictions = np.load(os.path.join(workdir, "predictions_test.npz"))
  np.testing.assert_array_equal(predictions["study_id"], meta["study_id"])
  np.testing.assert_array_equal(predictions["labels"], meta["label"])
  np.testing.assert_array_equal(predictions["body_part"],
                                [mura.BODY_PARTS[int(k)] for k in meta["body_part"]])
  with open(os.path.join(workdir, "splits.json")) as file:
    splits = _strict_loads(file.read())
  assert splits["class_names"] == list(mura.LABEL_NAMES)
  assert splits["counts"]["test"] == np.bincount(meta["label"], minlength=2).tolist()
  train_labels = mura.read_metadata(builder, "train", keys=("label",))["label"]
  assert splits["counts"]["train"] == np.bincount(train_labels, minlength=2).tolist()
  assert sum(splits["counts"]["train"]) + len(
      mura.read_metadata(builder, "validation", keys=("label",))["label"]) == 12  # 6 x 2 images
  assert splits["counts"]["validation"] == splits["counts"]["test"]  # validation_split='test'


def test_load_run_gives_the_config_the_selected_model_and_the_split_files(mura_run):
  workdir, result = mura_run
  run = runs.load_run(workdir)
  assert run.config.dataset.name == "mura" and run.config.model.input_shape == (48, 48, 1)
  assert run.metrics()["test"] == result["test"]
  assert run.splits()["class_names"] == ["normal", "abnormal"]
  selected = run.restore_selected_model()
  model, variables = selected.model, selected.variables
  assert model.input_shape == (48, 48, 1) and "params" in variables
  assert runs.source_run_dir(workdir) == workdir
  assert runs.source_run_dir(os.path.join(workdir, "selected_model")) == workdir
  assert runs.source_run_dir(os.path.dirname(workdir)) is None


# ----------------------------------------------------------------------------------------------
# Run loading (medxai_jax/runs.py): an old, sparse config.json resolves to base_config's
# defaults, and a run's selected model is the one artefact that inference and init_from read.

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


# --- test_best_so_far.py
# An unfinished run (no selected_model/ yet) is explained only on the explicit opt-in
# `model='best_so_far'`: its best epoch checkpoint, restored through `runs.restore_model`, with
# the epoch recorded in the outputs; never a silent fallback.
#
# The oracle: a finished 2-epoch run's selected_model/ (written by training from its best
# checkpoint) and metrics.json's selected epoch; the run is then made unfinished by removing them.


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
  from medxai_jax import runs
  from medxai_jax.train import loop

  root = tmp_path_factory.mktemp("best_so_far")
  config = tiny.demo_config(root / "tfds", num_train=16, num_validation=8, num_test=4,
                            dense_widths=(8,), num_epochs=2, batch_size=8)
  run = root / "run"
  loop.train_and_evaluate(config, str(run))
  selected = runs.restore_selected_model(config, str(run))
  epoch = json.loads((run / "metrics.json").read_text())["selected_epoch"]
  shutil.rmtree(run / runs.SELECTED_MODEL_DIR)  # as a run stopped before its last epoch
  (run / "metrics.json").unlink()
  return config, run, selected, epoch


def test_best_so_far_restores_the_best_epoch_and_records_it(unfinished, tmp_path):
  from medxai_jax import explain
  from medxai_jax import runs

  config, run, selected, epoch = unfinished
  with pytest.raises(FileNotFoundError, match="training has not finished.*--model=best_so_far"):
    runs.restore_model(config, str(run))  # the default stays the selected model: no fallback
  best = runs.restore_model(config, str(run), runs.BEST_SO_FAR)
  assert best.epoch == epoch and epoch in (1, 2)
  for got, want in zip(jax.tree_util.tree_leaves(best.variables),
                       jax.tree_util.tree_leaves(selected.variables)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  summary = explain.explain_run(config, str(run), str(tmp_path / "explain"),
                                methods=["gradients"], num_images=2, label=-1,
                                model=runs.BEST_SO_FAR)
  assert summary["model"] == {"which": "best_so_far", "epoch": epoch}
  written = json.loads((tmp_path / "explain" / "explain.json").read_text())
  assert written["model"] == summary["model"]
  with pytest.raises(ValueError, match=r"--model must be one of \('selected', 'best_so_far'\)"):
    runs.restore_model(config, str(run), "latest")


def test_best_so_far_needs_an_epoch_checkpoint(tmp_path):
  from medxai_jax import runs

  config = tiny.demo_config(tmp_path / "tfds")
  (tmp_path / "run").mkdir()
  with pytest.raises(FileNotFoundError, match="no epoch checkpoint .* yet"):
    runs.restore_model(config, str(tmp_path / "run"), runs.BEST_SO_FAR)
