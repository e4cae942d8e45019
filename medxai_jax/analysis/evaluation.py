"""Scores every explanation method of a trained model on a dataset: the leaderboard.

`evaluate_run` explains test images of a run's selected model with every method of
`medxai_jax.attribution.registry` (plus a uniform random map, the contrast), scores each image
(`faithfulness`, `explanation_metrics`: localisation against the dataset's declared mask,
deletion / insertion, ROAD, complexity, max-sensitivity, marker share, cascading and data
randomisation) and writes `leaderboard.csv` / `.md`, `gallery.png`, `curves.png`,
`sanity.png` / `.csv`, `scores.npz` and `evaluation.json`. The command line is
`experiments/evaluate_explanations.py`; the report section is `medxai_jax.viz.evaluation_report`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax import explain
from medxai_jax import runs
from medxai_jax.analysis import explanation_metrics
from medxai_jax.analysis import faithfulness
from medxai_jax.attribution import registry
from medxai_jax.models import base
from medxai_jax.observe import progress
from medxai_jax.observe import summaries
from medxai_jax.observe import timing
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import workdir as workdir_lib
from medxai_jax.viz import evaluation_figures
from medxai_jax.viz import figures


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
  # A whole split (num_images=None): the model-level checks (parameter and data randomisation)
  # and max-sensitivity run on a class-balanced sample of this many images, as Adebayo et al.
  sample_images: int = 32


def fit_masks(masks: np.ndarray, shape: Sequence[int], name: str = "masks") -> jax.Array:
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
      fitted = np.asarray(fit_masks(examples[key][chosen], shape, key))
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


def image_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """One key per image, `fold_in(key, split index)`: an image's random draws do not depend on
  the batch it is scored in (one batch or a stream of shards)."""
  return jax.vmap(lambda index: jax.random.fold_in(key, index))(jnp.asarray(indices, jnp.int32))


def random_image_maps(key: jax.Array, indices: Sequence[int], shape: Sequence[int]
                      ) -> jax.Array:
  """The random contrast's maps [B, H, W] of the split images `indices` (`image_keys`)."""
  return jax.vmap(lambda k: faithfulness.random_maps(k, (1, *shape[1:3]))[0])(
      image_keys(key, np.asarray(indices)))


def make_scorer(model: base.Classifier, options: ScoreOptions, margin: int):
  """Jitted (variables, images, targets, maps [B,H,W], lesion, marker, key, indices) -> per-image
  scores and curves.

  `lesion` (the localisation masks) or `marker` may be None: those scores are left out. `key`
  draws ROAD's imputation noise, image by image from `image_keys(key, indices)` (`indices`: the
  images' split indices, default 0..B-1), so an image's scores do not depend on its batch.
  """

  def road_scores(variables, images, targets, maps, keys):
    def one(image, target, saliency, image_key):
      return {f"road_{order}_auc": explanation_metrics.road(
          model.logits_fn(variables), image[None], target[None], saliency[None], key=order_key,
          order=order, percentages=options.road_percentages, noise=options.road_noise,
          chunk_size=options.chunk_size).auc[0]
              for order, order_key in zip(explanation_metrics.ROAD_ORDERS,
                                          jax.random.split(image_key))}
    return jax.vmap(one)(images, targets, maps, keys)

  def score(variables, images, targets, maps, lesion, marker, key, indices=None):
    indices = jnp.arange(images.shape[0]) if indices is None else indices
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
      scores.update(road_scores(variables, images, jnp.asarray(targets, jnp.int32), maps,
                                image_keys(key, indices)))
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
  layers = faithfulness.parameter_layers(model)
  similarities = jax.jit(lambda v, schedule: faithfulness.randomisation_similarities(
      model, v, explain_fn, weights_key, schedule, layers, how=how))  # one compile, both modes
  for mode in faithfulness.RANDOMISATION_MODES:
    labels, schedule = faithfulness.randomisation_schedule(layers, mode)
    scores = similarities(variables, schedule)
    result[mode] = {"layers": list(labels), "spearman": np.asarray(scores["spearman"]),
                    "spearman_abs": np.asarray(scores["spearman_abs"])}
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


def write_sanity_csv(sanity: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """One row per method, mode and step: mean Spearman (signed and |.|) over images."""
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["method", "mode", "step", "layer", "spearman", "spearman_abs"])
    for method, result in sanity.items():
      for mode, values in result.items():
        for step, layer in enumerate(values["layers"]):
          writer.writerow([method, mode, step, layer,
                           f"{faithfulness.defined_mean(values['spearman'][step]):.6g}",
                           f"{faithfulness.defined_mean(values['spearman_abs'][step]):.6g}"])
  return path


