r"""Scores every explanation method of a trained model on any dataset: a leaderboard.

  python -m experiments.evaluate_explanations --checkpoint=runs/demo \
      --workdir=runs/demo/explanations --num_images=32

--checkpoint is a training run directory (its selected, 'best' checkpoint is explained), read
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
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Collection, Mapping, NamedTuple, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import cli  # noqa: E402
from medxai_jax import explain  # noqa: E402
from medxai_jax import logs  # noqa: E402
from medxai_jax import runs  # noqa: E402
from medxai_jax.analysis import explanation_metrics  # noqa: E402
from medxai_jax.analysis import faithfulness  # noqa: E402
from medxai_jax.attribution import registry  # noqa: E402
from medxai_jax.models import base  # noqa: E402
from medxai_jax.observe import progress  # noqa: E402
from medxai_jax.observe import summaries  # noqa: E402
from medxai_jax.observe import timing  # noqa: E402
from medxai_jax.train import loop  # noqa: E402
from medxai_jax.train import metrics as metrics_lib  # noqa: E402
from medxai_jax.viz import figures  # noqa: E402
from medxai_jax.viz import report  # noqa: E402
from medxai_jax.viz import run_report  # noqa: E402


RANDOM = "random"
POINTING_MARGIN_AT_224 = 15  # Zhang et al. (2018): 15 px tolerance on 224 px images
# Lower is better for these metrics; higher for every other one.
LOWER_IS_BETTER = frozenset({"deletion_auc", "marker_share", "cascade_spearman",
                             "cascade_spearman_abs", "data_spearman", "data_spearman_abs",
                             "road_morf_auc", "complexity", "max_sensitivity"})


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
  # CheXlocalize's mIoU and hit rate (Saporta et al. 2022): the map binarised by Otsu's method
  # (their default) or 'fixed' (normalised map > binarisation_threshold, their tuned option).
  binarisation: str = "otsu"
  binarisation_threshold: float = 0.5
  miou_true_positive_only: bool = True  # their default: an empty segmentation is not scored
  hit_ties: str = "first"  # 'first' maximal pixel in raster order (theirs) or the tied 'share'
  # Quantus's metrics (medxai_jax/analysis/explanation_metrics.py). ROAD: the removed
  # percentages (Quantus: 1, 3, ..., 99; () turns ROAD off) and the imputation noise.
  road_percentages: tuple[float, ...] = (10.0, 30.0, 50.0, 70.0, 90.0)
  road_noise: float = 0.01
  # Max-sensitivity re-explains each image num_samples times: off unless methods are named.
  sensitivity_methods: tuple[str, ...] = ()
  sensitivity_samples: int = 10
  sensitivity_radius: float = 0.2


def _fit_masks(masks: np.ndarray, shape: Sequence[int], name: str = "masks") -> jax.Array:
  """Stored masks [N, h, w(, 1)] as bool [N, H, W] at the maps' size (nearest neighbour)."""
  masks = np.asarray(masks)
  if masks.ndim == 4:
    if masks.shape[-1] != 1:
      raise ValueError(f"The {name} feature must have one channel; got shape {masks.shape}.")
    masks = masks[..., 0]
  if masks.ndim != 3 or len(masks) != shape[0]:
    raise ValueError(f"The {name} feature must be [N, h, w(, 1)] with N = {shape[0]} images; got "
                     f"shape {masks.shape}.")
  masks = jnp.asarray(masks > 0, jnp.float32)
  if masks.shape[1:] != tuple(shape[1:]):
    masks = jax.image.resize(masks, (masks.shape[0], *shape[1:]), method="nearest")
  return masks > 0.5


def pointing_margin(options: ScoreOptions, image_size: int) -> int:
  """The pointing-game tolerance in pixels: the option, or 15 px per 224 px of image."""
  if options.margin is not None:
    return options.margin
  return int(round(POINTING_MARGIN_AT_224 * image_size / 224))


