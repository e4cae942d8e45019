r"""The CAM family against pytorch-grad-cam 1.5.7 on the same ported weights: speed and agreement.

  python -m benchmarks.cam_family [--models=densenet121,vgg16] [--image_size=224]
      [--batch_size=4] [--methods=grad_cam_plus_plus,xgrad_cam,hires_cam,layer_cam,eigen_cam,
      score_cam,ablation_cam] [--perturbation_size=64] [--perturbation_batch=1]
      [--chunk_size=32] [--repeats=1]

Random-initialised torchvision DenseNet-121 (BatchNorm statistics randomised; grad-cam's layer
`features[-1]` = norm5, our 'last_conv') and VGG16 (biases randomised; grad-cam's
`features[29]`, the last conv's ReLU = our 'last_conv'), 1000 classes, ported with
`medxai_jax.models.porting`. Inputs: the first synthetic radiographs (phantoms, seed 0), gray
repeated to RGB, ImageNet-normalised; targets: the predicted classes. Per model and method: ours
jitted (compile seconds, then one warm-up and `repeats` timed calls), grad-cam's same method on
the torch model (CPU, eval mode, one warm-up call for the gradient methods), images/s of each,
and the agreement: the largest |ours - grad-cam| of the raw maps (after the ReLU, relative to
each map's max) and of the normalised upsampled maps. Grad-CAM++ runs with
pre_relu_gradients=True on DenseNet (grad-cam's norm5 recipe; see cam_family's docstring).
Score-CAM and Ablation-CAM make one forward per channel per image (1024 at DenseNet's norm5,
512 at VGG16's), so they run at --perturbation_size / --perturbation_batch (0 skips them);
grad-cam's Score-CAM batches 16 masked images per forward, its Ablation-CAM 32; ours
`chunk_size` channels per vmapped step. torch uses its default CPU threads. Prints one JSON line
per method as it completes, one per model, then the whole JSON object.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench_common
from medxai_jax.attribution import api
from medxai_jax.attribution import cam_family
from medxai_jax.data import preprocess
from medxai_jax.models import base
from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax.models import vgg

GRADIENT_METHODS = ("grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "eigen_cam")
PERTURBATION_METHODS = ("score_cam", "ablation_cam")
METHODS = GRADIENT_METHODS + PERTURBATION_METHODS
GRAD_CAM_CLASSES = {"grad_cam_plus_plus": "GradCAMPlusPlus", "xgrad_cam": "XGradCAM",
                    "hires_cam": "HiResCAM", "layer_cam": "LayerCAM", "score_cam": "ScoreCAM",
                    "ablation_cam": "AblationCAM", "eigen_cam": "EigenCAM"}
MODELS = ("densenet121", "vgg16")

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Subset of {MODELS}.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Subset of {METHODS}.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side for the gradient methods.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Images per call for the gradient methods.")
_PERTURBATION_SIZE = flags.DEFINE_integer(
    "perturbation_size", 64, "Input side for Score-/Ablation-CAM (VGG16 is run at 224 if its "
    "classic head is used, so it runs them only when this is 224).")
_PERTURBATION_BATCH = flags.DEFINE_integer("perturbation_batch", 1,
                                           "Images for Score-/Ablation-CAM (0 skips them).")
_CHUNK = flags.DEFINE_integer("chunk_size", 32, "Channels per vmapped step (Score/Ablation).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls of ours.")


def build(name: str, image_size: int, directory: str) -> tuple[Any, Any, base.Classifier,
                                                                 base.Variables]:
  """(torch net, its target layer, our model, our ported variables) for `name`."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  shape = (image_size, image_size, 3)
  if name == "densenet121":
    net = torchvision.models.densenet121(weights=None).eval()
    layer = net.features[-1]
    model = densenet.densenet(depth=121, num_outputs=1000, head="softmax", input_shape=shape,
                              bn_epsilon=porting.BN_EPSILON["torchvision"])
  else:
    net = torchvision.models.vgg16(weights=None).eval()
    layer = net.features[29]
    model = vgg.vgg16(num_outputs=1000, head="classic", input_shape=shape)
  bench_common.randomise_torch_model(torch, net, 1)
  path = os.path.join(directory, f"{name}.pth")
  torch.save(net.state_dict(), path)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  template = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  variables, report = porting.port_torchvision(model, template, path)
  if report.kept_from_init:
    raise RuntimeError(f"{name}: the port left {report.kept_from_init} at their initial value.")
  return net, layer, model, variables


