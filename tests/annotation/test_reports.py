"""Report annotation (001, 3.3 / 4.5): n-gram counts, logistic regression, k-fold, the binary."""

from __future__ import annotations

import collections
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subprocess_env
from medxai_jax.annotation import reports

REPO = subprocess_env.REPO
UNIQUE = "zyxwvut"  # a token that occurs in one report only (the leakage probe)
PROBE = 7  # the report that holds it


def naive_counts(texts: list[str], low: int, high: int) -> list[collections.Counter]:
  """Per-report n-gram counts by sliding a window of each length over the words."""
  counts = []
  for text in texts:
    words = text.split()
    counter = collections.Counter()
    for n in range(low, high + 1):
      for start in range(len(words) - n + 1):
        counter[" ".join(words[start:start + n])] += 1
    counts.append(counter)
  return counts


def test_clean_text_and_tokenize():
  assert reports.clean_text("  No acute Fracture/dislocation;\n3 views, patient's L-wrist. ") == (
      "no acute fracture dislocation views patients l wrist")
  assert reports.tokenize("Fracture, NOT seen!") == ["fracture", "not", "seen"]
  assert reports.tokenize("12/03/2019 -- ") == []


def test_count_matrix_matches_hand_counts_and_naive_counts():
  texts = ["No fracture.", "Fracture of the radius; no dislocation.", "no fracture NO fracture"]
  vocabulary = reports.fit_vocabulary(texts, (1, 3))
  # Hand count: 6 unigrams, 7 bigrams, 6 trigrams.
  assert vocabulary.size == 19
  assert list(vocabulary.ngrams) == sorted(vocabulary.ngrams)
  counts = reports.count_matrix(vocabulary, texts)
  assert counts.shape == (3, 19) and counts.dtype == np.float32
  column = vocabulary.index
  assert counts[2, column["no fracture"]] == 2 and counts[2, column["fracture no fracture"]] == 1
  assert counts[0, column["fracture"]] == 1 and counts[1, column["radius no dislocation"]] == 1
  expected = naive_counts([reports.clean_text(t) for t in texts], 1, 3)
  for row, counter in enumerate(expected):
    assert {g: counts[row, column[g]] for g in counter} == dict(counter)
    assert counts[row].sum() == sum(counter.values())
  # N-grams outside the vocabulary are ignored.
  unseen = reports.count_matrix(vocabulary, ["Zebra fracture of the ulna"])
  assert unseen.sum() == 6 and unseen[0, column["fracture of the"]] == 1
  # min_count counts occurrences over the whole corpus.
  assert reports.fit_vocabulary(texts, (1, 3), min_count=2).ngrams == (
      "fracture", "no", "no fracture")
  assert reports.fit_vocabulary(texts, (2, 2)).size == 7
  with pytest.raises(ValueError, match="ngram_range"):
    reports.fit_vocabulary(texts, (2, 1))


def test_synthetic_reports_are_deterministic_and_need_context():
  texts, labels = reports.synthetic_reports(jax.random.key(0), 200)
  again, labels_again = reports.synthetic_reports(jax.random.key(0), 200)
  other, _ = reports.synthetic_reports(jax.random.key(1), 200)
  assert texts == again and np.array_equal(labels, labels_again) and texts != other
  assert labels.sum() == 100
  negatives = [t for t, y in zip(texts, labels) if y == 0]
  # The unigram 'fracture' is in (nearly) every report of both classes.
  assert np.mean(["fracture" in reports.tokenize(t) for t in negatives]) > 0.8
  _, noisy = reports.synthetic_reports(jax.random.key(0), 200, label_noise=0.2)
  assert 0.1 < np.mean(noisy != labels) < 0.3


@pytest.fixture(scope="module")
def corpus():
  texts, labels = reports.synthetic_reports(jax.random.key(0), 300)
  texts[PROBE] = f"{texts[PROBE]} {UNIQUE}"
  return texts, labels


@pytest.fixture(scope="module")
def config():
  return reports.ClassifierConfig(num_steps=60)


def test_kfold_accuracy_on_synthetic_reports(corpus, config):
  texts, labels = corpus
  result = reports.cross_validate(texts, labels, key=jax.random.key(1), num_folds=5,
                                  num_repeats=1, config=config)
  print(f"k-fold accuracy on 300 synthetic reports: {result['mean_accuracy']:.4f}")
  assert result["fold_accuracies"].shape == (1, 5)
  assert result["mean_accuracy"] >= 0.95
  confusion = result["confusion_matrix"]
  assert confusion.shape == (2, 2) and confusion.sum() == 300
  np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels))
  np.testing.assert_allclose(result["per_class_accuracy"],
                             100 * np.diag(confusion) / confusion.sum(axis=1))
  np.testing.assert_allclose(result["repeat_accuracies"], np.trace(confusion) / 300)