def localisation_metrics(top_percents: Sequence[float]) -> list[str]:
  """The scores that need a localisation mask, in leaderboard order."""
  return ["pointing_game", "energy", "hit_rate", "miou", "rank_accuracy", "relevance_mass",
          "iou_mask_size",
          *[f"{kind}_top{p:g}%" for p in top_percents for kind in ("iou", "precision")]]


MARKER_METRICS = ("marker_share",)
CHEXLOCALIZE_METRICS = ("hit_rate", "miou")
CASCADE_METRICS = ("cascade_spearman", "cascade_spearman_abs")
DATA_METRICS = ("data_spearman", "data_spearman_abs")
ROAD_METRICS = ("road_morf_auc", "road_lerf_auc")
COMPLEXITY_METRICS = ("sparseness", "complexity")
SENSITIVITY_METRICS = ("max_sensitivity",)
# Scored after the others, so adding them kept the others' bootstrap seeds.
QUANTUS_METRICS = ("relevance_mass", *ROAD_METRICS, *COMPLEXITY_METRICS, *SENSITIVITY_METRICS)


def metric_order(top_percents: Sequence[float]) -> list[str]:
  """Leaderboard columns: localisation, faithfulness, complexity, robustness, shortcut, sanity."""
  return [*localisation_metrics(top_percents), "deletion_auc", "insertion_auc", *ROAD_METRICS,
          *COMPLEXITY_METRICS, *SENSITIVITY_METRICS, *MARKER_METRICS, *CASCADE_METRICS,
          *DATA_METRICS]


class ScoringMasks(NamedTuple):
  """The masks [N, H, W] (bool) the scores use, None where a kind cannot be scored."""

  localisation: jax.Array | None
  marker: jax.Array | None
  localisation_key: str | None
  marker_key: str | None


def dataset_mask_keys(dataset_name: str):
  """The dataset's declared localisation and marker mask features (`builders.mask_keys`)."""
  from medxai_jax.data import builders  # registers the TFDS builders: a heavy import, kept local

  return builders.mask_keys(dataset_name)


def mask_problem(dataset_name: str, kind: str, key: str | None,
                 available: Collection[str]) -> str | None:
  """Why `kind` ('localisation' / 'marker') masks cannot be read from a split, or None."""
  if key is None:
    return f"{dataset_name} declares no {kind} mask"
  if key not in available:
    return (f"the test split of {dataset_name} has no {key!r} feature (prepared by an older "
            "builder version?)")
  return None


def empty_mask_problem(dataset_name: str, key: str, masks: np.ndarray,
                       indices: Sequence[int]) -> str | None:
  """A reason when no chosen image has a non-empty mask (nothing to score against), or None."""
  if np.asarray(masks).any(axis=(1, 2)).any():
    return None
  return (f"{key} is empty (all zeros) on all {len(indices)} chosen test images of "
          f"{dataset_name} (a collection shipped or built without these masks)")


def scoring_masks(dataset_name: str, examples: Mapping[str, np.ndarray], chosen: np.ndarray,
                  shape: Sequence[int]) -> tuple[ScoringMasks, dict[str, str]]:
  """The dataset's localisation and marker masks of the chosen images, and why any is missing.

  A `has_<key>` feature (tb_cxr's `has_lung_mask`) empties the masks of images it marks False.
  An image whose mask is empty gets NaN for that kind of score; when every chosen image's is
  empty, the kind is not scored at all (reason returned, keyed 'localisation' / 'marker').
  """
  keys = dataset_mask_keys(dataset_name)
  masks, problems = {}, {}
  for kind, key in (("localisation", keys.localisation), ("marker", keys.marker)):
    problem = mask_problem(dataset_name, kind, key, examples)
    fitted = None
    if problem is None:
      fitted = np.asarray(_fit_masks(examples[key][chosen], shape, key))
      flag = f"has_{key}"
      if flag in examples:
        fitted = fitted & np.asarray(examples[flag][chosen], bool)[:, None, None]
      problem = empty_mask_problem(dataset_name, key, fitted, chosen)
    if problem is None:
      masks[kind] = jnp.asarray(fitted)
    else:
      problems[kind] = problem
  return ScoringMasks(masks.get("localisation"), masks.get("marker"), keys.localisation,
                      keys.marker), problems


