"""The leaderboard of a whole split, streamed over every device and host (`--num_images=all`).

`score_source` explains every example of a source into a map store (`explain_dataset.
explain_source`: shards of `batch_size` over the mesh, per-process shares, resume) and then scores
it shard by shard with `evaluation.make_scorer`, jitted over the same mesh: per shard, each
method's per-image scores (localisation against the dataset's masks, deletion / insertion AUC
and curves, ROAD, complexity, marker share) are written as a second map store,
`<workdir>/scores`, whose entries are `<method>/<score>` ([rows]) and `<method>/deletion_curve`
/ `insertion_curve` ([rows, S + 1]), plus the split's labels and which images have a mask. So a
host holds one batch of images and maps at a time and a few floats per image and method; a
killed evaluation resumes at the shards it has not written, and other settings are an error
naming the field (`map_store.StoreMismatchError`). Shard s is written by process
s % process_count.

`evaluate_split` does this for a run's selected model and then, on process 0, bootstraps the
leaderboard over all per-image scores (`evaluation.write_results`, as the one-batch path, so the
numbers are those of one batch of the same images); the model-level checks (parameter and data
randomisation, Adebayo et al.) and max-sensitivity run on a class-balanced, seeded sample of
`ScoreOptions.sample_images` images, and the gallery shows a class-balanced sample too. Both
samples are recorded in evaluation.json. The stores are read back by every process, so on
several hosts the workdir must be on a shared file system.
"""

from __future__ import annotations

import dataclasses
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
from medxai_jax import explain_dataset
from medxai_jax import map_store
from medxai_jax import runs
from medxai_jax.analysis import evaluation
from medxai_jax.analysis import faithfulness
from medxai_jax.attribution import registry
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.observe import progress
from medxai_jax.train import parallel
from medxai_jax.train import workdir as workdir_lib

MAPS_DIR = "maps"
SCORES_DIR = "scores"
LABELS = "_split/label"  # score-store entries about the images, not a method
KINDS = ("localisation", "marker")
CURVES = ("deletion", "insertion")
# Score options of the sample-level checks and the bootstrap: not settings of the score store
# (changing them reuses its shards).
SAMPLE_OPTIONS = ("sanity_methods", "sanity_how", "num_resamples", "sample_images",
                  "sensitivity_methods", "sensitivity_samples", "sensitivity_radius")


def present_entry(kind: str) -> str:
  """The score-store entry: which images have a non-empty `kind` mask."""
  return f"_split/{kind}_mask"


def _score_entries(scorer, variables, image_shape, batch_size: int, kinds: Sequence[str],
                   methods: Sequence[str]) -> dict[str, tuple[list[int], str]]:
  """Entry name -> (shape after the row axis, dtype) of the score store, from the scorer's
  output structure (`jax.eval_shape`: nothing is computed)."""
  rows = (batch_size,)
  struct = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(rows + shape, dtype)  # noqa
  masks = {kind: struct(tuple(image_shape[:2]), jnp.bool_) for kind in kinds}
  scores, curves = jax.eval_shape(
      scorer, variables, struct(tuple(image_shape)), struct((), jnp.int32),
      struct(tuple(image_shape[:2])), masks.get("localisation"), masks.get("marker"),
      jax.random.key(0), struct((), jnp.int32))
  entries = {LABELS: ([], "int32"), **{present_entry(k): ([], "bool") for k in kinds}}
  for method in methods:
    for name, value in scores.items():
      entries[f"{method}/{name}"] = (list(value.shape[1:]), str(value.dtype))
    for mode in CURVES:
      entries[f"{method}/{mode}_curve"] = (list(curves[mode].shape[1:]), str(curves[mode].dtype))
  return entries


