"""The absl binaries end to end on tiny settings (subprocesses, as a user runs them)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.dataset.phantoms.image_size=48", "--config.dataset.phantoms.num_train=64",
    "--config.dataset.phantoms.num_validation=32", "--config.dataset.phantoms.num_test=32",
    "--config.model.input_shape=(48, 48, 1)", "--config.model.conv_widths=(4, 8, 8, 8, 8)",
    "--config.model.dense_widths=(16, 16)", "--config.batch_size=16", "--config.num_epochs=2",
    "--config.explain.num_images=3",
]


def run(module, *args, data_dir):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_demo_writes_metrics_figures_and_report(tmp_path, data_dir):
  workdir = tmp_path / "demo"
  result = run("experiments.demo", f"--workdir={workdir}", *TINY, data_dir=data_dir)
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


def test_train_cli_rejects_unknown_override_and_missing_parent(tmp_path, data_dir):
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
               "--config.learnig_rate=0.1", data_dir=data_dir)
  assert result.returncode != 0
  assert "learnig_rate" in result.stderr
  result = run("experiments.train", "--config=configs/demo.py",
               f"--workdir={tmp_path / 'no' / 'such' / 'dir'}", *TINY, data_dir=data_dir)
  assert result.returncode != 0
  assert "does not exist" in result.stderr
