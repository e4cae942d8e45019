r"""Input-pipeline throughput (grain, PNG decode) per worker count, beside the train step's.

  python -m benchmarks.input_pipeline [--image_sizes=224,320] [--workers=0,1,2,N]
      [--num_images=384] [--batch_size=16] [--train_model=small_cnn|densenet169]

Prepares radiograph phantoms at each size (tfds array_record, PNG-encoded, in --data_dir, a
temporary folder by default), then reads one shuffled epoch through `pipeline.BatchStream` with
each worker count (0 = in this process; N = this machine's CPU count). Per setting it prints the
start-up seconds (to the first batch, spawning the workers included), the steady images/s of
the epoch's second half (the first half, at least two batches per worker, warms the workers up:
their first decodes import modules) and the seconds that stopping the workers takes; beside
them, the images/s of the jitted train step on the same batch size and size (`--train_model`:
the benchmarks' narrow custom CNN by default, DenseNet-169 for an accelerator). The input keeps
up when its images/s exceed the train step's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np
import optax

from benchmarks import common
from experiments import cli
from medxai_jax.data import pipeline
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.data.builders import phantoms as phantoms_builder
from medxai_jax.models import base
from medxai_jax.models import densenet
from medxai_jax.train import steps

_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["224", "320"], "Stored image sides, pixels.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2", "N"],
                             "Worker counts to time; N = os.cpu_count().")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 384, "Training images per size (one epoch).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per batch.")
_TRAIN_MODEL = flags.DEFINE_enum("train_model", "small_cnn", ["small_cnn", "densenet169"],
                                 "The model whose train step is timed beside the input.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3, "Timed train steps (after a warm-up).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where to prepare the phantoms ('' = a tmp dir).")


def worker_counts(values: list[str]) -> list[int]:
  """The --workers list as ints, N replaced by the CPU count (duplicates dropped, in order)."""
  counts = [os.cpu_count() or 1 if value.strip().upper() == "N" else int(value)
            for value in values]
  return list(dict.fromkeys(counts))


def input_rate(source: pipeline.RandomAccessSource, batch_size: int, workers: int) -> dict:
  """Start-up seconds and steady images/s of one shuffled epoch read with `workers` workers."""
  dataset = pipeline.batch_dataset(source, batch_size=batch_size, seed=0, shuffle=True,
                                   drop_remainder=True)
  warm_up = max(len(dataset) // 2, 2 * max(1, workers))
  if len(dataset) < warm_up + 2:
    raise ValueError(f"--num_images={len(source)} gives {len(dataset)} batch(es) of "
                     f"{batch_size}; {workers} workers need at least {warm_up + 2}.")
  start = time.perf_counter()
  stream = pipeline.BatchStream(dataset, workers=workers)
  next(stream)
  first = time.perf_counter()
  for _ in range(warm_up - 1):
    next(stream)
  warm = end = time.perf_counter()
  rest = 0
  for _ in stream:  # the timing stops at the last batch: the end of the stream closes it
    rest += 1
    end = time.perf_counter()
  closed = time.perf_counter()
  return {"workers": workers, "startup_seconds": round(first - start, 3),
          "images_per_second": common.rate(rest * batch_size, end - warm),
          "close_seconds": round(closed - end, 3)}


def train_model(name: str, image_size: int) -> tuple[base.Classifier, str]:
  """The timed model and its description."""
  if name == "densenet169":
    return (densenet.densenet(depth=169, input_shape=(image_size, image_size, 1)),
            "DenseNet-169, 1 channel, one logit")
  return (common.small_cnn(image_size), "the benchmarks' narrow custom CNN (conv widths "
          "4-8-8-8-8, dense 16-16, benchmarks/common.small_cnn)")


def train_rate(name: str, image_size: int, batch_size: int, num_steps: int) -> dict:
  """Images/s of the jitted train step (Adam) on uint8 batches of the stored size."""
  model, description = train_model(name, image_size)
  tx = optax.adam(1e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 1), np.uint8),
           "label": rng.integers(0, model.num_classes, batch_size).astype(np.int32),
           "weight": np.ones(batch_size, np.float32)}
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx,
      preprocess=preprocess_lib.make_preprocess_fn(model.input_shape)), donate_argnums=0)
  state, stats = step(state, batch)  # compiles, warms up
  jax.block_until_ready(stats)
  start = time.perf_counter()
  for _ in range(num_steps):
    state, stats = step(state, batch)
  jax.block_until_ready(stats)
  seconds = (time.perf_counter() - start) / num_steps
  return {"model": description, "images_per_second": common.rate(batch_size, seconds)}


def main(argv):
  del argv
  counts = worker_counts(_WORKERS.value)
  batch_size = _BATCH_SIZE.value
  results = {"benchmark": "input_pipeline", "device": str(jax.devices()[0]),
             "cpu_count": os.cpu_count(), "batch_size": batch_size,
             "num_images": _NUM_IMAGES.value, "sizes": {}}
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = _DATA_DIR.value or scratch
    for size in (int(value) for value in _IMAGE_SIZES.value):
      with contextlib.redirect_stdout(sys.stderr):  # tfds prints its progress; stdout is JSON
        builder = phantoms_builder.load_phantoms_builder(
            data_dir, image_size=size, num_train=_NUM_IMAGES.value, num_validation=1,
            num_test=1)
      source = builder.as_data_source(split="train")
      results["sizes"][str(size)] = {
          "input": [input_rate(source, batch_size, workers) for workers in counts],
          "train_step": train_rate(_TRAIN_MODEL.value, size, batch_size, _TRAIN_STEPS.value)}
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  cli.run(main)
