"""Session-wide test settings."""

import os

import pytest

from medxai_jax import runtime

# The suite runs under the binaries' XLA:CPU defaults (set here, before any test starts a JAX
# backend), so what a test computes in-process is what the binaries compute in subprocesses.
runtime.apply_xla_defaults()


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