def evaluate_run(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str, *,
                 methods: Sequence[str] | None = None, num_images: int | None = 16,
                 label: int = 1, indices: Sequence[int] = (),
                 options: explain.Overrides | None = None,
                 score_options: ScoreOptions = ScoreOptions(),
                 gallery_rows: int = 6, seed: int = 0,
                 shuffled_labels_checkpoint: str | None = None,
                 split: str | None = None, batch_size: int = 32,
                 model: str = runs.SELECTED) -> dict[str, Any]:
  """Scores every method on images of a run's selected model; writes the leaderboard files.

  The images are `explain.choose_indices(labels, num_images, label, indices, seed)` of `split`
  (default: the test split), scored in one batch. With `num_images=None` every image of the
  split (no label filter) is scored streaming, `batch_size` images at a time over every device
  and process, maps and per-image scores written into resumable stores in `workdir`
  (`evaluation_stream.evaluate_split`); the sanity checks then run on a class-balanced sample.

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
  `model='best_so_far'`: an unfinished run's best epoch so far (`runs.restore_model`; the
  summary's `model` records which and its epoch).
  """
  if num_images is None:
    from medxai_jax.analysis import evaluation_stream  # it imports this module

    return evaluation_stream.evaluate_split(
        config, checkpoint_dir, workdir, methods=methods, options=options,
        score_options=score_options, gallery_rows=gallery_rows, seed=seed,
        shuffled_labels_checkpoint=shuffled_labels_checkpoint, split=split,
        batch_size=batch_size, model=model)
  start = time.perf_counter()
  workdir = workdir_lib.prepare_workdir(workdir)
  selected = runs.restore_model(config, checkpoint_dir, model)
  which, model = model, selected.model
  variables, preprocess = selected.variables, selected.preprocess
  keys = dataset_mask_keys(config.dataset.name)
  wanted = [k for key in keys if key is not None for k in (key, f"has_{key}")]
  split = split or config.dataset.test_split
  examples = explain.load_split(config, split, ("image", "label", *wanted, "index"))
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
  maps_by_method[RANDOM] = np.asarray(random_image_maps(random_key, chosen, shape))

  margin = pointing_margin(score_options, max(shape[1:]))
  scorer = make_scorer(model, score_options, margin)
  per_image: dict[str, dict[str, np.ndarray]] = {}
  curves: dict[str, dict[str, np.ndarray]] = {}
  road_key = jax.random.fold_in(random_key, 1)
  for name, value in progress.track(maps_by_method.items(), desc="evaluate_explanations: scoring",
                                    unit="methods"):
    scores, curve = jax.device_get(scorer(variables, images, targets, jnp.asarray(value),
                                          lesion, marker, road_key,
                                          jnp.asarray(chosen, jnp.int32)))
    per_image[name] = {k: np.asarray(v) for k, v in scores.items()}
    curves[name] = {k: np.asarray(v) for k, v in curve.items()}

  data_test = None
  if shuffled_labels_checkpoint:
    data_test = data_randomisation(config, shuffled_labels_checkpoint, images, targets, maps,
                                   methods_key, options)
    for name, scores in data_test["per_image"].items():
      per_image[name].update(scores)
  sanity = run_sanity_checks(model, variables, images, targets, maps, per_image, sanity_key,
                             options, score_options)

  sensitivity_methods = [m for m in check_sensitivity_methods(score_options.sensitivity_methods)
                         if m in maps]
  for index, name in enumerate(sensitivity_methods):
    per_image[name]["max_sensitivity"] = sensitivity_scores(
        model, variables, images, targets, jnp.asarray(maps_by_method[name]), name,
        jax.random.fold_in(random_key, 2 + index), options, score_options)

  shown = gallery_rows_shown(lesion, len(chosen), gallery_rows)
  gallery = (examples["image"][chosen][shown],
             {n: m[shown] for n, m in maps_by_method.items() if n != RANDOM},
             None if lesion is None else np.asarray(lesion)[shown], chosen[shown])
  fields = {
      "checkpoint": os.path.abspath(checkpoint_dir), "split": split,
      "model": {"which": which, "epoch": selected.epoch},
      "indices": chosen.tolist(), "targets": np.asarray(targets).tolist(),
      "num_images": len(chosen),
      "masks": {"localisation": masks.localisation_key, "marker": masks.marker_key,
                "localisation_coverage": mask_coverage(masks.localisation_key, lesion, chosen),
                "marker_coverage": mask_coverage(masks.marker_key, marker, chosen)}}
  return write_results(workdir, fields, per_image=per_image, curves=curves, sanity=sanity,
                       data_test=data_test, info=info, problems=problems,
                       score_options=score_options, margin=margin, seed=seed, options=options,
                       gallery=gallery, shuffled_labels_checkpoint=shuffled_labels_checkpoint,
                       start=start)


def run_sanity_checks(model: base.Classifier, variables: base.Variables, images: jax.Array,
                      targets: jax.Array, maps: Mapping[str, Any],
                      per_image: dict[str, dict[str, np.ndarray]], key: jax.Array,
                      options: explain.Overrides | None, score_options: ScoreOptions
                      ) -> dict[str, Any]:
  """`sanity_scores` of each of `score_options.sanity_methods` among `maps`' methods (method i
  with `fold_in(key, i)`); their last cascading step is added to `per_image` as the
  'cascade_spearman(_abs)' scores of `images`."""
  sanity = {}
  sanity_names = [m for m in score_options.sanity_methods if m in maps]
  for index, name in enumerate(progress.track(
      sanity_names, desc="evaluate_explanations: parameter randomisation", unit="methods")):
    sanity[name] = sanity_scores(model, variables, images, targets, name,
                                 jax.random.fold_in(key, index), options,
                                 how=score_options.sanity_how)
    cascade = sanity[name]["cascading"]
    per_image[name]["cascade_spearman"] = cascade["spearman"][-1]
    per_image[name]["cascade_spearman_abs"] = cascade["spearman_abs"][-1]
  return sanity


