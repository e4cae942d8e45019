"""Explanation methods behind one calling convention, and explaining a trained run.

Every method takes (model, variables, images [B,H,W,C], targets [B], key, options) and returns
maps [B,H,W] or [B,H,W,C]; `run_methods` runs a list of them (jitted where they can be) and
`explain_run` explains the selected model of a training run (`experiments/explain.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.attribution import crm
from medxai_jax.attribution import gradients
from medxai_jax.attribution import integrated
from medxai_jax.attribution import perturbation
from medxai_jax.attribution import xrai
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.train import loop
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.viz import figures

# A method: (model, variables, images, targets, key, options) -> maps [B, H, W(, C)].
MethodFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class ExplainOptions:
  """Cost knobs shared by the methods."""

  steps: int = 64
  samples: int = 32
  chunk_size: int = 16
  # Occlusion: a square window spanning every channel, slid with this stride (pixels).
  occlusion_window: int = 16
  occlusion_stride: int = 8
  occlusion_baseline: float = 0.0
  # RISE: masks, grid cells along the image's shorter side (the paper's s = 7; the cell size
  # is ceil(min(H, W) / rise_grid) pixels) and probability of keeping a cell.
  rise_masks: int = 1000
  rise_grid: int = 7
  rise_p_keep: float = 0.5


def _gradients(model, variables, images, targets, key, options):
  del key, options
  return gradients.vanilla_gradients(model.logits_fn(variables), images, targets)


def _smoothgrad(model, variables, images, targets, key, options):
  return gradients.smoothgrad(model.logits_fn(variables), images, targets, key=key,
                              num_samples=options.samples, chunk_size=options.chunk_size)


def _ig(model, variables, images, targets, key, options):
  del key
  return integrated.integrated_gradients(model.logits_fn(variables), images, targets,
                                         num_steps=options.steps,
                                         chunk_size=options.chunk_size)


def _blur_ig(model, variables, images, targets, key, options):
  del key
  return integrated.blur_ig(model.logits_fn(variables), images, targets,
                            num_steps=options.steps, chunk_size=options.chunk_size)


def _guided_ig(model, variables, images, targets, key, options):
  del key
  return integrated.guided_ig(model.logits_fn(variables), images, targets,
                              num_steps=options.steps)


def _grad_cam(model, variables, images, targets, key, options):
  del key, options
  return cam.grad_cam(model.split(variables), images, targets)


def _cam(model, variables, images, targets, key, options):
  del key, options
  return cam.cam(model.split(variables), images, targets)


def _xrai(model, variables, images, targets, key, options):
  del key
  return xrai.xrai(model.logits_fn(variables), images, targets, num_steps=options.steps)


def _fast_xrai(model, variables, images, targets, key, options):
  del key
  return xrai.fast_xrai(model.logits_fn(variables), images, targets, num_steps=options.steps)


def _occlusion(model, variables, images, targets, key, options):
  del key
  return perturbation.occlusion(model.logits_fn(variables), images, targets,
                                window=options.occlusion_window,
                                strides=options.occlusion_stride,
                                baseline=options.occlusion_baseline,
                                chunk_size=options.chunk_size)


def _rise(model, variables, images, targets, key, options):
  return perturbation.rise(model.logits_fn(variables), images, targets, key=key,
                           num_masks=options.rise_masks,
                           cell_size=perturbation.grid_cell_size(images.shape, options.rise_grid),
                           p_keep=options.rise_p_keep, chunk_size=options.chunk_size)


def _crm(model, variables, images, targets, key, options):
  del targets, key, options  # CRM sums over every class score (004, eq. 6)
  return crm.crm(model.split(variables), images)


# The methods, in the column order of the figures.
METHODS: dict[str, MethodFn] = {
    "gradients": _gradients,
    "smoothgrad": _smoothgrad,
    "ig": _ig,
    "blur_ig": _blur_ig,
    "guided_ig": _guided_ig,
    "xrai": _xrai,
    "fast_xrai": _fast_xrai,
    "cam": _cam,
    "grad_cam": _grad_cam,
    "crm": _crm,
    "occlusion": _occlusion,
    "rise": _rise,
}
# Methods with a host-side part (XRAI's segmentation, CRM's numerical head check): called as
# they are (their device parts are jitted inside); the others are jitted whole here.
HOST_METHODS = frozenset({"xrai", "fast_xrai", "crm"})
# Methods that need a GAP + dense head: checked eagerly on one image, skipped with a note when
# the model's head is not one.
NEEDS_GAP_HEAD = frozenset({"cam"})


def gap_head_problem(model: base.Classifier, variables: base.Variables, images: jax.Array,
                     targets: jax.Array) -> str | None:
  """Why CAM cannot read this model's head, or None when it can."""
  del targets
  return cam.gap_head_problem(model.split(variables), images[:1])


