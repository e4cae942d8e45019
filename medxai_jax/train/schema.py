"""The training config's schema: its fields, their defaults and the checks of their values.

The defaults are `train/defaults.base_config()`'s (configs/common.py re-exports it), the one
place they are written.
`with_defaults` fills a config that lacks some of them (a config.json written before a field
existed, a config built by hand) so that the code reads every field directly, after
`migrate_config` has put a field that moved where it lives now.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from medxai_jax.train import defaults
from medxai_jax.data import augment as augment_lib
from medxai_jax.data import pipeline
from medxai_jax.observe import profiling
from medxai_jax.train import freeze

# Top-level fields of a training config: base_config's, plus the demo's own sections
# (`explain`, `annotation`: read by experiments/demo.py, kept in the one config it trains with).
DEMO_FIELDS = frozenset({"explain", "annotation"})
CONFIG_FIELDS = frozenset(defaults.base_config().keys()) | DEMO_FIELDS
# config.train.compute_dtype: the dtype of activations and matrix products; parameters,
# optimiser state, BatchNorm statistics and the loss stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")
# Selection/monitor metrics where larger is better; the rest ('loss') are minimised.
MAXIMISED = frozenset({"accuracy", "f1", "roc_auc", "cohen_kappa", "mcc", "precision",
                       "recall", "train_val_gap", "train_accuracy"})
# Selection metrics computed from the training epoch rather than the validation split.
TRAIN_METRICS = frozenset({"train_val_gap", "train_accuracy"})


def _merged(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
  """`defaults` with `given`'s values put in, section by section (given's extra fields kept)."""
  merged = dict(defaults)
  for key, value in given.items():
    if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
      merged[key] = _merged(merged[key], value)
    else:
      merged[key] = value
  return merged


def migrate_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` (e.g. a run's config.json) with the fields that moved where they live now.

  `dataset.phantoms` (the phantoms' settings before they were builder options, in every config
  written until then) becomes `dataset.builder` options, values unchanged, when the dataset is
  the phantoms; with another dataset it is left out, as that builder never read it. Setting an
  option in both places to different values is a ValueError naming them. Everything else is
  kept as it is; `config` itself is not changed.
  """
  dataset = config.get("dataset")
  if not isinstance(dataset, Mapping) or "phantoms" not in dataset:
    return dict(config)
  dataset = dict(dataset)
  settings = dict(dataset.pop("phantoms") or {})
  if dataset.get("name", pipeline.PHANTOMS_NAME) == pipeline.PHANTOMS_NAME:
    builder = dict(dataset.get("builder") or {})
    clashes = sorted(name for name, value in settings.items()
                     if builder.get(name) is not None and builder[name] != value)
    if clashes:
      raise ValueError(
          "config.dataset.phantoms and config.dataset.builder (where the phantoms' settings "
          f"live now) set {', '.join(clashes)} differently: "
          + "; ".join(f"phantoms.{name}={settings[name]!r}, builder.{name}={builder[name]!r}"
                      for name in clashes) + ".")
    builder.update(settings)
    dataset["builder"] = builder
  return {**config, "dataset": dataset}


def with_defaults(config: ml_collections.ConfigDict | Mapping[str, Any]
                  ) -> ml_collections.ConfigDict:
  """A copy of `config`, migrated (`migrate_config`), with every field it lacks set to
  base_config's default.

  Fields the defaults do not have (the model's, the demo's sections, a section's extra
  options) are kept; nothing else in `config` is changed or checked (`check_config` does that).
  """
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return ml_collections.ConfigDict(_merged(defaults.base_config().to_dict(),
                                           migrate_config(given)))


def monitor_mode(metric: str, mode: str) -> str:
  """`mode` ('max' | 'min') if set, else the natural one of `metric` ('' = natural)."""
  return mode or ("max" if metric in MAXIMISED else "min")


def _check_section(config: ml_collections.ConfigDict, section: str) -> None:
  """Raises a ValueError naming the fields of `config.<section>` that base_config lacks."""
  known = defaults.base_config()[section].keys()
  unknown = sorted(set(config[section].keys()) - set(known))
  if unknown:
    raise ValueError(f"config.{section} has unknown field(s) {unknown}; known: {list(known)}.")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming any unknown top-level field or impossible value."""
  unknown = sorted(set(config.keys()) - CONFIG_FIELDS)
  if unknown:
    raise ValueError(f"Unknown config field(s) {unknown}; known fields: {sorted(CONFIG_FIELDS)}.")
  config = with_defaults(config)
  for field in ("batch_size", "num_epochs"):
    if int(config[field]) <= 0:
      raise ValueError(f"config.{field} must be positive, got {config[field]}.")
  if not isinstance(config.eval_batch_size, int) or config.eval_batch_size <= 0:
    raise ValueError(f"config.eval_batch_size must be a positive integer (the validation and "
                     f"test batch), got {config.eval_batch_size!r}.")
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}.")
  for section in ("selection", "early_stopping", "schedule"):
    monitor = config[section].metric
    if monitor and monitor != "loss" and monitor not in MAXIMISED:
      raise ValueError(f"config.{section}.metric={monitor!r} is not one of "
                       f"{sorted(MAXIMISED | {'loss'})}.")
    if section != "selection" and monitor in TRAIN_METRICS:
      raise ValueError(f"config.{section}.metric={monitor!r} is only a selection metric; "
                       "monitor a validation metric.")
  settings = train_settings(config)
  if int(config.batch_size) % settings["accumulation_steps"]:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.train.accumulation_steps={settings['accumulation_steps']}.")
  augment_lib.check_augment_config(config.augment)
  every_steps = config.checkpoint.every_steps
  if not isinstance(every_steps, int) or every_steps < 0:
    raise ValueError(f"config.checkpoint.every_steps must be an integer >= 0 (0 = checkpoint at "
                     f"the end of each epoch only), got {every_steps!r}.")
  summary_settings(config)
  profiling.parse_steps(config.profile_steps)
  if not isinstance(config.init_from, str):
    raise ValueError(f"config.init_from must be a path string ('' = random initialisation), "
                     f"got {config.init_from!r}.")


def train_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Validated `config.train` (fine-tuning controls), base_config's defaults for missing fields."""
  config = with_defaults(config)
  _check_section(config, "train")
  settings = config.train.to_dict()
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
  """Validated `config.summaries`, base_config's defaults for missing fields."""
  config = with_defaults(config)
  _check_section(config, "summaries")
  settings = config.summaries.to_dict()
  if not isinstance(settings["enabled"], bool):
    raise ValueError(f"config.summaries.enabled must be True or False, got "
                     f"{settings['enabled']!r}.")
  if not isinstance(settings["num_images"], int) or settings["num_images"] < 0:
    raise ValueError(f"config.summaries.num_images must be an integer >= 0, got "
                     f"{settings['num_images']!r}.")
  return settings


def input_settings(config: ml_collections.ConfigDict) -> dict[str, int]:
  """config.input's worker count and read-ahead (`pipeline.batch_iterator`), checked."""
  settings = {"workers": int(config.input.workers), "prefetch": int(config.input.prefetch)}
  for name, value in settings.items():
    if value < 0:
      raise ValueError(f"config.input.{name} must be an integer >= 0, got {value}.")
  return settings
