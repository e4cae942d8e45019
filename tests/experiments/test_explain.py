"""experiments/explain.py end to end on tiny settings (subprocesses, as a user runs them)."""

import json

import numpy as np

from binaries import OVERRIDDEN_TINY
from binaries import TINY
from binaries import run
from binaries import strict_loads


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


def test_explain_reads_the_run_config_and_samples_both_classes(overridden_run, tmp_path,
                                                               data_dir):
  workdir = tmp_path / "explain"
  result = run("experiments.explain", f"--checkpoint={overridden_run}", f"--workdir={workdir}",
               "--methods=gradients,grad_cam", "--num_images=4", "--label=-1", "--num_steps=4",
               data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = strict_loads((workdir / "explain.json").read_text())
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


def test_a_missing_checkpoint_is_a_clear_error_that_creates_nothing(tmp_path, data_dir):
  missing = tmp_path / "no_run"
  result = run("experiments.explain", f"--checkpoint={missing}",
               f"--workdir={tmp_path / 'out'}", data_dir=data_dir)
  assert result.returncode != 0 and "no_run" in result.stderr and "does not exist" in result.stderr
  assert not missing.exists() and not (tmp_path / "out").exists()
