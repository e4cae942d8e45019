"""Classification metrics for binary and multi-class problems (numpy, host side).

Conventions shared by every function here:

* Labels and predictions are integer class indices in ``[0, K)``; a confusion matrix has
  true classes on the rows and predicted classes on the columns.
* Zero division gives 0.0: a precision, recall, F1, sensitivity or specificity whose
  denominator is zero is reported as 0.0, and Cohen's kappa and the MCC are 0.0 when
  undefined (e.g. every example, true and predicted, in one class).
* ROC AUC is NaN when it is undefined, i.e. when the labels hold only one class.

`undefined_metrics` says which summary metrics of a confusion matrix are undefined and why, and
`json_safe` / `write_json` turn NaN and infinities into null (what the binaries write is
strict JSON).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal, Mapping

import numpy as np

Average = Literal["binary", "macro", "weighted"]
KappaWeights = Literal["linear", "quadratic"] | None

_AVERAGES = ("binary", "macro", "weighted")
_KAPPA_WEIGHTS = (None, "linear", "quadratic")


# --- validation


def _as_class_indices(values: np.ndarray, name: str) -> np.ndarray:
  """Return `values` as a 1-D int64 array of class indices, or raise ValueError."""
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N]; got shape {array.shape}.")
  if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
    return array.astype(np.int64)
  if np.issubdtype(array.dtype, np.floating):
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
      raise ValueError(f"{name} must hold integer class indices; got non-integer values.")
    return array.astype(np.int64)
  raise ValueError(f"{name} must hold integer class indices; got dtype {array.dtype}.")


def _check_class_range(indices: np.ndarray, name: str, num_classes: int) -> None:
  """Raise ValueError if any index lies outside [0, num_classes)."""
  out_of_range = indices[(indices < 0) | (indices >= num_classes)]
  if out_of_range.size:
    examples = np.unique(out_of_range)[:5].tolist()
    raise ValueError(
      f"{name} must lie in [0, {num_classes}); "
      f"found {out_of_range.size} outside it, e.g. {examples}."
    )


def _check_same_length(
  first: np.ndarray, first_name: str, second: np.ndarray, second_name: str
) -> None:
  """Raise ValueError if the two arrays disagree on the number of examples N."""
  if first.shape[:1] != second.shape[:1]:
    raise ValueError(
      f"{first_name} and {second_name} must have the same number of examples N; "
      f"got {first_name} shape {first.shape} and {second_name} shape {second.shape}."
    )


def _as_confusion(confusion: np.ndarray) -> np.ndarray:
  """Return `confusion` as a float64 [K,K] array, or raise ValueError."""
  matrix = np.asarray(confusion, dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
    raise ValueError(
      f"confusion must be a square [K,K] matrix with K >= 1; got shape {matrix.shape}."
    )
  if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
    raise ValueError("confusion must hold finite, non-negative counts.")
  return matrix


def _as_binary_labels_and_scores(
  labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Return validated 0/1 labels and float scores, both [N]."""
  label_indices = _as_class_indices(labels, "labels")
  _check_class_range(label_indices, "labels", 2)
  score_values = np.asarray(scores, dtype=np.float64)
  if score_values.ndim != 1:
    raise ValueError(f"scores must be 1-D [N]; got shape {score_values.shape}.")
  _check_same_length(label_indices, "labels", score_values, "scores")
  num_nan = int(np.count_nonzero(np.isnan(score_values)))
  if num_nan:
    raise ValueError(f"scores must not contain NaN; found {num_nan} NaN value(s).")
  return label_indices, score_values


