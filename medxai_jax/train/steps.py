"""Pure training and evaluation steps over a `TrainState` pytree."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import base
from medxai_jax.train import freeze

PreprocessFn = Callable[[jax.Array], jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
# fold_in data of the augmentation stream: above any step count, so the augmentation keys
# fold_in(fold_in(rng, AUGMENT_STREAM), step) never coincide with a dropout key fold_in(rng, step).
AUGMENT_STREAM = 0xFFFFFFFF


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree that orbax saves as is."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, folded with `step` for dropout

  @property
  def variables(self) -> dict[str, Any]:
    """Flax variables for `module.apply`."""
    variables = {"params": self.params}
    if self.batch_stats:
      variables["batch_stats"] = self.batch_stats
    return variables


def create_train_state(model: base.Classifier, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """Initialises parameters, BatchNorm statistics and the optimiser state."""
  init_rng, dropout_rng = jax.random.split(rng)
  variables = model.init(init_rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(dropout_rng))


def classification_loss(logits: jax.Array, labels: jax.Array,
                        class_weights: jax.Array | None = None) -> jax.Array:
  """Per-example loss: sigmoid BCE for one logit, softmax cross-entropy otherwise."""
  if logits.shape[-1] == 1:
    losses = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if class_weights is not None:
    losses = losses * class_weights[labels]
  return losses


def augment_rng(state: TrainState) -> jax.Array:
  """Augmentation key of the state's step (a stream independent of the dropout keys)."""
  stream = jax.random.fold_in(jax.random.wrap_key_data(state.rng), AUGMENT_STREAM)
  return jax.random.fold_in(stream, state.step)


def _micro_batches(x: jax.Array, accumulation_steps: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] where micro-batch i holds rows i, i + k, i + 2k, ...

  Strided rather than contiguous: when the batch is sharded over devices in contiguous blocks,
  every micro-batch then keeps an equal share of rows on each device (no data movement).
  """
  rows = x.shape[0] // accumulation_steps
  return jnp.swapaxes(x.reshape(rows, accumulation_steps, *x.shape[1:]), 0, 1)


def _whole_batch(x: jax.Array) -> jax.Array:
  """Inverse of `_micro_batches`: [k, B/k, ...] -> [B, ...] in the original row order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: base.Classifier,
               tx: optax.GradientTransformation, preprocess: PreprocessFn,
               class_weights: jax.Array | None = None, augment: AugmentFn | None = None,
               trainable: Any = None, accumulation_steps: int = 1,
               bit_depth: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a batch; returns the new state and summed batch statistics.

  `batch['weight']` (1 for real examples, 0 for padding) masks the loss; the loss is the weighted
  mean over real examples, with `class_weights` multiplying each example's term.
  `augment(key, images)` (optional) transforms the stored images, scaled to [0, 1] by
  `bit_depth` (as `preprocess_lib.to_unit_range`; the preprocess function's own), before
  `preprocess`; its key is `augment_rng(state)`, a function of the state's rng and step.
  `trainable` (optional, a params-shaped tree of Python bools, static) freezes the False leaves:
  their parameters, optimiser state and BatchNorm statistics stay bit-identical (see `freeze`).
  `accumulation_steps` = k > 1 splits the batch into k micro-batches (rows i, i + k, ...) run one
  after another by `lax.scan`, summing their loss gradients, then takes one optimiser step with
  the sum divided by the batch's real-example count: the same update as one step on the whole
  batch, with the activation memory of one micro-batch. BatchNorm layers then normalise with
  each micro-batch's own statistics and update their moving averages k times; dropout draws
  fold_in(key, i) for micro-batch i.
  """
  if accumulation_steps < 1 or batch["label"].shape[0] % accumulation_steps:
    raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1 and divide the batch "
                     f"size {batch['label'].shape[0]}.")
  images = batch["image"]
  if augment is not None:
    images = augment(augment_rng(state), preprocess_lib.to_unit_range(images, bit_depth))
  images = preprocess(images)
  labels = batch["label"]
  mask = batch["weight"].astype(jnp.float32)
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  frozen = not freeze.all_trainable(trainable)
  if frozen:
    freeze.check_mask(trainable, state.params)
  frozen_norms = freeze.frozen_modules(trainable) if frozen else frozenset()

  def summed_loss(params, batch_stats, images, labels, mask, rng):
    """Sum of the weighted per-example losses of a (micro-)batch, its logits and updates."""
    if frozen:
      params = freeze.stop_frozen_gradients(params, trainable)
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    with freeze.frozen_batch_norm(frozen_norms):
      logits, updates = model.train_apply(variables, images, rng)
    per_example = classification_loss(logits, labels, class_weights) * mask
    return per_example.sum(), (logits, updates)

  count = mask.sum()
  if accumulation_steps == 1:
    def loss_fn(params):
      total, aux = summed_loss(params, state.batch_stats, images, labels, mask, dropout_rng)
      return total / jnp.maximum(count, 1.0), aux

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = updates.get("batch_stats", state.batch_stats)
  else:
    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def accumulate(carry, micro):
      grad_sum, loss_sum, batch_stats = carry
      micro_images, micro_labels, micro_mask, index = micro
      (total, (micro_logits, updates)), grads = grad_fn(
          state.params, batch_stats, micro_images, micro_labels, micro_mask,
          jax.random.fold_in(dropout_rng, index))
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (grad_sum, loss_sum + total, updates.get("batch_stats", batch_stats)), micro_logits

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    split = functools.partial(_micro_batches, accumulation_steps=accumulation_steps)
    (grad_sum, loss_sum, batch_stats), micro_logits = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
        (split(images), split(labels), split(mask), jnp.arange(accumulation_steps)))
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grad_sum)
    loss = loss_sum / denominator
    logits = _whole_batch(micro_logits)

  optimizer = freeze.freeze_optimizer(tx, trainable) if frozen else tx
  param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  if frozen:
    params = freeze.select(trainable, params, state.params)
    if state.batch_stats:
      batch_stats = freeze.keep_frozen_collection(state.batch_stats, batch_stats, trainable)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  correct = (base.predicted_classes(logits) == labels).astype(jnp.float32) * mask
  stats = {"loss": loss, "loss_sum": loss * count, "correct": correct.sum(),
           "count": count, "grad_norm": optax.global_norm(grads)}
  return new_state, stats


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: base.Classifier,
              preprocess: PreprocessFn) -> dict[str, jax.Array]:
  """Inference logits and per-example (unweighted) loss for a batch."""
  logits = model.logits(state.variables, preprocess(batch["image"]))
  return {"logits": logits, "loss": classification_loss(logits, batch["label"])}
