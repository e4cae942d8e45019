"""One training run per work directory, and what a resumed run may change.

A run holds an exclusive `fcntl.flock` on `<workdir>/.lock` while it runs (`RunLock`); a second
process on the same workdir refuses at once with the holder's pid, host and start time, read
from the lock file. The kernel releases a flock when its process dies, so the file left by a
killed run does not block the next one. On several hosts (`jax.process_count() > 1`) every
process locks its own file (`.lock` for process 0, `.lock.process<i>` for process i): a second
job on the same workdir then refuses in each of its processes that has a twin in the first job,
instead of only in process 0 while the others wait for it in collectives. (flock over NFS is
emulated with POSIX locks by Linux clients, which other clients honour.)

A resumed run (a workdir holding checkpoints) compares its config with the run's config.json
(`check_resume`) before anything is written. It refuses every change to what was trained, naming
each field with its old and new value (`ConfigChangeError`), and allows only `RESUMABLE_FIELDS`
(logging, evaluation-only and report settings), `num_epochs` when it does not drop below the
epochs already done, a moved data_dir / manual_dir whose prepared dataset is the same
(`prepared_dataset`, stored in `<workdir>/prepared_dataset.json`), and builder options spelled
otherwise that resolve to the same builder config (`BUILDER_FIELDS`: an option set to its
default, a run's config.json from before the phantoms' settings were builder options; the
older prepared_dataset.json is read in today's form). Allowed changes are appended
to `<workdir>/config_history.jsonl` (`record_config_change`) before config.json is rewritten.

`prepare_workdir` makes the output directory of any binary (training or not), refusing one that
cannot be created or written with the path and what to do.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Mapping, Sequence

from medxai_jax import runs

LOCK_FILE = ".lock"
CONFIG_HISTORY_FILE = "config_history.jsonl"
PREPARED_DATASET_FILE = "prepared_dataset.json"
# Config fields (dotted paths; a section name covers its fields) a resumed run may change: they
# affect logging, checkpoint keeping, evaluation batching, input workers or later binaries, not
# what is trained.
RESUMABLE_FIELDS = ("log_every_steps", "eval_batch_size", "checkpoint", "explain", "annotation",
                    "summaries", "profile_steps", "input")
# Where the data lives: a change is allowed when the prepared dataset stays the same.
LOCATION_FIELDS = ("dataset.data_dir", "dataset.manual_dir")
# How the builder config is spelled (a section name covers its fields): a change is allowed
# when both configs resolve to the same builder config (`pipeline.resolved_builder_config`),
# e.g. an option set to its default, or an old run's phantom settings as builder options.
BUILDER_FIELDS = ("dataset.builder", "dataset.builder_config")
# The phantom builder's version while prepared_dataset.json held the phantoms' settings (it has
# had no other version).
_PHANTOMS_VERSION_BEFORE_BUILDER_OPTIONS = "1.0.0"


class WorkdirLockedError(RuntimeError):
  """Another process is training in this work directory."""


class ConfigChangeError(ValueError):
  """A resumed run's config changes what the run was trained with."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  """The lock file of one process of a run: `.lock` (process 0) or `.lock.process<i>`."""
  name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.process{process_index}"
  return os.path.join(workdir, name)


def _now() -> str:
  """The current UTC time, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe_holder(text: str) -> str:
  """'pid P on host H since T' from a lock file's content (or why it cannot be told)."""
  try:
    holder = json.loads(text)
    return (f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
            f" ({holder.get('command', '?')})")
  except (ValueError, KeyError, TypeError):
    return f"a process that has not written its pid yet (lock file content {text[:200]!r})"


class RunLock:
  """An exclusive, non-blocking flock on a work directory for the lifetime of a run.

  Use as a context manager; `acquire` raises WorkdirLockedError naming the holder when another
  process holds it. The lock file is kept after release (deleting it would let a process that
  opened the old file and one that creates a new file both hold "the" lock).
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = lock_path(workdir, process_index)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    """Takes the lock and writes this process's pid, host, start time and command into it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      with open(self.path) as file:
        holder = describe_holder(file.read())
      os.close(fd)
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another training run: {holder} holds "
          f"{self.path}. Wait for it to finish, stop it, or give another --workdir.") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Releases the lock (closing the file releases the flock)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()


