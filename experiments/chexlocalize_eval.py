r"""CheXlocalize's evaluation (Saporta et al. 2022) of saliency maps or predicted segmentations:
per-image, bootstrap and summary CSVs of IoU (mIoU) and hit rate, as its eval.py writes them.

  # Saliency maps (<image id>_<pathology>_map.npy or <image id>.npz), Otsu binarisation:
  python -m experiments.chexlocalize_eval --annotations=gt_segmentations_val.json \
      --saliency_dir=maps/ --workdir=runs/chexlocalize
  # Their tuned thresholds instead of Otsu (a CSV with columns threshold,task):
  python -m experiments.chexlocalize_eval --annotations=gt_annotations_val.json \
      --saliency_dir=maps/ --thresholds=tuning_results.csv --workdir=runs/chexlocalize
  # Predicted segmentations (an RLE JSON such as their heatmap_to_segmentation.py writes):
  python -m experiments.chexlocalize_eval --annotations=gt_segmentations_val.json \
      --segmentations=pred_segmentations.json --workdir=runs/chexlocalize

--annotations is either ground-truth file of the benchmark (polygons with img_size, or RLE
segmentations; told apart by content). From maps, writes iou_* and hitmiss_* CSVs and the maps'
segmentations as saliency_segmentations.json; from segmentations, the iou_* CSVs. The summary is
printed too. File formats and conventions: medxai_jax/analysis/chexlocalize.py.
"""

from __future__ import annotations

import csv

from absl import app
from absl import flags

from experiments import cli
from medxai_jax.analysis import chexlocalize


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a binary, so importing defines none)."""
  flags.DEFINE_string(
      "annotations", None, "Ground-truth JSON: annotations (polygons + img_size) or RLE "
      "segmentations.")
  flags.DEFINE_string(
      "saliency_dir", None, "Directory of saliency maps: <image id>_<pathology>_map.npy files or "
      "<image id>.npz archives with one array per pathology.")
  flags.DEFINE_string(
      "segmentations", None, "Predicted segmentation JSON (RLE) instead of --saliency_dir.")
  flags.DEFINE_enum(
      "method", None, ["otsu", "thresholds"], "Binarisation of the maps: Otsu (default) or the "
      "per-pathology thresholds of --thresholds (the default when it is given).")
  flags.DEFINE_string(
      "thresholds", None, "CSV of per-pathology thresholds (columns threshold,task).")
  flags.DEFINE_string("workdir", None, "Output directory of the CSVs.")
  flags.DEFINE_integer("seed", 0, "Seed of the bootstrap (numpy RandomState, as theirs).")
  flags.DEFINE_list(
      "pathologies", [], "Pathologies to score (default: every one the ground truth names).")
  flags.DEFINE_boolean(
      "true_pos_only", True, "IoU only where both the prediction and the ground truth are "
      "non-empty (their default); false also scores empty ones (0) and predicted-only images.")
  flags.DEFINE_enum(
      "polygon_convention", "pil", list(chexlocalize.POLYGON_CONVENTIONS),
      "Rasterisation of annotation polygons: PIL's (the benchmark's) or pixel centres inside.")
  flags.DEFINE_boolean(
      "fill_contours", True, "Otsu: fill holes and drop single pixels, as their contour step.")
  flags.DEFINE_boolean(
      "allow_missing", False, "Score ground-truth images without a prediction as empty "
      "predictions instead of failing.")
  flags.DEFINE_integer(
      "num_replicates", chexlocalize.NUM_REPLICATES, "Bootstrap replicates.")
  flags.mark_flags_as_required(["annotations", "workdir"])



def _summary_lines(path: str) -> list[str]:
  """The summary CSV as aligned text lines."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  width = max(len(row[0]) for row in rows)
  return [f"  {row[0]:<{width}}  " + "  ".join(f"{v:>6}" for v in row[1:]) for row in rows]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if (flags.FLAGS.saliency_dir is None) == (flags.FLAGS.segmentations is None):
    raise app.UsageError("Give exactly one of --saliency_dir and --segmentations.")
  method = flags.FLAGS.method or ("thresholds" if flags.FLAGS.thresholds else "otsu")
  if method == "thresholds" and not flags.FLAGS.thresholds:
    raise app.UsageError("--method=thresholds needs --thresholds=<csv>.")
  if method == "otsu" and flags.FLAGS.thresholds:
    raise app.UsageError("--thresholds is given but --method=otsu; drop one of them.")
  if flags.FLAGS.segmentations is not None and flags.FLAGS.thresholds:
    raise app.UsageError("--thresholds binarise saliency maps; --segmentations are binary.")
  if flags.FLAGS.num_replicates < 1:
    raise app.UsageError("--num_replicates must be positive.")
  outputs = chexlocalize.evaluate(
      flags.FLAGS.annotations, flags.FLAGS.workdir, saliency_dir=flags.FLAGS.saliency_dir,
      segmentations=flags.FLAGS.segmentations,
      thresholds=flags.FLAGS.thresholds if method == "thresholds" else None, seed=flags.FLAGS.seed,
      pathologies=flags.FLAGS.pathologies or None, true_pos_only=flags.FLAGS.true_pos_only,
      convention=flags.FLAGS.polygon_convention, contours=flags.FLAGS.fill_contours,
      allow_missing=flags.FLAGS.allow_missing, num_replicates=flags.FLAGS.num_replicates)
  for metric, paths in outputs.items():
    name = "mIoU" if metric == "iou" else "hit rate"
    print(f"{name} (95% bootstrap interval, {flags.FLAGS.num_replicates} replicates):")
    print("\n".join(_summary_lines(paths["summary"])))
    print("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
