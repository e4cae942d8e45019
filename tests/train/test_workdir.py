"""One run per workdir (prepared, locked) and resumption that checks the config
(train/workdir.py)."""

import copy
import json
import os
import re
import shutil

import pytest

from resumption import hold_lock_in_child as _hold_lock_in_child
from resumption import history as _history
from resumption import tiny_config
from configs import demo
from medxai_jax import runs
from medxai_jax.train import loop
from medxai_jax.train import workdir as workdir_lib


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


def test_a_workdir_that_is_a_file_or_under_a_file(tmp_path):
  file = tmp_path / "file"
  file.write_text("x")
  with pytest.raises(NotADirectoryError, match=re.escape(f"--workdir={str(file)!r} exists and "
                                                         "is not a directory")):
    workdir_lib.prepare_workdir(str(file))
  for below in (file / "run", file / "a" / "b"):
    with pytest.raises(NotADirectoryError, match=re.escape(
        f"--workdir={str(below)!r} cannot be created: {str(file)!r} is a file")):
      workdir_lib.prepare_workdir(str(below))


def test_a_missing_parent_says_mkdir(tmp_path):
  workdir = tmp_path / "no" / "such" / "run"
  with pytest.raises(FileNotFoundError) as error:
    workdir_lib.prepare_workdir(str(workdir))
  assert "does not exist" in str(error.value)
  assert str(error.value).endswith(f"mkdir -p {workdir.parent}")
  assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("workdir", ["/proc/medxai_run", "/sys/medxai_run", "/proc"])
def test_a_workdir_where_no_file_can_be_created(workdir):
  # Root ignores permission bits; /proc and /sys refuse new files even to root.
  mount = "/" + workdir.split("/")[1]
  if not os.path.isdir(mount):
    pytest.skip(f"no {mount} on this machine")
  with pytest.raises(PermissionError, match=re.escape(f"--workdir={workdir!r} cannot be "
                                                      "written")):
    workdir_lib.prepare_workdir(workdir)
  assert not os.path.exists(workdir) or workdir == "/proc"


def test_a_workdir_on_a_read_only_file_system(tmp_path, monkeypatch):
  real_statvfs = os.statvfs

  class ReadOnly:
    """os.statvfs's answer for a mount with the read-only flag."""

    def __init__(self, path):
      self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

  monkeypatch.setattr(os, "statvfs", ReadOnly)
  with pytest.raises(PermissionError, match="read-only file system"):
    workdir_lib.prepare_workdir(str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_writable_workdir_is_created_and_left_clean(tmp_path):
  workdir = workdir_lib.prepare_workdir(str(tmp_path / "run"))
  assert workdir == str(tmp_path / "run") and os.path.isdir(workdir)
  assert os.listdir(workdir) == [] and sorted(os.listdir(tmp_path)) == ["run"]
  assert workdir_lib.prepare_workdir(workdir) == workdir  # an existing run directory (resume)
