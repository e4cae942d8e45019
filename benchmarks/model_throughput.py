r"""Forward and train-step throughput of DenseNet-169 and VGG16, beside torchvision's in one run.

  python -m benchmarks.model_throughput [--steps=3] [--batch_size=8] [--reference=torch]
      [--settings=densenet169@224,densenet169@320,vgg16@224] [--peak_gflops=333]
      [--float64_check [--check_seeds=0,1,2] [--check_batch_size=2] [--notiming]]
      [--accumulation_steps=2] [--nocustom_conv_vjp] [--compilation_cache=none]

Prints one JSON object (and one line per setting as it finishes): per setting, images/s of the
compiled inference forward pass and of one optimiser step (Adam, 1000-way softmax
cross-entropy), each after a warm-up call, and the same two numbers for the torchvision model on
the same inputs (torch eager, CPU threads as torch sets them) when torch is installed
(`pip install -e .[oracle]`). The measurements alternate (ours, torch, ours, torch, ...) so that
load from other processes on a shared machine hits both; the ratios are the median of the
per-round ratios. XLA's cost analysis of our compiled programs gives the FLOPs per call; with
them the GFLOP/s of both frameworks (the same model and arithmetic) and their fraction of
`--peak_gflops` (333: 2 AVX-512 cores with 2 FMA units at the measured machine's clock).
`--accumulation_steps=k` > 1 also times the project's `train.steps.train_step` over k
micro-batches in a `lax.scan` ('train_scan', no torch counterpart).

The XLA:CPU options in effect are those of `medxai_jax.runtime` (the binaries' defaults,
`MEDXAI_XLA_DEFAULTS=0` turns them off) plus the caller's `XLA_FLAGS`; the JSON records them.
`--float64_check` also compares, at `--check_batch_size` images and for each of `--check_seeds`
(weights and batch), the float32 logits (max |l32 - l64| / max |l64|) and the parameter
gradients of the training loss with a float64 run of the same weights and batch
(`jax.enable_x64`), by `benchmarks.gradient_error.tree_error`: global and per-leaf relative
errors, the worst leaves, and near-zero leaves apart; so candidate XLA options can be adopted
only when they are no less accurate than the default.
`--nocustom_conv_vjp` measures the models with `lax.conv_general_dilated`'s own VJP instead of
`medxai_jax.models.conv`'s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable, Iterator
from unittest import mock

from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import gradient_error
from experiments import cli
from medxai_jax.models import base
from medxai_jax.models import conv as conv_lib
from medxai_jax.models import densenet
from medxai_jax.models import vgg
from medxai_jax.train import steps as steps_lib

_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls per measurement (after one warm-up).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_SETTINGS = flags.DEFINE_list("settings", ["densenet169@224", "densenet169@320", "vgg16@224"],
                              "arch@size pairs.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternations of ours and the reference.")
_REFERENCE = flags.DEFINE_enum("reference", "torch", ["torch", "none"],
                               "Reference framework measured in the same run.")
_FLOAT64_CHECK = flags.DEFINE_bool(
    "float64_check", False, "Also measure logits and gradient errors against float64.")
_CHECK_BATCH = flags.DEFINE_integer("check_batch_size", 2, "Images of the float64 check.")
_SEEDS = flags.DEFINE_list("check_seeds", ["0"],
                           "Seeds of the float64 check's weights and batch, one check each.")
_TIMING = flags.DEFINE_bool("timing", True, "Measure throughput (--notiming: only the check).")
_ACCUMULATION = flags.DEFINE_integer(
    "accumulation_steps", 1, "Also time the project's train step over this many micro-batches "
    "in a lax.scan ('train_scan') when > 1.")
_PEAK = flags.DEFINE_float("peak_gflops", 333.0,
                           "The device's peak FP32 GFLOP/s, for the fraction-of-peak columns.")
_CUSTOM_VJP = flags.DEFINE_bool(
    "custom_conv_vjp", True, "Use medxai_jax.models.conv's convolution VJP (else lax's own).")


def _seconds(call: Callable[[], object], num_steps: int) -> float:
  """Seconds per call over `num_steps` calls (the caller has warmed it up)."""
  start = time.perf_counter()
  for _ in range(num_steps):
    jax.block_until_ready(call())
  return (time.perf_counter() - start) / num_steps


def _build(arch: str, size: int, dtype: Any = jnp.float32) -> base.Classifier:
  if arch == "densenet169":
    return densenet.densenet(depth=169, num_outputs=1000, head="softmax",
                             input_shape=(size, size, 3), dtype=dtype)
  if arch == "vgg16":
    return vgg.vgg16(num_outputs=1000, head="classic", input_shape=(size, size, 3), dtype=dtype)
  raise ValueError(f"Unknown arch {arch!r}; use densenet169 or vgg16.")


@contextlib.contextmanager
def conv_vjp(custom: bool) -> Iterator[None]:
  """The models' convolutions with medxai_jax's VJP (custom=True) or lax's own, while open."""
  if custom:
    yield
    return
  with mock.patch.object(conv_lib, "conv_general_dilated", lax.conv_general_dilated):
    yield


