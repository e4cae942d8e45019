r"""The report of a training run: `<run>/report.html` from the files the run directory holds.

`write_run_report(run_dir)` reads what `train/loop.py: train_and_evaluate` wrote (config.json,
history.jsonl, metrics.json, predictions_test.npz, splits.json), draws the figures into
`<run>/report_figures/` and renders the training sections (run summary, test metrics with the
study-level / per-body-part tables, confusion matrix, ROC curves, training curves, class
balance), followed by every section a later step added with `add_section` (explain, scoring),
and last, when the run recorded them in `timings.json` (medxai_jax/observe/timing.py), the
wall and compilation seconds of each phase.
A file that is missing or unreadable is named in the report, and the sections that need it say
so; nothing raises for it. `experiments/train.py` calls it at the end of training; for an old
run or one still training:

  python -m medxai_jax.viz.run_report runs/my_run
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import zipfile
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from medxai_jax.observe import timing
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.viz import figures
from medxai_jax.viz import report

REPORT_NAME = "report.html"
FIGURE_DIR = "report_figures"
SECTIONS_DIR = "report_sections"
# The run directory's files, and what the report uses each one for.
RUN_FILES: dict[str, str] = {
    "config.json": "the model and dataset names",
    "history.jsonl": "training curves and the per-epoch table",
    "metrics.json": "test metrics and the confusion matrix",
    "predictions_test.npz": "ROC curves",
    "splits.json": "class balance",
}
# Metrics shown first (in this order) in metric tables; the others follow as they appear.
_METRIC_ORDER = ("num_examples", "accuracy", "roc_auc", "cohen_kappa", "f1", "precision",
                 "recall", "sensitivity", "specificity", "mcc", "loss")
_EPOCH_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc",
                  "learning_rate")
_SECTION_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """The contents of a run directory's files; None where a file is missing or unreadable."""

  run_dir: str
  config: dict[str, Any] | None = None
  history: list[dict[str, Any]] | None = None
  metrics: dict[str, Any] | None = None
  predictions: dict[str, np.ndarray] | None = None
  splits: dict[str, Any] | None = None
  problems: Mapping[str, str] = dataclasses.field(default_factory=dict)  # file -> why unused


# --- reading the run directory


def read_history(path: str) -> list[dict[str, Any]]:
  """The epoch records of a history.jsonl (blank lines skipped); a bad line names its number."""
  records = []
  with open(path) as file:
    for number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number} is not JSON: {error}") from None
  return records


