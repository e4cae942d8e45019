"""Explaining a whole split on every device and host, into a sharded map store.

`explain_source` streams the examples of a random-access source in fixed-size batches (the
pipeline's padded tail), shards each batch over the data axis of the training code's mesh
(`train.parallel`: jit + NamedSharding; several processes assemble the global batch from their
own rows with `make_array_from_process_local_data` and each decodes only its rows), runs the
registry's methods on it and writes one `.npy` per method and batch (a shard) into a
`map_store`, so no host ever holds more than one batch of maps. A rerun with the same settings
resumes at the shards not yet written; other settings under an existing store are an error
naming the field. `explain_split_run` does this for the selected model of a training run
(`experiments/explain.py --num_images=all`).

Randomness: shard s of method i draws from `fold_in(fold_in(key, i), s)`, whatever the number of
devices or processes, so the maps do not depend on how the run is spread (up to float summation
order). Host methods (`MethodSpec.host`: XRAI, CRM) cannot be jitted over the mesh: each process
runs them on its own rows of the batch on its local devices, and the rows are gathered across
processes before the shard is written.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax import explain
from medxai_jax import map_store
from medxai_jax import runs
from medxai_jax.attribution import common
from medxai_jax.attribution import registry
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.observe import progress
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import parallel
from medxai_jax.train import workdir as workdir_lib
from medxai_jax.viz import figures

STORE_DIR = "maps"  # the store's directory inside an explain workdir
FIGURE_IMAGES = 8  # images of the figure grid and maps_<method>.npy of a whole-split run


def local_block(array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process's devices hold, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows of a batch (each holds one contiguous block), in process order."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def agreed(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` on every process (so all run the same shards)."""
  if jax.process_count() == 1:
    return value
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _method_entries(methods: Sequence[str], options: Mapping[str, Any],
                    head_problem: str | None) -> dict[str, dict[str, Any]]:
  """Index entries of the methods: options and host flag, or the reason a method is skipped."""
  entries = {}
  for name in methods:
    spec = registry.get(name)
    entry = {"options": explain.json_options(options[name]), "host": spec.host}
    if spec.needs == "gap_split" and head_problem:
      entry["skipped"] = head_problem
    entries[name] = entry
  return entries


