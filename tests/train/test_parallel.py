"""Data parallelism on forced host devices: 4 devices compute what 1 device computes.

JAX fixes its device count when it starts, so the multi-device checks run this file as a script
in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N (and, for the multi-host
check, two processes joined by jax.distributed); the pytest process itself keeps one device.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import subprocess_env

REPO = subprocess_env.REPO
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32, different summation order across devices


def tiny_config(data_dir: str, **overrides):
  """A small custom CNN with BatchNorm on 48 px phantoms (a few seconds an epoch on a CPU).

  SGD, not Adam: a conv bias in front of BatchNorm has a gradient that is float noise (BatchNorm
  removes the bias), and Adam turns noise into steps of +-lr whose sign depends on the summation
  order, so Adam runs agree in their losses but not in those biases.
  """
  import ml_collections

  from configs import demo

  config = demo.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.builder.update(dict(image_size=48, num_train=96, num_validation=32,
                                     num_test=32))
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                           dense_widths=(16, 16), use_batchnorm=True))
  config.optimizer = ml_collections.ConfigDict(dict(name="sgd", momentum=0.9))
  config.learning_rate = 0.05
  config.batch_size = 16
  config.eval_batch_size = 10  # rounded up to 12 on 4 devices; 32 examples -> padded batches
  config.num_epochs = 2
  config.log_every_steps = 3
  config.augment.update(dict(flip=True, rotation_degrees=10.0))
  config.update(overrides)
  return config


# ------------------------------------------------------------------------------------------------
# Worker side: runs in a subprocess whose JAX sees several (forced) host devices.
# ------------------------------------------------------------------------------------------------


def _random_batches(count: int, size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Batches of 48 px uint8 images; the last one has 3 padding rows (weight 0)."""
  rng = np.random.default_rng(seed)
  batches = []
  for index in range(count):
    labels = rng.integers(0, 2, size).astype(np.int32)
    images = rng.integers(0, 80, (size, 48, 48, 1))
    images[labels == 1, 12:30, 14:34] += 120
    weight = np.ones(size, np.float32)
    if index == count - 1:
      weight[-3:] = 0.0
    batches.append({"image": images.astype(np.uint8), "label": labels, "weight": weight})
  return batches


def _train_steps(config, devices, batches, accumulation_steps: int = 1, augment: bool = False
                 ) -> dict[str, Any]:
  """Losses and the final state of the loop's jitted step on a mesh over `devices`."""
  import jax

  from medxai_jax.data import augment as augment_lib
  from medxai_jax.train import components, parallel, steps

  model, tx, preprocess = components.build_components(config)
  mesh = parallel.make_mesh(devices)
  replicated = parallel.replicated_sharding(mesh)
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, preprocess=preprocess,
      augment=augment_lib.make_augment_fn(config.augment) if augment else None,
      accumulation_steps=accumulation_steps),
      in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=(replicated, replicated), donate_argnums=0)
  state = parallel.replicate(steps.create_train_state(model, tx, jax.random.key(0)), mesh)
  losses = []
  for batch in batches:
    sharded = parallel.shard_batch(batch, mesh)
    assert len(sharded["image"].sharding.device_set) == len(devices)
    state, stats = step(state, sharded)
    losses.append(float(stats["loss"]))
  assert len(state.params["conv1"]["kernel"].sharding.device_set) == len(devices)
  return {"losses": losses, "state": jax.device_get(state)}