def not_scored_metrics(problems: Mapping[str, str], top_percents: Sequence[float],
                       sanity_methods: Sequence[str], data_test: bool) -> dict[str, str]:
  """Every leaderboard metric that is not computed, with the reason."""
  reasons = {}
  if "localisation" in problems:
    reasons.update(dict.fromkeys(localisation_metrics(top_percents), problems["localisation"]))
  if "marker" in problems:
    reasons.update(dict.fromkeys(MARKER_METRICS, problems["marker"]))
  if not sanity_methods:
    reasons.update(dict.fromkeys(CASCADE_METRICS, "no sanity method chosen (--sanity_methods)"))
  if not data_test:
    reasons.update(dict.fromkeys(DATA_METRICS, "no shuffled-label run given "
                                 "(--shuffled_labels_checkpoint)"))
  return reasons


def optional_not_scored(options: ScoreOptions) -> dict[str, str]:
  """The optional Quantus metrics that `options` turn off, with the reason."""
  reasons = {}
  if not options.road_percentages:
    reasons.update(dict.fromkeys(ROAD_METRICS, "ROAD turned off (no --road_percentages)"))
  if not options.sensitivity_methods:
    reasons.update(dict.fromkeys(SENSITIVITY_METRICS, "no method chosen for the re-explaining "
                                 "max-sensitivity (--sensitivity_methods)"))
  return reasons


def mask_coverage(key: str | None, masks: jax.Array | None, chosen: np.ndarray
                  ) -> dict[str, Any] | None:
  """Which chosen images have a non-empty mask (the others' scores are NaN), or None."""
  if masks is None:
    return None
  present = np.asarray(masks).any(axis=(1, 2))
  return {"feature": key, "num_images": int(len(chosen)), "num_with_mask": int(present.sum()),
          "indices_without_mask": np.asarray(chosen)[~present].tolist()}


def move_to_end(scores: dict[str, Any], keys: Sequence[str]) -> None:
  """Moves the `keys` that `scores` has to its end, in the order given (in place)."""
  for key in keys:
    if key in scores:
      scores[key] = scores.pop(key)


def gallery_rows_shown(masks: jax.Array | None, count: int, rows: int) -> np.ndarray:
  """Positions of the images the gallery shows: those with a non-empty mask first, in order."""
  if masks is None:
    return np.arange(min(rows, count))
  empty = ~np.asarray(masks).any(axis=(1, 2))
  return np.argsort(empty, kind="stable")[:rows]


def make_scorer(model: base.Classifier, options: ScoreOptions, margin: int):
  """Jitted (variables, images, targets, maps [B,H,W], lesion, marker, key) -> per-image scores.

  `lesion` (the localisation masks) or `marker` may be None: those scores are left out. `key`
  draws ROAD's imputation noise.
  """

  def score(variables, images, targets, maps, lesion, marker, key):
    curve = dict(num_steps=options.curve_steps, patch_size=options.patch_size,
                 replacement=options.replacement, blur_sigma=options.blur_sigma,
                 baseline=options.baseline, chunk_size=options.chunk_size)
    deletion = faithfulness.deletion_curve(model, variables, images, targets, maps, **curve)
    insertion = faithfulness.insertion_curve(model, variables, images, targets, maps, **curve)
    scores = {}
    if lesion is not None:
      scores.update(faithfulness.localisation_scores(maps, lesion, margin=margin,
                                                     top_percents=options.top_percents))
      scores.update(faithfulness.chexlocalize_scores(
          maps, lesion, binarisation=options.binarisation,
          threshold=options.binarisation_threshold,
          true_positive_only=options.miou_true_positive_only, ties=options.hit_ties))
    scores["deletion_auc"] = deletion.auc
    scores["insertion_auc"] = insertion.auc
    if marker is not None:
      scores["marker_share"] = faithfulness.marker_reliance(
          maps, marker, options.marker_attribution, margin=margin)["per_image"]
    if lesion is not None:
      scores["relevance_mass"] = explanation_metrics.relevance_mass_accuracy(maps, lesion)
    if options.road_percentages:
      for order, road_key in zip(explanation_metrics.ROAD_ORDERS, jax.random.split(key)):
        scores[f"road_{order}_auc"] = explanation_metrics.road(
            model.logits_fn(variables), images, targets, maps, key=road_key, order=order,
            percentages=options.road_percentages, noise=options.road_noise,
            chunk_size=options.chunk_size).auc
    scores["sparseness"] = explanation_metrics.sparseness(maps)
    scores["complexity"] = explanation_metrics.complexity(maps)
    curves = {"fractions": deletion.fractions, "deletion": deletion.scores,
              "insertion": insertion.scores}
    return scores, curves

  return jax.jit(score)


