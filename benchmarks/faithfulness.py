r"""Deletion + insertion curves: batched (the library) against one model call per step.

  python -m benchmarks.faithfulness [--arch=custom_cnn] [--image_size=96] [--num_images=32]
      [--curve_steps=100] [--patch_size=4] [--chunk_size=16] [--repeats=1]

Prints one JSON object. Both ways compute the deletion and the insertion curve (blur
replacement, `curve_steps` steps of `patch_size` patches, so 2 x (curve_steps + 1) evaluations of
`num_images` images) for random maps on the first phantoms, with random weights:
- batched: `faithfulness.deletion_curve` + `insertion_curve` in one jitted function (each curve
  a `lax.map` over the steps, `chunk_size` steps vmapped per model call);
- per_step: a Python loop that builds each step's images on the device and calls one jitted
  model function per step, as a loop-based library does.
Each is compiled first (compile seconds reported) and run once untimed; the curves of the two
ways are compared (max abs difference).

With --quantus_metrics (default on) the metrics of `explanation_metrics` run on the same model,
images and maps (the gradient maps for those that re-explain), each batched (vmapped / lax.map,
one jitted call) against a Python loop in the same run, reported under "quantus_metrics":
- road (MoRF, noise 0, --road_percentages): against one jitted imputation + model call per step;
- sparseness, complexity, relevance_mass, rank_accuracy (a centred square as the mask): against
  numpy formulas looped over the images;
- max_sensitivity (--sensitivity_samples draws) and mprt (top-down, every layer of the model,
  `faithfulness.fresh_parameters`): against one jitted gradient call per draw / per step.
Each entry has the batched compile and run seconds, the loop's seconds and the max abs
difference of the per-image values.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench_common
from experiments import cli
from medxai_jax.analysis import explanation_metrics as em
from medxai_jax.analysis import faithfulness
from medxai_jax.attribution import api
from medxai_jax.attribution import gradients
from medxai_jax.models import base
from medxai_jax.models import custom_cnn
from medxai_jax.models import densenet

ARCHS = ("custom_cnn", "densenet121", "densenet169")
_ARCH = flags.DEFINE_enum("arch", "custom_cnn", ARCHS, "Model (random weights).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 96, "Square input size.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images per curve.")
_CURVE_STEPS = flags.DEFINE_integer("curve_steps", 100, "Deletion / insertion steps.")
_PATCH = flags.DEFINE_integer("patch_size", 4, "Side of the removed patches (pixels).")
_CHUNK = flags.DEFINE_integer("chunk_size", 16, "Steps vmapped per model call (batched).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls of each way.")
_QUANTUS = flags.DEFINE_boolean("quantus_metrics", True, "Also benchmark explanation_metrics.")
_ROAD_PERCENTAGES = flags.DEFINE_list("road_percentages", [str(p) for p in range(5, 100, 10)],
                                      "ROAD percentages (Quantus's default: 1,3,...,99).")
_SENSITIVITY_SAMPLES = flags.DEFINE_integer("sensitivity_samples", 10,
                                            "Max-sensitivity perturbations per image.")


def build_model(arch: str, image_size: int) -> base.Classifier:
  """The demo's custom CNN (one logit, gray input) or a DenseNet (one logit, RGB)."""
  if arch == "custom_cnn":
    return custom_cnn.custom_cnn(num_outputs=1, input_shape=(image_size, image_size, 1),
                                 conv_widths=(32, 64, 64, 64, 64), dense_widths=(96, 96),
                                 init_std=None)
  return densenet.densenet(depth=int(arch.removeprefix("densenet")), num_outputs=1,
                           input_shape=(image_size, image_size, 3))


def per_step_curves(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: jax.Array, maps: jax.Array, *, num_steps: int, patch_size: int
                    ) -> dict[str, np.ndarray]:
  """Deletion and insertion scores [B, S + 1] with one jitted model call per step."""
  ranks = faithfulness.unit_ranks(maps, patch_size)[..., None]
  _, num_units = faithfulness.unit_grid(images.shape[1], images.shape[2], patch_size)
  counts = faithfulness.step_counts(num_units, num_steps)
  filled = faithfulness.replacement_images(images, "blur")
  probability = jax.jit(lambda v, x: faithfulness.target_probabilities(model.logits(v, x),
                                                                        targets))
  step_images = jax.jit(lambda count, start, end: jnp.where(ranks < count, end, start))
  curves = {}
  for mode, (start, end) in (("deletion", (images, filled)), ("insertion", (filled, images))):
    scores = [probability(variables, step_images(int(count), start, end)) for count in counts]
    curves[mode] = np.stack(jax.device_get(scores), axis=1)
  return curves


