"""What a training config builds: the model, optimiser and preprocessing, class names and
counts of the dataset, the class weights of the loss."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medxai_jax.data import pipeline
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import base
from medxai_jax.models import registry
from medxai_jax.train import optim
from medxai_jax.train import schema

Preprocess = Callable[[jax.Array], jax.Array]


def model_fields(config: ml_collections.ConfigDict, compute_dtype: str | None = None
                 ) -> dict[str, Any]:
  """config.model as keyword arguments, with `dtype` set for a non-float32 compute dtype."""
  fields = dict(config.model)
  dtype = compute_dtype or schema.train_settings(config)["compute_dtype"]
  if dtype not in schema.COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={dtype!r} is not one of {list(schema.COMPUTE_DTYPES)}.")
  if dtype != "float32":
    if "dtype" in fields:
      raise ValueError(f"config.model.dtype={fields['dtype']!r} and config.train.compute_dtype="
                       f"{dtype!r} both set the compute dtype; set only compute_dtype.")
    fields["dtype"] = getattr(jnp, dtype)
  return fields


def build_model(config: ml_collections.ConfigDict, compute_dtype: str | None = None
                ) -> base.Classifier:
  """The model of a config, computing in `compute_dtype` (default: config.train.compute_dtype);
  its parameters are float32 whatever the compute dtype."""
  return registry.build_model(model_fields(config, compute_dtype))


def build_preprocess(config: ml_collections.ConfigDict, model: base.Classifier) -> Preprocess:
  """Stored images [B, H, W, C] -> the model's normalised inputs (config.preprocess)."""
  config = schema.with_defaults(config)
  return preprocess_lib.make_preprocess_fn(
      model.input_shape, tuple(config.preprocess.mean), tuple(config.preprocess.std),
      bit_depth=config.preprocess.bit_depth)


def build_components(config: ml_collections.ConfigDict, compute_dtype: str | None = None
                     ) -> tuple[base.Classifier, optax.GradientTransformation, Preprocess]:
  """Model (`build_model`), optimiser and preprocessing function of a config."""
  model = build_model(config, compute_dtype)
  tx = optim.make_optimizer(config.optimizer, config.learning_rate)
  return model, tx, build_preprocess(config, model)


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
