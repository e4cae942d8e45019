"""Losses and the pure train step: micro-batches, padding rows, precision, augmentation inside
the step (train/steps.py)."""

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


def _small_model(**fields):
  defaults = dict(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                  dense_widths=(16, 16), init_std=None, dropout_rate=0.0)
  return custom_cnn.custom_cnn(**{**defaults, **fields})


def test_accumulating_micro_batches_equals_one_step_on_the_whole_batch():
  model = _small_model()
  tx = optim.make_optimizer({"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3}, 1e-2)
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
  weights = jnp.array([1.0, 2.5])  # class weights must scale the same terms either way
  compiled = {k: jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, preprocess=preprocess, class_weights=weights,
      accumulation_steps=k)) for k in (1, 4)}
  step = compiled.__getitem__
  batch = _separable_batch(np.random.default_rng(3), size=16)
  batch["weight"][[2, 9, 13]] = 0.0  # padding rows spread over several micro-batches
  state = steps.create_train_state(model, tx, jax.random.key(0))
  whole, accumulated = state, state
  for _ in range(3):
    whole, stats_whole = step(1)(whole, batch)
    accumulated, stats_acc = step(4)(accumulated, batch)
    for key in ("loss", "loss_sum", "correct", "count", "grad_norm"):
      np.testing.assert_allclose(stats_acc[key], stats_whole[key], rtol=2e-5, err_msg=key)
  for x, y in zip(jax.tree_util.tree_leaves(accumulated), jax.tree_util.tree_leaves(whole)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)
  assert optim.get_learning_rate(accumulated.opt_state) == pytest.approx(1e-2)
  # A real difference would show: a step on a quarter of the batch is not the same update.
  quarter = {k: v[0::4] for k, v in batch.items()}
  single, _ = step(1)(state, quarter)
  first, _ = step(4)(state, batch)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(first.params))) > 1e-4


def test_accumulation_with_batchnorm_updates_the_statistics_once_per_micro_batch():
  model = _small_model(use_batchnorm=True)
  tx = optim.make_optimizer({"name": "sgd", "momentum": 0.0}, 0.0)  # parameters stay put
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
  batch = _separable_batch(np.random.default_rng(4), size=8)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  accumulated, _ = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, preprocess=preprocess, accumulation_steps=2))(
          state, batch)
  one = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess))
  sequential = state
  for micro in ({k: v[0::2] for k, v in batch.items()}, {k: v[1::2] for k, v in batch.items()}):
    sequential, _ = one(sequential, micro)
  for x, y in zip(jax.tree_util.tree_leaves(accumulated.batch_stats),
                  jax.tree_util.tree_leaves(sequential.batch_stats)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_accumulation_steps_must_divide_the_batch():
  model = _small_model()
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
  with pytest.raises(ValueError, match="accumulation_steps=3 must be >= 1 and divide the batch "
                                       "size 8"):
    steps.train_step(state, _separable_batch(np.random.default_rng(0), size=8), model=model,
                     tx=tx, preprocess=preprocess, accumulation_steps=3)


def test_bfloat16_compute_keeps_float32_parameters_and_close_losses():
  batch = _separable_batch(np.random.default_rng(5), size=8)
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = _small_model(use_batchnorm=True, dtype=dtype)
    tx = optim.make_optimizer({"name": "adam"}, 1e-3)
    preprocess = preprocess_lib.make_preprocess_fn(model.input_shape)
    state = steps.create_train_state(model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, preprocess=preprocess))
    text = step.lower(state, batch).as_text()
    state, stats = step(state, batch)
    results[dtype] = (state, float(stats["loss"]), text)
  (state32, loss32, text32), (state16, loss16, text16) = results[jnp.float32], results[jnp.bfloat16]
  assert "bf16" in text16 and "bf16" not in text32  # the convolutions really run in bfloat16
  for leaf in jax.tree_util.tree_leaves((state16.params, state16.batch_stats, state16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-2)
  for x, y in zip(jax.tree_util.tree_leaves(state16.params),
                  jax.tree_util.tree_leaves(state32.params)):
    np.testing.assert_allclose(x, y, atol=2e-3)  # one Adam step of 1e-3 either way


def test_augmented_step_scales_stored_images_by_the_configured_bit_depth():
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1),
                                conv_widths=(4, 4, 4, 4, 4), dense_widths=(8, 8),
                                init_std=None, dropout_rate=0.0)
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, jax.random.key(0))
  rng = np.random.default_rng(3)
  stored = rng.integers(0, 4096, size=(4, 48, 48, 1)).astype(np.uint16)  # 12-bit values
  labels = np.array([0, 1, 0, 1], np.int32)
  weight = np.ones(4, np.float32)
  identity = lambda key, images: images  # noqa: E731
  twelve_bit = functools.partial(
      steps.train_step, model=model, tx=tx, augment=identity, bit_depth=12,
      preprocess=preprocess_lib.make_preprocess_fn(model.input_shape, bit_depth=12))
  unit = functools.partial(steps.train_step, model=model, tx=tx,
                           preprocess=preprocess_lib.make_preprocess_fn(model.input_shape))
  _, augmented = jax.jit(twelve_bit)(state, {"image": stored, "label": labels,
                                             "weight": weight})
  _, expected = jax.jit(unit)(state, {"image": stored.astype(np.float32) / 4095,
                                      "label": labels, "weight": weight})
  np.testing.assert_allclose(augmented["loss_sum"], expected["loss_sum"], rtol=1e-6)
