r"""Labels the unlabelled rows of a radiology report CSV (001's automated annotation, 3.3 / 4.5).

  python -m experiments.annotate_reports --reports=reports.csv --workdir=runs/annotation \
      --text_column=report --label_column=label --num_folds=5 --num_repeats=5
  python -m experiments.annotate_reports --synthetic=1000 --workdir=runs/annotation

The CSV holds one report per row: free text in --text_column and, in --label_column, 0 (no
fracture), 1 (fracture) or nothing (unlabelled). An n-gram (uni- to trigram) count logistic
regression (`medxai_jax.annotation.reports`) is cross-validated on the labelled rows
(--num_repeats shuffled --num_folds-fold splits, each fold's vocabulary fitted on its training
part only), then fitted on every labelled row to label the others. --synthetic=N first writes N
synthetic wrist reports with ~35% of the labels blanked (as in 001) to
WORKDIR/synthetic_reports.csv (its `hidden_label` column keeps the truth) and uses them.

Writes into --workdir: labelled.csv (every row and column of the input, the label column filled
in for unlabelled rows, plus `label_source` = manual | auto and `probability` = p(fracture) of
auto rows), annotation_metrics.json (k-fold accuracy, confusion matrix, per-class accuracy,
vocabulary size, row counts) and confusion_matrix.md (001's Table 3).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments import cli
from medxai_jax import logs
from medxai_jax.annotation import reports
from medxai_jax.train import workdir as workdir_lib

_REPORTS = flags.DEFINE_string("reports", "", "Report CSV (or use --synthetic).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_TEXT_COLUMN = flags.DEFINE_string("text_column", "report", "Column of the report text.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "label",
                                    "Column of the labels: 0, 1 or empty (unlabelled).")
_ID_COLUMN = flags.DEFINE_string("id_column", "", "Optional column of unique row ids.")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 5, "Folds of the cross-validation.")
_NUM_REPEATS = flags.DEFINE_integer("num_repeats", 5, "Shuffled repeats of the k-fold split.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the splits, initialisations and --synthetic.")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 0,
                                  "Write and use this many synthetic reports (0: use --reports).")
_MAX_NGRAM = flags.DEFINE_integer("max_ngram", 3, "Longest n-gram (001: 3, trigrams).")
_MIN_COUNT = flags.DEFINE_integer("min_count", 1, "Keep n-grams seen at least this often.")
_SCALING = flags.DEFINE_enum("scaling", "log1p", list(reports.SCALINGS),
                             "Features from counts: log1p, none (raw counts) or tf.")
_L2 = flags.DEFINE_float("l2", 1e-3, "L2 penalty 0.5 * l2 * |w|^2 on the mean loss.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "L-BFGS steps.")
flags.mark_flags_as_required(["workdir"])

SYNTHETIC_BLANK_FRACTION = 0.35  # 001: the unlabelled reports are ~35% of the data set
OUTPUT_COLUMNS = ("label_source", "probability")


def write_synthetic_csv(path: str, num_reports: int, key: jax.Array,
                        blank_fraction: float = SYNTHETIC_BLANK_FRACTION) -> str:
  """Writes synthetic reports (columns id, report, label, hidden_label) with labels blanked."""
  report_key, blank_key = jax.random.split(key)
  texts, labels = reports.synthetic_reports(report_key, num_reports)
  blank = reports.unlabelled_mask(blank_key, num_reports, blank_fraction)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "report", "label", "hidden_label"])
    for index, (text, label, hidden) in enumerate(zip(texts, labels, blank)):
      writer.writerow([f"r{index:05d}", text, "" if hidden else int(label), int(label)])
  return path


def confusion_markdown(confusion: np.ndarray, per_class: np.ndarray, summary: str) -> str:
  """001's Table 3: the pooled k-fold confusion matrix (fracture first) with per-class accuracy."""
  order = (1, 0)  # fracture, no fracture
  names = {1: "Fracture", 0: "No fracture"}
  lines = ["| | Predicted: Fracture | Predicted: No fracture | Per-class accuracy (%) |",
           "|---|---:|---:|---:|"]
  for true in order:
    cells = " | ".join(str(int(confusion[true, predicted])) for predicted in order)
    lines.append(f"| Actual: {names[true]} | {cells} | {per_class[true]:.1f} |")
  return "\n".join(["# Automated annotation: k-fold confusion matrix", "", summary, "", *lines,
                    ""])


