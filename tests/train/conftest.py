"""The fixtures tests/train/ shares: one TFDS data dir for the session (the reference run below
and the runs the tests stop and resume prepare their phantoms in the same dir) and the finished
reference run."""

import copy
import json
import os

import pytest

from resumption import hold_lock_in_child as _hold_lock_in_child
from resumption import tiny_config
from medxai_jax.train import loop
from medxai_jax.train import workdir as workdir_lib


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The TFDS data dir of tests/train/ (it overrides tests/conftest.py's one per file)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_dir):
  """A finished 2-epoch run of `resumption.tiny_config`, started over the lock file that a SIGKILLed
  process left behind: (config, workdir, result). (tests/train/test_loop.py has its own.)"""
  workdir = str(tmp_path_factory.mktemp("run") / "finished")
  os.makedirs(workdir)
  child = _hold_lock_in_child(workdir)
  child.kill()
  child.wait()
  with open(workdir_lib.lock_path(workdir)) as f:
    assert json.load(f)["pid"] == child.pid  # the stale lock file names the dead process
  config = tiny_config(data_dir)
  result = loop.train_and_evaluate(copy.deepcopy(config), workdir)
  return config, workdir, result
