r"""Train-step throughput of the custom CNN at the paper's size and at the demo size.

  python -m benchmarks.train_throughput [--steps=5] [--paper_batch_size=16]

Prints one JSON object: per setting, the jit compile time (lower + compile) and the images/s of
the compiled step after a warm-up step, with the device it ran on.
"""

import functools
import json
import time

from absl import flags
import jax
import numpy as np

from configs import chest_xray_custom_cnn
from configs import demo
from experiments import cli
from medxai_jax.models import base
from medxai_jax.train import components
from medxai_jax.train import steps

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per setting (after one warm-up step).")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch_size", 16, "Batch size at the paper's size.")
_DEMO_BATCH = flags.DEFINE_integer("demo_batch_size", 32, "Batch size at the demo size.")


def measure(config, batch_size: int, num_steps: int) -> dict:
  """Compile time and steady-state train-step throughput for a config's model and optimiser."""
  model, tx, preprocess = components.build_components(config)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  height, width, _ = model.input_shape
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, height, width, 1), dtype=np.uint8),
           "label": rng.integers(0, 2, batch_size).astype(np.int32),
           "weight": np.ones(batch_size, np.float32)}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  state, stats = compiled(state, batch)  # warm-up
  jax.block_until_ready(stats)
  start = time.perf_counter()
  for _ in range(num_steps):
    state, stats = compiled(state, batch)
  jax.block_until_ready(stats)
  seconds = (time.perf_counter() - start) / num_steps
  return {"input_shape": list(model.input_shape), "batch_size": batch_size,
          "num_parameters": base.parameter_count({"params": state.params}),
          "optimizer": config.optimizer.name, "compile_seconds": round(compile_seconds, 3),
          "step_ms": round(1000 * seconds, 2), "images_per_second": round(batch_size / seconds, 1)}


def main(argv):
  del argv
  result = {
      "benchmark": "train_throughput",
      "device": str(jax.devices()[0]), "device_count": jax.device_count(),
      "jax_version": jax.__version__, "timed_steps": _STEPS.value,
      "custom_cnn_paper": measure(chest_xray_custom_cnn.get_config(), _PAPER_BATCH.value,
                                  _STEPS.value),
      "custom_cnn_demo": measure(demo.get_config(), _DEMO_BATCH.value, _STEPS.value),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
