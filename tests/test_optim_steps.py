"""Optimisers, schedules, losses and the pure train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import custom_cnn
from medxai_jax.train import optim
from medxai_jax.train import steps


def test_step_decay_of_paper_000():
  # 000: Adam 1e-4 divided by 10, 50, 100 at 25, 50, 75% of 32 epochs.
  rates = [optim.step_decay_rate(1e-4, e, 32, (0.25, 0.5, 0.75), (10, 50, 100))
           for e in range(32)]
  assert rates[:8] == [1e-4] * 8
  assert rates[8:16] == [1e-5] * 8
  assert rates[16:24] == [2e-6] * 8
  assert rates[24:] == [1e-6] * 8


def test_plateau_reduces_after_patience_at_most_max_times_and_not_below_min():
  rate, state = 1e-3, optim.PlateauState()
  trace = []
  for accuracy in [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
    rate, state = optim.plateau_update(rate, accuracy, state, mode="max", factor=0.1,
                                       patience=2, max_reductions=3, min_lr=2e-6)
    trace.append(rate)
  # Improvements at epochs 1-2; stalls from epoch 3; a reduction every 2 stalled epochs,
  # clipped at 2e-6 on the third reduction and never a fourth.
  np.testing.assert_allclose(trace, [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 2e-6, 2e-6, 2e-6])
  assert state.reductions == 3


def test_sgd_with_l2_matches_hand_update():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.5])}
  tx = optim.make_optimizer({"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}, 0.01)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Momentum buffer starts at g + wd * w; step = -lr * buffer.
  np.testing.assert_allclose(updates["w"], -0.01 * (np.array([0.5, 0.5]) + 0.1 * np.array([1.0, -2.0])),
                             rtol=1e-6)
  state = optim.set_learning_rate(state, 1e-4)
  assert optim.get_learning_rate(state) == pytest.approx(1e-4)


def test_unknown_optimizer_field_is_named():
  with pytest.raises(ValueError, match="momentun"):
    optim.make_optimizer({"name": "sgd", "momentun": 0.9}, 0.1)


def test_losses_match_formulas_and_class_weights_scale_terms():
  logits = jnp.array([[2.0], [-1.0], [0.5]])
  labels = jnp.array([1, 0, 0])
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5])))
  expected = -np.array([np.log(p[0]), np.log(1 - p[1]), np.log(1 - p[2])])
  np.testing.assert_allclose(steps.classification_loss(logits, labels), expected, rtol=1e-6)
  weighted = steps.classification_loss(logits, labels, jnp.array([3.0, 0.5]))
  np.testing.assert_allclose(weighted, expected * np.array([0.5, 3.0, 3.0]), rtol=1e-6)
  three = jnp.array([[1.0, 2.0, 0.0]])
  np.testing.assert_allclose(
      steps.classification_loss(three, jnp.array([2])),
      [np.log(np.exp([1.0, 2.0, 0.0]).sum())], rtol=1e-6)


def _separable_batch(rng, size=16):
  labels = rng.integers(0, 2, size)
  images = rng.integers(0, 60, (size, 48, 48, 1))
  images[labels == 1, 16:32, 16:32] += 150  # a bright square marks the positives
  return {"image": images.astype(np.uint8), "label": labels.astype(np.int32),
          "weight": np.ones(size, np.float32)}


@pytest.mark.parametrize("num_outputs,batchnorm", [(1, False), (2, True)])
def test_a_few_train_steps_lower_the_loss(num_outputs, batchnorm):
  model = custom_cnn.custom_cnn(num_outputs=num_outputs, input_shape=(48, 48, 1),
                                conv_widths=(8, 8, 8, 8, 8), dense_widths=(16, 16),
                                init_std=None, use_batchnorm=batchnorm, dropout_rate=0.0)
  tx = optim.make_optimizer({"name": "adam"}, 3e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess))
  batch = _separable_batch(np.random.default_rng(0))
  losses = []
  for _ in range(15):
    state, stats = step(state, batch)
    losses.append(float(stats["loss"]))  # training-mode loss before each update
  assert int(state.step) == 15
  assert losses[-1] < 0.5 * losses[0], losses


def test_padding_rows_do_not_change_the_update():
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1),
                                conv_widths=(4, 4, 4, 4, 4), dense_widths=(8, 8),
                                init_std=None, dropout_rate=0.0)
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess))
  batch = _separable_batch(np.random.default_rng(1), size=8)
  # Four padding rows (weight 0) copied from real rows.
  padded = {k: np.concatenate([v, np.zeros(4, v.dtype) if k == "weight" else v[:4]])
            for k, v in batch.items()}
  a, stats_a = step(state, batch)
  b, stats_b = step(state, padded)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert float(stats_b["count"]) == 8.0


def test_augment_acts_on_unit_range_images_before_preprocess():
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1),
                                conv_widths=(4, 4, 4, 4, 4), dense_widths=(8, 8),
                                init_std=None, dropout_rate=0.0)
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape, (0.3,), (0.2,))
  seen = []

  def mirror(key, images):
    seen.append((images.dtype, key))
    return images[:, :, ::-1]

  augmented = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                        preprocess=preprocess, augment=mirror))
  plain = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess))
  batch = _separable_batch(np.random.default_rng(2), size=8)
  batch["image"][:, :, :20] = 255  # asymmetric, so the mirror matters
  mirrored = dict(batch, image=np.ascontiguousarray(batch["image"][:, :, ::-1]))
  a, stats_a = augmented(state, batch)
  b, stats_b = plain(state, mirrored)
  np.testing.assert_allclose(stats_a["loss"], stats_b["loss"], rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  _, stats_c = plain(state, batch)
  assert abs(float(stats_c["loss"]) - float(stats_a["loss"])) > 1e-4
  assert seen[0][0] == jnp.float32  # uint8 was scaled to [0, 1] before augmenting
  # The augmentation key is a stream of its own: neither the dropout key of this step nor of
  # the next steps, and it changes with the step.
  keys = [jax.random.key_data(steps.augment_rng(state.replace(step=jnp.int32(s))))
          for s in range(3)]
  dropout = [jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), s))
             for s in range(3)]
  assert len({tuple(np.asarray(k).tolist()) for k in keys + dropout}) == 6