def run_methods(model: base.Classifier, variables: base.Variables, images: jax.Array,
                targets: jax.Array, methods: Sequence[str], key: jax.Array,
                options: ExplainOptions = ExplainOptions()
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Maps of each method (numpy) and per-method timings / skip reasons."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; choose from {list(METHODS)}.")
  # The methods are jitted below, where they cannot see NaN pixels: check the concrete batch.
  common.check_inputs(model, images)
  common.check_method_inputs(model.logits_fn(variables), images, targets)
  maps, info = {}, {}
  head_problem = (gap_head_problem(model, variables, images, targets)
                  if NEEDS_GAP_HEAD.intersection(methods) else None)
  for index, name in enumerate(methods):
    if name in NEEDS_GAP_HEAD and head_problem:
      info[name] = {"skipped": head_problem}
      continue
    method_key = jax.random.fold_in(key, index)
    start = time.perf_counter()
    if name in HOST_METHODS:  # one call: its time includes compiling its jitted parts
      compiled = lambda v, x, t, k, fn=METHODS[name]: fn(model, v, x, t, k, options)  # noqa: E731
    else:
      fn = jax.jit(lambda v, x, t, k, fn=METHODS[name]: fn(model, v, x, t, k, options))
      compiled = fn.lower(variables, images, targets, method_key).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = np.asarray(jax.block_until_ready(compiled(variables, images, targets, method_key)))
    seconds = time.perf_counter() - start
    maps[name] = result
    info[name] = {"compile_seconds": None if name in HOST_METHODS else round(compile_seconds, 2),
                  "seconds_per_image": round(seconds / len(images), 4)}
  return maps, info


def choose_indices(labels: np.ndarray, num_images: int, label: int,
                   indices: Sequence[int] = (), seed: int = 0) -> np.ndarray:
  """Test-split indices to explain: `indices` if given, else a seeded sample of `num_images`.

  label >= 0: a random sample (seeded) of the images of that label. label = -1: a class-balanced
  sample, round-robin over the classes present (in class order) each drawn from a seeded
  permutation of its images, so every class gets num_images / K images, one more or less, and
  the first images shown alternate classes; a class with too few images gives its turn to the
  others. Records are often stored in class (or body-part) order, so the first N would not be
  a fair choice. Returns fewer than `num_images` (with a warning) only when the split holds
  fewer candidates.
  """
  labels = np.asarray(labels)
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
                indices: Sequence[int] = (), options: ExplainOptions = ExplainOptions(),
                seed: int = 0) -> dict[str, Any]:
  """Explains the selected model of a training run; writes maps, the grid figure and JSON.

  The images are `choose_indices(labels, num_images, label, indices, seed)` of the test split.
  """
  model, variables = loop.restore_selected_model(config, checkpoint_dir)
  workdir = loop.prepare_workdir(workdir)
  _, _, preprocess = loop.build_components(config)
  examples = load_split(config, config.dataset.test_split,
                        ("image", "label", "lesion_mask", "index"))
  chosen = choose_indices(examples["label"], num_images, label, indices, seed)
  images = jax.jit(preprocess)(jnp.asarray(examples["image"][chosen]))
  targets = jnp.asarray(examples["label"][chosen], jnp.int32)
  methods = list(methods or METHODS)
  maps, info = run_methods(model, variables, images, targets, methods,
                           jax.random.key(seed), options)
  for name, value in maps.items():
    np.save(os.path.join(workdir, f"maps_{name}.npy"), value)
  figure = figures.plot_attribution_grid(
      examples["image"][chosen], maps, os.path.join(workdir, "attributions.png"),
      masks=examples.get("lesion_mask", None) if "lesion_mask" in examples else None,
      titles=[f"#{i}" for i in chosen])
  summary = {"checkpoint": os.path.abspath(checkpoint_dir), "split": config.dataset.test_split,
             "indices": chosen.tolist(), "targets": np.asarray(targets).tolist(),
             "label": label, "seed": seed,
             "options": dataclasses.asdict(options), "methods": info,
             "figure": os.path.basename(figure)}
  metrics_lib.write_json(os.path.join(workdir, "explain.json"), summary)
  return summary
