"""The environment of a test's subprocess that runs JAX on N forced CPU devices (no JAX import
here: a worker side sets nothing before its own first `import jax`)."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def forced_cpu_environment(devices: int) -> dict[str, str]:
  """os.environ with JAX on the CPU split into `devices` devices (any device count flag of the
  caller's XLA_FLAGS replaced) and the repository on PYTHONPATH."""
  env = dict(os.environ)
  kept = [flag for flag in env.get("XLA_FLAGS", "").split()
          if not flag.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  return env
