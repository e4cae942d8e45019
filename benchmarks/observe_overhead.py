r"""What watching a run costs: summary writes, progress updates, the per-epoch Grad-CAM images.

  python -m benchmarks.observe_overhead [--num_images=4] [--repeats=200]

Prints one JSON object: microseconds per `writer.scalars` call of the four step scalars
(tensorboardX, event file already open, flushed at the end), per `Progress.update`, and the compile and steady seconds
of the Grad-CAM summary images of the demo config's model (configs/demo.py, random weights) on
`--num_images` images, with the device it ran on.
"""

import json
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import common
from configs import demo
from medxai_jax.observe import progress
from medxai_jax.observe import summaries
from medxai_jax.train import components
from medxai_jax.train import loop

_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Grad-CAM summary images.")
_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed calls of the writer and progress.")


def writer_microseconds(repeats: int) -> float:
  """Microseconds per writer.scalars call of the training loop's four step scalars."""
  with tempfile.TemporaryDirectory() as workdir:
    writer = summaries.create_writer(workdir, enabled=True)
    writer.text(0, "warm-up", "opens the event file (imports tensorboardX) before the timer")
    start = time.perf_counter()
    for step in range(repeats):
      writer.scalars(step, {"train/loss": 0.5, "train/accuracy": 0.75,
                            "train/learning_rate": 1e-3, "train/images_per_second": 100.0})
    writer.close()
    return 1e6 * (time.perf_counter() - start) / repeats


def progress_microseconds(repeats: int) -> float:
  """Microseconds per Progress.update (lines logged at the default 10 s cadence)."""
  bar = progress.Progress(repeats, "benchmark", log=lambda line: None)
  start = time.perf_counter()
  for _ in range(repeats):
    bar.update()
  return 1e6 * (time.perf_counter() - start) / repeats


def grad_cam_seconds(num_images: int) -> dict:
  """Compile and steady seconds of the demo model's Grad-CAM summary images."""
  config = demo.get_config()
  model, _, preprocess = components.build_components(config)
  variables = common.random_variables(model)
  height, width, channels = model.input_shape
  rng = np.random.default_rng(0)
  fixed = {"images": rng.integers(0, 256, (num_images, height, width, channels), np.uint8),
           "labels": rng.integers(0, 2, num_images).astype(np.int32)}
  cam = jax.jit(lambda v, x, t: loop.grad_cam_inputs(model, preprocess, v, x, t))
  writer = summaries.NullWriter()
  start = time.perf_counter()
  loop.write_grad_cam_images(writer, 0, cam, variables, fixed)
  first = time.perf_counter() - start
  start = time.perf_counter()
  loop.write_grad_cam_images(writer, 1, cam, variables, fixed)
  steady = time.perf_counter() - start
  return {"input_shape": list(model.input_shape), "num_images": num_images,
          "first_call_seconds": round(first, 3), "steady_seconds": round(steady, 3)}


def main(argv):
  del argv
  print(json.dumps({
      "benchmark": "observe_overhead", "device": str(jax.devices()[0]),
      "jax_version": jax.__version__,
      "writer_scalars_us": round(writer_microseconds(_REPEATS.value), 1),
      "progress_update_us": round(progress_microseconds(_REPEATS.value), 2),
      "grad_cam_summary_images": grad_cam_seconds(_NUM_IMAGES.value)}, indent=2))


if __name__ == "__main__":
  app.run(main)
