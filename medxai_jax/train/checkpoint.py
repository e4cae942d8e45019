"""The one place that talks to orbax: latest and best checkpoints of a training run."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  """An orbax manager over an absolute directory (orbax refuses relative paths)."""
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _abstract(tree: Any) -> Any:
  """Shape/dtype skeleton of `tree` to restore into."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointStore:
  """Keeps the latest `max_to_keep` epoch checkpoints, the best one and the newest mid-epoch
  one, each with JSON metadata.

  Epoch checkpoints (`latest/`, `best/`) are numbered by completed epochs; the mid-epoch one
  (`partial/`, written on preemption or every config.checkpoint.every_steps steps) by global
  training step (epoch * steps per epoch + steps done in the epoch).
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._latest = _manager(os.path.join(self.directory, "latest"), max_to_keep)
    self._best = _manager(os.path.join(self.directory, "best"), 1)
    self._partial = _manager(os.path.join(self.directory, "partial"), 1)

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state: Any, metadata: dict) -> None:
    if step in manager.all_steps():  # a step redone after a kill between two saves
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)), force=True)
    manager.wait_until_finished()

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, step: int | None, template: Any
               ) -> tuple[Any, dict]:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(template)), metadata=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as error:
      raise ValueError(
          f"Checkpoint {manager.directory}/{step} does not match the model and optimiser of this "
          f"config (different architecture or optimiser?): {error}") from error
    return restored["state"], dict(restored["metadata"])

  def save_latest(self, step: int, state: Any, metadata: dict) -> None:
    """Saves the end-of-epoch state (kept: the last `max_to_keep`)."""
    self._save(self._latest, step, state, metadata)

  def save_best(self, step: int, state: Any, metadata: dict) -> None:
    """Saves the model-selection winner so far (kept: one)."""
    self._save(self._best, step, state, metadata)

  def latest_step(self) -> int | None:
    """Step of the newest end-of-epoch checkpoint, or None."""
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    """Step of the best checkpoint, or None."""
    return self._best.latest_step()

  def restore_latest(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the newest (or given) end-of-epoch checkpoint into `template`'s structure."""
    return self._restore(self._latest, step, template)

  def restore_best(self, template: Any) -> tuple[Any, dict]:
    """Restores the best checkpoint into `template`'s structure."""
    return self._restore(self._best, None, template)

  def save_partial(self, global_step: int, state: Any, metadata: dict) -> None:
    """Saves a mid-epoch state (kept: the newest one)."""
    self._save(self._partial, global_step, state, metadata)

  def partial_step(self) -> int | None:
    """Global step of the mid-epoch checkpoint, or None."""
    return self._partial.latest_step()

  def restore_partial(self, template: Any) -> tuple[Any, dict]:
    """Restores the mid-epoch checkpoint into `template`'s structure."""
    return self._restore(self._partial, None, template)

  def delete_partial(self) -> None:
    """Deletes the mid-epoch checkpoints (an epoch checkpoint supersedes them)."""
    for step in self._partial.all_steps():
      self._partial.delete(step)

  def close(self) -> None:
    """Waits for pending writes and releases the managers."""
    self._latest.close()
    self._best.close()
    self._partial.close()


def save_variables(directory: str, variables: Any, metadata: dict) -> str:
  """Writes model variables (no optimiser state) and JSON metadata; returns the directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "variables")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, jax.tree_util.tree_map(jax.numpy.asarray, variables), force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, "metadata.json"), "w") as file:
    json.dump(metadata, file, indent=2)
  return directory


def load_variables(directory: str) -> tuple[dict, dict]:
  """Variables and metadata written by `save_variables` (numpy leaves)."""
  directory = os.path.abspath(directory)
  target = os.path.join(directory, "variables")
  if not os.path.isdir(target):
    raise FileNotFoundError(
        f"No variables checkpoint at {target}; config.init_from must name a directory written "
        "by experiments/port_weights.py (or a training workdir's 'best' export).")
  checkpointer = ocp.StandardCheckpointer()
  # Onto this process's first device, whatever devices wrote it (a multi-host process has no
  # cpu:0 / gpu:0 of the writer's): the saved tree's shapes and dtypes as the target.
  saved = checkpointer.metadata(target)
  saved = getattr(saved, "item_metadata", saved)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = checkpointer.restore(target, jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local), saved))
  variables = jax.tree_util.tree_map(np.asarray, restored)
  metadata_path = os.path.join(directory, "metadata.json")
  metadata = {}
  if os.path.isfile(metadata_path):
    with open(metadata_path) as file:
      metadata = json.load(file)
  return variables, metadata
