"""TFDS dataset builders; importing this package registers them with tfds."""

from medxai_jax.data.builders.phantoms import (
  PhantomsBuilderConfig,
  RadiographPhantoms,
  load_phantoms_builder,
  make_builder_config,
)

__all__ = [
  "PhantomsBuilderConfig",
  "RadiographPhantoms",
  "load_phantoms_builder",
  "make_builder_config",
]
