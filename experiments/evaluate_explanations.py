r"""Scores every explanation method of a trained model on any dataset: a leaderboard.

  python -m experiments.evaluate_explanations --checkpoint=runs/demo \
      --workdir=runs/demo/explanations --num_images=32

--checkpoint is a training run directory (its selected model, `selected_model/`, is explained), read
with its own `config.json`; --config is optional, and when given its differences from the run's
config are printed and then used. Each method of `medxai_jax.attribution.registry` (plus a uniform
random map as the contrast) explains --num_images test images of --label (a seeded sample;
--label=-1: class-balanced, `explain.choose_indices`) for their label, and is scored per image
(`medxai_jax.analysis.faithfulness`, `explanation_metrics`): deletion and insertion AUC, ROAD
MoRF / LeRF AUC, sparseness, complexity, (for --sensitivity_methods) max-sensitivity, (for
--sanity_methods) the Spearman correlation with the maps of the model after cascading
randomisation of all its layers, and with --shuffled_labels_checkpoint (a run trained with
--config.dataset.shuffle_labels=True) with the maps of that model (the data-randomisation
test): these need no mask. Against the localisation mask the dataset declares
(`medxai_jax.data.builders.mask_keys`: the phantoms' lesion_mask, covid_radiography's and
tb_cxr's lung_mask, brain_tumor_mri's tumor_mask): pointing game, energy, IoU / precision of the
top-k% region, CheXlocalize's mIoU and hit rate, and Quantus's relevance mass; against a
marker mask (the phantoms' L/R
marker): the share of attribution on it. An image whose mask is empty (all zeros, or its
`has_<mask>` feature False) gets NaN for those scores, left out of means and counts; metrics
that cannot be scored at all are listed with the reason (`not_scored` in evaluation.json, under
the table in leaderboard.md, in the report section). Writes into --workdir: `leaderboard.csv`
and `leaderboard.md` (mean and 95% percentile-bootstrap interval per method and metric, seconds
per image), `gallery.png` (input with the mask outline, images with a mask first, one column
per method), `curves.png` (mean deletion / insertion curves), `sanity.png` + `sanity.csv`
(per-layer randomisation curves), `scores.npz` (every per-image score) and `evaluation.json`
(default --workdir: <checkpoint>/evaluation). The run's `report.html` gets an "evaluation"
section with the leaderboard and the figures.

A whole split, on every device (and host):

  python -m experiments.evaluate_explanations --checkpoint=runs/mura --split=test \
      --num_images=all --methods=gradients,grad_cam,ig --batch_size=64

scores every image of --split (no --label filter) in shards of --batch_size split over the
device mesh (`medxai_jax.analysis.evaluation_stream`): the maps go to the map store
<workdir>/maps (as `experiments/explain.py --num_images=all`; `map_store.open_map_store`), the
per-image scores to <workdir>/scores, shard by shard, so memory stays flat as the split grows
and the leaderboard's bootstrap runs over every image's scores at the end (the numbers of one
batch of the same images). Rerun the same command after a kill: finished shards are kept;
other settings are refused naming the field. The parameter- and data-randomisation checks and
max-sensitivity run on a class-balanced, seeded sample of --sample_images (recorded in
evaluation.json and the report); the gallery shows a class-balanced sample. Several hosts: the
same command on each with --multihost (or --coordinator_address, --num_processes,
--process_id) and a --workdir on a shared file system; process 0 writes the leaderboard.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from experiments import cli
from medxai_jax import explain
from medxai_jax import logs
from medxai_jax import runs
from medxai_jax.analysis import evaluation
from medxai_jax.analysis import faithfulness
from medxai_jax.viz import evaluation_report


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a binary, so importing defines none)."""
  cli.define_config_file(
      "config", None, "Optional: a training config to use instead of the run's config.json "
      "(the differences are printed).")
  flags.DEFINE_string("checkpoint", None, "Training run directory to evaluate.")
  flags.DEFINE_string("workdir", None, "Output directory (default: <checkpoint>/evaluation).")
  flags.DEFINE_list("methods", None, "Methods (default: all of attribution.registry).")
  flags.DEFINE_string("num_images", "16", "Images to score: a number (chosen by --label / "
                      "--indices, one batch), or 'all': every image of --split, streamed over "
                      "every device in shards of --batch_size into resumable map and score "
                      "stores (<workdir>/maps, <workdir>/scores); the randomisation checks and "
                      "max-sensitivity then use a class-balanced sample of --sample_images.")
  flags.DEFINE_integer("batch_size", 32, "--num_images=all: images per shard, split over the "
                       "devices (a multiple of the device count).")
  flags.DEFINE_integer("sample_images", 32, "--num_images=all: the class-balanced, seeded "
                       "sample the model-level checks (parameter and data randomisation, as "
                       "Adebayo et al.) and max-sensitivity run on; recorded in "
                       "evaluation.json ('sample').")
  cli.define_multihost_flags()
  cli.define_model_flag()
  flags.DEFINE_string("split", None, "Split to score (default: the run's "
                      "config.dataset.test_split).")
  flags.DEFINE_integer("label", 1, "Score images of this label (-1: any, class-balanced).")
  flags.DEFINE_list("indices", [], "Split indices (overrides --label).")
  cli.define_explanation_flags()
  flags.DEFINE_integer("seed", 0, "Seed of the random parts (noise, random order, randomised "
                       "weights, bootstrap).")
  flags.DEFINE_integer("curve_steps", 50, "Deletion / insertion steps.")
  flags.DEFINE_integer("patch_size", 4, "Deletion / insertion unit: patch side (pixels).")
  flags.DEFINE_enum("replacement", "blur", list(faithfulness.REPLACEMENTS),
                    "What deleted pixels become.")
  flags.DEFINE_integer("margin", -1, "Pointing-game tolerance in pixels (-1: 15 px per 224 px).")
  flags.DEFINE_list("sanity_methods", ["gradients", "grad_cam"],
                    "Methods given the parameter-randomisation test ('' for none).")
  flags.DEFINE_integer("gallery_rows", 6, "Images shown in the gallery.")
  flags.DEFINE_string("shuffled_labels_checkpoint", None,
                      "A run of the same config trained with "
                      "--config.dataset.shuffle_labels=True: adds Adebayo et al.'s data-"
                      "randomisation test (data_spearman columns).")
  flags.DEFINE_enum("binarisation", "otsu", list(faithfulness.BINARISATIONS),
                    "CheXlocalize mIoU: how a map becomes a segmentation (Otsu, or "
                    "--binarisation_threshold on the min-max normalised map).")
  flags.DEFINE_float("binarisation_threshold", 0.5,
                     "Threshold of --binarisation=fixed, in [0, 1).")
  flags.DEFINE_enum("hit_ties", "first", list(faithfulness.HIT_TIES),
                    "CheXlocalize hit rate with tied maxima: the first in raster order, or the "
                    "share of tied maxima inside the mask.")
  flags.DEFINE_list("road_percentages", ["10", "30", "50", "70", "90"],
                    "ROAD: percentages of pixels removed (Quantus: 1,3,...,99; '' turns ROAD off).")
  flags.DEFINE_list("sensitivity_methods", [],
                    "Methods given max-sensitivity (each re-explained "
                    "--sensitivity_samples times).")
  flags.DEFINE_integer("sensitivity_samples", 10, "Max-sensitivity: perturbations per image.")
  flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  value = lambda name: flags.FLAGS[name].value  # noqa: E731
  options = cli.explanation_overrides()
  margin = value("margin")
  score_options = evaluation.ScoreOptions(
      margin=None if margin < 0 else margin, curve_steps=value("curve_steps"),
      patch_size=value("patch_size"), replacement=value("replacement"),
      sanity_methods=tuple(m for m in value("sanity_methods") if m),
      binarisation=value("binarisation"),
      binarisation_threshold=value("binarisation_threshold"), hit_ties=value("hit_ties"),
      road_percentages=tuple(float(p) for p in value("road_percentages") if p),
      sensitivity_methods=tuple(m for m in value("sensitivity_methods") if m),
      sensitivity_samples=value("sensitivity_samples"), sample_images=value("sample_images"))
  num_images = explain.parse_num_images(value("num_images"), value("indices"))
  if num_images is None and flags.FLAGS["label"].present:
    raise ValueError(f"--num_images=all scores every image of --split whatever its label; "
                     f"drop --label={value('label')} or give --num_images a number.")
  cli.initialize_distributed()  # before anything touches a device
  config = runs.resolve_config(value("checkpoint"), value("config"))
  workdir = value("workdir") or os.path.join(value("checkpoint"), "evaluation")
  summary, report_path = evaluation_report.evaluate_and_report(
      config, value("checkpoint"), workdir, methods=value("methods"),
      num_images=num_images, batch_size=value("batch_size"), split=value("split"), label=value("label"), indices=value("indices"),
      options=options, score_options=score_options, gallery_rows=value("gallery_rows"),
      seed=value("seed"), shuffled_labels_checkpoint=value("shuffled_labels_checkpoint"),
      model=value("model"))
  if report_path is None:  # another process of a multi-host run: process 0 writes
    return
  with open(summary["files"]["leaderboard_md"]) as file:
    print(file.read())
  print(f"Scores in {workdir}; report: {report_path}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
