"""The real public radiographs in ../shared/real_radiographs, for tests that copy what they need.

shared/ is read-only, so tests copy files into a temporary directory. Without ../shared the tests
that need it skip with a message, unless $MEDXAI_REQUIRE_REAL=1 (CI sets it), which fails them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterable

import pytest

REAL_ROOT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "real_radiographs"


def real_root() -> pathlib.Path:
  """../shared/real_radiographs; skips the test (fails it under MEDXAI_REQUIRE_REAL=1) if absent."""
  if REAL_ROOT.is_dir():
    return REAL_ROOT
  message = (f"the real radiographs are not at {REAL_ROOT} (a clone without ../shared); "
             "CI sets MEDXAI_REQUIRE_REAL=1 and needs them")
  if os.environ.get("MEDXAI_REQUIRE_REAL") == "1":
    pytest.fail(message)
  pytest.skip(message)


def copy_real(relative: str, destination: os.PathLike | str,
              keep: Iterable[str] | None = None) -> pathlib.Path:
  """Copies real_radiographs/<relative> (a folder or file) to `destination`; returns the copy.

  keep: optional glob patterns (relative to the copied folder); only matching files are copied.
  Copies are writable, whatever the source's permissions.
  """
  source = real_root() / relative
  if not source.exists():
    raise FileNotFoundError(f"{source} does not exist (see {REAL_ROOT / 'README.md'}).")
  destination = pathlib.Path(destination)
  if source.is_file():
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    return destination
  patterns = list(keep) if keep is not None else ["**/*"]
  files = sorted({path for pattern in patterns for path in source.glob(pattern) if path.is_file()})
  if not files:
    raise FileNotFoundError(f"No file of {source} matches {patterns}.")
  for path in files:
    target = destination / path.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
  return destination
