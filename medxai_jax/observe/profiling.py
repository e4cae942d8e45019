"""A `jax.profiler` trace of chosen training steps: `config.profile_steps='a,b'`.

The trace starts before global step a and stops after step b has finished on the device
(steps count from 1, as `state.step` after them). It is written to
`<workdir>/profile/plugins/profile/<timestamp>/` as `<host>.xplane.pb` (TensorBoard's profile
plugin / XProf: `pip install tensorboard-plugin-profile` or `xprof`, then
`tensorboard --logdir <workdir>/profile` or `xprof --logdir <workdir>/profile`, Profile tab)
and `<host>.trace.json.gz` (open it at https://ui.perfetto.dev or chrome://tracing).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax

PROFILE_DIR = "profile"


def parse_steps(spec: Any, name: str = "config.profile_steps") -> tuple[int, int] | None:
  """(first, last) from 'a,b', 'a' (one step) or a pair; None for '' / None / ()."""
  if spec is None or spec == "" or spec == ():
    return None
  parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
  try:
    values = [int(p) for p in parts]
  except (TypeError, ValueError):
    raise ValueError(f"{name}={spec!r} must be 'first,last' step numbers (e.g. '10,15') or one "
                     "step ('10').") from None
  if len(values) == 1:
    values = values * 2
  if len(values) != 2 or not 1 <= values[0] <= values[1]:
    raise ValueError(f"{name}={spec!r} must be two step numbers 1 <= first <= last (e.g. "
                     "'10,15').")
  return values[0], values[1]


class StepProfiler:
  """Starts the trace before step `first` and stops it after step `last` (or on close)."""

  def __init__(self, directory: str, steps: tuple[int, int] | None):
    self.directory = directory
    self.steps = steps
    self.active = False
    self.done = False

  def before_step(self, step: int) -> None:
    """Call before running global step `step` (1-based)."""
    if self.steps is None or self.active or self.done:
      return
    first, last = self.steps
    if first <= step <= last:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("Profiling steps %d..%d into %s.", step, last, self.directory)

  def after_step(self, step: int, outputs: Any) -> None:
    """Call after dispatching step `step` with its outputs; stops the trace after `last`."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    """Stops a running trace (it is written then)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.done = False, True
      logging.info("Profile written to %s (open with TensorBoard's profile plugin or "
                   "https://ui.perfetto.dev).", self.directory)

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.stop()
