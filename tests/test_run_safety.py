"""One run per workdir, resumption that checks the config, preemption and mid-epoch checkpoints."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny
from configs import demo
from medxai_jax import runs
from medxai_jax.data import pipeline
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import loop
from medxai_jax.train import preemption
from medxai_jax.train import schema
from medxai_jax.train import steps
from medxai_jax.train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _hold_lock_in_child(workdir: str) -> subprocess.Popen:
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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  """A finished 2-epoch run, started over the lock file that a SIGKILLed process left behind."""
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


def _history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _latest_state(config, workdir, step):
  model, tx, _ = components.build_components(config)
  template = steps.create_train_state(model, tx, jax.random.key(0))
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"))
  state, _ = store.restore_latest(template, step=step)
  store.close()
  return state


def _assert_same_states(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_until_killed(script: str) -> None:
  """Runs a training script in a child process that SIGKILLs itself."""
  child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def _assert_resumes_as_uninterrupted(config, reference, result, workdir, *, every_steps=0):
  """Resuming `workdir` ends with the uninterrupted `reference` run's state, history and test."""
  resumed_config = copy.deepcopy(config)
  resumed_config.checkpoint.every_steps = every_steps
  resumed = loop.train_and_evaluate(resumed_config, workdir)
  _assert_same_states(_latest_state(config, reference, 2), _latest_state(config, workdir, 2))
  assert _history(workdir) == _history(reference)
  assert resumed["test"] == result["test"]


def _snapshot(workdir):
  """Bytes and mtime of every file of a run but its lock file."""
  snapshot = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name.startswith(workdir_lib.LOCK_FILE):
        continue
      with open(path, "rb") as f:
        snapshot[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return snapshot


def test_a_second_run_on_a_locked_workdir_refuses_naming_the_holder(finished_run, tmp_path):
  config, _, _ = finished_run
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  child = _hold_lock_in_child(workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf"pid {child.pid} on host {os.uname().nodename} since 20"):
      loop.train_and_evaluate(copy.deepcopy(config), workdir)
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]  # nothing else written
  finally:
    child.kill()
    child.wait()
  lock = workdir_lib.RunLock(workdir).acquire()  # the kernel released the dead child's flock
  with open(workdir_lib.lock_path(workdir)) as f:
    assert json.load(f)["pid"] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"pid {os.getpid()}"):
    workdir_lib.RunLock(workdir).acquire()  # a second open file in this process conflicts too
  other = workdir_lib.RunLock(workdir, process_index=1).acquire()  # processes of one job
  assert other.path.endswith(".lock.process1")
  other.release()
  lock.release()


@pytest.mark.parametrize("field, new_value", [
    ("learning_rate", 0.01),
    ("dataset.builder.num_train", 80),  # more training images
    ("model.conv_widths", (4, 4, 4, 4, 8)),
    ("optimizer.name", "sgd"),
    ("batch_size", 8),
    ("seed", 1),
    ("augment.flip", False),
    ("dataset.filter", "body_part=hand"),
    ("train.trainable", "head"),
    ("num_epochs", 1),  # fewer than the 2 epochs done
])
def test_a_change_to_what_was_trained_is_refused_and_nothing_is_written(
    finished_run, data_dir, field, new_value):
  config, workdir, _ = finished_run
  changed = copy.deepcopy(config)
  section, _, name = field.rpartition(".")
  target = changed
  for part in section.split(".") if section else ():
    target = target[part]
  old_value = target[name]
  target[name] = new_value
  before = _snapshot(workdir)
  assert {"config.json", "history.jsonl", "metrics.json",
          workdir_lib.PREPARED_DATASET_FILE} <= set(before)
  with pytest.raises(workdir_lib.ConfigChangeError) as error:
    loop.train_and_evaluate(changed, workdir)
  message = str(error.value)
  as_stored = lambda value: list(value) if isinstance(value, tuple) else value
  assert f"{field}: {as_stored(old_value)!r} -> {as_stored(new_value)!r}" in message
  assert "Nothing was written" in message
  assert _snapshot(workdir) == before


