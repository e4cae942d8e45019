r"""Guided IG, batched and jitted, against PAIR saliency's one-image numpy loop.

  python -m benchmarks.guided_ig [--num_images=32] [--image_size=64] [--num_steps=200]
      [--fraction=0.25] [--max_dist=0.02] [--x64] [--repeats=1] [--noper_image_check]

Prints one JSON object. `ours`: integrated.guided_ig on the whole batch, jitted: its compile
time (lower + compile, ahead of time), then one untimed and `repeats` timed calls. `pair_loop`:
PAIR's algorithm (saliency 0.2.1, saliency/core/guided_ig.py: guided_ig_impl) transcribed here
in numpy, float64, one image at a time, calling the same jitted gradient function once per
step with a batch of one (the `saliency` package itself fails on NumPy >= 2.4: it passes
`interpolation=` to np.quantile). `gradients_only`: the same gradient evaluations alone, as the
batched scan of num_steps gradient batches and as the loop's num_images * num_steps calls: the
floor under either implementation; `beyond_gradients`: each total minus its gradients (the
selection rounds and path updates; differences of separate timings, so noisy). The maps'
differences: max |ours - PAIR| over all pixels, and per image max |ours - PAIR| / max |PAIR|
(its maximum over the images); `maps_one_image`:
the same for ours run on each image alone. XLA:CPU's float32 convolutions round a batch of 32
differently from a batch of one (gradients differ by ~1e-8), which can flip a near tie in the
selection and move the path: the one-image runs see PAIR's gradients exactly.
Model: benchmarks.common.small_cnn with random weights; inputs: the first phantoms (seed 0);
targets: random classes (seed 0); zero baseline. --x64 runs ours in float64 (jax_enable_x64).
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from benchmarks import common as bench_common
from medxai_jax.attribution import common
from medxai_jax.attribution import integrated

_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images in the batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Square input size (1 channel).")
_STEPS = flags.DEFINE_integer("num_steps", 200, "Guided IG steps (PAIR's default 200).")
_FRACTION = flags.DEFINE_float("fraction", 0.25, "Fraction of features moved per round.")
_MAX_DIST = flags.DEFINE_float("max_dist", 0.02, "Maximum deviation from the straight line.")
_X64 = flags.DEFINE_bool("x64", False, "Run ours in float64 (jax_enable_x64).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls of ours (after one untimed).")
_PER_IMAGE = flags.DEFINE_bool(
    "per_image_check", True, "Also run ours on each image alone (a batch of one, untimed) and "
    "compare those maps with PAIR's.")

PAIR_EPSILON = 1e-9  # PAIR's tolerance of math.isclose


def pair_guided_ig(grad_fn: Callable[[np.ndarray], np.ndarray], x_input: np.ndarray,
                   x_baseline: np.ndarray, steps: int, fraction: float, max_dist: float
                   ) -> tuple[np.ndarray, int]:
  """PAIR's Guided IG loop for one image in float64, and how many selection rounds it ran."""
  x_input = np.asarray(x_input, np.float64)
  x_baseline = np.asarray(x_baseline, np.float64)
  difference = x_input - x_baseline
  x = x_baseline.copy()
  attributions = np.zeros_like(x_input)
  l1_total = np.abs(difference).sum()
  rounds = 0
  if l1_total == 0:
    return attributions, rounds
  for step in range(steps):
    grad_actual = np.asarray(grad_fn(x))
    grad = grad_actual.copy()
    alpha = (step + 1.0) / steps
    alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    x_min = x_baseline + difference * alpha_min
    x_max = x_baseline + difference * alpha_max
    l1_target = l1_total * (1 - (step + 1) / steps)
    gamma = np.inf
    while gamma > 1.0:
      rounds += 1
      x_old = x.copy()
      with np.errstate(divide="ignore", invalid="ignore"):
        x_alpha = np.where(difference != 0, (x - x_baseline) / difference, np.nan)
      x_alpha[np.isnan(x_alpha)] = alpha_max
      lagging = x_alpha < alpha_min
      x[lagging] = x_min[lagging]
      l1_current = np.abs(x - x_input).sum()
      if math.isclose(l1_target, l1_current, rel_tol=PAIR_EPSILON, abs_tol=PAIR_EPSILON):
        attributions += (x - x_old) * grad_actual
        break
      grad[x == x_max] = np.inf
      threshold = np.quantile(np.abs(grad), fraction, method="lower")
      selected = (np.abs(grad) <= threshold) & (grad != np.inf)
      l1_selected = (np.abs(x - x_max) * selected).sum()
      gamma = (l1_current - l1_target) / l1_selected if l1_selected > 0 else np.inf
      if gamma > 1.0:
        x[selected] = x_max[selected]
      else:
        x[selected] = (x + gamma * (x_max - x))[selected]
      attributions += (x - x_old) * grad_actual
  return attributions, rounds