def explain_source(model: base.Classifier, variables: base.Variables, preprocess: Any,
                   source: pipeline.RandomAccessSource, store: str, *,
                   methods: Sequence[str], key: jax.Array, split: str = "test",
                   indices: Sequence[int] | None = None, batch_size: int = 32,
                   overrides: explain.Overrides | None = None,
                   settings: Mapping[str, Any] | None = None, label_key: str = "label",
                   mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Maps of `methods` for the examples `indices` (default: all) of `source`, into `store`.

  Every process of a multi-host run calls this with the same arguments. `preprocess` turns the
  stored images into model inputs (traceable); each example is explained for its `label_key`
  value. `batch_size` (the shard size) must split evenly over the mesh (default: every device).
  `settings` (JSON) are what else the maps depend on (the model config, the checkpoint); with
  the batch size, indices, methods, their options and the key they are the store's settings,
  and a store written with others raises `map_store.StoreMismatchError` naming the field.
  Returns per method its options, seconds per image and compile seconds (or why it was
  skipped), the shards computed by this call and those this process wrote.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch_size(batch_size, mesh, field="--batch_size")
  indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
  if not len(indices):
    raise ValueError(f"Split {split!r} has no example to explain.")
  if indices.min() < 0 or indices.max() >= len(source):
    raise ValueError(f"Indices must lie in [0, {len(source)}) for split {split!r}; got "
                     f"{indices.min()}..{indices.max()}.")
  methods = registry.check_names(methods)
  options = explain.method_options(methods, overrides)
  specs = [registry.get(name) for name in methods]
  full_settings = {
      **dict(settings or {}), "split": split, "batch_size": int(batch_size),
      "indices_sha1": map_store.fingerprint({"indices": indices.tolist()}),
      "num_examples": int(len(indices)), "methods": list(methods),
      "options": explain.json_options(options), "label_key": label_key,
      "key": np.asarray(jax.random.key_data(key)).tolist()}

  index = map_store.read_index(store)
  if index is not None:
    map_store.check_settings(store, index, full_settings)
  # The contract on one concrete example (shape, finite, targets; CAM's head), before jitting.
  (sample,) = source.__getitems__([int(indices[0])])
  sample_images = jax.jit(preprocess)(jnp.asarray(sample["image"])[None])
  common.check_inputs(model, sample_images)
  common.check_method_inputs(model.logits_fn(variables), sample_images,
                             jnp.asarray(sample[label_key], jnp.int32).reshape(1))
  if index is None:
    head_problem = (explain.gap_head_problem(model, variables, sample_images)
                    if any(spec.needs == "gap_split" for spec in specs) else None)
    index = map_store.new_index(split, indices, batch_size,
                                _method_entries(methods, options, head_problem), full_settings)
    if jax.process_index() == 0:
      map_store.write_index(store, index)

  num_shards = len(index["shards"])
  pending = map_store.pending_shards(store, index) if jax.process_index() == 0 else {}
  todo = np.zeros((len(methods), num_shards), bool)
  for row, name in enumerate(methods):
    todo[row, pending.get(name, [])] = True
  todo = agreed(todo)

  replicated = parallel.replicated_sharding(mesh)
  data = parallel.batch_sharding(mesh)
  global_variables = parallel.replicate(variables, mesh)
  prepare = jax.jit(lambda x: preprocess(x), in_shardings=data, out_shardings=data)
  finite = jax.jit(lambda x: jnp.isfinite(x).all(axis=(1, 2, 3)), in_shardings=data,
                   out_shardings=replicated)

  def shard_key(method_index: int, shard: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, method_index), shard)

  def jitted(method_index: int, name: str):
    def run(v, x, t, shard):
      return explain.method_maps(model, v, x, t, name, shard_key(method_index, shard),
                                 options[name])
    return jax.jit(run, in_shardings=(replicated, data, data, replicated),
                   out_shardings=replicated)

  compiled: dict[str, Any] = {}
  seconds = {name: 0.0 for name in methods}
  compile_seconds = {name: 0.0 for name in methods}
  computed = {name: [] for name in methods}
  written = {name: [] for name in methods}
  rows_local = parallel.local_rows(mesh, batch_size)

  def batches():
    for shard in np.flatnonzero(todo.any(axis=0)):
      rows = index["shards"][shard]["indices"]
      subset: Any = pipeline.SubsetSource(source, rows)
      if jax.process_count() > 1:
        subset = parallel.ProcessLocalSource(subset, rows_local, batch_size)
      batch = next(pipeline.iterate_batches(subset, batch_size=batch_size, keys=("image",),
                                            label_key=label_key))
      yield int(shard), len(rows), batch

  shards_to_run = int(todo.any(axis=0).sum())
  for shard, real, batch in progress.track(
      pipeline.prefetch(batches()), total=shards_to_run, unit="shards",
      desc=f"explain {split} ({len(indices)} images, {batch_size} a shard, "
      f"{parallel.num_shards(mesh)} devices)"):
    sharded = parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    images = prepare(sharded["image"])
    ok = np.asarray(finite(images))[:real]
    if not ok.all():
      bad = [index["shards"][shard]["indices"][i] for i in np.flatnonzero(~ok)]
      raise ValueError(f"Split {split!r} example(s) {bad[:10]} (shard {shard}) have non-finite "
                       "values after preprocessing; their maps would be NaN. Fix or drop them.")
    shard_array = parallel.replicate(np.int32(shard), mesh)
    for method_index, (name, spec) in enumerate(zip(methods, specs)):
      if not todo[method_index, shard]:
        continue
      start = time.perf_counter()
      if spec.host:  # this process's rows on its local devices, then gathered
        local_maps = explain.method_maps(
            model, variables, jnp.asarray(local_block(images)),
            jnp.asarray(batch["label"][rows_local]), name,
            shard_key(method_index, jnp.int32(shard)), options[name])
        maps = gather_rows(np.asarray(jax.block_until_ready(local_maps)))
      else:
        if name not in compiled:
          compiled[name] = jitted(method_index, name).lower(
              global_variables, images, sharded["label"], shard_array).compile()
          compile_seconds[name] = time.perf_counter() - start
          start = time.perf_counter()
        maps = np.asarray(jax.block_until_ready(
            compiled[name](global_variables, images, sharded["label"], shard_array)))
      seconds[name] += time.perf_counter() - start
      maps = maps[:real]
      if shard % jax.process_count() == jax.process_index():
        map_store.write_shard(store, name, shard, maps)
        written[name].append(shard)
      entry = index["methods"][name]
      if entry.get("shape") is None:
        entry["shape"], entry["dtype"] = list(maps.shape[1:]), str(maps.dtype)
        if jax.process_index() == 0:
          map_store.write_index(store, index)
      computed[name].append(shard)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("explain_source: every shard written")

  info = {}
  for name, spec in zip(methods, specs):
    entry = index["methods"][name]
    if "skipped" in entry:
      info[name] = {"skipped": entry["skipped"], "options": options[name]}
      continue
    images_done = sum(len(index["shards"][s]["indices"]) for s in computed[name])
    info[name] = {
        "compile_seconds": None if spec.host or not computed[name]
        else round(compile_seconds[name], 2),
        "seconds_per_image": round(seconds[name] / images_done, 4) if images_done else None,
        "options": options[name], "host": spec.host, "shards_computed": computed[name],
        "shards_written": written[name], "shards_reused": num_shards - len(computed[name])}
  return {"store": os.path.abspath(store), "split": split, "num_examples": int(len(indices)),
          "num_shards": num_shards, "batch_size": int(batch_size),
          "num_devices": parallel.num_shards(mesh), "num_processes": jax.process_count(),
          "methods": info}


