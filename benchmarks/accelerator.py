r"""One command that measures the training and explanation costs on whatever device JAX has.

  python -m benchmarks.accelerator                  # DenseNet-169 at 320, batch 32 (one GPU)
  python -m benchmarks.accelerator --tiny           # a tiny DenseNet at 32 px, batch 2 (CPU)
  python -m benchmarks.accelerator --batch_size=64 --dtypes=float32,bfloat16 --reference=none

Prints one JSON object with these sections:
- `device`: platform, device kind and count, jax/jaxlib versions, host cores.
- `train_step`: per compute dtype (float32; bfloat16 = bfloat16 activations and convolutions
  with float32 parameters, Adam and a float32 loss, the mixed precision torch AMP also uses):
  first-call seconds (compile + one step), images/s over `train_steps` steps, and the compiled
  executable's memory_analysis() bytes.
- `forward`: per dtype, inference images/s of the jitted forward pass.
- `torch`: torchvision's DenseNet of the same architecture on the same device (`cuda` when JAX
  runs on a GPU and torch sees one, `cpu` when JAX runs on the CPU), float32 and AMP
  (`torch.autocast(..., dtype=torch.bfloat16)`), train and forward images/s; absent with the
  reason otherwise (no torch, torch without CUDA, `--reference=none`).
- `attribution`: IG, SmoothGrad, Guided IG, Fast XRAI and CRM through
  `medxai_jax.explain.run_methods` (jitted whole, or with their device parts jitted for the
  host methods Fast XRAI and CRM, whose time is that of a second call, or of the first call
  under --tiny), beside a Python loop of
  one jitted function of the same batch: IG one gradient per path step, SmoothGrad one per
  noise sample (both make the same maps' work), Guided IG `num_steps` gradients and Fast XRAI
  2 x `num_steps` (its black and white IG): lower bounds of their loops, which also select
  pixels or segment on the host; CRM one jitted head call per cell of the last conv map.
  `speedup_batched_over_loop` = loop seconds / batched seconds.
- `input_pipeline`: not measured until the Grain pipeline exists.
- `peak_memory`: `jax.local_devices()[0].memory_stats()` peak bytes after everything ran
  (GPUs and TPUs report it; XLA:CPU reports none, so it reads `available: false` there).
Models have random weights, inputs are seeded normal noise; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from experiments import cli
from medxai_jax import explain
from medxai_jax.attribution import registry
from medxai_jax.models import base
from medxai_jax.models import densenet

METHODS = ("ig", "smoothgrad", "guided_ig", "fast_xrai", "crm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

def _define_flags() -> None:
  """Defines the command-line flags (only when run as a binary: the tests import this module
  beside other benchmarks whose flags share names such as --num_steps)."""
  flags.DEFINE_bool("tiny", False, "Tiny sizes (CPU smoke run): DenseNet with one layer per "
                    "block, 32 px, batch 2, few steps; overrides the size flags.")
  flags.DEFINE_integer("image_size", 320, "Square input size.")
  flags.DEFINE_integer("batch_size", 32, "Images per train / forward step.")
  flags.DEFINE_integer("train_steps", 5, "Timed steps after the first call.")
  flags.DEFINE_list("dtypes", list(DTYPES), f"Compute dtypes, of {list(DTYPES)}.")
  flags.DEFINE_integer("attribution_batch_size", 8, "Images explained.")
  flags.DEFINE_integer("num_steps", 32, "Path steps of IG, Guided IG, Fast XRAI.")
  flags.DEFINE_integer("num_samples", 16, "SmoothGrad noise samples.")
  flags.DEFINE_integer("chunk_size", 8, "Steps / samples vmapped per gradient batch.")
  flags.DEFINE_list("methods", list(METHODS), f"Attribution methods, of {METHODS}.")
  flags.DEFINE_enum("reference", "torch", ["torch", "none"],
                    "Measure torchvision's model on the same device too.")


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings, or a ValueError naming the flag whose value cannot be used."""
  for name, known in (("dtypes", DTYPES), ("methods", METHODS)):
    unknown = sorted(set(settings[name]) - set(known))
    if unknown:
      raise ValueError(f"--{name} has unknown entries {unknown}; choose from {list(known)}.")
  for name in ("image_size", "batch_size", "train_steps", "attribution_batch_size", "num_steps",
               "num_samples", "chunk_size"):
    if settings[name] < 1:
      raise ValueError(f"--{name} must be >= 1; got {settings[name]}.")
  if "ig" in settings["methods"] and settings["num_steps"] < 2:
    raise ValueError(f"--num_steps must be >= 2 for IG's trapezoid rule; got "
                     f"{settings['num_steps']}.")
  return settings


