"""A tiny training run stopped and resumed: its config and the checks that a resumed run is the
uninterrupted one (tests/train/: test_workdir, test_preemption, test_checkpoint; the finished
reference run is tests/train/conftest.py's `finished_run`). Child processes import this module
too: tests/ is on their sys.path."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

import subprocess_env
import tiny
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import loop
from medxai_jax.train import steps

REPO = subprocess_env.REPO
STEPS_PER_EPOCH = 64 // 16
TIMING = ("train_seconds", "images_per_second")


def tiny_config(data_dir: str, **overrides):
  """Two epochs of four steps on 48-px phantoms with a tiny CNN and on-device augmentation."""
  config = tiny.demo_config(data_dir, image_size=48, num_train=64, num_validation=16,
                            num_test=16, conv_widths=(4, 4, 4, 4, 4), dense_widths=(8, 8),
                            batch_size=16, eval_batch_size=16, num_epochs=2, log_every_steps=2)
  config.augment.update(dict(flip=True, rotation_degrees=10.0))
  config.update(overrides)
  return config


def hold_lock_in_child(workdir: str) -> subprocess.Popen:
  """A child process holding the run lock of `workdir` (it sleeps until killed)."""
  child = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from medxai_jax.train import workdir\n"
       "workdir.RunLock(sys.argv[1]).acquire()\n"
       "print('locked', flush=True)\n"
       "time.sleep(600)\n", workdir],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "locked"
  return child


def history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def restore_latest(config, workdir, step):
  """The train state and metadata of `workdir`'s checkpoint at `step`."""
  model, tx, _ = components.build_components(config)
  template = steps.create_train_state(model, tx, jax.random.key(0))
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"))
  state, metadata = store.restore_latest(template, step=step)
  store.close()
  return state, metadata


def latest_state(config, workdir, step):
  """The train state of `workdir`'s checkpoint at `step`."""
  return restore_latest(config, workdir, step)[0]


def assert_same_states(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_until_killed(script: str) -> None:
  """Runs a training script in a child process that SIGKILLs itself."""
  child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def assert_resumes_as_uninterrupted(config, reference, result, workdir, *, every_steps=0):
  """Resuming `workdir` ends with the uninterrupted `reference` run's state, history and test."""
  resumed_config = copy.deepcopy(config)
  resumed_config.checkpoint.every_steps = every_steps
  resumed = loop.train_and_evaluate(resumed_config, workdir)
  assert_same_states(latest_state(config, reference, 2), latest_state(config, workdir, 2))
  assert history(workdir) == history(reference)
  assert resumed["test"] == result["test"]