def prepared_dataset(dataset_config: Mapping[str, Any]) -> dict[str, Any]:
  """What the run trains on, without preparing it: the builder, its version and the prepared
  config's name, which for a manual builder encodes the chosen options and a fingerprint of
  manual_dir's file list (`pipeline.keyed_by_files`: more, fewer or changed files change it).
  The phantoms, generated from their options alone, have no manual_dir fields."""
  from medxai_jax.data import pipeline  # imports tensorflow_datasets lazily

  name = dataset_config["name"]
  config = pipeline.resolved_builder_config(dataset_config)
  builder_cls = pipeline.configurable_builder_classes()[name]
  if name == pipeline.PHANTOMS_NAME:
    return {"name": name, "version": str(builder_cls.VERSION), "prepared_config": config.name}
  data_dir = pipeline.default_data_dir(dataset_config.get("data_dir"))
  manual_dir = pipeline.resolve_manual_dir(dataset_config.get("manual_dir") or "", data_dir)
  pipeline.check_manual_dir(manual_dir, builder_cls, bool(dataset_config.get("manual_dir")))
  fingerprint = pipeline.folder_fingerprint(manual_dir, exclude=[data_dir])
  return {"name": name, "version": str(builder_cls.VERSION),
          "prepared_config": pipeline.keyed_by_files(config, fingerprint, manual_dir).name,
          "manual_dir_files": fingerprint.num_files, "manual_dir_bytes": fingerprint.num_bytes,
          "manual_dir_sha1": fingerprint.digest}


