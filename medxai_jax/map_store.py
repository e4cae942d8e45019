"""Attribution maps of a whole split on disk: one `.npy` file per method and shard, plus an index.

A store is a directory:

  <store>/index.json                  what the store holds (below)
  <store>/<method>/shard_<s>.npy      the maps of shard s: [rows of the shard, H, W(, C)]

Shard s holds the maps of the split examples `index['shards'][s]['indices']` (consecutive
examples of the split, `batch_size` per shard, the last one shorter), so the maps of 40,000
images x 8 methods never sit in one host's memory and a killed run can resume at the shards it
has not written. Every file is written atomically (a temporary file in the same directory, then
`os.replace`), so a shard file that exists is whole.

index.json holds: `format`, `split`, `num_examples`, `batch_size`, `shards` (per shard its
`indices`), `methods` (per method its `options`, `host` flag, and, once a shard was written, the
maps' `shape` after the row axis and `dtype`; or `skipped` with the reason), and `settings`
(everything the maps depend on: the model config, the checkpoint, the methods' options, the
seed...) with their SHA-1 `fingerprint`. Writing into an existing store with other settings is
a `StoreMismatchError` naming each differing field.

Read a store with `open_map_store(store)`: per method a lazy, memory-mapped view.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from medxai_jax import runs
from medxai_jax.train import metrics

INDEX_FILE = "index.json"
FORMAT = "medxai_map_store/1"


class StoreMismatchError(ValueError):
  """An existing map store was written with other settings than the ones given."""


def fingerprint(settings: Mapping[str, Any]) -> str:
  """SHA-1 of the settings as canonical JSON (sorted keys)."""
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()


def shard_path(store: str, method: str, shard: int) -> str:
  """The file of one method's maps of one shard."""
  return os.path.join(store, method, f"shard_{shard:05d}.npy")


def index_path(store: str) -> str:
  return os.path.join(store, INDEX_FILE)


def _atomic_replace(path: str, write) -> None:
  """Calls `write(file)` on a temporary file next to `path`, then renames it to `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "wb") as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_index(store: str, index: Mapping[str, Any]) -> str:
  """Writes the store's index.json (strict JSON, atomically); returns its path."""
  os.makedirs(store, exist_ok=True)
  path = index_path(store)
  metrics.write_json(path, index, indent=1)
  return path


def write_shard(store: str, method: str, shard: int, maps: np.ndarray) -> str:
  """Writes one shard's maps atomically; returns the path."""
  path = shard_path(store, method, shard)
  _atomic_replace(path, lambda file: np.save(file, np.ascontiguousarray(maps),
                                             allow_pickle=False))
  return path


def read_index(store: str) -> dict[str, Any] | None:
  """The store's index.json, or None when the directory holds none."""
  path = index_path(store)
  if not os.path.exists(path):
    return None
  index = runs.read_json(path)
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise ValueError(f"{path} is not a map store index (format {FORMAT!r}); got format "
                     f"{index.get('format') if isinstance(index, dict) else type(index)!r}.")
  return index


def new_index(split: str, indices: np.ndarray, batch_size: int, methods: Mapping[str, Any],
              settings: Mapping[str, Any]) -> dict[str, Any]:
  """The index of a new store over the split examples `indices`, `batch_size` per shard."""
  indices = np.asarray(indices, np.int64)
  shards = [{"shard": s, "indices": indices[start:start + batch_size].tolist()}
            for s, start in enumerate(range(0, len(indices), batch_size))]
  return {"format": FORMAT, "split": split, "num_examples": int(len(indices)),
          "batch_size": int(batch_size), "shards": shards,
          "methods": {name: dict(entry) for name, entry in methods.items()},
          "settings": json.loads(json.dumps(settings, default=str)),
          "fingerprint": fingerprint(settings)}