def test_permuted_labels_give_chance_and_folds_do_not_leak(corpus, config):
  texts, labels = corpus
  permuted = np.random.default_rng(0).permutation(labels)
  result = reports.cross_validate(texts, permuted, key=jax.random.key(1), num_folds=5,
                                  num_repeats=2, config=config)
  print(f"k-fold accuracy with permuted labels: {result['mean_accuracy']:.4f}")
  assert abs(result["mean_accuracy"] - 0.5) <= 0.12
  assert result["confusion_matrix"].sum() == 600
  assert len(result["folds"]) == 10
  for fold in result["folds"]:
    test = set(fold["test_indices"].tolist())
    train_ngrams = set()
    for i in range(len(texts)):
      if i not in test:
        train_ngrams.update(reports.ngrams(reports.tokenize(texts[i])))
    assert set(fold["vocabulary"].ngrams) == train_ngrams
    assert (UNIQUE in fold["vocabulary"]) == (PROBE not in test)


def test_kfold_indices_partition():
  folds = reports.kfold_indices(23, 5, jax.random.key(0))
  assert len(folds) == 5 and sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
  np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(23))
  again = reports.kfold_indices(23, 5, jax.random.key(0))
  assert all(np.array_equal(a, b) for a, b in zip(folds, again))
  other = reports.kfold_indices(23, 5, jax.random.key(1))
  assert not all(np.array_equal(a, b) for a, b in zip(folds, other))
  assert not np.array_equal(np.concatenate(folds), np.arange(23))  # shuffled
  with pytest.raises(ValueError, match="num_folds"):
    reports.kfold_indices(3, 5, jax.random.key(0))


def newton_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
  """(w, b) minimising mean cross-entropy + 0.5 l2 |w|^2, by Newton's method in float64."""
  n, d = x.shape
  design = np.hstack([x, np.ones((n, 1))])
  penalty = np.diag([l2] * d + [0.0])
  theta = np.zeros(d + 1)
  for _ in range(30):
    p = 1 / (1 + np.exp(-design @ theta))
    gradient = design.T @ (p - y) / n + penalty @ theta
    hessian = (design.T * (p * (1 - p))) @ design / n + penalty
    theta = theta - np.linalg.solve(hessian, gradient)
  return theta


def test_logistic_regression_matches_newton_and_separates():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 3))
  y = (x @ np.array([2.0, -1.0, 0.5]) + 0.3 + 0.5 * rng.normal(size=40) > 0).astype(np.int32)
  params = reports.fit_logistic_regression(x, y, key=jax.random.key(3), scaling="none", l2=0.1,
                                           num_steps=50)
  theta = newton_logistic_regression(x, y, 0.1)
  reference = 1 / (1 + np.exp(-(x @ theta[:3] + theta[3])))
  np.testing.assert_allclose(np.asarray(reports.predict_proba(params, x)), reference, atol=1e-3)
  gradient = jax.grad(reports.logistic_loss)(params, jnp.asarray(x, jnp.float32),
                                             jnp.asarray(y), 0.1)
  assert float(jnp.abs(gradient.weights).max()) < 1e-4 and abs(float(gradient.bias)) < 1e-4

  # Same shapes and steps as above: the jitted L-BFGS fit is reused, not recompiled.
  separable = np.concatenate([rng.normal(size=(20, 3)) + 2, rng.normal(size=(20, 3)) - 2])
  classes = np.repeat([1, 0], 20)
  for optimizer, num_steps in (("lbfgs", 50), ("adam", 200)):
    fitted = reports.fit_logistic_regression(separable, classes, key=jax.random.key(0),
                                             scaling="none", l2=1e-3, optimizer=optimizer,
                                             num_steps=num_steps)
    predicted = np.asarray(reports.predict_proba(fitted, separable)) >= 0.5
    assert np.array_equal(predicted, classes == 1), optimizer
  with pytest.raises(ValueError, match="labels must be 0 or 1"):
    reports.fit_logistic_regression(separable, classes + 1, key=jax.random.key(0))


