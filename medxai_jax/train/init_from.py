"""config.init_from: a fresh training state started from saved weights (a port or a run)."""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp

from medxai_jax import runs
from medxai_jax.models import porting
from medxai_jax.train import checkpoint
from medxai_jax.train import steps


def initialise_from(state: steps.TrainState, init_from: str, model_config: Mapping[str, Any]
                    ) -> tuple[steps.TrainState, dict[str, Any]]:
  """`state` with every parameter / BatchNorm statistic that `init_from` holds (same path and
  shape) loaded; the rest (e.g. a new head) keeps its fresh initialisation."""
  directory = runs.resolve_init_from(init_from)
  source_run = runs.describe_source_run(init_from, model_config)
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
