"""Fine-tuning masks, frozen training and the head-only warm-up (train/freeze.py), with
augmentation end to end."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
import tiny
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import custom_cnn
from medxai_jax.models import vgg
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import freeze
from medxai_jax.train import loop
from medxai_jax.train import optim
from medxai_jax.train import schema
from medxai_jax.train import steps

KERAS_VGG16_CONVS = [f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), start=1)
                     for c in range(1, n + 1)]


def tiny_densenet():
  return tiny.densenet(input_shape=(32, 32, 3))


def keras_densenet_layers(block_sizes):
  """Keras' DenseNet layers with parameters, in order, written out from its naming scheme."""
  names = ["conv1_conv", "conv1_bn"]
  for index, size in enumerate(block_sizes):
    stage = index + 2
    for layer in range(1, size + 1):
      names += [f"conv{stage}_block{layer}_{part}" for part in ("0_bn", "1_conv", "1_bn", "2_conv")]
    if index < len(block_sizes) - 1:
      names += [f"pool{stage}_bn", f"pool{stage}_conv"]
  return [("backbone", name) for name in names + ["bn"]] + [("classifier", "predictions")]


def trainable_modules(mask):
  """Module paths with every leaf trainable; asserts no module is partly trainable."""
  per_module = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    per_module.setdefault(tuple(k.key for k in path[:-1]), set()).add(leaf)
  assert all(len(values) == 1 for values in per_module.values())
  return {module for module, values in per_module.items() if values == {True}}


# --- masks


def test_vgg16_layer_order_is_keras_and_head_masks_select_the_top():
  classic = vgg.vgg16(num_outputs=3, head="classic", input_shape=(32, 32, 3))
  gap = vgg.vgg16(num_outputs=3, head="gap", input_shape=(32, 32, 3))
  expected = [(name,) for name in KERAS_VGG16_CONVS]
  assert list(freeze.param_layers(classic)) == expected + [("fc1",), ("fc2",), ("predictions",)]
  assert list(freeze.param_layers(gap)) == expected + [("gap_conv",), ("predictions",)]
  assert trainable_modules(freeze.trainable_mask(classic, "head")) == {
      ("fc1",), ("fc2",), ("predictions",)}
  # The gap conv produces 'last_conv', so the GAP head is the dense layer alone.
  assert trainable_modules(freeze.trainable_mask(gap, "head")) == {("predictions",)}
  assert trainable_modules(freeze.trainable_mask(gap, "last_n_layers", 2)) == {
      ("gap_conv",), ("predictions",)}
  assert trainable_modules(freeze.trainable_mask(classic, "last_n_layers", 5)) == {
      ("block5_conv2",), ("block5_conv3",), ("fc1",), ("fc2",), ("predictions",)}
  assert all(jax.tree_util.tree_leaves(freeze.trainable_mask(classic, "all")))


def test_densenet_and_custom_cnn_masks():
  model = tiny_densenet()
  assert list(freeze.param_layers(model)) == keras_densenet_layers((1, 1, 1, 1))
  mask = freeze.trainable_mask(model, "head")
  assert trainable_modules(mask) == {("classifier", "predictions")}
  assert set(mask) == {"backbone", "classifier"}
  assert trainable_modules(freeze.trainable_mask(model, "last_n_layers", 3)) == {
      ("backbone", "conv5_block1_2_conv"), ("backbone", "bn"), ("classifier", "predictions")}
  radinet = tiny.densenet(input_shape=(32, 32, 3), head="radinet", num_outputs=2,
                          head_hidden_widths=(8, 4))
  assert trainable_modules(freeze.trainable_mask(radinet, "head")) == {
      ("classifier", "dense1"), ("classifier", "dense2"), ("classifier", "predictions")}
  cnn = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4,) * 5,
                              dense_widths=(8, 8), use_batchnorm=True)
  assert [m[0] for m in freeze.param_layers(cnn)] == [
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4", "conv5", "bn5", "fc6",
      "fc7", "fc8"]
  assert trainable_modules(freeze.trainable_mask(cnn, "head")) == {("fc6",), ("fc7",), ("fc8",)}


