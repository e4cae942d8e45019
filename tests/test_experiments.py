"""The absl binaries end to end on tiny settings (subprocesses, as a user runs them)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.dataset.builder.image_size=48", "--config.dataset.builder.num_train=64",
    "--config.dataset.builder.num_validation=32", "--config.dataset.builder.num_test=32",
    "--config.model.input_shape=(48, 48, 1)", "--config.model.conv_widths=(4, 8, 8, 8, 8)",
    "--config.model.dense_widths=(16, 16)", "--config.batch_size=16", "--config.num_epochs=2",
    "--config.explain.num_images=3", "--config.annotation.num_reports=150",
]

# The demo's own explanation settings, shrunk: every method still runs, on fewer evaluations.
DEMO_TINY = ["--config.explain.num_steps=8", "--config.explain.num_samples=4",
             "--config.explain.num_scored=4"]


def run(module, *args, data_dir):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("runs") / "demo"
  result = run("experiments.demo", f"--workdir={workdir}", *TINY, *DEMO_TINY, data_dir=data_dir)
  return workdir, result


def test_demo_writes_metrics_figures_and_report(demo_run):
  workdir, result = demo_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Test accuracy" in result.stdout
  for name in ("metrics.json", "history.jsonl", "training_curves.png", "gradcam.png",
               "report.html"):
    assert (workdir / name).stat().st_size > 0, name
  metrics = json.loads((workdir / "metrics.json").read_text())
  shortcut = metrics["shortcut"]
  assert shortcut["num_agrees"] + shortcut["num_contradicts"] == 32
  report = (workdir / "report.html").read_text()
  assert 'src="gradcam.png"' in report and 'src="training_curves.png"' in report
  annotation = metrics["annotation"]  # synthetic reports with 2% label noise
  assert annotation["num_labelled"] + annotation["num_auto_labelled"] == 150
  assert annotation["kfold_accuracy"] > 0.85 and annotation["auto_label_accuracy"] > 0.85
  assert "Report auto-annotation" in report


def test_train_cli_rejects_unknown_override_and_missing_parent(tmp_path, data_dir):
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
               "--config.learnig_rate=0.1", data_dir=data_dir)
  assert result.returncode != 0
  assert "learnig_rate" in result.stderr
  result = run("experiments.train", "--config=configs/demo.py",
               f"--workdir={tmp_path / 'no' / 'such' / 'dir'}", *TINY, data_dir=data_dir)
  assert result.returncode != 0
  assert "does not exist" in result.stderr


def test_explain_writes_maps_figure_and_timings(demo_run, tmp_path, data_dir):
  checkpoint, demo = demo_run
  assert demo.returncode == 0, demo.stderr[-3000:]
  workdir = tmp_path / "explain"
  result = run("experiments.explain", "--config=configs/demo.py", f"--checkpoint={checkpoint}",
               f"--workdir={workdir}", "--methods=gradients,ig,grad_cam,cam", "--num_images=2",
               "--num_steps=8", *TINY, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "explain.json").read_text())
  assert len(summary["indices"]) == 2 and set(summary["targets"]) == {1}
  for method in ("gradients", "ig", "grad_cam"):
    maps = np.load(workdir / f"maps_{method}.npy")
    assert maps.shape[:3] == (2, 48, 48), (method, maps.shape)
    assert summary["methods"][method]["seconds_per_image"] > 0
  assert "skipped" in summary["methods"]["cam"]  # the custom CNN's head is not GAP + dense
  assert (workdir / "attributions.png").stat().st_size > 0


def test_data_randomisation_test_through_the_binaries(demo_run, tmp_path, data_dir):
  checkpoint, demo = demo_run
  assert demo.returncode == 0, demo.stderr[-3000:]
  shuffled = tmp_path / "shuffled"
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={shuffled}", *TINY,
               "--config.dataset.shuffle_labels=True", "--config.selection.metric=train_accuracy",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  scoring = ["--config=configs/demo.py", f"--checkpoint={checkpoint}", "--num_images=2",
             "--methods=gradients,grad_cam", "--curve_steps=4", "--sanity_methods=",
             "--gallery_rows=2", *TINY]
  workdir = tmp_path / "scores"
  result = run("experiments.evaluate_explanations", *scoring, f"--workdir={workdir}",
               f"--shuffled_labels_checkpoint={shuffled}", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "evaluation.json").read_text())
  assert {"data_spearman", "data_spearman_abs"} <= set(summary["metrics"])
  for method in ("gradients", "grad_cam"):
    value = summary["leaderboard"][method]["data_spearman_abs"]["mean"]
    assert -1.0 <= value <= 1.0
  assert "data_spearman_abs" in (workdir / "leaderboard.md").read_text()
  # A run trained on the true labels is refused as the shuffled-label model.
  result = run("experiments.evaluate_explanations", *scoring, f"--workdir={tmp_path / 'bad'}",
               f"--shuffled_labels_checkpoint={checkpoint}", data_dir=data_dir)
  assert result.returncode != 0 and "shuffle_labels=True" in result.stderr


# A run trained with overrides the demo config does not have: the binaries must read them back.
# (config_flags concatenates a repeated tuple override, so TINY's own ones are replaced.)
OVERRIDDEN_TINY = [flag for flag in TINY if not flag.startswith(("--config.model.conv_widths",
                                                                  "--config.num_epochs"))] + [
    "--config.model.num_outputs=2", "--config.model.conv_widths=(4, 8, 8, 8, 6)",
    "--config.num_epochs=1"]


def _strict_loads(text):
  """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def overridden_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("runs") / "overridden"
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={workdir}",
               *OVERRIDDEN_TINY, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_explain_reads_the_run_config_and_samples_both_classes(overridden_run, tmp_path,
                                                               data_dir):
  workdir = tmp_path / "explain"
  result = run("experiments.explain", f"--checkpoint={overridden_run}", f"--workdir={workdir}",
               "--methods=gradients,grad_cam", "--num_images=4", "--label=-1", "--num_steps=4",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _strict_loads((workdir / "explain.json").read_text())
  assert sorted(summary["targets"]) == [0, 0, 1, 1]  # class-balanced, not the first four
  assert np.load(workdir / "maps_gradients.npy").shape[:3] == (4, 48, 48)


def test_a_given_config_is_compared_printed_and_applied(overridden_run, tmp_path, data_dir):
  result = run("experiments.explain", "--config=configs/demo.py", *OVERRIDDEN_TINY,
               "--config.explain.num_images=5", f"--checkpoint={overridden_run}",
               f"--workdir={tmp_path / 'same'}", "--methods=gradients", "--num_images=2",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "differs from" in result.stdout and "explain.num_images: 3 -> 5" in result.stdout
  assert "model.num_outputs" not in result.stdout
  # The demo config without the run's overrides: the differences are shown, then the
  # restore fails because the given model is not the trained one.
  result = run("experiments.explain", "--config=configs/demo.py", *TINY,
               f"--checkpoint={overridden_run}", f"--workdir={tmp_path / 'other'}",
               "--methods=gradients", "--num_images=2", data_dir=data_dir)
  assert result.returncode != 0
  assert "model.num_outputs: 2 -> 1" in result.stdout
  assert "model.conv_widths: (4, 8, 8, 8, 6) -> (4, 8, 8, 8, 8)" in result.stdout
  assert "does not match the model" in result.stderr


def test_evaluate_and_compare_layers_need_only_the_run(overridden_run, tmp_path, data_dir):
  workdir = tmp_path / "scores"
  result = run("experiments.evaluate_explanations", f"--checkpoint={overridden_run}",
               f"--workdir={workdir}", "--num_images=2", "--methods=gradients",
               "--curve_steps=4", "--sanity_methods=", "--gallery_rows=2", "--label=-1",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _strict_loads((workdir / "evaluation.json").read_text())
  assert sorted(summary["targets"]) == [0, 1]
  output = tmp_path / "compare"
  result = run("experiments.compare_layers", f"--workdir_a={overridden_run}",
               f"--workdir_b={overridden_run}", "--taps_a=conv1,fc7", "--taps_b=conv1,fc7",
               "--num_examples=8", "--batch_size=8", f"--output_dir={output}",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  matrix = np.load(output / "similarity_minibatch_cka.npy")
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)  # a model against itself


def test_a_missing_checkpoint_is_a_clear_error_that_creates_nothing(tmp_path, data_dir):
  missing = tmp_path / "no_run"
  result = run("experiments.explain", f"--checkpoint={missing}",
               f"--workdir={tmp_path / 'out'}", data_dir=data_dir)
  assert result.returncode != 0 and "no_run" in result.stderr and "does not exist" in result.stderr
  assert not missing.exists() and not (tmp_path / "out").exists()
