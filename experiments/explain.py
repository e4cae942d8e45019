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

A whole split, on every device (and host):

  python -m experiments.explain --checkpoint=runs/mura --split=test --num_images=all \
      --methods=gradients,grad_cam,ig --batch_size=64

explains every image of --split (no --label filter) for its label, in shards of --batch_size
images split over the device mesh (`medxai_jax.explain_dataset`), into the map store
<workdir>/maps (`index.json` + one `<method>/shard_<s>.npy` per shard; read it with
`medxai_jax.map_store.open_map_store`). Rerun the same command after a kill: the shards already
written are kept; other settings under an existing store are refused naming the field.
maps_<method>.npy, attributions.png and explain.json then cover a class-balanced, seeded
sample of 8 images (their split indices in explain.json, the log and the figure's titles). Several
hosts: the same command on each with --multihost (or --coordinator_address, --num_processes,
--process_id), as experiments/train.py; each process reads only its rows of every shard.

A run whose training has not finished has no selected_model/ yet: --model=best_so_far explains
its best epoch checkpoint so far (explain.json's `model` records it and its epoch);
experiments/evaluate_explanations.py takes --model too.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax

from experiments import cli
from medxai_jax import explain
from medxai_jax.attribution import registry
from medxai_jax import logs
from medxai_jax import runs
from medxai_jax.data import builders
from medxai_jax import explain_dataset
from medxai_jax.data import pipeline
from medxai_jax.viz import run_report

_CONFIG = cli.define_config_file(
    "config", None, "Optional: a training config to use instead of the run's config.json (the "
    "differences are printed).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training run directory to explain.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: <checkpoint>/explain).")
_METHODS = flags.DEFINE_list("methods", None,
                             "Methods (default: all); see attribution.registry.REGISTRY.")
_NUM_IMAGES = flags.DEFINE_string(
    "num_images", "8", "Images to explain: a number (chosen by --label / --indices, one batch), "
    "or 'all': every image of --split, streamed over every device into the map store "
    "<workdir>/maps.")
_SPLIT = flags.DEFINE_string("split", None, "Split to explain (default: the run's "
                             "config.dataset.test_split).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "--num_images=all: images per shard, split over the devices (a multiple "
    "of the device count).")
_LABEL = flags.DEFINE_integer("label", 1, "Explain images of this label (-1: any, "
                              "class-balanced).")
_INDICES = flags.DEFINE_list("indices", [], "Split indices (overrides --label).")
cli.define_multihost_flags()
cli.define_model_flag()
cli.define_explanation_flags()
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random parts (image sample, SmoothGrad "
                             "noise).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  num_images = explain.parse_num_images(_NUM_IMAGES.value, _INDICES.value)
  if num_images is None and _LABEL.present:
    raise ValueError(f"--num_images=all explains every image of --split whatever its label; "
                     f"drop --label={_LABEL.value} or give --num_images a number.")
  overrides = cli.explanation_overrides()
  registry.check_names(_METHODS.value or [])
  explain.method_options(_METHODS.value or list(registry.REGISTRY), overrides)
  # Before anything touches a device.
  cli.initialize_distributed()
  config = runs.resolve_config(_CHECKPOINT.value, _CONFIG.value)
  workdir = _WORKDIR.value or os.path.join(_CHECKPOINT.value, "explain")
  if num_images is None:
    summary = explain_dataset.explain_split_run(
        config, _CHECKPOINT.value, workdir, split=_SPLIT.value, methods=_METHODS.value,
        overrides=overrides, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        model=flags.FLAGS.model)
    if jax.process_index() != 0:  # process 0 writes the report
      return
  else:
    summary = explain.explain_run(config, _CHECKPOINT.value, workdir,
                                  methods=_METHODS.value, num_images=num_images,
                                  label=_LABEL.value, indices=_INDICES.value,
                                  overrides=overrides, seed=_SEED.value, split=_SPLIT.value,
                                  model=flags.FLAGS.model)
  split = summary["split"]
  source = pipeline.load_sources(config.dataset, [split])[split]
  images, masks = run_report.explained_inputs(
      source, summary["indices"], builders.mask_keys(config.dataset.name).localisation)
  report_path = run_report.add_section(
      _CHECKPOINT.value, "explanations",
      run_report.explanation_section(workdir, summary, _CHECKPOINT.value, images=images,
                                     masks=masks))
  print(json.dumps(summary["methods"], indent=2))
  if "store" in summary:
    print(f"{summary['num_images']} images explained into the map store {summary['store']} "
          f"({summary['num_shards']} shards on {summary['num_devices']} devices, "
          f"{summary['num_processes']} processes).")
  print(f"Maps in {workdir}; report: {report_path}")


if __name__ == "__main__":
  cli.run(main)
