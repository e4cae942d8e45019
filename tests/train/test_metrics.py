"""Tests for medxai_jax.train.metrics against hand-worked cases and independent naive versions."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from medxai_jax.train import metrics

# Binary case used throughout: TP=3, FN=2 (five positives), FP=1, TN=4 (five negatives).
BINARY_LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
BINARY_PREDICTIONS = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
BINARY_CONFUSION = np.array([[4, 1], [2, 3]])  # rows true [neg, pos]: [[TN, FP], [FN, TP]]

# 3-class case, rows = true, cols = predicted; N = 20.
# Row sums (true counts) t = [6, 10, 4]; column sums (predicted counts) p = [7, 8, 5]; trace = 14.
THREE_CLASS_CONFUSION = np.array([[5, 1, 0], [2, 6, 2], [0, 1, 3]])


def _labels_predictions_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Expand a confusion matrix into matching label and prediction arrays."""
  pairs = [
    (i, j)
    for i, j in itertools.product(range(len(confusion)), repeat=2)
    for _ in range(confusion[i, j])
  ]
  labels, predictions = zip(*pairs, strict=True)
  return np.array(labels), np.array(predictions)


def _naive_pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """P(s_pos > s_neg) + 0.5 P(s_pos == s_neg) by enumerating every (positive, negative) pair."""
  positives = scores[labels == 1]
  negatives = scores[labels == 0]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
  return wins / (len(positives) * len(negatives))


def _binary_mcc_formula(confusion: np.ndarray) -> float:
  """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), the textbook binary MCC."""
  (tn, fp), (fn, tp) = confusion.astype(float)
  return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


# --- confusion / accuracy


def test_confusion_matrix_counts_true_rows_predicted_columns():
  # (true, pred) pairs: (0,0), (1,2), (2,2), (2,1), (1,1)
  confusion = metrics.confusion_matrix(np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 1, 1]), 3)
  np.testing.assert_array_equal(confusion, [[1, 0, 0], [0, 1, 1], [0, 1, 1]])
  assert confusion.dtype == np.int64


def test_confusion_matrix_of_binary_case():
  confusion = metrics.confusion_matrix(BINARY_LABELS, BINARY_PREDICTIONS, 2)
  np.testing.assert_array_equal(confusion, BINARY_CONFUSION)


def test_confusion_matrix_keeps_absent_classes_as_zero_rows():
  confusion = metrics.confusion_matrix(np.array([0, 0]), np.array([0, 1]), 4)
  assert confusion.shape == (4, 4)
  assert confusion.sum() == 2


def test_confusion_matrix_round_trips_three_class_case():
  labels, predictions = _labels_predictions_from_confusion(THREE_CLASS_CONFUSION)
  np.testing.assert_array_equal(
    metrics.confusion_matrix(labels, predictions, 3), THREE_CLASS_CONFUSION
  )
  assert metrics.accuracy(labels, predictions) == pytest.approx(14 / 20)  # trace / N


def test_accuracy_is_fraction_correct():
  assert metrics.accuracy(BINARY_LABELS, BINARY_PREDICTIONS) == pytest.approx(
    7 / 10
  )  # TP + TN = 3 + 4
  assert math.isnan(metrics.accuracy(np.array([], dtype=int), np.array([], dtype=int)))


# --- precision / recall / F1


def test_binary_precision_recall_f1_by_hand():
  precision, recall, f1 = metrics.precision_recall_f1(BINARY_CONFUSION, "binary")
  assert precision == pytest.approx(3 / 4)  # TP / (TP + FP) = 3 / 4
  assert recall == pytest.approx(3 / 5)  # TP / (TP + FN) = 3 / 5
  assert f1 == pytest.approx(
    2 * 0.75 * 0.6 / 1.35
  )  # = 0.9 / 1.35 = 2/3 = 2TP / (2TP + FP + FN) = 6/9
  assert f1 == pytest.approx(2 / 3)


def test_binary_precision_recall_f1_for_class_zero():
  # Class 0 as positive: TP=4 (TN above), FP=2 (FN above), FN=1 -> P = 4/6, R = 4/5, F1 = 8/11.
  precision, recall, f1 = metrics.precision_recall_f1(BINARY_CONFUSION, "binary", positive_class=0)
  assert (precision, recall, f1) == pytest.approx((4 / 6, 4 / 5, 8 / 11))


