"""The epoch loop: train, validate, select, checkpoint, resume, and test the selected model."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax import runs
from medxai_jax.attribution import cam
from medxai_jax.data import augment as augment_lib
from medxai_jax.data import pipeline
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import base
from medxai_jax.models import porting
from medxai_jax.models import registry
from medxai_jax.observe import profiling
from medxai_jax.observe import progress
from medxai_jax.observe import summaries
from medxai_jax.observe import timing
from medxai_jax.train import checkpoint
from medxai_jax.train import freeze
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import optim
from medxai_jax.train import parallel
from medxai_jax.train import preemption
from medxai_jax.train import steps
from medxai_jax.train import workdir as workdir_lib

CONFIG_FIELDS = frozenset({
    "seed", "dataset", "preprocess", "model", "optimizer", "learning_rate", "schedule",
    "batch_size", "eval_batch_size", "num_epochs", "class_weights", "selection",
    "early_stopping", "checkpoint", "log_every_steps", "explain", "report", "train", "augment",
    "init_from", "annotation", "summaries", "profile_steps", "input"})
# config.summaries: TensorBoard event files under <workdir>/tensorboard (observe/summaries.py).
SUMMARY_FIELDS = {"enabled": True, "num_images": 4}
TRAIN_FIELDS = ("trainable", "num_trainable_layers", "head_only_epochs", "compute_dtype",
                "accumulation_steps")
# config.train.compute_dtype: the dtype of activations and matrix products; parameters,
# optimiser state, BatchNorm statistics and the loss stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")
# Selection/monitor metrics where larger is better; the rest ('loss') are minimised.
_MAXIMISED = frozenset({"accuracy", "f1", "roc_auc", "cohen_kappa", "mcc", "precision",
                        "recall", "train_val_gap", "train_accuracy"})
# Selection metrics computed from the training epoch rather than the validation split.
_TRAIN_METRICS = frozenset({"train_val_gap", "train_accuracy"})


@dataclasses.dataclass
class LoopState:
  """Host-side progress saved with every checkpoint (JSON)."""

  epoch: int = 0  # epochs completed
  learning_rate: float = 0.0
  plateau: optim.PlateauState = dataclasses.field(default_factory=optim.PlateauState)
  best_score: float | None = None
  best_epoch: int = 0
  early_stopping_best: float | None = None
  epochs_since_improvement: int = 0
  stopped_early: bool = False

  def to_json(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "LoopState":
    """Inverse of `to_json`."""
    data = dict(data)
    data["plateau"] = optim.PlateauState(**data.get("plateau", {}))
    return cls(**data)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming any unknown top-level field or impossible value."""
  unknown = sorted(set(config.keys()) - CONFIG_FIELDS)
  if unknown:
    raise ValueError(f"Unknown config field(s) {unknown}; known fields: {sorted(CONFIG_FIELDS)}.")
  for field in ("batch_size", "num_epochs"):
    if int(config[field]) <= 0:
      raise ValueError(f"config.{field} must be positive, got {config[field]}.")
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}.")
  for section in ("selection", "early_stopping", "schedule"):
    monitor = config[section].get("metric") if section in config else None
    if monitor and monitor != "loss" and monitor not in _MAXIMISED:
      raise ValueError(f"config.{section}.metric={monitor!r} is not one of "
                       f"{sorted(_MAXIMISED | {'loss'})}.")
    if section != "selection" and monitor in _TRAIN_METRICS:
      raise ValueError(f"config.{section}.metric={monitor!r} is only a selection metric; "
                       "monitor a validation metric.")
  settings = train_settings(config)
  if int(config.batch_size) % settings["accumulation_steps"]:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.train.accumulation_steps={settings['accumulation_steps']}.")
  augment_lib.check_augment_config(config.get("augment") or {})
  every_steps = (config.get("checkpoint") or {}).get("every_steps", 0)
  if not isinstance(every_steps, int) or every_steps < 0:
    raise ValueError(f"config.checkpoint.every_steps must be an integer >= 0 (0 = checkpoint at "
                     f"the end of each epoch only), got {every_steps!r}.")
  summary_settings(config)
  profiling.parse_steps(config.get("profile_steps"))
  if not isinstance(config.get("init_from", ""), str):
    raise ValueError(f"config.init_from must be a path string ('' = random initialisation), "
                     f"got {config.init_from!r}.")


def train_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Validated `config.train` (fine-tuning controls), with defaults for missing fields."""
  settings = dict(trainable="all", num_trainable_layers=0, head_only_epochs=0,
                  compute_dtype="float32", accumulation_steps=1)
  given = dict(config.get("train") or {})
  unknown = sorted(set(given) - set(TRAIN_FIELDS))
  if unknown:
    raise ValueError(f"config.train has unknown field(s) {unknown}; known: {list(TRAIN_FIELDS)}.")
  settings.update(given)
  if settings["trainable"] not in freeze.TRAINABLE_CHOICES:
    raise ValueError(f"config.train.trainable={settings['trainable']!r} is not one of "
                     f"{list(freeze.TRAINABLE_CHOICES)}.")
  layers = int(settings["num_trainable_layers"])
  if settings["trainable"] == "last_n_layers" and layers < 1:
    raise ValueError("config.train.num_trainable_layers must be >= 1 with "
                     f"trainable='last_n_layers', got {layers}.")
  if int(settings["head_only_epochs"]) < 0:
    raise ValueError(f"config.train.head_only_epochs must be >= 0, got "
                     f"{settings['head_only_epochs']}.")
  if settings["compute_dtype"] not in COMPUTE_DTYPES:
    raise ValueError(f"config.train.compute_dtype={settings['compute_dtype']!r} is not one of "
                     f"{list(COMPUTE_DTYPES)}.")
  if int(settings["accumulation_steps"]) < 1:
    raise ValueError(f"config.train.accumulation_steps must be >= 1, got "
                     f"{settings['accumulation_steps']}.")
  settings["num_trainable_layers"] = layers
  settings["head_only_epochs"] = int(settings["head_only_epochs"])
  settings["accumulation_steps"] = int(settings["accumulation_steps"])
  return settings


def summary_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Validated `config.summaries`, with defaults for missing fields."""
  given = dict(config.get("summaries") or {})
  unknown = sorted(set(given) - set(SUMMARY_FIELDS))
  if unknown:
    raise ValueError(f"config.summaries has unknown field(s) {unknown}; known: "
                     f"{list(SUMMARY_FIELDS)}.")
  settings = {**SUMMARY_FIELDS, **given}
  if not isinstance(settings["enabled"], bool):
    raise ValueError(f"config.summaries.enabled must be True or False, got "
                     f"{settings['enabled']!r}.")
  if not isinstance(settings["num_images"], int) or settings["num_images"] < 0:
    raise ValueError(f"config.summaries.num_images must be an integer >= 0, got "
                     f"{settings['num_images']!r}.")
  return settings


