"""medxai_jax.runtime: the persistent compilation cache and the XLA defaults of the binaries."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
from jax._src import monitoring
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

import subprocess_env
from medxai_jax import runtime

REPO = subprocess_env.REPO


@pytest.fixture
def restore_cache_config():
  """Puts JAX's cache settings back as they were (this process had no cache)."""
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_enable_compilation_cache",
      "jax_persistent_cache_min_compile_time_secs")}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()


def _fresh_program(offset: float) -> jax.Array:
  """Compiles and runs a program no other test compiles (its constant is the offset)."""
  return jax.jit(lambda x: jnp.tanh(x) * 2.5 + offset)(jnp.arange(6.0))


def _entries(directory) -> list[str]:
  return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def test_default_dir_precedence(tmp_path):
  home = os.path.expanduser("~")
  assert runtime.default_cache_dir({}) == os.path.join(home, ".cache", "medxai_jax", "jax_cache")
  assert runtime.default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/medxai_jax/jax_cache"
  assert runtime.default_cache_dir({"XDG_CACHE_HOME": "/x/cache", "MEDXAI_CACHE_DIR": "/m"}) == "/m"
  # Empty variables count as unset.
  assert runtime.default_cache_dir({"XDG_CACHE_HOME": "", "MEDXAI_CACHE_DIR": ""}) == (
      os.path.join(home, ".cache", "medxai_jax", "jax_cache"))
  environ = {"MEDXAI_CACHE_DIR": str(tmp_path / "m")}
  assert runtime.resolve_cache_dir("default", environ) == str(tmp_path / "m")
  assert runtime.resolve_cache_dir(str(tmp_path / "given"), environ) == str(tmp_path / "given")
  assert runtime.resolve_cache_dir("~/c", {}) == os.path.join(home, "c")
  for off in ("none", "NONE", "off", "false", "0", "", None):
    assert runtime.resolve_cache_dir(off, environ) is None


def test_suite_cache_is_not_in_home():
  # tests/conftest.py sends the binaries run by the suite to a tmp dir, never ~/.cache.
  assert not runtime.default_cache_dir().startswith(os.path.expanduser("~/.cache"))


def test_cache_writes_entries_and_a_recompile_reads_them(tmp_path, restore_cache_config):
  directory = str(tmp_path / "cache")
  assert runtime.enable_compilation_cache(directory, min_compile_seconds=0) == directory
  expected = np.tanh(np.arange(6.0)) * 2.5 + 0.125
  np.testing.assert_allclose(_fresh_program(0.125), expected, rtol=1e-6)
  written = _entries(directory)
  assert written, "the jitted program was not written to the cache"
  hits = []
  listener = lambda event, **kwargs: hits.append(event)  # noqa: E731
  monitoring.register_event_listener(listener)
  try:
    jax.clear_caches()  # forget the in-memory executables: the next call compiles or reads disk
    np.testing.assert_allclose(_fresh_program(0.125), expected, rtol=1e-6)
  finally:
    monitoring.unregister_event_listener(listener)
  assert "/jax/compilation_cache/cache_hits" in hits
  assert _entries(directory) == written  # read back, nothing new written


def test_off_writes_nothing_and_a_new_dir_takes_over(tmp_path, restore_cache_config):
  first, second = str(tmp_path / "first"), str(tmp_path / "second")
  runtime.enable_compilation_cache(first, min_compile_seconds=0)
  _fresh_program(0.25)
  count = len(_entries(first))
  assert count > 0
  assert runtime.enable_compilation_cache(None) is None
  assert not jax.config.jax_enable_compilation_cache
  _fresh_program(0.375)
  assert len(_entries(first)) == count
  runtime.enable_compilation_cache(second, min_compile_seconds=0)
  _fresh_program(0.5)
  assert _entries(second) and len(_entries(first)) == count


def test_unwritable_dir_is_a_clear_error(tmp_path, restore_cache_config):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="--compilation_cache=.*a_file"):
    runtime.enable_compilation_cache(str(blocker / "cache"))
  with pytest.raises(ValueError, match="min_compile_seconds"):
    runtime.enable_compilation_cache(str(tmp_path / "ok"), min_compile_seconds=-1)


def test_user_xla_flags_win_over_defaults():
  defaults = ("--xla_cpu_a=1", "--xla_cpu_b=x,y")
  assert runtime.merged_xla_flags("", defaults) == "--xla_cpu_a=1 --xla_cpu_b=x,y"
  assert runtime.merged_xla_flags("--xla_cpu_b=-z --other", defaults) == (
      "--xla_cpu_b=-z --other --xla_cpu_a=1")
  assert runtime.flag_name("--xla_cpu_b=x,y") == "xla_cpu_b"


