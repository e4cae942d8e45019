r"""Explains a trained model's predictions on chosen test images with chosen methods.

  python -m experiments.explain --checkpoint=runs/demo --workdir=runs/demo/explain \
      --methods=gradients,smoothgrad,ig,grad_cam --num_images=8 --label=-1

--checkpoint is a training run directory (its selected model, `selected_model/`, is explained); the
model, preprocessing and dataset are those of its `config.json`, every training override
included. --config is optional: when given (e.g. `--config=configs/demo.py
--config.dataset.data_dir=/elsewhere`), its differences from the run's config are printed
(field, run value -> given value) and then used.
Writes into --workdir (default <checkpoint>/explain): one raw map array per method (`maps_<method>.npy`, [N, H, W] or
[N, H, W, C]), `attributions.png` (003's figures 8-9: the input, then one gray magnitude map per
method with the same percentile clip), `explain.json` (images, targets, seconds per image per
method; strict JSON). The explained images are --num_images test images of --label drawn with
--seed, or with --label=-1 a class-balanced sample (`medxai_jax.explain.choose_indices`), or
--indices. Methods: `medxai_jax.attribution.registry.REGISTRY` (default: all). Options: the
registry's defaults; --num_steps, --num_samples and --chunk_size set them for every method that
has them, and --method_options sets one method's own, e.g.
`--method_options=ig.rule=pair_uniform,occlusion.window=8` (values parsed as Python literals,
else kept as strings). The old --steps / --samples are refused with the new names. The run's
`report.html` gets an "explanations" section: every method's map overlaid on the image ('jet', low values
transparent, the dataset's localisation mask outlined), and the timings.
"""

from __future__ import annotations

import json
import os

import ast
from typing import Any

from absl import app
from absl import flags

from experiments import cli
from medxai_jax import explain
from medxai_jax.attribution import registry
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
_METHODS = flags.DEFINE_list("methods", None,
                             "Methods (default: all); see attribution.registry.REGISTRY.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images to explain.")
_LABEL = flags.DEFINE_integer("label", 1, "Explain test images of this label (-1: any, "
                              "class-balanced).")
_INDICES = flags.DEFINE_list("indices", [], "Test-split indices (overrides --label).")
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", None, f"Gradient evaluations of the path methods (IG, Blur IG, Guided IG, "
    f"XRAI; default {registry.NUM_STEPS}).")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, f"SmoothGrad noise samples (default {registry.NUM_SAMPLES}).")
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", None, f"Steps / samples / windows / masks per batch of every chunked method "
    f"(default {registry.CHUNK_SIZE}).")
_METHOD_OPTIONS = flags.DEFINE_list(
    "method_options", [], "One method's options as method.option=value, e.g. "
    "ig.rule=pair_uniform,occlusion.window=8.")
_OLD_STEPS = flags.DEFINE_integer("steps", None, "Renamed: use --num_steps.")
_OLD_SAMPLES = flags.DEFINE_integer("samples", None, "Renamed: use --num_samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random parts (image sample, SmoothGrad "
                             "noise).")
flags.mark_flags_as_required(["checkpoint"])


def _literal(text: str) -> Any:
  """A Python literal (number, tuple, None, True...) or, failing that, the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_method_options(entries: list[str]) -> dict[str, dict[str, Any]]:
  """{method: {option: value}} from 'method.option=value' entries (checked by explain)."""
  parsed: dict[str, dict[str, Any]] = {}
  for entry in entries:
    name, equals, value = entry.partition("=")
    method, dot, option = name.partition(".")
    if not (equals and dot and method.strip() and option.strip()):
      raise ValueError(f"--method_options entries are method.option=value (no commas in "
                           f"a value); got {entry!r}.")
    parsed.setdefault(method.strip(), {})[option.strip()] = _literal(value.strip())
  return parsed


def overrides_from_flags() -> dict[str, Any]:
  """The explanation overrides of the flags (only the ones given)."""
  for old, new in ((_OLD_STEPS, "num_steps"), (_OLD_SAMPLES, "num_samples")):
    if old.value is not None:
      raise ValueError(f"--{old.name} is now --{new} (one spelling for every method and "
                           f"binary): pass --{new}={old.value}.")
  overrides: dict[str, Any] = {name: flag.value for name, flag in (
      ("num_steps", _NUM_STEPS), ("num_samples", _NUM_SAMPLES), ("chunk_size", _CHUNK_SIZE))
      if flag.value is not None}
  for method, options in parse_method_options(_METHOD_OPTIONS.value).items():
    if method not in registry.REGISTRY:
      raise ValueError(f"--method_options names {method!r}, not a method; choose from "
                           f"{list(registry.REGISTRY)}.")
    overrides[method] = options
  return overrides


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  overrides = overrides_from_flags()
  registry.check_names(_METHODS.value or [])
  explain.method_options(_METHODS.value or list(registry.REGISTRY), overrides)
  config = runs.resolve_config(_CHECKPOINT.value, _CONFIG.value)
  workdir = _WORKDIR.value or os.path.join(_CHECKPOINT.value, "explain")
  summary = explain.explain_run(config, _CHECKPOINT.value, workdir,
                                methods=_METHODS.value, num_images=_NUM_IMAGES.value,
                                label=_LABEL.value, indices=_INDICES.value, overrides=overrides,
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