def _safe_divide(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
  """Elementwise numerator / denominator, with 0.0 wherever the denominator is zero."""
  numerator = np.asarray(numerator, dtype=np.float64)
  denominator = np.asarray(denominator, dtype=np.float64)
  safe_denominator = np.where(denominator == 0, 1.0, denominator)
  return np.where(denominator == 0, 0.0, numerator / safe_denominator)


# --- label metrics


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Count matrix [K,K] (int64) with true classes on rows and predicted classes on columns."""
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer; got {num_classes}.")
  num_classes = int(num_classes)
  label_indices = _as_class_indices(labels, "labels")
  predicted_indices = _as_class_indices(predictions, "predictions")
  _check_same_length(label_indices, "labels", predicted_indices, "predictions")
  _check_class_range(label_indices, "labels", num_classes)
  _check_class_range(predicted_indices, "predictions", num_classes)
  flat_cells = label_indices * num_classes + predicted_indices
  counts = np.bincount(flat_cells, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Fraction of examples whose prediction equals the label (NaN for no examples)."""
  label_indices = _as_class_indices(labels, "labels")
  predicted_indices = _as_class_indices(predictions, "predictions")
  _check_same_length(label_indices, "labels", predicted_indices, "predictions")
  if label_indices.size == 0:
    return math.nan
  return float(np.mean(label_indices == predicted_indices))


def per_class_precision_recall_f1(
  confusion: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-class precision, recall and F1 [K] each, 0.0 where a denominator is zero."""
  matrix = _as_confusion(confusion)
  true_positives = np.diag(matrix)
  predicted_counts = matrix.sum(axis=0)
  actual_counts = matrix.sum(axis=1)
  precision = _safe_divide(true_positives, predicted_counts)
  recall = _safe_divide(true_positives, actual_counts)
  f1 = _safe_divide(2.0 * true_positives, predicted_counts + actual_counts)
  return precision, recall, f1


def precision_recall_f1(
  confusion: np.ndarray, average: Average = "binary", positive_class: int = 1
) -> tuple[float, float, float]:
  """Precision, recall and F1 from a confusion matrix, averaged as requested.

  ``"binary"`` (K must be 2) reports `positive_class`; ``"macro"`` is the unweighted mean
  of the per-class scores over the classes that occur in the labels or the predictions;
  ``"weighted"`` weights the per-class scores by their support (true count). A score whose
  denominator is zero is 0.0.
  """
  if average not in _AVERAGES:
    raise ValueError(f"average must be one of {_AVERAGES}; got {average!r}.")
  matrix = _as_confusion(confusion)
  precision, recall, f1 = per_class_precision_recall_f1(matrix)
  num_classes = matrix.shape[0]
  if average == "binary":
    if num_classes != 2:
      raise ValueError(
        f"average='binary' needs a 2x2 confusion matrix; got shape {matrix.shape} "
        "(use 'macro' or 'weighted' for more classes)."
      )
    if positive_class not in (0, 1):
      raise ValueError(f"positive_class must be 0 or 1; got {positive_class}.")
    return (
      float(precision[positive_class]),
      float(recall[positive_class]),
      float(f1[positive_class]),
    )
  if average == "macro":
    occurring = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    if not np.any(occurring):
      return 0.0, 0.0, 0.0
    return (
      float(precision[occurring].mean()),
      float(recall[occurring].mean()),
      float(f1[occurring].mean()),
    )
  support = matrix.sum(axis=1)
  total_support = support.sum()
  if total_support == 0:
    return 0.0, 0.0, 0.0
  weights = support / total_support
  return float(precision @ weights), float(recall @ weights), float(f1 @ weights)


def _disagreement_weights(num_classes: int, weights: KappaWeights) -> np.ndarray:
  """Penalty matrix [K,K] for Cohen's kappa: 0 on the diagonal, growing with disagreement."""
  class_index = np.arange(num_classes, dtype=np.float64)
  distance = np.abs(class_index[:, None] - class_index[None, :])
  if weights is None:
    return (distance > 0).astype(np.float64)
  if weights == "linear":
    return distance
  return distance**2


def cohen_kappa(confusion: np.ndarray, weights: KappaWeights = None) -> float:
  """Cohen's kappa (unweighted, or linear/quadratic weighted); 0.0 when undefined."""
  if weights not in _KAPPA_WEIGHTS:
    raise ValueError(f"weights must be one of {_KAPPA_WEIGHTS}; got {weights!r}.")
  matrix = _as_confusion(confusion)
  total = matrix.sum()
  if total == 0:
    return 0.0
  observed = matrix / total
  expected = np.outer(matrix.sum(axis=1), matrix.sum(axis=0)) / total**2
  penalty = _disagreement_weights(matrix.shape[0], weights)
  expected_disagreement = float(np.sum(penalty * expected))
  if expected_disagreement == 0.0:
    return 0.0
  return 1.0 - float(np.sum(penalty * observed)) / expected_disagreement


def matthews_corrcoef(confusion: np.ndarray) -> float:
  """Matthews correlation coefficient (Gorodkin's R_K for K classes); 0.0 when undefined."""
  matrix = _as_confusion(confusion)
  total = matrix.sum()
  correct = np.trace(matrix)
  predicted_counts = matrix.sum(axis=0)
  actual_counts = matrix.sum(axis=1)
  covariance = correct * total - predicted_counts @ actual_counts
  predicted_spread = total**2 - predicted_counts @ predicted_counts
  actual_spread = total**2 - actual_counts @ actual_counts
  denominator = math.sqrt(predicted_spread * actual_spread)
  if denominator == 0.0:
    return 0.0
  return float(covariance / denominator)


# --- score metrics


def _midranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of `values`, tied values sharing the mean of their ranks."""
  _, group_of_value, group_sizes = np.unique(values, return_inverse=True, return_counts=True)
  last_rank_in_group = np.cumsum(group_sizes)
  midrank_of_group = last_rank_in_group - (group_sizes - 1) / 2.0
  return midrank_of_group[group_of_value.reshape(-1)]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Binary ROC AUC, P(score_pos > score_neg) + 0.5 P(tie); NaN if only one class is present."""
  label_indices, score_values = _as_binary_labels_and_scores(labels, scores)
  is_positive = label_indices == 1
  num_positive = int(np.count_nonzero(is_positive))
  num_negative = label_indices.size - num_positive
  if num_positive == 0 or num_negative == 0:
    return math.nan
  positive_rank_sum = float(_midranks(score_values)[is_positive].sum())
  mann_whitney_u = positive_rank_sum - num_positive * (num_positive + 1) / 2.0
  return mann_whitney_u / (num_positive * num_negative)


def roc_auc_ovr(
  labels: np.ndarray, probabilities: np.ndarray, average: Literal["macro", "weighted"] = "macro"
) -> float:
  """One-vs-rest multi-class ROC AUC, macro or prevalence-weighted over classes in `labels`.

  `probabilities` is [N,K]; any per-class scores that order examples like the probabilities
  (e.g. log-probabilities) give the same result. Classes absent from `labels` are skipped;
  the result is NaN when no class has both positives and negatives.
  """
  if average not in ("macro", "weighted"):
    raise ValueError(f"average must be 'macro' or 'weighted'; got {average!r}.")
  score_matrix = np.asarray(probabilities, dtype=np.float64)
  if score_matrix.ndim != 2:
    raise ValueError(f"probabilities must be 2-D [N,K]; got shape {score_matrix.shape}.")
  label_indices = _as_class_indices(labels, "labels")
  _check_same_length(label_indices, "labels", score_matrix, "probabilities")
  _check_class_range(label_indices, "labels", score_matrix.shape[1])
  class_counts = np.bincount(label_indices, minlength=score_matrix.shape[1])
  present_classes = np.flatnonzero(class_counts)
  if present_classes.size == 0:
    return math.nan
  per_class_auc = np.array(
    [roc_auc((label_indices == k).astype(np.int64), score_matrix[:, k]) for k in present_classes]
  )
  if average == "macro":
    return float(per_class_auc.mean())
  prevalence = class_counts[present_classes] / class_counts.sum()
  return float(per_class_auc @ prevalence)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve points (fpr, tpr, thresholds), thresholds decreasing from +inf.

  Point i is the rate at which examples with ``score >= thresholds[i]`` are called
  positive; the first point is (0, 0) at threshold +inf. A rate is NaN when its class
  has no examples.
  """
  label_indices, score_values = _as_binary_labels_and_scores(labels, scores)
  order = np.argsort(score_values, kind="stable")[::-1]
  sorted_scores = score_values[order]
  sorted_labels = label_indices[order]
  last_of_each_score = np.append(
    np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1
  )
  last_of_each_score = last_of_each_score[last_of_each_score >= 0]
  true_positives = np.cumsum(sorted_labels)[last_of_each_score]
  false_positives = last_of_each_score + 1 - true_positives
  num_positive = int(label_indices.sum())
  num_negative = label_indices.size - num_positive
  with np.errstate(divide="ignore", invalid="ignore"):
    tpr = np.append(0.0, true_positives) / (num_positive if num_positive else np.nan)
    fpr = np.append(0.0, false_positives) / (num_negative if num_negative else np.nan)
  thresholds = np.append(np.inf, sorted_scores[last_of_each_score])
  return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


# --- logits -> metrics


def _sigmoid(logits: np.ndarray) -> np.ndarray:
  """Logistic function, without overflow for large |logits|."""
  exp_minus_abs = np.exp(-np.abs(logits))
  return np.where(logits >= 0, 1.0 / (1.0 + exp_minus_abs), exp_minus_abs / (1.0 + exp_minus_abs))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  """Log-probabilities of a softmax over the last axis, without overflow."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _as_logits(logits: np.ndarray) -> np.ndarray:
  """Return `logits` as finite float64 of shape [N] or [N,K], or raise ValueError."""
  logit_values = np.asarray(logits, dtype=np.float64)
  if logit_values.ndim not in (1, 2) or (logit_values.ndim == 2 and logit_values.shape[1] == 0):
    raise ValueError(
      f"logits must have shape [N], [N,1] or [N,K] with K >= 2; got {logit_values.shape}."
    )
  num_non_finite = int(np.count_nonzero(~np.isfinite(logit_values)))
  if num_non_finite:
    raise ValueError(
      f"logits must be finite; found {num_non_finite} non-finite value(s) "
      f"(NaN or inf) in logits of shape {logit_values.shape}."
    )
  return logit_values


def _predictions_and_ranking_scores(
  logits: np.ndarray, threshold: float
) -> tuple[int, np.ndarray, np.ndarray]:
  """Number of classes, predicted classes [N] and the scores AUC is computed from.

  The ranking scores are monotone in the probabilities but do not saturate: the logit
  for a sigmoid model, the logit margin z1 - z0 for a 2-way softmax, and the
  log-probabilities [N,K] for K > 2.
  """
  if logits.ndim == 1 or logits.shape[1] == 1:
    logit = logits.reshape(-1)
    predictions = (_sigmoid(logit) >= threshold).astype(np.int64)
    return 2, predictions, logit
  num_classes = logits.shape[1]
  predictions = np.argmax(logits, axis=1).astype(np.int64)
  if num_classes == 2:
    return 2, predictions, logits[:, 1] - logits[:, 0]
  return num_classes, predictions, _log_softmax(logits)


def _binary_rates(confusion: np.ndarray) -> dict[str, float]:
  """Sensitivity (recall of class 1) and specificity (recall of class 0) of a 2x2 matrix."""
  true_negatives, false_positives = confusion[0]
  false_negatives, true_positives = confusion[1]
  return {
    "sensitivity": float(_safe_divide(true_positives, true_positives + false_negatives)),
    "specificity": float(_safe_divide(true_negatives, true_negatives + false_positives)),
  }


def classification_metrics(
  labels: np.ndarray, logits: np.ndarray, *, threshold: float = 0.5
) -> dict[str, object]:
  """JSON-serialisable summary of a classifier's logits against integer labels.

  `logits` of shape [N] or [N,1] are one-logit sigmoid outputs (class 1 predicted when
  sigmoid(logit) >= `threshold`); [N,K] with K >= 2 are softmax outputs (predicted class =
  argmax, ties to the lower index; `threshold` is unused). Binary problems report
  precision/recall/F1 for class 1 plus sensitivity and specificity; K > 2 reports macro
  averages and one-vs-rest macro AUC. "roc_auc" is NaN when the labels hold one class.
  """
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must lie in [0, 1]; got {threshold}.")
  label_array = np.asarray(labels)
  logit_values = np.asarray(logits)
  _check_same_length(label_array, "labels", logit_values, "logits")
  label_indices = _as_class_indices(label_array, "labels")
  logit_values = _as_logits(logit_values)
  if label_indices.size == 0:
    raise ValueError("classification_metrics needs at least one example; got N = 0.")
  num_classes, predictions, ranking_scores = _predictions_and_ranking_scores(
    logit_values, threshold
  )
  _check_class_range(label_indices, "labels", num_classes)
  return _summary(label_indices, predictions, ranking_scores, num_classes)


def _summary(label_indices: np.ndarray, predictions: np.ndarray, ranking_scores: np.ndarray,
             num_classes: int) -> dict[str, object]:
  """The summary of predictions and ranking scores (class-1 scores [N] when binary, [N,K]
  otherwise) against labels: what `classification_metrics` and `probability_metrics` return."""
  confusion = confusion_matrix(label_indices, predictions, num_classes)
  is_binary = num_classes == 2
  precision, recall, f1 = precision_recall_f1(confusion, "binary" if is_binary else "macro")
  auc = (
    roc_auc(label_indices, ranking_scores)
    if is_binary
    else roc_auc_ovr(label_indices, ranking_scores)
  )
  summary: dict[str, object] = {
    "num_examples": int(label_indices.size),
    "num_classes": int(num_classes),
    "accuracy": accuracy(label_indices, predictions),
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "cohen_kappa": cohen_kappa(confusion),
    "mcc": matthews_corrcoef(confusion),
    "roc_auc": float(auc),
    "confusion_matrix": confusion.tolist(),
  }
  if is_binary:
    summary.update(_binary_rates(confusion))
  return summary


def probability_metrics(
  labels: np.ndarray, probabilities: np.ndarray, *, threshold: float = 0.5
) -> dict[str, object]:
  """`classification_metrics`' summary from class probabilities [N,K] (K >= 2) instead of logits.

  Binary: class 1 predicted when p1 >= `threshold`, AUC of p1; K > 2: argmax (ties to the lower
  index), macro precision/recall/F1 and one-vs-rest macro AUC. Used for MURA's study-level view,
  where a study's probabilities are the mean of its images' (Rajpurkar et al.).
  """
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must lie in [0, 1]; got {threshold}.")
  label_indices = _as_class_indices(labels, "labels")
  values = np.asarray(probabilities, dtype=np.float64)
  if values.ndim != 2 or values.shape[1] < 2:
    raise ValueError(f"probabilities must have shape [N,K] with K >= 2; got {values.shape}.")
  _check_same_length(label_indices, "labels", values, "probabilities")
  if label_indices.size == 0:
    raise ValueError("probability_metrics needs at least one example; got N = 0.")
  if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
    raise ValueError("probabilities must be finite and lie in [0, 1].")
  num_classes = values.shape[1]
  _check_class_range(label_indices, "labels", num_classes)
  is_binary = num_classes == 2
  if is_binary:
    predictions = (values[:, 1] >= threshold).astype(np.int64)
  else:
    predictions = np.argmax(values, axis=1).astype(np.int64)
  return _summary(label_indices, predictions, values[:, 1] if is_binary else values, num_classes)


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
  """Class probabilities [N,K] of logits [N] / [N,1] (sigmoid: columns 1 - p, p) or [N,K]
  (softmax)."""
  logit_values = _as_logits(logits)
  if logit_values.ndim == 1 or logit_values.shape[1] == 1:
    positive = _sigmoid(logit_values.reshape(-1))
    return np.stack([1.0 - positive, positive], axis=1)
  return np.exp(_log_softmax(logit_values))


# --- undefined values and strict JSON


def undefined_metrics(confusion: np.ndarray) -> dict[str, str]:
  """Metric name -> why it is undefined, for the summary metrics of a confusion matrix [K,K].

  ROC AUC needs examples of two classes (one-vs-rest: of at least two); Cohen's kappa needs an
  expected disagreement above zero (not every label and prediction in one same class); the MCC
  needs labels of two classes and predictions of two classes. For two classes also precision
  (no positive prediction), recall and sensitivity (no positive label), specificity (no negative
  label) and F1 (no positive label or prediction). The functions above report 0.0 (kappa, MCC,
  precision, ...) or NaN (AUC) in these cases; a summary that is written should say null.
  """
  matrix = _as_confusion(confusion)
  true_counts = matrix.sum(axis=1)
  predicted_counts = matrix.sum(axis=0)
  true_classes = np.flatnonzero(true_counts).tolist()
  predicted_classes = np.flatnonzero(predicted_counts).tolist()
  reasons = {}
  if matrix.sum() == 0:
    return {name: "there are no examples" for name in ("roc_auc", "cohen_kappa", "mcc")}
  if len(true_classes) < 2:
    reasons["roc_auc"] = f"the labels hold only class {true_classes[0]}"
  if len(true_classes) < 2 and predicted_classes == true_classes:
    reasons["cohen_kappa"] = (f"every label and every prediction is class {true_classes[0]} "
                              "(no expected disagreement)")
  if len(true_classes) < 2:
    reasons["mcc"] = f"the labels hold only class {true_classes[0]}"
  elif len(predicted_classes) < 2:
    reasons["mcc"] = f"every prediction is class {predicted_classes[0]}"
  if matrix.shape == (2, 2):
    (true_negatives, false_positives), (false_negatives, true_positives) = matrix
    if true_positives + false_positives == 0:
      reasons["precision"] = "no example is predicted positive (class 1)"
    if true_positives + false_negatives == 0:
      reasons["recall"] = reasons["sensitivity"] = "no example is labelled positive (class 1)"
    if true_negatives + false_positives == 0:
      reasons["specificity"] = "no example is labelled negative (class 0)"
    if 2 * true_positives + false_positives + false_negatives == 0:
      reasons["f1"] = "no example is labelled or predicted positive (class 1)"
  return reasons


def json_safe(value: Any, path: str = "") -> tuple[Any, list[str]]:
  """(`value` with every NaN / infinite float as None, the dotted paths that were replaced).

  Numpy scalars and arrays become Python numbers and lists; tuples become lists.
  """
  if isinstance(value, Mapping):
    result, replaced = {}, []
    for key, item in value.items():
      result[key], inner = json_safe(item, f"{path}.{key}" if path else str(key))
      replaced += inner
    return result, replaced
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    result, replaced = [], []
    for index, item in enumerate(value):
      converted, inner = json_safe(item, f"{path}[{index}]")
      result.append(converted)
      replaced += inner
    return result, replaced
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None, [path]
  return value, []


def strict_json_dumps(value: Any, **kwargs: Any) -> str:
  """`json.dumps` of `json_safe(value)`, which never writes NaN or Infinity."""
  return json.dumps(json_safe(value)[0], allow_nan=False, **kwargs)


def write_json(path: str, value: Any, indent: int | None = 2) -> list[str]:
  """Writes `value` as strict JSON (NaN / inf as null), atomically (a temporary file renamed
  over `path`, so a killed process leaves the old file or the new one); returns the paths made
  null."""
  safe, replaced = json_safe(value)
  text = json.dumps(safe, allow_nan=False, indent=indent)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w") as file:
      file.write(text)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return replaced


def rewrite_strict_json(path: str) -> list[str]:
  """Rewrites a JSON file (Python's json may have written NaN / Infinity) as strict JSON;
  returns the paths made null."""
  with open(path) as file:
    content = json.load(file)
  return write_json(path, content)
