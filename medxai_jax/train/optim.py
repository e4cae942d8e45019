"""Optimisers and the papers' epoch-level learning-rate schedules.

The learning rate is an injected hyperparameter of the optax state, so it is checkpointed with
the optimiser and changed between epochs by pure host-side schedule functions:

* `constant`;
* `step_decay` (000, section 2.2): the initial rate divided by `divisors[i]` from the epoch
  at `boundaries[i]` (fractions of the run), e.g. /10, /50, /100 at 25/50/75%;
* `plateau` (001, 002): multiply by `factor` when the monitored validation metric has not
  improved for `patience` epochs, at most `max_reductions` times and never below `min_lr`.

One per-step schedule lives inside the optimiser instead: SGD's `lr_decay` (003's Keras
`decay`), which scales the injected rate by 1 / (1 + lr_decay * step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import optax


def sgd_with_l2(learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0,
                nesterov: bool = False, lr_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum on the loss plus an L2 penalty (weight_decay/2 * |w|^2) on every parameter.

  `lr_decay` is Keras 2's SGD `decay` argument (003's "Decay 3e-4"): update t (from 0) uses the
  rate learning_rate / (1 + lr_decay * t), scaled into the gradient before the momentum trace,
  as Keras' velocity accumulates rate-scaled gradients. 0 (the default) leaves the optimiser
  state as without it.
  """
  sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  if not lr_decay:
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd)
  if lr_decay < 0:
    raise ValueError(f"config.optimizer.lr_decay must be >= 0, got {lr_decay}.")
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_schedule(lambda count: 1.0 / (1.0 + lr_decay * count)), sgd)


def inverse_time_rate(learning_rate: float, lr_decay: float, step: int) -> float:
  """The rate `sgd_with_l2(..., lr_decay=...)` applies at update `step` (0-based)."""
  return learning_rate / (1.0 + lr_decay * step)


def adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam (Keras' eps=1e-7 by default) with an optional coupled L2 penalty."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


_OPTIMIZERS = {"adam": adam, "sgd": sgd_with_l2}


def make_optimizer(optimizer_config: Mapping[str, Any], learning_rate: float
                   ) -> optax.GradientTransformation:
  """Optimiser named by `optimizer_config.name` with its learning rate injected (settable)."""
  fields = dict(optimizer_config)
  name = fields.pop("name", None)
  if name not in _OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={name!r} is not known; choose from {sorted(_OPTIMIZERS)}.")
  factory = _OPTIMIZERS[name]
  accepted = set(factory.__code__.co_varnames[:factory.__code__.co_argcount]) - {"learning_rate"}
  unknown = set(fields) - accepted
  if unknown:
    raise ValueError(f"config.optimizer has fields {sorted(unknown)} that {name!r} does not "
                     f"accept; it takes {sorted(accepted)}.")
  static = tuple(name for name in ("nesterov", "lr_decay") if name in accepted)
  return optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=learning_rate, **fields)


def get_learning_rate(opt_state: Any) -> float:
  """Current injected learning rate of an optimiser state made by `make_optimizer`."""
  return float(opt_state.hyperparams["learning_rate"])


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
  """Returns `opt_state` with its injected learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams)
  old = hyperparams["learning_rate"]
  new = jax.numpy.asarray(learning_rate, dtype=old.dtype)
  if isinstance(old, jax.Array) and old.committed:
    new = jax.device_put(new, old.sharding)  # e.g. replicated over a data-parallel mesh
  hyperparams["learning_rate"] = new
  return opt_state._replace(hyperparams=hyperparams)


@dataclasses.dataclass
class PlateauState:
  """Host-side memory of a reduce-on-plateau schedule (JSON-serialisable)."""

  best: float | None = None
  epochs_without_improvement: int = 0
  reductions: int = 0


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
  """Whether `value` beats `best` by more than `min_delta` in direction `mode` ('min'/'max')."""
  if mode not in ("min", "max"):
    raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
  if best is None or math.isnan(best):
    return not math.isnan(value)
  return value < best - min_delta if mode == "min" else value > best + min_delta


def step_decay_rate(initial: float, epoch: int, num_epochs: int,
                    boundaries: tuple[float, ...], divisors: tuple[float, ...]) -> float:
  """Learning rate at `epoch` (0-based) of a step-decay schedule over `num_epochs`."""
  if len(boundaries) != len(divisors):
    raise ValueError(f"schedule.boundaries {boundaries} and schedule.divisors {divisors} must "
                     "have the same length.")
  rate = initial
  for boundary, divisor in zip(boundaries, divisors):
    if epoch >= round(boundary * num_epochs):
      rate = initial / divisor
  return rate


def plateau_update(rate: float, metric: float, state: PlateauState, *, mode: str, factor: float,
                   patience: int, max_reductions: int | None, min_lr: float,
                   min_delta: float = 0.0) -> tuple[float, PlateauState]:
  """Rate for the next epoch after observing this epoch's monitored metric."""
  state = dataclasses.replace(state)
  if improved(metric, state.best, mode, min_delta):
    state.best = metric
    state.epochs_without_improvement = 0
    return rate, state
  state.epochs_without_improvement += 1
  can_reduce = max_reductions is None or state.reductions < max_reductions
  if state.epochs_without_improvement >= patience and can_reduce and rate > min_lr:
    rate = max(rate * factor, min_lr)
    state.reductions += 1
    state.epochs_without_improvement = 0
  return rate, state