def test_extending_num_epochs_is_recorded_and_continues(finished_run, tmp_path):
  config, workdir, _ = finished_run
  extended = str(tmp_path / "extended")
  shutil.copytree(workdir, extended)
  with open(os.path.join(extended, "history.jsonl"), "rb") as f:
    first_epochs = f.read()
  config = copy.deepcopy(config)
  config.num_epochs = 3
  config.log_every_steps = 4
  config.checkpoint.max_to_keep = 3
  result = loop.train_and_evaluate(config, extended)
  assert result["epochs_run"] == 3
  with open(os.path.join(extended, "history.jsonl"), "rb") as f:
    assert f.read().startswith(first_epochs)  # the first two epochs' lines are kept as written
  assert [r["epoch"] for r in _history(extended)] == [1, 2, 3]
  with open(os.path.join(extended, workdir_lib.CONFIG_HISTORY_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 1 and records[0]["completed_epochs"] == 2
  assert records[0]["partial_checkpoint_step"] is None
  assert records[0]["changes"] == [
      {"field": "checkpoint.max_to_keep", "old": 2, "new": 3},
      {"field": "log_every_steps", "old": 2, "new": 4},
      {"field": "num_epochs", "old": 2, "new": 3}]
  assert runs.read_run_config(extended).num_epochs == 3


def test_rerunning_a_finished_run_re_evaluates_and_records_nothing(finished_run):
  config, workdir, result = finished_run
  again = loop.train_and_evaluate(copy.deepcopy(config), workdir)
  assert again["test"] == result["test"] and again["epochs_run"] == 2
  assert not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_HISTORY_FILE))
  assert [r["epoch"] for r in _history(workdir)] == [1, 2]


def test_check_resume_compares_the_prepared_dataset_and_step_decay_epochs():
  config = tiny_config("/data/a")
  run_config = json.loads(config.to_json_best_effort())
  moved = json.loads(config.to_json_best_effort())
  moved["dataset"]["data_dir"] = "/data/b"
  dataset = {"name": "mura", "prepared_config": "default-files0123456789", "version": "1.0.0"}
  more_files = dict(dataset, prepared_config="default-files9876543210")
  allowed = workdir_lib.check_resume(run_config, moved, config_file="/run/config.json",
                                     completed_epochs=1, run_dataset=dataset, dataset=dataset)
  assert [d.path for d in allowed] == ["dataset.data_dir"]
  with pytest.raises(workdir_lib.ConfigChangeError,
                     match=r"(?s)dataset.data_dir: '/data/a' -> '/data/b'.*prepared dataset.*"
                     "default-files0123456789.*default-files9876543210"):
    workdir_lib.check_resume(run_config, moved, config_file="/run/config.json",
                             completed_epochs=1, run_dataset=dataset, dataset=more_files)
  decayed = json.loads(config.to_json_best_effort())
  decayed["schedule"].update(name="step_decay", boundaries=[0.5], divisors=[10])
  longer = copy.deepcopy(decayed)
  longer["num_epochs"] = 4
  with pytest.raises(workdir_lib.ConfigChangeError, match="num_epochs: 2 -> 4: schedule"):
    workdir_lib.check_resume(decayed, longer, config_file="/run/config.json",
                             completed_epochs=1, run_dataset=dataset, dataset=dataset)