def read_predictions(path: str) -> dict[str, np.ndarray]:
  """predictions_test.npz as arrays, checked: `labels` [N] integers, `probabilities` [N, K]."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {name: data[name] for name in data.files}
  for field in ("labels", "probabilities"):
    if field not in arrays:
      raise ValueError(f"{path} has no '{field}' array (it has {sorted(arrays)}).")
  labels, probabilities = arrays["labels"], arrays["probabilities"]
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: 'labels' must be integers [N]; got {labels.dtype} "
                     f"{labels.shape}.")
  if probabilities.ndim != 2 or len(probabilities) != len(labels):
    raise ValueError(f"{path}: 'probabilities' must be [N={len(labels)}, K]; got shape "
                     f"{probabilities.shape}.")
  if len(labels) and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
    raise ValueError(f"{path}: 'labels' span {labels.min()}..{labels.max()}, outside the "
                     f"{probabilities.shape[1]} probability columns.")
  return arrays


def _read_json(path: str) -> Any:
  with open(path) as file:
    return json.load(file)


_READERS = {"config.json": _read_json, "history.jsonl": read_history,
            "metrics.json": _read_json, "predictions_test.npz": read_predictions,
            "splits.json": _read_json}
_FIELDS = {"config.json": "config", "history.jsonl": "history", "metrics.json": "metrics",
           "predictions_test.npz": "predictions", "splits.json": "splits"}


def read_run_files(run_dir: str) -> RunFiles:
  """Every run file that exists and reads; the others are listed in `problems` with the reason."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
  contents, problems = {}, {}
  for name, reader in _READERS.items():
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
      problems[name] = "missing"
      continue
    try:
      contents[_FIELDS[name]] = reader(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
      problems[name] = f"unreadable ({error})"
  return RunFiles(run_dir, problems=problems, **contents)


def class_names(files: RunFiles) -> list[str] | None:
  """Class names from metrics.json, else splits.json, else '0'..'K-1' from the class count."""
  for source in (files.metrics, files.splits):
    if source and source.get("class_names"):
      return [str(name) for name in source["class_names"]]
  confusion = ((files.metrics or {}).get("test") or {}).get("confusion_matrix")
  if confusion:
    return [str(k) for k in range(len(confusion))]
  if files.predictions is not None:
    return [str(k) for k in range(files.predictions["probabilities"].shape[1])]
  return None


def _missing_line(files: RunFiles, name: str) -> str:
  """The sentence a section shows in place of what needs file `name`."""
  why = files.problems.get(name, "missing")
  return (f"{name} is {why} in this run directory, so there is no {RUN_FILES[name]} here "
          "(a run still training, or one written by an older version, lacks some files).")


# --- the training sections


def summary_section(files: RunFiles) -> report.Section:
  """What was trained, the selected epoch, and which run files are missing or unreadable."""
  paragraphs = [f"Run directory: {os.path.abspath(files.run_dir)}."]
  config, result = files.config or {}, files.metrics or {}
  model, dataset = config.get("model") or {}, config.get("dataset") or {}
  if config:
    paragraphs.append(f"Model {model.get('name', '?')} on dataset {dataset.get('name', '?')}"
                      f" (builder config {dataset.get('builder_config') or 'default'}).")
  if result:
    paragraphs.append(
        f"Epoch {result.get('selected_epoch')} of {result.get('epochs_run')} was selected by "
        f"validation {result.get('selection_metric')}"
        + (" (training stopped early)." if result.get("stopped_early") else ".")
        + (f" {result['num_parameters']:,} parameters." if "num_parameters" in result else "")
        + (f" Training took {result['train_wall_seconds']:.0f} s."
           if isinstance(result.get("train_wall_seconds"), (int, float)) else ""))
  names_in_metrics = result.get("class_names")
  names_in_splits = (files.splits or {}).get("class_names")
  if names_in_metrics and names_in_splits and list(names_in_metrics) != list(names_in_splits):
    paragraphs.append(f"Warning: metrics.json names the classes {names_in_metrics} but "
                      f"splits.json {names_in_splits}; the report uses metrics.json's.")
  for name, why in files.problems.items():
    paragraphs.append(f"Not used: {name} is {why} (needed for {RUN_FILES[name]}).")
  return report.Section("Run", paragraphs=paragraphs)


def metric_rows(tree: Mapping[str, Any], label: str) -> list[tuple[str, dict[str, Any]]]:
  """(row label, scalar metrics) of a metric dict and of every metric dict nested in it.

  A dict's non-dict values form its row (labelled by the path of keys, joined by ' / '); each
  dict value is read the same way, e.g. {'XR_ELBOW': {'image': {...}, 'study': {...}}}.
  """
  scalars = {key: value for key, value in tree.items() if not isinstance(value, Mapping)}
  rows = [(label, scalars)] if scalars else []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      rows += metric_rows(value, f"{label} / {key}" if label else str(key))
  return rows


def _cell(value: Any) -> Any:
  """A metric value as a table cell: lists (e.g. confusion matrices) as compact JSON."""
  if isinstance(value, (list, tuple)):
    return json.dumps(value, separators=(",", ":"))
  return value


def metric_table(tree: Mapping[str, Any], label: str, caption: str) -> report.Table:
  """Rows of `metric_rows`, one column per metric name ('-' where a row lacks the metric)."""
  rows = metric_rows(tree, label)
  names = [name for name in _METRIC_ORDER if any(name in r for _, r in rows)]
  for _, row in rows:
    names += [name for name in row if name not in names]
  return report.Table(["", *names],
                      [[row_label, *[_cell(row[n]) if n in row else "-" for n in names]]
                       for row_label, row in rows], caption=caption)


def metrics_section(files: RunFiles) -> report.Section:
  """Test metrics of the selected epoch beside its validation metrics, where each split comes
  from (splits.json's `provenance`, when the builder records it); study / body-part tables."""
  title = "Test metrics"
  if files.metrics is None:
    return report.Section(title, paragraphs=[_missing_line(files, "metrics.json")])
  test = files.metrics.get("test") or {}
  validation = files.metrics.get("validation") or {}
  names = [n for n in _METRIC_ORDER if n in test]
  names += [n for n, v in test.items()
            if n not in names and not isinstance(v, (list, tuple, Mapping))]
  rows = [[name, test[name], validation.get(f"val_{name}", "-")] for name in names]
  tables = [report.Table(
      ["metric", "test", f"validation (epoch {files.metrics.get('selected_epoch')})"], rows,
      caption="The selected epoch's metrics. n/a: null in metrics.json (not computable, e.g. "
              "ROC AUC on a split with one class); -: not recorded.")]
  paragraphs = []
  provenance = (files.splits or {}).get("provenance")
  if provenance:
    paragraphs.append("Where the splits come from (the dataset builder's record): " + "; ".join(
        f"{role}: {provenance[role]}" for role in ("train", "validation", "test")
        if role in provenance) + ".")
  for key, label, caption in (
      ("test_by_study", "studies", "Study level (test): the mean probability of a study's "
       "images is the study's prediction."),
      ("test_by_body_part", "", "Per body part (test).")):
    tree = files.metrics.get(key)
    if isinstance(tree, Mapping) and tree:
      tables.append(metric_table(tree, label, f"{caption} From metrics.json '{key}'."))
    elif tree is not None:
      paragraphs.append(f"metrics.json '{key}' is not a dict of metrics: {tree!r}.")
  return report.Section(title, paragraphs=paragraphs, tables=tables)


def confusion_section(files: RunFiles, figure_dir: str) -> report.Section:
  """The test confusion matrix as a table (class names) and a figure; absent classes named."""
  title = "Confusion matrix (test)"
  if files.metrics is None:
    return report.Section(title, paragraphs=[_missing_line(files, "metrics.json")])
  confusion = (files.metrics.get("test") or {}).get("confusion_matrix")
  if not confusion:
    return report.Section(title, paragraphs=["metrics.json has no test.confusion_matrix."])
  matrix = np.asarray(confusion, np.int64)
  names = class_names(files) or []
  if matrix.ndim != 2 or matrix.shape != (len(names), len(names)):
    return report.Section(title, paragraphs=[
        f"metrics.json test.confusion_matrix has shape {matrix.shape}, which does not match the "
        f"{len(names)} class names {names}."])
  header = ["true \\ predicted", *names, "total"]
  rows = [[name, *[int(c) for c in matrix[k]], int(matrix[k].sum())]
          for k, name in enumerate(names)]
  rows.append(["total", *[int(c) for c in matrix.sum(axis=0)], int(matrix.sum())])
  paragraphs = [f"Class {names[k]} is absent from the test split (no true examples)."
                for k in np.flatnonzero(matrix.sum(axis=1) == 0)]
  path = figures.plot_confusion_matrix(matrix, names,
                                       os.path.join(figure_dir, "confusion_matrix.png"))
  return report.Section(
      title, paragraphs=paragraphs,
      tables=[report.Table(header, rows, caption="Rows: true class; columns: predicted class.")],
      figures=[report.Figure(os.path.relpath(path, files.run_dir),
                             "Test confusion matrix: counts, shaded by the share of the true "
                             "class.")])


@dataclasses.dataclass(frozen=True)
class RocResult:
  """One ROC curve of the report: class `positive` against the others, or why there is none."""

  name: str
  positive: int
  num_positive: int
  num_negative: int
  fpr: np.ndarray | None = None
  tpr: np.ndarray | None = None
  auc: float | None = None
  reason: str = ""


def roc_curves(labels: np.ndarray, probabilities: np.ndarray, names: Sequence[str]
               ) -> list[RocResult]:
  """The ROC curves of test predictions, each with its AUC or the reason it has none.

  Two classes: one curve, the probability of class 1 against class 0. More: one-vs-rest per
  class. A curve needs positives and negatives; a class absent from the labels (or alone in
  them) gets none. Curves and AUCs are `train/metrics.py`'s roc_curve and roc_auc.
  """
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2 or probabilities.shape[1] != len(names):
    raise ValueError(f"probabilities of shape {probabilities.shape} for {len(names)} class "
                     f"names {list(names)}.")
  binary = len(names) == 2
  results = []
  for k in ([1] if binary else range(len(names))):
    name = f"{names[1]} vs {names[0]}" if binary else f"{names[k]} vs rest"
    positives = (labels == k).astype(np.int64)
    count = int(positives.sum())
    counts = dict(name=name, positive=k, num_positive=count, num_negative=len(labels) - count)
    if count == 0 or count == len(labels):
      absent = names[k] if count == 0 else (names[0] if binary else "every other class")
      results.append(RocResult(**counts, reason=f"no ROC curve: {absent} is absent from the "
                               "test split"))
      continue
    fpr, tpr, _ = metrics_lib.roc_curve(positives, probabilities[:, k])
    results.append(RocResult(**counts, fpr=fpr, tpr=tpr,
                             auc=metrics_lib.roc_auc(positives, probabilities[:, k])))
  return results


def roc_section(files: RunFiles, figure_dir: str) -> report.Section:
  """ROC curves of the test predictions (binary: one; multi-class: one-vs-rest), AUC table."""
  title = "ROC curves (test)"
  if files.predictions is None:
    return report.Section(title, paragraphs=[_missing_line(files, "predictions_test.npz")])
  labels = files.predictions["labels"]
  probabilities = files.predictions["probabilities"]
  names = class_names(files)
  if names is None or len(names) != probabilities.shape[1]:
    return report.Section(title, paragraphs=[
        f"predictions_test.npz has {probabilities.shape[1]} probability columns but the run "
        f"names {len(names or [])} classes {names}: no ROC curve."])
  results = roc_curves(labels, probabilities, names)
  paragraphs = [f"{r.name}: {r.reason}." for r in results if r.reason]
  reported = ((files.metrics or {}).get("test") or {}).get("roc_auc", "-")
  paragraphs.append(f"Test ROC AUC in metrics.json: {report.format_cell(reported)}"
                    + ("" if len(names) == 2 else " (one-vs-rest, macro over present classes)")
                    + f"; {len(labels)} test predictions.")
  rows = [[r.name, r.num_positive, r.num_negative, r.reason or r.auc] for r in results]
  table = report.Table(["curve", "positives", "negatives", "AUC"], rows,
                       caption="AUC of each curve (area under the ROC curve).")
  drawn = {r.name: (r.fpr, r.tpr, r.auc) for r in results if not r.reason}
  section_figures = []
  if drawn:
    path = figures.plot_roc_curves(drawn, os.path.join(figure_dir, "roc_curves.png"))
    section_figures.append(report.Figure(os.path.relpath(path, files.run_dir),
                                         "ROC curves of the selected model on the test split."))
  return report.Section(title, paragraphs=paragraphs, tables=[table], figures=section_figures)


def selected_epoch(files: RunFiles) -> int | None:
  """The selected epoch: metrics.json's, else the last history record marked selected."""
  if files.metrics and files.metrics.get("selected_epoch") is not None:
    return int(files.metrics["selected_epoch"])
  marked = [r["epoch"] for r in files.history or [] if r.get("selected")]
  return int(marked[-1]) if marked else None


def training_curves_section(files: RunFiles, figure_dir: str) -> report.Section:
  """Loss and accuracy per epoch (train, validation; selected epoch marked) and the epoch table."""
  title = "Training curves"
  if files.history is None:
    return report.Section(title, paragraphs=[_missing_line(files, "history.jsonl")])
  if not files.history:
    return report.Section(title, paragraphs=["history.jsonl holds no epoch yet."])
  chosen = selected_epoch(files)
  needed = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
  lacking = [(r.get("epoch", f"line {i + 1}"), [k for k in needed if k not in r])
             for i, r in enumerate(files.history) if any(k not in r for k in needed)]
  paragraphs = [f"Epoch {chosen} is selected." if chosen else "No epoch is selected yet."]
  section_figures = []
  if lacking:
    paragraphs.append("No curves: history.jsonl records lack fields: "
                      + "; ".join(f"epoch {e}: {', '.join(keys)}" for e, keys in lacking) + ".")
  else:
    path = figures.plot_training_curves(files.history,
                                        os.path.join(figure_dir, "training_curves.png"), chosen)
    section_figures.append(report.Figure(
        os.path.relpath(path, files.run_dir),
        "Loss (left) and accuracy (right) per epoch; dashed line: the selected epoch."))
  rows = [[r.get("epoch", "-"), *[r.get(k, "-") for k in _EPOCH_COLUMNS],
           "selected" if r.get("epoch") == chosen else ""] for r in files.history]
  table = report.Table(["epoch", *_EPOCH_COLUMNS, ""], rows, caption="history.jsonl per epoch.")
  return report.Section(title, paragraphs=paragraphs, tables=[table], figures=section_figures)


def class_balance_section(files: RunFiles) -> report.Section:
  """Examples per class in each split (counts and shares) from splits.json."""
  title = "Class balance"
  if files.splits is None:
    return report.Section(title, paragraphs=[_missing_line(files, "splits.json")])
  names = class_names(files) or []
  counts = files.splits.get("counts")
  if not isinstance(counts, Mapping) or not counts:
    return report.Section(title, paragraphs=["splits.json has no 'counts' per split."])
  paragraphs, count_rows, share_rows = [], [], []
  for split, values in counts.items():
    if not isinstance(values, list) or len(values) != len(names):
      paragraphs.append(f"splits.json counts['{split}'] is {values!r}, not one count per class "
                        f"of {names}.")
      continue
    total = int(sum(values))
    count_rows.append([split, *[int(v) for v in values], total])
    share_rows.append([split, *[f"{100 * v / total:.1f}%" if total else "-" for v in values]])
    paragraphs += [f"The {split} split has no example of class {names[k]}."
                   for k, v in enumerate(values) if v == 0]
  tables = [report.Table(["split", *names, "total"], count_rows, caption="Examples per class."),
            report.Table(["share of the split", *names], share_rows,
                         caption="Share of each class in each split.")]
  return report.Section(title, paragraphs=paragraphs, tables=tables)


def training_sections(run_dir: str) -> list[report.Section]:
  """The sections made from the run files (figures written into `<run>/report_figures/`)."""
  files = read_run_files(run_dir)
  for name, why in files.problems.items():
    logging.warning("Report of %s: %s is %s.", run_dir, name, why)
  figure_dir = os.path.join(run_dir, FIGURE_DIR)
  os.makedirs(figure_dir, exist_ok=True)
  return [summary_section(files), metrics_section(files), confusion_section(files, figure_dir),
          roc_section(files, figure_dir), training_curves_section(files, figure_dir),
          class_balance_section(files)]


# --- sections added by later steps


def section_to_json(section: report.Section, run_dir: str) -> dict[str, Any]:
  """A section as JSON (figure paths relative to `run_dir`); a missing figure raises."""
  figure_list = []
  for figure in section.figures:
    path = os.path.join(run_dir, figure.path)  # an absolute path stays as it is
    if not os.path.exists(path):
      raise FileNotFoundError(f"Section '{section.title}': figure {figure.path} not found "
                              f"(figure paths are relative to the run directory {run_dir}).")
    figure_list.append({"path": os.path.relpath(path, run_dir), "caption": figure.caption})
  return {"title": section.title, "paragraphs": [str(p) for p in section.paragraphs],
          "tables": [{"header": [str(h) for h in t.header],
                      "rows": [[_json_cell(c) for c in row] for row in t.rows],
                      "caption": t.caption} for t in section.tables],
          "figures": figure_list}


def _json_cell(value: Any) -> Any:
  """A table cell as strict JSON: numpy scalars to Python, non-finite floats to text."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def section_from_json(data: Mapping[str, Any]) -> report.Section:
  """Inverse of `section_to_json`."""
  return report.Section(
      data["title"], paragraphs=list(data.get("paragraphs", ())),
      tables=[report.Table(t["header"], t["rows"], t.get("caption", ""))
              for t in data.get("tables", ())],
      figures=[report.Figure(f["path"], f.get("caption", "")) for f in data.get("figures", ())])


def _section_path(run_dir: str, key: str) -> str:
  if not _SECTION_KEY.match(key):
    raise ValueError(f"Section key {key!r} must be letters, digits, '_' or '-'.")
  return os.path.join(run_dir, SECTIONS_DIR, f"{key}.json")


def _read_added(run_dir: str) -> list[dict[str, Any]]:
  """The stored added sections, in the order they were first added."""
  folder = os.path.join(run_dir, SECTIONS_DIR)
  if not os.path.isdir(folder):
    return []
  stored = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      path, key = os.path.join(folder, name), name[:-len(".json")]
      try:
        entry = _read_json(path)
        if not isinstance(entry, dict) or "title" not in (entry.get("section") or {}):
          raise ValueError("no 'section' with a 'title'")
        stored.append(dict(entry, key=key))
      except (OSError, ValueError) as error:
        stored.append({"key": key, "order": float("inf"),
                       "section": {"title": f"Section {key}",
                                   "paragraphs": [f"{path} is unreadable ({error})."]}})
  return sorted(stored, key=lambda entry: entry.get("order", float("inf")))


def _with_missing_figures_noted(section: report.Section, run_dir: str) -> report.Section:
  """The section without figures that no longer exist, a line naming each one instead."""
  kept = [f for f in section.figures if os.path.exists(os.path.join(run_dir, f.path))]
  gone = [f"Figure {f.path} is missing (removed after this section was added)."
          for f in section.figures if f not in kept]
  return dataclasses.replace(section, paragraphs=[*section.paragraphs, *gone], figures=kept)


def added_sections(run_dir: str) -> list[report.Section]:
  """The sections stored by `add_section`, in the order they were first added."""
  return [_with_missing_figures_noted(section_from_json(entry["section"]), run_dir)
          for entry in _read_added(run_dir)]


def add_section(run_dir: str, key: str, section: report.Section,
                *, render: bool = True) -> str:
  """Stores `section` as `<run>/report_sections/<key>.json` and re-renders the report.

  Figure paths are relative to `run_dir` (or absolute). A section added again under the same
  key replaces the old one in its place. Returns the report's path (with `render=False` the
  section is stored and the report is not written yet: add several, then `write_run_report`).
  """
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
  path = _section_path(run_dir, key)
  stored = {entry["key"]: entry for entry in _read_added(run_dir)}
  orders = [e["order"] for e in stored.values() if isinstance(e.get("order"), int)]
  order = stored[key]["order"] if isinstance(stored.get(key, {}).get("order"), int) else \
      max(orders, default=0) + 1
  text = json.dumps({"order": order, "section": section_to_json(section, run_dir)}, indent=1,
                    allow_nan=False)  # before opening the file: a bad section leaves no trace
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as file:
    file.write(text)
  if not render:
    return os.path.join(run_dir, REPORT_NAME)
  return write_run_report(run_dir)


def timing_section(run_dir: str) -> report.Section | None:
  """Each recorded phase's wall and compilation seconds (`timings.json`); None when the run
  recorded none, a paragraph naming the file when it is unreadable."""
  title = "Timing"
  try:
    phases = timing.read_timings(run_dir)
  except (OSError, ValueError) as error:
    return report.Section(title, paragraphs=[
        f"{os.path.join(run_dir, timing.TIMINGS_FILE)} is unreadable ({error})."])
  if not phases:
    return None
  return report.Section(title, paragraphs=[
      "Wall time of each phase, as last run (a binary's phase, e.g. demo/train, includes the "
      "phases it ran, e.g. train/steps), and the part of it spent compiling: for training, each compiled step's first call minus a steady step; for "
      "validation, the first evaluation minus the mean of the later ones; for jitted "
      "methods, their first call minus their second. '-': not measured."],
      tables=[report.Table(["phase", "wall seconds", "compile seconds",
                            "seconds without compilation"], timing.phase_rows(phases),
                           caption=f"From {timing.TIMINGS_FILE}.")])


def write_run_report(run_dir: str) -> str:
  """Writes `<run>/report.html`: the training sections, every added section, then the timing
  section (when timings were recorded); its path."""
  timings = timing_section(run_dir)
  sections = [*training_sections(run_dir), *added_sections(run_dir),
              *([timings] if timings is not None else [])]
  title = f"Run report: {os.path.basename(os.path.abspath(run_dir))}"
  return report.write_report(os.path.join(run_dir, REPORT_NAME), title, sections)


# --- explain's section


def _explained_methods(summary: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
  """Methods that produced maps, and the skip reason of each that did not."""
  info = summary.get("methods") or {}
  skipped = {m: str(i["skipped"]) for m, i in info.items() if "skipped" in i}
  return [m for m in info if m not in skipped], skipped


def explained_inputs(source: Sequence[Mapping[str, Any]], indices: Sequence[int],
                     mask_key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """The stored images (and `mask_key` masks, when given and present) of records `indices` of a
  split's random-access source, for `explanation_section`."""
  if not len(indices):
    raise ValueError("explained_inputs needs at least one index.")
  records = []
  for index in indices:
    if not 0 <= int(index) < len(source):
      raise ValueError(f"Index {index} is outside the split's {len(source)} records.")
    records.append(source[int(index)])
  images = np.stack([np.asarray(record["image"]) for record in records])
  if mask_key is None or mask_key not in records[0]:
    return images, None
  return images, np.stack([np.asarray(record[mask_key]).squeeze(-1)
                           if np.ndim(record[mask_key]) == 3 else np.asarray(record[mask_key])
                           for record in records])


