"""Session-wide test settings and the fixtures shared across test files.

Layout: tests/ mirrors the code. `tests/<path>/test_<module>.py` tests
`medxai_jax/<path>/<module>.py` (tests/attribution/test_integrated.py, tests/data/test_pipeline.py,
tests/data/builders/test_mura.py, tests/train/test_loop.py, tests/test_runs.py) and
`tests/<path>/test_<package>.py` what a package's __init__ holds (tests/data/test_builders.py,
tests/test_observe.py); `tests/experiments/test_<binary>.py` runs experiments/<binary>.py end to end
(the binaries' shared runs: tests/experiments/conftest.py), `tests/benchmarks/test_<name>.py`
smoke-tests benchmarks/<name>.py, and tests/test_configs.py checks configs/. A test of several
modules goes with the module it is about; tests/test_layout.py fails on a file that mirrors
nothing (its short allow-list gives each exception's reason).

Basenames repeat across folders, so pytest imports test files by path (`--import-mode=importlib`,
pyproject.toml), with tests/ on sys.path for the helpers every file may import: `tiny` (tiny
configs and models), `real_data` (copies of ../shared/real_radiographs), `subprocess_env` (the
repository root, forced-CPU subprocess environments), `binaries` (the binaries' tiny flags),
`fake_folders` (fake collections for the builders) and `resumption` (a tiny run stopped and
resumed). A fixture used by several files is defined once, here or in its folder's conftest.py;
an expensive one that files share is session-scoped so that it is computed once per worker.
"""

import os

import pytest

from medxai_jax import runtime

# The suite runs under the binaries' XLA:CPU defaults (set here, before any test starts a JAX
# backend), so what a test computes in-process is what the binaries compute in subprocesses.
runtime.apply_xla_defaults()

import tiny  # noqa: E402  (after the XLA defaults)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_in_tmp(tmp_path_factory):
  """Points the binaries' default compilation cache (run in subprocesses) at a session tmp dir,
  so the suite never writes to ~/.cache."""
  previous = os.environ.get("MEDXAI_CACHE_DIR")
  os.environ["MEDXAI_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  if previous is None:
    os.environ.pop("MEDXAI_CACHE_DIR", None)
  else:
    os.environ["MEDXAI_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def one_logit():
  """A tiny one-logit (sigmoid) DenseNet on 32-px grey images and its variables."""
  return tiny.initialised_densenet(1)


@pytest.fixture(scope="session")
def three_class():
  """A tiny 3-class (softmax) DenseNet on 32-px grey images and its variables."""
  return tiny.initialised_densenet(3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data dir for one test file (its phantoms are prepared once per file)."""
  return str(tmp_path_factory.mktemp("tfds"))
