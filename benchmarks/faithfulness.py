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
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench_common
from experiments import cli
from medxai_jax.analysis import faithfulness
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
  }, indent=2))


if __name__ == "__main__":
  cli.run(main)