def grad_cam_run(method: str, net, layer, images: np.ndarray, targets: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """grad-cam's normalised upsampled maps and its raw maps after its ReLU [B, h, w]."""
  import pytorch_grad_cam  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from pytorch_grad_cam.utils import model_targets  # pylint: disable=import-outside-toplevel
  raw = []
  with getattr(pytorch_grad_cam, GRAD_CAM_CLASSES[method])(model=net,
                                                           target_layers=[layer]) as explainer:
    original = explainer.get_cam_image

    def recording_get_cam_image(*args, **kwargs):
      raw.append(original(*args, **kwargs))
      return raw[-1]

    explainer.get_cam_image = recording_get_cam_image
    inputs = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    normalised = explainer(inputs, [model_targets.ClassifierOutputTarget(int(t))
                                    for t in targets])
  return np.asarray(normalised), np.maximum(np.asarray(raw[-1]), 0)


def our_method(method: str, model_name: str, chunk_size: int):
  """(split, images, targets) -> (raw maps, upsampled maps) for one of our methods."""
  fn = getattr(cam_family, method)
  options = {}
  if method == "grad_cam_plus_plus" and model_name == "densenet121":
    options["pre_relu_gradients"] = True
  if method in PERTURBATION_METHODS:
    options["chunk_size"] = chunk_size
  if method == "eigen_cam":
    call = lambda split, x, targets, **kw: fn(split, x, **kw)
  else:
    call = functools.partial(fn, **options)
  return lambda split, x, targets: (call(split, x, targets, upsample=False),
                                    call(split, x, targets))


def agreement(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]
              ) -> dict[str, float]:
  """Largest raw-map difference relative to each map's max, and of the normalised maps."""
  our_raw, our_upsampled = ours
  their_normalised, their_raw = theirs
  scale = np.maximum(np.abs(their_raw).max(axis=(1, 2), keepdims=True), 1e-30)
  normalised = np.asarray(cam_family.normalise_maps(jnp.asarray(our_upsampled)))
  return {"raw_max_rel_error": float(f"{np.max(np.abs(our_raw - their_raw) / scale):.3g}"),
          "normalised_max_abs_error": float(f"{np.max(np.abs(normalised - their_normalised)):.3g}")}


def benchmark_model(name: str, methods: list[str], size: int, batch: int, chunk_size: int,
                    repeats: int, directory: str) -> dict[str, Any]:
  """Every requested method on one model at one input size."""
  net, layer, model, variables = build(name, size, directory)
  images = np.asarray(preprocess.normalize_imagenet(
      jnp.asarray(bench_common.phantom_batch(batch, size, 3))), np.float32)
  targets = np.asarray(api.predicted_classes(jax.jit(model.logits)(variables, images)))
  results: dict[str, Any] = {"image_size": size, "batch_size": batch}
  for method in methods:
    run = our_method(method, name, chunk_size)
    # The variables are arguments (as weights constants, XLA would constant-fold the network).
    ours_fn = lambda variables, x, run=run: run(model.split(variables, "last_conv"), x, targets)
    executable, compile_seconds = bench_common.compiled(ours_fn, variables, jnp.asarray(images))
    seconds, ours = bench_common.timed(lambda: executable(variables, jnp.asarray(images)), 1,
                                       repeats)
    if method not in PERTURBATION_METHODS:
      grad_cam_run(method, net, layer, images, targets)                  # warm-up
    start = time.perf_counter()
    theirs = grad_cam_run(method, net, layer, images, targets)
    their_seconds = time.perf_counter() - start
    results[method] = {
        "ours": {"compile_seconds": round(compile_seconds, 1), "seconds": round(seconds, 3),
                 "images_per_second": bench_common.rate(batch, seconds)},
        "grad_cam": {"seconds": round(their_seconds, 3),
                     "images_per_second": bench_common.rate(batch, their_seconds)},
        "speedup": float(f"{their_seconds / seconds:.3g}"),
        **agreement(tuple(np.asarray(o) for o in ours), theirs)}
    print(json.dumps({"model": name, "image_size": size, "batch_size": batch,
                      method: results[method]}), flush=True)   # progress, one line per method
  return results


def main(argv):
  del argv
  for flag, given, known in (("models", _MODELS.value, MODELS),
                             ("methods", _METHODS.value, METHODS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"--{flag} has unknown entries {unknown}; choose from {known}.")
  import torch  # pylint: disable=import-outside-toplevel
  output: dict[str, Any] = {"device": jax.devices()[0].platform, "torch_threads":
                            torch.get_num_threads(), "chunk_size": _CHUNK.value, "models": {}}
  with tempfile.TemporaryDirectory(prefix="cam_family_bench_") as directory:
    for name in _MODELS.value:
      runs = {}
      gradient = [m for m in _METHODS.value if m in GRADIENT_METHODS]
      if gradient:
        runs["gradient_and_eigen"] = benchmark_model(
            name, gradient, _IMAGE_SIZE.value, _BATCH.value, _CHUNK.value, _REPEATS.value,
            directory)
      perturbation = [m for m in _METHODS.value if m in PERTURBATION_METHODS]
      perturbation_size = _PERTURBATION_SIZE.value
      if name == "vgg16" and perturbation_size != 224:
        perturbation = []   # the classic head's fc1 reads the 7x7 block-5 pool of 224 px
      if perturbation and _PERTURBATION_BATCH.value > 0:
        runs["perturbation"] = benchmark_model(
            name, perturbation, perturbation_size, _PERTURBATION_BATCH.value, _CHUNK.value,
            _REPEATS.value, directory)
      output["models"][name] = runs
      print(json.dumps({name: runs}), flush=True)
  print(json.dumps(output, indent=1))


if __name__ == "__main__":
  app.run(main)