def score_source(model: base.Classifier, variables: base.Variables, preprocess: Any,
                 source: pipeline.RandomAccessSource, workdir: str, *, dataset_name: str,
                 methods: Sequence[str], key: jax.Array, split: str = "test",
                 batch_size: int = 32, options: explain.Overrides | None = None,
                 score_options: evaluation.ScoreOptions = evaluation.ScoreOptions(),
                 settings: Mapping[str, Any] | None = None, label_key: str = "label",
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Maps (`<workdir>/maps`) and per-image scores (`<workdir>/scores`) of every example.

  Every process calls this with the same arguments. `key` is split as `evaluate_run` splits its
  seed's key (methods, random contrast and ROAD noise, sanity). `dataset_name` names the
  dataset whose declared masks (`evaluation.dataset_mask_keys`) the localisation and marker
  scores use; `settings` (JSON) are what else the maps and scores depend on. Returns the map
  store's result (`explain_source`), the stores' paths, the methods scored, the pointing margin,
  why a mask kind is not scored (`problems`), and the shards this call scored and wrote.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  methods_key, random_key, _ = jax.random.split(key, 3)
  maps_path = os.path.join(workdir, MAPS_DIR)
  scores_path = os.path.join(workdir, SCORES_DIR)
  explained = explain_dataset.explain_source(
      model, variables, preprocess, source, maps_path, methods=methods, key=methods_key,
      split=split, batch_size=batch_size, overrides=options, settings=settings,
      label_key=label_key, mesh=mesh)
  maps = map_store.open_map_store(maps_path)
  scored = [*maps.methods, evaluation.RANDOM]

  (sample,) = source.__getitems__([0])
  mask_keys = evaluation.dataset_mask_keys(dataset_name)
  problems, feature = {}, {}
  for kind, mask_key in zip(KINDS, mask_keys):
    problem = evaluation.mask_problem(dataset_name, kind, mask_key, sample)
    if problem is None:
      feature[kind] = mask_key
    else:
      problems[kind] = problem
  has_flags = [f"has_{k}" for k in feature.values() if f"has_{k}" in sample]
  image_shape = jax.eval_shape(
      preprocess, jax.ShapeDtypeStruct((1, *np.shape(sample["image"])), jnp.float32)).shape[1:]
  margin = evaluation.pointing_margin(score_options, max(image_shape[:2]))
  scorer = evaluation.make_scorer(model, score_options, margin)
  entries = _score_entries(scorer, variables, image_shape, batch_size, list(feature), scored)
  score_settings = {
      **dict(settings or {}), "maps_fingerprint": maps.index["fingerprint"],
      "score_options": explain.json_options({
          k: v for k, v in dataclasses.asdict(score_options).items() if k not in SAMPLE_OPTIONS}),
      "margin": margin, "masks": feature, "entries": list(entries),
      "key": np.asarray(jax.random.key_data(key)).tolist()}
  index = map_store.read_index(scores_path)
  if index is not None:
    map_store.check_settings(scores_path, index, score_settings)
  else:
    index = map_store.new_index(
        split, maps.indices, batch_size,
        {name: {"options": {}, "host": False, "shape": shape, "dtype": dtype}
         for name, (shape, dtype) in entries.items()}, score_settings)
    if jax.process_index() == 0:
      map_store.write_index(scores_path, index)
  num_shards = len(index["shards"])
  todo = np.zeros(num_shards, bool)
  if jax.process_index() == 0:
    todo[sorted({s for shards in map_store.pending_shards(scores_path, index).values()
                 for s in shards})] = True
  todo = explain_dataset.agreed(todo)

  data = parallel.batch_sharding(mesh)
  replicated = parallel.replicated_sharding(mesh)
  global_variables = parallel.replicate(variables, mesh)
  prepare = jax.jit(lambda x: preprocess(x), in_shardings=data, out_shardings=data)
  split_entries = jax.jit(lambda label, masks: {
      LABELS: label, **{present_entry(k): m.any(axis=(1, 2)) for k, m in masks.items()}},
      out_shardings=replicated)
  road_key = jax.random.fold_in(random_key, 1)
  score_fn = jax.jit(lambda v, x, t, m, lesion, marker, i: scorer(v, x, t, m, lesion, marker,
                                                                  road_key, i),
                     out_shardings=replicated)
  rows_local = parallel.local_rows(mesh, batch_size)
  keys = ("image", *feature.values(), *has_flags)

  def batches():
    for shard in np.flatnonzero(todo):
      rows = index["shards"][shard]["indices"]
      subset: Any = pipeline.SubsetSource(source, rows)
      if jax.process_count() > 1:
        subset = parallel.ProcessLocalSource(subset, rows_local, batch_size)
      batch = next(pipeline.iterate_batches(subset, batch_size=batch_size, keys=keys,
                                            label_key=label_key))
      yield int(shard), np.asarray(rows, np.int64), batch

  written = []
  for shard, rows, batch in progress.track(
      pipeline.prefetch(batches()), total=int(todo.sum()), unit="shards",
      desc=f"evaluate {split} ({len(maps.indices)} images, {batch_size} a shard, "
      f"{parallel.num_shards(mesh)} devices)"):
    real = len(rows)
    padded = np.pad(rows, (0, batch_size - real), mode="edge").astype(np.int32)
    host = {"image": batch["image"], "label": batch["label"].astype(np.int32),
            "index": padded}
    for kind, mask_key in feature.items():
      fitted = np.asarray(evaluation.fit_masks(batch[mask_key], (batch_size, *image_shape[:2]),
                                                mask_key))
      if f"has_{mask_key}" in batch:  # an image without its mask scores nothing, never 0
        fitted = fitted & np.asarray(batch[f"has_{mask_key}"], bool)[:, None, None]
      host[kind] = fitted
    for name in maps.methods:
      value = np.asarray(faithfulness.as_maps(np.asarray(maps[name].shard(shard))))
      host[name] = np.pad(value, [(0, batch_size - real)] + [(0, 0)] * (value.ndim - 1))
    host[evaluation.RANDOM] = np.asarray(evaluation.random_image_maps(
        random_key, padded, (batch_size, *image_shape[:2])))
    sharded = parallel.shard_batch(host, mesh)
    images = prepare(sharded["image"])
    results = split_entries(sharded["label"], {k: sharded[k] for k in feature})
    for name in scored:
      scores, curves = score_fn(global_variables, images, sharded["label"], sharded[name],
                                sharded.get("localisation"), sharded.get("marker"),
                                sharded["index"])
      results.update({f"{name}/{k}": v for k, v in scores.items()})
      results.update({f"{name}/{mode}_curve": curves[mode] for mode in CURVES})
    results = jax.tree_util.tree_map(np.asarray, results)  # replicated: whole on every process
    if shard % jax.process_count() == jax.process_index():
      for name, value in results.items():
        map_store.write_shard(scores_path, name, shard, np.asarray(value)[:real])
      written.append(shard)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("score_source: every shard written")
  return {"maps": explained, "maps_store": os.path.abspath(maps_path),
          "scores_store": os.path.abspath(scores_path), "methods": scored, "margin": margin,
          "masks": feature, "problems": problems, "num_shards": num_shards,
          "image_shape": tuple(image_shape),
          "fractions": faithfulness.curve_fractions(*image_shape[:2], score_options.patch_size,
                                                    score_options.curve_steps),
          "shards_scored": np.flatnonzero(todo).tolist(), "shards_written": written}


def read_scores(scores_store: str, methods: Sequence[str], fractions: np.ndarray
                ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]],
                           dict[str, np.ndarray]]:
  """Per method its per-image scores [N] (in the scorer's order) and mean curves ([1, S + 1],
  summed shard by shard, with the curves' `fractions`), and the split entries (labels, mask
  presence) of a finished store."""
  opened = map_store.open_map_store(scores_store)
  missing = {k: v for k, v in opened.missing().items() if v}
  if missing:
    raise ValueError(f"The score store {scores_store} is unfinished (missing shards: "
                     f"{missing}); rerun the evaluation to resume it.")
  per_image = {m: {} for m in methods}
  curves = {m: {"fractions": np.asarray(fractions)} for m in methods}
  split = {}
  for name in opened.methods:
    owner, score = name.split("/", 1)
    if owner == "_split":
      split[score] = np.concatenate(list(opened[name]))
    elif score.endswith("_curve"):
      total = sum(np.asarray(shard, np.float64).sum(axis=0) for shard in opened[name])
      curves[owner][score[:-len("_curve")]] = (total / len(opened[name]))[None]
    else:
      per_image[owner][score] = np.concatenate(list(opened[name]))
  return per_image, curves, split


