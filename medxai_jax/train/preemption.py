"""SIGTERM as a request to stop training at the next step, with a checkpoint, and exit 0.

Cluster schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM some seconds before they
kill a job. While `SigtermWatch` is active the signal only sets a flag; the training loop checks
it after each step, writes a checkpoint with its data position and raises `Preempted`, a
SystemExit with status 0, so the job ends cleanly and the next run continues from that step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import numpy as np

# Test hook: the loop sends itself SIGTERM after this global training step (1-based, counted
# over epochs as epoch * steps_per_epoch + step), so a test can preempt at a known step.
SIGTERM_AFTER_STEP_ENV = "MEDXAI_TEST_SIGTERM_AFTER_STEP"


class Preempted(SystemExit):
  """Training stopped on SIGTERM after writing a checkpoint; the exit status is 0."""

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message

  def __str__(self) -> str:
    return self.message


class SigtermWatch:
  """Context manager: while active, SIGTERM sets `requested` instead of ending the process.

  Signal handlers can only be installed from the main thread; elsewhere (a training loop run in
  a worker thread) the watch is inactive and SIGTERM keeps its usual effect.
  """

  def __init__(self):
    self.requested = False
    self._previous: Any = None
    self._installed = False

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  def __enter__(self) -> "SigtermWatch":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def agreed(self, process_count: int) -> bool:
    """Whether any process was asked to stop (a collective on several processes: call it at
    the same step on all of them)."""
    if process_count == 1:
      return self.requested
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
    return bool(np.asarray(flags).max())


def hooked_sigterm_step() -> int | None:
  """The step of `SIGTERM_AFTER_STEP_ENV`, or None when it is not set."""
  value = os.environ.get(SIGTERM_AFTER_STEP_ENV, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${SIGTERM_AFTER_STEP_ENV}={value!r} is not an integer step.") from None


def send_sigterm_to_self() -> None:
  """Sends SIGTERM to this process (the test hook's preemption)."""
  os.kill(os.getpid(), signal.SIGTERM)
