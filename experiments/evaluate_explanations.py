r"""Scores every explanation method of a trained model against the phantoms' masks: a leaderboard.

  python -m experiments.evaluate_explanations --checkpoint=runs/demo \
      --workdir=runs/demo/explanations --num_images=32

--checkpoint is a training run directory (its selected, 'best' checkpoint is explained), read
with its own `config.json`; --config is optional, and when given its differences from the run's
config are printed and then used. Each method of `medxai_jax.explain.METHODS` (plus a uniform
random map as the contrast) explains --num_images test images of --label (a seeded sample;
--label=-1: class-balanced, `explain.choose_indices`) for their label, and is scored per image
(`medxai_jax.analysis.faithfulness`): pointing game, energy in the lesion, IoU / precision of the
top-k% region, deletion and insertion AUC, the share of attribution on the L/R marker, and
(for --sanity_methods) the Spearman correlation with the maps of the model after cascading
randomisation of all its layers, and with --shuffled_labels_checkpoint (a run trained with
--config.dataset.shuffle_labels=True) with the maps of that model (the data-randomisation
test). Writes into --workdir: `leaderboard.csv` and `leaderboard.md`
(mean and 95% percentile-bootstrap interval per method and metric, seconds per image),
`gallery.png` (input with the lesion outline, one column per method), `curves.png` (mean
deletion / insertion curves), `sanity.png` + `sanity.csv` (per-layer randomisation curves),
`scores.npz` (every per-image score) and `evaluation.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from medxai_jax import explain  # noqa: E402
from medxai_jax import logs  # noqa: E402
from medxai_jax import runs  # noqa: E402
from medxai_jax.analysis import faithfulness  # noqa: E402
from medxai_jax.models import base  # noqa: E402
from medxai_jax.train import loop  # noqa: E402
from medxai_jax.train import metrics as metrics_lib  # noqa: E402
from medxai_jax.viz import figures  # noqa: E402
from medxai_jax.viz import report  # noqa: E402


RANDOM = "random"
POINTING_MARGIN_AT_224 = 15  # Zhang et al. (2018): 15 px tolerance on 224 px images
# Lower is better for these metrics; higher for every other one.
LOWER_IS_BETTER = frozenset({"deletion_auc", "marker_share", "cascade_spearman",
                             "cascade_spearman_abs", "data_spearman", "data_spearman_abs"})


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
  """Settings of the scores (see medxai_jax/analysis/faithfulness.py)."""

  margin: int | None = None  # None: 15 px at 224 px (Zhang et al.), scaled to the image size
  top_percents: tuple[float, ...] = (1.0, 5.0)  # phantom lesions cover ~0.2-1% of the image
  curve_steps: int = 50
  patch_size: int = 4
  replacement: str = "blur"
  blur_sigma: float | None = None
  baseline: float = 0.0
  chunk_size: int = 16
  marker_attribution: str = "positive"
  sanity_methods: tuple[str, ...] = ("gradients", "grad_cam")
  sanity_how: str = "init"
  num_resamples: int = 2000


def _fit_masks(masks: np.ndarray, shape: Sequence[int]) -> jax.Array:
  """Stored masks [N, h, w(, 1)] as bool [N, H, W] at the maps' size (nearest neighbour)."""
  masks = np.asarray(masks)
  if masks.ndim == 4:
    masks = masks[..., 0]
  masks = jnp.asarray(masks > 0, jnp.float32)
  if masks.shape[1:] != tuple(shape[1:]):
    masks = jax.image.resize(masks, (masks.shape[0], *shape[1:]), method="nearest")
  return masks > 0.5


def pointing_margin(options: ScoreOptions, image_size: int) -> int:
  """The pointing-game tolerance in pixels: the option, or 15 px per 224 px of image."""
  if options.margin is not None:
    return options.margin
  return int(round(POINTING_MARGIN_AT_224 * image_size / 224))


def metric_order(top_percents: Sequence[float]) -> list[str]:
  """Leaderboard columns: localisation, faithfulness, shortcut, sanity."""
  return ["pointing_game", "energy", "rank_accuracy", "iou_mask_size",
          *[f"{kind}_top{p:g}%" for p in top_percents for kind in ("iou", "precision")],
          "deletion_auc", "insertion_auc", "marker_share", "cascade_spearman",
          "cascade_spearman_abs", "data_spearman", "data_spearman_abs"]