def write_results(workdir: str, fields: Mapping[str, Any], *,
                  per_image: dict[str, dict[str, np.ndarray]],
                  curves: Mapping[str, Mapping[str, np.ndarray]], sanity: Mapping[str, Any],
                  data_test: Mapping[str, Any] | None, info: Mapping[str, Any],
                  problems: Mapping[str, str], score_options: ScoreOptions, margin: int,
                  seed: int, options: explain.Overrides | None,
                  gallery: tuple[np.ndarray, Mapping[str, np.ndarray], np.ndarray | None,
                                 np.ndarray],
                  shuffled_labels_checkpoint: str | None, start: float) -> dict[str, Any]:
  """The leaderboard (bootstrap over `per_image`), its files and evaluation.json.

  `per_image`: method -> score -> [N] (the data-randomisation scores of `data_test` included);
  `curves`: method -> fractions / deletion / insertion ([N or 1, S + 1], averaged over rows);
  `gallery`: images, maps per method, masks (or None) and the split indices shown; `fields`:
  the summary's entries about the images. Returns the summary (as `evaluate_run`).
  """
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
  gallery_images, gallery_maps, gallery_masks, shown = gallery
  files = {"leaderboard_csv": csv_path, "leaderboard_md": md_path,
           "gallery": figures.plot_attribution_grid(
               gallery_images, gallery_maps, os.path.join(workdir, "gallery.png"),
               masks=gallery_masks, titles=[f"#{i}" for i in shown]),
           "curves": evaluation_figures.plot_curves(curves, os.path.join(workdir, "curves.png"),
                                                    contrast=RANDOM)}
  if sanity:
    files["sanity"] = evaluation_figures.plot_sanity(sanity, os.path.join(workdir, "sanity.png"))
    files["sanity_csv"] = write_sanity_csv(sanity, os.path.join(workdir, "sanity.csv"))
  np.savez(os.path.join(workdir, "scores.npz"),
           **{f"{method}/{metric}": values for method, scores in per_image.items()
              for metric, values in scores.items()})

  summary = {
      **fields, "gallery_indices": np.asarray(shown).tolist(), "metrics": metrics,
      "not_scored": not_scored,
      "leaderboard": {name: {m: interval._asdict() for m, interval in intervals.items()}
                      for name, intervals in leaderboard.items()},
      "seconds_per_image": seconds, "methods": dict(info),
      "marker_share": {name: leaderboard[name]["marker_share"].mean for name in leaderboard
                       if "marker_share" in leaderboard[name]},
      "sanity": {name: {mode: {"layers": values["layers"],
                               **{key: faithfulness.defined_mean(values[key], axis=1).tolist()
                                  for key in ("spearman", "spearman_abs")}}
                        for mode, values in result.items()}
                 for name, result in sanity.items()},
      "data_randomisation": None if data_test is None else {
          "checkpoint": os.path.abspath(shuffled_labels_checkpoint),
          "test_accuracy_shuffled_model": data_test["test_accuracy"],
          "mean": {name: {k: float(faithfulness.defined_mean(v)) for k, v in scores.items()}
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
  NaN where no image was scored). TensorBoard tags cannot hold '%': iou_top5% is iou_top5pct."""
  return {f"leaderboard/{metric.replace('%', 'pct')}/{method}": float(interval.mean)
          for method, intervals in leaderboard.items() for metric, interval in intervals.items()}


def data_randomisation(config: ml_collections.ConfigDict, shuffled_labels_checkpoint: str,
                       images: jax.Array, targets: jax.Array, maps: Mapping[str, jax.Array],
                       key: jax.Array, options: explain.Overrides | None = None
                       ) -> dict[str, Any]:
  """Spearman [B] per method between `maps` and the shuffled-label model's maps of `images`."""
  metrics_path = os.path.join(shuffled_labels_checkpoint, "metrics.json")
  shuffled_config = (runs.read_run_config(shuffled_labels_checkpoint)
                     if os.path.exists(runs.config_path(shuffled_labels_checkpoint)) else None)
  if shuffled_config is None or not shuffled_config.dataset.shuffle_labels:
    raise ValueError(f"{shuffled_labels_checkpoint} was not trained with "
                     "config.dataset.shuffle_labels=True (see its config.json); the data-"
                     "randomisation test needs a model fit to shuffled training labels.")
  shuffled = runs.restore_selected_model(shuffled_config, shuffled_labels_checkpoint)
  model, variables = shuffled.model, shuffled.variables
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
