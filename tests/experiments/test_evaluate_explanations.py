"""experiments/evaluate_explanations.py (and compare_layers on the same run) end to end on tiny
settings (subprocesses, as a user runs them)."""

import json

import numpy as np

from binaries import TINY
from binaries import run
from binaries import strict_loads



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


def test_evaluate_and_compare_layers_need_only_the_run(overridden_run, tmp_path, data_dir):
  workdir = tmp_path / "scores"
  result = run("experiments.evaluate_explanations", f"--checkpoint={overridden_run}",
               f"--workdir={workdir}", "--num_images=2", "--methods=gradients",
               "--curve_steps=4", "--sanity_methods=", "--gallery_rows=2", "--label=-1",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = strict_loads((workdir / "evaluation.json").read_text())
  assert sorted(summary["targets"]) == [0, 1]
  output = tmp_path / "compare"
  result = run("experiments.compare_layers", f"--workdir_a={overridden_run}",
               f"--workdir_b={overridden_run}", "--taps_a=conv1,fc7", "--taps_b=conv1,fc7",
               "--num_examples=8", "--batch_size=8", f"--output_dir={output}",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  matrix = np.load(output / "similarity_minibatch_cka.npy")
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)  # a model against itself