def _images(source: pipeline.RandomAccessSource, indices: np.ndarray, keys: Sequence[str]
            ) -> dict[str, np.ndarray]:
  """The `keys` of the examples `indices`, stacked."""
  records = source.__getitems__([int(i) for i in indices])
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys if k in records[0]}


def evaluate_split(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str, *,
                   methods: Sequence[str] | None = None,
                   options: explain.Overrides | None = None,
                   score_options: evaluation.ScoreOptions = evaluation.ScoreOptions(),
                   gallery_rows: int = 6, seed: int = 0,
                   shuffled_labels_checkpoint: str | None = None, split: str | None = None,
                   batch_size: int = 32, model: str = runs.SELECTED) -> dict[str, Any]:
  """`evaluation.evaluate_run` with num_images=None: every image of `split`, streamed.

  Every process calls it; process 0 writes the leaderboard files and returns the summary (as
  `evaluate_run`, plus `stream`: the stores and shards, and `sample`: the images of the
  model-level checks); the other processes return their share (`stream`).
  """
  start = time.perf_counter()
  workdir = workdir_lib.prepare_workdir(workdir)
  selected = runs.restore_model(config, checkpoint_dir, model)
  which, model = model, selected.model
  variables, preprocess = selected.variables, selected.preprocess
  split = split or config.dataset.test_split
  source = pipeline.load_sources(config.dataset, [split])[split]
  methods = list(methods or registry.REGISTRY)
  evaluation.check_sensitivity_methods(score_options.sensitivity_methods)
  label_key = config.dataset.get("label_key", "label")
  key = jax.random.key(seed)
  methods_key, random_key, sanity_key = jax.random.split(key, 3)
  result = score_source(
      model, variables, preprocess, source, workdir, dataset_name=config.dataset.name,
      methods=methods, key=key, split=split, batch_size=batch_size, options=options,
      score_options=score_options, label_key=label_key,
      settings={**explain_dataset.run_settings(config, checkpoint_dir, selected, which),
                "seed": seed})
  stream = {k: result[k] for k in ("maps_store", "scores_store", "num_shards", "shards_scored",
                                   "shards_written")}
  stream.update(batch_size=batch_size, num_devices=result["maps"]["num_devices"],
                num_processes=result["maps"]["num_processes"])
  if jax.process_index() != 0:
    return {"split": split, "stream": stream}

  per_image, curves, split_entries = read_scores(result["scores_store"], result["methods"],
                                                 result["fractions"])
  labels = split_entries["label"]
  indices = np.arange(len(labels))
  problems = dict(result["problems"])
  coverage = {}
  for kind, mask_key in result["masks"].items():
    present = split_entries[f"{kind}_mask"]
    coverage[kind] = {"feature": mask_key, "num_images": int(len(present)),
                      "num_with_mask": int(present.sum()),
                      "indices_without_mask": indices[~present].tolist()}
    if not present.any():  # as the one-batch path: a kind no image has a mask of is not scored
      problems[kind] = evaluation.empty_mask_problem(config.dataset.name, mask_key,
                                                     present[:, None, None], indices)
      dropped = (evaluation.localisation_metrics(score_options.top_percents)
                 if kind == "localisation" else evaluation.MARKER_METRICS)
      for scores in per_image.values():
        for metric in dropped:
          scores.pop(metric, None)

  # The model-level checks: a class-balanced, seeded sample (Adebayo et al. use a sample).
  sample = explain.choose_indices(labels, score_options.sample_images, -1, seed=seed)
  sample_images = jax.jit(preprocess)(jnp.asarray(_images(source, sample, ("image",))["image"]))
  sample_targets = jnp.asarray(labels[sample], jnp.int32)
  maps = map_store.open_map_store(result["maps_store"])
  info = dict(result["maps"]["methods"])
  data_test = None
  if shuffled_labels_checkpoint:
    sample_maps, _ = explain.run_methods(model, variables, sample_images, sample_targets,
                                         methods, methods_key, options)
    data_test = evaluation.data_randomisation(config, shuffled_labels_checkpoint,
                                              sample_images, sample_targets, sample_maps,
                                              methods_key, options)
    for name, scores in data_test["per_image"].items():
      per_image[name].update(scores)
  sanity = evaluation.run_sanity_checks(model, variables, sample_images, sample_targets,
                                        {m: None for m in maps.methods}, per_image, sanity_key,
                                        options, score_options)
  sensitivity = [m for m in score_options.sensitivity_methods if m in maps.methods]
  for number, name in enumerate(sensitivity):
    per_image[name]["max_sensitivity"] = evaluation.sensitivity_scores(
        model, variables, sample_images, sample_targets,
        faithfulness.as_maps(maps[name][sample]), name,
        jax.random.fold_in(random_key, 2 + number), options, score_options)
  sample_note = (f"Parameter{' and data' if data_test else ''} randomisation"
                 f"{' and max-sensitivity' if sensitivity else ''} scored on a class-balanced "
                 f"sample of {len(sample)} of the {len(labels)} images (seed {seed}; "
                 "--sample_images), the other scores on every image.")
  logging.info("%s Sample: %s", sample_note, sample.tolist())

  shown = explain.choose_indices(labels, gallery_rows, -1, seed=seed)
  logging.info("The gallery shows a class-balanced sample of the split: indices %s.",
               shown.tolist())
  gallery_inputs = _images(source, shown, ("image", *result["masks"].values()))
  gallery_masks = None
  if "localisation" in result["masks"] and "localisation" not in problems:
    mask_key = result["masks"]["localisation"]
    gallery_masks = np.asarray(evaluation.fit_masks(
        gallery_inputs[mask_key], (len(shown), *result["image_shape"][:2]), mask_key))
  gallery = (gallery_inputs["image"],
             {m: np.asarray(faithfulness.as_maps(maps[m][shown])) for m in maps.methods},
             gallery_masks, shown)
  fields = {
      "checkpoint": os.path.abspath(checkpoint_dir), "split": split,
      "model": {"which": which, "epoch": selected.epoch},
      "indices": indices.tolist(), "targets": labels.tolist(), "num_images": int(len(labels)),
      "masks": {"localisation": result["masks"].get("localisation"),
                "marker": result["masks"].get("marker"),
                "localisation_coverage": coverage.get("localisation"),
                "marker_coverage": coverage.get("marker")},
      "stream": stream,
      "sample": {"indices": sample.tolist(), "num_images": int(len(sample)),
                 "note": sample_note}}
  return evaluation.write_results(
      workdir, fields, per_image=per_image, curves=curves, sanity=sanity, data_test=data_test,
      info=info, problems=problems, score_options=score_options, margin=result["margin"],
      seed=seed, options=options, gallery=gallery,
      shuffled_labels_checkpoint=shuffled_labels_checkpoint, start=start)