def test_macro_and_weighted_on_three_classes_by_hand():
  # class 0: TP=5, predicted 7, true 6 -> P=5/7, R=5/6, F1 = 2*5/(7+6) = 10/13
  # class 1: TP=6, predicted 8, true 10 -> P=6/8, R=6/10, F1 = 12/18
  # class 2: TP=3, predicted 5, true 4 -> P=3/5, R=3/4, F1 = 6/9
  macro = metrics.precision_recall_f1(THREE_CLASS_CONFUSION, "macro")
  assert macro == pytest.approx(
    ((5 / 7 + 6 / 8 + 3 / 5) / 3, (5 / 6 + 6 / 10 + 3 / 4) / 3, (10 / 13 + 12 / 18 + 6 / 9) / 3)
  )
  # weighted by true counts [6, 10, 4] / 20; weighted recall = (5 + 6 + 3) / 20 = accuracy
  weighted = metrics.precision_recall_f1(THREE_CLASS_CONFUSION, "weighted")
  expected_precision = (6 * 5 / 7 + 10 * 6 / 8 + 4 * 3 / 5) / 20
  expected_f1 = (6 * 10 / 13 + 10 * 12 / 18 + 4 * 6 / 9) / 20
  assert weighted == pytest.approx((expected_precision, 14 / 20, expected_f1))


def test_macro_skips_classes_absent_from_labels_and_predictions():
  padded = np.zeros((4, 4), dtype=int)
  padded[:3, :3] = THREE_CLASS_CONFUSION
  assert metrics.precision_recall_f1(padded, "macro") == pytest.approx(
    metrics.precision_recall_f1(THREE_CLASS_CONFUSION, "macro")
  )


def test_zero_division_gives_zero():
  # Never predicts positive: TP=0, FP=0 -> precision 0/0 -> 0.0; recall 0/2 = 0; F1 0.
  never_positive = np.array([[3, 0], [2, 0]])
  assert metrics.precision_recall_f1(never_positive, "binary") == (0.0, 0.0, 0.0)
  # No positives at all and none predicted: everything for class 1 is 0/0 -> 0.0.
  assert metrics.precision_recall_f1(np.array([[5, 0], [0, 0]]), "binary") == (0.0, 0.0, 0.0)


def test_binary_average_rejects_multiclass_confusion():
  with pytest.raises(ValueError, match="macro"):
    metrics.precision_recall_f1(THREE_CLASS_CONFUSION, "binary")
  with pytest.raises(ValueError, match="average"):
    metrics.precision_recall_f1(BINARY_CONFUSION, "micro")


# --- Cohen's kappa


def test_binary_kappa_by_hand():
  # p_o = (TP + TN) / N = 7/10. True counts [neg, pos] = [5, 5], predicted counts = [6, 4].
  # p_e = (5*6 + 5*4) / 100 = 50/100 = 0.5 -> kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
  assert metrics.cohen_kappa(BINARY_CONFUSION) == pytest.approx(0.4)


def test_three_class_kappa_by_hand():
  # p_o = 14/20 = 0.7; p_e = (6*7 + 10*8 + 4*5) / 20^2 = (42 + 80 + 20) / 400 = 0.355
  # kappa = (0.7 - 0.355) / (1 - 0.355) = 0.345 / 0.645 = 23/43
  assert metrics.cohen_kappa(THREE_CLASS_CONFUSION) == pytest.approx(23 / 43)


def test_three_class_quadratic_weighted_kappa_by_hand():
  # Weights w_ij = (i - j)^2 = [[0,1,4],[1,0,1],[4,1,0]].
  # Observed weighted disagreement (counts): 1*1 + 0*4 + 2*1 + 2*1 + 0*4 + 1*1 = 6
  # Expected counts E_ij = t_i * p_j / 20 off the diagonal:
  #   E01 = 6*8/20 = 2.4, E02 = 6*5/20 = 1.5, E10 = 10*7/20 = 3.5,
  #   E12 = 10*5/20 = 2.5, E20 = 4*7/20 = 1.4, E21 = 4*8/20 = 1.6
  # Expected weighted disagreement: 2.4*1 + 1.5*4 + 3.5*1 + 2.5*1 + 1.4*4 + 1.6*1 = 21.6
  # kappa = 1 - 6 / 21.6 = 1 - 5/18 = 13/18
  assert metrics.cohen_kappa(THREE_CLASS_CONFUSION, weights="quadratic") == pytest.approx(13 / 18)