def test_bad_fine_tuning_settings_are_named():
  model = tiny_densenet()
  with pytest.raises(ValueError, match=r"num_trainable_layers=27 must lie in \[1, 26\]"):
    freeze.trainable_mask(model, "last_n_layers", 27)  # the 26 layers of keras_densenet_layers
  with pytest.raises(ValueError, match="num_trainable_layers=0"):
    freeze.trainable_mask(model, "last_n_layers", 0)
  with pytest.raises(ValueError, match="config.train.trainable='body'"):
    freeze.trainable_mask(model, "body")
  config = demo.get_config()
  config.train.trainable = "last_n_layers"
  with pytest.raises(ValueError, match="num_trainable_layers must be >= 1"):
    schema.check_config(config)
  config = demo.get_config()
  config.train.head_only_epochs = -1
  with pytest.raises(ValueError, match="head_only_epochs"):
    schema.check_config(config)


# --- frozen training


def test_a_mask_of_another_model_is_rejected_by_name():
  params = {"conv": {"kernel": jnp.ones(2)}, "fc": {"kernel": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"missing \[\"\['fc'\]\['kernel'\]\"\]"):
    freeze.check_mask({"conv": {"kernel": False}, "head": {"kernel": True}}, params)
  freeze.check_mask({"conv": {"kernel": False}, "fc": {"kernel": True}}, params)


def test_freeze_optimizer_leaves_frozen_state_untouched_and_skips_weight_decay():
  params = {"a": {"w": jnp.array([1.0, -2.0])}, "b": {"w": jnp.array([3.0, 0.5])}}
  grads = {"a": {"w": jnp.array([0.5, 0.5])}, "b": {"w": jnp.array([-1.0, 2.0])}}
  mask = {"a": {"w": True}, "b": {"w": False}}
  for config in ({"name": "adam", "weight_decay": 0.1},
                 {"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}):
    inner = optim.make_optimizer(config, 0.01)
    # A state in which 'b' has been trained already: its moments are non-zero.
    _, state = inner.update(grads, inner.init(params), params)
    frozen = freeze.freeze_optimizer(inner, mask)
    updates, new_state = frozen.update(grads, state, params)
    expected, expected_state = inner.update(grads, state, params)
    np.testing.assert_array_equal(updates["b"]["w"], [0.0, 0.0])
    np.testing.assert_array_equal(updates["a"]["w"], expected["a"]["w"])
    old_leaves = jax.tree_util.tree_leaves(state)
    for path, new in jax.tree_util.tree_flatten_with_path(new_state)[0]:
      old = [l for p, l in jax.tree_util.tree_flatten_with_path(state)[0] if p == path][0]
      reference = [l for p, l in jax.tree_util.tree_flatten_with_path(expected_state)[0]
                   if p == path][0]
      keys = jax.tree_util.keystr(path)
      if "['b']" in keys:
        np.testing.assert_array_equal(new, old)  # moments / momentum of the frozen leaf
      else:
        np.testing.assert_array_equal(new, reference)  # counts, hyperparameters, trained leaf
    assert len(old_leaves) == len(jax.tree_util.tree_leaves(new_state))


@pytest.fixture(scope="module")
def densenet_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8),
          "label": np.array([0, 1, 1, 0], np.int32), "weight": np.ones(4, np.float32)}


@pytest.mark.parametrize("optimizer", [{"name": "adam"},
                                       {"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}])
def test_frozen_params_batch_stats_and_moments_stay_bit_identical(optimizer, densenet_batch):
  model = tiny_densenet()
  mask = freeze.trainable_mask(model, "last_n_layers", 3)
  tx = optim.make_optimizer(optimizer, 0.05)
  start = steps.create_train_state(model, tx, jax.random.key(0))
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, trainable=mask,
      preprocess=preprocess_lib.make_preprocess_fn(model.input_shape)))
  state = start
  for _ in range(3):
    state, _ = step(state, densenet_batch)
  trained = trainable_modules(mask)
  flat_mask = jax.tree_util.tree_leaves(mask)
  for leaf_mask, new, old in zip(flat_mask, jax.tree_util.tree_leaves(state.params),
                                 jax.tree_util.tree_leaves(start.params)):
    if leaf_mask:
      assert not np.array_equal(new, old)
    else:
      np.testing.assert_array_equal(new, old)
  for path, new in jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]:
    module = tuple(k.key for k in path[:-1])
    old = start.batch_stats[module[0]][module[1]][path[-1].key]
    assert np.array_equal(new, old) == (module not in trained), module
  # Every params-shaped part of the optimiser state (Adam's mu/nu, SGD's trace) is still zero at
  # the frozen leaves and has moved at the trainable ones.
  treedef = jax.tree_util.tree_structure(state.params)
  moments = [node for node in jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda n: jax.tree_util.tree_structure(n) == treedef)
      if jax.tree_util.tree_structure(node) == treedef]
  assert moments
  for moment in moments:
    for leaf_mask, value in zip(flat_mask, jax.tree_util.tree_leaves(moment)):
      assert bool(np.any(value != 0)) == leaf_mask


