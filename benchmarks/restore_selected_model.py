r"""Seconds to load a run's selected model: `selected_model/` (what inference reads) against the
whole training state of `checkpoints/best` (what it read before: optimiser built, state
initialised, then restored into that template).

  python -m benchmarks.restore_selected_model [--config=demo] [--repeats=3]

Writes a run directory (config.json, the demo model's or DenseNet-121's random weights saved both
ways) in a temporary folder and prints one JSON object: mean seconds of each way over
`--repeats` loads in this process (the first, which includes imports and tracing, separately),
with the device.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import ml_collections

from benchmarks import common
from configs import demo
from medxai_jax import runs
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import steps

_CONFIG = flags.DEFINE_enum("config", "demo", ["demo", "densenet121"],
                            "The model: the demo's custom CNN (96 px) or DenseNet-121 (224 px).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed loads of each way after the first.")


def _config():
  """The demo config, or the same with DenseNet-121 at 224 px."""
  config = demo.get_config()
  if _CONFIG.value == "densenet121":
    config.model = ml_collections.ConfigDict(dict(name="densenet", depth=121, num_outputs=1,
                                                  input_shape=(224, 224, 1)))
  return config


def _write_run(config, run_dir: str) -> None:
  """config.json, selected_model/ and checkpoints/best of one set of random weights."""
  with open(runs.config_path(run_dir), "w") as file:
    file.write(config.to_json_best_effort(indent=2))
  model, tx, _ = components.build_components(config, compute_dtype="float32")
  variables = common.random_variables(model)
  checkpoint.save_variables(os.path.join(run_dir, runs.SELECTED_MODEL_DIR), variables,
                            {"selected_epoch": 1})
  state = jax.eval_shape(lambda key: steps.create_train_state(model, tx, key), jax.random.key(0))
  state = state.replace(params=variables["params"],
                        batch_stats=variables.get("batch_stats", {}),
                        opt_state=jax.tree_util.tree_map(
                            lambda leaf: jax.numpy.zeros(leaf.shape, leaf.dtype),
                            state.opt_state),
                        step=jax.numpy.zeros((), jax.numpy.int32),
                        rng=jax.numpy.zeros(state.rng.shape, state.rng.dtype))
  store = checkpoint.CheckpointStore(os.path.join(run_dir, "checkpoints"))
  store.save_best(1, state, {"loop": {}, "record": {}})
  store.close()


def _from_train_state(config, run_dir: str):
  """The earlier way: optimiser, an initialised train state, then checkpoints/best into it."""
  model, tx, _ = components.build_components(config, compute_dtype="float32")
  template = steps.create_train_state(model, tx, jax.random.key(config.seed))
  store = checkpoint.CheckpointStore(os.path.join(run_dir, "checkpoints"))
  state, _ = store.restore_best(template)
  store.close()
  return state.variables


def _seconds(load, repeats: int) -> dict:
  """First-call and mean later-call seconds of `load()` (outputs blocked on)."""
  start = time.perf_counter()
  jax.block_until_ready(load())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(load())
  return {"first_seconds": round(first, 3),
          "mean_seconds": round((time.perf_counter() - start) / repeats, 3)}


def main(argv):
  del argv
  config = _config()
  with tempfile.TemporaryDirectory() as run_dir:
    _write_run(config, run_dir)
    selected = _seconds(
        lambda: runs.restore_selected_model(config, run_dir).variables, _REPEATS.value)
    train_state = _seconds(lambda: _from_train_state(config, run_dir), _REPEATS.value)
  print(json.dumps({
      "benchmark": "restore_selected_model", "device": str(jax.devices()[0]),
      "jax_version": jax.__version__, "model": dict(config.model),
      "input_shape": list(config.model.input_shape), "repeats": _REPEATS.value,
      "selected_model": selected, "checkpoints_best_train_state": train_state}, indent=2))


if __name__ == "__main__":
  app.run(main)