def annotate_table(table: reports.ReportTable, workdir: str, *, label_column: str,
                   num_folds: int, num_repeats: int, key: jax.Array,
                   config: reports.ClassifierConfig) -> dict[str, Any]:
  """Cross-validates on the labelled rows, labels the rest and writes the three outputs."""
  clash = [column for column in OUTPUT_COLUMNS if column in table.fieldnames]
  if clash:
    raise ValueError(f"The report CSV already has the output column(s) {clash}; rename them.")
  labelled = table.labelled
  texts = np.array(table.texts, dtype=object)
  labels = table.labels[labelled]
  if labelled.sum() < num_folds:
    raise ValueError(f"Only {int(labelled.sum())} labelled rows (column {label_column!r}) for "
                     f"--num_folds={num_folds}: need at least one per fold.")
  if len(set(labels.tolist())) < 2:
    raise ValueError(f"The labelled rows (column {label_column!r}) hold one class only "
                     f"({sorted(set(labels.tolist()))}); both 0 and 1 are needed.")
  cv_key, fit_key = jax.random.split(key)
  start = time.time()
  cv = reports.cross_validate(list(texts[labelled]), labels, key=cv_key, num_folds=num_folds,
                              num_repeats=num_repeats, config=config)
  logging.info("%d-fold x %d accuracy %.4f +- %.4f (%.0f s).", num_folds, num_repeats,
               cv["mean_accuracy"], cv["std_accuracy"], time.time() - start)
  predicted, probabilities = reports.annotate(list(texts[labelled]), labels,
                                              list(texts[~labelled]), key=fit_key, config=config)

  auto_rows = np.flatnonzero(~labelled)
  auto = {int(row): (int(p), float(q)) for row, p, q in zip(auto_rows, predicted, probabilities)}
  with open(os.path.join(workdir, "labelled.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=[*table.fieldnames, *OUTPUT_COLUMNS])
    writer.writeheader()
    for index, row in enumerate(table.rows):
      out = {**row, "label_source": "manual", "probability": ""}
      if index in auto:
        out.update({label_column: auto[index][0], "label_source": "auto",
                    "probability": f"{auto[index][1]:.6f}"})
      writer.writerow(out)

  vocabulary = reports.fit_vocabulary(list(texts[labelled]), config.ngram_range,
                                      config.min_count)
  per_class = cv["per_class_accuracy"]
  result = {
      "num_rows": len(table.rows), "num_labelled": int(labelled.sum()),
      "num_unlabelled": int((~labelled).sum()),
      "num_labelled_per_class": {name: int((labels == c).sum())
                                 for c, name in enumerate(reports.CLASS_NAMES)},
      "num_auto_per_class": {name: int((predicted == c).sum())
                             for c, name in enumerate(reports.CLASS_NAMES)},
      "vocabulary_size": vocabulary.size, "classifier": dataclasses.asdict(config),
      "kfold": {
          "num_folds": num_folds, "num_repeats": num_repeats,
          "accuracy_mean": cv["mean_accuracy"], "accuracy_std": cv["std_accuracy"],
          "fold_accuracies": cv["fold_accuracies"].tolist(),
          "repeat_accuracies": cv["repeat_accuracies"].tolist(),
          "vocabulary_sizes": cv["vocabulary_sizes"].tolist(),
          "confusion_matrix": cv["confusion_matrix"].tolist(),
          "confusion_matrix_layout": "rows = true class, columns = predicted class, "
                                     "order (no_fracture, fracture), pooled over all folds "
                                     "of all repeats",
          "per_class_accuracy_percent": {name: float(per_class[c])
                                         for c, name in enumerate(reports.CLASS_NAMES)},
      },
  }
  if "hidden_label" in table.fieldnames and auto_rows.size:
    hidden = np.array([int(table.rows[row]["hidden_label"]) for row in auto_rows])
    result["synthetic_auto_accuracy"] = float(np.mean(hidden == predicted))
  with open(os.path.join(workdir, "annotation_metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  summary = (f"Logistic regression on uni- to {config.ngram_range[1]}-gram counts: accuracy "
             f"{100 * cv['mean_accuracy']:.1f}% +- {100 * cv['std_accuracy']:.1f}% over "
             f"{num_folds} folds x {num_repeats} repeats of {int(labelled.sum())} labelled "
             f"reports (counts pooled over all folds and repeats).")
  with open(os.path.join(workdir, "confusion_matrix.md"), "w") as f:
    f.write(confusion_markdown(cv["confusion_matrix"], per_class, summary))
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  workdir = workdir_lib.prepare_workdir(_WORKDIR.value)
  data_key, run_key = jax.random.split(jax.random.key(_SEED.value))
  path = _REPORTS.value
  if _SYNTHETIC.value > 0:
    if path:
      raise app.UsageError("Give either --reports or --synthetic, not both.")
    path = write_synthetic_csv(os.path.join(workdir, "synthetic_reports.csv"), _SYNTHETIC.value,
                               data_key)
  elif not path:
    raise app.UsageError("--reports (a CSV) or --synthetic=N is required.")
  table = reports.read_report_table(path, _TEXT_COLUMN.value, _LABEL_COLUMN.value,
                                    _ID_COLUMN.value)
  config = reports.ClassifierConfig(ngram_range=(1, _MAX_NGRAM.value),
                                    min_count=_MIN_COUNT.value, scaling=_SCALING.value,
                                    l2=_L2.value, num_steps=_NUM_STEPS.value)
  result = annotate_table(table, workdir, label_column=_LABEL_COLUMN.value,
                          num_folds=_NUM_FOLDS.value, num_repeats=_NUM_REPEATS.value,
                          key=run_key, config=config)
  with open(os.path.join(workdir, "confusion_matrix.md")) as f:
    print(f.read())
  print(json.dumps({key: result[key] for key in ("num_labelled", "num_unlabelled",
                                                  "vocabulary_size", "num_auto_per_class")}))


if __name__ == "__main__":
  cli.run(main)
