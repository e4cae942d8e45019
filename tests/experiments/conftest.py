"""The runs the binaries' end-to-end tests share: one per session (each costs a training), so
the demo run and the overridden run are trained once whichever test files use them."""

import pytest

from binaries import DEMO_TINY
from binaries import OVERRIDDEN_TINY
from binaries import TINY
from binaries import run


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The TFDS data dir of the binaries, for the session (it overrides tests/conftest.py's one per
  file, as the session runs below prepare their phantoms in it)."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, data_dir):
  """`experiments.demo` on TINY settings: (its workdir, its CompletedProcess)."""
  workdir = tmp_path_factory.mktemp("runs") / "demo"
  result = run("experiments.demo", f"--workdir={workdir}", *TINY, *DEMO_TINY, data_dir=data_dir)
  return workdir, result


@pytest.fixture(scope="session")
def overridden_run(tmp_path_factory, data_dir):
  """`experiments.train` with OVERRIDDEN_TINY: its workdir."""
  workdir = tmp_path_factory.mktemp("runs") / "overridden"
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={workdir}",
               *OVERRIDDEN_TINY, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