def settings_from_flags() -> dict[str, Any]:
  """The benchmark's sizes: the flags, or the tiny CPU smoke sizes under --tiny."""
  values = flags.FLAGS
  settings = {"tiny": values.tiny, "image_size": values.image_size,
              "batch_size": values.batch_size, "train_steps": values.train_steps,
              "dtypes": list(values.dtypes),
              "attribution_batch_size": values.attribution_batch_size,
              "num_steps": values.num_steps, "num_samples": values.num_samples,
              "chunk_size": values.chunk_size, "methods": list(values.methods),
              "architecture": {"block_sizes": list(densenet.BLOCK_SIZES[169]),
                               "growth_rate": 32, "stem_width": 64}, "num_outputs": 1000}
  if values.tiny:
    settings.update(tiny_settings(settings["dtypes"], settings["methods"]))
  return check_settings(settings)


def tiny_settings(dtypes: list[str] | tuple[str, ...] = tuple(DTYPES),
                  methods: list[str] | tuple[str, ...] = METHODS) -> dict[str, Any]:
  """The --tiny sizes: a DenseNet with one layer per block, 32 px, batch 2, 4 steps (the host
  methods are timed on their first call, compiling included)."""
  return {"tiny": True, "image_size": 32, "batch_size": 2, "train_steps": 2,
          "dtypes": list(dtypes), "attribution_batch_size": 2, "num_steps": 4,
          "num_samples": 4, "chunk_size": 2, "methods": list(methods), "num_outputs": 10,
          "architecture": {"block_sizes": [1, 1, 1, 1], "growth_rate": 4, "stem_width": 8}}


def build_model(settings: dict[str, Any], dtype: Any = jnp.float32) -> base.Classifier:
  """The benchmarked DenseNet (softmax head) in compute dtype `dtype`."""
  architecture = settings["architecture"]
  size = settings["image_size"]
  return densenet.densenet(num_outputs=settings["num_outputs"], head="softmax",
                           input_shape=(size, size, 3),
                           block_sizes=tuple(architecture["block_sizes"]),
                           growth_rate=architecture["growth_rate"],
                           stem_width=architecture["stem_width"], dtype=dtype)


def seconds_per_call(call: Callable[[], Any], repeats: int) -> float:
  """Mean seconds of `repeats` calls (each waited for)."""
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(call())
  return (time.perf_counter() - start) / repeats


def memory_bytes(executable: Any) -> dict[str, int] | None:
  """temp + argument + output bytes of a compiled executable (None where XLA gives none)."""
  analysis = executable.memory_analysis()
  if analysis is None:
    return None
  sizes = {"temp": int(analysis.temp_size_in_bytes),
           "argument": int(analysis.argument_size_in_bytes),
           "output": int(analysis.output_size_in_bytes)}
  sizes["total_mib"] = round(sum(sizes.values()) / 2**20, 1)
  return sizes


def inputs(batch_size: int, size: int, num_outputs: int, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded N(0, 1) images [B, size, size, 3] (float32) and integer labels [B]."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch_size, size, size, 3)).astype(np.float32),
          rng.integers(0, num_outputs, batch_size))