def make_scorer(model: base.Classifier, options: ScoreOptions, margin: int):
  """Jitted (variables, images, targets, maps [B,H,W], lesion, marker) -> per-image scores."""

  def score(variables, images, targets, maps, lesion, marker):
    curve = dict(num_steps=options.curve_steps, patch_size=options.patch_size,
                 replacement=options.replacement, blur_sigma=options.blur_sigma,
                 baseline=options.baseline, chunk_size=options.chunk_size)
    deletion = faithfulness.deletion_curve(model, variables, images, targets, maps, **curve)
    insertion = faithfulness.insertion_curve(model, variables, images, targets, maps, **curve)
    scores = faithfulness.localisation_scores(maps, lesion, margin=margin,
                                              top_percents=options.top_percents)
    scores["deletion_auc"] = deletion.auc
    scores["insertion_auc"] = insertion.auc
    scores["marker_share"] = faithfulness.marker_reliance(
        maps, marker, options.marker_attribution, margin=margin)["per_image"]
    curves = {"fractions": deletion.fractions, "deletion": deletion.scores,
              "insertion": insertion.scores}
    return scores, curves

  return jax.jit(score)


def sanity_scores(model: base.Classifier, variables: base.Variables, images: jax.Array,
                  targets: jax.Array, method: str, key: jax.Array,
                  options: explain.ExplainOptions, how: str = "init") -> dict[str, Any]:
  """Cascading and independent randomisation results of one method (numpy, per step x image)."""
  method_key, weights_key = jax.random.split(key)
  fn = explain.METHODS[method]
  explain_fn = lambda v: fn(model, v, images, targets, method_key, options)  # noqa: E731
  result = {}
  if method in explain.HOST_METHODS:  # not traceable whole: one call per randomisation step
    layers = faithfulness.parameter_layers(model)
    fresh = jax.jit(lambda v: faithfulness.fresh_parameters(model, v, weights_key, how=how))(
        variables)
    leaf_layers = faithfulness.leaf_layer_indices(variables["params"], layers)
    select = jax.jit(lambda v, row: faithfulness.select_layers(v, fresh, leaf_layers, row))
    original = explain_fn(variables)
    for mode in faithfulness.RANDOMISATION_MODES:
      labels, schedule = faithfulness.randomisation_schedule(layers, mode)
      steps = [faithfulness.map_similarity(original, explain_fn(select(variables, row)))
               for row in schedule]
      result[mode] = {"layers": list(labels),
                      **{k: np.stack([np.asarray(step[k]) for step in steps])
                         for k in ("spearman", "spearman_abs")}}
    return result
  for mode in faithfulness.RANDOMISATION_MODES:
    test = jax.jit(lambda v, mode=mode: faithfulness.randomisation_test(
        model, v, explain_fn, weights_key, mode=mode, how=how))(variables)
    result[mode] = {"layers": list(test.layers), "spearman": np.asarray(test.spearman),
                    "spearman_abs": np.asarray(test.spearman_abs)}
  return result


def format_interval(interval: faithfulness.Interval) -> str:
  """'mean [low, high]' with 3 decimals ('-' when no image had a defined score)."""
  if not interval.count:
    return "-"
  return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def leaderboard_rows(leaderboard: Mapping[str, Mapping[str, faithfulness.Interval]],
                     metrics: Sequence[str], seconds: Mapping[str, float | None]
                     ) -> tuple[list[str], list[list[str]]]:
  """Header and rows (method x metric as 'mean [low, high]', then seconds per image)."""
  header = ["method", *[f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in metrics],
            "seconds per image"]
  rows = []
  for method, intervals in leaderboard.items():
    time = seconds.get(method)
    rows.append([method, *[format_interval(intervals[m]) if m in intervals else "-"
                           for m in metrics], "-" if time is None else f"{time:.4f}"])
  return header, rows