def test_three_class_linear_weighted_kappa_by_hand():
  # Weights |i - j|: observed 6 (as above, no cell two apart is filled);
  # expected 2.4 + 1.5*2 + 3.5 + 2.5 + 1.4*2 + 1.6 = 15.8 -> kappa = 1 - 6/15.8 = 49/79
  assert metrics.cohen_kappa(THREE_CLASS_CONFUSION, weights="linear") == pytest.approx(49 / 79)


def test_weighted_kappa_equals_unweighted_for_two_classes():
  # With K=2 every disagreement is one class apart, so |i-j| = (i-j)^2 = [i != j].
  for weights in ("linear", "quadratic"):
    assert metrics.cohen_kappa(BINARY_CONFUSION, weights=weights) == pytest.approx(0.4)


def test_kappa_perfect_inverted_and_undefined():
  assert metrics.cohen_kappa(np.array([[3, 0], [0, 2]])) == pytest.approx(1.0)
  # Inverted on balanced labels: p_o = 0, p_e = (2*2 + 2*2) / 16 = 0.5 -> (0 - 0.5) / 0.5 = -1
  assert metrics.cohen_kappa(np.array([[0, 2], [2, 0]])) == pytest.approx(-1.0)
  # All examples in one class on both sides: p_e = 1 -> 0/0 -> 0.0 by convention.
  assert metrics.cohen_kappa(np.array([[5, 0], [0, 0]])) == 0.0
  assert metrics.cohen_kappa(np.zeros((3, 3))) == 0.0
  with pytest.raises(ValueError, match="weights"):
    metrics.cohen_kappa(BINARY_CONFUSION, weights="cubic")


# --- MCC


def test_binary_mcc_by_hand():
  # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
  #   = (3*4 - 1*2) / sqrt(4*5*5*6) = 10 / sqrt(600)
  assert metrics.matthews_corrcoef(BINARY_CONFUSION) == pytest.approx(10 / math.sqrt(600))


def test_three_class_mcc_by_hand():
  # Gorodkin: c = 14, s = 20, sum p_k t_k = 7*6 + 8*10 + 5*4 = 142,
  # sum p_k^2 = 49 + 64 + 25 = 138, sum t_k^2 = 36 + 100 + 16 = 152
  # MCC = (14*20 - 142) / sqrt((400 - 138) * (400 - 152)) = 138 / sqrt(262 * 248)
  assert metrics.matthews_corrcoef(THREE_CLASS_CONFUSION) == pytest.approx(
    138 / math.sqrt(262 * 248)
  )


def test_multiclass_mcc_reduces_to_binary_formula_for_two_classes():
  rng = np.random.default_rng(0)
  for _ in range(50):
    confusion = rng.integers(1, 50, size=(2, 2))
    assert metrics.matthews_corrcoef(confusion) == pytest.approx(_binary_mcc_formula(confusion))


def test_binary_mcc_equals_phi_coefficient():
  rng = np.random.default_rng(1)
  for _ in range(20):
    labels = rng.integers(0, 2, size=200)
    predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    confusion = metrics.confusion_matrix(labels, predictions, 2)
    phi = np.corrcoef(labels, predictions)[0, 1]
    assert metrics.matthews_corrcoef(confusion) == pytest.approx(phi)


def test_mcc_perfect_inverted_and_undefined():
  assert metrics.matthews_corrcoef(np.array([[3, 0], [0, 2]])) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(np.array([[0, 3], [2, 0]])) == pytest.approx(-1.0)
  assert metrics.matthews_corrcoef(np.diag([2, 3, 4])) == pytest.approx(1.0)
  assert metrics.matthews_corrcoef(np.array([[3, 0], [2, 0]])) == 0.0  # never predicts class 1
  assert metrics.matthews_corrcoef(np.zeros((2, 2))) == 0.0


