"""The binaries' XLA:CPU defaults as a binary sees them: set before JAX starts, only for the CPU,
the user's XLA_FLAGS winning (fresh processes through experiments.cli.run)."""

from __future__ import annotations

import os
import subprocess
import sys

import jaxlib

from medxai_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