def test_frozen_batchnorm_runs_in_inference_mode():
  model = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4,) * 5,
                                dense_widths=(8, 8), use_batchnorm=True, init_std=None,
                                dropout_rate=0.0)
  variables = model.init(jax.random.key(1))
  # Non-trivial moving statistics, so inference and training mode differ.
  variables = dict(variables, batch_stats=jax.tree_util.tree_map(
      lambda x: x + 0.3, variables["batch_stats"]))
  images = jax.random.normal(jax.random.key(2), (4, 48, 48, 1))
  frozen = freeze.frozen_modules(freeze.trainable_mask(model, "head"))
  assert frozen >= {("bn1",), ("bn5",)}

  @jax.jit
  def apply(variables, images):
    with freeze.frozen_batch_norm(frozen):
      frozen_out = model.train_apply(variables, images, jax.random.key(3))
    return frozen_out, model.train_apply(variables, images, jax.random.key(3))[0], model.logits(
        variables, images)

  (logits, updates), unfrozen, inference = apply(variables, images)
  np.testing.assert_allclose(logits, inference, rtol=1e-5, atol=1e-5)
  for new, old in zip(jax.tree_util.tree_leaves(updates["batch_stats"]),
                      jax.tree_util.tree_leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(new, old)
  assert np.abs(np.asarray(unfrozen) - np.asarray(logits)).max() > 1e-3


def test_epoch_mask_switches_after_the_warm_up():
  head, main = {"w": False}, {"w": True}
  assert [freeze.epoch_mask(e, 2, head, main) for e in range(4)] == [head, head, main, main]
  assert freeze.epoch_mask(0, 0, head, main) is main


# --- the loop


def tiny_config(data_dir, **train):
  config = tiny.demo_config(data_dir, image_size=48, num_train=64, num_validation=32,
                            num_test=32, batch_size=16, log_every_steps=2)
  config.augment.update(dict(flip=True, rotation_degrees=10.0, shift_pixels=2.0, zoom=0.1))
  config.train.update(train)
  return config


def restore(config, workdir, step):
  model, tx, _ = components.build_components(config)
  template = steps.create_train_state(model, tx, jax.random.key(config.seed))
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"))
  state, _ = store.restore_latest(template, step=step)
  store.close()
  return template, state


def history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def _moved(a, b):
  return {name: not np.array_equal(a[name]["kernel"], b[name]["kernel"]) for name in a}


def test_warm_up_then_last_layers_with_augmentation_end_to_end(data_dir, tmp_path):
  # Epoch 1 trains only the head (fc6-fc8), epoch 2 the last four layers (conv5, fc6-fc8).
  config = tiny_config(data_dir, head_only_epochs=1, trainable="last_n_layers",
                       num_trainable_layers=4)
  config.num_epochs = 2
  workdir = str(tmp_path / "warmup")
  result = loop.train_and_evaluate(config, workdir)
  assert 0.0 <= result["test"]["accuracy"] <= 1.0
  initial, after_warm_up = restore(config, workdir, 1)
  _, after_both = restore(config, workdir, 2)
  head = {"fc6": True, "fc7": True, "fc8": True}
  frozen = {f"conv{i}": False for i in range(1, 5)}
  assert _moved(after_warm_up.params, initial.params) == {**frozen, "conv5": False, **head}
  assert _moved(after_both.params, after_warm_up.params) == {**frozen, "conv5": True, **head}
  # Adam's first moment of conv5 stayed exactly zero through the warm-up.
  adam_state = after_warm_up.opt_state.inner_state[1][0]
  assert not np.any(adam_state.mu["conv5"]["kernel"]) and np.any(adam_state.mu["fc8"]["kernel"])
  model = components.build_components(config)[0]
  expected = [freeze.count_trainable(initial.params, freeze.trainable_mask(model, "head")),
              freeze.count_trainable(initial.params,
                                     freeze.trainable_mask(model, "last_n_layers", 4))]
  assert [record["trainable_parameters"] for record in history(workdir)] == expected