# --- ROC AUC


def test_roc_auc_by_hand_without_ties():
  # positives {0.35, 0.8}, negatives {0.1, 0.4}:
  # 0.35 > 0.1 yes, 0.35 > 0.4 no, 0.8 > 0.1 yes, 0.8 > 0.4 yes -> 3 of 4 pairs
  auc = metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
  assert auc == pytest.approx(0.75)


def test_roc_auc_by_hand_with_a_tie():
  # positives {0.5, 0.9}, negatives {0.2, 0.5}:
  #   (0.5,0.2)=1, (0.5,0.5)=0.5 tie, (0.9,0.2)=1, (0.9,0.5)=1
  # -> 3.5 / 4. Mid-ranks: 0.2->1, 0.5,0.5->2.5, 0.9->4; U = (2.5 + 4) - 2*3/2 = 3.5
  auc = metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.2, 0.5, 0.5, 0.9]))
  assert auc == pytest.approx(0.875)
  # All scores tied: every pair counts 0.5.
  assert metrics.roc_auc(np.array([0, 1, 0, 1, 1]), np.full(5, 0.3)) == pytest.approx(0.5)


def test_roc_auc_perfect_inverted_and_single_class():
  labels = np.array([0, 0, 1, 1])
  assert metrics.roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
  assert metrics.roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)
  assert math.isnan(metrics.roc_auc(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9])))
  assert math.isnan(metrics.roc_auc(np.array([0, 0]), np.array([0.1, 0.5])))


def test_roc_auc_matches_brute_force_pairs_with_ties():
  rng = np.random.default_rng(2)
  for size in (2, 7, 50, 301):
    labels = rng.integers(0, 2, size=size)
    labels[:2] = [0, 1]  # both classes present
    scores = rng.integers(0, 8, size=size) / 8.0  # few distinct values -> many ties
    assert metrics.roc_auc(labels, scores) == pytest.approx(_naive_pairwise_auc(labels, scores))


def test_roc_auc_is_invariant_to_monotone_transforms():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=100)
  logits = rng.normal(size=100)
  assert metrics.roc_auc(labels, logits) == pytest.approx(
    metrics.roc_auc(labels, 1 / (1 + np.exp(-logits)))
  )


def test_roc_auc_rejects_nan_scores_and_non_binary_labels():
  with pytest.raises(ValueError, match="1 NaN"):
    metrics.roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    metrics.roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))


def test_roc_auc_ovr_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2])  # prevalence 3, 2, 1
  probabilities = np.array(
    [
      [0.8, 0.1, 0.1],
      [0.6, 0.3, 0.1],
      [0.3, 0.4, 0.3],
      [0.5, 0.4, 0.1],
      [0.1, 0.7, 0.2],
      [0.2, 0.2, 0.6],
    ]
  )
  # class 0: positives {0.8, 0.6, 0.3} vs negatives {0.5, 0.1, 0.2}: 3 + 3 + 2 = 8 of 9 pairs
  # class 1: positives {0.4, 0.7} vs negatives {0.1, 0.3, 0.4, 0.2}:
  #   0.4 -> 1 + 1 + 0.5 (tie) + 1 = 3.5, 0.7 -> 4; 7.5 of 8 pairs
  # class 2: positive {0.6} beats all 5 negatives {0.1, 0.1, 0.3, 0.1, 0.2} -> 1
  per_class = np.array([8 / 9, 7.5 / 8, 1.0])
  assert metrics.roc_auc_ovr(labels, probabilities) == pytest.approx(per_class.mean())
  assert metrics.roc_auc_ovr(labels, probabilities, "weighted") == pytest.approx(
    per_class @ [3 / 6, 2 / 6, 1 / 6]
  )
  # A fourth class never present in the labels is skipped.
  with_absent_class = np.concatenate([probabilities, np.full((6, 1), 0.5)], axis=1)
  assert metrics.roc_auc_ovr(labels, with_absent_class) == pytest.approx(per_class.mean())
  # Log-probabilities order examples the same way as probabilities.
  assert metrics.roc_auc_ovr(labels, np.log(probabilities)) == pytest.approx(per_class.mean())


