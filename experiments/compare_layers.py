r"""Layer x layer similarity of two trained models (001's figure 14: CCA between the layers of
two networks), written as CSV, NPY and a heat map PNG.

  python -m experiments.compare_layers --workdir_a=runs/a --workdir_b=runs/b \
      --method=minibatch_cka --taps_a=conv1,conv2,conv3,conv4,conv5,fc6,fc7 \
      --output_dir=runs/compare

Each model is the selected model (`selected_model/`) of its training run, built from the run's own
`config.json`. --config_a / --config_b are optional: when given, their differences from the
run's config are printed (field, run value -> given value) and then used. Images come from a's
dataset (`--split`, default its validation split as in 001), each model applying its own
preprocessing. Writes `<output_dir>/similarity_<method>.{csv,npy,png}`; rows of the matrix are
model a's taps, columns model b's. A progress line (batches of activations compared, rate,
ETA) is logged while the batches are compared.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments import cli
from medxai_jax import logs
from medxai_jax import runs
from medxai_jax.analysis import similarity
from medxai_jax.data import pipeline
from medxai_jax.observe import progress
from medxai_jax.train import workdir as workdir_lib
from medxai_jax.viz import analysis_figures

_CONFIG_A = cli.define_config_file(
    "config_a", None, "Optional: a training config for model a instead of its run's "
    "config.json (the differences are printed).")
_CONFIG_B = cli.define_config_file(
    "config_b", None, "Optional: the same for model b (default: its run's config.json, or "
    "--config_a for a run without one).")
_WORKDIR_A = flags.DEFINE_string("workdir_a", None, "Training work directory of model a.")
_WORKDIR_B = flags.DEFINE_string("workdir_b", None, "Training work directory of model b.")
_TAPS_A = flags.DEFINE_list("taps_a", [], "Taps of model a (default: all, in forward order).")
_TAPS_B = flags.DEFINE_list("taps_b", [], "Taps of model b (default: all, in forward order).")
_METHOD = flags.DEFINE_enum("method", "minibatch_cka", list(similarity.METHODS),
                            "Similarity measure.")
_MODE = flags.DEFINE_enum("mode", "pooled", list(similarity.MODES),
                          "Conv data points: spatially pooled channels or spatial positions.")
_GRID = flags.DEFINE_list("grid", [], "mode=spatial: resample every tap to this H,W grid.")
_POSITIONS = flags.DEFINE_integer("positions_per_image", None,
                                  "mode=spatial: positions drawn per image (default: all).")
_SPLIT = flags.DEFINE_string("split", "", "Dataset split (default: the validation split).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "Examples to feed (at most).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_MAX_POINTS = flags.DEFINE_integer("max_points", 5000,
                                   "Gathered methods (CCA family): data points kept per tap.")
_EPSILON = flags.DEFINE_float("epsilon", 0.0, "CCA regularisation (relative to the top "
                              "covariance eigenvalue).")
_VARIANCE_KEPT = flags.DEFINE_float("variance_kept", 0.99, "SVCCA: fraction of variance kept.")
_SIGMA_FRACTION = flags.DEFINE_float("sigma_fraction", 0.8,
                                     "RBF CKA: bandwidth as a fraction of the median distance.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the spatial position draws.")
_LABEL_A = flags.DEFINE_string("label_a", "", "Axis label of model a (default: its workdir).")
_LABEL_B = flags.DEFINE_string("label_b", "", "Axis label of model b (default: its workdir).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Output directory (default: --workdir_a).")
flags.mark_flags_as_required(["workdir_a", "workdir_b"])


def limited_batches(source: pipeline.RandomAccessSource, batch_size: int, num_examples: int):
  """Batches of the first `num_examples` examples; rows past them get weight 0."""
  seen = 0
  for batch in pipeline.iterate_batches(source, batch_size=batch_size):
    if seen >= num_examples:
      return
    batch["weight"] = batch["weight"] * (seen + np.arange(batch_size) < num_examples)
    seen += batch_size
    yield batch


def write_csv(path: str, matrix: np.ndarray, taps_a: Sequence[str], taps_b: Sequence[str]
              ) -> None:
  """The matrix with a header of model b's taps and a leading column of model a's taps."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["tap_a \\ tap_b", *taps_b])
    for tap, row in zip(taps_a, matrix):
      writer.writerow([tap, *(f"{value:.6f}" for value in row)])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  config_a = runs.resolve_config(_WORKDIR_A.value, _CONFIG_A.value, flag="--config_a")
  given_b, flag_b = _CONFIG_B.value, "--config_b"
  if given_b is None and not os.path.exists(runs.config_path(_WORKDIR_B.value)):
    given_b, flag_b = _CONFIG_A.value, "--config_a"  # a run without config.json: a's config
  config_b = runs.resolve_config(_WORKDIR_B.value, given_b, flag=flag_b)
  selected_a = runs.restore_selected_model(config_a, _WORKDIR_A.value)
  selected_b = runs.restore_selected_model(config_b, _WORKDIR_B.value)
  model_a, vars_a, preprocess_a = selected_a.model, selected_a.variables, selected_a.preprocess
  model_b, vars_b = selected_b.model, selected_b.variables
  same_inputs = (config_b.preprocess == config_a.preprocess
                 and tuple(model_b.input_shape) == tuple(model_a.input_shape))
  # The same preprocessing function lets compare_layers compile one extractor for equal models.
  preprocess_b = preprocess_a if same_inputs else selected_b.preprocess
  taps_a = list(_TAPS_A.value) or list(model_a.taps)
  taps_b = list(_TAPS_B.value) or list(model_b.taps)
  grid = tuple(int(v) for v in _GRID.value) if _GRID.value else None
  if grid is not None and len(grid) != 2:
    raise app.UsageError(f"--grid needs two sizes H,W; got {_GRID.value}.")
  if _NUM_EXAMPLES.value < 1 or _BATCH_SIZE.value < 1:
    raise app.UsageError("--num_examples and --batch_size must be positive.")

  split = _SPLIT.value or config_a.dataset.validation_split
  source = pipeline.load_sources(config_a.dataset, [split])[split]
  num_examples = min(_NUM_EXAMPLES.value, len(source))
  logging.info("Comparing %d x %d taps with %s on %d %s examples.", len(taps_a), len(taps_b),
               _METHOD.value, num_examples, split)
  matrix = similarity.compare_layers(
      model_a, vars_a, model_b, vars_b,
      progress.track(pipeline.prefetch(limited_batches(source, _BATCH_SIZE.value, num_examples)),
                     total=-(-num_examples // _BATCH_SIZE.value),
                     desc=f"compare_layers ({len(taps_a)} x {len(taps_b)} taps)",
                     unit="batches"),
      taps_a, taps_b, _METHOD.value, preprocess_a=preprocess_a, preprocess_b=preprocess_b,
      mode=_MODE.value, grid=grid, positions_per_image=_POSITIONS.value,
      key=jax.random.key(_SEED.value), max_points=_MAX_POINTS.value, epsilon=_EPSILON.value,
      variance_kept=_VARIANCE_KEPT.value, sigma_fraction=_SIGMA_FRACTION.value)

  output_dir = workdir_lib.prepare_workdir(_OUTPUT_DIR.value or _WORKDIR_A.value)
  stem = os.path.join(output_dir, f"similarity_{_METHOD.value}")
  np.save(stem + ".npy", matrix)
  write_csv(stem + ".csv", matrix, taps_a, taps_b)
  label_a = _LABEL_A.value or os.path.basename(os.path.normpath(_WORKDIR_A.value))
  label_b = _LABEL_B.value or os.path.basename(os.path.normpath(_WORKDIR_B.value))
  analysis_figures.plot_similarity_matrix(
      matrix, taps_a, taps_b, stem + ".png", label_a=label_a, label_b=label_b,
      title=f"{_METHOD.value} ({_MODE.value}, {num_examples} {split} images)")
  with open(stem + ".json", "w") as f:
    json.dump({"method": _METHOD.value, "mode": _MODE.value, "split": split,
               "num_examples": num_examples, "taps_a": taps_a, "taps_b": taps_b,
               "workdir_a": os.path.abspath(_WORKDIR_A.value),
               "workdir_b": os.path.abspath(_WORKDIR_B.value)}, f, indent=2)
  print(f"Wrote {stem}.csv, .npy and .png ({matrix.shape[0]} x {matrix.shape[1]}).")


if __name__ == "__main__":
  cli.run(main)
