r"""Ports ImageNet weights from a Keras or torchvision file into a checkpoint configs can start from.

  python -m experiments.port_weights --source=keras --arch=densenet169 \
      --weights=/data/weights/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --workdir=/data/ported/densenet169_keras

  python -m experiments.port_weights --source=torchvision --arch=densenet169 \
      --weights=/data/weights/densenet169-b2777c0a.pth --workdir=/data/ported/densenet169_tv

Writes WORKDIR/variables (orbax) and WORKDIR/metadata.json (source, file checksum, the
BatchNorm epsilon and input preprocessing the weights expect, what was loaded and what kept its
initial value). Training configs start from it with `config.init_from=WORKDIR`.
"""

from __future__ import annotations

import hashlib
import json

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments import cli
from medxai_jax import logs
from medxai_jax.models import densenet
from medxai_jax.models import porting
from medxai_jax.models import vgg
from medxai_jax.train import checkpoint

ARCHS = ("densenet121", "densenet169", "densenet201", "vgg16")

_SOURCE = flags.DEFINE_enum("source", None, list(porting.SOURCES), "Framework of the file.")
_ARCH = flags.DEFINE_enum("arch", None, list(ARCHS), "Architecture the file holds.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Keras .h5/.weights.h5 or torchvision "
                               ".pth/.safetensors/.npz file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_INCLUDE_TOP = flags.DEFINE_enum("include_top", "auto", ["auto", "true", "false"],
                                 "Load the 1000-way ImageNet classifier: auto = when present.")
flags.mark_flags_as_required(["source", "arch", "weights", "workdir"])


def imagenet_model_config(arch: str, source: str) -> dict:
  """Model-config fields of the ImageNet network a file of `arch` from `source` holds."""
  if arch.startswith("densenet"):
    return {"name": "densenet", "depth": int(arch[len("densenet"):]), "num_outputs": 1000,
            "head": "softmax", "bn_epsilon": porting.BN_EPSILON[source]}
  return {"name": "vgg16", "num_outputs": 1000, "head": "classic"}


def _build(model_config: dict):
  fields = dict(model_config)
  name = fields.pop("name")
  builder = densenet.densenet if name == "densenet" else vgg.vgg16
  return builder(input_shape=(224, 224, 3), **fields)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for chunk in iter(lambda: file.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def port_file(source: str, arch: str, weights: str, workdir: str,
              include_top: bool | None = None) -> dict:
  """Ports `weights` and writes the checkpoint; returns the metadata written."""
  model_config = imagenet_model_config(arch, source)
  model = _build(model_config)
  # Port into a zero template first, which needs no compiled init (~15 s for DenseNet-169 on
  # CPU) and reports a mismatching file at once; initialise only if some layers stay from init.
  template = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0)))
  ported, report = porting.port(source, model, template, weights, include_top=include_top)
  if report.kept_from_init:
    variables = jax.jit(model.init)(jax.random.key(0))
    ported, report = porting.port(source, model, variables, weights, include_top=include_top)
  family = "densenet" if arch.startswith("densenet") else "vgg16"
  metadata = {
      "source": source, "arch": arch, "weights": weights, "sha256": _sha256(weights),
      "model_config": model_config,
      "preprocessing": porting.PREPROCESSING[(source, family)],
      "loaded": report.loaded, "kept_from_init": report.kept_from_init,
      "ignored": report.ignored,
  }
  checkpoint.save_variables(workdir, ported, metadata)
  return metadata


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  include_top = {"auto": None, "true": True, "false": False}[_INCLUDE_TOP.value]
  metadata = port_file(_SOURCE.value, _ARCH.value, _WEIGHTS.value, _WORKDIR.value, include_top)
  logging.info("Ported %d layers from %s into %s; kept from initialisation: %s",
               len(metadata["loaded"]), _WEIGHTS.value, _WORKDIR.value,
               metadata["kept_from_init"] or "nothing")
  print(json.dumps({k: metadata[k] for k in ("source", "arch", "sha256", "preprocessing",
                                             "kept_from_init")}, indent=2))


if __name__ == "__main__":
  cli.run(main)