def map_differences(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """Max absolute difference, and the largest per-image max difference over max |reference|."""
  absolute = np.abs(ours - reference)
  per_image = absolute.reshape(len(ours), -1).max(axis=1)
  scale = np.abs(reference).reshape(len(ours), -1).max(axis=1)
  return {"max_abs_difference": float(f"{absolute.max():.3g}"),
          "max_relative_difference": float(f"{(per_image / scale).max():.3g}"),
          "max_abs_pair_map": float(f"{scale.max():.3g}")}


def main(argv):
  del argv
  if _X64.value:
    jax.config.update("jax_enable_x64", True)
  dtype = np.float64 if _X64.value else np.float32
  size, batch, steps = _IMAGE_SIZE.value, _NUM_IMAGES.value, _STEPS.value
  fraction, max_dist = _FRACTION.value, _MAX_DIST.value
  model = bench_common.small_cnn(size)
  variables = bench_common.random_variables(model)
  host_images = bench_common.phantom_batch(batch, size).astype(dtype)
  images = jnp.asarray(host_images)
  targets = jnp.asarray(np.random.default_rng(0).integers(0, model.num_classes, batch),
                        jnp.int32)

  run = lambda v, x, t: integrated.guided_ig(model.logits_fn(v), x, t, num_steps=steps,  # noqa: E731
                                             fraction=fraction, max_dist=max_dist)
  executable, compile_seconds = bench_common.compiled(run, variables, images, targets)
  seconds, maps = bench_common.timed(lambda: executable(variables, images, targets), 1,
                                     _REPEATS.value)
  maps = np.asarray(maps, np.float64)

  gradient, _ = bench_common.compiled(
      lambda v, x, t: common.input_gradients(model.logits_fn(v), x, t), variables, images[:1],
      targets[:1])
  pair_maps, rounds = [], 0
  start = time.perf_counter()
  for index in range(batch):
    grad_fn = lambda x, i=index: gradient(variables, x[None].astype(dtype), targets[i:i + 1])[0]
    image_map, image_rounds = pair_guided_ig(grad_fn, host_images[index],
                                             np.zeros_like(host_images[index]), steps,
                                             fraction, max_dist)
    pair_maps.append(image_map)
    rounds += image_rounds
  pair_seconds = time.perf_counter() - start
  pair_maps = np.stack(pair_maps)

  def scanned_gradients(variables, images):
    step = lambda x, _: (x + 1e-3 * common.input_gradients(model.logits_fn(variables), x, targets), None)
    return jax.lax.scan(step, images, None, length=steps)[0]

  scan_executable, _ = bench_common.compiled(scanned_gradients, variables, images)
  single = jax.jit(run)
  scan_seconds, _ = bench_common.timed(lambda: scan_executable(variables, images), 1, 1)
  loop_seconds, _ = bench_common.timed(
      lambda: [gradient(variables, images[i:i + 1], targets[i:i + 1])
               for _ in range(steps) for i in range(batch)], 1, 1)

  result = {
      "benchmark": "guided_ig", "device": str(jax.devices()[0]), "jax_version": jax.__version__,
      "dtype_ours": np.dtype(dtype).name, "num_images": batch, "image_size": size,
      "num_steps": steps, "fraction": fraction, "max_dist": max_dist,
      "ours": {"compile_seconds": round(compile_seconds, 2), "seconds": round(seconds, 3),
               "timed_calls": _REPEATS.value},
      "pair_loop": {"seconds": round(pair_seconds, 3), "selection_rounds": rounds,
                    "rounds_per_step": round(rounds / (batch * steps), 2),
                    "implementation": "numpy transcription of saliency 0.2.1 guided_ig_impl"},
      "speedup_ours_over_pair": round(pair_seconds / seconds, 2),
      "gradients_only": {"batched_scan_seconds": round(scan_seconds, 3),
                         "one_image_loop_seconds": round(loop_seconds, 3)},
      "beyond_gradients": {
          "ours_seconds": round(seconds - scan_seconds, 3),
          "pair_loop_seconds": round(pair_seconds - loop_seconds, 3),
          # None when timing noise leaves ours no measurable time beyond its gradients.
          "speedup_ours_over_pair": (round((pair_seconds - loop_seconds)
                                           / (seconds - scan_seconds), 1)
                                     if seconds - scan_seconds > 0.05 * seconds else None)},
      "maps": map_differences(maps, pair_maps),
      "maps_one_image": (map_differences(np.concatenate(
          [np.asarray(single(variables, images[i:i + 1], targets[i:i + 1]), np.float64)
           for i in range(batch)]), pair_maps) if _PER_IMAGE.value else None),
      "finite": bool(np.isfinite(maps).all()),
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