def test_annotate_labels_unlabelled_reports(corpus, config):
  texts, labels = corpus
  # 240 labelled reports, as the training folds above (the jitted fit is likely reused).
  predicted, probabilities = reports.annotate(texts[:240], labels[:240], texts[240:],
                                              key=jax.random.key(0), config=config)
  assert predicted.shape == probabilities.shape == (60,)
  assert np.all((probabilities >= 0) & (probabilities <= 1))
  np.testing.assert_array_equal(predicted, (probabilities >= 0.5).astype(np.int32))
  assert np.mean(predicted == labels[240:]) >= 0.95
  with pytest.raises(ValueError, match="both classes"):
    reports.annotate(texts[:10], np.zeros(10, np.int32), texts[10:], key=jax.random.key(0))


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def test_read_report_table_errors(tmp_path):
  good = write_csv(tmp_path / "good.csv", ["id", "report", "label"],
                   [["a", "No fracture.", "0"], ["b", "Displaced fracture.", " 1 "],
                    ["c", "Fracture of the radius.", ""]])
  table = reports.read_report_table(good, "report", "label", "id")
  np.testing.assert_array_equal(table.labels, [0, 1, -1])
  assert table.texts[2] == "Fracture of the radius." and table.fieldnames == ("id", "report",
                                                                              "label")
  with pytest.raises(ValueError, match=r"text_column='text'.*\['id', 'report', 'label'\]"):
    reports.read_report_table(good, "text", "label")
  with pytest.raises(ValueError, match="label_column='y'"):
    reports.read_report_table(good, "report", "y")
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    reports.read_report_table(str(tmp_path / "missing.csv"))
  bad = write_csv(tmp_path / "bad.csv", ["report", "label"], [["x", "0"], ["y", "2"]])
  with pytest.raises(ValueError, match=r"row 3 .*label='2'"):
    reports.read_report_table(bad)
  twice = write_csv(tmp_path / "twice.csv", ["id", "report", "label"],
                    [["a", "x", "0"], ["a", "y", "1"]])
  with pytest.raises(ValueError, match="repeats the ids"):
    reports.read_report_table(twice, id_column="id")
  with pytest.raises(ValueError, match="fewer than num_folds"):
    reports.cross_validate(["a b", "c d"], np.array([0, 1]), key=jax.random.key(0), num_folds=3)


def run_binary(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.annotate_reports", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_binary_end_to_end_on_synthetic_reports(tmp_path):
  workdir = tmp_path / "annotation"
  result = run_binary("--synthetic=120", "--num_folds=3", "--num_repeats=1",
                      f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("synthetic_reports.csv", "labelled.csv", "annotation_metrics.json",
               "confusion_matrix.md"):
    assert (workdir / name).stat().st_size > 0, name
  with open(workdir / "synthetic_reports.csv", newline="") as f:
    source = list(csv.DictReader(f))
  with open(workdir / "labelled.csv", newline="") as f:
    labelled = list(csv.DictReader(f))
  assert len(labelled) == len(source) == 120
  blank = [row["label"] == "" for row in source]
  assert sum(blank) == 42  # 35% of 120
  for was_blank, before, after in zip(blank, source, labelled):
    assert after["id"] == before["id"] and after["report"] == before["report"]
    if was_blank:
      assert after["label_source"] == "auto" and after["label"] in ("0", "1")
      assert 0.0 <= float(after["probability"]) <= 1.0
      assert (float(after["probability"]) >= 0.5) == (after["label"] == "1")
    else:
      assert after["label_source"] == "manual" and after["label"] == before["label"]
      assert after["probability"] == ""
  metrics = json.loads((workdir / "annotation_metrics.json").read_text())
  assert metrics["num_labelled"] == 78 and metrics["num_unlabelled"] == 42
  assert np.sum(metrics["kfold"]["confusion_matrix"]) == 78
  assert metrics["kfold"]["accuracy_mean"] >= 0.85 and metrics["vocabulary_size"] > 100
  assert metrics["synthetic_auto_accuracy"] >= 0.85
  assert "Actual: Fracture" in (workdir / "confusion_matrix.md").read_text()


def test_binary_names_a_missing_column(tmp_path):
  path = write_csv(tmp_path / "r.csv", ["report", "label"],
                   [["No fracture.", "0"], ["Displaced fracture.", "1"], ["Fracture.", ""]])
  result = run_binary(f"--reports={path}", "--text_column=findings", f"--workdir={tmp_path / 'w'}")
  assert result.returncode != 0
  assert "text_column='findings'" in result.stderr and "['report', 'label']" in result.stderr