def train_and_forward(settings: dict[str, Any], dtype_name: str) -> tuple[dict, dict]:
  """Our Adam train step and inference forward pass in one compute dtype."""
  model = build_model(settings, DTYPES[dtype_name])
  batch = settings["batch_size"]
  host_images, host_labels = inputs(batch, settings["image_size"], settings["num_outputs"])
  images, labels = jnp.asarray(host_images), jnp.asarray(host_labels)
  variables = jax.jit(model.init)(jax.random.key(0))
  tx = optax.adam(1e-4)
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  opt_state = tx.init(params)

  def loss_fn(params, others, images, labels):
    logits, updates = model.train_apply({"params": params, **others}, images,
                                        jax.random.key(1))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return loss.mean(), updates

  def train_step(params, others, opt_state, images, labels):
    grads, updates = jax.grad(loss_fn, has_aux=True)(params, others, images, labels)
    deltas, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, deltas), {**others, **updates}, opt_state

  start = time.perf_counter()
  donate = () if jax.devices()[0].platform == "cpu" else (0, 1, 2)  # XLA:CPU cannot donate
  step = jax.jit(train_step, donate_argnums=donate).lower(
      params, others, opt_state, images, labels).compile()
  state = jax.block_until_ready(step(params, others, opt_state, images, labels))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(settings["train_steps"]):
    state = step(*state, images, labels)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / settings["train_steps"]
  train = {"first_call_seconds": round(first, 2), "seconds_per_step": round(seconds, 4),
           "images_per_second": round(batch / seconds, 2), "compiled_memory": memory_bytes(step)}

  trained = {"params": state[0], **state[1]}
  start = time.perf_counter()
  forward = jax.jit(model.logits).lower(trained, images).compile()
  jax.block_until_ready(forward(trained, images))
  first = time.perf_counter() - start
  seconds = seconds_per_call(lambda: forward(trained, images), settings["train_steps"])
  forward_entry = {"first_call_seconds": round(first, 2), "seconds_per_batch": round(seconds, 4),
                   "images_per_second": round(batch / seconds, 2),
                   "compiled_memory": memory_bytes(forward)}
  return train, forward_entry


def torch_device() -> tuple[str | None, str]:
  """torch's device matching JAX's platform, or None and why torch cannot be measured."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None, "torch is not installed (pip install -e .[oracle])"
  platform = jax.devices()[0].platform
  if platform == "cpu":
    return "cpu", f"torch {torch.__version__} on the CPU, {torch.get_num_threads()} threads"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
  return None, f"torch {torch.__version__} cannot run on JAX's platform {platform!r}"


def torch_train_and_forward(settings: dict[str, Any], device: str) -> dict[str, Any]:
  """torchvision's DenseNet of the same architecture: float32 and AMP (bfloat16 autocast)."""
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  architecture = settings["architecture"]
  torch.manual_seed(0)
  net = torchvision.models.DenseNet(
      growth_rate=architecture["growth_rate"], block_config=tuple(architecture["block_sizes"]),
      num_init_features=architecture["stem_width"], num_classes=settings["num_outputs"]
  ).to(device)
  batch = settings["batch_size"]
  host_images, host_labels = inputs(batch, settings["image_size"], settings["num_outputs"])
  images = torch.from_numpy(host_images.transpose(0, 3, 1, 2).copy()).to(device)
  labels = torch.from_numpy(host_labels).to(device)
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  result: dict[str, Any] = {"device": device, "torch_version": torch.__version__}
  for name, amp in (("float32", False), ("amp_bfloat16", True)):

    def train_step():
      net.train()
      optimizer.zero_grad()
      with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
      loss.backward()
      optimizer.step()

    def forward():
      with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                           enabled=amp):
        net.eval()(images)

    entry = {}
    for kind, call in (("train", train_step), ("forward", forward)):
      call()
      synchronize()
      start = time.perf_counter()
      for _ in range(settings["train_steps"]):
        call()
      synchronize()
      seconds = (time.perf_counter() - start) / settings["train_steps"]
      entry[f"{kind}_images_per_second"] = round(batch / seconds, 2)
    result[name] = entry
  if device == "cuda":
    result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
  return result


