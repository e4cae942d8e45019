"""The experiments/ binaries run as a user runs them (a subprocess from the repository root) on
tiny settings, for the end-to-end tests in tests/experiments/ (their runs: its conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import subprocess_env

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

# A run trained with overrides the demo config does not have: the binaries must read them back.
# (config_flags concatenates a repeated tuple override, so TINY's own ones are replaced.)
OVERRIDDEN_TINY = [flag for flag in TINY if not flag.startswith(("--config.model.conv_widths",
                                                                  "--config.num_epochs"))] + [
    "--config.model.num_outputs=2", "--config.model.conv_widths=(4, 8, 8, 8, 6)",
    "--config.num_epochs=1"]


def run(module, *args, data_dir):
  """`python -m <module> <args>` from the repository root, with TFDS_DATA_DIR=`data_dir`."""
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=subprocess_env.REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def strict_loads(text):
  """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  return json.loads(text, parse_constant=refuse)
