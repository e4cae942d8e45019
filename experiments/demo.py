r"""The main job on the built-in phantoms: train, evaluate, explain, write a report.

  python -m experiments.demo --workdir=runs/demo

Writes into --workdir: metrics.json, history.jsonl, training_curves.png, gradcam.png and
report.html (plus checkpoints/). Re-running resumes or reuses the finished training. Each
section logs a progress line (section k of n, ETA) and its wall time goes into timings.json
and the report's timing table.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from medxai_jax.analysis import evaluation
from medxai_jax.attribution import cam
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.observe import timing
from medxai_jax import logs
from medxai_jax import runs
from medxai_jax.train import loop
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import workdir as workdir_lib
from medxai_jax.viz import demo_sections
from medxai_jax.viz import evaluation_report
from medxai_jax.viz import figures
from medxai_jax.viz import report
from medxai_jax.viz import run_report

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "demo.py")


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a binary, so importing defines none)."""
  cli.define_config_file("config", DEMO_CONFIG, "Demo config file.")
  flags.DEFINE_string("workdir", "runs/demo", "Output directory.")


def load_test_examples(source: pipeline.RandomAccessSource) -> dict[str, np.ndarray]:
  """Images, labels, lesion masks and marker agreement of a whole (small) test split."""
  keys = ("image", "label", "lesion_mask", "marker_agrees")
  batches = list(pipeline.iterate_batches(source, batch_size=256, keys=keys))
  real = np.concatenate([b["weight"] > 0 for b in batches])
  return {key: np.concatenate([b[key] for b in batches])[real] for key in keys}


