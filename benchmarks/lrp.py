r"""LRP on VGG16: ours (attribution/lrp.py, jitted) against Zennit 0.5.1 on the same weights.

  python -m benchmarks.lrp [--image_size=224] [--batch=4] [--composite=epsilon_gamma_box]
      [--repeats=2] [--without_adaptive_pool]

Prints one JSON object. A torchvision VGG16 (1000 classes) with random weights (Kaiming-normal
kernels, N(0, 0.05^2) biases, seed 0) is saved as a state dict and ported into the project's
VGG16 with `porting.port_torchvision`; both explain the same batch (the first phantoms, gray
repeated to RGB, ImageNet-normalised; ZBox bounds are the normalised 0 and 1 per channel) for
random target classes (seed 0), each seeded with the target logit. `ours`: `lrp.lrp` jitted,
its compile time (lower + compile) then one untimed and `repeats` timed calls; `zennit`: the
composite of the same name with `zennit.attribution.Gradient`, one untimed and `repeats` timed
calls (torch on the CPU with its default threads). `max_relative_difference`: max |ours -
zennit| / max |zennit| over the batch, and its largest per-image value. At sizes other than 224
torchvision's 7x7 adaptive pool is left out and fc1 reads the block-5 pool directly, as ours
does; at 224 Zennit gives that pool (an identity there) its Norm rule, which ours (no such
layer) does not have; --without_adaptive_pool leaves it out at 224 too.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import jax
import numpy as np

from experiments import cli
from benchmarks import common as bench_common
from medxai_jax.attribution import lrp
from medxai_jax.models import porting
from medxai_jax.models import vgg

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input size (a multiple of 32).")
_BATCH = flags.DEFINE_integer("batch", 4, "Images in the batch.")
_COMPOSITE = flags.DEFINE_enum("composite", "epsilon_gamma_box",
                               ["epsilon_gamma_box", "epsilon_plus_flat"], "LRP composite.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls of each (after one untimed).")
_WITHOUT_ADAPTIVE_POOL = flags.DEFINE_bool(
    "without_adaptive_pool", False, "At 224 too, leave torchvision's 7x7 adaptive pool out "
    "(an identity there, which Zennit's Norm rule turns into x / (x + 1e-6 sign x)).")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _torch_vgg16(torch, torchvision, image_size: int, without_adaptive_pool: bool):
  """torchvision's VGG16 with random weights; without the adaptive pool off 224 pixels."""
  torch.manual_seed(0)
  net = torchvision.models.vgg16(weights=None)
  side = image_size // 32
  if side != 7 or without_adaptive_pool:
    net.avgpool = torch.nn.Identity()
  if side != 7:
    net.classifier[0] = torch.nn.Linear(512 * side * side, 4096)
  with torch.no_grad():
    for layer in net.modules():
      if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        layer.bias.normal_(0, 0.05)
  return net.eval()


def _zennit_composite(composites, torch, name: str, low: np.ndarray, high: np.ndarray):
  if name == "epsilon_gamma_box":
    return composites.EpsilonGammaBox(
        low=torch.tensor(low, dtype=torch.float32).view(1, 3, 1, 1),
        high=torch.tensor(high, dtype=torch.float32).view(1, 3, 1, 1))
  return composites.EpsilonPlusFlat()


def main(argv) -> None:
  del argv
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from zennit import attribution as zennit_attribution  # pylint: disable=import-outside-toplevel
  from zennit import composites  # pylint: disable=import-outside-toplevel

  size, batch, name = _IMAGE_SIZE.value, _BATCH.value, _COMPOSITE.value
  if size % 32:
    raise ValueError(f"--image_size must be a multiple of 32; got {size}.")
  net = _torch_vgg16(torch, torchvision, size, _WITHOUT_ADAPTIVE_POOL.value)
  model = vgg.vgg16(num_outputs=1000, input_shape=(size, size, 3))
  with tempfile.TemporaryDirectory(prefix="lrp_bench_") as directory:
    path = os.path.join(directory, "vgg16.pth")
    torch.save(net.state_dict(), path)
    variables, _ = porting.port_torchvision(model, bench_common.random_variables(model), path,
                                            include_top=True)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  images = ((bench_common.phantom_batch(batch, size, channels=3) - IMAGENET_MEAN)
            / IMAGENET_STD).astype(np.float32)
  low, high = -IMAGENET_MEAN / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
  targets = np.random.default_rng(0).integers(0, 1000, batch)
  options = {"low": low, "high": high} if name == "epsilon_gamma_box" else {}

  explain = jax.jit(lambda v, x, t: lrp.lrp(model, v, x, t, composite=name, **options))
  start = time.perf_counter()
  compiled = explain.lower(variables, images, targets).compile()
  compile_s = time.perf_counter() - start
  ours_s, ours = bench_common.timed(lambda: compiled(variables, images, targets), 1,
                                    _REPEATS.value)

  composite = _zennit_composite(composites, torch, name, low, high)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  one_hot = torch.nn.functional.one_hot(torch.as_tensor(targets), 1000).to(x)

  def zennit_call():
    with zennit_attribution.Gradient(model=net, composite=composite) as attributor:
      _, relevance = attributor(x, lambda output: one_hot * output)
    return relevance.numpy().transpose(0, 2, 3, 1)

  reference = zennit_call()
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    reference = zennit_call()
  zennit_s = (time.perf_counter() - start) / _REPEATS.value

  ours = np.asarray(ours, np.float64)
  difference = np.abs(ours - reference)
  per_image = difference.reshape(batch, -1).max(1) / np.abs(reference).reshape(batch, -1).max(1)
  print(json.dumps({
      "model": "vgg16 (torchvision layout, random weights)", "image_size": size,
      "batch": batch, "composite": name, "repeats": _REPEATS.value,
      "torch_adaptive_pool": size == 224 and not _WITHOUT_ADAPTIVE_POOL.value,
      "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
      "ours": {"compile_s": round(compile_s, 2), "seconds_per_batch": round(ours_s, 3),
               "images_per_s": round(batch / ours_s, 3)},
      "zennit": {"seconds_per_batch": round(zennit_s, 3),
                 "images_per_s": round(batch / zennit_s, 3)},
      "speedup_vs_zennit": round(zennit_s / ours_s, 2),
      "max_relative_difference": float(difference.max() / np.abs(reference).max()),
      "max_relative_difference_per_image": float(per_image.max()),
  }, indent=2))


if __name__ == "__main__":
  cli.run(main)