def sanity_scores(model: base.Classifier, variables: base.Variables, images: jax.Array,
                  targets: jax.Array, method: str, key: jax.Array,
                  options: explain.Overrides | None = None, how: str = "init"
                  ) -> dict[str, Any]:
  """Cascading and independent randomisation results of one method (numpy, per step x image)."""
  method_key, weights_key = jax.random.split(key)
  method_options = explain.method_options([method], options)[method]
  explain_fn = lambda v: explain.method_maps(model, v, images, targets, method,  # noqa: E731
                                             method_key, method_options)
  result = {}
  if registry.get(method).host:  # not traceable whole: one call per randomisation step
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


def check_sensitivity_methods(methods: Sequence[str]) -> tuple[str, ...]:
  """The methods given max-sensitivity, raising on unknown or untraceable (host) ones."""
  registry.check_names(methods)
  host = [m for m in methods if registry.get(m).host]
  if host:
    raise ValueError(f"sensitivity_methods {host} run on the host (not traceable), so they "
                     "cannot be re-explained under vmap; choose among "
                     f"{[m for m in registry.names() if not registry.get(m).host]}.")
  return tuple(methods)


def sensitivity_scores(model: base.Classifier, variables: base.Variables, images: jax.Array,
                       targets: jax.Array, maps: jax.Array, method: str, key: jax.Array,
                       overrides: explain.Overrides | None, score_options: ScoreOptions
                       ) -> np.ndarray:
  """Max-sensitivity [B] of one (traceable) method's maps, re-explained with the same key."""
  method_key, noise_key = jax.random.split(key)
  method_options = explain.method_options([method], overrides)[method]

  def run(variables, images, targets, maps):
    explain_fn = lambda x: faithfulness.as_maps(explain.method_maps(  # noqa: E731
        model, variables, x, targets, method, method_key, method_options))
    return explanation_metrics.max_sensitivity(
        explain_fn, images, maps, key=noise_key, num_samples=score_options.sensitivity_samples,
        radius=score_options.sensitivity_radius, chunk_size=score_options.chunk_size)

  return np.asarray(jax.jit(run)(variables, images, targets, maps))


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


def not_scored_lines(not_scored: Mapping[str, str]) -> list[str]:
  """'metric, metric: reason' per distinct reason, in the metrics' order."""
  by_reason: dict[str, list[str]] = {}
  for metric, reason in not_scored.items():
    by_reason.setdefault(reason, []).append(metric)
  return [f"{', '.join(metrics)}: {reason}" for reason, metrics in by_reason.items()]


