"""Every config in configs/ passes check_config and builds; paper configs match their papers."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

import subprocess_env
from configs import cpu_trial
from medxai_jax.data import augment
from medxai_jax.train import components
from medxai_jax.train import freeze
from medxai_jax.train import loop
from medxai_jax.train import optim
from medxai_jax.train import schema

REPO = subprocess_env.REPO
CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(path))[0]
    for path in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(path) not in ("__init__.py", "common.py"))


# Sections that an experiment binary reads and strips before training (not training fields).
EXPERIMENT_SECTIONS = ("transfer",)


def load_module(name):
  return importlib.import_module(f"configs.{name}")


def load(name):
  return load_module(name).get_config()


def training_config(name):
  config = load(name)
  with config.unlocked():
    for section in EXPERIMENT_SECTIONS:
      if section in config:
        del config[section]
  return config


def test_the_paper_configs_are_found():
  assert {"mura_densenet169", "modality_vgg16_gap", "demo", "radinet_densenet169",
          "chest_xray_vgg16_finetune", "chest_xray_custom_cnn",
          "brain_mri_densenet121", "covid_radiography_vgg16"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_checks_and_builds(name):
  config = training_config(name)
  schema.check_config(config)
  model, tx, preprocess = components.build_components(config)
  # Shapes only: nothing of the (possibly large) model is computed.
  variables = jax.eval_shape(model.init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, *model.input_shape), np.uint8)
  logits = jax.eval_shape(lambda v, x: model.logits(v, preprocess(x)), variables, images)
  assert logits.shape == (2, model.num_outputs)
  jax.eval_shape(tx.init, variables["params"])
  augment.make_augment_fn(config.augment)
  settings = schema.train_settings(config)
  if settings["trainable"] != "all" or settings["head_only_epochs"]:
    mask = freeze.trainable_mask(model, settings["trainable"], settings["num_trainable_layers"])
    assert 0 < freeze.count_trainable(variables["params"], mask)
  assert config.init_from == ""


def _num_params(config):
  model = components.build_components(config)[0]
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
    schema.check_config(config)
  config = load("demo")
  config.train.trainable = "backbone"
  with pytest.raises(ValueError, match="config.train.trainable='backbone'"):
    schema.check_config(config)
  config = load("demo")
  with config.unlocked():
    config.train.num_layers = 3
  with pytest.raises(ValueError, match=r"config.train has unknown field\(s\) \['num_layers'\]"):
    schema.check_config(config)


def _plateau_trace(config, metric_values):
  """Learning rates of epochs 1..N+1 when validation[config.schedule.metric] follows the list."""
  rate, plateau = config.learning_rate, optim.PlateauState()
  rates = [rate]
  for value in metric_values:
    rate, plateau = loop.plateau_step(config, rate, {config.schedule.metric: value}, plateau)
    rates.append(rate)
  return rates


def _radinet_head_params(inputs, widths, outputs):
  sizes = (inputs, *widths, outputs)
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_radinet_densenet169_is_the_recipe_of_001():
  config = load("radinet_densenet169")
  # DenseNet-169 features (torchvision's 14,149,480 trainable minus its 1664 x 1000 classifier)
  # plus "five dense layers on top": 1664 -> 1024 -> 512 -> 256 -> 128 -> 1.
  backbone = 14_149_480 - (1664 * 1000 + 1000)
  assert _num_params(config) == backbone + _radinet_head_params(1664, (1024, 512, 256, 128), 1)
  assert config.model.head == "radinet" and config.model.depth == 169
  assert config.optimizer.name == "adam" and (config.optimizer.b1, config.optimizer.b2) == (
      0.9, 0.999)
  assert config.train.head_only_epochs == 25 and config.train.trainable == "all"
  assert config.class_weights == "balanced"
  # Validation loss improves for 5 epochs, then plateaus for good: x0.1 after every 3-epoch
  # plateau, down to 1e-7 and never below; early stopping after 10 epochs without improvement.
  losses = [1.0, 0.9, 0.8, 0.7, 0.6] + [0.6] * 14
  rates = _plateau_trace(config, losses)
  expected = [1e-4] * 8 + [1e-5] * 3 + [1e-6] * 3 + [1e-7] * 6
  np.testing.assert_allclose(rates, expected, rtol=1e-9)
  best, since, stops = None, 0, []
  for value in losses:
    best, since, stop = loop.early_stopping_step(config, {"loss": value}, best, since)
    stops.append(stop)
  assert stops.index(True) == 14  # epoch 15: the 10th epoch after the last improvement (5)
  # Balanced class weights: n / (K n_k).
  np.testing.assert_allclose(components.resolve_class_weights(config.class_weights,
                                                        np.array([56, 44])), [100 / 112, 100 / 88])
  # The warm-up trains only the head: the five dense layers.
  model = components.build_components(config)[0]
  params = jax.eval_shape(model.init, jax.random.key(0))["params"]
  head = freeze.trainable_mask(model, "head")
  assert freeze.count_trainable(params, head) == _radinet_head_params(
      1664, (1024, 512, 256, 128), 1)


@pytest.mark.parametrize("name", ["chest_xray_vgg16_finetune", "chest_xray_custom_cnn"])
def test_the_002_configs_divide_the_rate_by_10_at_most_three_times(name):
  config = load(name)
  assert config.optimizer.name == "sgd" and config.optimizer.weight_decay == 5e-4
  assert config.optimizer.momentum > 0 and config.learning_rate == 1e-3
  assert config.schedule.metric == "accuracy"
  accuracies = [0.6, 0.7, 0.8] + [0.8] * 12
  rates = _plateau_trace(config, accuracies)
  patience = config.schedule.patience
  # Reductions after each `patience` epochs without a better validation accuracy, three times.
  expected = []
  for epoch in range(len(accuracies) + 1):
    stalled = max(0, epoch - 3)
    expected.append(1e-3 * 0.1 ** min(3, stalled // patience))
  np.testing.assert_allclose(rates, expected, rtol=1e-9)
  assert min(rates) == pytest.approx(1e-6)


def test_chest_xray_vgg16_finetune_trains_only_the_last_three_layers():
  config = load("chest_xray_vgg16_finetune")
  model = components.build_components(config)[0]
  params = jax.eval_shape(model.init, jax.random.key(0))["params"]
  settings = schema.train_settings(config)
  mask = freeze.trainable_mask(model, settings["trainable"], settings["num_trainable_layers"])
  trainable = {path[0].key for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
               if leaf}
  assert trainable == {"fc1", "fc2", "predictions"}
  # fc1 25088 x 4096, fc2 4096 x 4096, a new 2-way softmax layer.
  assert freeze.count_trainable(params, mask) == (
      25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 2 + 2)
  assert config.model.dropout_rate == 0.5 and config.model.num_outputs == 2
  assert tuple(config.model.input_shape) == (224, 224, 3)
  assert config.num_epochs == 60


def test_brain_mri_config_is_the_recipe_of_003():
  config = load("brain_mri_densenet121")
  assert tuple(config.model.input_shape) == (225, 225, 1)
  assert config.model.depth == 121 and config.model.num_outputs == 3
  assert config.batch_size == 32 and config.num_epochs == 20 and config.learning_rate == 1e-3
  assert config.optimizer.momentum == 0.939 and config.optimizer.lr_decay == 3e-4
  # Keras' SGD(lr, momentum, decay): v_t = m v_{t-1} + lr / (1 + decay t) g_t, w -= v_t.
  tx = optim.make_optimizer(config.optimizer, config.learning_rate)
  params = {"w": np.zeros(3, np.float32)}
  state = tx.init(params)
  grads = {"w": np.ones(3, np.float32)}
  velocity, keras_updates, updates = 0.0, [], []
  for t in range(400):
    update, state = tx.update(grads, state, params)
    updates.append(float(update["w"][0]))
    velocity = 0.939 * velocity + optim.inverse_time_rate(1e-3, 3e-4, t)
    keras_updates.append(-velocity)
  np.testing.assert_allclose(updates, keras_updates, rtol=1e-5)
  assert optim.inverse_time_rate(1e-3, 3e-4, 1000) == pytest.approx(1e-3 / 1.3)
  assert optim.get_learning_rate(state) == pytest.approx(1e-3)  # the injected base rate


def test_covid_radiography_config_is_the_recipe_of_003():
  from medxai_jax.data.builders import covid_radiography

  config = load("covid_radiography_vgg16")
  assert config.dataset.name == "covid_radiography" and config.dataset.builder_config == "three"
  three = covid_radiography.make_covid_config("three")
  classes = tuple(covid_radiography.canonical_name(name) for name in three.classes)
  assert classes == load_module("covid_radiography_vgg16").COVID_CLASSES
  assert config.model.num_outputs == len(classes) == 3
  # keras.applications VGG16 (138,357,544 parameters) with 1 input channel and 3 classes.
  assert _num_params(config) == 138_357_544 - 2 * 9 * 64 - (4096 * 1000 + 1000) + (4096 * 3 + 3)
  assert tuple(config.model.input_shape) == (225, 225, 1) and config.model.head == "classic"
  assert config.batch_size == 32 and config.num_epochs == 20 and config.learning_rate == 1e-3
  assert config.optimizer.name == "sgd" and config.optimizer.momentum == 0.939
  assert config.optimizer.lr_decay == 3e-4 and config.class_weights == "balanced"


def test_real_data_configs_say_where_manual_dir_goes():
  for name in CONFIG_NAMES:
    doc = load_module(name).__doc__
    if name != "demo":
      assert "--config.dataset.manual_dir=" in doc, name


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_takes_builder_options_on_the_command_line(name):
  from absl import flags
  from ml_collections import config_flags

  from medxai_jax.data import pipeline

  argv = ["train", f"--config={os.path.join(REPO, 'configs', name + '.py')}",
          "--config.dataset.name=covid_radiography", "--config.dataset.builder.image_size=64",
          "--config.dataset.builder.read_metadata=False",
          "--config.dataset.builder.split_fractions=0.8,0.1,0.1",
          "--config.dataset.builder.classes=COVID,Normal"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  options = values.config.dataset.builder
  assert (options.image_size, options.read_metadata, options.split_fractions) == (
      64, False, (0.8, 0.1, 0.1))
  assert options.with_masks is None and options.body_parts is None  # None: the default
  assert set(options) == set(pipeline.all_builder_option_specs())
  assert "phantoms" not in values.config.dataset  # the phantoms' settings are builder options
  assert {"num_train", "seed", "train_marker_agreement"} <= set(options)


def test_train_val_gap_selects_the_epoch_with_the_smallest_gap():
  config = load("mura_densenet169")
  train = [0.70, 0.80, 0.90, 0.95, 0.99]
  val = [0.60, 0.78, 0.84, 0.86, 0.85]  # gaps 0.10, 0.02, 0.06, 0.09, 0.14
  best, best_epoch = None, 0
  for epoch, (a, b) in enumerate(zip(train, val), start=1):
    score = loop.selection_score(config.selection.metric, a, {"accuracy": b})
    mode = schema.monitor_mode(config.selection.metric, config.selection.mode)
    if optim.improved(score, best, mode):
      best, best_epoch = score, epoch
  assert best_epoch == 2


def test_precision_and_accumulation_fields_are_checked():
  config = load("demo")
  config.train.compute_dtype = "float16"
  with pytest.raises(ValueError, match="config.train.compute_dtype='float16'"):
    schema.check_config(config)
  config = load("demo")
  config.train.accumulation_steps = 3  # batch_size 32
  with pytest.raises(ValueError, match="batch_size=32 is not divisible by "
                                       "config.train.accumulation_steps=3"):
    schema.check_config(config)
  config = load("demo")
  config.train.compute_dtype = "bfloat16"
  schema.check_config(config)
  model = components.build_components(config)[0]
  assert model.module.dtype == jax.numpy.bfloat16
  assert components.build_components(config, compute_dtype="float32")[0].module.dtype == np.float32


@pytest.mark.parametrize("dataset", sorted(cpu_trial.TRIAL_DATASETS))
def test_cpu_trial_outputs_match_the_builders_default_classes(dataset, tmp_path):
  import tensorflow_datasets as tfds

  import medxai_jax.data.builders  # noqa: F401  (registers the builders)

  config = cpu_trial.get_config(dataset)
  schema.check_config(config)
  label = tfds.builder(dataset, data_dir=str(tmp_path),
                       config=config.dataset.builder_config).info.features["label"]
  expected = 1 if label.num_classes == 2 else label.num_classes  # binary: one sigmoid logit
  assert config.model.num_outputs == expected


def test_cpu_trial_names_its_datasets():
  with pytest.raises(ValueError, match="choose one of"):
    cpu_trial.get_config("no_such_collection")


RUNLOCAL_CONFIGS = [name for name in CONFIG_NAMES
                    if "common.runlocal" in open(os.path.join(REPO, "configs", f"{name}.py")).read()]
SHRUNK_FIELDS = {"model.input_shape", "batch_size", "eval_batch_size", "num_epochs",
                 "log_every_steps", "train.head_only_epochs", "summaries.num_images"}


def _flat_fields(config):
  flat = {}
  for key, value in config.items():
    if hasattr(value, "items") and not key == "builder":
      flat.update({f"{key}.{inner}": v for inner, v in _flat_fields(value).items()})
    else:
      flat[key] = value
  return flat


def test_every_paper_recipe_takes_runlocal():
  assert {"mura_densenet169", "radinet_densenet169", "modality_vgg16_gap",
          "chest_xray_vgg16_finetune", "chest_xray_custom_cnn", "brain_mri_densenet121",
          "brain_mri_kaggle_densenet121", "covid_radiography_vgg16"} <= set(RUNLOCAL_CONFIGS)


@pytest.mark.parametrize("name", RUNLOCAL_CONFIGS)
def test_runlocal_keeps_the_recipe_and_shrinks_only_sizes(name):
  full = load_module(name).get_config()
  small = load_module(name).get_config("runlocal")
  schema.check_config(small)
  full_fields, small_fields = _flat_fields(full), _flat_fields(small)
  assert full_fields.keys() == small_fields.keys()
  changed = {key for key in full_fields if full_fields[key] != small_fields[key]}
  assert changed - SHRUNK_FIELDS == set(), name  # the dataset (phantoms included) is kept
  assert tuple(small.model.input_shape) == (64, 64, full.model.input_shape[-1])
  assert small.num_epochs <= 2 and small.batch_size <= 8
  model, _, preprocess = components.build_components(small)
  variables = jax.eval_shape(model.init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, 100, 100, full.model.input_shape[-1]), np.uint8)
  logits = jax.eval_shape(lambda v, x: model.logits(v, preprocess(x)), variables, images)
  assert logits.shape == (2, model.num_outputs)


def test_an_unknown_config_argument_names_the_file_and_the_choices():
  with pytest.raises(ValueError, match=r"mura_densenet169\.py:tiny.*'runlocal'"):
    load_module("mura_densenet169").get_config("tiny")
  assert load_module("mura_densenet169").get_config("") == load("mura_densenet169")
