"""The environment of a test's subprocess that runs JAX on N forced CPU devices (no JAX import
here: a worker side sets nothing before its own first `import jax`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

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


def spawn(script: str, devices: int, *args: str) -> subprocess.Popen:
  """`python script *args` on `devices` forced CPU devices, its output captured."""
  return subprocess.Popen([sys.executable, os.path.abspath(script), *args],
                          env=forced_cpu_environment(devices), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_json(processes: list[subprocess.Popen], timeout: float = 300) -> list[dict[str, Any]]:
  """The JSON each process printed last, in order; a failed process's stderr fails the test
  (and a timeout kills them all)."""
  outputs = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      raise
    assert process.returncode == 0, stderr[-6000:]
    outputs.append(json.loads(stdout.strip().splitlines()[-1]))
  return outputs


def free_port() -> int:
  """A localhost port free now (the coordinator of a multi-process test)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
