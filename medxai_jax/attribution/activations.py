"""Layer-wise activations: maps at the taps, the most activated channels, first-layer filters.

000_09513d2f8ec1fa7b.txt (section 3, figures 4-11) shows, per image, the 16 most activated
feature maps at the initial convolution and at the end of each dense block; 002_5c5237004c36e0a4
.txt (figures 2-3) shows the first-layer filters and the most strongly activated channel of the
deepest convolution. Neither paper says how "most activated" is ranked: we rank channels by their
mean activation over the map (`reduce='max'` ranks by the peak instead).

The maps come from `api.Split`s (only their `features` are read), so any JAX network works:
`activation_grids` takes one split per layer, {name: split}; for the project's models
`model_splits(model, variables)` cuts at `grid_taps(model)`. The first-layer filters read a
Flax Linen model's parameters and stay on `base.Classifier`.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.attribution import common
from medxai_jax.models import base

REDUCTIONS = ("mean", "max")


def grid_taps(model: base.Classifier) -> tuple[str, ...]:
  """'stem' and the end of every block (taps named blockN), else the conv taps up to last_conv."""
  stem = model.resolve_tap("stem") if "stem" in model.aliases or "stem" in model.taps else None
  blocks = [tap for tap in model.taps if re.fullmatch(r"block\d+", tap)]
  if not blocks:
    last = model.taps.index(model.resolve_tap("last_conv"))
    blocks = list(model.taps[:last + 1])
  ordered = ([stem] if stem else []) + [tap for tap in blocks if tap != stem]
  return tuple(ordered)


def model_splits(model: base.Classifier, variables: base.Variables,
                 taps: Sequence[str] | None = None) -> dict[str, api.Split]:
  """{tap: model.split(variables, tap)} at `taps` (default `grid_taps(model)`), forward order."""
  taps = grid_taps(model) if taps is None else tuple(taps)
  return {tap: model.split(variables, tap) for tap in taps}


def _check_splits(splits: Mapping[str, api.Split]) -> None:
  """Raises a ValueError unless `splits` is a non-empty mapping of names to `api.Split`s."""
  if isinstance(splits, api.Split) or not isinstance(splits, Mapping) or not splits:
    raise ValueError("splits must be a non-empty mapping {name: api.Split} (one per layer, e.g. "
                     f"activations.model_splits(model, variables)); got {type(splits).__name__}.")
  wrong = [name for name, split in splits.items() if not isinstance(split, api.Split)]
  if wrong:
    raise ValueError(f"splits[{wrong[0]!r}] is not an api.Split.")


def activations_at(splits: Mapping[str, api.Split], images: jax.Array) -> dict[str, jax.Array]:
  """Activations {name: [B, h, w, C]} of each split's features (inference mode for the
  project's models)."""
  _check_splits(splits)
  cam.check_images(images)
  return {name: split.features(images) for name, split in splits.items()}


def channel_scores(activation: jax.Array, reduce: str = "mean") -> jax.Array:
  """Per-channel activation strength [B, C]: the mean (default) or max over the map."""
  common.check_images(activation, "activation")
  if reduce == "mean":
    return activation.mean(axis=(1, 2))
  if reduce == "max":
    return activation.max(axis=(1, 2))
  raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}.")


def top_k_channels(activation: jax.Array, k: int = 16, reduce: str = "mean") -> jax.Array:
  """Indices [B, min(k, C)] of each image's most activated channels, strongest first.

  Channels are ranked by mean activation over the map (000 shows the "top 16 most activated
  feature maps"); ties go to the lower channel index. Fewer than k channels returns them all.
  """
  common.check_positive("k", k)
  scores = channel_scores(activation, reduce)
  _, indices = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  return indices


def top_k_maps(activation: jax.Array, k: int = 16, reduce: str = "mean"
               ) -> tuple[jax.Array, jax.Array]:
  """(indices [B, k], maps [B, h, w, k]) of each image's k most activated channels."""
  indices = top_k_channels(activation, k, reduce)
  maps = jnp.take_along_axis(activation, indices[:, None, None, :], axis=-1)
  return indices, maps


def activation_grids(splits: Mapping[str, api.Split], images: jax.Array, *, k: int = 16,
                     reduce: str = "mean") -> dict[str, tuple[jax.Array, jax.Array]]:
  """{name: (indices [B, k], maps [B, h, w, k])}: the top-k maps of each split's features
  (000: 'stem' and each block end, `model_splits(model, variables)` for the project's models).

  Under jit the dict comes back key-sorted; the mapping's own order is the forward order.
  """
  return {name: top_k_maps(activation, k, reduce)
          for name, activation in activations_at(splits, images).items()}


def strongest_channel(split: api.Split, images: jax.Array, *, reduce: str = "mean"
                      ) -> tuple[jax.Array, jax.Array]:
  """(index [B], map [B, h, w]) of each image's most activated channel of the split's features
  (002 fig. 3 at the deepest convolution: `model.split(variables, 'last_conv')`)."""
  cam.check_images(images)
  indices, maps = top_k_maps(split.features(images), 1, reduce)
  return indices[:, 0], maps[..., 0]


def first_conv_path(model: base.Classifier, variables: base.Variables) -> tuple[str, ...]:
  """Module path of the first convolution the forward pass calls (found by intercepting calls)."""
  calls: list[tuple[str, ...]] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      calls.append(tuple(context.module.path))
    return next_fun(*args, **kwargs)

  dummy = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(model.logits, variables, dummy)
  if not calls:
    raise ValueError(f"{type(model.module).__name__} calls no nn.Conv; it has no conv filters.")
  return calls[0]


def first_layer_filters(model: base.Classifier, variables: base.Variables) -> jax.Array:
  """First conv layer's filters [F, kh, kw, C_in], each min-max scaled to [0, 1] (002 fig. 2)."""
  params = variables["params"]
  for name in first_conv_path(model, variables):
    params = params[name]
  kernel = jnp.moveaxis(jnp.asarray(params["kernel"]), -1, 0)          # [F, kh, kw, C_in]
  low = kernel.min(axis=(1, 2, 3), keepdims=True)
  span = kernel.max(axis=(1, 2, 3), keepdims=True) - low
  return jnp.where(span > 0, (kernel - low) / jnp.where(span > 0, span, 1.0), 0.0)