def _nearest_existing(path: str) -> str:
  """`path` itself if it exists, else its closest ancestor that does."""
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _why_unwritable(directory: str) -> str | None:
  """Why no file can be created in the existing `directory` (a read-only mount, a virtual file
  system like /proc, no permission), or None when one can (checked by creating one)."""
  if os.statvfs(directory).f_flag & os.ST_RDONLY:
    return "it is on a read-only file system"
  probe = os.path.join(directory, f".medxai_write_test_{os.uname().nodename}_{os.getpid()}")
  try:
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except OSError as error:
    return f"no file can be created in it ({error.strerror})"
  os.remove(probe)
  return None


def prepare_workdir(workdir: str) -> str:
  """Absolute work directory, created if its parent exists; an error naming the path and what to
  do when it is a file, lies under a file, has no parent or cannot be written."""
  if not workdir:
    raise ValueError("--workdir is required.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  existing = _nearest_existing(workdir)
  if not os.path.isdir(existing):
    if existing == workdir:
      raise NotADirectoryError(f"--workdir={workdir!r} exists and is not a directory; give a "
                               "directory (or move the file away).")
    raise NotADirectoryError(f"--workdir={workdir!r} cannot be created: {existing!r} is a file, "
                             "not a directory; give a --workdir outside it.")
  if existing not in (workdir, parent):
    raise FileNotFoundError(f"The parent directory of --workdir={workdir!r} does not exist: "
                            f"{parent!r}. Create it first: mkdir -p {parent}")
  reason = _why_unwritable(existing)
  if reason:
    raise PermissionError(f"--workdir={workdir!r} cannot be written: {existing!r}: {reason}; "
                          "give a --workdir on a writable file system.")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def resolve_class_weights(spec: Any, counts: np.ndarray) -> np.ndarray | None:
  """Per-class loss weights from '', 'balanced' (n / (K * n_k)) or a comma-separated list."""
  if spec is None or spec == "" or spec == ():
    return None
  if spec == "balanced":
    if (counts == 0).any():
      raise ValueError(f"class_weights='balanced' needs every class in the training split; "
                       f"counts are {counts.tolist()}.")
    return counts.sum() / (len(counts) * counts.astype(np.float64))
  values = [float(v) for v in spec.split(",")] if isinstance(spec, str) else list(spec)
  if len(values) != len(counts):
    raise ValueError(f"config.class_weights has {len(values)} values for {len(counts)} classes.")
  return np.asarray(values, np.float64)


def evaluate(state: steps.TrainState, source: pipeline.RandomAccessSource, *, eval_fn,
             batch_size: int, label_key: str, split: str = "",
             warned: set[tuple[str, str]] | None = None, feature_keys: Sequence[str] = (),
             features: dict[str, np.ndarray] | None = None, workers: int = 0,
             prefetch: int = 2) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Metrics over a whole split, plus its logits and labels (padding removed).

  A metric that is undefined on the split (AUC with one class, ...) is None, with a warning
  naming it, the split and why (once per split and metric when `warned` is given). The scalar
  record features `feature_keys` (e.g. 'study_id') of the evaluated rows are put into
  `features` (one process only: on several, each host batch holds only its own rows).
  `workers`, `prefetch`: the input pipeline's (`pipeline.batch_iterator`).
  """
  logits, labels, losses = [], [], []
  columns: dict[str, list[np.ndarray]] = {key: [] for key in feature_keys}
  for batch in pipeline.iterate_batches(
      source, batch_size=batch_size, label_key=label_key, workers=workers, prefetch=prefetch,
      keys=("image", *[k for k in feature_keys if k != label_key])):
    extra = {key: batch["label"] if key == label_key else batch.pop(key)
             for key in feature_keys}  # iterate_batches renames the label feature 'label'
    for key in feature_keys:
      columns[key].append(extra[key][np.asarray(batch["weight"]) > 0])
    out = jax.device_get(eval_fn(state, batch))
    # On several hosts each host batch holds only this process's rows; the step then returns
    # the global batch's labels and weights (replicated) with its logits.
    real = np.asarray(out.get("weight", batch["weight"])) > 0
    logits.append(out["logits"][real])
    losses.append(out["loss"][real])
    labels.append(np.asarray(out.get("label", batch["label"]))[real])
  logits_all = np.concatenate(logits)
  labels_all = np.concatenate(labels)
  if features is not None:
    features.update({key: np.concatenate(values) for key, values in columns.items()})
  result = defined_metrics(metrics_lib.classification_metrics(labels_all, logits_all),
                           f"the {split} split" if split else "the evaluated split", warned)
  result["loss"] = float(np.concatenate(losses).mean())
  return result, logits_all, labels_all


def defined_metrics(summary: Mapping[str, Any], where: str,
                    warned: set[tuple[str, str]] | None = None) -> dict[str, Any]:
  """`summary` (metrics_lib's) with its undefined metrics set to None, each one warned about
  (`where`, e.g. 'the test split', names the data in the warning)."""
  result = dict(summary)
  for metric, reason in metrics_lib.undefined_metrics(
      np.asarray(summary["confusion_matrix"])).items():
    result[metric] = None
    if warned is None or (where, metric) not in warned:
      logging.warning("%s is undefined on %s (%d examples): %s; it is reported as null.",
                      metric, where, summary["num_examples"], reason)
      if warned is not None:
        warned.add((where, metric))
  return result


def _format_metric(value: float | None) -> str:
  """'0.1234', or 'undefined' for None."""
  return "undefined" if value is None else f"{value:.4f}"


def _monitored(value: Any, mode: str) -> float:
  """A monitored value as a float; an undefined (None) one is the worst value of its mode."""
  if value is None:
    return -math.inf if mode == "max" else math.inf
  return float(value)


def selection_score(metric: str, train_accuracy: float, validation: Mapping[str, Any]) -> float:
  """Model-selection value of an epoch ('train_val_gap' is 000's -|train acc - val acc|).

  'train_accuracy' selects the epoch that fits the training split best (a model trained on
  shuffled labels, whose validation accuracy is chance by construction).
  """
  if metric == "train_accuracy":
    return float(train_accuracy)
  if metric == "train_val_gap":
    return -abs(train_accuracy - validation["accuracy"])
  return _monitored(validation[metric], _mode(metric, None))


def _mode(metric: str, mode: str | None) -> str:
  """Configured mode, or the natural one for `metric`."""
  return mode or ("max" if metric in _MAXIMISED else "min")


def _epoch_learning_rate(config: ml_collections.ConfigDict, epoch: int, loop: LoopState) -> float:
  """Learning rate to use for `epoch` under the configured schedule."""
  schedule = config.schedule
  if schedule.name == "constant":
    return config.learning_rate
  if schedule.name == "step_decay":
    return optim.step_decay_rate(config.learning_rate, epoch, config.num_epochs,
                                 tuple(schedule.boundaries), tuple(schedule.divisors))
  if schedule.name == "plateau":
    return loop.learning_rate or config.learning_rate
  raise ValueError(f"config.schedule.name={schedule.name!r} is not one of "
                   "'constant', 'step_decay', 'plateau'.")


def plateau_step(config: ml_collections.ConfigDict, learning_rate: float,
                 validation: Mapping[str, Any], plateau: optim.PlateauState
                 ) -> tuple[float, optim.PlateauState]:
  """Next epoch's rate under config.schedule ('plateau') after an epoch's validation metrics."""
  schedule = config.schedule
  mode = _mode(schedule.metric, schedule.get("mode"))
  return optim.plateau_update(
      learning_rate, _monitored(validation[schedule.metric], mode), plateau,
      mode=mode, factor=schedule.factor,
      patience=schedule.patience, max_reductions=schedule.max_reductions or None,
      min_lr=schedule.min_learning_rate)


def early_stopping_step(config: ml_collections.ConfigDict, validation: Mapping[str, Any],
                        best: float | None, epochs_since_improvement: int
                        ) -> tuple[float | None, int, bool]:
  """(best, epochs without improvement, stop now?) after an epoch, under config.early_stopping."""
  stopping = config.early_stopping
  mode = _mode(stopping.metric, stopping.get("mode"))
  value = _monitored(validation[stopping.metric], mode)
  if optim.improved(value, best, mode):
    best, epochs_since_improvement = value, 0
  else:
    epochs_since_improvement += 1
  return best, epochs_since_improvement, epochs_since_improvement >= stopping.patience


def _append_jsonl(path: str, record: Mapping[str, Any]) -> None:
  """Appends one JSON line."""
  with open(path, "a") as f:
    f.write(metrics_lib.strict_json_dumps(record) + "\n")


def _truncate_history(path: str, completed_epochs: int) -> None:
  """Drops history lines of epochs after the resumed checkpoint (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if json.loads(line).get("epoch", 0) <= completed_epochs]
  with open(path, "w") as f:
    f.writelines(kept)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def _check_finite(loss: float, epoch: int, step: int, learning_rate: float, store_dir: str,
                  last_checkpoint: int | None) -> None:
  """Raises NonFiniteLossError with what to do next if `loss` is not finite."""
  if not math.isfinite(loss):
    where = (f"the last good checkpoint (epoch {last_checkpoint}) is in {store_dir} and the run "
             "resumes from it" if last_checkpoint else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"Training loss became {loss} at epoch {epoch + 1}, step {step} (learning rate "
        f"{learning_rate:g}); {where}. Lower config.learning_rate or check the input data.")


def build_components(config: ml_collections.ConfigDict, compute_dtype: str | None = None):
  """Model, optimiser and preprocessing function of a config.

  The model computes in `compute_dtype` (default: config.train.compute_dtype); its parameters
  are float32 whatever the compute dtype.
  """
  model = registry.build_model(model_fields(config, compute_dtype))
  tx = optim.make_optimizer(config.optimizer, config.learning_rate)
  preprocess = preprocess_lib.make_preprocess_fn(
      model.input_shape, tuple(config.preprocess.mean), tuple(config.preprocess.std),
      bit_depth=config.preprocess.get("bit_depth"))
  return model, tx, preprocess


def model_fields(config: ml_collections.ConfigDict, compute_dtype: str | None = None
                 ) -> dict[str, Any]:
  """config.model as keyword arguments, with `dtype` set for a non-float32 compute dtype."""
  fields = dict(config.model)
  dtype = compute_dtype or train_settings(config)["compute_dtype"]
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={dtype!r} is not one of {list(COMPUTE_DTYPES)}.")
  if dtype != "float32":
    if "dtype" in fields:
      raise ValueError(f"config.model.dtype={fields['dtype']!r} and config.train.compute_dtype="
                       f"{dtype!r} both set the compute dtype; set only compute_dtype.")
    fields["dtype"] = getattr(jnp, dtype)
  return fields


SELECTED_MODEL_DIR = "selected_model"
PREDICTIONS_FILE = "predictions_test.npz"
SPLITS_FILE = "splits.json"
# Record features copied into predictions_test.npz and grouped by in metrics.json, when present.
RECORD_FEATURES = ("study_id", "body_part", "patient_id", "path")


def dataset_features(dataset_config: Mapping[str, Any]) -> Any:
  """The TFDS feature dictionary of the configured dataset (None if the builder has none)."""
  return getattr(pipeline.load_builder(dataset_config).info, "features", None)


def feature_names(features: Any, key: str) -> list[str] | None:
  """Class names of a ClassLabel feature, or None."""
  spec = features[key] if features is not None and key in features else None
  names = getattr(spec, "names", None)
  return list(names) if names else None


def class_names(features: Any, label_key: str, num_classes: int) -> list[str]:
  """The label feature's class names, or '0'..'K-1' when it has none (or not K of them)."""
  names = feature_names(features, label_key)
  if names and len(names) == num_classes:
    return names
  if names:
    logging.warning("The label feature %r has %d class names %s but the model has %d classes; "
                    "classes are named by index.", label_key, len(names), names, num_classes)
  return [str(k) for k in range(num_classes)]


def class_counts(labels: np.ndarray, num_classes: int, split: str) -> list[int]:
  """Examples per class [K]; raises ValueError naming the split for a label outside [0, K)."""
  labels = np.asarray(labels).astype(np.int64)
  outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
  if outside.size:
    raise ValueError(f"The {split!r} split has label(s) {outside.tolist()[:5]} outside [0, "
                     f"{num_classes}), the classes of config.model; check model.num_outputs "
                     "and config.dataset.label_key.")
  return np.bincount(labels, minlength=num_classes).tolist()


def text_column(values: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
  """A feature column as str [N]: bytes decoded, class indices named by `names`."""
  def text(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) or (
        isinstance(value, np.ndarray) and value.ndim == 0) else value
    if isinstance(value, bytes):
      return value.decode()
    if names is not None and isinstance(value, (int, np.integer)):
      return names[int(value)]
    return str(value)
  return np.asarray([text(value) for value in np.asarray(values, dtype=object)], dtype=str)


def study_level_metrics(labels: np.ndarray, probabilities: np.ndarray, study_ids: np.ndarray,
                        where: str, warned: set[tuple[str, str]] | None = None
                        ) -> dict[str, Any]:
  """MURA's study-level metrics: each study's probabilities are the mean of its images'
  (Rajpurkar et al.; `mura.study_scores`), thresholded as one image's would be."""
  from medxai_jax.data.builders import mura  # imports tensorflow_datasets

  _, means, study_labels = mura.study_scores(probabilities, study_ids, labels)
  return defined_metrics(metrics_lib.probability_metrics(study_labels, means),
                         f"{where}, per study", warned)


def grouped_metrics(labels: np.ndarray, logits: np.ndarray, features: Mapping[str, np.ndarray],
                    split: str, warned: set[tuple[str, str]] | None = None) -> dict[str, Any]:
  """'<split>_by_study' (when records carry study_id) and '<split>_by_body_part' (body_part:
  name -> {'image': metrics, 'study': metrics}) as 000 and the MURA paper report them."""
  result: dict[str, Any] = {}
  probabilities = metrics_lib.probabilities_from_logits(logits)
  studies = features.get("study_id")
  if studies is not None:
    result[f"{split}_by_study"] = study_level_metrics(labels, probabilities, studies,
                                                      f"the {split} split", warned)
  parts = features.get("body_part")
  if parts is not None:
    by_part = {}
    for part in sorted(set(parts.tolist())):
      rows = parts == part
      where = f"the {split} split's {part} images"
      entry = {"image": defined_metrics(
          metrics_lib.classification_metrics(labels[rows], logits[rows]), where, warned)}
      if studies is not None:
        entry["study"] = study_level_metrics(labels[rows], probabilities[rows], studies[rows],
                                             where, warned)
      by_part[part] = entry
    result[f"{split}_by_body_part"] = by_part
  return result


def write_predictions(path: str, labels: np.ndarray, logits: np.ndarray,
                      features: Mapping[str, np.ndarray]) -> str:
  """predictions_test.npz: labels int64 [N], logits float32 [N, K'], probabilities float32
  [N, K] and the record features as str [N]."""
  logits = np.asarray(logits, np.float32)
  logits = logits.reshape(len(logits), -1)
  np.savez(path, labels=np.asarray(labels, np.int64), logits=logits,
           probabilities=metrics_lib.probabilities_from_logits(logits).astype(np.float32),
           **{key: np.asarray(value, dtype=str) for key, value in features.items()})
  return path


def resolve_init_from(path: str) -> str:
  """Directory holding `variables/`: `path` itself or a training run's `selected_model/`."""
  path = os.path.abspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, SELECTED_MODEL_DIR)):
    if os.path.isdir(os.path.join(candidate, "variables")):
      return candidate
  raise FileNotFoundError(
      f"config.init_from={path!r} holds no 'variables/' checkpoint: give a directory written by "
      "experiments/port_weights.py or a finished training run (its selected_model/).")


def initialise_from(state: steps.TrainState, init_from: str, model_config: Mapping[str, Any]
                    ) -> tuple[steps.TrainState, dict[str, Any]]:
  """`state` with every parameter / BatchNorm statistic that `init_from` holds (same path and
  shape) loaded; the rest (e.g. a new head) keeps its fresh initialisation."""
  directory = resolve_init_from(init_from)
  source_run = describe_source_run(init_from, model_config)
  pretrained, metadata = checkpoint.load_variables(directory)
  skip = tuple(metadata.get("kept_from_init", ()))  # random leaves a port did not fill
  merged, loaded, kept = porting.merge_variables(state.variables, pretrained, skip)
  if not loaded:
    raise ValueError(f"config.init_from={init_from!r}: none of its arrays matches a parameter of "
                     f"config.model ({dict(model_config)}); wrong architecture?")
  source_config = metadata.get("model_config") or {}
  for field in ("bn_epsilon",):
    if field in source_config and field in model_config and (
        source_config[field] != model_config[field]):
      logging.warning("config.init_from weights expect model.%s=%s; config.model has %s.",
                      field, source_config[field], model_config[field])
  logging.info("Initialised %d arrays from %s; %d keep their fresh initialisation: %s",
               len(loaded), directory, len(kept), kept[:8])
  state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, merged["params"]),
                        batch_stats=jax.tree_util.tree_map(
                            jnp.asarray, merged.get("batch_stats", {})))
  report = {"init_from": directory, "loaded": len(loaded), "kept_from_init": kept,
            "preprocessing": metadata.get("preprocessing")}
  if source_run is not None:
    report["source_run"] = source_run
  return state, report


