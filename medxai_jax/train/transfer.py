r"""Progressive transfer learning (001's Table 2, figures 10-11): config algebra and protocol.

Four arms, each a chain of `loop.train_and_evaluate` stages linked by `init_from` (arrays with
the same path and shape are loaded; a head whose number of outputs changes keeps its fresh init):

  WristNet           random               -> target           WORKDIR/wristnet/target
  RadiNetRand_wrist  random   -> source   -> target           WORKDIR/radinetrand_wrist/{source,target}
  ImageNet_wrist     ImageNet             -> target           WORKDIR/imagenet_wrist/target
  RadiNet_wrist      ImageNet -> source   -> target           WORKDIR/radinet_wrist/{source,target}

A config's top level is the target stage, `config.transfer.source` what the source stage
changes (configs/progressive_transfer.py). `run_protocol` runs or reuses every selected arm
(a stage with metrics.json is finished; one trained with a different config is an error) and
returns one row per arm; `write_outputs` writes comparison.csv/.md, figures 10-11 and
report.html. The binary is experiments/progressive_transfer.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from medxai_jax import runs
from medxai_jax.data import pipeline
from medxai_jax.models import registry
from medxai_jax.observe import progress
from medxai_jax.train import checkpoint
from medxai_jax.train import freeze
from medxai_jax.train import loop
from medxai_jax.train import schema
from medxai_jax.viz import report
from medxai_jax.viz import run_report
from medxai_jax.viz import transfer_figures

TRANSFER_FIELDS = frozenset({"source", "imagenet_init", "arms"})
METRICS = ("accuracy", "f1", "cohen_kappa", "roc_auc")
METRIC_TITLES = ("accuracy", "F1", "Cohen's kappa", "ROC AUC")
# Fields that may change between invocations without invalidating a stage's results.
_HARMLESS_FIELDS = frozenset({"log_every_steps", "profile_steps"})
# Sections whose fields may change likewise (what is watched, not what is trained).
_HARMLESS_SECTIONS = ("summaries.",)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One row of 001's Table 2: where the weights come from and whether a source stage runs."""

  name: str
  title: str
  from_imagenet: bool
  via_source: bool
  source_title: str = ""  # the intermediate network's name in 001

  @property
  def chain(self) -> str:
    """Initialisation chain, e.g. 'ImageNet -> source -> target'."""
    steps = ["ImageNet" if self.from_imagenet else "random"]
    return " -> ".join(steps + (["source"] if self.via_source else []) + ["target"])


ARMS: tuple[Arm, ...] = (
    Arm("wristnet", "WristNet", from_imagenet=False, via_source=False),
    Arm("radinetrand_wrist", "RadiNetRand_wrist", from_imagenet=False, via_source=True,
        source_title="RadiNetRand"),
    Arm("imagenet_wrist", "ImageNet_wrist", from_imagenet=True, via_source=False),
    Arm("radinet_wrist", "RadiNet_wrist", from_imagenet=True, via_source=True,
        source_title="RadiNet"),
)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of an arm: its role, work directory and full training config."""

  arm: str
  role: str  # 'source' | 'target'
  workdir: str
  config: ml_collections.ConfigDict


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked deep copy."""
  return ml_collections.ConfigDict(config.to_dict())


