r"""CRM for a batch: the vectorised methods against a naive per-cell loop over the same jitted head.

  python -m benchmarks.crm [--batch_size=8] [--densenet_size=320] [--vgg_size=300] [--repeats=3]

Random-initialised DenseNet-169 (sigmoid head, 320 px -> 10x10 last-conv cells) and VGG16 with
004's GAP head (300 px -> 18x18 cells, 7 outputs). The last-conv map of the batch is computed
once; then, after one warm-up call each, we time (median of --repeats) every CRM method of
`medxai_jax.attribution.crm` on it and the naive loop (for every cell: zero it with an eager
`.at[].set`, call the jitted head, accumulate the squared score changes). Prints one JSON object
with the times, the speed-ups over the naive loop, the largest deviation from it relative to the
map's maximum, and the forward-pass time that any CRM adds to.
"""

import functools
import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from medxai_jax.attribution import crm
from medxai_jax.models import densenet
from medxai_jax.models import vgg

_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_DENSENET_SIZE = flags.DEFINE_integer("densenet_size", 320, "DenseNet-169 input size (0: skip).")
_VGG_SIZE = flags.DEFINE_integer("vgg_size", 300, "VGG16-GAP input size (0: skip).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per method (median reported).")
_CHUNK = flags.DEFINE_integer("chunk_size", 32, "Cells per vmapped step for 'ablation'.")


def _median_seconds(fn, repeats: int) -> float:
  """Median wall time of fn() (blocking on its result) over `repeats` calls, after a warm-up."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _naive_crm(head, variables, feature_map):
  """Eq. 6-7 one cell at a time: an eager zeroing and one jitted head call per cell."""
  scores = head(variables, feature_map)
  _, height, width, _ = feature_map.shape
  rows = []
  for l in range(height):
    row = []
    for m in range(width):
      ablated = head(variables, feature_map.at[:, l, m, :].set(0.0))
      row.append(jnp.square(scores - ablated).sum(axis=-1))
    rows.append(jnp.stack(row, axis=-1))
  return jnp.stack(rows, axis=-2)


def measure(name: str, model, batch_size: int, repeats: int, chunk_size: int) -> dict:
  """Forward time, CRM time per method and for the naive loop, speed-ups and agreement."""
  height, width, channels = model.input_shape
  start = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(0))
  jax.block_until_ready(variables)
  init_seconds = time.perf_counter() - start
  images = jax.random.uniform(jax.random.key(1), (batch_size, height, width, channels))
  features = jax.jit(functools.partial(model.features, tap="last_conv"))
  start = time.perf_counter()
  feature_map = jax.block_until_ready(features(variables, images))
  first_forward = time.perf_counter() - start
  forward_seconds = _median_seconds(lambda: features(variables, images), 1)
  head = jax.jit(model.head)
  resolved = crm.resolve_method(model.split(variables), images, feature_map=feature_map)

  methods = {
      "ablation": jax.jit(lambda v, a: crm.ablation_relevance(
          model.split(v), images, feature_map=a, chunk_size=chunk_size)),
      "pooled": jax.jit(lambda v, a: crm.pooled_relevance(model.split(v), images, feature_map=a)),
      "closed_form": jax.jit(lambda v, a: crm.closed_form_relevance(model.split(v), images,
                                                                    feature_map=a)),
  }
  naive_map = np.asarray(_naive_crm(head, variables, feature_map))
  naive_seconds = _median_seconds(lambda: _naive_crm(head, variables, feature_map), repeats)
  results = {}
  for method, fn in methods.items():
    seconds = _median_seconds(lambda fn=fn: fn(variables, feature_map), repeats)
    deviation = np.max(np.abs(np.asarray(fn(variables, feature_map)) - naive_map))
    results[method] = {"seconds": round(seconds, 5),
                       "speedup_vs_naive": round(naive_seconds / seconds, 1),
                       "max_deviation_rel": float(deviation / naive_map.max())}
  return {
      "model": name, "input_shape": [height, width, channels], "batch_size": batch_size,
      "cells": list(feature_map.shape[1:3]), "channels": int(feature_map.shape[-1]),
      "num_outputs": model.num_outputs, "init_seconds": round(init_seconds, 2),
      "forward_compile_and_first_call_seconds": round(first_forward, 2),
      "forward_seconds": round(forward_seconds, 4), "auto_method": resolved,
      "naive_loop_seconds": round(naive_seconds, 5),
      "naive_loop_head_calls": int(feature_map.shape[1] * feature_map.shape[2]),
      "methods": results,
      "auto_speedup_vs_naive": results[resolved]["speedup_vs_naive"],
      "auto_end_to_end_speedup": round((forward_seconds + naive_seconds)
                                       / (forward_seconds + results[resolved]["seconds"]), 2),
  }


def main(argv):
  del argv
  settings = []
  if _DENSENET_SIZE.value:
    size = _DENSENET_SIZE.value
    settings.append(("densenet169_sigmoid", densenet.densenet(
        depth=169, num_outputs=1, head="sigmoid", input_shape=(size, size, 3))))
  if _VGG_SIZE.value:
    size = _VGG_SIZE.value
    settings.append(("vgg16_gap", vgg.vgg16(num_outputs=7, head="gap",
                                           input_shape=(size, size, 3))))
  result = {
      "benchmark": "crm", "device": str(jax.devices()[0]), "device_count": jax.device_count(),
      "jax_version": jax.__version__, "repeats": _REPEATS.value,
      "ablation_chunk_size": _CHUNK.value,
      "settings": [measure(name, model, _BATCH.value, _REPEATS.value, _CHUNK.value)
                   for name, model in settings],
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
