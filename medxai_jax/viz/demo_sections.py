"""The demo report's sections: attributions, feature maps, representations, report annotation."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax import explain
from medxai_jax.analysis import crm_tables
from medxai_jax.analysis import embedding
from medxai_jax.annotation import reports
from medxai_jax.analysis import similarity
from medxai_jax.attribution import activations
from medxai_jax.attribution import registry
from medxai_jax.models import base
from medxai_jax.train import steps
from medxai_jax.train import components
from medxai_jax.viz import analysis_figures
from medxai_jax.viz import feature_maps
from medxai_jax.viz import figures
from medxai_jax.viz import report

CLASS_NAMES = ("normal", "abnormal")
def explain_overrides(explain_config: Any) -> dict[str, Any]:
  """The registry overrides of the demo's explain settings (num_steps, num_samples)."""
  return {"num_steps": explain_config.num_steps, "num_samples": explain_config.num_samples}


def attribution_section(model: base.Classifier, variables: base.Variables, images: np.ndarray,
                        inputs: jax.Array, masks: np.ndarray, explain_config: Any,
                        workdir: str, seed: int) -> tuple[report.Section, dict[str, Any]]:
  """003-style grid of every method on the chosen images, with timings."""
  overrides = explain_overrides(explain_config)
  targets = jnp.ones(len(inputs), jnp.int32)
  maps, info = explain.run_methods(model, variables, inputs, targets,
                                   list(explain_config.methods), jax.random.key(seed), overrides)
  labelled = {registry.label(name): value for name, value in maps.items()}
  figures.plot_attribution_grid(images, labelled, os.path.join(workdir, "attributions.png"),
                                masks=masks)
  rows = [[registry.label(name), entry.get("seconds_per_image", "-"),
           entry.get("skipped", "")] for name, entry in info.items()]
  section = report.Section(
      "Explanations: path attributions, XRAI and the CAM family",
      paragraphs=[
          f"Each method explains the abnormal class on the same {len(inputs)} abnormal test "
          f"images (IG-type methods with {overrides['num_steps']} steps, SmoothGrad with "
          f"{overrides['num_samples']} samples); maps are shown as |attribution| clipped at "
          "their own 99th percentile, in gray, as in 003's figures 8-9. The lesion mask is "
          "outlined in red on the input."],
      tables=[report.Table(["method", "seconds per image", "note"], rows,
                           caption="Time per image on this machine (one batch, after "
                           "compilation for the jitted methods).")],
      figures=[report.Figure("attributions.png", "Input, then one column per method.")])
  return section, {"maps": maps, "timings": info}


def feature_map_section(model: base.Classifier, variables: base.Variables, images: np.ndarray,
                        inputs: jax.Array, maps: Mapping[str, np.ndarray],
                        roi_inputs: jax.Array, roi_labels: np.ndarray, workdir: str
                        ) -> tuple[report.Section, dict[str, Any]]:
  """Activation grids (000), the strongest channel (002), Grad-CAM vs CRM and 004's ROI table."""
  taps = activations.grid_taps(model)
  grids = jax.jit(lambda v, x: activations.activation_grids(
      activations.model_splits(model, v, taps), x))(
      variables, inputs[:1])
  first = {tap: np.asarray(grids[tap][1][0]) for tap in taps}
  feature_maps.plot_layer_activations(images[0], first,
                                      os.path.join(workdir, "activation_grids.png"))
  # 004's comparison (its Table 3 chain): the registered methods that read the last conv map.
  cam_family = [name for name in registry.names() if name in maps
                and registry.get(name).needs in ("split", "gap_split")]
  compared = {registry.label(name): maps[name] for name in cam_family}
  feature_maps.plot_method_comparison(images, compared,
                                      os.path.join(workdir, "cam_gradcam_crm.png"))
  methods = cam_family
  table = crm_tables.roi_size_table(model.split(variables), (roi_inputs, roi_labels),
                                    methods=methods, num_classes=2, class_names=CLASS_NAMES)
  rows = [[registry.label(r["method"]), r["class"], r["images"],
           round(float(r["mean_pixels"]), 1), round(float(r["percent"]), 2)]
          for r in table["rows"]]
  section = report.Section(
      "Feature maps",
      paragraphs=[
          f"The 16 most activated channels (by mean activation) at {', '.join(taps)} for the "
          "first image, in 'bwr' (000's figures 4-11). Grad-CAM and CRM (004, eq. 6-7: the "
          "squared change of every class score when one cell of the last convolution is "
          "removed) drawn where they exceed 20% of their maximum (004's figure 5). CAM needs a "
          "global-average-pooling + dense head, which this custom CNN does not have."],
      tables=[report.Table(["method", "class", "images", "mean ROI pixels", "% of image"], rows,
                           caption=f"004's Table 3 on {len(roi_labels)} test images: pixels "
                           "above 20% of each map's maximum, averaged per class.")],
      figures=[report.Figure("activation_grids.png", "Top-16 activation maps per layer."),
               report.Figure("cam_gradcam_crm.png", "Grad-CAM and CRM, thresholded at 20%.")])
  return section, {"roi_table": table}


