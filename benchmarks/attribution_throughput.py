r"""Throughput of every attribution method, vectorised against naive Python loops, and IG memory.

  python -m benchmarks.attribution_throughput [--arch=densenet169] [--image_size=224]
      [--batch_size=8] [--num_steps=64] [--num_samples=32] [--chunk_size=4]
      [--methods=gradients,smoothgrad,ig,blur_ig,guided_ig,xrai,fast_xrai,loop_ig,loop_smoothgrad]
      [--memory_steps=64,256] [--warmup=1] [--repeats=1]

Method names are the registry's (`medxai_jax.attribution.registry`); every logits-only method
that jits whole can be timed (occlusion and rise too, with the registry's defaults), and
--num_steps / --num_samples / --chunk_size override the registry's options of every method that
has them. Prints one JSON object. Per method: the jit compile time (lower + compile, ahead of
time), then `warmup` untimed and `repeats` timed calls of the compiled function; images/s = batch / mean
seconds. The model has random weights (numpy He-normal draws, benchmarks.common,
BatchNorm the identity);
the inputs are the first synthetic radiographs (phantoms, seed 0), gray repeated to RGB.
- IG, Blur IG: `num_steps` gradient evaluations per image, `chunk_size` steps vmapped per
  gradient batch (batch_size * chunk_size images), the chunks summed by lax.scan. Guided IG:
  `num_steps` sequential steps (one gradient batch each, a scan). SmoothGrad: `num_samples`
  noisy copies, chunked likewise.
- XRAI / Fast XRAI: IG with the black and white baselines (`num_steps` each, so 2 * num_steps
  gradients per image; chunk_size // 2 steps per gradient batch, the same batch size as IG),
  jitted, then host segmentation (scikit-image) and ranking. The IG part and the segmentation
  are measured once and shared by both; the JSON splits the seconds into the three parts.
- loop_ig / loop_smoothgrad: the PAIR-saliency style baseline: a Python loop that calls one
  jitted gradient function of the same batch once per step / noise sample, with the path point /
  noise made in numpy on the host and the gradients accumulated in numpy.
  `speedup_vectorised_over_loop` is vectorised images/s over loop images/s.
- Peak memory of IG at each of `memory_steps` (same chunk_size, and unchunked at the first):
  temp + argument + output bytes of the compiled executable's memory_analysis(), which XLA
  fills in on the CPU too (compile only, nothing runs).
- loop_overhead_probe: `scan_probe_chunks` gradient chunks run from a Python loop, inside a
  lax.scan (as the library's chunking does) and inside an unrolled scan: on XLA:CPU (jax 0.10.2)
  the rolled scan runs the same convolution gradients several times slower.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench_common
from experiments import cli
from medxai_jax.attribution import common
from medxai_jax.attribution import integrated
from medxai_jax.attribution import registry
from medxai_jax.attribution import xrai
from medxai_jax.models import base
from medxai_jax.models import custom_cnn
from medxai_jax.models import densenet

# The registry's logits-only methods jitted whole, XRAI's two rankings and the loop baselines.
VECTORISED = tuple(name for name in registry.names("logits") if not registry.get(name).host)
METHODS = (*VECTORISED, "xrai", "fast_xrai", "loop_ig", "loop_smoothgrad")
DEFAULT_METHODS = ("gradients", "smoothgrad", "ig", "blur_ig", "guided_ig", "xrai", "fast_xrai",
                   "loop_ig", "loop_smoothgrad")
ARCHS = ("densenet121", "densenet169", "densenet201", "custom_cnn")

_ARCH = flags.DEFINE_enum("arch", "densenet169", ARCHS, "Model (random weights).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input size.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Input channels.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_STEPS = flags.DEFINE_integer("num_steps", 64, "Path steps of IG, Blur IG, Guided IG, XRAI's IG.")
_SAMPLES = flags.DEFINE_integer("num_samples", 32, "SmoothGrad noise samples.")
_CHUNK = flags.DEFINE_integer("chunk_size", 4, "Steps / samples vmapped per gradient batch.")
_METHODS = flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"Subset of {METHODS}.")
_MEMORY_STEPS = flags.DEFINE_list("memory_steps", ["64", "256"], "IG step counts for memory.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls.")
_SCAN_PROBE = flags.DEFINE_integer(
    "scan_probe_chunks", 4, "Gradient chunks of the loop-overhead probe (0 skips it).")


def build_model(arch: str, image_size: int, channels: int) -> base.Classifier:
  """The benchmarked classifier: a DenseNet (one logit) or the small custom CNN (3 classes)."""
  shape = (image_size, image_size, channels)
  if arch == "custom_cnn":
    return custom_cnn.custom_cnn(num_outputs=3, input_shape=shape, conv_widths=(4, 8, 8, 8, 8),
                                 dense_widths=(16, 16), init_std=None)
  return densenet.densenet(depth=int(arch.removeprefix("densenet")), num_outputs=1,
                           input_shape=shape)


def peak_bytes(executable: Any) -> dict[str, int]:
  """temp, argument, output and total bytes from a compiled executable's memory_analysis()."""
  analysis = executable.memory_analysis()
  sizes = {"temp": int(analysis.temp_size_in_bytes),
           "argument": int(analysis.argument_size_in_bytes),
           "output": int(analysis.output_size_in_bytes)}
  sizes["total"] = sum(sizes.values())
  sizes["total_mib"] = round(sizes["total"] / 2**20, 1)
  return sizes