def _max_difference(a: Any, b: Any) -> float:
  """Largest |a - b| over the leaves of two pytrees (relative to 1 + |b|)."""
  import jax

  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                                / (1.0 + np.abs(np.asarray(y, np.float64))), initial=0.0)), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def _worker_steps(data_dir: str) -> dict[str, Any]:
  """1 vs 4 devices: train steps, BatchNorm statistics, accumulation, batch-size errors."""
  import flax.linen as nn
  import jax

  from medxai_jax.train import parallel

  devices = jax.devices()
  assert len(devices) == 4, devices
  result: dict[str, Any] = {"device_count": len(devices)}
  batches = _random_batches(2, 16)

  # Train steps with BatchNorm, dropout and augmentation: 4 devices == 1 device.
  config = tiny_config(data_dir)
  config.model.dropout_rate = 0.3
  one = _train_steps(config, devices[:1], batches)
  four = _train_steps(config, devices, batches)
  result["steps_losses_1"], result["steps_losses_4"] = one["losses"], four["losses"]
  result["steps_param_diff"] = _max_difference(four["state"].params, one["state"].params)
  result["steps_batch_stats_diff"] = _max_difference(four["state"].batch_stats,
                                                     one["state"].batch_stats)
  result["steps_opt_state_diff"] = _max_difference(four["state"].opt_state,
                                                   one["state"].opt_state)
  result["steps_param_change"] = _max_difference(
      four["state"].params, _train_steps(config, devices[:1], [])["state"].params)

  # Gradient accumulation (no BatchNorm): 4 devices x 2 micro-batches == 1 device, 1 step.
  plain = tiny_config(data_dir)
  plain.model.use_batchnorm = False
  whole = _train_steps(plain, devices[:1], batches)
  accumulated = _train_steps(plain, devices, batches, accumulation_steps=2)
  result["accumulation_losses"] = [accumulated["losses"], whole["losses"]]
  result["accumulation_param_diff"] = _max_difference(accumulated["state"].params,
                                                      whole["state"].params)

  # BatchNorm in training mode on a sharded batch: the global batch's statistics.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  x += np.repeat(np.arange(4.0, dtype=np.float32), 8)[:, None] * 3.0  # shards differ
  norm = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = norm.init(jax.random.key(0), x[:2])

  def apply(variables, x):
    return norm.apply(variables, x, mutable=["batch_stats"])

  mesh = parallel.make_mesh(devices)
  sharded_x = jax.device_put(x, parallel.batch_sharding(mesh))
  y, updates = jax.jit(apply, in_shardings=(parallel.replicated_sharding(mesh),
                                            parallel.batch_sharding(mesh)))(
      parallel.replicate(variables, mesh), sharded_x)
  mean, var = x.mean(axis=0), x.var(axis=0)
  stats = jax.device_get(updates["batch_stats"])
  result["bn_mean_diff"] = float(np.abs(stats["mean"] - 0.1 * mean).max())
  result["bn_var_diff"] = float(np.abs(stats["var"] - (0.9 + 0.1 * var)).max())
  result["bn_output_diff"] = float(np.abs(np.asarray(y) - (x - mean) / np.sqrt(var + 1e-5)).max())
  shard_var = np.stack([x[8 * d:8 * d + 8].var(axis=0) for d in range(4)]).mean(axis=0)
  result["bn_per_shard_var_gap"] = float(np.abs(0.9 + 0.1 * shard_var - stats["var"]).max())
  result["output_sharding_devices"] = len(y.sharding.device_set)

  # Batch sizes that do not split over the devices.
  errors = {}
  for name, call in {
      "batch": lambda: parallel.check_batch_size(18, mesh),
      "micro": lambda: parallel.check_batch_size(16, mesh, accumulation_steps=8),
      "shard": lambda: parallel.shard_batch({"label": np.zeros(6)}, mesh)}.items():
    try:
      call()
      errors[name] = None
    except ValueError as error:
      errors[name] = str(error)
  result["errors"] = errors
  result["eval_batch_rounded"] = parallel.round_up_batch_size(10, mesh)
  return result


def _worker_bad_batch(data_dir: str, workdir: str) -> dict[str, Any]:
  """train_and_evaluate with a batch size that 4 devices cannot share."""
  from medxai_jax.train import loop

  try:
    loop.train_and_evaluate(tiny_config(data_dir, batch_size=18), workdir)
  except ValueError as error:
    return {"error": str(error), "workdir_created": os.path.exists(workdir)}
  return {"error": None}


def _worker_four(data_dir: str, workdir: str) -> dict[str, Any]:
  """Everything that runs on 4 devices in one process (one interpreter start)."""
  return {"steps": _worker_steps(data_dir),
          "bad_batch": _worker_bad_batch(data_dir, workdir + "_bad"),
          "train": _worker_train(data_dir, workdir)}


def _worker_train(data_dir: str, workdir: str) -> dict[str, Any]:
  """train_and_evaluate on every device of this process (or of all processes)."""
  import jax

  from medxai_jax.train import loop

  result = loop.train_and_evaluate(tiny_config(data_dir), workdir)
  history_path = os.path.join(workdir, "history.jsonl")
  history = []
  if os.path.exists(history_path):
    with open(history_path) as f:
      history = [json.loads(line) for line in f]
  return {"metrics": result, "history": history, "process_index": jax.process_index()}


