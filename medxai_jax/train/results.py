"""A finished run's test results: metrics with the undefined ones set to None (and warned about),
MURA's study-level and per-body-part metrics, and `predictions_test.npz`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from medxai_jax.train import metrics as metrics_lib


def defined_metrics(summary: Mapping[str, Any], where: str,
                    warned: set[tuple[str, str]] | None = None) -> dict[str, Any]:
  """`summary` (metrics_lib's) with its undefined metrics set to None, each one warned about
  (`where`, e.g. 'the test split', names the data in the warning)."""
  result = dict(summary)
  for metric, reason in metrics_lib.undefined_metrics(
      np.asarray(summary["confusion_matrix"])).items():
    result[metric] = None
    if warned is None or (where, metric) not in warned:
      logging.warning("%s is undefined on %s (%d examples): %s; it is reported as null.",
                      metric, where, summary["num_examples"], reason)
      if warned is not None:
        warned.add((where, metric))
  return result


# Record features copied into predictions_test.npz and grouped by in metrics.json, when present.
RECORD_FEATURES = ("study_id", "body_part", "patient_id", "path")


def text_column(values: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
  """A feature column as str [N]: bytes decoded, class indices named by `names`."""
  def text(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) or (
        isinstance(value, np.ndarray) and value.ndim == 0) else value
    if isinstance(value, bytes):
      return value.decode()
    if names is not None and isinstance(value, (int, np.integer)):
      return names[int(value)]
    return str(value)
  return np.asarray([text(value) for value in np.asarray(values, dtype=object)], dtype=str)


def study_level_metrics(labels: np.ndarray, probabilities: np.ndarray, study_ids: np.ndarray,
                        where: str, warned: set[tuple[str, str]] | None = None
                        ) -> dict[str, Any]:
  """MURA's study-level metrics: each study's probabilities are the mean of its images'
  (Rajpurkar et al.; `mura.study_scores`), thresholded as one image's would be."""
  from medxai_jax.data.builders import mura  # imports tensorflow_datasets

  _, means, study_labels = mura.study_scores(probabilities, study_ids, labels)
  return defined_metrics(metrics_lib.probability_metrics(study_labels, means),
                         f"{where}, per study", warned)


def grouped_metrics(labels: np.ndarray, logits: np.ndarray, features: Mapping[str, np.ndarray],
                    split: str, warned: set[tuple[str, str]] | None = None) -> dict[str, Any]:
  """'<split>_by_study' (when records carry study_id) and '<split>_by_body_part' (body_part:
  name -> {'image': metrics, 'study': metrics}) as 000 and the MURA paper report them."""
  result: dict[str, Any] = {}
  probabilities = metrics_lib.probabilities_from_logits(logits)
  studies = features.get("study_id")
  if studies is not None:
    result[f"{split}_by_study"] = study_level_metrics(labels, probabilities, studies,
                                                      f"the {split} split", warned)
  parts = features.get("body_part")
  if parts is not None:
    by_part = {}
    for part in sorted(set(parts.tolist())):
      rows = parts == part
      where = f"the {split} split's {part} images"
      entry = {"image": defined_metrics(
          metrics_lib.classification_metrics(labels[rows], logits[rows]), where, warned)}
      if studies is not None:
        entry["study"] = study_level_metrics(labels[rows], probabilities[rows], studies[rows],
                                             where, warned)
      by_part[part] = entry
    result[f"{split}_by_body_part"] = by_part
  return result


def write_predictions(path: str, labels: np.ndarray, logits: np.ndarray,
                      features: Mapping[str, np.ndarray]) -> str:
  """predictions_test.npz: labels int64 [N], logits float32 [N, K'], probabilities float32
  [N, K] and the record features as str [N]."""
  logits = np.asarray(logits, np.float32)
  logits = logits.reshape(len(logits), -1)
  np.savez(path, labels=np.asarray(labels, np.int64), logits=logits,
           probabilities=metrics_lib.probabilities_from_logits(logits).astype(np.float32),
           **{key: np.asarray(value, dtype=str) for key, value in features.items()})
  return path
