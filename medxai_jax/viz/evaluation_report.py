"""The run report's section on the explanation leaderboard (`analysis.evaluation`'s summary)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from medxai_jax.analysis import evaluation
from medxai_jax.analysis import faithfulness
from medxai_jax.observe import timing
from medxai_jax.viz import report
from medxai_jax.viz import run_report


def leaderboard_section(summary: Mapping[str, Any], report_dir: str,
                        title: str = "Scoring the explanations") -> report.Section:
  """A report section: how the scores are defined, the leaderboard table and the figures."""
  metrics = summary["metrics"]
  leaderboard = {name: {m: faithfulness.Interval(**values) for m, values in intervals.items()}
                 for name, intervals in summary["leaderboard"].items()}
  header, rows = evaluation.leaderboard_rows(leaderboard, metrics, summary["seconds_per_image"])
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
  sample = summary.get("sample")
  if sample:  # a whole split, streamed: the model-level checks on a sample
    paragraphs.append(sample["note"])
  not_scored = summary.get("not_scored") or {}
  if not_scored:
    paragraphs.append("Not scored: " + "; ".join(evaluation.not_scored_lines(not_scored)) + ".")
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
  shown = summary.get("gallery_indices")
  figures_ = [report.Figure(os.path.relpath(summary["files"]["gallery"], report_dir),
                            f"Input with {outlined}, then each method's |map|"
                            + (f" (split indices {shown})." if shown else ".")),
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


def evaluate_and_report(config: ml_collections.ConfigDict, checkpoint_dir: str, workdir: str,
                        **kwargs: Any) -> tuple[dict[str, Any], str | None]:
  """`evaluation.evaluate_run` (same keyword arguments), then the run's report and timings.

  The run's `timings.json` gets the 'evaluate_explanations' phase and its `report.html` the
  'evaluation' section (`leaderboard_section`). Returns the summary and the report's path
  (None on the processes but 0 of a multi-host run, which write no report).
  """
  summary = evaluation.evaluate_run(config, checkpoint_dir, workdir, **kwargs)
  if "leaderboard" not in summary:  # not process 0 of a multi-host streamed run
    return summary, None
  timing.record_phase(checkpoint_dir, "evaluate_explanations", **summary["timing"])
  report_path = run_report.add_section(checkpoint_dir, "evaluation",
                                       leaderboard_section(summary, checkpoint_dir))
  return summary, report_path