def split_config(config: ml_collections.ConfigDict
                 ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(target-stage training config, `config.transfer`), both validated."""
  if "transfer" not in config:
    raise ValueError("config.transfer is missing: use configs/progressive_transfer.py (its "
                     "top level is the target stage, config.transfer the experiment).")
  transfer = _copy(config.transfer)
  unknown = sorted(set(transfer.keys()) - TRANSFER_FIELDS)
  missing = sorted(TRANSFER_FIELDS - set(transfer.keys()))
  if unknown or missing:
    raise ValueError(f"config.transfer has unknown field(s) {unknown} / lacks {missing}; its "
                     f"fields are {sorted(TRANSFER_FIELDS)}.")
  target = _copy(config)
  del target["transfer"]
  if target.init_from:
    raise ValueError(f"config.init_from={target.init_from!r}: each stage's init_from is set by "
                     "this binary; give ImageNet weights as config.transfer.imagenet_init.")
  schema.check_config(target)
  return target, transfer


def apply_overrides(base: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "config.transfer.source") -> ml_collections.ConfigDict:
  """A copy of `base` with the (nested) fields of `overrides` replaced; unknown fields raise."""
  merged = _copy(base)

  def merge(node: ml_collections.ConfigDict, patch: Mapping[str, Any], path: str) -> None:
    for key, value in patch.items():
      if key not in node:
        raise ValueError(f"{path}.{key} is not a field of the training config (the top level "
                         f"of the config); fields there: {sorted(node.keys())}.")
      if key in ("init_from", "transfer") and path == where:
        raise ValueError(f"{path}.{key} cannot be overridden per stage.")
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(
          value, (Mapping, ml_collections.ConfigDict)):
        merge(node[key], value, f"{path}.{key}")
        continue
      try:
        node[key] = value
      except TypeError as error:
        raise ValueError(f"{path}.{key}={value!r} does not fit the training config's field "
                         f"({error}).") from error

  merge(merged, overrides, where)
  return merged


def stage_config(base: ml_collections.ConfigDict, init_from: str) -> ml_collections.ConfigDict:
  """`base` starting from `init_from` ('' = random); the head-only warm-up (001: 'if any')
  only applies to a stage that starts from weights."""
  config = _copy(base)
  config.init_from = init_from
  if not init_from:
    config.train.head_only_epochs = 0
  schema.check_config(config)
  return config


def selected_arms(spec: str) -> tuple[Arm, ...]:
  """The arms named in a comma-separated `config.transfer.arms` (in Table 2's order)."""
  names = [name.strip() for name in spec.split(",") if name.strip()]
  known = {arm.name for arm in ARMS}
  unknown = [name for name in names if name not in known]
  if unknown or not names:
    raise ValueError(f"config.transfer.arms={spec!r}: unknown {unknown}; choose from "
                     f"{[arm.name for arm in ARMS]}.")
  return tuple(arm for arm in ARMS if arm.name in names)


def plan_arm(arm: Arm, target: ml_collections.ConfigDict, source: ml_collections.ConfigDict,
             imagenet_init: str, workdir: str) -> list[Stage]:
  """The stages of one arm, in order, each with its work directory and init_from."""
  arm_dir = os.path.join(workdir, arm.name)
  start = os.path.abspath(os.path.expanduser(imagenet_init)) if arm.from_imagenet else ""
  stages = []
  if arm.via_source:
    source_dir = os.path.join(arm_dir, "source")
    stages.append(Stage(arm.name, "source", source_dir, stage_config(source, start)))
    start = source_dir
  stages.append(Stage(arm.name, "target", os.path.join(arm_dir, "target"),
                      stage_config(target, start)))
  return stages


def check_imagenet_weights(model_config: Mapping[str, Any], directory: str) -> dict[str, Any]:
  """Metadata of an ImageNet port; raises unless it holds every backbone array of the model."""
  if not directory:
    raise ValueError("config.transfer.imagenet_init is empty.")
  resolved = runs.resolve_init_from(directory)
  model = registry.build_model(model_config)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  head = {tuple(path) for path in freeze.head_layers(model)}
  pretrained, metadata = checkpoint.load_variables(resolved)
  problems = []
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
      names = tuple(key.key for key in path)
      if names[:-1] in head or any(names[:len(h)] == h for h in head):
        continue
      node: Any = pretrained.get(collection, {})
      for name in names:
        node = node.get(name) if isinstance(node, Mapping) else None
      if node is None or tuple(np.shape(node)) != tuple(leaf.shape):
        found = "missing" if node is None else f"shape {tuple(np.shape(node))}"
        problems.append(f"{collection}/{'/'.join(names)} {tuple(leaf.shape)}: {found}")
  if problems:
    raise ValueError(
        f"config.transfer.imagenet_init={directory!r} does not hold the backbone of config.model "
        f"({dict(model_config)}): {len(problems)} array(s) missing or mis-shaped, e.g. "
        f"{problems[:4]}. Port weights of the same architecture (experiments/port_weights.py, "
        "e.g. --arch=densenet169 for configs/progressive_transfer.py:mura).")
  return metadata


def stage_progress(stage: Stage) -> str:
  """'finished' (metrics.json), 'started' (at least one epoch in history) or 'new'."""
  if os.path.exists(os.path.join(stage.workdir, "metrics.json")):
    return "finished"
  history = os.path.join(stage.workdir, "history.jsonl")
  if os.path.exists(history) and os.path.getsize(history) > 0:
    return "started"
  return "new"


def check_stage_matches(stage: Stage) -> None:
  """Raises if the stage directory holds training done with a different value of a field."""
  if stage_progress(stage) == "new":
    return
  path = os.path.join(stage.workdir, runs.CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{stage.workdir} holds training results but no config.json; delete it or "
                     "use another --workdir.")
  stored = runs.flatten_config(runs.read_json(path))
  wanted = runs.flatten_config(json.loads(stage.config.to_json_best_effort()))
  # Fields only one side has were added or removed by a code change, not by the user.
  changed = sorted(key for key in set(stored) & set(wanted)
                   if key not in _HARMLESS_FIELDS and not key.startswith(_HARMLESS_SECTIONS)
                   and stored[key] != wanted[key])
  if changed:
    details = [f"{key}: {stored.get(key)!r} -> {wanted.get(key)!r}" for key in changed[:6]]
    raise ValueError(f"{stage.workdir} was trained with a different config ({details}); delete "
                     "that directory to retrain it, or use another --workdir.")


def run_stage(stage: Stage) -> tuple[dict[str, Any], bool]:
  """(metrics.json content, whether it trained now); a finished stage is read, not re-run."""
  check_stage_matches(stage)
  if stage_progress(stage) == "finished":
    logging.info("%s %s stage is finished in %s; reusing it.", stage.arm, stage.role,
                 stage.workdir)
    return runs.read_json(os.path.join(stage.workdir, runs.METRICS_FILE)), False
  os.makedirs(os.path.dirname(stage.workdir), exist_ok=True)
  logging.info("Training %s %s stage in %s (init_from %r).", stage.arm, stage.role,
               stage.workdir, stage.config.init_from or "random")
  return loop.train_and_evaluate(stage.config, stage.workdir), True


def _skipped_row(arm: Arm, note: str) -> dict[str, Any]:
  """A table row for an arm that did not run."""
  return {"arm": arm.title, "initialisation": arm.chain, "status": "skipped", "note": note,
          **{metric: math.nan for metric in METRICS}, "selected_epoch": "", "epochs_run": "",
          "source_test_accuracy": math.nan, "train_seconds": math.nan}


def run_protocol(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs (or reuses) every selected arm; one row per arm of Table 2, in its order."""
  target, transfer = split_config(config)
  source = apply_overrides(target, transfer.source.to_dict())
  chosen = selected_arms(transfer.arms)
  imagenet_init = transfer.imagenet_init
  if imagenet_init and any(arm.from_imagenet for arm in chosen):
    metadata = check_imagenet_weights(target.model, imagenet_init)
    logging.info("ImageNet weights: %s (%s).", imagenet_init,
                 metadata.get("preprocessing", "no preprocessing recorded"))
  rows = []
  runnable = [arm for arm in chosen if imagenet_init or not arm.from_imagenet]
  stages_run = progress.Progress(
      sum(len(plan_arm(arm, target, source, imagenet_init, workdir)) for arm in runnable),
      "progressive transfer", unit="stages")
  for arm in ARMS:
    if arm not in chosen:
      rows.append(_skipped_row(arm, "not in config.transfer.arms"))
      continue
    if arm.from_imagenet and not imagenet_init:
      rows.append(_skipped_row(arm, "no ImageNet weights given (config.transfer.imagenet_init "
                                    "is empty; write them with experiments/port_weights.py)"))
      logging.warning("Skipping %s: no ImageNet weights given (config.transfer.imagenet_init).",
                      arm.title)
      continue
    results = {}
    for stage in plan_arm(arm, target, source, imagenet_init, workdir):
      logging.info("Stage %d of %d: %s %s.", stages_run.done + 1, stages_run.total, arm.title,
                   stage.role)
      results[stage.role], _ = run_stage(stage)
      stages_run.update()
    test = results["target"]["test"]
    rows.append({
        "arm": arm.title, "initialisation": arm.chain, "status": "done", "note": "",
        **{metric: float(test[metric]) for metric in METRICS},
        "selected_epoch": results["target"]["selected_epoch"],
        "epochs_run": results["target"]["epochs_run"],
        "source_test_accuracy": (float(results["source"]["test"]["accuracy"])
                                 if "source" in results else math.nan),
        "train_seconds": sum(float(r["train_wall_seconds"]) for r in results.values())})
  stages_run.close()
  return rows


CSV_COLUMNS = ("arm", "initialisation", "status", *METRICS, "selected_epoch", "epochs_run",
               "source_test_accuracy", "train_seconds", "note")


def _cell(value: Any) -> str:
  """Table text: 4 decimals for numbers, '' for NaN."""
  if isinstance(value, float):
    return "" if math.isnan(value) else f"{value:.4f}"
  return str(value)


def write_tables(rows: Sequence[Mapping[str, Any]], workdir: str) -> tuple[str, str]:
  """comparison.csv and comparison.md in `workdir`; returns their paths."""
  csv_path = os.path.join(workdir, "comparison.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    writer.writerows([[_cell(row[column]) for column in CSV_COLUMNS] for row in rows])
  columns = ("arm", "initialisation", *METRICS, "selected_epoch", "status")
  header = ("arm", "initialisation", *METRIC_TITLES, "selected epoch", "status")
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for row in rows:
    cells = [_cell(row[column]) or "-" for column in columns]
    if row["status"] != "done":
      cells[-1] = f"{row['status']}: {row['note']}"
    lines.append("| " + " | ".join(cells) + " |")
  md_path = os.path.join(workdir, "comparison.md")
  with open(md_path, "w") as f:
    f.write("Test-split metrics of each arm's target stage (001 Table 2 / figure 10).\n\n")
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


def _dataset_text(config: ml_collections.ConfigDict) -> str:
  """'radiograph_phantoms (label_key body_part)'-style description of a stage's data."""
  dataset = config.dataset
  name = dataset.name + (f"/{dataset.builder_config}" if dataset.builder_config else "")
  if dataset.name == pipeline.PHANTOMS_NAME:
    phantoms = pipeline.phantoms_builder_config(dataset)
    name += (f" (seed {phantoms.seed}, {phantoms.num_train} training images, "
             f"{phantoms.image_size} px)")
  return f"{name}, label '{dataset.label_key}', {config.model.num_outputs} output(s)"


def write_outputs(config: ml_collections.ConfigDict, workdir: str,
                  rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Tables, figures 10-11 and report.html for finished rows; returns the written paths."""
  target, transfer = split_config(config)
  source = apply_overrides(target, transfer.source.to_dict())
  csv_path, md_path = write_tables(rows, workdir)
  done = {arm.title: arm for arm in ARMS
          if any(row["arm"] == arm.title and row["status"] == "done" for row in rows)}
  histories = {title: run_report.read_history(
                   os.path.join(workdir, arm.name, "target", "history.jsonl"))
               for title, arm in done.items()}
  written = {"csv": csv_path, "md": md_path}
  figures = []
  if histories:
    written["loss"] = transfer_figures.plot_loss_curves(
        histories, os.path.join(workdir, "training_loss.png"),
        title="Target stage of each arm (001 figure 11)")
    written["bars"] = transfer_figures.plot_metric_bars(
        {row["arm"]: row for row in rows if row["status"] == "done"}, METRICS,
        os.path.join(workdir, "comparison.png"), labels=METRIC_TITLES,
        title="Target test split (001 figure 10)")
    figures = [report.Figure("training_loss.png", "Training (left) and validation (right) "
                             "loss per epoch of each arm's target stage (001 figure 11)."),
               report.Figure("comparison.png", "Test metrics of each arm (001 figure 10).")]
  skipped = [f"{row['arm']}: {row['note']}." for row in rows if row["status"] != "done"]
  model = dict(target.model)
  sections = [
      report.Section("Protocol", paragraphs=[
          "001's progressive transfer learning (Table 2): every arm has the same network "
          f"({model.get('name')}, head {model.get('head')!r}, input {tuple(model['input_shape'])})"
          "; they differ in where its initial weights come from.",
          f"Source task (RadiNet / RadiNetRand): {_dataset_text(source)}; "
          f"{source.num_epochs} epochs.",
          f"Target task (the '_wrist' networks): {_dataset_text(target)}; "
          f"{target.num_epochs} epochs, head-only warm-up of "
          f"{target.train.head_only_epochs} epoch(s) when starting from weights.",
          *(["On the phantoms the target spans all body parts, not one as 001's wrist set: "
             "the data pipeline cannot restrict a split to one body part yet."]
            if target.dataset.name == "radiograph_phantoms" else []),
          *([f"Not run: {' '.join(skipped)}"] if skipped else [])],
          tables=[report.Table(
              ["arm", "initialisation", "status", *METRIC_TITLES, "selected epoch",
               "source test accuracy", "train seconds"],
              [[row["arm"], row["initialisation"],
                row["status"] if row["status"] == "done" else f"{row['status']} ({row['note']})",
                *[_cell(row[m]) or "-" for m in METRICS], row["selected_epoch"] or "-",
                _cell(row["source_test_accuracy"]) or "-", _cell(row["train_seconds"]) or "-"]
               for row in rows],
              caption="Target test split of each arm (positive class: abnormal).")]),
      report.Section("Training", figures=figures, paragraphs=[] if figures else [
          "No arm has finished, so there is nothing to plot."]),
  ]
  written["report"] = report.write_report(os.path.join(workdir, "report.html"),
                                          "Progressive transfer learning (001)", sections)
  return written


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Runs (or reuses) the protocol in `workdir` and writes its outputs; returns their paths."""
  rows = run_protocol(config, workdir)
  return write_outputs(config, workdir, rows)
