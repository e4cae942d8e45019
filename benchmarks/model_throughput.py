r"""Forward and train-step throughput of DenseNet-169 and VGG16, beside torchvision's in one run.

  python -m benchmarks.model_throughput [--steps=3] [--batch_size=8] [--reference=torch]
      [--settings=densenet169@224,densenet169@320,vgg16@224]

Prints one JSON object: per setting, images/s of the jitted inference forward pass and of one
optimiser step (Adam, 1000-way softmax cross-entropy), each after a warm-up call, and the same
two numbers for the torchvision model on the same inputs (torch eager, CPU threads as torch
sets them) when torch is installed (`pip install -e .[oracle]`).
"""

from __future__ import annotations

import json
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medxai_jax.models import base
from medxai_jax.models import densenet
from medxai_jax.models import vgg

_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls per measurement (after one warm-up).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_SETTINGS = flags.DEFINE_list("settings", ["densenet169@224", "densenet169@320", "vgg16@224"],
                              "arch@size pairs.")
_REFERENCE = flags.DEFINE_enum("reference", "torch", ["torch", "none"],
                               "Reference framework measured in the same run.")


def _time(call: Callable[[], object], num_steps: int) -> float:
  """Seconds per call after one warm-up call."""
  jax.block_until_ready(call())
  start = time.perf_counter()
  for _ in range(num_steps):
    jax.block_until_ready(call())
  return (time.perf_counter() - start) / num_steps


def _build(arch: str, size: int) -> base.Classifier:
  if arch == "densenet169":
    return densenet.densenet(depth=169, num_outputs=1000, head="softmax",
                             input_shape=(size, size, 3))
  if arch == "vgg16":
    return vgg.vgg16(num_outputs=1000, head="classic", input_shape=(size, size, 3))
  raise ValueError(f"Unknown arch {arch!r}; use densenet169 or vgg16.")


def measure_flax(arch: str, size: int, batch_size: int, num_steps: int) -> dict:
  """Forward and Adam train-step images/s of our model."""
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

  start = time.perf_counter()
  jax.block_until_ready(forward(variables, images))
  compile_forward = time.perf_counter() - start
  forward_s = _time(lambda: forward(variables, images), num_steps)
  start = time.perf_counter()
  jax.block_until_ready(train_step(params, others, opt_state, images, labels))
  compile_train = time.perf_counter() - start
  train_s = _time(lambda: train_step(params, others, opt_state, images, labels), num_steps)
  return {"forward_images_per_second": round(batch_size / forward_s, 2),
          "train_images_per_second": round(batch_size / train_s, 2),
          "first_forward_seconds": round(compile_forward, 1),
          "first_train_step_seconds": round(compile_train, 1)}


def measure_torch(arch: str, size: int, batch_size: int, num_steps: int) -> dict:
  """The same two measurements for the torchvision model (eager, CPU)."""
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

  forward_s = _time(forward, num_steps)
  train_s = _time(train_step, num_steps)
  return {"forward_images_per_second": round(batch_size / forward_s, 2),
          "train_images_per_second": round(batch_size / train_s, 2),
          "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv: list[str]) -> None:
  del argv
  result = {"benchmark": "model_throughput", "device": str(jax.devices()[0]),
            "jax_version": jax.__version__, "batch_size": _BATCH.value,
            "timed_steps": _STEPS.value}
  for setting in _SETTINGS.value:
    arch, size = setting.split("@")
    entry = {"medxai_jax": measure_flax(arch, int(size), _BATCH.value, _STEPS.value)}
    if _REFERENCE.value == "torch":
      entry["torchvision"] = measure_torch(arch, int(size), _BATCH.value, _STEPS.value)
      entry["forward_ratio"] = round(entry["medxai_jax"]["forward_images_per_second"]
                                     / entry["torchvision"]["forward_images_per_second"], 2)
      entry["train_ratio"] = round(entry["medxai_jax"]["train_images_per_second"]
                                   / entry["torchvision"]["train_images_per_second"], 2)
    result[setting] = entry
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