def write_leaderboard(leaderboard: Mapping[str, Mapping[str, faithfulness.Interval]],
                      metrics: Sequence[str], seconds: Mapping[str, float | None],
                      workdir: str, not_scored: Mapping[str, str] | None = None
                      ) -> tuple[str, str]:
  """Writes leaderboard.csv (mean, low, high, n per metric) and leaderboard.md; returns paths.

  `not_scored` (metric -> reason) is listed under the table in leaderboard.md.
  """
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
    if not_scored:
      file.write("\nNot scored:\n")
      for line in not_scored_lines(not_scored):
        file.write(f"- {line}\n")
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
                 indices: Sequence[int] = (), options: explain.Overrides | None = None,
                 score_options: ScoreOptions = ScoreOptions(),
                 gallery_rows: int = 6, seed: int = 0,
                 shuffled_labels_checkpoint: str | None = None) -> dict[str, Any]:
  """Scores every method on test images of a run's selected model; writes the leaderboard files.

  `shuffled_labels_checkpoint`: a run of the same config trained with
  `config.dataset.shuffle_labels=True` (Adebayo et al.'s data-randomisation test); every method
  then also explains the same images with that model, with the same keys, and the Spearman
  correlations of the two maps per image are the 'data_spearman(_abs)' columns.

  Returns what a report needs: `leaderboard` (method -> metric -> mean/low/high/count),
  `metrics`, `seconds_per_image`, `methods` (timings and skip reasons), `sanity` (per-layer mean
  Spearman), `marker_share` (per method, mean), the written `files`, the image `indices` and
  `timing` (wall and compile seconds, also in `<workdir>/timings.json`). The leaderboard means
  are also TensorBoard scalars 'leaderboard/<metric>/<method>' in `<workdir>/tensorboard/`
  (process 0). A progress line with rate and ETA follows the methods as they are scored.
  """
  start = time.perf_counter()
  workdir = loop.prepare_workdir(workdir)
  model, variables = loop.restore_selected_model(config, checkpoint_dir)
  _, _, preprocess = loop.build_components(config)
  keys = dataset_mask_keys(config.dataset.name)
  wanted = [k for key in keys if key is not None for k in (key, f"has_{key}")]
  examples = explain.load_split(config, config.dataset.test_split,
                                ("image", "label", *wanted, "index"))
  chosen = explain.choose_indices(examples["label"], num_images, label, indices, seed=seed)
  images = jax.jit(preprocess)(jnp.asarray(examples["image"][chosen]))
  targets = jnp.asarray(examples["label"][chosen], jnp.int32)
  shape = images.shape[:3]
  masks, problems = scoring_masks(config.dataset.name, examples, chosen, shape)
  lesion, marker = masks.localisation, masks.marker

  key = jax.random.key(seed)
  methods_key, random_key, sanity_key = jax.random.split(key, 3)
  methods = list(methods or registry.REGISTRY)
  maps, info = explain.run_methods(model, variables, images, targets, methods, methods_key,
                                   options)
  maps_by_method = {name: np.asarray(faithfulness.as_maps(value)) for name, value in maps.items()}
  maps_by_method[RANDOM] = np.asarray(faithfulness.random_maps(random_key, shape))

  margin = pointing_margin(score_options, max(shape[1:]))
  scorer = make_scorer(model, score_options, margin)
  per_image: dict[str, dict[str, np.ndarray]] = {}
  curves: dict[str, dict[str, np.ndarray]] = {}
  road_key = jax.random.fold_in(random_key, 1)
  for name, value in progress.track(maps_by_method.items(), desc="evaluate_explanations: scoring",
                                    unit="methods"):
    scores, curve = jax.device_get(scorer(variables, images, targets, jnp.asarray(value),
                                          lesion, marker, road_key))
    per_image[name] = {k: np.asarray(v) for k, v in scores.items()}
    curves[name] = {k: np.asarray(v) for k, v in curve.items()}

  data_test = None
  if shuffled_labels_checkpoint:
    data_test = data_randomisation(config, shuffled_labels_checkpoint, images, targets, maps,
                                   methods_key, options)
    for name, scores in data_test["per_image"].items():
      per_image[name].update(scores)

  sanity = {}
  sanity_names = [m for m in score_options.sanity_methods if m in maps]
  for index, name in enumerate(progress.track(
      sanity_names, desc="evaluate_explanations: parameter randomisation", unit="methods")):
    sanity[name] = sanity_scores(model, variables, images, targets, name,
                                 jax.random.fold_in(sanity_key, index), options,
                                 how=score_options.sanity_how)
    cascade = sanity[name]["cascading"]
    per_image[name]["cascade_spearman"] = cascade["spearman"][-1]
    per_image[name]["cascade_spearman_abs"] = cascade["spearman_abs"][-1]

  sensitivity_methods = [m for m in check_sensitivity_methods(score_options.sensitivity_methods)
                         if m in maps]
  for index, name in enumerate(sensitivity_methods):
    per_image[name]["max_sensitivity"] = sensitivity_scores(
        model, variables, images, targets, jnp.asarray(maps_by_method[name]), name,
        jax.random.fold_in(random_key, 2 + index), options, score_options)

  for scores in per_image.values():  # last, so the other metrics keep their bootstrap seeds
    move_to_end(scores, CHEXLOCALIZE_METRICS)
    move_to_end(scores, QUANTUS_METRICS)
  present = {k for scores in per_image.values() for k in scores}
  metrics = [m for m in metric_order(score_options.top_percents) if m in present]
  not_scored = not_scored_metrics(problems, score_options.top_percents, list(sanity),
                                  data_test is not None)
  not_scored.update(optional_not_scored(score_options))
  leaderboard = {name: faithfulness.summarise(scores, seed=seed,
                                              num_resamples=score_options.num_resamples)
                 for name, scores in per_image.items()}
  seconds = {name: info.get(name, {}).get("seconds_per_image") for name in leaderboard}
  csv_path, md_path = write_leaderboard(leaderboard, metrics, seconds, workdir,
                                        not_scored=not_scored)
  shown = gallery_rows_shown(lesion, len(chosen), gallery_rows)
  gallery = figures.plot_attribution_grid(
      examples["image"][chosen][shown], {n: m[shown] for n, m in maps_by_method.items()
                                         if n != RANDOM},
      os.path.join(workdir, "gallery.png"),
      masks=None if lesion is None else np.asarray(lesion)[shown],
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
      "num_images": len(chosen), "metrics": metrics, "not_scored": not_scored,
      "masks": {"localisation": masks.localisation_key, "marker": masks.marker_key,
                "localisation_coverage": mask_coverage(masks.localisation_key, lesion, chosen),
                "marker_coverage": mask_coverage(masks.marker_key, marker, chosen)},
      "leaderboard": {name: {m: interval._asdict() for m, interval in intervals.items()}
                      for name, intervals in leaderboard.items()},
      "seconds_per_image": seconds, "methods": info,
      "marker_share": {name: leaderboard[name]["marker_share"].mean for name in leaderboard
                       if "marker_share" in leaderboard[name]},
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
      "options": dict(options or {}),
      "score_options": {**dataclasses.asdict(score_options), "margin": margin},
      "files": {k: os.path.abspath(v) for k, v in files.items()},
  }
  with summaries.create_writer(workdir) as writer:
    writer.scalars(0, leaderboard_scalars(leaderboard))
  compiled = [i["compile_seconds"] for i in info.values()
              if isinstance(i, Mapping) and isinstance(i.get("compile_seconds"), (int, float))]
  summary["timing"] = {"wall_seconds": time.perf_counter() - start,
                       "compile_seconds": sum(compiled) if compiled else None}
  timing.record_phase(workdir, "evaluate_explanations", **summary["timing"])
  metrics_lib.write_json(os.path.join(workdir, "evaluation.json"), summary)
  return summary


