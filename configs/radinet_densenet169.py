"""RadiNet_wrist's training recipe: DenseNet-169 with five dense layers on top, fine-tuned in two
phases (001_1a0a1523609161bb.txt, section 4.1 "Experimental setup"; the architecture in
sections 3.2 and 4.1, figure 2).

"All trained models use the DenseNet-169 architecture for feature extraction, with five dense
layers on top for the classification" (the `radinet` head: four hidden ReLU layers
1024-512-256-128 plus the output layer, medxai_jax/models/heads.py). "The Adam optimizer is used
with parameters beta_1 = 0.9, beta_2 = 0.999, with an initial learning rate of 10^-4 that decays
by a factor of 0.1 after each 3-epoch plateau for the validation loss, attaining a minimum of
10^-7. The models are trained in two phases: a 25-epoch warmup where no fine-tuning does occur,
if any, with early stopping implemented to stop the training if the validation loss plateaus
for 10 epochs. Class weights are also added to counter the slight imbalance in the data
classes." Here: schedule 'plateau' on the validation loss (factor 0.1, patience 3, no limit on
the number of reductions, floor 1e-7); train.head_only_epochs=25 (the backbone frozen, BatchNorm
included, for the first 25 epochs), then every layer; early stopping after 10 epochs without a
lower validation loss; class_weights='balanced' (n / (K n_k), Keras' 'balanced' weights).

Not stated in 001 and chosen here (as in configs/progressive_transfer.py:mura): the input size
(320 x 320 x 3, MURA's and 000's size; 001's AUBMC images are 1324 x 1324 two-view montages),
the batch size (8), the epoch budget (100; early stopping ends runs sooner), Keras' Adam epsilon
1e-7, ImageNet mean/std inputs (what ported DenseNet weights expect) and the selected epoch
(lowest validation loss, the early-stopping monitor). The target task is binary (fracture or
not) with one sigmoid logit.

The warm-up only means something when starting from weights: add
`--config.init_from=<experiments/port_weights.py output or a RadiNet run>`; 001's four arms are
chained by experiments/progressive_transfer.py. By default this trains on the phantoms
(abnormal vs normal, resized to 320); on MURA's wrist images (001's AUBMC wrist set is not
public), with DIR holding MURA-v1.1/:
  --config.dataset.name=mura --config.dataset.builder_config=wrist --config.dataset.manual_dir=DIR
"""

import ml_collections

from configs import common
from medxai_jax.data import preprocess


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DenseNet-169 + RadiNet head as in 001. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "radinet_densenet169")
  config = common.base_config()
  config.preprocess.update(dict(mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD))
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", depth=169, head="radinet", num_outputs=1, input_shape=(320, 320, 3)))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam", b1=0.9, b2=0.999, eps=1e-7))
  config.learning_rate = 1e-4
  config.schedule.update(dict(name="plateau", metric="loss", factor=0.1, patience=3,
                              max_reductions=0, min_learning_rate=1e-7))
  config.train.update(dict(trainable="all", head_only_epochs=25))
  config.early_stopping.update(dict(patience=10, metric="loss"))
  config.class_weights = "balanced"
  config.batch_size = 8
  config.eval_batch_size = 32
  config.num_epochs = 100
  config.selection.metric = "loss"
  return common.runlocal(config) if common.RUNLOCAL in words else config