def representation_section(config: ml_collections.ConfigDict, model: base.Classifier,
                           variables: base.Variables, batches: list[dict[str, np.ndarray]],
                           preprocess: Any, workdir: str
                           ) -> tuple[report.Section, dict[str, Any]]:
  """Layer-by-layer CKA of the initial vs the trained network (001 fig. 14 style) and t-SNE."""
  _, tx, _ = components.build_components(config)
  initial = steps.create_train_state(model, tx, jax.random.key(config.seed)).variables
  taps = [tap for tap in model.taps if tap != "embedding"]
  matrix = similarity.compare_layers(model, initial, model, variables, batches, taps, taps,
                                     "minibatch_cka", preprocess_a=preprocess,
                                     preprocess_b=preprocess)
  analysis_figures.plot_similarity_matrix(
      matrix, taps, taps, os.path.join(workdir, "layer_similarity.png"),
      label_a="initial network", label_b="trained network",
      title="Debiased linear CKA (minibatch)")
  before, labels = embedding.collect_features(model, initial, batches, "embedding",
                                              preprocess=preprocess)
  after, _ = embedding.collect_features(model, variables, batches, "embedding",
                                        preprocess=preprocess)
  key = jax.random.key(config.seed)
  settings = config.explain.representation
  perplexity = min(settings.perplexity, (len(labels) - 1) / 3)  # t-SNE needs n > 3 perplexity
  points = [np.asarray(embedding.tsne(jnp.asarray(x), key, perplexity=perplexity,
                                      num_iters=settings.tsne_iters)) for x in (before, after)]
  analysis_figures.plot_before_after(points[0], points[1], labels,
                                     os.path.join(workdir, "tsne_before_after.png"),
                                     class_names=CLASS_NAMES)
  separation = [float(embedding.nearest_neighbour_agreement(jnp.asarray(p), jnp.asarray(labels)))
                for p in points]
  diagonal = np.diag(matrix)
  section = report.Section(
      "Representations",
      paragraphs=[
          f"Debiased linear CKA (Kornblith et al. 2019, accumulated over minibatches) between "
          f"every layer of the network at initialisation and after training, on {len(labels)} "
          "test images, in the style of 001's figure 14: the first layers stay close to their "
          "initialisation, the deep layers change most.",
          f"t-SNE of the test embeddings (perplexity {perplexity:g}) before and after "
          f"training (003's figure 7): the nearest neighbour shares the class for "
          f"{separation[0]:.0%} of images before and {separation[1]:.0%} after training."],
      tables=[report.Table(["layer", *taps], [["CKA(initial, trained)",
                                               *[round(float(v), 3) for v in diagonal]]],
                           caption="Diagonal of the layer-by-layer matrix.")],
      figures=[report.Figure("layer_similarity.png", "Layer-by-layer CKA."),
               report.Figure("tsne_before_after.png", "t-SNE before vs after training.")])
  return section, {"cka_diagonal": diagonal.tolist(), "tsne_neighbour_agreement": separation}


def annotation_section(settings: Mapping[str, Any], seed: int, workdir: str
                       ) -> tuple[report.Section, dict[str, Any]]:
  """001's report auto-annotation on synthetic wrist reports: k-fold accuracy, then labelling."""
  report_key, blank_key, cv_key, fit_key = jax.random.split(jax.random.key(seed), 4)
  num_reports = int(settings["num_reports"])
  texts, labels = reports.synthetic_reports(report_key, num_reports,
                                            label_noise=float(settings["label_noise"]))
  blank = reports.unlabelled_mask(blank_key, num_reports, float(settings["unlabelled_fraction"]))
  num_blank = int(blank.sum())
  texts = np.array(texts, dtype=object)
  cv = reports.cross_validate(list(texts[~blank]), labels[~blank], key=cv_key,
                              num_folds=int(settings["num_folds"]))
  predicted, _ = reports.annotate(list(texts[~blank]), labels[~blank], list(texts[blank]),
                                  key=fit_key)
  auto_accuracy = float(np.mean(predicted == labels[blank]))
  confusion = np.asarray(cv["confusion_matrix"])
  per_class = np.asarray(cv["per_class_accuracy"])
  result = {"kfold_accuracy": float(cv["mean_accuracy"]),
            "kfold_accuracy_std": float(cv["std_accuracy"]),
            "auto_label_accuracy": auto_accuracy, "num_labelled": int((~blank).sum()),
            "num_auto_labelled": int(blank.sum()), "confusion_matrix": confusion.tolist()}
  with open(os.path.join(workdir, "annotation_metrics.json"), "w") as file:
    json.dump(result, file, indent=2)
  names = reports.CLASS_NAMES
  section = report.Section(
      "Report auto-annotation",
      paragraphs=[
          f"001 (section 3.3) labels unlabelled radiographs from the radiologists' reports. "
          f"Here: {num_reports} synthetic wrist reports whose labels follow the stated findings "
          f"(negated fracture mentions in the negatives), {settings['label_noise']:.0%} of the "
          f"labels flipped, {num_blank} left unlabelled. Token counts of 1- to 3-grams feed an "
          f"L2 logistic regression (optax L-BFGS); each fold's vocabulary comes from its "
          f"training part only.",
          f"{settings['num_folds']}-fold accuracy {cv['mean_accuracy']:.1%} "
          f"(+- {cv['std_accuracy']:.1%}); the labels it gives the {num_blank} unlabelled "
          f"reports agree with their hidden labels for {auto_accuracy:.1%} (label noise caps "
          "both near 1 - noise)."],
      tables=[report.Table(
          ["true \\ predicted", *names, "per-class accuracy (%)"],
          [[names[c], *confusion[c].tolist(), round(float(per_class[c]), 1)]
           for c in range(len(names))],
          caption="Pooled k-fold confusion matrix (001's Table 3).")])
  return section, result