def describe_source_run(init_from: str, model_config: Mapping[str, Any]
                        ) -> dict[str, Any] | None:
  """What a training run given as config.init_from was (its config.json: dataset, model, test
  accuracy), or None for other weights; raises ValueError naming both models when its
  architecture is not config.model's (only the head and input size may differ)."""
  from medxai_jax import runs  # runs uses this module

  run_dir = runs.source_run_dir(init_from)
  if run_dir is None:
    return None
  source = runs.read_run_config(run_dir)
  differing = runs.check_compatible_models(
      source.model, model_config, source_name=f"config.init_from={run_dir!r}",
      target_name="config.model")
  metrics = runs.Run(run_dir, source).metrics() or {}
  description = {"directory": run_dir, "dataset": source.dataset.name,
                 "builder_config": source.dataset.get("builder_config", ""),
                 "filter": source.dataset.get("filter", ""), "model": source.model.to_dict(),
                 "head_fields_changed": differing,
                 "test_accuracy": (metrics.get("test") or {}).get("accuracy")}
  logging.info("config.init_from is the training run %s (dataset %s, model %s, test accuracy "
               "%s)%s.", run_dir, description["dataset"], description["model"],
               description["test_accuracy"],
               f"; new values of {differing}" if differing else "")
  return description


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains with checkpoints and resumption, selects an epoch, and evaluates it on the test split.

  Writes `config.json`, `history.jsonl` (one line per epoch) and `metrics.json` into `workdir`,
  checkpoints into `workdir/checkpoints/{latest,best}`, and returns the metrics.json content.
  metrics.json (strict JSON: an undefined metric is null, with a warning) holds `class_names`,
  the test metrics and, when the test records carry `study_id` / `body_part`, `test_by_study`
  (MURA's study-level metrics) and `test_by_body_part`. Also writes `splits.json` (class names,
  examples per class of each split after config.dataset.filter) and `predictions_test.npz`
  (`write_predictions`).
  `config.train` freezes parameters (`freeze.py`: the head only, the last N layers, a head-only
  warm-up), sets the compute dtype and gradient accumulation; `config.augment` transforms
  training batches on the device (`data/augment.py`).

  The steps run data-parallel over every device (`parallel.py`): the state replicated, each
  global batch of config.batch_size rows split over the devices. On several hosts (after
  `parallel.initialize_distributed`) every process runs this function; process 0 writes the
  JSON files, all of them write their part of the checkpoints.

  One run per workdir: the run holds `workdir.RunLock` while it runs; a second one raises
  `workdir.WorkdirLockedError` naming the holder. A workdir holding checkpoints is resumed, after
  `workdir.check_resume` compared the config with the run's config.json: a change to what was
  trained raises `workdir.ConfigChangeError` before anything is written; allowed changes are
  appended to `config_history.jsonl`. SIGTERM stops training after the current step with a
  checkpoint of it (`checkpoints/partial`, also written every config.checkpoint.every_steps
  steps) and raises `preemption.Preempted` (exit status 0); the next run continues from that
  step exactly as an uninterrupted run would.

  Process 0 also writes TensorBoard summaries into `workdir/tensorboard/` (`config.summaries`:
  the config as text; loss, accuracy, learning rate and images/s of the steps since the last
  log line, every config.log_every_steps steps, as 'train/<name>'; every number of an epoch's
  history.jsonl line as 'epoch/<key>'; the test metrics as 'test/<metric>'; a Grad-CAM overlay
  of the first config.summaries.num_images validation images per epoch as 'gradcam/<i>') and
  each phase's wall and compile seconds into `timings.json` (observe/timing.py).
  `config.profile_steps='a,b'` traces global steps a..b into `workdir/profile/`
  (observe/profiling.py).
  """
  check_config(config)
  fine_tuning = train_settings(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh,
                            accumulation_steps=fine_tuning["accumulation_steps"])
  workdir = prepare_workdir(workdir)
  with workdir_lib.RunLock(workdir, jax.process_index()), \
      preemption.SigtermWatch() as sigterm, \
      profiling.StepProfiler(os.path.join(workdir, profiling.PROFILE_DIR),
                             profiling.parse_steps(config.get("profile_steps"))) as profiler, \
      summaries.create_writer(workdir, enabled=jax.process_index() == 0 and (
          summary_settings(config)["enabled"])) as writer:
    return _train_in_workdir(config, workdir, mesh, sigterm, writer=writer, profiler=profiler)


def fixed_summary_images(source: pipeline.RandomAccessSource, label_key: str, count: int
                         ) -> dict[str, np.ndarray] | None:
  """The stored images and labels of the first `count` records of `source` (the validation
  split): the fixed images whose Grad-CAM the summaries show every epoch. None when `count` is
  0, and (with a warning) on several processes, where no process holds the whole model's
  inputs to run it alone."""
  if count == 0 or len(source) == 0:
    return None
  if jax.process_count() > 1:
    logging.warning("config.summaries.num_images=%d: Grad-CAM summary images are drawn in "
                    "single-process runs only; this run has %d processes, so none are written.",
                    count, jax.process_count())
    return None
  rows = source.__getitems__(list(range(min(count, len(source)))))
  return {"images": np.stack([np.asarray(row["image"]) for row in rows]),
          "labels": np.asarray([int(row[label_key]) for row in rows], np.int32)}


def grad_cam_inputs(model: base.Classifier, preprocess: Any, variables: base.Variables,
                    images: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Grad-CAM maps [B, H, W] of the stored `images`' `targets` at the model's last
  convolution, and the preprocessed inputs [B, H, W, C] they explain (both float32)."""
  inputs = preprocess(images)
  maps = cam.grad_cam(model.split(variables, "last_conv"), inputs, targets)
  return maps.astype(jnp.float32), inputs.astype(jnp.float32)


