"""SIGTERM stops training at the next step with a checkpoint and exit status 0, and the next run
continues bit-identically (train/preemption.py)."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest

import subprocess_env
from resumption import STEPS_PER_EPOCH
from resumption import assert_same_states as _assert_same_states
from resumption import history as _history
from resumption import latest_state as _latest_state
from medxai_jax.data import pipeline
from medxai_jax.train import loop
from medxai_jax.train import preemption
from medxai_jax.train import workdir as workdir_lib

REPO = subprocess_env.REPO


def _train_in_child(data_dir: str, workdir: str, env: dict[str, str]
                    ) -> subprocess.CompletedProcess:
  """Runs the tiny config's training in a fresh interpreter."""
  script = ("import sys\n"
            f"sys.path.insert(0, {subprocess_env.TESTS!r})\n"
            "import resumption\n"
            "from medxai_jax.train import loop\n"
            f"config = resumption.tiny_config({data_dir!r})\n"
            f"loop.train_and_evaluate(config, {workdir!r})\n"
            "print('finished')\n")
  return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, **env}, timeout=300)


def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_bit_identically(
    finished_run, data_dir, tmp_path, monkeypatch):
  config, reference, result = finished_run
  workdir = str(tmp_path / "preempted")
  stop_at = STEPS_PER_EPOCH + 2  # epoch 2, step 2 of 4
  child = _train_in_child(data_dir, workdir, {preemption.SIGTERM_AFTER_STEP_ENV: str(stop_at)})
  assert child.returncode == 0, child.stderr[-3000:]
  assert "finished" not in child.stdout
  assert "Stopped on SIGTERM after step 2 of 4 of epoch 2" in child.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints", "partial")) == [str(stop_at)]
  assert [r["epoch"] for r in _history(workdir)] == [1]
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  # The checkpoint holds the input iterator's state (grain's), and the resumed epoch starts
  # from it: after 2 of the epoch's batches.
  with open(os.path.join(workdir, "checkpoints", "partial", str(stop_at), "metadata",
                         "metadata")) as f:
    saved = json.load(f)["position"]["input"]
  assert saved == {"workers": 0, "start": 0, "next": 2, "iterator": {"next_index": 2}}
  started_from = []
  init = pipeline.BatchStream.__init__

  def recording_init(self, dataset, **kwargs):
    started_from.append(kwargs.get("iterator_state"))
    init(self, dataset, **kwargs)

  monkeypatch.setattr(pipeline.BatchStream, "__init__", recording_init)
  resumed = loop.train_and_evaluate(copy.deepcopy(config), workdir)
  assert started_from[0] == saved["iterator"]
  _assert_same_states(_latest_state(config, reference, 2), _latest_state(config, workdir, 2))
  assert _history(workdir) == _history(reference)
  assert resumed["test"] == result["test"]
  assert os.listdir(os.path.join(workdir, "checkpoints", "partial")) == []


def test_sigterm_in_process_raises_preempted_with_status_0(finished_run, tmp_path, monkeypatch):
  config, _, _ = finished_run
  monkeypatch.setenv(preemption.SIGTERM_AFTER_STEP_ENV, "1")
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Preempted, match="after step 1 of 4 of epoch 1") as error:
    loop.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "stopped"))
  assert error.value.code == 0 and isinstance(error.value, SystemExit)
  assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back
  workdir_lib.RunLock(str(tmp_path / "stopped")).acquire().release()  # the lock was released