def shortcut_accuracy(predictions: np.ndarray, examples: dict[str, np.ndarray]) -> dict:
  """Test accuracy where the L/R marker agrees with the label vs where it contradicts it."""
  correct = predictions == examples["label"]
  agrees = examples["marker_agrees"].astype(bool)
  return {"accuracy_marker_agrees": float(correct[agrees].mean()),
          "accuracy_marker_contradicts": float(correct[~agrees].mean()),
          "num_agrees": int(agrees.sum()), "num_contradicts": int((~agrees).sum())}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  config = flags.FLAGS.config
  start = time.time()
  workdir = workdir_lib.prepare_workdir(flags.FLAGS.workdir)
  phases = timing.PhaseSequence(workdir, "demo", total=8)
  phases.start("train")
  result = loop.train_and_evaluate(config, workdir)
  phases.start("grad_cam")

  # Explain the selected model on held-out images.
  selected = runs.restore_selected_model(config, workdir)
  model, variables, preprocess = selected.model, selected.variables, selected.preprocess
  source = pipeline.load_sources(config.dataset, [config.dataset.test_split])[
      config.dataset.test_split]
  examples = load_test_examples(source)
  inputs = jax.jit(preprocess)(jnp.asarray(examples["image"]))
  logits = np.asarray(jax.jit(model.logits)(variables, inputs))
  predictions = np.asarray(base.predicted_classes(jnp.asarray(logits)))
  result["shortcut"] = shortcut_accuracy(predictions, examples)

  count = config.explain.num_images
  chosen = np.flatnonzero(examples["label"] == 1)[:count]
  targets = jnp.ones(len(chosen), jnp.int32)
  maps = np.asarray(jax.jit(lambda v, x, t: cam.grad_cam(model.split(v), x, t))(
      variables, inputs[chosen], targets))
  probabilities = jax.nn.sigmoid(logits[chosen, 0]) if logits.shape[-1] == 1 else \
      jax.nn.softmax(logits[chosen])[:, 1]
  titles = [f"#{i} p={float(p):.2f}" for i, p in zip(chosen, probabilities)]
  figures.plot_heatmap_overlays(examples["image"][chosen], maps,
                                os.path.join(workdir, "gradcam.png"),
                                masks=examples["lesion_mask"][chosen], titles=titles)
  settings = config.explain
  phases.start("attributions")
  path_section, explained = demo_sections.attribution_section(
      model, variables, examples["image"][chosen], inputs[chosen],
      examples["lesion_mask"][chosen], settings, workdir, config.seed)
  phases.start("feature_maps")
  roi = np.arange(min(settings.num_roi_images, len(examples["label"])))
  feature_section, features = demo_sections.feature_map_section(
      model, variables, examples["image"][chosen], inputs[chosen], explained["maps"],
      inputs[roi], examples["label"][roi], workdir)
  phases.start("representations")
  shown = np.arange(min(settings.representation.num_images, len(examples["label"])))
  batches = [{"image": examples["image"][shown][i:i + 128],
              "label": examples["label"][shown][i:i + 128]} for i in range(0, len(shown), 128)]
  representation_section, representation = demo_sections.representation_section(
      config, model, variables, batches, preprocess, workdir)
  phases.start("evaluate_explanations")
  scored = evaluation.evaluate_run(
      config, workdir, os.path.join(workdir, "evaluation"),
      methods=[m for m in settings.methods if m != "xrai"], num_images=settings.num_scored,
      options=demo_sections.explain_overrides(settings),
      seed=config.seed)
  phases.compile_seconds = scored["timing"]["compile_seconds"]
  phases.start("annotation")
  annotation_section, result["annotation"] = demo_sections.annotation_section(
      config.annotation, config.seed, workdir)
  result["explanations"] = {"timings": explained["timings"],
                            "roi_table": features["roi_table"]["rows"], **representation,
                            "marker_share": scored["marker_share"]}
  phases.start("report")
  history = run_report.read_history(os.path.join(workdir, "history.jsonl"))
  figures.plot_training_curves(history, os.path.join(workdir, "training_curves.png"),
                               result["selected_epoch"])
  result["demo_wall_seconds"] = time.time() - start
  metrics_lib.write_json(os.path.join(workdir, "metrics.json"), result)

  test, validation, short = result["test"], result["validation"], result["shortcut"]
  metric_names = ("accuracy", "precision", "recall", "f1", "cohen_kappa", "mcc", "roc_auc")
  phantoms = pipeline.phantoms_builder_config(config.dataset)  # every setting, defaults too
  sections = [
      report.Section(
          "Summary",
          paragraphs=[
              f"A {config.model.name} ({result['num_parameters']:,} parameters) trained on "
              f"{phantoms.num_train} synthetic radiographs "
              f"({phantoms.image_size} px) for {result['epochs_run']} epochs; "
              f"epoch {result['selected_epoch']} was selected by validation "
              f"{result['selection_metric']}. Training took {result['train_wall_seconds']:.0f} s "
              f"on {', '.join(result['devices'])}.",
              f"The L/R marker agrees with the label in "
              f"{phantoms.train_marker_agreement:.0%} of training images and "
              f"{phantoms.test_marker_agreement:.0%} of test images: a model that "
              "relied on it would lose accuracy where it contradicts the label."],
          tables=[
              report.Table(["split", *metric_names],
                           [["validation (selected epoch)",
                             *[validation[f"val_{m}"] for m in metric_names]],
                            ["test", *[test[m] for m in metric_names]]],
                           caption="Classification metrics (positive class: abnormal)."),
              report.Table(["test subset", "images", "accuracy"],
                           [["marker agrees with label", short["num_agrees"],
                             short["accuracy_marker_agrees"]],
                            ["marker contradicts label", short["num_contradicts"],
                             short["accuracy_marker_contradicts"]]],
                           caption="Shortcut check.")]),
      report.Section("Training", figures=[report.Figure(
          "training_curves.png", "Loss and accuracy per epoch; dashed: selected epoch.")]),
      report.Section("Explanations: Grad-CAM", paragraphs=[
          f"Grad-CAM at the last convolution for the abnormal class on {len(chosen)} abnormal "
          "test images; the heat map is shown where it exceeds 20% of its maximum."],
          figures=[report.Figure("gradcam.png", "Top: input with the lesion mask in red. "
                                 "Bottom: Grad-CAM ('jet').")]),
      path_section, feature_section, representation_section,
      annotation_section, evaluation_report.leaderboard_section(scored, workdir),
  ]
  # The run's report: the training sections every run gets (metrics, confusion matrix, ROC,
  # curves, class balance), then the demo's; explain / evaluate_explanations add theirs later.
  for index, section in enumerate(sections):
    run_report.add_section(workdir, f"demo_{index:02d}", section, render=False)
  phases.finish()  # before the report is written, so its timing table has every section
  run_report.write_run_report(workdir)
  print(f"Test accuracy {test['accuracy']:.4f} (ROC AUC {test['roc_auc']:.4f}); "
        f"demo took {result['demo_wall_seconds']:.0f} s. Report: "
        f"{os.path.join(workdir, 'report.html')}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