def write_leaderboard(leaderboard: Mapping[str, Mapping[str, faithfulness.Interval]],
                      metrics: Sequence[str], seconds: Mapping[str, float | None],
                      workdir: str) -> tuple[str, str]:
  """Writes leaderboard.csv (mean, low, high, n per metric) and leaderboard.md; returns paths."""
  csv_path = os.path.join(workdir, "leaderboard.csv")
  with open(csv_path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["method", *[f"{m}_{part}" for m in metrics
                                 for part in ("mean", "low", "high", "n")], "seconds_per_image"])
    for method, intervals in leaderboard.items():
      cells = []
      for metric in metrics:
        interval = intervals.get(metric, faithfulness.Interval(np.nan, np.nan, np.nan, 0))
        cells += [f"{interval.mean:.6g}", f"{interval.low:.6g}", f"{interval.high:.6g}",
                  interval.count]
      time = seconds.get(method)
      writer.writerow([method, *cells, "" if time is None else f"{time:.6g}"])
  header, rows = leaderboard_rows(leaderboard, metrics, seconds)
  md_path = os.path.join(workdir, "leaderboard.md")
  with open(md_path, "w") as file:
    file.write("| " + " | ".join(header) + " |\n")
    file.write("|" + "---|" * len(header) + "\n")
    for row in rows:
      file.write("| " + " | ".join(row) + " |\n")
  return csv_path, md_path


