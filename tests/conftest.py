"""Session-wide test settings."""

import os

import pytest

import tiny


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