def _loop_seconds(call: Callable[[], Any]) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def attribution(settings: dict[str, Any]) -> dict[str, Any]:
  """The batched methods (run_methods) beside Python loops of one jitted function."""
  model = build_model(settings)
  batch, steps = settings["attribution_batch_size"], settings["num_steps"]
  samples = settings["num_samples"]
  host_images, host_targets = inputs(batch, settings["image_size"], settings["num_outputs"], 1)
  images, targets = jnp.asarray(host_images), jnp.asarray(host_targets, jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0))
  options = {"num_steps": steps, "num_samples": samples, "chunk_size": settings["chunk_size"],
             "ig": {"rule": "riemann_trapezoid"}}
  methods = settings["methods"]
  rows = jnp.arange(batch)

  @jax.jit
  def gradient(variables, images, targets):
    score = lambda x: model.logits(variables, x)[rows, targets].sum()  # noqa: E731
    return jax.grad(score)(images)

  @jax.jit
  def ablated_score(variables, feature_map, row, column):
    removed = feature_map.at[:, row, column, :].set(0)
    return model.head(variables, removed).sum()

  jax.block_until_ready(gradient(variables, images, targets))  # compiled once for every loop

  def loop_gradients(points: Callable[[int], np.ndarray], weights: np.ndarray) -> np.ndarray:
    """sum_k weights[k] * gradient at points(k): one jitted call per k, summed on the host."""
    total = np.zeros_like(host_images)
    for index, weight in enumerate(weights):
      total += weight * np.asarray(gradient(variables, points(index), targets))
    return total

  # IG's trapezoid rule on [0, 1] with `steps` evaluations (run_methods' IG uses it too).
  nodes = np.arange(steps) / max(steps - 1, 1)
  trapezoid = np.full(steps, 1.0 / max(steps - 1, 1), np.float32)
  trapezoid[[0, -1]] /= 2
  along_path = lambda index: (nodes[index] * host_images).astype(np.float32)  # noqa: E731
  rng = np.random.default_rng(0)
  spread = np.ptp(host_images, axis=(1, 2, 3), keepdims=True)
  noise = lambda index: host_images + 0.15 * spread * rng.standard_normal(  # noqa: E731
      host_images.shape).astype(np.float32)
  features = jax.jit(lambda variables, images: model.features(variables, images, "last_conv"))

  def crm_loop() -> None:
    feature_map = features(variables, images)
    height, width = feature_map.shape[1:3]
    jax.block_until_ready([ablated_score(variables, feature_map, row, column)
                           for row in range(height) for column in range(width)])

  crm_loop()  # compiles the features and the head
  loop_ig: dict[str, np.ndarray] = {}

  def ig_loop() -> None:
    loop_ig["maps"] = host_images * loop_gradients(along_path, trapezoid)

  loops = {"ig": (ig_loop, f"{steps} gradients"),
           "smoothgrad": (lambda: loop_gradients(noise, np.full(samples, 1.0 / samples)),
                          f"{samples} gradients"),
           "guided_ig": (lambda: loop_gradients(along_path, np.ones(steps)),
                         f"{steps} gradients (lower bound: no pixel selection)"),
           "fast_xrai": (lambda: loop_gradients(lambda index: along_path(index % steps),
                                                np.ones(2 * steps)),
                         f"{2 * steps} gradients (lower bound: no segmentation)"),
           "crm": (crm_loop, "one jitted head call per last_conv cell")}

  key = jax.random.key(0)
  result: dict[str, Any] = {"batch_size": batch, "num_steps": steps, "num_samples": samples,
                            "chunk_size": settings["chunk_size"]}
  for name in methods:
    maps, info = explain.run_methods(model, variables, images, targets, [name], key, options)
    entry: dict[str, Any] = {"first_call": info[name]}
    if registry.get(name).host and not settings["tiny"]:  # the first call compiled: time
      maps, info = explain.run_methods(model, variables, images, targets, [name], key, options)
    # run_methods rounds seconds per image to 1e-4: that is the resolution here.
    seconds = max(info[name]["seconds_per_image"], 1e-4) * batch
    loop_call, loop_work = loops[name]
    loop_seconds = _loop_seconds(loop_call)
    entry.update({"batched_seconds": round(seconds, 4),
                  "batched_images_per_second": round(batch / seconds, 2),
                  "loop": loop_work, "loop_seconds": round(loop_seconds, 4),
                  "speedup_batched_over_loop": round(loop_seconds / seconds, 2),
                  "finite": bool(np.isfinite(maps[name]).all())})
    if name == "ig":  # the same rule and baseline: the loop must make the same maps
      difference = np.abs(loop_ig["maps"] - maps[name]).max()
      entry["loop_max_abs_difference"] = float(f"{difference:.3g}")
      entry["max_abs_map"] = float(f"{np.abs(maps[name]).max():.3g}")
    result[name] = entry
  return result