def plot_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: str) -> str:
  """Mean deletion and insertion curves per method (the random order dashed)."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for method, curve in curves.items():
    style = "--" if method == RANDOM else "-"
    for axis, mode in zip(axes, ("deletion", "insertion")):
      axis.plot(curve["fractions"], curve[mode].mean(axis=0), style, label=method)
  for axis, mode in zip(axes, ("deletion", "insertion")):
    axis.set_xlabel(f"fraction {'removed' if mode == 'deletion' else 'inserted'}")
    axis.set_ylabel("target-class probability")
    axis.set_title(mode, fontsize=9)
    axis.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="lower right")
  return figures.save_figure(fig, path, dpi=110)


def plot_sanity(sanity: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Mean Spearman (of |map|) of original vs randomised maps per layer (Adebayo fig. 2 style)."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
  for axis, mode in zip(axes, faithfulness.RANDOMISATION_MODES):
    for method, result in sanity.items():
      layers = result[mode]["layers"]
      axis.plot(np.arange(len(layers)), np.nanmean(result[mode]["spearman_abs"], axis=1), "o-",
                label=method)
      axis.set_xticks(np.arange(len(layers)), layers, rotation=60, fontsize=7)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_title(f"{mode} randomisation (output -> input)", fontsize=9)
    axis.grid(alpha=0.3)
  axes[0].set_ylabel("Spearman of |map|")
  axes[1].legend(fontsize=7)
  return figures.save_figure(fig, path, dpi=110)


def write_sanity_csv(sanity: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """One row per method, mode and step: mean Spearman (signed and |.|) over images."""
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["method", "mode", "step", "layer", "spearman", "spearman_abs"])
    for method, result in sanity.items():
      for mode, values in result.items():
        for step, layer in enumerate(values["layers"]):
          writer.writerow([method, mode, step, layer,
                           f"{np.nanmean(values['spearman'][step]):.6g}",
                           f"{np.nanmean(values['spearman_abs'][step]):.6g}"])
  return path


def evaluate_run(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str, *,
                 methods: Sequence[str] | None = None, num_images: int = 16, label: int = 1,
                 indices: Sequence[int] = (), options: explain.ExplainOptions = (
                     explain.ExplainOptions()), score_options: ScoreOptions = ScoreOptions(),
                 gallery_rows: int = 6, seed: int = 0,
                 shuffled_labels_checkpoint: str | None = None) -> dict[str, Any]:
  """Scores every method on test images of a run's selected model; writes the leaderboard files.

  `shuffled_labels_checkpoint`: a run of the same config trained with
  `config.dataset.shuffle_labels=True` (Adebayo et al.'s data-randomisation test); every method
  then also explains the same images with that model, with the same keys, and the Spearman
  correlations of the two maps per image are the 'data_spearman(_abs)' columns.

  Returns what a report needs: `leaderboard` (method -> metric -> mean/low/high/count),
  `metrics`, `seconds_per_image`, `methods` (timings and skip reasons), `sanity` (per-layer mean
  Spearman), `marker_share` (per method, mean), the written `files` and the image `indices`.
  """
  workdir = loop.prepare_workdir(workdir)
  model, variables = loop.restore_selected_model(config, checkpoint_dir)
  _, _, preprocess = loop.build_components(config)
  examples = explain.load_split(config, config.dataset.test_split,
                                ("image", "label", "lesion_mask", "marker_mask", "index"))
  chosen = explain.choose_indices(examples["label"], num_images, label, indices)
  images = jax.jit(preprocess)(jnp.asarray(examples["image"][chosen]))
  targets = jnp.asarray(examples["label"][chosen], jnp.int32)
  shape = images.shape[:3]
  missing = [k for k in ("lesion_mask", "marker_mask") if k not in examples]
  if missing:
    raise ValueError(f"The test split of {config.dataset.name!r} has no {missing}; the scores "
                     "need the phantoms' lesion and marker masks.")
  lesion = _fit_masks(examples["lesion_mask"][chosen], shape)
  marker = _fit_masks(examples["marker_mask"][chosen], shape)

  key = jax.random.key(seed)
  methods_key, random_key, sanity_key = jax.random.split(key, 3)
  methods = list(methods or explain.METHODS)
  maps, info = explain.run_methods(model, variables, images, targets, methods, methods_key,
                                   options)
  maps_by_method = {name: np.asarray(faithfulness.as_maps(value)) for name, value in maps.items()}
  maps_by_method[RANDOM] = np.asarray(faithfulness.random_maps(random_key, shape))

  margin = pointing_margin(score_options, max(shape[1:]))
  scorer = make_scorer(model, score_options, margin)
  per_image: dict[str, dict[str, np.ndarray]] = {}
  curves: dict[str, dict[str, np.ndarray]] = {}
  for name, value in maps_by_method.items():
    scores, curve = jax.device_get(scorer(variables, images, targets, jnp.asarray(value),
                                          lesion, marker))
    per_image[name] = {k: np.asarray(v) for k, v in scores.items()}
    curves[name] = {k: np.asarray(v) for k, v in curve.items()}

  data_test = None
  if shuffled_labels_checkpoint:
    data_test = data_randomisation(config, shuffled_labels_checkpoint, images, targets, maps,
                                   methods_key, options)
    for name, scores in data_test["per_image"].items():
      per_image[name].update(scores)

  sanity = {}
  for index, name in enumerate(m for m in score_options.sanity_methods if m in maps):
    sanity[name] = sanity_scores(model, variables, images, targets, name,
                                 jax.random.fold_in(sanity_key, index), options,
                                 how=score_options.sanity_how)
    cascade = sanity[name]["cascading"]
    per_image[name]["cascade_spearman"] = cascade["spearman"][-1]
    per_image[name]["cascade_spearman_abs"] = cascade["spearman_abs"][-1]

  present = {k for scores in per_image.values() for k in scores}
  metrics = [m for m in metric_order(score_options.top_percents) if m in present]
  leaderboard = {name: faithfulness.summarise(scores, seed=seed,
                                              num_resamples=score_options.num_resamples)
                 for name, scores in per_image.items()}
  seconds = {name: info.get(name, {}).get("seconds_per_image") for name in leaderboard}
  csv_path, md_path = write_leaderboard(leaderboard, metrics, seconds, workdir)
  shown = slice(0, gallery_rows)
  gallery = figures.plot_attribution_grid(
      examples["image"][chosen][shown], {n: m[shown] for n, m in maps_by_method.items()
                                         if n != RANDOM},
      os.path.join(workdir, "gallery.png"), masks=np.asarray(lesion)[shown],
      titles=[f"#{i}" for i in chosen[shown]])
  files = {"leaderboard_csv": csv_path, "leaderboard_md": md_path, "gallery": gallery,
           "curves": plot_curves(curves, os.path.join(workdir, "curves.png"))}
  if sanity:
    files["sanity"] = plot_sanity(sanity, os.path.join(workdir, "sanity.png"))
    files["sanity_csv"] = write_sanity_csv(sanity, os.path.join(workdir, "sanity.csv"))
  np.savez(os.path.join(workdir, "scores.npz"),
           **{f"{method}/{metric}": values for method, scores in per_image.items()
              for metric, values in scores.items()})

  summary = {
      "checkpoint": os.path.abspath(checkpoint_dir), "split": config.dataset.test_split,
      "indices": chosen.tolist(), "targets": np.asarray(targets).tolist(),
      "num_images": len(chosen), "metrics": metrics,
      "leaderboard": {name: {m: interval._asdict() for m, interval in intervals.items()}
                      for name, intervals in leaderboard.items()},
      "seconds_per_image": seconds, "methods": info,
      "marker_share": {name: leaderboard[name]["marker_share"].mean for name in leaderboard},
      "sanity": {name: {mode: {"layers": values["layers"],
                               "spearman": np.nanmean(values["spearman"], axis=1).tolist(),
                               "spearman_abs": np.nanmean(values["spearman_abs"],
                                                          axis=1).tolist()}
                        for mode, values in result.items()}
                 for name, result in sanity.items()},
      "data_randomisation": None if data_test is None else {
          "checkpoint": os.path.abspath(shuffled_labels_checkpoint),
          "test_accuracy_shuffled_model": data_test["test_accuracy"],
          "mean": {name: {k: float(np.nanmean(v)) for k, v in scores.items()}
                   for name, scores in data_test["per_image"].items()}},
      "options": dataclasses.asdict(options),
      "score_options": {**dataclasses.asdict(score_options), "margin": margin},
      "files": {k: os.path.abspath(v) for k, v in files.items()},
  }
  with open(os.path.join(workdir, "evaluation.json"), "w") as file:
    json.dump(summary, file, indent=2, default=float)
  return summary


def data_randomisation(config: ml_collections.ConfigDict, shuffled_labels_checkpoint: str,
                       images: jax.Array, targets: jax.Array, maps: Mapping[str, jax.Array],
                       key: jax.Array, options: explain.ExplainOptions) -> dict[str, Any]:
  """Spearman [B] per method between `maps` and the shuffled-label model's maps of `images`."""
  metrics_path = os.path.join(shuffled_labels_checkpoint, "metrics.json")
  trained = {}
  if os.path.exists(os.path.join(shuffled_labels_checkpoint, "config.json")):
    with open(os.path.join(shuffled_labels_checkpoint, "config.json")) as file:
      trained = json.load(file)
  if not trained.get("dataset", {}).get("shuffle_labels", False):
    raise ValueError(f"{shuffled_labels_checkpoint} was not trained with "
                     "config.dataset.shuffle_labels=True (see its config.json); the data-"
                     "randomisation test needs a model fit to shuffled training labels.")
  model, variables = loop.restore_selected_model(config, shuffled_labels_checkpoint)
  shuffled_maps, _ = explain.run_methods(model, variables, images, targets, list(maps), key,
                                         options)
  per_image = {}
  for name, value in maps.items():
    scores = faithfulness.data_randomisation_scores(faithfulness.as_maps(value),
                                                    faithfulness.as_maps(shuffled_maps[name]))
    per_image[name] = {f"data_{k}": np.asarray(v) for k, v in scores.items()}
  test_accuracy = None
  if os.path.exists(metrics_path):
    with open(metrics_path) as file:
      test_accuracy = json.load(file).get("test", {}).get("accuracy")
  return {"per_image": per_image, "test_accuracy": test_accuracy}


def leaderboard_section(summary: Mapping[str, Any], report_dir: str,
                        title: str = "Scoring the explanations") -> report.Section:
  """A report section: how the scores are defined, the leaderboard table and the figures."""
  metrics = summary["metrics"]
  leaderboard = {name: {m: faithfulness.Interval(**values) for m, values in intervals.items()}
                 for name, intervals in summary["leaderboard"].items()}
  header, rows = leaderboard_rows(leaderboard, metrics, summary["seconds_per_image"])
  options = summary["score_options"]
  replaced_by = "a blurred copy" if options["replacement"] == "blur" else "a constant baseline"
  paragraphs = [
      f"Every method explains {summary['num_images']} test images for their label; each cell is "
      "the mean over images with a 95% percentile-bootstrap interval (arrows: the better "
      "direction). 'random' is a uniform random map, the contrast every score should beat.",
      f"Localisation against the lesion mask: pointing game (maximum inside the mask, tolerance "
      f"{options['margin']} px), energy (share of positive attribution inside it), IoU and "
      "precision of the top-k% pixels, and rank accuracy (precision of the top-|mask| pixels). "
      "Faithfulness: deletion / insertion AUC of the target probability over "
      f"{options['curve_steps']} steps of {options['patch_size']}x{options['patch_size']} "
      f"patches replaced by {replaced_by} "
      "(deletion: lower is better; insertion: higher). marker_share: share of "
      f"{options['marker_attribution']} attribution on the L/R marker (its glyph grown by "
      f"{options['margin']} px), the shortcut (lower is better; 'random' gives the region's "
      "area share). cascade_spearman(_abs): rank correlation of the maps with those of the model "
      "whose every layer was re-initialised (Adebayo et al. 2018; close to 0 passes).",
  ]
  data_test = summary.get("data_randomisation")
  if data_test:
    accuracy = data_test.get("test_accuracy_shuffled_model")
    paragraphs.append(
        "data_spearman(_abs): rank correlation of each map with the same method's map from a "
        "model trained on a permutation of the training labels (Adebayo et al.'s data-"
        "randomisation test; close to 0 passes: the explanation depends on what the model "
        "learned from the labels)"
        + ("." if accuracy is None else f"; that model's test accuracy is {accuracy:.3f}."))
  figures_ = [report.Figure(os.path.relpath(summary["files"]["gallery"], report_dir),
                            "Input with the lesion outlined in red, then each method's |map|."),
              report.Figure(os.path.relpath(summary["files"]["curves"], report_dir),
                            "Mean deletion (left) and insertion (right) curves; dashed: random "
                            "order.")]
  if "sanity" in summary["files"]:
    figures_.append(report.Figure(
        os.path.relpath(summary["files"]["sanity"], report_dir),
        "Model-parameter randomisation: mean Spearman correlation of |map| with the original, "
        "layers randomised from the output towards the input (cascading: cumulatively)."))
  return report.Section(title, paragraphs=paragraphs,
                        tables=[report.Table(header, rows, caption="Explanation leaderboard.")],
                        figures=figures_)


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a binary, so importing defines none).

  A flag that another imported module already defines (same name and meaning) is reused.
  """
  defined = flags.FLAGS

  def define(kind, name, default, help_text, **kwargs):
    if name not in defined:
      getattr(flags, f"DEFINE_{kind}")(name, default, help_text, **kwargs)

  if "config" not in defined:
    config_flags.DEFINE_config_file(
        "config", None, "Optional: a training config to use instead of the run's config.json "
        "(the differences are printed).", lock_config=True)
  define("string", "checkpoint", None, "Training run directory to evaluate.")
  define("string", "workdir", None, "Output directory.")
  define("list", "methods", None, "Methods (default: all of explain.METHODS).")
  define("integer", "num_images", 16, "Test images to score.")
  define("integer", "label", 1, "Score test images of this label (-1: any, class-balanced).")
  define("list", "indices", [], "Test-split indices (overrides --label).")
  define("integer", "steps", 64, "IG / Blur IG / Guided IG gradient evaluations.")
  define("integer", "samples", 32, "SmoothGrad noise samples.")
  define("integer", "seed", 0, "Seed of the random parts (noise, random order, randomised "
         "weights, bootstrap).")
  define("integer", "curve_steps", 50, "Deletion / insertion steps.")
  define("integer", "patch_size", 4, "Deletion / insertion unit: patch side (pixels).")
  if "replacement" not in defined:
    flags.DEFINE_enum("replacement", "blur", list(faithfulness.REPLACEMENTS),
                      "What deleted pixels become.")
  define("integer", "margin", -1, "Pointing-game tolerance in pixels (-1: 15 px per 224 px).")
  define("list", "sanity_methods", ["gradients", "grad_cam"],
         "Methods given the parameter-randomisation test ('' for none).")
  define("integer", "gallery_rows", 6, "Images shown in the gallery.")
  define("string", "shuffled_labels_checkpoint", None,
         "A run of the same config trained with --config.dataset.shuffle_labels=True: adds "
         "Adebayo et al.'s data-randomisation test (data_spearman columns).")
  flags.mark_flags_as_required(["checkpoint", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  value = lambda name: flags.FLAGS[name].value  # noqa: E731
  options = explain.ExplainOptions(steps=value("steps"), samples=value("samples"))
  margin = value("margin")
  score_options = ScoreOptions(margin=None if margin < 0 else margin,
                               curve_steps=value("curve_steps"),
                               patch_size=value("patch_size"), replacement=value("replacement"),
                               sanity_methods=tuple(m for m in value("sanity_methods") if m))
  config = runs.resolve_config(value("checkpoint"), value("config"))
  summary = evaluate_run(config, value("checkpoint"), value("workdir"),
                         methods=value("methods"), num_images=value("num_images"),
                         label=value("label"), indices=value("indices"), options=options,
                         score_options=score_options, gallery_rows=value("gallery_rows"),
                         seed=value("seed"),
                         shuffled_labels_checkpoint=value("shuffled_labels_checkpoint"))
  metrics_lib.rewrite_strict_json(os.path.join(value("workdir"), "evaluation.json"))
  with open(summary["files"]["leaderboard_md"]) as file:
    print(file.read())


if __name__ == "__main__":
  _define_flags()
  app.run(main)
