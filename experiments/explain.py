r"""Explains a trained model's predictions on chosen test images with chosen methods.

  python -m experiments.explain --checkpoint=runs/demo --workdir=runs/demo/explain \
      --methods=gradients,smoothgrad,ig,grad_cam --num_images=8 --label=-1

--checkpoint is a training run directory (its selected, 'best' checkpoint is explained); the
model, preprocessing and dataset are those of its `config.json`, every training override
included. --config is optional: when given (e.g. `--config=configs/demo.py
--config.dataset.data_dir=/elsewhere`), its differences from the run's config are printed
(field, run value -> given value) and then used.
Writes into --workdir (default <checkpoint>/explain): one raw map array per method (`maps_<method>.npy`, [N, H, W] or
[N, H, W, C]), `attributions.png` (003's figures 8-9: the input, then one gray magnitude map per
method with the same percentile clip), `explain.json` (images, targets, seconds per image per
method; strict JSON). The explained images are --num_images test images of --label drawn with
--seed, or with --label=-1 a class-balanced sample (`medxai_jax.explain.choose_indices`), or
--indices. Methods: see `medxai_jax.explain.METHODS`. The run's `report.html` gets an
"explanations" section: every method's map overlaid on the image ('jet', low values
transparent, the dataset's localisation mask outlined), and the timings.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from experiments import cli
from medxai_jax import explain
from medxai_jax import logs
from medxai_jax import runs
from medxai_jax.data import builders
from medxai_jax.data import pipeline
from medxai_jax.viz import run_report

_CONFIG = cli.define_config_file(
    "config", None, "Optional: a training config to use instead of the run's config.json (the "
    "differences are printed).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training run directory to explain.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: <checkpoint>/explain).")
_METHODS = flags.DEFINE_list("methods", None, "Methods (default: all); see explain.METHODS.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images to explain.")
_LABEL = flags.DEFINE_integer("label", 1, "Explain test images of this label (-1: any, "
                              "class-balanced).")
_INDICES = flags.DEFINE_list("indices", [], "Test-split indices (overrides --label).")
_STEPS = flags.DEFINE_integer("steps", 64, "IG / Blur IG / Guided IG / XRAI gradient steps.")
_SAMPLES = flags.DEFINE_integer("samples", 32, "SmoothGrad noise samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random parts (image sample, SmoothGrad "
                             "noise).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  options = explain.ExplainOptions(steps=_STEPS.value, samples=_SAMPLES.value)
  config = runs.resolve_config(_CHECKPOINT.value, _CONFIG.value)
  workdir = _WORKDIR.value or os.path.join(_CHECKPOINT.value, "explain")
  summary = explain.explain_run(config, _CHECKPOINT.value, workdir,
                                methods=_METHODS.value, num_images=_NUM_IMAGES.value,
                                label=_LABEL.value, indices=_INDICES.value, options=options,
                                seed=_SEED.value)
  split = summary["split"]
  source = pipeline.load_sources(config.dataset, [split])[split]
  images, masks = run_report.explained_inputs(
      source, summary["indices"], builders.mask_keys(config.dataset.name).localisation)
  report_path = run_report.add_section(
      _CHECKPOINT.value, "explanations",
      run_report.explanation_section(workdir, summary, _CHECKPOINT.value, images=images,
                                     masks=masks))
  print(json.dumps(summary["methods"], indent=2))
  print(f"Maps in {workdir}; report: {report_path}")


if __name__ == "__main__":
  cli.run(main)