def test_xla_defaults_switch_and_version_gate(monkeypatch):
  monkeypatch.setitem(runtime.CPU_XLA_DEFAULTS, jaxlib.__version__, ("--xla_cpu_a=1",))
  assert runtime.xla_defaults({}) == ("--xla_cpu_a=1",)
  for off in ("0", "false", "no", "off"):
    assert runtime.xla_defaults({"MEDXAI_XLA_DEFAULTS": off}) == ()
  environ = {"XLA_FLAGS": "--xla_mine=2"}
  assert runtime.apply_xla_defaults(environ) == "--xla_mine=2 --xla_cpu_a=1"
  assert environ["XLA_FLAGS"] == "--xla_mine=2 --xla_cpu_a=1"
  untouched = {"XLA_FLAGS": "--xla_mine=2", "MEDXAI_XLA_DEFAULTS": "0"}
  assert runtime.apply_xla_defaults(untouched) == "--xla_mine=2"
  monkeypatch.delitem(runtime.CPU_XLA_DEFAULTS, jaxlib.__version__)
  assert runtime.xla_defaults({}) == ()  # a jaxlib the defaults were not measured on


def test_xla_defaults_after_backend_start_raise(monkeypatch):
  jnp.ones(1).block_until_ready()  # this process has a backend now
  monkeypatch.setitem(runtime.CPU_XLA_DEFAULTS, jaxlib.__version__, ("--xla_cpu_late=1",))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv("MEDXAI_XLA_DEFAULTS", raising=False)
  with pytest.raises(RuntimeError, match="after JAX had started a backend"):
    runtime.apply_xla_defaults()
  assert os.environ["XLA_FLAGS"] == ""


def test_installed_jaxlib_accepts_the_defaults():
  # An XLA flag the jaxlib does not know aborts the process: run the defaults in a fresh one.
  code = ("from medxai_jax import runtime; runtime.apply_xla_defaults(); import os; "
          "import jax.numpy as jnp; assert float(jnp.ones(3).sum()) == 3.0; "
          "print(os.environ.get('XLA_FLAGS', ''))")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MEDXAI_XLA_DEFAULTS")}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == list(runtime.xla_defaults({}))


# --- test_xla_defaults.py
# The binaries' XLA:CPU defaults as a binary sees them: set before JAX starts, only for the CPU,
# the user's XLA_FLAGS winning (fresh processes through experiments.cli.run).


REPO = subprocess_env.REPO
YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# A binary: its main computes on the backend XLA started with, then prints the flags it read.
BINARY = ("import os, jax.numpy as jnp\n"
          "from experiments import cli\n"
          "def main(argv):\n"
          "  assert float(jnp.ones(3).sum()) == 3.0\n"
          "  print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))\n"
          "cli.run(main)\n")


def _binary_flags(**variables: str) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MEDXAI_XLA_DEFAULTS")}
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **variables})
  result = subprocess.run([sys.executable, "-c", BINARY, "--compilation_cache=none"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  line = [row for row in result.stdout.splitlines() if row.startswith("XLA_FLAGS=")][-1]
  return line[len("XLA_FLAGS="):].split()


def test_a_binary_on_the_cpu_starts_with_the_defaults():
  assert _binary_flags() == list(runtime.CPU_XLA_DEFAULTS.get(jaxlib.__version__, ()))


def test_the_users_xla_flags_win_and_the_switch_turns_them_off():
  mine = f"--{YNN_FLAG}=individual_convolution"  # convolutions back on YNNPACK
  assert _binary_flags(XLA_FLAGS=f"{mine} --xla_cpu_enable_fast_math=false") == [
      mine, "--xla_cpu_enable_fast_math=false"]
  assert _binary_flags(XLA_FLAGS="--xla_cpu_enable_fast_math=false",
                       MEDXAI_XLA_DEFAULTS="0") == ["--xla_cpu_enable_fast_math=false"]


def test_no_defaults_when_the_cpu_is_not_a_platform():
  cpu = {"JAX_PLATFORMS": "cpu"}
  assert runtime.cpu_backend_possible({}) and runtime.cpu_backend_possible(cpu)
  assert runtime.cpu_backend_possible({"JAX_PLATFORMS": "cuda, CPU"})
  assert not runtime.cpu_backend_possible({"JAX_PLATFORMS": "cuda"})
  assert runtime.xla_defaults({"JAX_PLATFORMS": "tpu"}) == ()
  assert runtime.xla_defaults(cpu) == runtime.CPU_XLA_DEFAULTS.get(jaxlib.__version__, ())
