"""Explaining a Classifier with the registered methods, and explaining a trained run.

`run_methods` runs a list of methods of `attribution.registry` on a Classifier's images (each
method jitted whole unless it runs on the host, the split methods on the model cut at its last
conv layer) and `explain_run` explains the selected model of a training run
(`experiments/explain.py`). Methods and options are the registry's: `overrides` maps an option
name (e.g. 'num_steps') to a value for every selected method that has that option, or a method
name to that method's own options (e.g. {'ig': {'rule': 'pair_uniform'}}). A whole split,
streamed over every device and host into a sharded map store, is `explain_dataset`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.attribution import registry
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.observe import progress
from medxai_jax import runs
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import workdir as workdir_lib
from medxai_jax.viz import figures

Overrides = Mapping[str, Any]


def method_options(methods: Sequence[str], overrides: Overrides | None = None
                   ) -> dict[str, dict[str, Any]]:
  """Each method's options (`registry.method_options`)."""
  return registry.method_options(methods, overrides)


def method_maps(model: base.Classifier, variables: base.Variables, images: jax.Array,
                targets: jax.Array, name: str, key: jax.Array,
                options: Overrides | None = None) -> jax.Array:
  """The maps of one registered method on a Classifier (traceable unless the method is a host
  one): the spec called on `model.logits_fn(variables)` or `model.split(variables)`."""
  spec = registry.get(name)
  subject = (model.logits_fn(variables) if spec.needs == "logits"
             else model.split(variables, "last_conv"))
  return spec(subject, images, targets if spec.takes_targets else None,
              key=key if spec.takes_key else None, **dict(options or {}))


def gap_head_problem(model: base.Classifier, variables: base.Variables, images: jax.Array
                     ) -> str | None:
  """Why CAM cannot read this model's head (checked on the first image), or None if it can."""
  return cam.gap_head_problem(model.split(variables, "last_conv"), images[:1])