def test_roc_auc_ovr_single_class_is_nan():
  assert math.isnan(
    metrics.roc_auc_ovr(np.array([1, 1]), np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]]))
  )


def test_roc_curve_by_hand():
  # Descending scores 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg); two positives, two negatives.
  fpr, tpr, thresholds = metrics.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
  np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  # Trapezoid area: 0.5 * 0.5 (fpr 0 -> 0.5 at tpr 0.5) + 0.5 * 1 (fpr 0.5 -> 1 at tpr 1) = 0.75
  assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_roc_curve_area_matches_roc_auc_with_ties():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 2, size=200)
  scores = rng.integers(0, 5, size=200).astype(float)
  fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
  assert len(thresholds) == 1 + len(np.unique(scores))  # one point per distinct score, plus (0, 0)
  assert np.all(np.diff(thresholds) < 0)
  assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores))
  assert (fpr[-1], tpr[-1]) == (1.0, 1.0)


# --- classification_metrics


def test_classification_metrics_sigmoid_logits_by_hand():
  # Logits chosen so that predictions (logit >= 0 <=> sigmoid >= 0.5) are BINARY_PREDICTIONS.
  logits = np.array([3.0, 2.0, 0.5, -0.2, -1.0, 0.1, -0.5, -2.0, -3.0, -4.0])
  result = metrics.classification_metrics(BINARY_LABELS, logits)
  assert result["confusion_matrix"] == BINARY_CONFUSION.tolist()
  assert result["num_examples"] == 10
  assert result["accuracy"] == pytest.approx(0.7)
  assert (result["precision"], result["recall"], result["f1"]) == pytest.approx(
    (3 / 4, 3 / 5, 2 / 3)
  )
  assert result["sensitivity"] == pytest.approx(3 / 5)  # TP / (TP + FN)
  assert result["specificity"] == pytest.approx(4 / 5)  # TN / (TN + FP)
  assert result["cohen_kappa"] == pytest.approx(0.4)
  assert result["mcc"] == pytest.approx(10 / math.sqrt(600))
  # Positives {3, 2, 0.5, -0.2, -1} vs negatives {0.1, -0.5, -2, -3, -4}: 25 pairs, losses are
  # -0.2 < 0.1 and -1 < 0.1, -1 < -0.5 -> 22 / 25
  assert result["roc_auc"] == pytest.approx(22 / 25)


def test_classification_metrics_threshold_moves_predictions():
  logits = np.array([3.0, 2.0, 0.5, -0.2, -1.0, 0.1, -0.5, -2.0, -3.0, -4.0])
  # sigmoid(0.5) = 0.62 < 0.9 and sigmoid(2) = 0.88 < 0.9: only logit 3 (0.95) is positive.
  result = metrics.classification_metrics(BINARY_LABELS, logits, threshold=0.9)
  assert result["confusion_matrix"] == [[5, 0], [4, 1]]
  assert result["roc_auc"] == pytest.approx(22 / 25)  # AUC does not depend on the threshold


def test_classification_metrics_consistent_across_logit_layouts():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 2, size=64)
  logit = rng.normal(size=64) + 1.5 * labels
  flat = metrics.classification_metrics(labels, logit)
  column = metrics.classification_metrics(labels, logit[:, None])
  # softmax([0, z]) has p1 = sigmoid(z); a third, hopeless class leaves the argmax unchanged.
  two_way = metrics.classification_metrics(labels, np.stack([np.zeros(64), logit], axis=1))
  three_way = metrics.classification_metrics(
    labels, np.stack([np.zeros(64), logit, np.full(64, -50.0)], axis=1)
  )
  assert flat == column
  assert two_way == flat  # same predictions, and AUC ranks on the margin z - 0 = z
  assert three_way["num_classes"] == 3
  np.testing.assert_array_equal(
    np.array(three_way["confusion_matrix"])[:2, :2], flat["confusion_matrix"]
  )
  for key in ("accuracy", "cohen_kappa", "mcc", "roc_auc"):
    assert three_way[key] == pytest.approx(flat[key]), key