def check_settings(store: str, index: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
  """Raises StoreMismatchError naming each field (old -> new) where `settings` differ from the
  settings the store at `store` was written with."""
  given = json.loads(json.dumps(settings, default=str))
  if index.get("fingerprint") == fingerprint(given):
    return
  differences = runs.config_differences(index.get("settings", {}), given)
  lines = "".join(f"\n  {d.path}: {d.run_value!r} -> {d.given_value!r}" for d in differences)
  raise StoreMismatchError(
      f"The map store {store} was written with other settings (field: stored -> given):"
      f"{lines or ' (fingerprint differs)'}\nRerun with the store's settings to resume it, or "
      "give another --workdir (or delete the store) to explain anew.")


def shard_problem(path: str, rows: int, shape: Sequence[int] | None, dtype: str | None
                  ) -> str | None:
  """Why the file at `path` is not a finished shard of `rows` maps of `shape` / `dtype`, or
  None when it is (only the .npy header is read)."""
  if not os.path.exists(path):
    return "missing"
  try:
    stored = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as error:
    return f"unreadable ({error})"
  if stored.shape[0] != rows:
    return f"holds {stored.shape[0]} rows, not {rows}"
  if shape is not None and list(stored.shape[1:]) != list(shape):
    return f"has maps of shape {list(stored.shape[1:])}, not {list(shape)}"
  if dtype is not None and str(stored.dtype) != dtype:
    return f"has dtype {stored.dtype}, not {dtype}"
  return None


def pending_shards(store: str, index: Mapping[str, Any]) -> dict[str, list[int]]:
  """Per method not skipped, the shards whose file is missing or does not match the index."""
  pending = {}
  for method, entry in index["methods"].items():
    if "skipped" in entry:
      continue
    pending[method] = [
        shard["shard"] for shard in index["shards"]
        if shard_problem(shard_path(store, method, shard["shard"]), len(shard["indices"]),
                         entry.get("shape"), entry.get("dtype"))]
  return pending


class LazyMaps:
  """One method's maps over the whole store, read on demand from memory-mapped shard files.

  `maps[i]` (an int: position in `store.indices`), `maps[a:b]` or `maps[[i, j]]` reads only the
  shards holding those rows; `shard(s)` is one shard's memory map; `len(maps)` the row count.
  """

  def __init__(self, store: str, method: str, index: Mapping[str, Any]):
    self.store = store
    self.method = method
    self._shards = index["shards"]
    self._starts = np.cumsum([0] + [len(s["indices"]) for s in self._shards])
    entry = index["methods"][method]
    self.shape = (int(self._starts[-1]), *(entry.get("shape") or ()))
    self.dtype = np.dtype(entry["dtype"]) if entry.get("dtype") else None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def shard(self, shard: int) -> np.ndarray:
    """Shard `shard`'s maps as a read-only memory map."""
    path = shard_path(self.store, self.method, shard)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: shard {shard} of method "
                              f"{self.method!r} was not written (an unfinished run; rerun it "
                              "to resume).")
    return np.load(path, mmap_mode="r", allow_pickle=False)

  def __iter__(self) -> Iterator[np.ndarray]:
    """The shards in order (memory maps)."""
    return (self.shard(s) for s in range(len(self._shards)))

  def __getitem__(self, item: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(item, (int, np.integer)):
      position = int(item) + len(self) if item < 0 else int(item)
      if not 0 <= position < len(self):
        raise IndexError(f"Row {item} is outside the {len(self)} rows of {self.method!r}.")
      shard = int(np.searchsorted(self._starts, position, side="right") - 1)
      return np.asarray(self.shard(shard)[position - self._starts[shard]])
    positions = (np.arange(len(self))[item] if isinstance(item, slice)
                 else np.asarray(item, np.int64))
    if positions.ndim != 1:
      raise IndexError(f"Index rows with an int, a slice or a 1-D list; got shape "
                       f"{positions.shape}.")
    if len(positions) == 0:
      return np.zeros((0, *self.shape[1:]), self.dtype)
    return np.stack([self[int(p)] for p in positions])


class MapStore:
  """A map store opened for reading (`open_map_store`)."""

  def __init__(self, store: str, index: Mapping[str, Any]):
    self.path = store
    self.index = dict(index)
    self.split = index["split"]
    self.indices = np.asarray([i for s in index["shards"] for i in s["indices"]], np.int64)
    self.methods = [m for m, entry in index["methods"].items() if "skipped" not in entry]
    self.skipped = {m: entry["skipped"] for m, entry in index["methods"].items()
                    if "skipped" in entry}

  def __getitem__(self, method: str) -> LazyMaps:
    if method not in self.methods:
      why = f" (skipped: {self.skipped[method]})" if method in self.skipped else ""
      raise KeyError(f"The map store {self.path} has no maps of {method!r}{why}; it has "
                     f"{self.methods}.")
    return LazyMaps(self.path, method, self.index)

  def missing(self) -> dict[str, list[int]]:
    """Per method, the shards not (correctly) written yet; empty lists when complete."""
    return pending_shards(self.path, self.index)

  def complete(self) -> bool:
    return not any(self.missing().values())


def open_map_store(store: str) -> MapStore:
  """A map store for reading: `store[method]` is a lazy view of that method's maps, in the
  order of `store.indices` (the split's example indices)."""
  index = read_index(store)
  if index is None:
    raise FileNotFoundError(f"{index_path(store)} does not exist: {store!r} is not a map store "
                            "(`python -m experiments.explain --num_images=all` writes one).")
  return MapStore(store, index)