def run_settings(config: ml_collections.ConfigDict, checkpoint_dir: str,
                 selected: runs.SelectedModel | None = None, which: str = runs.SELECTED
                 ) -> dict[str, Any]:
  """What a run's maps depend on besides the methods: the checkpoint and the model, the
  preprocessing and the dataset config (its data_dir / manual_dir left out: a moved dataset is
  the same dataset); for `which='best_so_far'` also that and the restored model's epoch (a
  run trained further has another best)."""
  dataset = {k: v for k, v in runs_flat(config.dataset).items()
             if f"dataset.{k}" not in workdir_lib.LOCATION_FIELDS}
  extra = ({} if which == runs.SELECTED else
           {"model": which, "epoch": None if selected is None else selected.epoch})
  return {"checkpoint": os.path.abspath(checkpoint_dir), **extra,
          "config": {"model": runs_flat(config.model), "preprocess": runs_flat(config.preprocess),
                     "dataset": dataset}}


def runs_flat(section: Any) -> dict[str, Any]:
  """A config section as {dotted field: JSON value}."""
  return explain.json_options(runs.flatten_config(section))


def explain_split_run(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str, *,
                      split: str | None = None, methods: Sequence[str] | None = None,
                      overrides: explain.Overrides | None = None, batch_size: int = 32,
                      seed: int = 0, figure_images: int = FIGURE_IMAGES,
                      model: str = runs.SELECTED) -> dict[str, Any]:
  """Explains every example of a split (default: the test split) with a run's selected model.

  Writes the map store into `<workdir>/maps` (`explain_source`, resumed if it exists) and, on
  process 0, for a class-balanced sample of `figure_images` examples (seeded,
  `explain.choose_indices`; logged, and `indices` in explain.json) the figure grid,
  `maps_<method>.npy` and `explain.json` (as `explain.explain_run` does), plus the store's path
  and size.
  """
  split = split or config.dataset.test_split
  selected = runs.restore_model(config, checkpoint_dir, model)
  which, model = model, selected.model
  variables, preprocess = selected.variables, selected.preprocess
  workdir = workdir_lib.prepare_workdir(workdir)
  source = pipeline.load_sources(config.dataset, [split])[split]
  methods = list(methods or registry.REGISTRY)
  store = os.path.join(workdir, STORE_DIR)
  result = explain_source(model, variables, preprocess, source, store, methods=methods,
                          key=jax.random.key(seed), split=split, batch_size=batch_size,
                          overrides=overrides, settings={**run_settings(config, checkpoint_dir,
                                                                      selected, which),
                                                         "seed": seed},
                          label_key=config.dataset.get("label_key", "label"))
  opened = map_store.open_map_store(store)
  label_key = config.dataset.get("label_key", "label")
  # Splits are often stored in class order: the figure shows a class-balanced, seeded sample.
  labels = pipeline.split_labels(config.dataset, split)[opened.indices]
  shown = explain.choose_indices(labels, figure_images, -1, seed=seed)
  chosen = opened.indices[shown]
  logging.info("The figure shows a class-balanced sample (seed %d) of the %d images: split "
               "indices %s.", seed, len(opened.indices), chosen.tolist())
  records = source.__getitems__([int(i) for i in chosen])
  images = np.stack([np.asarray(r["image"]) for r in records])
  masks = (np.stack([np.asarray(r["lesion_mask"]) for r in records])
           if "lesion_mask" in records[0] else None)
  maps = {name: opened[name][shown] for name in opened.methods}
  summary = {"checkpoint": os.path.abspath(checkpoint_dir), "split": split,
             "indices": chosen.tolist(), "figure_sample": "class-balanced, seeded",
             "targets": [int(np.asarray(r[label_key])) for r in records],
             "num_images": result["num_examples"], "label": None, "seed": seed,
             "model": {"which": which, "epoch": selected.epoch},
             "store": result["store"], "num_shards": result["num_shards"],
             "batch_size": batch_size, "num_devices": result["num_devices"],
             "num_processes": result["num_processes"],
             "overrides": explain.json_options(overrides or {}),
             "options": explain.json_options(explain.shared_options(result["methods"])),
             "methods": explain.json_options(result["methods"]), "figure": "attributions.png"}
  if jax.process_index() == 0:
    for name, value in maps.items():
      np.save(os.path.join(workdir, f"maps_{name}.npy"), value)
    figures.plot_attribution_grid(images, maps, os.path.join(workdir, "attributions.png"),
                                  masks=masks, titles=[f"#{i} (label {t})" for i, t in
                                                       zip(chosen, summary["targets"])])
    metrics_lib.write_json(os.path.join(workdir, "explain.json"), summary)
  logging.info("Explained %d %s images into %s (%d shards).", result["num_examples"], split,
               store, result["num_shards"])
  return summary
