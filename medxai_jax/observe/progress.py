"""One progress helper for every long phase: log lines with done/total, rate and ETA.

    for image in progress.track(images, total=len(images), desc="explain"):
      ...

logs, through absl logging (so CI logs stay plain text: no carriage-return bars),

    explain: 3/40 (8%) | 1.52 items/s | elapsed 2s | ETA 24s

on the first update, then at most once every `every_seconds` (a steady cadence however fast
the items come), and always on the last item (or when the phase ends early). The rate is items
done since the start divided by the elapsed time; the ETA is the items left divided by it.
The clock and the log function can be injected (tests use a fake clock).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging

T = TypeVar("T")
DEFAULT_EVERY_SECONDS = 10.0


def format_duration(seconds: float) -> str:
  """'42s', '3m05s' or '2h07m' (rounded to whole seconds / minutes)."""
  if seconds != seconds or seconds < 0:  # NaN or negative
    return "?"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(desc: str, done: int, total: int | None, elapsed: float,
                  unit: str = "items") -> str:
  """The text of one progress line (the ETA and percentage only when `total` is known)."""
  rate = done / elapsed if elapsed > 0 else float("inf")
  rate_text = f"{rate:.3g} {unit}/s" if elapsed > 0 else f"- {unit}/s"
  if total is None:
    return f"{desc}: {done} {unit} | {rate_text} | elapsed {format_duration(elapsed)}"
  share = f" ({100 * done / total:.0f}%)" if total else ""
  eta = (total - done) / rate if done and elapsed > 0 else float("nan")
  return (f"{desc}: {done}/{total}{share} | {rate_text} | elapsed {format_duration(elapsed)} "
          f"| ETA {format_duration(eta) if done < total else '0s'}")


class Progress:
  """Counts the items of a phase and logs a progress line at a steady cadence.

  Use as a context manager (the final line is logged on exit) or call `close()`.
  """

  def __init__(self, total: int | None, desc: str, *, unit: str = "items",
               every_seconds: float = DEFAULT_EVERY_SECONDS,
               clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] | None = None):
    if total is not None and int(total) < 0:
      raise ValueError(f"total must be >= 0 (or None when unknown), got {total}.")
    if every_seconds < 0:
      raise ValueError(f"every_seconds must be >= 0, got {every_seconds}.")
    self.total = None if total is None else int(total)
    self.desc, self.unit, self.every_seconds = desc, unit, float(every_seconds)
    self._clock = clock
    self._log = log or (lambda line: logging.info("%s", line))
    self._start = clock()
    self._last_logged: float | None = None
    self._logged_done = -1
    self.done = 0
    self.closed = False

  @property
  def elapsed(self) -> float:
    """Seconds since the phase started."""
    return self._clock() - self._start

  def _emit(self) -> None:
    self._log(progress_line(self.desc, self.done, self.total, self.elapsed, self.unit))
    self._last_logged, self._logged_done = self._clock(), self.done

  def update(self, count: int = 1) -> None:
    """Marks `count` more items done; logs a line when one is due."""
    if self.closed:
      raise RuntimeError(f"Progress {self.desc!r} was closed; it takes no more updates.")
    if count < 0:
      raise ValueError(f"count must be >= 0, got {count}.")
    self.done += int(count)
    if self.total is not None and self.done > self.total:
      raise ValueError(f"{self.desc}: {self.done} items done of a total of {self.total}.")
    first = self._last_logged is None
    last = self.total is not None and self.done == self.total
    due = not first and self._clock() - self._last_logged >= self.every_seconds
    if first or last or due:
      self._emit()

  def close(self) -> None:
    """Logs the final line (unless the last update already did)."""
    if not self.closed and self._logged_done != self.done:
      self._emit()
    self.closed = True

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def track(iterable: Iterable[T], total: int | None = None, desc: str = "progress", *,
          unit: str = "items", every_seconds: float = DEFAULT_EVERY_SECONDS,
          clock: Callable[[], float] = time.monotonic,
          log: Callable[[str], None] | None = None) -> Iterator[T]:
  """The items of `iterable`, logging progress as each one is done (after the loop body ran
  for it). `total` defaults to len(iterable) when it has one."""
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)  # type: ignore[arg-type]
  with Progress(total, desc, unit=unit, every_seconds=every_seconds, clock=clock,
                log=log) as progress:
    for item in iterable:
      yield item
      progress.update()
