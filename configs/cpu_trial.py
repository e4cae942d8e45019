r"""A few-minute CPU trial of the whole path on your own collection, before a paper's recipe.

A small custom CNN (002's layout, narrow) at 64 x 64 gray pixels, Adam 1e-3, 3 epochs: enough to
check that preparation, training, explanation, scoring and the report work on a collection as it
ships, not to learn anything. The argument after ':' names the builder, and sets the number of
classes of its default class set:

  python -m experiments.train --config=configs/cpu_trial.py:covid_radiography \
      --workdir=runs/covid_trial --config.dataset.manual_dir=/path/to/download

Collections: covid_radiography (3 classes: COVID, Lung_Opacity, Normal), brain_tumor_kaggle (4),
tb_cxr (TB vs normal, one sigmoid logit), mura (abnormal vs normal, one sigmoid logit),
medical_modalities (set --config.model.num_outputs to the number of class folders). Builder
options are `--config.dataset.builder.<option>=...` (e.g. image_size, classes, with_masks,
read_metadata, on_corrupt, storage_bits, split_fractions); images are stored at 64 px so the
trial prepares in seconds.
"""

import ml_collections

from configs import common

# Builder -> (number of model outputs for its default class set, builder config name).
TRIAL_DATASETS = {
    "covid_radiography": (3, "three"),
    "brain_tumor_kaggle": (4, "default"),
    "tb_cxr": (1, "combined"),
    "mura": (1, "all"),
    "medical_modalities": (7, "seven_modalities"),
}
IMAGE_SIZE = 64


def get_config(dataset: str = "covid_radiography") -> ml_collections.ConfigDict:
  """A small CNN at 64 px on `dataset` (one of TRIAL_DATASETS), 3 epochs."""
  if dataset not in TRIAL_DATASETS:
    raise ValueError(f"configs/cpu_trial.py:{dataset}: choose one of {sorted(TRIAL_DATASETS)}.")
  num_outputs, builder_config = TRIAL_DATASETS[dataset]
  config = common.base_config()
  config.dataset.update(dict(name=dataset, builder_config=builder_config))
  config.dataset.builder.image_size = IMAGE_SIZE
  config.preprocess.update(dict(mean=(0.5,), std=(0.25,)))
  config.model = ml_collections.ConfigDict(dict(
      name="custom_cnn", num_outputs=num_outputs, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
      conv_widths=(16, 32, 32, 32, 32), dense_widths=(64, 64), dropout_rate=0.0,
      init_std=None))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam"))
  config.learning_rate = 1e-3
  config.batch_size = 8
  config.eval_batch_size = 32
  config.num_epochs = 3
  config.class_weights = ""  # a tiny sample may lack a class; "balanced" then refuses
  config.log_every_steps = 10
  return config
