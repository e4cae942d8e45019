"""Builds a model in the model contract from an ml_collections config."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from medxai_jax.models import base
from medxai_jax.models import custom_cnn
from medxai_jax.models import densenet
from medxai_jax.models import vgg

_BUILDERS: dict[str, Callable[..., base.Classifier]] = {
    "custom_cnn": custom_cnn.custom_cnn,
    "densenet": densenet.densenet,
    "vgg16": vgg.vgg16,
}


def available_models() -> list[str]:
  """Names accepted by `build_model`."""
  return sorted(_BUILDERS)


def build_model(model_config: Mapping[str, Any]) -> base.Classifier:
  """Builds `model_config.name` with the remaining fields as keyword arguments."""
  fields = dict(model_config)
  name = fields.pop("name", None)
  if name not in _BUILDERS:
    raise ValueError(f"config.model.name={name!r} is not a known model; choose from "
                     f"{available_models()}.")
  try:
    return _BUILDERS[name](**fields)
  except TypeError as error:
    raise ValueError(f"config.model has a field that {name!r} does not accept: {error}") from error