def run_methods(model: base.Classifier, variables: base.Variables, images: jax.Array,
                targets: api.Targets, methods: Sequence[str], key: jax.Array,
                overrides: Overrides | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Maps of each method (numpy) and per-method options, timings and skip reasons.

  Method i draws from `fold_in(key, i)`. A 'gap_split' method (CAM) is skipped, with the
  reason, when the model's head is not GAP + dense.
  """
  options = method_options(methods, overrides)
  # The methods are jitted below, where they cannot see NaN pixels: check the concrete batch.
  common.check_inputs(model, images)
  common.check_method_inputs(model.logits_fn(variables), images, targets)
  targets = api.resolve_targets(model.logits_fn(variables), images, targets)  # 'predicted', ints
  specs = [registry.get(name) for name in methods]
  head_problem = (gap_head_problem(model, variables, images)
                  if any(spec.needs == "gap_split" for spec in specs) else None)
  maps, info = {}, {}
  for index, spec in enumerate(progress.track(
      specs, desc=f"explain ({len(images)} images x {len(specs)} methods)", unit="methods")):
    name = spec.name
    if spec.needs == "gap_split" and head_problem:
      info[name] = {"skipped": head_problem, "options": options[name]}
      continue
    method_key = jax.random.fold_in(key, index)
    run = lambda v, x, t, k, name=name: method_maps(model, v, x, t, name, k,  # noqa: E731
                                                    options[name])
    start = time.perf_counter()
    if spec.host:  # one call: its time includes compiling its jitted parts
      compiled = run
    else:
      compiled = jax.jit(run).lower(variables, images, targets, method_key).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = np.asarray(jax.block_until_ready(compiled(variables, images, targets, method_key)))
    seconds = time.perf_counter() - start
    maps[name] = result
    info[name] = {"compile_seconds": None if spec.host else round(compile_seconds, 2),
                  "seconds_per_image": round(seconds / len(images), 4),
                  "options": options[name]}
  return maps, info


ALL = "all"


def parse_num_images(text: str | int, indices: Sequence[Any] = ()) -> int | None:
  """--num_images as a count >= 1, or None for 'all' (every image of the split: no label filter,
  so no --indices either)."""
  text = str(text).strip().lower()
  if text == ALL:
    if indices:
      raise ValueError(f"--num_images=all takes every image of the split; drop --indices "
                       f"({list(indices)}) or give --num_images a number.")
    return None
  try:
    count = int(text)
  except ValueError:
    raise ValueError(f"--num_images must be a number or 'all'; got {text!r}.") from None
  if count < 1:
    raise ValueError(f"--num_images must be at least 1 (or 'all'); got {count}.")
  return count


def choose_indices(labels: np.ndarray, num_images: int | None, label: int,
                   indices: Sequence[int] = (), seed: int = 0) -> np.ndarray:
  """Split indices to explain: `indices` if given, else a seeded sample of `num_images`, or
  every index of the split when `num_images` is None ('all': no label filter, no `indices`).

  label >= 0: a random sample (seeded) of the images of that label. label = -1: a class-balanced
  sample, round-robin over the classes present (in class order) each drawn from a seeded
  permutation of its images, so every class gets num_images / K images, one more or less, and
  the first images shown alternate classes; a class with too few images gives its turn to the
  others. Records are often stored in class (or body-part) order, so the first N would not be
  a fair choice. Returns fewer than `num_images` (with a warning) only when the split holds
  fewer candidates.
  """
  labels = np.asarray(labels)
  if num_images is None:
    if indices:
      raise ValueError(f"--num_images=all takes every image of the split; drop --indices "
                       f"({list(indices)}) or give --num_images a number.")
    return np.arange(len(labels))
  if indices:
    chosen = np.asarray([int(i) for i in indices])
    if chosen.min() < 0 or chosen.max() >= len(labels):
      raise ValueError(f"--indices must lie in [0, {len(labels)}); got {list(indices)}.")
    return chosen
  if num_images < 1:
    raise ValueError(f"--num_images must be at least 1; got {num_images}.")
  rng = np.random.default_rng(seed)
  if label >= 0:
    candidates = np.flatnonzero(labels == label)
    if not len(candidates):
      raise ValueError(f"No test image has label {label}; the labels present are "
                       f"{np.unique(labels).tolist()}.")
    chosen = rng.permutation(candidates)[:num_images]
  elif label == -1:
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
    order = [pool[turn] for turn in range(max(map(len, pools), default=0)) for pool in pools
             if turn < len(pool)]
    chosen = np.asarray(order[:num_images], np.int64)
  else:
    raise ValueError(f"--label must be a class index or -1 (any, class-balanced); got {label}.")
  if len(chosen) < num_images:
    logging.warning("Only %d test images %s; explaining %d, not --num_images=%d.",
                    len(chosen), "in all" if label < 0 else f"have label {label}", len(chosen),
                    num_images)
  return chosen


def load_split(config: ml_collections.ConfigDict, split: str,
               keys: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
  """Every example of a (small) split as numpy arrays, padding removed."""
  source = pipeline.load_sources(config.dataset, [split])[split]
  available = [k for k in keys if k in source[0]]
  batches = list(pipeline.iterate_batches(source, batch_size=256, keys=available))
  real = np.concatenate([b["weight"] > 0 for b in batches])
  return {key: np.concatenate([b[key] for b in batches])[real] for key in available}


def explain_run(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str, *,
                methods: Sequence[str] | None = None, num_images: int = 8, label: int = 1,
                indices: Sequence[int] = (), overrides: Overrides | None = None,
                seed: int = 0, split: str | None = None, model: str = runs.SELECTED
                ) -> dict[str, Any]:
  """Explains the selected model of a training run; writes maps, the grid figure and JSON.

  `model='best_so_far'` explains an unfinished run's best epoch so far instead
  (`runs.restore_model`); explain.json's `model` records which and its epoch.

  The images are `choose_indices(labels, num_images, label, indices, seed)` of `split`
  (default: the test split), explained in one batch; a whole split, streamed over every device
  into a map store, is `explain_dataset.explain_split_run`.
  """
  split = split or config.dataset.test_split
  selected = runs.restore_model(config, checkpoint_dir, model)
  which, model = model, selected.model
  variables, preprocess = selected.variables, selected.preprocess
  workdir = workdir_lib.prepare_workdir(workdir)
  examples = load_split(config, split, ("image", "label", "lesion_mask", "index"))
  chosen = choose_indices(examples["label"], num_images, label, indices, seed)
  images = jax.jit(preprocess)(jnp.asarray(examples["image"][chosen]))
  targets = jnp.asarray(examples["label"][chosen], jnp.int32)
  methods = list(methods or registry.REGISTRY)
  maps, info = run_methods(model, variables, images, targets, methods,
                           jax.random.key(seed), overrides)
  for name, value in maps.items():
    np.save(os.path.join(workdir, f"maps_{name}.npy"), value)
  figure = figures.plot_attribution_grid(
      examples["image"][chosen], maps, os.path.join(workdir, "attributions.png"),
      masks=examples["lesion_mask"][chosen] if "lesion_mask" in examples else None,
      titles=[f"#{i}" for i in chosen])
  summary = {"checkpoint": os.path.abspath(checkpoint_dir), "split": split,
             "indices": chosen.tolist(), "targets": np.asarray(targets).tolist(),
             "label": label, "seed": seed,
             "model": {"which": which, "epoch": selected.epoch},
             "overrides": json_options(overrides or {}),
             "options": json_options(shared_options(info)), "methods": json_options(info),
             "figure": os.path.basename(figure)}
  metrics_lib.write_json(os.path.join(workdir, "explain.json"), summary)
  return summary


def shared_options(info: Mapping[str, Any]) -> dict[str, Any]:
  """The options every method of a `run_methods` info that has them ran with the same value,
  e.g. {'num_steps': 64, 'num_samples': 32, 'chunk_size': 16} (for the report's summary)."""
  values: dict[str, list[Any]] = {}
  for entry in info.values():
    for option, value in (entry.get("options") or {}).items():
      values.setdefault(option, []).append(value)
  return {option: seen[0] for option, seen in values.items()
          if all(value == seen[0] for value in seen[1:])
          and isinstance(seen[0], (int, float, str, bool))}


def json_options(value: Any) -> Any:
  """Options as strict JSON: arrays become lists, tuples lists, other values stay."""
  if isinstance(value, Mapping):
    return {str(k): json_options(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [json_options(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value