def test_classification_metrics_multiclass_matches_component_functions():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 3, size=90)
  logits = rng.normal(size=(90, 3)) + 2.0 * np.eye(3)[labels]
  result = metrics.classification_metrics(labels, logits)
  predictions = np.argmax(logits, axis=1)
  confusion = metrics.confusion_matrix(labels, predictions, 3)
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  assert result["confusion_matrix"] == confusion.tolist()
  assert result["accuracy"] == pytest.approx(np.mean(labels == predictions))
  assert (result["precision"], result["recall"], result["f1"]) == pytest.approx(
    metrics.precision_recall_f1(confusion, "macro")
  )
  assert result["cohen_kappa"] == pytest.approx(metrics.cohen_kappa(confusion))
  assert result["mcc"] == pytest.approx(metrics.matthews_corrcoef(confusion))
  assert result["roc_auc"] == pytest.approx(metrics.roc_auc_ovr(labels, probabilities))
  assert "sensitivity" not in result and "specificity" not in result


def test_classification_metrics_handles_extreme_logits():
  # Huge logits must not overflow; the AUC ranks on logits, so saturated probabilities do not tie.
  labels = np.array([0, 0, 1, 1])
  logits = np.array([-1000.0, 50.0, 60.0, 1000.0])
  result = metrics.classification_metrics(labels, logits)
  assert result["roc_auc"] == pytest.approx(1.0)
  assert result["confusion_matrix"] == [[1, 1], [0, 2]]
  multiclass = metrics.classification_metrics(
    np.array([0, 1, 2]), np.array([[800.0, 0, 0], [0, 900.0, 0], [0, 0, 700.0]])
  )
  assert multiclass["accuracy"] == 1.0 and multiclass["roc_auc"] == pytest.approx(1.0)


def test_classification_metrics_is_json_serialisable():
  for labels, logits in (
    (BINARY_LABELS, np.linspace(-2, 2, 10)),
    (np.array([0, 1, 2, 1]), np.eye(3)[[0, 1, 2, 0]]),
    (np.ones(3, dtype=int), np.array([0.3, -0.1, 2.0])),  # one class only -> NaN AUC
  ):
    result = metrics.classification_metrics(labels, logits)
    decoded = json.loads(json.dumps(result))
    assert decoded.keys() == result.keys()
    assert all(type(value) in (int, float, list) for value in result.values())
  assert math.isnan(result["roc_auc"])