def _loss_gradients(model: base.Classifier, variables: base.Variables, images: jax.Array,
                    labels: jax.Array) -> tuple[jax.Array, Any]:
  """Inference logits and d(mean cross-entropy of the training-mode logits)/d params."""

  def loss_fn(params):
    logits, _ = model.train_apply({**variables, "params": params}, images, jax.random.key(1))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(images.dtype), labels).mean()

  return model.logits(variables, images), jax.grad(loss_fn)(variables["params"])


def _logits_error(approximate: Any, exact: Any) -> float:
  """max |l32 - l64| / max |l64|."""
  exact = np.asarray(exact, np.float64)
  return float(np.abs(np.asarray(approximate, np.float64) - exact).max() / np.abs(exact).max())


def float64_errors(arch: str, size: int, batch_size: int, seeds: list[int]) -> dict:
  """Errors of the float32 logits and parameter gradients against a float64 run of the same
  weights (`model.init(key(seed))`) and batch (normal images, uniform labels from `seed`), per
  seed (`gradient_error.tree_error`), and their median over the seeds."""
  model = _build(arch, size)
  with jax.enable_x64(True):
    model64 = _build(arch, size, jnp.float64)
  init = jax.jit(model.init)
  ours = jax.jit(functools.partial(_loss_gradients, model))
  reference = jax.jit(functools.partial(_loss_gradients, model64))
  per_seed = []
  for seed in seeds:
    variables = init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, size, size, 3))
    labels = rng.integers(0, 1000, batch_size)
    logits32, grads32 = jax.device_get(ours(variables, jnp.asarray(images, jnp.float32),
                                            jnp.asarray(labels)))
    with jax.enable_x64(True):
      variables64 = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.float64),
                                           variables)
      logits64, grads64 = jax.device_get(reference(
          variables64, jnp.asarray(images, jnp.float64), jnp.asarray(labels)))
    per_seed.append({"seed": seed,
                     "logits_max_relative_error": float(f"{_logits_error(logits32, logits64):.3g}"),
                     "gradients": gradient_error.tree_error(grads32, grads64)})
  summary = {key: float(f"{np.median([entry['gradients'][key] for entry in per_seed]):.3g}")
             for key in ("global_relative_error", "median_relative_error", "max_relative_error")}
  summary["logits_max_relative_error"] = float(
      f"{np.median([entry['logits_max_relative_error'] for entry in per_seed]):.3g}")
  return {"batch_size": batch_size, "median_over_seeds": summary, "per_seed": per_seed}