def write_grad_cam_images(writer: summaries.Writer, step: int, cam_fn: Any,
                          variables: base.Variables, fixed: Mapping[str, np.ndarray]
                          ) -> Mapping[str, np.ndarray] | None:
  """Writes the 'gradcam/<i>' overlays of the `fixed` images at `step`; returns `fixed`, or
  None, with a warning, when the model has no spatial last convolution for Grad-CAM."""
  try:
    maps, inputs = jax.device_get(cam_fn(variables, fixed["images"], fixed["labels"]))
  except ValueError as error:
    logging.warning("No Grad-CAM summary images (config.summaries.num_images=0 silences "
                    "this): %s", error)
    return None
  writer.images(step, summaries.grad_cam_overlays(maps, inputs))
  return fixed


def record_run_start(config: ml_collections.ConfigDict, workdir: str, *, completed_epochs: int,
                     partial_step: int | None, dataset: Mapping[str, Any], lead: bool) -> None:
  """Checks a resumed run's config against its config.json (raising ConfigChangeError before
  anything is written), then writes config.json, prepared_dataset.json and, for allowed
  changes, a config_history.jsonl line. A new run (no checkpoint) starts a fresh record."""
  config_file = runs.config_path(workdir)
  resuming = completed_epochs > 0 or partial_step is not None
  given = json.loads(config.to_json_best_effort())  # as config.json stores it
  history_file = os.path.join(workdir, workdir_lib.CONFIG_HISTORY_FILE)
  if resuming and os.path.isfile(config_file):
    run_dataset = workdir_lib.read_prepared_dataset(workdir)
    if run_dataset is None:
      logging.warning("%s has no %s (a run from before it was recorded): the prepared dataset "
                      "cannot be compared; recording the current one.", workdir,
                      workdir_lib.PREPARED_DATASET_FILE)
    differences = workdir_lib.check_resume(
        runs.read_run_config(workdir), given, config_file=config_file,
        completed_epochs=completed_epochs, run_dataset=run_dataset, dataset=dataset)
    if differences:
      logging.info("Resuming %s (%d epochs done) with changed field(s), recorded in %s:%s",
                   workdir, completed_epochs, history_file,
                   "".join(f"\n  {difference}" for difference in differences))
      if lead:
        workdir_lib.record_config_change(workdir, completed_epochs, partial_step, differences)
  elif resuming:
    logging.warning("%s holds checkpoints but no config.json: the config they were trained "
                    "with cannot be checked; writing this one.", workdir)
  elif lead and os.path.exists(history_file):
    os.remove(history_file)  # the record of an earlier run that never checkpointed
  if lead:
    with open(config_file, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    workdir_lib.write_prepared_dataset(workdir, dataset)


def input_settings(config: ml_collections.ConfigDict) -> dict[str, int]:
  """config.input's worker count and read-ahead (`pipeline.batch_iterator`), checked."""
  settings = {"workers": int(config.input.workers), "prefetch": int(config.input.prefetch)}
  for name, value in settings.items():
    if value < 0:
      raise ValueError(f"config.input.{name} must be an integer >= 0, got {value}.")
  return settings


def _train_in_workdir(config: ml_collections.ConfigDict, workdir: str, mesh: Any,
                      sigterm: preemption.SigtermWatch, *, writer: summaries.Writer | None = None,
                      profiler: profiling.StepProfiler | None = None) -> dict[str, Any]:
  """`train_and_evaluate` in a prepared, locked workdir, SIGTERM watched by `sigterm`,
  summaries written through `writer`, steps profiled by `profiler`."""
  writer = writer or summaries.NullWriter()
  profiler = profiler or profiling.StepProfiler("", None)
  fine_tuning = train_settings(config)
  inputs = input_settings(config)  # the input pipeline's workers and read-ahead
  accumulation_steps = fine_tuning["accumulation_steps"]
  eval_batch_size = parallel.round_up_batch_size(
      config.get("eval_batch_size") or config.batch_size, mesh)
  replicated = parallel.replicated_sharding(mesh)
  data_sharding = parallel.batch_sharding(mesh)
  lead = jax.process_index() == 0  # writes the JSON files
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.checkpoint.max_to_keep)
  try:
    record_run_start(config, workdir, completed_epochs=store.latest_step() or 0,
                     partial_step=store.partial_step(),
                     dataset=workdir_lib.prepared_dataset(config.dataset), lead=lead)
  except BaseException:
    store.close()
    raise
  writer.text(0, "config", summaries.config_markdown(config.to_json_best_effort(indent=2)))
  phase_start = time.perf_counter()
  dataset = config.dataset
  splits = [dataset.train_split, dataset.validation_split, dataset.test_split]
  sources = pipeline.load_sources(dataset, splits)
  train_source = sources[dataset.train_split]
  model, tx, preprocess = build_components(config)
  classes = model.num_classes
  features = dataset_features(dataset)
  names = class_names(features, dataset.label_key, classes)
  # After config.dataset.filter; shuffled training labels are a permutation: the same counts.
  counts = {role: class_counts(pipeline.read_feature(sources[split], dataset.label_key),
                               classes, split)
            for role, split in zip(("train", "validation", "test"), splits)}
  weights = resolve_class_weights(config.class_weights, np.asarray(counts["train"]))
  warned: set[tuple[str, str]] = set()
  steps_per_epoch = pipeline.num_batches(len(train_source), config.batch_size, True)
  if steps_per_epoch == 0:
    raise ValueError(f"The training split has {len(train_source)} examples, fewer than "
                     f"config.batch_size={config.batch_size}.")
  # Each phase's wall seconds and compile estimate (observe/timing.py), written at the end.
  phases: dict[str, dict[str, Any]] = {
      "train/prepare_data": {"wall_seconds": time.perf_counter() - phase_start}}
  state = steps.create_train_state(model, tx, jax.random.key(config.seed))
  history_path = os.path.join(workdir, "history.jsonl")
  loop = LoopState(learning_rate=config.learning_rate)
  init_report = None
  latest_epoch, partial_step = store.latest_step(), store.partial_step()
  # A mid-epoch checkpoint older than the newest epoch one was superseded (a kill between them).
  resume_partial = partial_step is not None and partial_step > (latest_epoch or 0) * (
      steps_per_epoch)
  position = None  # where in an epoch a mid-epoch checkpoint stopped
  if config.get("init_from") and latest_epoch is None and not resume_partial:
    state, init_report = initialise_from(state, config.init_from, config.model)
  state = parallel.replicate(state, mesh)
  if resume_partial:
    state, metadata = store.restore_partial(state)  # into the replicated template's sharding
    loop = LoopState.from_json(metadata["loop"])
    position = metadata["position"]
    if lead:
      _truncate_history(history_path, loop.epoch)
    logging.info("Resumed from %s/partial at epoch %d, step %d of %d.", store.directory,
                 loop.epoch + 1, position["step"], steps_per_epoch)
  elif latest_epoch is not None:
    state, metadata = store.restore_latest(state)  # into the replicated template's sharding
    loop = LoopState.from_json(metadata["loop"])
    if lead:
      _truncate_history(history_path, loop.epoch)
    logging.info("Resumed from %s at epoch %d.", store.directory, loop.epoch)
  elif lead and os.path.exists(history_path):
    os.remove(history_path)

  head_only_epochs = fine_tuning["head_only_epochs"]
  main_mask = None if fine_tuning["trainable"] == "all" else freeze.trainable_mask(
      model, fine_tuning["trainable"], fine_tuning["num_trainable_layers"])
  head_mask = freeze.trainable_mask(model, "head") if head_only_epochs else None
  if head_mask is not None and head_mask == main_mask:
    head_mask = main_mask  # trainable='head' with a warm-up: one mask, one compilation
  augment_fn = augment_lib.make_augment_fn(config.get("augment") or {})
  compiled_steps = {}

  def train_step_for(mask: Any):
    """The jitted train step of a trainable mask (one compilation per mask)."""
    if id(mask) not in compiled_steps:
      compiled_steps[id(mask)] = jax.jit(functools.partial(
          steps.train_step, model=model, tx=tx, preprocess=preprocess,
          class_weights=None if weights is None else jnp.asarray(weights, jnp.float32),
          augment=augment_fn, trainable=mask, accumulation_steps=accumulation_steps,
          bit_depth=config.preprocess.get("bit_depth")),
          in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
          donate_argnums=0)
    return compiled_steps[id(mask)]

  def eval_outputs(state: steps.TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Eval logits and losses with the batch's labels and weights (all replicated)."""
    out = steps.eval_step(state, batch, model=model, preprocess=preprocess)
    return dict(out, label=batch["label"], weight=batch["weight"])

  eval_jit = jax.jit(eval_outputs, in_shardings=(replicated, data_sharding),
                     out_shardings=replicated)
  summary_images = fixed_summary_images(
      sources[dataset.validation_split], dataset.label_key,
      summary_settings(config)["num_images"] if not isinstance(
          writer, summaries.NullWriter) else 0)
  cam_jit = jax.jit(lambda variables, images, targets: grad_cam_inputs(
      model, preprocess, variables, images, targets))

  def eval_fn(state: steps.TrainState, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The jitted eval step on a host batch, sharded over the mesh."""
    return eval_jit(state, parallel.shard_batch(batch, mesh))

  def host_source(source: pipeline.RandomAccessSource, batch_size: int):
    """`source`, or on several hosts a view that decodes only this process's rows."""
    if jax.process_count() == 1:
      return source
    return parallel.ProcessLocalSource(source, parallel.local_rows(mesh, batch_size), batch_size)
  selection_metric = config.selection.metric
  selection_mode = _mode(selection_metric, config.selection.get("mode"))
  stopping = config.early_stopping
  run_start = time.time()
  every_steps = int(config.checkpoint.get("every_steps") or 0)
  sigterm_step = preemption.hooked_sigterm_step()
  num_processes = jax.process_count()

  def preempted(message: str) -> preemption.Preempted:
    """Closes the checkpoints and logs why the run stops; the exception to raise."""
    store.close()
    logging.warning("%s", message)
    return preemption.Preempted(message)

  first_epoch = loop.epoch
  first_calls: dict[int, float] = {}  # seconds of each compiled train step's first call
  step_seconds, compile_seconds, validation_seconds, summary_seconds = 0.0, 0.0, [], 0.0
  if loop.stopped_early and first_epoch < config.num_epochs:
    logging.info("The run stopped early after epoch %d; it is not trained further.", first_epoch)
  last_epoch = first_epoch if loop.stopped_early else config.num_epochs
  for epoch in range(first_epoch, last_epoch):
    learning_rate = _epoch_learning_rate(config, epoch, loop)
    state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, learning_rate))
    mask = freeze.epoch_mask(epoch, head_only_epochs, head_mask, main_mask)
    train_step = train_step_for(mask)
    trainable_parameters = (base.parameter_count({"params": state.params}) if mask is None
                            else freeze.count_trainable(state.params, mask))
    if epoch == first_epoch or epoch == head_only_epochs:
      logging.info("Epoch %d trains %d of %d parameters%s.", epoch + 1, trainable_parameters,
                   base.parameter_count({"params": state.params}),
                   " (head-only warm-up)" if epoch < head_only_epochs else "")
    epoch_start = time.time()
    # A resumed epoch continues its training sums (same additions, same order: same floats).
    resumed = position if position is not None and position["epoch"] == epoch else None
    position = None
    done_steps = int(resumed["step"]) if resumed else 0
    totals = (dict(resumed["totals"]) if resumed else
              {"loss_sum": 0.0, "correct": 0.0, "count": 0.0})
    seconds_before = float(resumed["train_seconds"]) if resumed else 0.0
    pending = []
    window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "steps": 0, "start": epoch_start}
    epoch_first_calls = []
    # The epoch's batches in (seed, epoch) order; a resumed epoch continues grain's saved
    # iterator state at the next batch.
    batches = pipeline.BatchStream.resume(
        pipeline.batch_dataset(host_source(train_source, config.batch_size),
                               batch_size=config.batch_size, label_key=dataset.label_key,
                               seed=config.seed, epoch=epoch, shuffle=True, drop_remainder=True),
        resumed.get("input") if resumed else None, done_steps, **inputs,
        where=f"{store.directory}/partial")
    for index, host_batch in enumerate(batches, start=done_steps + 1):
      batch = parallel.shard_batch(host_batch, mesh)
      global_step = epoch * steps_per_epoch + index
      profiler.before_step(global_step)
      call_start = time.perf_counter()
      state, stats = train_step(state, batch)
      if id(mask) not in first_calls:  # includes the compilation: timed to its end
        jax.block_until_ready(stats)
        first_calls[id(mask)] = time.perf_counter() - call_start
        epoch_first_calls.append(first_calls[id(mask)])
      profiler.after_step(global_step, stats)
      pending.append(stats)
      window["steps"] += 1
      if global_step == sigterm_step:
        preemption.send_sigterm_to_self()
      log_now = index % config.log_every_steps == 0 or index == steps_per_epoch
      periodic = bool(every_steps) and index % every_steps == 0
      # Several processes must agree to stop at the same step: they compare at sync points.
      stop = index < steps_per_epoch and (sigterm.requested if num_processes == 1 else (
          (log_now or periodic) and sigterm.agreed(num_processes)))
      save_now = index < steps_per_epoch and (stop or periodic)
      if log_now or save_now:
        fetched = jax.device_get(pending)
        pending = []
        for item in fetched:
          _check_finite(float(item["loss"]), epoch, int(state.step), learning_rate,
                        store.directory, store.latest_step())
          for key in totals:
            totals[key] += float(item[key])
            window[key] += float(item[key])
      if log_now:
        now = time.time()
        elapsed = now - epoch_start
        remaining = (steps_per_epoch - index) + steps_per_epoch * (config.num_epochs - epoch - 1)
        done_now = index - done_steps
        logging.info(
            "epoch %d/%d step %d/%d loss %.4f acc %.3f lr %.2g | %.1f img/s | ETA %s",
            epoch + 1, config.num_epochs, index, steps_per_epoch,
            totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"],
            learning_rate, done_now * config.batch_size / elapsed,
            progress.format_duration(remaining * elapsed / done_now))
        # The steps since the last line: their mean loss and accuracy, their images per second.
        writer.scalars(global_step, {
            "train/loss": window["loss_sum"] / window["count"],
            "train/accuracy": window["correct"] / window["count"],
            "train/learning_rate": learning_rate,
            "train/images_per_second":
            window["steps"] * config.batch_size / max(now - window["start"], 1e-9)})
        window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "steps": 0, "start": now}
      if save_now:
        store.save_partial(global_step, state, {
            "loop": loop.to_json(),
            "position": {"epoch": epoch, "step": index, "totals": totals,
                         "train_seconds": seconds_before + time.time() - epoch_start,
                         "input": batches.state()}})
      if stop:
        batches.close()
        raise preempted(
            f"Stopped on SIGTERM after step {index} of {steps_per_epoch} of epoch {epoch + 1}, "
            f"checkpointed in {store.directory}/partial/{global_step}. Run the same command "
            "again to continue from this step.")
    train_seconds = seconds_before + time.time() - epoch_start
    this_run = time.time() - epoch_start  # this invocation's part of the epoch
    step_seconds += this_run
    steady_steps = index - done_steps - len(epoch_first_calls)  # steps without a compilation
    steady = ((this_run - sum(epoch_first_calls)) / steady_steps if steady_steps > 0 else None)
    compile_seconds += sum(timing.compile_estimate(first, steady) or 0.0
                           for first in epoch_first_calls)
    train_loss = totals["loss_sum"] / totals["count"]
    train_accuracy = totals["correct"] / totals["count"]
    validation_start = time.perf_counter()
    validation, _, _ = evaluate(
        state, host_source(sources[dataset.validation_split], eval_batch_size),
        eval_fn=eval_fn, batch_size=eval_batch_size, label_key=dataset.label_key,
        split=dataset.validation_split, warned=warned, **inputs)
    validation_seconds.append(time.perf_counter() - validation_start)
    completed = epoch + 1

    score = selection_score(selection_metric, train_accuracy, validation)
    is_best = optim.improved(score, loop.best_score, selection_mode)
    if is_best:
      loop.best_score, loop.best_epoch = score, completed
    if config.schedule.name == "plateau":
      loop.learning_rate, loop.plateau = plateau_step(config, learning_rate, validation,
                                                      loop.plateau)
    if stopping.patience:
      (loop.early_stopping_best, loop.epochs_since_improvement,
       loop.stopped_early) = early_stopping_step(config, validation, loop.early_stopping_best,
                                                 loop.epochs_since_improvement)
    loop.epoch = completed

    record = {"epoch": completed, "step": int(state.step), "learning_rate": learning_rate,
              "train_loss": train_loss, "train_accuracy": train_accuracy,
              "train_seconds": train_seconds, "trainable_parameters": trainable_parameters,
              "images_per_second":
              steps_per_epoch * config.batch_size / train_seconds, "selected": is_best,
              **{f"val_{k}": v for k, v in validation.items()}}
    if lead:
      _append_jsonl(history_path, record)
    writer.scalars(record["step"], summaries.numeric_items(record, "epoch/"))
    if summary_images is not None:
      images_start = time.perf_counter()
      summary_images = write_grad_cam_images(writer, record["step"], cam_jit, state.variables,
                                             summary_images)
      summary_seconds += time.perf_counter() - images_start
    metadata = {"loop": loop.to_json(), "record": record}
    if is_best:
      store.save_best(completed, state, metadata)
    store.save_latest(completed, state, metadata)
    store.delete_partial()  # superseded by the epoch checkpoint
    logging.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auc %s%s",
                 completed, train_loss, train_accuracy, validation["loss"],
                 validation["accuracy"], _format_metric(validation["roc_auc"]),
                 " (best)" if is_best else "")
    if loop.stopped_early:
      logging.info("Early stopping after epoch %d (%s did not improve for %d epochs).",
                   completed, stopping.metric, stopping.patience)
      break
    if completed < config.num_epochs and sigterm.agreed(num_processes):
      raise preempted(f"Stopped on SIGTERM after epoch {completed}, checkpointed in "
                      f"{store.directory}. Run the same command again to continue.")

  profiler.stop()  # a run that ends before the last profiled step
  if validation_seconds:  # epochs trained now (a finished run keeps its recorded timings)
    phases["train/steps"] = {"wall_seconds": step_seconds, "compile_seconds": compile_seconds}
    phases["train/validation"] = {
        "wall_seconds": sum(validation_seconds), "compile_seconds": timing.compile_estimate(
            validation_seconds[0], float(np.mean(validation_seconds[1:])))
        if len(validation_seconds) > 1 else None}
    if summary_seconds:
      phases["train/summary_images"] = {"wall_seconds": summary_seconds}
  phase_start = time.perf_counter()
  best_state, best_metadata = store.restore_best(state)
  test_source = sources[dataset.test_split]
  present = [key for key in RECORD_FEATURES if key in test_source.__getitems__([0])[0]]
  single = jax.process_count() == 1
  test_features: dict[str, np.ndarray] = {}
  test, test_logits, test_labels = evaluate(
      best_state, host_source(test_source, eval_batch_size), eval_fn=eval_fn,
      batch_size=eval_batch_size, label_key=dataset.label_key, split=dataset.test_split,
      warned=warned, feature_keys=present if single else (), features=test_features, **inputs)
  if not single:  # host batches hold this process's rows only: read the features in order
    test_features = pipeline.read_features(test_source, present)
  test_features = {key: text_column(value, feature_names(features, key))
                   for key, value in test_features.items()}
  store.close()
  phases["train/test"] = {"wall_seconds": time.perf_counter() - phase_start}
  writer.scalars(int(state.step), summaries.numeric_items(test, "test/"))
  writer.flush()
  result = {"selected_epoch": best_metadata["loop"]["best_epoch"],
            "selection_metric": selection_metric, "epochs_run": loop.epoch,
            "stopped_early": loop.stopped_early, "validation": best_metadata["record"],
            "test": test, "train_wall_seconds": time.time() - run_start,
            "num_parameters": base.parameter_count({"params": best_state.params}),
            "devices": [str(device) for device in jax.devices()],
            "num_devices": parallel.num_shards(mesh), "num_processes": jax.process_count(),
            "global_batch_size": config.batch_size,
            "per_device_batch_size": config.batch_size // parallel.num_shards(mesh),
            "eval_batch_size": eval_batch_size, "accumulation_steps": accumulation_steps,
            "compute_dtype": fine_tuning["compute_dtype"], "class_names": names,
            **grouped_metrics(test_labels, test_logits, test_features, "test", warned)}
  if init_report is not None:
    result["init_from"] = {k: v for k, v in init_report.items() if k != "kept_from_init"}
    result["init_from"]["kept_from_init"] = len(init_report["kept_from_init"])
  checkpoint.save_variables(
      os.path.join(workdir, SELECTED_MODEL_DIR), best_state.variables,
      {"model_config": config.model.to_dict(), "selected_epoch": result["selected_epoch"],
       "kept_from_init": []})
  if lead:
    for phase, fields in phases.items():
      timing.record_phase(workdir, phase, **fields)
    metrics_lib.write_json(os.path.join(workdir, "metrics.json"), result)
    metrics_lib.write_json(os.path.join(workdir, SPLITS_FILE),
                           {"class_names": names, "counts": counts})
    write_predictions(os.path.join(workdir, PREDICTIONS_FILE), test_labels, test_logits,
                      test_features)
  logging.info("Test (epoch %d): accuracy %.4f, ROC AUC %s, kappa %s.",
               result["selected_epoch"], test["accuracy"], _format_metric(test["roc_auc"]),
               _format_metric(test["cohen_kappa"]))
  if "test_by_study" in result:
    study = result["test_by_study"]
    logging.info("Test, study level (%d studies): accuracy %.4f, ROC AUC %s, kappa %s.",
                 study["num_examples"], study["accuracy"], _format_metric(study["roc_auc"]),
                 _format_metric(study["cohen_kappa"]))
  return result


def check_trained(workdir: str) -> str:
  """The absolute `workdir`; raises FileNotFoundError, creating nothing, unless it holds a
  selected ('best') checkpoint of a training run."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  best = os.path.join(workdir, "checkpoints", "best")
  steps_saved = [n for n in os.listdir(best) if n.isdigit()] if os.path.isdir(best) else []
  if not steps_saved:
    where = "does not exist" if not os.path.isdir(workdir) else f"has no checkpoint in {best}"
    raise FileNotFoundError(f"The training run {workdir!r} {where}; give the --workdir of a "
                            "`python -m experiments.train` run that finished an epoch.")
  return workdir


def restore_selected_model(config: ml_collections.ConfigDict, workdir: str
                           ) -> tuple[base.Classifier, dict[str, Any]]:
  """The model of a config (computing in float32, whatever config.train.compute_dtype) and the
  variables of its best checkpoint in `workdir`."""
  check_trained(workdir)
  model, tx, _ = build_components(config, compute_dtype="float32")
  template = steps.create_train_state(model, tx, jax.random.key(config.seed))
  store = checkpoint.CheckpointStore(os.path.join(os.path.abspath(workdir), "checkpoints"))
  state, _ = store.restore_best(template)
  store.close()
  return model, state.variables
