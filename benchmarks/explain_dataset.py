r"""Streaming a split into a map store vs explaining it in one in-memory batch.

  python -m benchmarks.explain_dataset [--num_images=96] [--image_size=64] [--batch_size=16]
      [--methods=gradients,grad_cam,smoothgrad]
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.explain_dataset
  python -m benchmarks.explain_dataset --mode=evaluate --num_images=2000 --methods=gradients

--mode=evaluate streams the leaderboard instead (`evaluation_stream.score_source`, then the
per-image scores read back and bootstrapped as `evaluate_run` does) and prints its seconds, the
stores' bytes and the peak resident memory; run it at two --num_images to see that the peak
does not grow with the split (the records come from a fixed pool of 64 phantoms, so the source
holds no more memory for a larger split either).

Prints one JSON object: images/s of `explain_dataset.explain_source` (a custom CNN with random
weights on phantoms in memory, every local device) and of `explain.run_methods` on all the
images in one batch (the in-memory path), both first runs including compilation; per method the
seconds per image without compilation of both; the seconds of a rerun after one method's shards
were deleted, and of one with every shard present (the resume check alone); the store's bytes;
the process's peak resident memory before, after streaming and after the in-memory path (the
stream's peak should not grow with --num_images); and the largest |difference| between the two paths' maps of the deterministic methods.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from experiments import cli
from medxai_jax import explain
from medxai_jax import explain_dataset
from medxai_jax import map_store
from medxai_jax.attribution import registry
from medxai_jax.data import phantoms
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import custom_cnn

_NUM_IMAGES = flags.DEFINE_integer("num_images", 96, "Images of the split.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side (pixels).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per shard (a multiple of the devices).")
_METHODS = flags.DEFINE_list("methods", ["gradients", "grad_cam", "smoothgrad"], "Methods.")
_MODE = flags.DEFINE_enum("mode", "explain", ["explain", "evaluate"],
                          "explain: the map store vs one batch; evaluate: the streamed "
                          "leaderboard's time and peak memory.")
POOL = 64  # distinct phantoms of --mode=evaluate's source


class _Source:
  """In-memory records (what a TFDS data source gives)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitems__(self, indices):
    return [{"image": self._images[i], "label": self._labels[i]} for i in indices]


class _PoolSource:
  """`num_images` records cycling through a fixed pool of phantoms (memory independent of the
  split's size), with the phantoms' lesion and marker masks."""

  def __init__(self, examples: dict[str, np.ndarray], num_images: int):
    self._examples, self._num = examples, num_images

  def __len__(self) -> int:
    return self._num

  def __getitems__(self, indices):
    pool = len(self._examples["label"])
    return [{key: self._examples[key][i % pool]
             for key in ("image", "label", "lesion_mask", "marker_mask")} for i in indices]