def _worker_main(argv: list[str]) -> None:
  """Entry point of the subprocesses: `test_parallel.py SCENARIO ARGS...` prints one JSON line."""
  scenario, args = argv[0], argv[1:]
  if scenario == "multihost":
    from medxai_jax.train import parallel

    address, num_processes, process_id = args[0], int(args[1]), int(args[2])
    assert parallel.initialize_distributed(address, num_processes, process_id)
    result = _worker_train(*args[3:])
  else:
    result = {"four": _worker_four, "train": _worker_train}[scenario](*args)
  print(json.dumps(result, default=float))


# ------------------------------------------------------------------------------------------------
# Test side.
# ------------------------------------------------------------------------------------------------


def _parse(output: subprocess.CompletedProcess) -> dict[str, Any]:
  assert output.returncode == 0, output.stderr[-6000:]
  return json.loads(output.stdout.strip().splitlines()[-1])


def run_worker(scenario: str, *args: str, devices: int = 4) -> dict[str, Any]:
  """Runs a worker scenario in a fresh interpreter with `devices` host devices."""
  output = subprocess.run([sys.executable, os.path.abspath(__file__), scenario, *args],
                          env=subprocess_env.forced_cpu_environment(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  return _parse(output)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id):
  """A directory of this test session that every pytest-xdist worker sees."""
  if worker_id == "master":
    return tmp_path_factory.mktemp("parallel")
  directory = tmp_path_factory.getbasetemp().parent / "parallel"
  directory.mkdir(exist_ok=True)
  return directory


def _computed_once(shared_dir, name: str, produce) -> dict[str, Any]:
  """`produce()` (JSON) computed by the first xdist worker that asks; the others read it."""
  path = shared_dir / f"{name}.json"
  with open(shared_dir / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not path.exists():
      path.write_text(json.dumps(produce(), default=float))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def data_dir(shared_dir):
  return str(shared_dir / "tfds")


@pytest.fixture(scope="module")
def single_device_run(shared_dir, data_dir):
  """The tiny config trained in a 1-device process; also prepares the phantoms once."""

  def train() -> dict[str, Any]:
    import jax

    from medxai_jax.train import loop

    assert jax.device_count() == 1
    workdir = str(shared_dir / "one")
    result = loop.train_and_evaluate(tiny_config(data_dir), workdir)
    with open(os.path.join(workdir, "history.jsonl")) as f:
      return {"metrics": result, "history": [json.loads(line) for line in f]}

  return _computed_once(shared_dir, "one", train)


@pytest.fixture(scope="module")
def four_devices(single_device_run, shared_dir, data_dir):
  """Every 4-device check, run in one subprocess (after the 1-device run prepared the data)."""
  del single_device_run
  return _computed_once(shared_dir, "four", lambda: run_worker(
      "four", data_dir, str(shared_dir / "four")))


@pytest.fixture(scope="module")
def steps_result(four_devices):
  return four_devices["steps"]


@pytest.fixture(scope="module")
def four_device_run(four_devices):
  return four_devices["train"]


def test_train_steps_on_4_devices_equal_1_device(steps_result):
  assert steps_result["device_count"] == 4
  np.testing.assert_allclose(steps_result["steps_losses_4"], steps_result["steps_losses_1"],
                             **TOLERANCE)
  assert steps_result["steps_param_diff"] < 1e-5
  assert steps_result["steps_batch_stats_diff"] < 1e-5
  assert steps_result["steps_opt_state_diff"] < 1e-5
  assert steps_result["steps_param_change"] > 1e-3  # the steps did train


def test_accumulated_micro_batches_on_4_devices_equal_one_whole_batch_step(steps_result):
  accumulated, whole = steps_result["accumulation_losses"]
  np.testing.assert_allclose(accumulated, whole, **TOLERANCE)
  assert steps_result["accumulation_param_diff"] < 1e-5


def test_batchnorm_uses_global_batch_statistics_under_sharding(steps_result):
  assert steps_result["output_sharding_devices"] == 4
  assert steps_result["bn_mean_diff"] < 1e-5
  assert steps_result["bn_var_diff"] < 1e-5
  assert steps_result["bn_output_diff"] < 1e-4
  # Per-device statistics (what pmap without an axis name would use) are far off.
  assert steps_result["bn_per_shard_var_gap"] > 0.1


def test_batch_sizes_that_do_not_split_over_the_devices_are_rejected(steps_result,
                                                                     four_devices):
  errors = steps_result["errors"]
  assert "config.batch_size=18 is not divisible by the 4 devices" in errors["batch"]
  assert "multiple of 4 (e.g. 16 or 20)" in errors["batch"]
  assert "micro-batch size" in errors["micro"] and "= 2 is not divisible" in errors["micro"]
  assert "multiple of 32 (e.g. 32)" in errors["micro"]
  assert "6 rows cannot be split evenly over the 4 devices" in errors["shard"]
  assert steps_result["eval_batch_rounded"] == 12
  bad = four_devices["bad_batch"]
  assert "config.batch_size=18 is not divisible by the 4 devices" in bad["error"]
  assert not bad["workdir_created"]  # rejected before anything is written


def _compare_runs(run, reference, tolerance):
  assert [r["epoch"] for r in run["history"]] == [r["epoch"] for r in reference["history"]]
  for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc"):
    np.testing.assert_allclose([r[key] for r in run["history"]],
                               [r[key] for r in reference["history"]], rtol=tolerance,
                               atol=tolerance, err_msg=key)
  for key in ("loss", "accuracy", "roc_auc"):
    np.testing.assert_allclose(run["metrics"]["test"][key], reference["metrics"]["test"][key],
                               rtol=tolerance, atol=tolerance, err_msg=key)
  assert run["metrics"]["test"]["num_examples"] == 32
  assert run["metrics"]["selected_epoch"] == reference["metrics"]["selected_epoch"]


def test_train_and_evaluate_on_4_devices_matches_1_device(single_device_run, four_device_run):
  one, four = single_device_run["metrics"], four_device_run["metrics"]
  assert (one["num_devices"], four["num_devices"]) == (1, 4)
  assert four["per_device_batch_size"] == 4 and four["eval_batch_size"] == 12
  assert one["eval_batch_size"] == 10
  _compare_runs(four_device_run, single_device_run, 1e-4)


def test_initialize_distributed_is_a_no_op_on_one_host_and_names_missing_settings(monkeypatch):
  from medxai_jax.train import parallel

  for name in (parallel.DISTRIBUTED_ENV, "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(auto=False) is False
  with pytest.raises(ValueError, match="num_processes=2 needs a coordinator_address"):
    parallel.initialize_distributed(num_processes=2)
  with pytest.raises(ValueError, match="coordinator_address='host:1234' needs num_processes"):
    parallel.initialize_distributed("host:1234")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:99")
  with pytest.raises(ValueError, match="coordinator_address='host:99' needs num_processes"):
    parallel.initialize_distributed()


def test_process_local_source_decodes_only_this_process_rows():
  from medxai_jax.data import pipeline
  from medxai_jax.train import parallel

  class Source:
    decoded: list[int] = []

    def __len__(self):
      return 10

    def __getitems__(self, indices):
      self.decoded.extend(indices)
      return [{"image": np.full((2, 2, 1), i, np.uint8), "label": i % 2} for i in indices]

  source = Source()
  wrapped = parallel.ProcessLocalSource(source, slice(2, 4), 4)
  batches = list(pipeline.iterate_batches(wrapped, batch_size=4, seed=3, shuffle=True))
  order = pipeline.epoch_order(10, seed=3, epoch=0, shuffle=True)
  padded = np.concatenate([order, np.full(2, order[-1])])
  assert source.decoded == [int(i) for b in range(3) for i in padded[4 * b + 2:4 * b + 4]]
  for index, batch in enumerate(batches):
    np.testing.assert_array_equal(batch["image"][2:4, 0, 0, 0], padded[4 * index + 2:4 * index + 4])
    assert (batch["image"][:2] == 0).all()  # placeholders, never decoded
  np.testing.assert_array_equal(batches[-1]["weight"], [1, 1, 0, 0])  # the global padding
  # One process: this process holds every row, and any batch size divides one device.
  mesh = parallel.make_mesh()
  assert parallel.local_rows(mesh, 12) == slice(0, 12)
  parallel.check_batch_size(7, mesh)
  assert parallel.round_up_batch_size(7, mesh) == 7


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_two_devices_match_one_process_of_four(data_dir, four_device_run,
                                                                tmp_path):
  address = f"localhost:{_free_port()}"
  workdir = str(tmp_path / "multihost")
  processes = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "multihost", address, "2", str(index),
       data_dir, workdir], env=subprocess_env.forced_cpu_environment(2), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
  outputs = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      raise
    outputs.append(_parse(subprocess.CompletedProcess(process.args, process.returncode,
                                                      stdout, stderr)))
  lead, other = sorted(outputs, key=lambda o: o["process_index"])
  assert lead["metrics"]["num_processes"] == 2 and lead["metrics"]["num_devices"] == 4
  assert lead["history"] and other["metrics"]["test"] == lead["metrics"]["test"]
  _compare_runs(lead, four_device_run, 1e-5)


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
