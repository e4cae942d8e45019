"""Making DenseNet interpretable: the MURA recipe (000_09513d2f8ec1fa7b.txt, section 3,
"Proposed framework").

"This work applied a 169-layered DenseNet architecture" with "a sigmoid function ... in the last
layer for binary classification" and a binary cross-entropy loss; weights "either randomly
assigned or loaded with weights pre-trained using the ImageNet dataset", then "end-to-end
re-training of the models with 32 epochs". "Trained end-to-end in mini-batches of size 8. An
initial learning rate of 0.0001 was used with a decay factor of 10, 50 and 100 respectively when
25%, 50% and 75% of training epochs have lapsed", optimised with "Adam with default parameters
beta_1 0.9 and beta_2 0.999". "The best model ... was selected among all training epochs for which
the difference between training and validation accuracy was the least." Inputs scaled "to a
standard size of 320 x 320" and "randomly augmented during training with random lateral
inversions and rotations up to 30 degrees".

Defaults here: random initialisation (the paper's 'random' model sets); for the pre-trained sets
add `--config.init_from=<checkpoint of experiments/port_weights.py>`. Keras' Adam epsilon 1e-7
and its DenseNet preprocessing (RGB in [0, 1], ImageNet mean/std), which the ported weights
expect. By default this trains on the phantoms (abnormal vs normal, resized to 320); on MURA
(builder `mura`, 320 x 320 padded, abnormal vs normal per image; DIR holds MURA-v1.1/):
  --config.dataset.name=mura --config.dataset.manual_dir=DIR
The paper's four model sets (all extremities, wrist, finger, random-init wrist) differ only in
the builder's body-part subset (`--config.dataset.builder_config=all|wrist|finger`; the
`*_noborder` configs crop the frames 000 removes) and `init_from`.
"""

import ml_collections

from configs import common
from medxai_jax.data import preprocess


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DenseNet-169 on MURA as in 000. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "mura_densenet169")
  config = common.base_config()
  config.preprocess.update(dict(mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD))
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", depth=169, head="sigmoid", num_outputs=1, input_shape=(320, 320, 3)))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam", b1=0.9, b2=0.999, eps=1e-7))
  config.learning_rate = 1e-4
  config.schedule.update(dict(name="step_decay", boundaries=(0.25, 0.5, 0.75),
                              divisors=(10.0, 50.0, 100.0)))
  config.batch_size = 8
  config.eval_batch_size = 32
  config.num_epochs = 32
  config.augment.update(dict(flip=True, rotation_degrees=30.0))
  config.selection.metric = "train_val_gap"
  return common.runlocal(config) if common.RUNLOCAL in words else config