def _train_in_child(data_dir: str, workdir: str, env: dict[str, str]
                    ) -> subprocess.CompletedProcess:
  """Runs the tiny config's training in a fresh interpreter."""
  script = ("import sys\n"
            f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
            "import test_run_safety\n"
            "from medxai_jax.train import loop\n"
            f"config = test_run_safety.tiny_config({data_dir!r})\n"
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


def test_every_steps_checkpoint_resumes_bit_identically_after_a_kill(
    finished_run, data_dir, tmp_path):
  config, reference, result = finished_run
  workdir = str(tmp_path / "killed")
  os.makedirs(workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints", "partial")
  # SIGKILL as soon as the mid-epoch checkpoint of epoch 2, step 3 (global step 7) is written.
  script = (f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
            "import os, signal, test_run_safety\n"
            "from medxai_jax.train import checkpoint, loop\n"
            "save = checkpoint.CheckpointStore.save_partial\n"
            "def save_then_die(self, step, *args):\n"
            "  save(self, step, *args)\n"
            "  if step == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
            "checkpoint.CheckpointStore.save_partial = save_then_die\n"
            f"config = test_run_safety.tiny_config({data_dir!r})\n"
            "config.checkpoint.every_steps = 3\n"
            f"loop.train_and_evaluate(config, {workdir!r})\n")
  _run_until_killed(script)
  assert os.listdir(checkpoint_dir) == ["7"]
  _assert_resumes_as_uninterrupted(config, reference, result, workdir, every_steps=3)


def test_bad_every_steps_is_refused(data_dir):
  config = tiny_config(data_dir)
  config.checkpoint.every_steps = -1
  with pytest.raises(ValueError, match=r"config.checkpoint.every_steps must be an integer >= 0"):
    schema.check_config(config)


COVID = "COVID-19_Radiography_Dataset"


def test_more_real_training_images_are_refused_and_a_moved_copy_is_allowed(tmp_path):
  """The real COVID builder: an added image changes the prepared dataset the run recorded."""
  import real_data
  from configs import covid_radiography_vgg16
  from medxai_jax.data import pipeline

  manual = tmp_path / "manual"
  real_data.copy_real(f"covid/{COVID}", manual / COVID,
                      keep=["COVID/images/*", "Normal/images/*.jpg"])
  config = covid_radiography_vgg16.get_config()
  config.dataset.update(dict(manual_dir=str(manual), data_dir=str(tmp_path / "tfds")))
  config.dataset.builder.update(dict(image_size=48, read_metadata=False, with_masks=False,
                                     classes=("COVID", "Normal")))
  config.model = demo.get_config().model
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 4, 4, 4, 4),
                           dense_widths=(8,)))
  config.preprocess.update(dict(mean=(0.5,), std=(0.25,)))
  config.update(dict(batch_size=4, eval_batch_size=4, num_epochs=1, log_every_steps=1))
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(copy.deepcopy(config), workdir)
  prepared = pipeline.load_builder(config.dataset).builder_config.name
  with open(os.path.join(workdir, workdir_lib.PREPARED_DATASET_FILE)) as f:
    recorded = json.load(f)
  assert recorded["prepared_config"] == prepared  # the directory name the builder prepared
  assert recorded["manual_dir_files"] == sum(1 for p in manual.rglob("*") if p.is_file())

  before = _snapshot(workdir)
  normal = manual / COVID / "Normal" / "images"
  shutil.copyfile(sorted(normal.glob("*.jpg"))[0], normal / "Normal-1000.jpg")
  with pytest.raises(workdir_lib.ConfigChangeError, match=rf"(?s)the prepared dataset.*"
                     rf"{prepared}.*-files(?!{prepared[-10:]})"):
    loop.train_and_evaluate(copy.deepcopy(config), workdir)
  assert _snapshot(workdir) == before
  (normal / "Normal-1000.jpg").unlink()

  moved = tmp_path / "moved"
  shutil.copytree(manual, moved)  # copy2: same names, sizes and mtimes, so the same dataset
  config.dataset.manual_dir = str(moved)
  loop.train_and_evaluate(copy.deepcopy(config), workdir)
  with open(os.path.join(workdir, workdir_lib.CONFIG_HISTORY_FILE)) as f:
    (record,) = [json.loads(line) for line in f]
  assert record["changes"] == [{"field": "dataset.manual_dir", "old": str(manual),
                                "new": str(moved)}]


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
            "import os, signal, test_run_safety\n"
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
            f"config = test_run_safety.tiny_config({data_dir!r})\n"
            "config.checkpoint.every_steps = 3\n"
            f"loop.train_and_evaluate(config, {workdir!r})\n")
  _run_until_killed(script)
  written = os.listdir(os.path.join(workdir, "checkpoints", manager_name))
  assert str(step) not in written, written  # killed before orbax finalised it
  _assert_resumes_as_uninterrupted(config, reference, result, workdir, every_steps=3)
