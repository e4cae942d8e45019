"""Each phase's wall time and compilation time: `<workdir>/timings.json`.

    {"phases": {"train/steps": {"wall_seconds": 81.2, "compile_seconds": 6.1}, ...}}

A phase is recorded again under the same name when it runs again (the newest run wins).
Compilation seconds are estimates where JAX gives no count: for training, each compiled step's
first call minus the steady time of a step (`compile_estimate`); for jitted methods, the first
call minus the second (explain / evaluate_explanations' `compile_seconds`). None: not measured.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging

from medxai_jax.observe import progress
from medxai_jax.train import metrics

TIMINGS_FILE = "timings.json"


def compile_estimate(first_call_seconds: float, steady_seconds: float | None) -> float | None:
  """Compilation time of a jitted call: its first call minus a steady call (>= 0); None
  without a steady time."""
  if steady_seconds is None:
    return None
  return max(0.0, float(first_call_seconds) - float(steady_seconds))


def read_timings(workdir: str) -> dict[str, dict[str, Any]]:
  """The recorded phases (name -> fields) of `workdir`, {} when none were recorded."""
  path = os.path.join(workdir, TIMINGS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as file:
    data = json.load(file)
  phases = data.get("phases") if isinstance(data, dict) else None
  if not isinstance(phases, dict):
    raise ValueError(f"{path} holds no 'phases' object.")
  return phases


def record_phase(workdir: str, phase: str, *, wall_seconds: float,
                 compile_seconds: float | None = None, **details: Any) -> str:
  """Adds (or replaces) `phase` in `<workdir>/timings.json`; returns its path."""
  if not phase:
    raise ValueError("phase must be a non-empty name.")
  if not wall_seconds >= 0:
    raise ValueError(f"wall_seconds of phase {phase!r} must be >= 0, got {wall_seconds}.")
  phases = read_timings(workdir)
  phases[phase] = {"wall_seconds": float(wall_seconds),
                   "compile_seconds": None if compile_seconds is None else float(compile_seconds),
                   **details}
  path = os.path.join(workdir, TIMINGS_FILE)
  metrics.write_json(path, {"phases": phases}, indent=1)
  return path


def phase_rows(phases: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
  """[phase, wall seconds, compile seconds, wall minus compile] rows in recorded order."""
  rows = []
  for name, fields in phases.items():
    wall, compile_ = fields.get("wall_seconds"), fields.get("compile_seconds")
    rows.append([name, wall, "-" if compile_ is None else compile_,
                 "-" if compile_ is None or wall is None else wall - compile_])
  return rows


class PhaseSequence:
  """Times consecutive phases of a binary without nesting its code in `with` blocks:

      phases = timing.PhaseSequence(workdir, "demo", total=3)
      phases.start("train"); ...
      phases.start("explain"); ...; phases.compile_seconds = 2.1   # of the running phase
      phases.start("report"); ...
      phases.finish()

  Starting a phase ends the running one, records it as '<prefix>/<name>' in timings.json
  (`enabled` False: nothing is recorded) and logs a progress line (phases done of `total`,
  rate, ETA) through `progress.Progress`.
  """

  def __init__(self, workdir: str, prefix: str, total: int, *, enabled: bool = True,
               clock: Callable[[], float] = time.perf_counter,
               log: Callable[[str], None] | None = None):
    self.workdir, self.prefix, self.enabled = workdir, prefix, enabled
    self._clock = clock
    self._progress = progress.Progress(total, prefix, unit="phases", every_seconds=0.0,
                                       clock=clock, log=log)
    self.current: str | None = None
    self.compile_seconds: float | None = None
    self._started = 0.0

  def _end_current(self) -> None:
    if self.current is None:
      return
    if self.enabled:
      record_phase(self.workdir, f"{self.prefix}/{self.current}",
                   wall_seconds=self._clock() - self._started,
                   compile_seconds=self.compile_seconds)
    self.current, self.compile_seconds = None, None
    self._progress.update()

  def start(self, name: str) -> None:
    """Ends the running phase (if any) and starts `name`."""
    self._end_current()
    logging.info("%s: %s (phase %d of %s).", self.prefix, name, self._progress.done + 1,
                 self._progress.total)
    self.current, self._started = name, self._clock()

  def finish(self) -> None:
    """Ends the running phase."""
    self._end_current()
    self._progress.close()
