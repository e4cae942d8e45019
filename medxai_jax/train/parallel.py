"""Data parallelism: a 1-D device mesh, batch and state shardings, multi-host start and batches.

The train and eval steps are jitted with `NamedSharding`s over a 1-D mesh of every device (axis
`'data'`): the state (parameters, BatchNorm statistics, optimiser state) is replicated (`P()`),
the batch is split along its first axis (`P('data')`). XLA partitions the step: each device runs
the forward and backward pass on its rows, and every reduction over the batch axis (the loss
mean, the gradient sum, BatchNorm's batch mean and variance) becomes a cross-device all-reduce,
so the step computes exactly what one device computes on the whole global batch (up to float
summation order). We use jit + NamedSharding rather than `pmap`: since JAX 0.8 `pmap` is in
maintenance mode and JAX 0.10 implements it on jit + shard_map.

The global batch size (`config.batch_size`) is fixed whatever the device count: each device
gets `batch_size / device_count` rows, and a batch size that does not divide is rejected
(`check_batch_size`). Evaluation batches are padded by the pipeline (weight 0), so their size is
rounded up to a multiple of the device count instead (`round_up_batch_size`).

Multi-host (one process per host, `initialize_distributed` first): every process builds the same
mesh over all devices of all processes and runs the same program. Data-loading contract: all
processes iterate the same global batches (`pipeline.epoch_order` depends only on the seed and
epoch; the padded tail is padded identically), each host batch keeps the global batch's shape,
and only the rows `local_rows(mesh, batch_size)` of it (the contiguous block this process's
devices hold) need real data: `shard_batch` sends those rows to the local devices with
`jax.make_array_from_process_local_data`. `ProcessLocalSource` wraps a data source so that only
those rows are decoded (the others are zero placeholders). Whatever the host reads back (the
step's statistics, eval logits, and the eval batch's labels and weights) is replicated, so every
process sees the global values.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"
# Set to 1 to make `initialize_distributed` call jax.distributed.initialize() with the cluster
# auto-detected (SLURM, Open MPI, TPU pods, ...) when no flag asks for it.
DISTRIBUTED_ENV = "MEDXAI_DISTRIBUTED"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, *, auto: bool | None = None) -> bool:
  """Starts `jax.distributed` for a multi-host run; a no-op on one host. Returns whether it ran.

  It runs when `coordinator_address` (or $JAX_COORDINATOR_ADDRESS) is given, with
  `num_processes` / `process_id` (0 / -1: let JAX detect them), or when `auto` (default:
  $MEDXAI_DISTRIBUTED=1) asks JAX to detect the whole cluster (SLURM, Open MPI, TPU pods, ...).
  Call it before anything touches a device (jax.devices(), an array, a jit).
  """
  if auto is None:
    auto = os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address and not auto:
    if num_processes > 1:
      raise ValueError(f"num_processes={num_processes} needs a coordinator_address "
                       "(host:port of process 0), or auto-detection (--multihost).")
    return False
  if address and num_processes <= 0 and not auto:
    raise ValueError(f"coordinator_address={address!r} needs num_processes (and process_id), "
                     "or auto-detection (--multihost) to find them.")
  jax.distributed.initialize(
      coordinator_address=address or None,
      num_processes=num_processes if num_processes > 0 else None,
      process_id=process_id if process_id >= 0 else None)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh (axis 'data') over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (axis 0) split over the mesh's data axis; the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def num_shards(mesh: Mesh) -> int:
  """Number of devices the batch is split over."""
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "config.batch_size",
                     accumulation_steps: int = 1) -> None:
  """Raises a ValueError unless each of `accumulation_steps` micro-batches splits evenly."""
  devices = num_shards(mesh)
  if accumulation_steps < 1:
    raise ValueError(f"config.train.accumulation_steps must be >= 1, got {accumulation_steps}.")
  if batch_size % accumulation_steps:
    raise ValueError(f"{field}={batch_size} is not divisible by "
                     f"config.train.accumulation_steps={accumulation_steps}.")
  micro = batch_size // accumulation_steps
  if micro % devices:
    what = (f"{field}={batch_size}" if accumulation_steps == 1 else
            f"the micro-batch size {field} / config.train.accumulation_steps = {micro}")
    multiple = devices * accumulation_steps
    choices = sorted({max(multiple, batch_size // multiple * multiple),
                      -(-batch_size // multiple) * multiple})
    raise ValueError(
        f"{what} is not divisible by the {devices} devices of the data mesh; the global batch "
        f"is split evenly over the devices. Choose {field} as a multiple of {multiple} (e.g. "
        f"{' or '.join(map(str, choices))}), or run on fewer devices "
        "(CUDA_VISIBLE_DEVICES / --xla_force_host_platform_device_count).")


def round_up_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the device count (for padded eval batches)."""
  devices = num_shards(mesh)
  return -(-batch_size // devices) * devices


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` with every leaf copied to all devices of `mesh` (the same value on every process)."""
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda leaf: jax.make_array_from_callback(
          np.shape(leaf), sharding, lambda index, x=np.asarray(leaf): x[index]), tree)


def local_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold (one contiguous block)."""
  sharding = batch_sharding(mesh)
  indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  starts = sorted(index[0].indices(global_batch_size)[0] for index in indices)
  stops = sorted(index[0].indices(global_batch_size)[1] for index in indices)
  block = slice(starts[0], stops[-1])
  if stops[-1] - starts[0] != sum(b - a for a, b in zip(starts, stops)):
    raise ValueError(f"This process's devices hold non-contiguous rows {list(zip(starts, stops))} "
                     "of the global batch; order the mesh devices by process.")
  return block


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A host batch (the global batch's shape) as global arrays sharded over the data axis.

  Several processes: only the rows `local_rows(mesh, batch_size)` of each process's host batch
  are read (the others may be placeholders, as `ProcessLocalSource` makes them); the global
  arrays are assembled from the processes' blocks with `make_array_from_process_local_data`.
  """
  sizes = {key: np.shape(value)[0] for key, value in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"Batch arrays have different numbers of rows: {sizes}.")
  rows = next(iter(sizes.values()))
  if rows % num_shards(mesh):
    raise ValueError(f"A batch of {rows} rows cannot be split evenly over the "
                     f"{num_shards(mesh)} devices of the data mesh.")
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  block = local_rows(mesh, rows)
  return {key: jax.make_array_from_process_local_data(
      sharding, np.ascontiguousarray(np.asarray(value)[block]), np.shape(value))
          for key, value in batch.items()}


class ProcessLocalSource:
  """A random-access source that decodes only this process's rows of each global batch.

  `pipeline.iterate_batches(ProcessLocalSource(source, rows, batch_size), batch_size=...)` asks
  for one global batch of indices at a time; the rows outside `rows` get a zero placeholder
  record (no decoding), so the host batch is global-sized and `shard_batch` keeps `rows` of it.
  """

  def __init__(self, source: Any, rows: slice, batch_size: int):
    self._source = source
    self._rows = rows
    self._batch_size = batch_size

  def __len__(self) -> int:
    return len(self._source)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    if len(indices) != self._batch_size:
      return self._source.__getitems__(indices)
    positions = range(*self._rows.indices(len(indices)))
    decoded = self._source.__getitems__([indices[i] for i in positions])
    placeholder = {key: np.zeros_like(np.asarray(value)) for key, value in decoded[0].items()}
    records = [placeholder] * len(indices)
    for position, record in zip(positions, decoded):
      records[position] = record
    return records