def _numpy_scores(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
  """Sparseness, complexity, relevance mass and rank accuracy by numpy, one image at a time."""
  rows = []
  for saliency, mask in zip(maps.astype(np.float64), masks):
    magnitude = np.sort(np.abs(saliency).ravel()) + 1e-7
    n = magnitude.size
    gini = np.sum((2 * np.arange(1, n + 1) - n - 1) * magnitude) / (n * magnitude.sum())
    shares = np.abs(saliency).ravel() / np.abs(saliency).sum()
    entropy = -np.sum(shares * np.log(shares + 1e-12))
    mass = saliency[mask].sum() / saliency.sum()
    top = np.argsort(-saliency.ravel(), kind="stable")[:mask.sum()]
    rows.append((gini, entropy, mass, mask.ravel()[top].mean()))
  columns = np.asarray(rows).T
  return dict(zip(("sparseness", "complexity", "relevance_mass", "rank_accuracy"), columns))


def _entry(compile_seconds: float, seconds: float, loop_seconds: float, batched: Any,
           looped: Any) -> dict[str, Any]:
  """One metric's timings and the max abs difference of batched and looped values."""
  return {"batched": {"compile_seconds": round(compile_seconds, 2), "seconds": round(seconds, 3)},
          "loop_seconds": round(loop_seconds, 3),
          "max_abs_difference": float(np.nanmax(np.abs(np.asarray(batched, np.float64)
                                                       - np.asarray(looped, np.float64))))}


def quantus_metrics(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    targets: jax.Array) -> dict[str, Any]:
  """Every explanation_metrics score batched against a Python loop (see the module docstring)."""
  repeats = _REPEATS.value
  percentages = tuple(float(p) for p in _ROAD_PERCENTAGES.value)
  explain_fn = lambda v, x: gradients.vanilla_gradients(model, v, x, targets).sum(-1)  # noqa: E731
  grads = jax.jit(explain_fn)(variables, images)
  maps = np.asarray(grads)
  size = images.shape[1]
  masks = np.zeros(maps.shape, bool)
  masks[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = True
  results = {}

  def road(images, maps):
    return em.road(model.logits_fn(variables), images, targets, maps, noise=0.0,
                   percentages=percentages).scores

  executable, compile_seconds = bench_common.compiled(road, images, grads)
  seconds, batched = bench_common.timed(lambda: executable(images, grads), 1, repeats)
  flat_ranks = np.argsort(np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable"),
                          axis=1, kind="stable")
  ranks = jnp.asarray(flat_ranks.reshape(maps.shape))
  counts = em.road_counts(size, images.shape[2], percentages)
  step = jax.jit(lambda count: (api.predicted_classes(model.logits(
      variables, em.noisy_linear_imputation(images, ranks < count, noise=0.0))) == targets
                                ).astype(jnp.float32))
  looped_road = lambda: np.stack([np.asarray(step(int(c))) for c in counts], 1)  # noqa: E731
  bench_common.timed(looped_road, 0, 1)  # compiles the loop's functions
  loop_seconds, looped = bench_common.timed(looped_road, 0, repeats)
  results["road_morf"] = {**_entry(compile_seconds, seconds, loop_seconds, batched, looped),
                          "percentages": len(percentages),
                          "mean_curve": np.round(np.asarray(batched).mean(0), 3).tolist()}

  def maps_only(maps, masks):
    return {"sparseness": em.sparseness(maps), "complexity": em.complexity(maps),
            "relevance_mass": em.relevance_mass_accuracy(maps, masks),
            "rank_accuracy": em.relevance_rank_accuracy(maps, masks)}

  executable, compile_seconds = bench_common.compiled(maps_only, grads, masks)
  seconds, batched = bench_common.timed(lambda: executable(grads, masks), 1, repeats)
  loop_seconds, looped = bench_common.timed(lambda: _numpy_scores(maps, masks), 0, repeats)
  for name in batched:
    results[name] = _entry(compile_seconds, seconds, loop_seconds, batched[name], looped[name])

  samples, key = _SENSITIVITY_SAMPLES.value, jax.random.key(1)

  def sensitivity(images, maps):
    return em.max_sensitivity(lambda x: explain_fn(variables, x), images, maps, key=key,
                              num_samples=samples)

  executable, compile_seconds = bench_common.compiled(sensitivity, images, grads)
  seconds, batched = bench_common.timed(lambda: executable(images, grads), 1, repeats)
  draws = em.uniform_perturbations(key, images.shape, samples, 0.2)
  explain_one = jax.jit(explain_fn)
  norms = np.linalg.norm(maps.reshape(len(maps), -1), axis=-1)
  looped_sensitivity = lambda: np.max([np.linalg.norm(  # noqa: E731
      (np.asarray(explain_one(variables, images + u)) - maps).reshape(len(maps), -1), axis=-1)
      / norms for u in draws], axis=0)
  bench_common.timed(looped_sensitivity, 0, 1)  # compiles the loop's functions
  loop_seconds, looped = bench_common.timed(looped_sensitivity, 0, repeats)
  results["max_sensitivity"] = {**_entry(compile_seconds, seconds, loop_seconds, batched, looped),
                                "num_samples": samples}

  layers = faithfulness.parameter_layers(model)
  fresh = faithfulness.fresh_parameters(model, variables, jax.random.key(2))

  def mprt(variables, images):
    return em.mprt(explain_fn, variables, images, fresh, layers).scores

  executable, compile_seconds = bench_common.compiled(mprt, variables, images)
  seconds, batched = bench_common.timed(lambda: executable(variables, images), 1, repeats)
  _, schedule = em.layer_schedule(layers, "top_down")
  leaf_layers = faithfulness.leaf_layer_indices(variables["params"], layers)
  randomised = jax.jit(lambda row: explain_fn(faithfulness.select_layers(
      variables, fresh, leaf_layers, row), images))
  similarity = jax.jit(em.rank_similarity)
  looped_mprt = lambda: np.stack([np.asarray(similarity(grads, randomised(row)))  # noqa: E731
                                  for row in schedule])
  bench_common.timed(looped_mprt, 0, 1)  # compiles the loop's functions
  loop_seconds, looped = bench_common.timed(looped_mprt, 0, repeats)
  results["mprt"] = {**_entry(compile_seconds, seconds, loop_seconds, batched, looped),
                     "layers": len(layers)}
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model = build_model(_ARCH.value, _IMAGE_SIZE.value)
  variables = bench_common.random_variables(model)
  channels = model.input_shape[-1]
  images = jnp.asarray(bench_common.phantom_batch(_NUM_IMAGES.value, _IMAGE_SIZE.value, channels))
  targets = jnp.ones((_NUM_IMAGES.value,), jnp.int32)
  maps = faithfulness.random_maps(jax.random.key(0), images.shape[:3])
  options = dict(num_steps=_CURVE_STEPS.value, patch_size=_PATCH.value, replacement="blur",
                 chunk_size=_CHUNK.value)

  def batched(variables, images, targets, maps):
    deletion = faithfulness.deletion_curve(model, variables, images, targets, maps, **options)
    insertion = faithfulness.insertion_curve(model, variables, images, targets, maps, **options)
    return {"deletion": deletion.scores, "insertion": insertion.scores}

  executable, compile_seconds = bench_common.compiled(batched, variables, images, targets, maps)
  batched_seconds, batched_curves = bench_common.timed(
      lambda: executable(variables, images, targets, maps), 1, _REPEATS.value)
  run_loop = lambda: per_step_curves(model, variables, images, targets, maps,  # noqa: E731
                                     num_steps=_CURVE_STEPS.value, patch_size=_PATCH.value)
  loop_first, _ = bench_common.timed(run_loop, 0, 1)  # includes compiling the step functions
  loop_seconds, loop_curves = bench_common.timed(run_loop, 0, _REPEATS.value)
  difference = max(float(np.abs(np.asarray(batched_curves[k]) - loop_curves[k]).max())
                   for k in ("deletion", "insertion"))
  evaluations = 2 * (_CURVE_STEPS.value + 1) * _NUM_IMAGES.value
  extra = {}
  if _QUANTUS.value:
    extra["quantus_metrics"] = quantus_metrics(model, variables, images, targets)
  print(json.dumps({
      "benchmark": "faithfulness", "device": str(jax.devices()[0]),
      "jax_version": jax.__version__, "arch": _ARCH.value, "image_size": _IMAGE_SIZE.value,
      "num_images": _NUM_IMAGES.value, "curve_steps": _CURVE_STEPS.value,
      "patch_size": _PATCH.value, "chunk_size": _CHUNK.value,
      "model_evaluations": evaluations,
      "batched": {"compile_seconds": round(compile_seconds, 2),
                  "seconds": round(batched_seconds, 3),
                  "images_per_second": bench_common.rate(_NUM_IMAGES.value, batched_seconds)},
      "per_step": {"first_call_seconds": round(loop_first, 3),
                   "seconds": round(loop_seconds, 3),
                   "images_per_second": bench_common.rate(_NUM_IMAGES.value, loop_seconds)},
      "speedup_batched_over_per_step": round(loop_seconds / batched_seconds, 2),
      "max_abs_curve_difference": difference,
      **extra,
  }, indent=2))


if __name__ == "__main__":
  cli.run(main)