def loop_ig(grad_fn: Callable[..., jax.Array], variables: base.Variables, images: np.ndarray,
            targets: jax.Array, num_steps: int) -> np.ndarray:
  """IG from a zero baseline as a Python loop: one jitted gradient call per trapezoid node."""
  nodes, weights = integrated.quadrature("riemann_trapezoid", num_steps)
  total = np.zeros_like(images)
  for alpha, weight in zip(nodes, weights):
    total += weight * np.asarray(grad_fn(variables, alpha * images, targets))
  return images * total


def loop_smoothgrad(grad_fn: Callable[..., jax.Array], variables: base.Variables,
                    images: np.ndarray, targets: jax.Array, num_samples: int,
                    noise_level: float = 0.15, seed: int = 0) -> np.ndarray:
  """SmoothGrad as a Python loop: numpy noise, one jitted gradient call per sample."""
  rng = np.random.default_rng(seed)
  spread = images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True)
  total = np.zeros_like(images)
  for _ in range(num_samples):
    noisy = images + rng.standard_normal(images.shape).astype(np.float32) * noise_level * spread
    total += np.asarray(grad_fn(variables, noisy, targets))
  return total / num_samples


def scan_probe(model: base.Classifier, variables: base.Variables, images: jax.Array,
               targets: jax.Array, chunk_size: int, num_chunks: int) -> dict[str, Any]:
  """The same gradient chunks (chunk_size * B images each) run three ways, seconds and memory.

  host_loop: one jitted chunk called num_chunks times from Python; scan: lax.scan over the
  chunks (what common.chunked_sum does); scan_unrolled: the same scan with unroll=True.
  """
  alphas = jnp.arange(1, num_chunks + 1, dtype=jnp.float32) / num_chunks
  tiled_targets = common.tile_batch(targets, chunk_size)

  def chunk_gradients(variables: base.Variables, alpha: jax.Array) -> jax.Array:
    points = common.tile_batch(images, chunk_size) * alpha
    grads = common.input_gradients(model.logits_fn(variables), points, tiled_targets)
    return grads.reshape((chunk_size,) + images.shape).sum(axis=0)

  def scanned(variables: base.Variables, unroll: int | bool) -> jax.Array:
    step = lambda total, alpha: (total + chunk_gradients(variables, alpha), None)
    return jax.lax.scan(step, jnp.zeros_like(images), alphas, unroll=unroll)[0]

  one_chunk, _ = bench_common.compiled(chunk_gradients, variables, alphas[0])
  host_seconds, _ = bench_common.timed(lambda: [one_chunk(variables, alpha) for alpha in alphas], 1, 1)
  result = {"chunks": num_chunks, "images_per_chunk": chunk_size * images.shape[0],
            "host_loop": {"seconds": round(host_seconds, 3),
                          "peak_mib_per_chunk": peak_bytes(one_chunk)["total_mib"]}}
  for name, unroll in (("scan", 1), ("scan_unrolled", True)):
    executable, _ = bench_common.compiled(functools.partial(scanned, unroll=unroll), variables)
    seconds, _ = bench_common.timed(lambda: executable(variables), 1, 1)
    result[name] = {"seconds": round(seconds, 3),
                    "peak_mib": peak_bytes(executable)["total_mib"]}
  return result


def of_variables(method: Callable[..., jax.Array], model: base.Classifier, **options: Any
                 ) -> Callable[[base.Variables, jax.Array, jax.Array], jax.Array]:
  """(variables, images, targets) -> method(model.logits_fn(variables), images, targets)."""
  return lambda variables, images, targets: method(model.logits_fn(variables), images, targets,
                                                   **options)


def registered(name: str, model: base.Classifier, key: jax.Array, overrides: dict[str, Any]
               ) -> Callable[[base.Variables, jax.Array, jax.Array], jax.Array]:
  """A registered logits-only method with the registry's defaults and these shared overrides,
  as a function of (variables, images, targets)."""
  spec = registry.get(name)
  options = registry.method_options([name], overrides)[name]
  method_key = key if spec.takes_key else None
  return lambda variables, images, targets: spec(model.logits_fn(variables), images, targets,
                                                 key=method_key, **options)


