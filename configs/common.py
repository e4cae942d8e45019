"""Defaults shared by every training config; each paper's config overrides what it specifies."""

import ml_collections

from medxai_jax.train.defaults import base_config  # noqa: F401  (every config starts here)


# --- Recipes shared by two papers' configs ---------------------------------------------------

def sgd_002(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """002's SGD recipe (section II-B), shared by its custom CNN and its VGG16 fine-tuning.

  SGD with momentum 0.9 and an L2 penalty of 5e-4, learning rate 1e-3 divided by 10 when the
  validation accuracy stalls for 2 epochs, at most three times; batch 32, 60 epochs; the epoch
  with the best validation accuracy is kept.
  """
  config.optimizer = ml_collections.ConfigDict(dict(name="sgd", momentum=0.9,
                                                    weight_decay=5e-4))
  config.learning_rate = 1e-3
  config.schedule.update(dict(name="plateau", metric="accuracy", factor=0.1, patience=2,
                              max_reductions=3))
  config.batch_size = 32
  config.num_epochs = 60
  config.selection.metric = "accuracy"
  return config


def sgd_003(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """003's SGD recipe, shared by its brain-MRI DenseNet-121 and COVID-19 VGG16 configs.

  Keras SGD with momentum 0.939 and time decay 3e-4 (lr / (1 + decay * step)), learning rate
  1e-3, batch 32 (evaluation 64), 20 epochs; the epoch with the best validation accuracy is kept.
  """
  config.optimizer = ml_collections.ConfigDict(dict(name="sgd", momentum=0.939,
                                                    lr_decay=3e-4))
  config.learning_rate = 1e-3
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 20
  config.selection.metric = "accuracy"
  return config


# --- The config argument (`--config=configs/<name>.py:<arg>`) ---------------------------------

RUNLOCAL = "runlocal"
RUNLOCAL_IMAGE_SIZE = 64


def parse_arg(arg: str | None, config_file: str, allowed: tuple[str, ...] = (RUNLOCAL,)
              ) -> frozenset[str]:
  """The comma-separated words after ':' in `--config`, each checked against `allowed`."""
  words = frozenset(word.strip() for word in (arg or "").split(",") if word.strip())
  unknown = sorted(words - set(allowed))
  if unknown:
    raise ValueError(f"--config=configs/{config_file}.py:{arg}: unknown argument(s) {unknown}; "
                     f"this config takes {list(allowed)} (comma-separated), or nothing.")
  return words


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same recipe shrunk for a few-minute CPU trial, as big_vision's `runlocal` argument.

  Architecture, head, optimiser and schedule stay the paper's; only the sizes change: inputs
  at RUNLOCAL_IMAGE_SIZE px (stored images are resized on the device), batch 8, 2 epochs (a
  warm-up of head-only epochs is cut to 1). For checking that a recipe runs on your collection,
  not for results. The dataset is the recipe's, whichever the command line names: the phantoms'
  sizes are not set here, as they would be options of a collection named after this ran (on the
  phantoms: their default 6000/1000/2000 images; fewer with e.g.
  --config.dataset.builder.num_train=256 --config.dataset.builder.num_validation=64
  --config.dataset.builder.num_test=64).
  """
  channels = config.model.input_shape[-1]
  config.model.input_shape = (RUNLOCAL_IMAGE_SIZE, RUNLOCAL_IMAGE_SIZE, channels)
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.train.head_only_epochs = min(config.train.head_only_epochs, 1)
  config.log_every_steps = 8
  config.summaries.num_images = min(config.summaries.num_images, 2)
  return config