def test_classification_metrics_rejects_mismatched_lengths_with_both_shapes():
  with pytest.raises(ValueError, match=r"\(5,\).*\(4, 3\)"):
    metrics.classification_metrics(np.zeros(5, dtype=int), np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
    metrics.classification_metrics(np.zeros(3, dtype=int), np.zeros(2))


def test_classification_metrics_rejects_out_of_range_labels():
  with pytest.raises(ValueError, match=r"\[0, 3\).*\[3\]"):
    metrics.classification_metrics(np.array([0, 1, 3]), np.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    metrics.classification_metrics(
      np.array([0, 2]), np.zeros(2)
    )  # sigmoid model: labels must be 0/1
  with pytest.raises(ValueError, match=r"\[0, 2\).*\[-1\]"):
    metrics.classification_metrics(np.array([-1, 1]), np.zeros((2, 1)))
  with pytest.raises(ValueError, match="integer"):
    metrics.classification_metrics(np.array([0.0, 0.5]), np.zeros(2))


def test_classification_metrics_rejects_non_finite_logits_with_count():
  logits = np.array([[0.0, np.nan], [np.inf, 1.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="2 non-finite"):
    metrics.classification_metrics(np.array([0, 1, 1]), logits)


def test_classification_metrics_rejects_bad_shapes_and_threshold():
  with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
    metrics.classification_metrics(np.zeros(2, dtype=int), np.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match="N = 0"):
    metrics.classification_metrics(np.zeros(0, dtype=int), np.zeros(0))
  with pytest.raises(ValueError, match="threshold"):
    metrics.classification_metrics(np.zeros(2, dtype=int), np.zeros(2), threshold=1.5)


# --- undefined metrics, probabilities and strict JSON


def _naive_undefined(confusion: np.ndarray) -> set[str]:
  """Which metrics divide by zero, from their textbook denominators (binary: also precision,
  recall, sensitivity, specificity, F1)."""
  n = confusion.sum()
  rows, columns = confusion.sum(axis=1), confusion.sum(axis=0)
  k = len(rows)
  undefined = set()
  if sum(int(r > 0) for r in rows) < 2:  # AUC needs a positive and a negative
    undefined.add("roc_auc")
  expected_agreement = sum(rows[i] * columns[i] for i in range(k)) / n**2
  if expected_agreement == 1.0:  # kappa = (p_o - p_e) / (1 - p_e)
    undefined.add("cohen_kappa")
  if (n**2 - sum(c * c for c in columns)) * (n**2 - sum(r * r for r in rows)) == 0:
    undefined.add("mcc")
  if k == 2:  # precision = TP / (TP + FP), recall = TP / (TP + FN), ...
    tp, fp, fn, tn = confusion[1, 1], confusion[0, 1], confusion[1, 0], confusion[0, 0]
    undefined |= {name for name, denominator in (
        ("precision", tp + fp), ("recall", tp + fn), ("sensitivity", tp + fn),
        ("specificity", tn + fp), ("f1", 2 * tp + fp + fn)) if denominator == 0}
  return undefined


def test_undefined_metrics_match_the_zero_denominators():
  rng = np.random.default_rng(0)
  cases = [np.array([[5, 0], [0, 0]]), np.array([[0, 5], [0, 0]]), np.array([[3, 2], [0, 0]]),
           np.array([[2, 0], [3, 0]]), np.array([[1, 1], [1, 1]]),
           np.array([[0, 0, 0], [0, 4, 0], [0, 0, 0]])]
  for _ in range(200):
    k = int(rng.integers(2, 4))
    matrix = rng.integers(0, 3, (k, k)) * (rng.random((k, k)) < 0.4)
    if matrix.sum():
      cases.append(matrix)
  for matrix in cases:
    reasons = metrics.undefined_metrics(matrix)
    assert set(reasons) == _naive_undefined(matrix.astype(float)), matrix.tolist()
  assert metrics.undefined_metrics(np.array([[4, 1], [0, 0]]))["roc_auc"] == (
      "the labels hold only class 0")
  assert "no examples" in metrics.undefined_metrics(np.zeros((2, 2)))["mcc"]


def test_json_safe_nulls_every_non_finite_number_and_names_it():
  value = {"a": math.nan, "b": [1.0, np.float32("inf"), {"c": np.array([0.5, np.nan])}],
           "d": (np.int64(3), "text", None), "e": -math.inf}
  safe, replaced = metrics.json_safe(value)
  assert replaced == ["a", "b[1]", "b[2].c[1]", "e"]
  assert safe == {"a": None, "b": [1.0, None, {"c": [0.5, None]}], "d": [3, "text", None],
                  "e": None}
  text = metrics.strict_json_dumps(value)
  assert "NaN" not in text and "Infinity" not in text and json.loads(text) == safe


def test_probability_metrics_agree_with_logit_metrics():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 40)
  logits = rng.normal(size=40) + labels
  probabilities = metrics.probabilities_from_logits(logits)
  np.testing.assert_allclose(probabilities[:, 1], 1 / (1 + np.exp(-logits)))
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
  from_logits = metrics.classification_metrics(labels, logits)
  from_probabilities = metrics.probability_metrics(labels, probabilities)
  assert from_probabilities.keys() == from_logits.keys()
  assert from_probabilities.pop("confusion_matrix") == from_logits.pop("confusion_matrix")
  for key, value in from_logits.items():
    assert from_probabilities[key] == pytest.approx(value), key
  labels3 = rng.integers(0, 3, 40)
  logits3 = rng.normal(size=(40, 3))
  soft = metrics.probabilities_from_logits(logits3)
  np.testing.assert_allclose(soft, np.exp(logits3) / np.exp(logits3).sum(1, keepdims=True))
  assert metrics.probability_metrics(labels3, soft)["accuracy"] == pytest.approx(
      np.mean(np.argmax(logits3, 1) == labels3))
  with pytest.raises(ValueError, match=r"\[N,K\] with K >= 2"):
    metrics.probability_metrics(labels, probabilities[:, 1])