def explanation_section(explain_workdir: str, summary: Mapping[str, Any], run_dir: str, *,
                        images: np.ndarray | None = None, masks: np.ndarray | None = None,
                        low_cut: float = 0.2, alpha_max: float = 0.6) -> report.Section:
  """The section of an explain run (`explain.explain_run`'s summary and workdir files).

  With the explained input images (`images` [N,H,W(,C)], in `summary['indices']` order, and
  optional localisation `masks`) it draws every method's map over the image
  (`figures.plot_overlay_grid`, written to `<explain_workdir>/overlays.png`); the gray |map|
  grid `attributions.png` follows. Figure paths are relative to `run_dir`.
  """
  indices = [int(i) for i in summary.get("indices", [])]
  targets = summary.get("targets", [])
  methods, skipped = _explained_methods(summary)
  names = class_names(read_run_files(run_dir)) if os.path.isdir(run_dir) else None
  target_names = [names[t] if names and 0 <= t < len(names) else str(t) for t in targets]
  options = summary.get("options") or {}
  paragraphs = [
      f"{len(indices)} images of the {summary.get('split', '?')} split (indices "
      f"{indices}), each explained for its label ({', '.join(target_names)}), by the selected "
      f"model of {summary.get('checkpoint', run_dir)}. Path methods: "
      f"{options.get('num_steps', options.get('steps'))} steps; SmoothGrad: "
      f"{options.get('num_samples', options.get('samples'))} samples."]
  paragraphs += [f"{m} skipped: {why}" for m, why in skipped.items()]
  maps = {}
  for method in methods:
    path = os.path.join(explain_workdir, f"maps_{method}.npy")
    if os.path.exists(path):
      maps[method] = np.load(path, allow_pickle=False)
    else:
      paragraphs.append(f"{method}: {path} is missing, so it is not drawn.")
  rows = [[m, (summary["methods"][m] or {}).get("seconds_per_image", "-"),
           (summary["methods"][m] or {}).get("compile_seconds", "-")] for m in methods]
  tables = [report.Table(["method", "seconds per image", "compile seconds"], rows,
                         caption="Timings (compile: n/a for methods with a host-side part).")]
  section_figures = []
  if images is not None and maps:
    if len(images) != len(indices):
      raise ValueError(f"{len(images)} images given for the {len(indices)} explained indices.")
    titles = [f"#{i} ({name})" for i, name in zip(indices, target_names)]
    overlay = figures.plot_overlay_grid(images, maps, os.path.join(explain_workdir,
                                                                   "overlays.png"),
                                        titles=titles, masks=masks, low_cut=low_cut,
                                        alpha_max=alpha_max)
    section_figures.append(report.Figure(
        os.path.relpath(overlay, run_dir),
        f"Each method's map over the input ('jet'): |map| normalised per image by its 99th "
        f"percentile, fully transparent below {low_cut:g}, opacity rising to {alpha_max:g} at "
        "the maximum." + (" Red outline: the localisation mask." if masks is not None
                          and np.any(masks) else "")))
  elif maps:
    paragraphs.append("No input images were given to the report, so the maps are not drawn "
                      "over them.")
  grid = os.path.join(explain_workdir, str(summary.get("figure", "attributions.png")))
  if os.path.exists(grid):
    section_figures.append(report.Figure(os.path.relpath(grid, run_dir),
                                         "Each method's |map| in gray, clipped at its 99th "
                                         "percentile."))
  return report.Section("Explanations", paragraphs=paragraphs, tables=tables,
                        figures=section_figures)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m medxai_jax.viz.run_report RUN_DIR")
  print(write_run_report(sys.argv[1]))