def _plain(value: Any) -> Any:
  """`value` as JSON reads it back (tuples as lists, ConfigDicts as dicts), for comparison."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def _covered(path: str, sections: Sequence[str]) -> bool:
  """Whether a dotted field path is one of `sections` or inside one."""
  return any(path == section or path.startswith(section + ".") for section in sections)


def describe(difference: runs.Difference) -> str:
  """'path: old -> new', the values as JSON reads them back (tuples as lists)."""
  return (f"{difference.path}: {_plain(difference.run_value)!r} -> "
          f"{_plain(difference.given_value)!r}")


def resolved_config_name(dataset_config: Mapping[str, Any]) -> tuple[str, str] | None:
  """(dataset name, name of the builder config it resolves to), or None when it does not
  resolve (an unknown dataset or option): what a builder-option change must keep."""
  from medxai_jax.data import pipeline  # imports tensorflow_datasets lazily

  try:
    return dataset_config["name"], pipeline.resolved_builder_config(dataset_config).name
  except (KeyError, TypeError, ValueError):
    return None


def refused_changes(differences: Sequence[runs.Difference], *, completed_epochs: int,
                    same_dataset: bool, step_decay: bool, same_builder_config: bool = False
                    ) -> list[str]:
  """Why each refused difference is refused, one line per field ('' list: all allowed).
  `same_builder_config`: both configs resolve to the same builder config (BUILDER_FIELDS may
  then differ)."""
  refused = []
  for difference in differences:
    if _covered(difference.path, RESUMABLE_FIELDS):
      continue
    if difference.path in LOCATION_FIELDS and same_dataset:
      continue
    if _covered(difference.path, BUILDER_FIELDS) and same_builder_config and same_dataset:
      continue
    if difference.path == "num_epochs":
      new = difference.given_value
      if step_decay:
        refused.append(f"{describe(difference)}: schedule.boundaries are fractions of "
                       "num_epochs, so the decay epochs would move")
      elif isinstance(new, int) and new < completed_epochs:
        refused.append(f"{describe(difference)}: {completed_epochs} epochs are already done")
      continue
    refused.append(describe(difference))
  return refused


def check_resume(run_config: Any, config: Any, *, config_file: str, completed_epochs: int,
                 run_dataset: Mapping[str, Any] | None, dataset: Mapping[str, Any]
                 ) -> list[runs.Difference]:
  """The allowed differences between a run's config and a resumed run's `config`; raises
  ConfigChangeError naming every refused field (old -> new) and the run's files otherwise.

  `run_dataset` / `dataset`: `prepared_dataset` of the run (None if it was not recorded) and of
  `config`; a different prepared dataset is refused whatever field caused it.
  """
  differences = runs.config_differences(run_config, config)
  same_dataset = run_dataset is None or _plain(dict(run_dataset)) == _plain(
      dict(dataset))
  schedule = config["schedule"]  # a full config: runs.read_run_config / with_defaults fill it
  step_decay = schedule["name"] == "step_decay" and bool(schedule["boundaries"])
  run_builder = resolved_config_name(run_config["dataset"])
  same_builder_config = run_builder is not None and run_builder == resolved_config_name(
      config["dataset"])
  refused = refused_changes(differences, completed_epochs=completed_epochs,
                            same_dataset=same_dataset, step_decay=step_decay,
                            same_builder_config=same_builder_config)
  if not same_dataset:
    refused.append(f"the prepared dataset: {dict(run_dataset)} -> {dict(dataset)} (the files "
                   "under manual_dir or the builder options differ from those trained on)")
  if refused:
    lines = "".join(f"\n  {line}" for line in refused)
    raise ConfigChangeError(
        f"This config changes what the run in {os.path.dirname(config_file)} was trained with "
        f"(epochs done: {completed_epochs}; {config_file} holds its config). Refused "
        f"change(s), old -> new:{lines}\nResume with the run's config (only num_epochs may grow, "
        f"and {', '.join(RESUMABLE_FIELDS)} may change), or give another --workdir to train "
        "anew. Nothing was written.")
  return differences


def record_config_change(workdir: str, completed_epochs: int, partial_step: int | None,
                         differences: Sequence[runs.Difference]) -> str:
  """Appends one line (time, epochs done, the global step of the mid-epoch checkpoint or null,
  each changed field's old and new value) to `<workdir>/config_history.jsonl`; returns its
  path."""
  path = os.path.join(workdir, CONFIG_HISTORY_FILE)
  record = {"time": _now(), "completed_epochs": completed_epochs,
            "partial_checkpoint_step": partial_step,
            "changes": [{"field": d.path, "old": _plain(d.run_value),
                         "new": _plain(d.given_value)} for d in differences]}
  with open(path, "a") as file:
    file.write(json.dumps(record, default=str) + "\n")
  return path


def _migrated_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A prepared_dataset.json record in today's form: one written while the phantoms' settings
  were config.dataset.phantoms ({'name', 'phantoms': settings}) becomes what `prepared_dataset`
  gives for those settings as builder options (version 1.0.0, the phantom builder's only one
  until then); any other record is returned as it is."""
  if "phantoms" not in record:
    return dict(record)
  dataset = {"name": record["name"], "builder": dict(record["phantoms"])}
  return {**prepared_dataset(dataset), "version": _PHANTOMS_VERSION_BEFORE_BUILDER_OPTIONS}


def read_prepared_dataset(workdir: str) -> dict[str, Any] | None:
  """`<workdir>/prepared_dataset.json` (an older form migrated, `_migrated_record`), or None for
  a run from before it was written."""
  path = os.path.join(workdir, PREPARED_DATASET_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as file:
    return _migrated_record(json.load(file))


def write_prepared_dataset(workdir: str, dataset: Mapping[str, Any]) -> str:
  """Writes `<workdir>/prepared_dataset.json`; returns its path."""
  path = os.path.join(workdir, PREPARED_DATASET_FILE)
  with open(path, "w") as file:
    json.dump(dict(dataset), file, indent=2)
  return path


def _nearest_existing(path: str) -> str:
  """`path` itself if it exists, else its closest ancestor that does."""
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _why_unwritable(directory: str) -> str | None:
  """Why no file can be created in the existing `directory` (a read-only mount, a virtual file
  system like /proc, no permission), or None when one can (checked by creating one)."""
  if os.statvfs(directory).f_flag & os.ST_RDONLY:
    return "it is on a read-only file system"
  probe = os.path.join(directory, f".medxai_write_test_{os.uname().nodename}_{os.getpid()}")
  try:
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except OSError as error:
    return f"no file can be created in it ({error.strerror})"
  os.remove(probe)
  return None


def prepare_workdir(workdir: str) -> str:
  """Absolute work directory, created if its parent exists; an error naming the path and what to
  do when it is a file, lies under a file, has no parent or cannot be written."""
  if not workdir:
    raise ValueError("--workdir is required.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  existing = _nearest_existing(workdir)
  if not os.path.isdir(existing):
    if existing == workdir:
      raise NotADirectoryError(f"--workdir={workdir!r} exists and is not a directory; give a "
                               "directory (or move the file away).")
    raise NotADirectoryError(f"--workdir={workdir!r} cannot be created: {existing!r} is a file, "
                             "not a directory; give a --workdir outside it.")
  if existing not in (workdir, parent):
    raise FileNotFoundError(f"The parent directory of --workdir={workdir!r} does not exist: "
                            f"{parent!r}. Create it first: mkdir -p {parent}")
  reason = _why_unwritable(existing)
  if reason:
    raise PermissionError(f"--workdir={workdir!r} cannot be written: {existing!r}: {reason}; "
                          "give a --workdir on a writable file system.")
  os.makedirs(workdir, exist_ok=True)
  return workdir