def peak_memory() -> dict[str, Any]:
  """Peak bytes in use of the first local device, where its runtime reports them."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return {"available": False,
            "reason": f"{jax.local_devices()[0].platform} reports no memory_stats() peak"}
  return {"available": True, "peak_bytes_in_use": int(stats["peak_bytes_in_use"]),
          "peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 2),
          "bytes_limit": int(stats.get("bytes_limit", 0))}


def run(settings: dict[str, Any], reference: str) -> dict[str, Any]:
  """Every section of the benchmark as one JSON-ready dict."""
  start = time.perf_counter()
  device = jax.devices()[0]
  result: dict[str, Any] = {
      "benchmark": "accelerator", "settings": settings,
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "count": jax.device_count(), "jax_version": jax.__version__,
                 "jaxlib_version": jaxlib.__version__, "host_cores": os.cpu_count(),
                 "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "train_step": {}, "forward": {}}
  for dtype_name in settings["dtypes"]:
    result["train_step"][dtype_name], result["forward"][dtype_name] = train_and_forward(
        settings, dtype_name)
  if reference == "torch":
    torch_on, why = torch_device()
    result["torch"] = ({"measured": False, "reason": why} if torch_on is None else
                       {"measured": True, "note": why,
                        **torch_train_and_forward(settings, torch_on)})
    if torch_on is not None:
      ours = result["train_step"]
      theirs = result["torch"]
      ratios = {}
      for dtype_name, torch_name in (("float32", "float32"), ("bfloat16", "amp_bfloat16")):
        if dtype_name in ours:
          ratios[f"train_{dtype_name}"] = round(
              ours[dtype_name]["images_per_second"]
              / theirs[torch_name]["train_images_per_second"], 2)
          ratios[f"forward_{dtype_name}"] = round(
              result["forward"][dtype_name]["images_per_second"]
              / theirs[torch_name]["forward_images_per_second"], 2)
      result["torch"]["ours_over_torch"] = ratios
  else:
    result["torch"] = {"measured": False, "reason": "--reference=none"}
  result["attribution"] = attribution(settings)
  result["input_pipeline"] = {"measured": False,
                              "reason": "the Grain input pipeline (issue 19 item 4) is not "
                                        "built yet"}
  result["peak_memory"] = peak_memory()
  result["total_seconds"] = round(time.perf_counter() - start, 1)
  return result


def main(argv: list[str]) -> None:
  del argv
  print(json.dumps(run(settings_from_flags(), flags.FLAGS.reference), indent=1))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
