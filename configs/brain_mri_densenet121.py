"""The brain tumour MRI classifier of 003 (003_4682b26c17355e1c.txt, section 4.2
"Implementation Performance", Table 4 "Training hyperparameters", Table 3 and figure 4).

Nine Keras architectures were trained on Cheng's T1-weighted CE-MRI slices (meningioma, glioma,
pituitary tumour); "the DenseNet121 model shows the best overall test performance reaching
98.10%", and it is one of the three models whose attributions 003 studies, so this config
trains DenseNet-121 with a 3-way softmax. Table 4: "Learning rate 1e-3, Batch size 32, Number of
epochs 20, Training set 0.7, Test set 0.3, Input shape 225 x 225 x 1, Momentum 9.39e-1,
Decay 3e-4, Optimizer Stochastic Gradient Descent with Momentum"; section 4.1: the input "is a
225 x 225 x 1 tensor that is a resized version of the original 512 x 512 image slices".

"Decay 3e-4" is read as Keras' SGD `decay` argument (003 uses keras.applications models: Table
3's sizes and depths are Keras'), an inverse-time decay of the learning rate per update:
1e-3 / (1 + 3e-4 t) (config.optimizer.lr_decay). For an L2 penalty instead:
  --config.optimizer.lr_decay=0 --config.optimizer.weight_decay=3e-4
One gray channel rules out ImageNet weights (Keras refuses them for 1-channel inputs), so the
network starts from random weights.

Not stated in 003 and chosen here: the input scaling (the stored [0, 1] image, unnormalised), a
constant injected rate (the decay above is the schedule), and the selected epoch (validation
accuracy; brain_tumor_mri's default split is 60/10/30 by patient, 003's 70% training share
giving 10 points to validation). By default this trains on the phantoms (abnormal vs normal:
two of the three outputs used, resized to 225); on the brain tumour set, with DIR holding the
figshare files (see medxai_jax/data/builders/brain_tumor_mri.py):
  --config.dataset.name=brain_tumor_mri --config.dataset.manual_dir=DIR
"""

import ml_collections

from configs import common

TUMOUR_CLASSES = ("meningioma", "glioma", "pituitary")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DenseNet-121 on brain tumour MRI as in 003. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "brain_mri_densenet121")
  config = common.base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", depth=121, head="softmax", num_outputs=len(TUMOUR_CLASSES),
      input_shape=(225, 225, 1)))
  common.sgd_003(config)
  return common.runlocal(config) if common.RUNLOCAL in words else config
