"""Optimisers and learning-rate schedules (train/optim.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.train import optim


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


def test_sgd_lr_decay_is_keras_inverse_time_decay_and_off_by_default():
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.ones(2)}
  plain = optim.make_optimizer({"name": "sgd", "momentum": 0.5}, 0.1)
  decayed = optim.make_optimizer({"name": "sgd", "momentum": 0.5, "lr_decay": 0.5}, 0.1)
  # Without lr_decay the state is what it always was (old checkpoints still restore).
  assert jax.tree_util.tree_structure(plain.init(params)) == jax.tree_util.tree_structure(
      optim.make_optimizer({"name": "sgd", "momentum": 0.5}, 0.1).init(params))
  state = decayed.init(params)
  trace = 0.0  # Keras' velocity divided by the base rate
  for t in range(4):
    updates, state = decayed.update(grads, state, params)
    trace = 0.5 * trace + 1 / (1 + 0.5 * t)
    np.testing.assert_allclose(updates["w"], -0.1 * trace, rtol=1e-6)
  # A new injected rate multiplies the whole trace (optax's convention, as without lr_decay).
  state = optim.set_learning_rate(state, 0.2)
  updates, state = decayed.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -0.2 * (0.5 * trace + 1 / (1 + 0.5 * 4)), rtol=1e-6)
  with pytest.raises(ValueError, match="lr_decay must be >= 0"):
    optim.make_optimizer({"name": "sgd", "lr_decay": -1.0}, 0.1).init(params)


def test_set_learning_rate_keeps_the_sharding_of_a_committed_rate():
  tx = optim.make_optimizer({"name": "adam"}, 1e-3)
  device = jax.devices()[0]
  state = jax.device_put(tx.init({"w": jnp.zeros(3)}), device)
  new = optim.set_learning_rate(state, 5e-4)
  rate = new.hyperparams["learning_rate"]
  assert rate.committed and rate.sharding == state.hyperparams["learning_rate"].sharding
  assert optim.get_learning_rate(new) == pytest.approx(5e-4)
  uncommitted = optim.set_learning_rate(tx.init({"w": jnp.zeros(3)}), 2e-4)
  assert not uncommitted.hyperparams["learning_rate"].committed
