"""Pieces every benchmark shares: random weights drawn in numpy, phantom inputs, timing."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.data import phantoms
from medxai_jax.models import base
from medxai_jax.models import custom_cnn

BIAS_STD = 0.1


def random_variables(model: base.Classifier, seed: int = 0, bias_std: float = BIAS_STD
                     ) -> base.Variables:
  """He-normal kernels, N(0, bias_std^2) biases and identity BatchNorm, drawn without XLA.

  With zero biases a ReLU network is positively homogeneous along rays from the zero baseline,
  so IG would be exact with one step; trained networks have biases, and so do these. BatchNorm
  statistics are mean 0 and variance 1 and its scale is 1 (a random variance could be negative).
  """
  rng = np.random.default_rng(seed)

  def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    name = jax.tree_util.keystr(path[-1:])
    if name == "['mean']":
      values = np.zeros(leaf.shape)
    elif name in ("['var']", "['scale']"):
      values = np.ones(leaf.shape)
    elif "bias" in jax.tree_util.keystr(path):
      values = bias_std * rng.standard_normal(leaf.shape)
    else:
      values = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return jnp.asarray(values, leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def phantom_batch(batch: int, image_size: int, channels: int = 1) -> np.ndarray:
  """The first `batch` synthetic radiographs (seed 0) in [0, 1], gray repeated to `channels`."""
  config = phantoms.PhantomConfig(image_size=image_size)
  images = phantoms.generate_phantoms(batch, seed=0, config=config)["image"]
  return np.repeat(images.astype(np.float32) / 255.0, channels, axis=-1)


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, Any]:
  """Mean seconds of `repeats` calls of fn (after `warmup` calls) and its last output."""
  output = None
  for _ in range(warmup):
    output = jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    output = jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats, output


def compiled(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """jit(fn) compiled ahead of time for args, and the seconds lowering + compiling took."""
  start = time.perf_counter()
  executable = jax.jit(fn).lower(*args).compile()
  return executable, time.perf_counter() - start


def rate(batch: int, seconds: float) -> float:
  """Images per second, three significant digits."""
  return float(f"{batch / seconds:.3g}")


def small_cnn(image_size: int, channels: int = 1, num_outputs: int = 3) -> base.Classifier:
  """The narrow custom CNN (conv widths 4-8, dense 16-16, He-normal) the benchmarks share."""
  return custom_cnn.custom_cnn(num_outputs=num_outputs,
                               input_shape=(image_size, image_size, channels),
                               conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16),
                               init_std=None)


def randomise_torch_model(torch: Any, net: Any, seed: int) -> None:
  """Random BatchNorm statistics/affine parameters and biases of a torch model, in place
  (kernels keep torch's init): the porting oracles' way to make a swapped mean/variance or a
  dropped bias show."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape,
                                                    generator=generator))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
