r"""Forward and train-step throughput of DenseNet-169 and VGG16, beside torchvision's in one run.

  python -m benchmarks.model_throughput [--steps=3] [--batch_size=8] [--reference=torch]
      [--settings=densenet169@224,densenet169@320,vgg16@224] [--float64_check]
      [--nocustom_conv_vjp] [--compilation_cache=none]

Prints one JSON object: per setting, images/s of the jitted inference forward pass and of one
optimiser step (Adam, 1000-way softmax cross-entropy), each after a warm-up call, and the same
two numbers for the torchvision model on the same inputs (torch eager, CPU threads as torch
sets them) when torch is installed (`pip install -e .[oracle]`). The measurements alternate
(ours, torch, ours, torch, ...) so that load from other processes on a shared machine hits both;
the ratios are the median of the per-round ratios.

The XLA:CPU options in effect are those of `medxai_jax.runtime` (the binaries' defaults,
`MEDXAI_XLA_DEFAULTS=0` turns them off) plus the caller's `XLA_FLAGS`; the JSON records them.
`--float64_check` also compares, at `--check_batch_size` images, the float32 logits and the
parameter gradients of the training loss with a float64 run of the same weights and batch
(`jax.enable_x64`): per leaf the relative error ||g32 - g64|| / ||g64||, reported
as max and median over the leaves (logits: max |l32 - l64| / max |l64|), so candidate XLA
options can be adopted only when they are no less accurate than the default.
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

from experiments import cli
from medxai_jax.models import base
from medxai_jax.models import conv as conv_lib
from medxai_jax.models import densenet
from medxai_jax.models import vgg

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


def _relative_errors(approximate: Any, exact: Any) -> list[float]:
  """||a - e|| / ||e|| per leaf (float64 on the host)."""
  errors = []
  for a, e in zip(jax.tree_util.tree_leaves(approximate), jax.tree_util.tree_leaves(exact)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    errors.append(float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)))
  return errors


def float64_errors(arch: str, size: int, batch_size: int) -> dict:
  """Errors of the float32 logits and parameter gradients against a float64 run."""
  model = _build(arch, size)
  variables = jax.jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, size, size, 3))
  labels = rng.integers(0, 1000, batch_size)
  logits32, grads32 = jax.jit(functools.partial(_loss_gradients, model))(
      variables, jnp.asarray(images, jnp.float32), jnp.asarray(labels))
  with jax.enable_x64(True):
    model64 = _build(arch, size, jnp.float64)
    variables64 = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)
    logits64, grads64 = jax.jit(functools.partial(_loss_gradients, model64))(
        variables64, jnp.asarray(images, jnp.float64), jnp.asarray(labels))
    logits64, grads64 = jax.device_get((logits64, grads64))
  errors = _relative_errors(grads32, grads64)
  logits_error = float(np.abs(np.asarray(logits32, np.float64) - logits64).max()
                       / np.abs(logits64).max())
  return {"batch_size": batch_size, "logits_max_relative_error": float(f"{logits_error:.3g}"),
          "gradient_leaves": len(errors),
          "gradient_median_relative_error": float(f"{np.median(errors):.3g}"),
          "gradient_max_relative_error": float(f"{np.max(errors):.3g}")}


def flax_calls(arch: str, size: int, batch_size: int) -> tuple[dict, dict]:
  """Our jitted forward and Adam train step, warmed up, and their first-call seconds."""
  model = _build(arch, size)
  variables = jax.jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, size, size, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, batch_size))
  tx = optax.adam(1e-4)
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  opt_state = tx.init(params)

  forward = jax.jit(model.logits)

  def loss_fn(params, others, images, labels, key):
    logits, updates = model.train_apply({"params": params, **others}, images, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates

  @jax.jit
  def train_step(params, others, opt_state, images, labels):
    grads, updates = jax.grad(loss_fn, has_aux=True)(params, others, images, labels,
                                                     jax.random.key(1))
    deltas, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, deltas), {**others, **updates}, opt_state

  calls = {"forward": lambda: forward(variables, images),
           "train": lambda: train_step(params, others, opt_state, images, labels)}
  first = {}
  for name, call in calls.items():
    start = time.perf_counter()
    jax.block_until_ready(call())
    first[name] = round(time.perf_counter() - start, 1)
  return calls, {"first_forward_seconds": first["forward"],
                 "first_train_step_seconds": first["train"]}


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
  """images/s of each call, alternating ours and the reference `rounds` times (median)."""
  result = {}
  for name in ours:
    mine, theirs = [], []
    for _ in range(rounds):
      mine.append(_seconds(ours[name], num_steps))
      if reference is not None:
        theirs.append(_seconds(reference[name], num_steps))
    result[f"{name}_images_per_second"] = round(batch_size / float(np.median(mine)), 2)
    if reference is not None:
      result[f"reference_{name}_images_per_second"] = round(
          batch_size / float(np.median(theirs)), 2)
      result[f"{name}_ratio"] = round(float(np.median(np.asarray(theirs) / np.asarray(mine))),
                                      2)
  return result


def main(argv: list[str]) -> None:
  del argv
  result = {"benchmark": "model_throughput", "device": str(jax.devices()[0]),
            "jax_version": jax.__version__, "batch_size": _BATCH.value,
            "timed_steps": _STEPS.value, "rounds": _ROUNDS.value,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "custom_conv_vjp": _CUSTOM_VJP.value,
            "note": "ratios are ours / torch images/s, medians of interleaved rounds in one "
                    "process; absolute numbers are noisy on a shared machine"}
  with conv_vjp(_CUSTOM_VJP.value):
    for setting in _SETTINGS.value:
      arch, size = setting.split("@")
      ours, first = flax_calls(arch, int(size), _BATCH.value)
      entry: dict[str, Any] = {}
      reference = None
      if _REFERENCE.value == "torch":
        reference, entry["torchvision"] = torch_calls(arch, int(size), _BATCH.value)
      entry.update(interleaved(ours, reference, _BATCH.value, _STEPS.value, _ROUNDS.value))
      entry.update(first)
      if _FLOAT64_CHECK.value:
        entry["float64_check"] = float64_errors(arch, int(size), _CHECK_BATCH.value)
      result[setting] = entry
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