def leaderboard_scalars(leaderboard: Mapping[str, Mapping[str, faithfulness.Interval]]
                        ) -> dict[str, float]:
  """'leaderboard/<metric>/<method>' -> the method's mean of the metric (TensorBoard scalars;
  NaN where no image was scored)."""
  return {f"leaderboard/{metric}/{method}": float(interval.mean)
          for method, intervals in leaderboard.items() for metric, interval in intervals.items()}


def data_randomisation(config: ml_collections.ConfigDict, shuffled_labels_checkpoint: str,
                       images: jax.Array, targets: jax.Array, maps: Mapping[str, jax.Array],
                       key: jax.Array, options: explain.Overrides | None = None
                       ) -> dict[str, Any]:
  """Spearman [B] per method between `maps` and the shuffled-label model's maps of `images`."""
  metrics_path = os.path.join(shuffled_labels_checkpoint, "metrics.json")
  shuffled_config = (runs.read_run_config(shuffled_labels_checkpoint)
                     if os.path.exists(runs.config_path(shuffled_labels_checkpoint)) else None)
  if shuffled_config is None or not shuffled_config.dataset.get("shuffle_labels", False):
    raise ValueError(f"{shuffled_labels_checkpoint} was not trained with "
                     "config.dataset.shuffle_labels=True (see its config.json); the data-"
                     "randomisation test needs a model fit to shuffled training labels.")
  model, variables = loop.restore_selected_model(shuffled_config, shuffled_labels_checkpoint)
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
  masks = summary.get("masks", {"localisation": "lesion_mask", "marker": "marker_mask"})
  mask_name = masks.get("localisation") or "localisation mask"
  paragraphs = [
      f"Every method explains {summary['num_images']} test images for their label; each cell is "
      "the mean over images with a 95% percentile-bootstrap interval (arrows: the better "
      "direction). 'random' is a uniform random map, the contrast every score should beat.",
  ]
  if "pointing_game" in metrics:
    coverage = masks.get("localisation_coverage") or {}
    covered = ("" if coverage.get("num_with_mask", 0) == coverage.get("num_images", 0) else
               f" Only {coverage['num_with_mask']} of the {coverage['num_images']} images have a "
               f"non-empty {mask_name}; the others get no localisation score (not 0).")
    binarised = ("Otsu's threshold" if options.get("binarisation", "otsu") == "otsu" else
                 f"the threshold {options.get('binarisation_threshold')}")
    paragraphs.append(
        f"Localisation against the {mask_name}: pointing game (maximum inside the mask, "
        f"tolerance {options['margin']} px), energy (share of positive attribution inside it), "
        "IoU and precision of the top-k% pixels, and rank accuracy (precision of the top-|mask| "
        "pixels). CheXlocalize's scores (Saporta et al. 2022): miou, the IoU of the map "
        f"normalised to [0, 1] and binarised by {binarised} with the mask (images whose "
        "segmentation is empty left out, as theirs), and hit_rate, the map's maximal pixel "
        f"inside the mask (no tolerance).{covered}")
  quantus_parts = []
  if "road_morf_auc" in metrics:
    quantus_parts.append(
        "road_morf_auc / road_lerf_auc: ROAD (Rong et al. 2022), the prediction's accuracy "
        f"after removing {', '.join(f'{p:g}' for p in options['road_percentages'])}% of the "
        "pixels (most / least relevant first) by noisy linear imputation, AUC over the removed "
        "fraction (MoRF: lower is better; LeRF: higher)")
  if "sparseness" in metrics:
    quantus_parts.append("sparseness: Gini index of |map| (higher: sparser); complexity: entropy "
                         "of |map| / sum |map| (lower: simpler)")
  if "relevance_mass" in metrics:
    quantus_parts.append(f"relevance_mass: share of the signed map's sum inside the {mask_name}")
  if "max_sensitivity" in metrics:
    quantus_parts.append(
        "max_sensitivity: the largest relative change ||M(x + u) - M(x)|| / ||M(x)|| over "
        f"{options['sensitivity_samples']} draws u ~ U(-{options['sensitivity_radius']:g}, "
        f"{options['sensitivity_radius']:g}) (lower is better)")
  if quantus_parts:
    paragraphs.append("Quantus's metrics (Hedström et al. 2023, computed in JAX): "
                      + "; ".join(quantus_parts) + ".")
  paragraphs.append(
      "Faithfulness: deletion / insertion AUC of the target probability over "
      f"{options['curve_steps']} steps of {options['patch_size']}x{options['patch_size']} "
      f"patches replaced by {replaced_by} (deletion: lower is better; insertion: higher)."
      + (" marker_share: share of "
         f"{options['marker_attribution']} attribution on the L/R marker (its glyph grown by "
         f"{options['margin']} px), the shortcut (lower is better; 'random' gives the region's "
         "area share)." if "marker_share" in metrics else "")
      + (" cascade_spearman(_abs): rank correlation of the maps with those of the model whose "
         "every layer was re-initialised (Adebayo et al. 2018; close to 0 passes)."
         if "cascade_spearman" in metrics else ""))
  not_scored = summary.get("not_scored") or {}
  if not_scored:
    paragraphs.append("Not scored: " + "; ".join(not_scored_lines(not_scored)) + ".")
  data_test = summary.get("data_randomisation")
  if data_test:
    accuracy = data_test.get("test_accuracy_shuffled_model")
    paragraphs.append(
        "data_spearman(_abs): rank correlation of each map with the same method's map from a "
        "model trained on a permutation of the training labels (Adebayo et al.'s data-"
        "randomisation test; close to 0 passes: the explanation depends on what the model "
        "learned from the labels)"
        + ("." if accuracy is None else f"; that model's test accuracy is {accuracy:.3f}."))
  outlined = (f"the {mask_name} outlined in red" if "pointing_game" in metrics else
              "no mask to outline")
  figures_ = [report.Figure(os.path.relpath(summary["files"]["gallery"], report_dir),
                            f"Input with {outlined}, then each method's |map|."),
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
    cli.define_config_file(
        "config", None, "Optional: a training config to use instead of the run's config.json "
        "(the differences are printed).")
  define("string", "checkpoint", None, "Training run directory to evaluate.")
  define("string", "workdir", None, "Output directory (default: <checkpoint>/evaluation).")
  define("list", "methods", None, "Methods (default: all of attribution.registry).")
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
  if "binarisation" not in defined:
    flags.DEFINE_enum("binarisation", "otsu", list(faithfulness.BINARISATIONS),
                      "CheXlocalize mIoU: how a map becomes a segmentation (Otsu, or "
                      "--binarisation_threshold on the min-max normalised map).")
  define("float", "binarisation_threshold", 0.5, "Threshold of --binarisation=fixed, in [0, 1).")
  if "hit_ties" not in defined:
    flags.DEFINE_enum("hit_ties", "first", list(faithfulness.HIT_TIES),
                      "CheXlocalize hit rate with tied maxima: the first in raster order, or the "
                      "share of tied maxima inside the mask.")
  define("list", "road_percentages", ["10", "30", "50", "70", "90"],
         "ROAD: percentages of pixels removed (Quantus: 1,3,...,99; '' turns ROAD off).")
  define("list", "sensitivity_methods", [],
         "Methods given max-sensitivity (each re-explained --sensitivity_samples times).")
  define("integer", "sensitivity_samples", 10, "Max-sensitivity: perturbations per image.")
  flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  value = lambda name: flags.FLAGS[name].value  # noqa: E731
  options = {"num_steps": value("steps"), "num_samples": value("samples")}
  margin = value("margin")
  score_options = ScoreOptions(margin=None if margin < 0 else margin,
                               curve_steps=value("curve_steps"),
                               patch_size=value("patch_size"), replacement=value("replacement"),
                               sanity_methods=tuple(m for m in value("sanity_methods") if m),
                               binarisation=value("binarisation"),
                               binarisation_threshold=value("binarisation_threshold"),
                               hit_ties=value("hit_ties"),
                               road_percentages=tuple(float(p) for p in
                                                      value("road_percentages") if p),
                               sensitivity_methods=tuple(m for m in
                                                         value("sensitivity_methods") if m),
                               sensitivity_samples=value("sensitivity_samples"))
  config = runs.resolve_config(value("checkpoint"), value("config"))
  workdir = value("workdir") or os.path.join(value("checkpoint"), "evaluation")
  summary = evaluate_run(config, value("checkpoint"), workdir,
                         methods=value("methods"), num_images=value("num_images"),
                         label=value("label"), indices=value("indices"), options=options,
                         score_options=score_options, gallery_rows=value("gallery_rows"),
                         seed=value("seed"),
                         shuffled_labels_checkpoint=value("shuffled_labels_checkpoint"))
  timing.record_phase(value("checkpoint"), "evaluate_explanations", **summary["timing"])
  report_path = run_report.add_section(value("checkpoint"), "evaluation",
                                       leaderboard_section(summary, value("checkpoint")))
  with open(summary["files"]["leaderboard_md"]) as file:
    print(file.read())
  print(f"Scores in {workdir}; report: {report_path}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