def main(argv):
  del argv
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise ValueError(f"--methods has unknown entries {unknown}; choose from {METHODS}.")
  batch, steps, samples, chunk = _BATCH.value, _STEPS.value, _SAMPLES.value, _CHUNK.value
  warmup, repeats = _WARMUP.value, _REPEATS.value
  model = build_model(_ARCH.value, _IMAGE_SIZE.value, _CHANNELS.value)
  variables = bench_common.random_variables(model)
  rng = np.random.default_rng(0)
  host_images = bench_common.phantom_batch(batch, _IMAGE_SIZE.value, _CHANNELS.value)
  images = jnp.asarray(host_images)
  targets = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
  key = jax.random.key(0)
  shared = {"num_steps": steps, "num_samples": samples, "chunk_size": chunk}
  vectorised = {name: registered(name, model, key, shared) for name in VECTORISED}
  methods: dict[str, dict[str, Any]] = {}
  outputs: dict[str, np.ndarray] = {}
  for name, fn in vectorised.items():
    if name not in _METHODS.value:
      continue
    executable, compile_seconds = bench_common.compiled(fn, variables, images, targets)
    seconds, output = bench_common.timed(lambda: executable(variables, images, targets), warmup, repeats)
    outputs[name] = np.asarray(output)
    methods[name] = {"compile_seconds": round(compile_seconds, 1),
                     "seconds_per_batch": round(seconds, 3),
                     "images_per_second": bench_common.rate(batch, seconds),
                     "finite": bool(np.isfinite(outputs[name]).all())}

  if {"xrai", "fast_xrai"} & set(_METHODS.value):
    attribute = of_variables(xrai.xrai_attributions, model, num_steps=steps,
                             chunk_size=max(chunk // 2, 1))
    executable, compile_seconds = bench_common.compiled(attribute, variables, images, targets)
    attribution_seconds, attributions = bench_common.timed(
        lambda: executable(variables, images, targets), warmup, repeats)
    attributions = np.asarray(attributions)
    segmentation_seconds, segments = bench_common.timed(
        lambda: [xrai.segment_masks(image) for image in host_images], 0, repeats)
    for name, method in (("xrai", xrai.xrai), ("fast_xrai", xrai.fast_xrai)):
      if name not in _METHODS.value:
        continue
      ranking_seconds, _ = bench_common.timed(
          lambda: method(model.logits_fn(variables), images, targets, attributions=attributions,
                         segments=segments), 0, repeats)
      total = attribution_seconds + segmentation_seconds + ranking_seconds
      methods[name] = {
          "compile_seconds": round(compile_seconds, 1), "seconds_per_batch": round(total, 3),
          "images_per_second": bench_common.rate(batch, total),
          "seconds_split": {"attribution_ig_2_baselines": round(attribution_seconds, 3),
                            "segmentation_host": round(segmentation_seconds, 3),
                            "ranking_host": round(ranking_seconds, 3)},
          "regions_per_image": round(float(np.mean([len(s) for s in segments])), 1),
          "finite": bool(np.isfinite(attributions).all())}

  loops = {"loop_ig": ("ig", lambda grad: loop_ig(grad, variables, host_images, targets, steps)),
           "loop_smoothgrad": ("smoothgrad", lambda grad: loop_smoothgrad(
               grad, variables, host_images, targets, samples))}
  if set(loops) & set(_METHODS.value):
    grad_fn, compile_seconds = bench_common.compiled(
        lambda v, x, t: common.input_gradients(model.logits_fn(v), x, t), variables, images,
        targets)
    for name, (vectorised_name, run_loop) in loops.items():
      if name not in _METHODS.value:
        continue
      seconds, output = bench_common.timed(lambda: run_loop(grad_fn), warmup, repeats)
      entry = {"compile_seconds": round(compile_seconds, 1),
               "seconds_per_batch": round(seconds, 3), "images_per_second": bench_common.rate(batch, seconds)}
      if vectorised_name in methods:
        entry["speedup_vectorised_over_loop"] = round(
            methods[vectorised_name]["images_per_second"] / entry["images_per_second"], 2)
        if name == "loop_ig":  # same quadrature, same baseline: the maps must agree
          reference = outputs[vectorised_name]
          entry["max_abs_difference_to_vectorised"] = float(
              f"{np.abs(output - reference).max():.3g}")
          entry["max_abs_vectorised"] = float(f"{np.abs(reference).max():.3g}")
      methods[name] = entry

  memory = {}
  memory_steps = [int(value) for value in _MEMORY_STEPS.value]
  for index, num_steps in enumerate(memory_steps):
    chunks = [chunk] + ([num_steps] if index == 0 and num_steps != chunk else [])
    for chunk_size in chunks:
      executable, _ = bench_common.compiled(of_variables(
          integrated.integrated_gradients, model, num_steps=num_steps, chunk_size=chunk_size),
          variables, images, targets)
      memory[f"ig_{num_steps}_steps_chunk_{chunk_size}"] = peak_bytes(executable)

  probe = (scan_probe(model, variables, images, targets, chunk, _SCAN_PROBE.value)
           if _SCAN_PROBE.value else {})

  result = {
      "benchmark": "attribution_throughput", "device": str(jax.devices()[0]),
      "jax_version": jax.__version__, "arch": _ARCH.value,
      "input_shape": list(model.input_shape), "batch_size": batch,
      "num_parameters": base.parameter_count(variables), "num_steps": steps,
      "num_samples": samples, "chunk_size": chunk, "warmup_calls": warmup,
      "timed_calls": repeats, "methods": methods,
      "ig_peak_memory_bytes": memory, "loop_overhead_probe": probe,
      "memory_note": "temp + argument + output bytes of the compiled executable's "
                     "memory_analysis() (CPU); nothing was run for these",
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
