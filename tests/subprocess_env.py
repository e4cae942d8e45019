"""The environment of a test's subprocess that runs JAX on N forced CPU devices (no JAX import
here: a worker side sets nothing before its own first `import jax`)."""

from __future__ import annotations

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def forced_cpu_environment(devices: int) -> dict[str, str]:
  """os.environ with JAX on the CPU split into `devices` devices (any device count flag of the
  caller's XLA_FLAGS replaced), and the repository and tests/ (the shared helpers: tiny, ...) on
  PYTHONPATH, so a test file run as a script from its subfolder imports what it imports."""
  env = dict(os.environ)
  kept = [flag for flag in env.get("XLA_FLAGS", "").split()
          if not flag.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
  return env