def _flops(compiled: Any) -> float:
  """FLOPs of one call of a compiled program by XLA's cost analysis (0 when it gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def flax_calls(arch: str, size: int, batch_size: int, accumulation_steps: int = 1
               ) -> tuple[dict, dict]:
  """Our compiled forward and Adam train step, warmed up, with their first-call seconds and
  XLA's FLOPs per call; with `accumulation_steps` > 1 also 'train_scan', the project's
  `train.steps.train_step` over that many micro-batches in a `lax.scan`."""
  model = _build(arch, size)
  variables = jax.jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, size, size, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, batch_size))
  tx = optax.adam(1e-4)
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  opt_state = tx.init(params)

  def loss_fn(params, others, images, labels, key):
    logits, updates = model.train_apply({"params": params, **others}, images, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates

  def train_step(params, others, opt_state, images, labels):
    grads, updates = jax.grad(loss_fn, has_aux=True)(params, others, images, labels,
                                                     jax.random.key(1))
    deltas, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, deltas), {**others, **updates}, opt_state

  programs = {"forward": (model.logits, (variables, images)),
              "train": (train_step, (params, others, opt_state, images, labels))}
  if accumulation_steps > 1:
    state = steps_lib.create_train_state(model, tx, jax.random.key(0))
    batch = {"image": images, "label": labels, "weight": jnp.ones(batch_size, jnp.float32)}
    programs["train_scan"] = (
        functools.partial(steps_lib.train_step, model=model, tx=tx, preprocess=lambda x: x,
                          accumulation_steps=accumulation_steps), (state, batch))
  calls, info = {}, {}
  for name, (function, args) in programs.items():
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    info[f"first_{name}_seconds"] = round(time.perf_counter() - start, 1)
    info[f"{name}_gflops_per_call"] = round(_flops(compiled) / 1e9, 2)
    calls[name] = functools.partial(compiled, *args)
  return calls, info


def torch_calls(arch: str, size: int, batch_size: int) -> tuple[dict, dict]:
  """The torchvision model's forward and Adam train step (eager, CPU), warmed up."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  net = getattr(torchvision.models, arch)(weights=None)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(batch_size, 3, size, size)).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, 1000, batch_size))
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

  def forward():
    with torch.no_grad():
      return net.eval()(images)

  def train_step():
    net.train()
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()

  calls = {"forward": forward, "train": train_step}
  for call in calls.values():
    call()
  return calls, {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def interleaved(ours: dict, reference: dict | None, batch_size: int, num_steps: int,
                rounds: int) -> dict:
  """images/s of each call, alternating ours and the reference's call of the same name (where it
  has one) `rounds` times (medians; the ratio is the median of the per-round ratios)."""
  result = {}
  for name in ours:
    theirs_call = (reference or {}).get(name)
    mine, theirs = [], []
    for _ in range(rounds):
      mine.append(_seconds(ours[name], num_steps))
      if theirs_call is not None:
        theirs.append(_seconds(theirs_call, num_steps))
    result[f"{name}_images_per_second"] = round(batch_size / float(np.median(mine)), 2)
    if theirs_call is not None:
      result[f"reference_{name}_images_per_second"] = round(
          batch_size / float(np.median(theirs)), 2)
      result[f"{name}_ratio"] = round(float(np.median(np.asarray(theirs) / np.asarray(mine))),
                                      2)
  return result


def peak_fractions(entry: dict, batch_size: int, peak_gflops: float) -> dict:
  """GFLOP/s and fraction of `peak_gflops` of ours and the reference per call, both counted
  with XLA's FLOPs of our program (the same model and arithmetic)."""
  fractions = {}
  for name in ("forward", "train", "train_scan"):
    flops = entry.get(f"{name}_gflops_per_call")
    if not flops:
      continue
    for who, key in (("ours", f"{name}_images_per_second"),
                     ("reference", f"reference_{name}_images_per_second")):
      if key in entry:
        rate = flops * entry[key] / batch_size
        fractions[f"{who}_{name}_gflops_per_second"] = round(rate, 1)
        fractions[f"{who}_{name}_fraction_of_peak"] = round(rate / peak_gflops, 3)
  return fractions


def main(argv: list[str]) -> None:
  del argv
  result = {"benchmark": "model_throughput", "device": str(jax.devices()[0]),
            "jax_version": jax.__version__, "batch_size": _BATCH.value,
            "timed_steps": _STEPS.value, "rounds": _ROUNDS.value,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "custom_conv_vjp": _CUSTOM_VJP.value, "peak_gflops": _PEAK.value,
            "note": "ratios are ours / torch images/s, medians of interleaved rounds in one "
                    "process; absolute numbers are noisy on a shared machine"}
  with conv_vjp(_CUSTOM_VJP.value):
    for setting in _SETTINGS.value:
      arch, size = setting.split("@")
      entry: dict[str, Any] = {}
      if _TIMING.value:
        ours, info = flax_calls(arch, int(size), _BATCH.value, _ACCUMULATION.value)
        reference = None
        if _REFERENCE.value == "torch":
          reference, entry["torchvision"] = torch_calls(arch, int(size), _BATCH.value)
        entry.update(interleaved(ours, reference, _BATCH.value, _STEPS.value, _ROUNDS.value))
        entry.update(info)
        entry.update(peak_fractions(entry, _BATCH.value, _PEAK.value))
      if _FLOAT64_CHECK.value:
        entry["float64_check"] = float64_errors(arch, int(size), _CHECK_BATCH.value,
                                                [int(seed) for seed in _SEEDS.value])
      result[setting] = entry
      print(json.dumps({setting: entry}), flush=True)  # progress, one line per setting
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
