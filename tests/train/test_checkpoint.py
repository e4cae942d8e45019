"""Mid-epoch checkpoints (`config.checkpoint.every_steps`) and a kill during any checkpoint write:
the run resumes bit-identically (train/checkpoint.py)."""

import os

import pytest

import subprocess_env
from resumption import assert_resumes_as_uninterrupted as _assert_resumes_as_uninterrupted
from resumption import run_until_killed as _run_until_killed

REPO = subprocess_env.REPO


def test_every_steps_checkpoint_resumes_bit_identically_after_a_kill(
    finished_run, data_dir, tmp_path):
  config, reference, result = finished_run
  workdir = str(tmp_path / "killed")
  os.makedirs(workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints", "partial")
  # SIGKILL as soon as the mid-epoch checkpoint of epoch 2, step 3 (global step 7) is written.
  script = (f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
            "import os, signal, resumption\n"
            "from medxai_jax.train import checkpoint, loop\n"
            "save = checkpoint.CheckpointStore.save_partial\n"
            "def save_then_die(self, step, *args):\n"
            "  save(self, step, *args)\n"
            "  if step == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
            "checkpoint.CheckpointStore.save_partial = save_then_die\n"
            f"config = resumption.tiny_config({data_dir!r})\n"
            "config.checkpoint.every_steps = 3\n"
            f"loop.train_and_evaluate(config, {workdir!r})\n")
  _run_until_killed(script)
  assert os.listdir(checkpoint_dir) == ["7"]
  _assert_resumes_as_uninterrupted(config, reference, result, workdir, every_steps=3)


@pytest.mark.parametrize("manager_name, step", [("best", 1), ("latest", 1), ("latest", 2),
                                                ("partial", 7)])
def test_a_kill_during_a_checkpoint_write_resumes_bit_identically(
    finished_run, data_dir, tmp_path, manager_name, step):
  config, reference, result = finished_run
  workdir = str(tmp_path / "killed")
  os.makedirs(workdir)
  # SIGKILL while orbax is still writing (the save started, not waited for) the `manager_name`
  # checkpoint of `step`: the write never finalises.
  script = (f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
            "import os, signal, resumption\n"
            "import orbax.checkpoint as ocp\n"
            "from medxai_jax.train import checkpoint, loop\n"
            "save = checkpoint.CheckpointStore._save\n"
            "def save_or_die(manager, step, state, metadata):\n"
            f"  if step == {step} and os.path.basename(str(manager.directory)) == "
            f"{manager_name!r}:\n"
            "    manager.save(step, args=ocp.args.Composite(\n"
            "        state=ocp.args.StandardSave(state),\n"
            "        metadata=ocp.args.JsonSave(metadata)), force=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "  save(manager, step, state, metadata)\n"
            "checkpoint.CheckpointStore._save = staticmethod(save_or_die)\n"
            f"config = resumption.tiny_config({data_dir!r})\n"
            "config.checkpoint.every_steps = 3\n"
            f"loop.train_and_evaluate(config, {workdir!r})\n")
  _run_until_killed(script)
  written = os.listdir(os.path.join(workdir, "checkpoints", manager_name))
  assert str(step) not in written, written  # killed before orbax finalised it
  _assert_resumes_as_uninterrupted(config, reference, result, workdir, every_steps=3)
