"""Every config in configs/ passes check_config and builds; paper configs match their papers."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

from medxai_jax.data import augment
from medxai_jax.train import freeze
from medxai_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(path))[0]
    for path in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(path) not in ("__init__.py", "common.py"))


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_the_paper_configs_are_found():
  assert {"mura_densenet169", "modality_vgg16_gap", "demo"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_checks_and_builds(name):
  config = load(name)
  loop.check_config(config)
  model, tx, preprocess = loop.build_components(config)
  # Shapes only: nothing of the (possibly large) model is computed.
  variables = jax.eval_shape(model.init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, *model.input_shape), np.uint8)
  logits = jax.eval_shape(lambda v, x: model.logits(v, preprocess(x)), variables, images)
  assert logits.shape == (2, model.num_outputs)
  jax.eval_shape(tx.init, variables["params"])
  augment.make_augment_fn(config.augment)
  settings = loop.train_settings(config)
  if settings["trainable"] != "all" or settings["head_only_epochs"]:
    mask = freeze.trainable_mask(model, settings["trainable"], settings["num_trainable_layers"])
    assert 0 < freeze.count_trainable(variables["params"], mask)
  assert config.init_from == ""


def _num_params(config):
  model = loop.build_components(config)[0]
  shapes = jax.eval_shape(model.init, jax.random.key(0))["params"]
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_mura_densenet169_is_the_recipe_of_000():
  config = load("mura_densenet169")
  # torchvision densenet169 has 14,149,480 trainable parameters with its 1664 x 1000 classifier;
  # 000 replaces that by one sigmoid logit.
  assert _num_params(config) == 14_149_480 - (1664 * 1000 + 1000) + (1664 + 1)
  assert tuple(config.model.input_shape) == (320, 320, 3) and config.model.head == "sigmoid"
  assert config.batch_size == 8 and config.num_epochs == 32
  assert config.optimizer.name == "adam" and (config.optimizer.b1, config.optimizer.b2) == (
      0.9, 0.999)
  rates = [loop._epoch_learning_rate(config, epoch, loop.LoopState()) for epoch in range(32)]
  # 1e-4, divided by 10, 50 and 100 once 25%, 50% and 75% of the 32 epochs have lapsed.
  expected = [1e-4] * 8 + [1e-5] * 8 + [2e-6] * 8 + [1e-6] * 8
  np.testing.assert_allclose(rates, expected, rtol=1e-12)
  assert config.augment.flip and config.augment.rotation_degrees == 30.0
  assert config.augment.shift_pixels == 0.0 and config.augment.zoom == 0.0
  assert config.selection.metric == "train_val_gap"
  assert loop.selection_score("train_val_gap", 0.9, {"accuracy": 0.85}) == pytest.approx(-0.05)


def test_modality_vgg16_gap_is_the_recipe_of_004():
  config = load("modality_vgg16_gap")
  # keras.applications VGG16 without top (14,714,688) + conv 512 3x3 + dense 512 -> 7.
  assert _num_params(config) == 14_714_688 + (3 * 3 * 512 * 512 + 512) + (512 * 7 + 7)
  assert config.model.head == "gap" and config.model.num_outputs == 7
  assert tuple(config.model.input_shape) == (300, 300, 3)
  assert config.optimizer.name == "adam" and config.batch_size == 10
  assert config.augment.rotation_degrees == 5.0 and config.augment.shift_pixels == 3.0
  assert not config.augment.flip and config.augment.zoom == 0.0


def test_check_config_names_bad_fine_tuning_and_augment_fields():
  config = load("demo")
  config.augment.rotation_degrees = 200.0
  with pytest.raises(ValueError, match="config.augment.rotation_degrees=200.0"):
    loop.check_config(config)
  config = load("demo")
  config.train.trainable = "backbone"
  with pytest.raises(ValueError, match="config.train.trainable='backbone'"):
    loop.check_config(config)
  config = load("demo")
  with config.unlocked():
    config.train.num_layers = 3
  with pytest.raises(ValueError, match=r"config.train has unknown field\(s\) \['num_layers'\]"):
    loop.check_config(config)