def _evaluate(model, variables, preprocess, size: int) -> None:
  """--mode=evaluate: the streamed leaderboard of --num_images pool records."""
  from medxai_jax.analysis import evaluation
  from medxai_jax.analysis import evaluation_stream
  from medxai_jax.analysis import faithfulness

  examples = phantoms.generate_phantoms(POOL, seed=0,
                                        config=phantoms.PhantomConfig(image_size=size))
  examples["label"] = examples["label"].astype(np.int64)
  source = _PoolSource(examples, _NUM_IMAGES.value)
  options = evaluation.ScoreOptions(curve_steps=10, road_percentages=(20.0, 60.0))
  root = tempfile.mkdtemp(prefix="evaluation_stream_bench_")
  try:
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    result = evaluation_stream.score_source(
        model, variables, preprocess, source, root, dataset_name="radiograph_phantoms",
        methods=registry.check_names(_METHODS.value), key=jax.random.key(0),
        batch_size=_BATCH.value, score_options=options)
    stream_seconds = time.perf_counter() - start
    rss_stream = _peak_rss_mb()
    start = time.perf_counter()
    per_image, _, _ = evaluation_stream.read_scores(result["scores_store"], result["methods"],
                                                    result["fractions"])
    board = {name: faithfulness.summarise(scores, num_resamples=options.num_resamples)
             for name, scores in per_image.items()}
    bootstrap_seconds = time.perf_counter() - start
    store_bytes = {name: sum(os.path.getsize(os.path.join(d, f))
                             for d, _, files in os.walk(result[f"{name}_store"]) for f in files)
                   for name in ("maps", "scores")}
    n = _NUM_IMAGES.value
    print(json.dumps({
        "mode": "evaluate", "devices": jax.device_count(), "num_images": n, "image_size": size,
        "batch_size": _BATCH.value, "methods": result["methods"],
        "num_shards": result["num_shards"],
        "stream_images_per_second_first_run": round(n / stream_seconds, 2),
        "read_and_bootstrap_seconds": round(bootstrap_seconds, 3), "store_bytes": store_bytes,
        "peak_rss_mb": {"before": rss_before, "after_stream": rss_stream,
                        "after_bootstrap": _peak_rss_mb()},
        "deletion_auc_mean": {m: round(b["deletion_auc"].mean, 4) for m, b in board.items()}},
        indent=1))
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _peak_rss_mb() -> float:
  """This process's peak resident memory so far (MiB; Linux reports KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str]) -> None:
  del argv
  size = _IMAGE_SIZE.value
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(size, size, 1),
                                conv_widths=(8, 16, 16, 16, 16), dense_widths=(32,))
  variables = common.random_variables(model)
  preprocess = preprocess_lib.make_preprocess_fn((size, size, 1), (0.5,), (0.25,))
  if _MODE.value == "evaluate":
    _evaluate(model, variables, preprocess, size)
    return
  examples = phantoms.generate_phantoms(_NUM_IMAGES.value, seed=0,
                                        config=phantoms.PhantomConfig(image_size=size))
  source = _Source(examples["image"], examples["label"].astype(np.int64))
  methods = registry.check_names(_METHODS.value)
  key = jax.random.key(0)
  overrides = {"num_samples": 8, "chunk_size": 8}
  root = tempfile.mkdtemp(prefix="explain_dataset_bench_")
  store = os.path.join(root, "maps")
  try:
    def stream():
      return explain_dataset.explain_source(model, variables, preprocess, source, store,
                                            methods=methods, key=key,
                                            batch_size=_BATCH.value, overrides=overrides)

    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    result = stream()
    first = time.perf_counter() - start
    rss_stream = _peak_rss_mb()
    shutil.rmtree(os.path.join(store, methods[0]))
    start = time.perf_counter()
    stream()
    one_method = time.perf_counter() - start
    start = time.perf_counter()
    stream()
    resume_check = time.perf_counter() - start

    start = time.perf_counter()
    images = jax.jit(preprocess)(jnp.asarray(examples["image"]))
    targets = jnp.asarray(examples["label"], jnp.int32)
    in_memory, memory_info = explain.run_methods(model, variables, images, targets, methods,
                                                 key, overrides)
    memory_seconds = time.perf_counter() - start
    rss_memory = _peak_rss_mb()

    opened = map_store.open_map_store(store)
    deterministic = [m for m in methods if not registry.get(m).takes_key]
    difference = {m: float(np.abs(np.concatenate(list(opened[m])) - in_memory[m]).max())
                  for m in deterministic}
    store_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(store)
                      for f in files)
    n = _NUM_IMAGES.value
    print(json.dumps({
        "devices": jax.device_count(), "num_images": n, "image_size": size,
        "batch_size": _BATCH.value, "methods": methods, "num_shards": result["num_shards"],
        "stream_images_per_second_first_run": round(n / first, 2),
        "stream_rerun_one_method_seconds": round(one_method, 3),
        "stream_resume_check_seconds": round(resume_check, 3),
        "in_memory_images_per_second_first_run": round(n / memory_seconds, 2),
        "store_bytes": store_bytes,
        "peak_rss_mb": {"before": rss_before, "after_stream": rss_stream,
                        "after_in_memory": rss_memory}, "max_abs_difference_vs_in_memory": difference,
        "stream_seconds_per_image": {m: result["methods"][m]["seconds_per_image"]
                                     for m in methods},
        "in_memory_seconds_per_image": {m: memory_info[m]["seconds_per_image"] for m in methods},
        "stream_compile_seconds": {m: result["methods"][m]["compile_seconds"] for m in methods}},
        indent=1))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main)
