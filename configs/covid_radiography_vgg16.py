"""The COVID-19 chest X-ray classifier of 003 (003_4682b26c17355e1c.txt, section 4.1 "Datasets",
section 4.2 "Implementation Performance", Table 3, Table 4 "Training hyperparameters" and
figures 5, 7 and 9).

003 classifies three classes of the COVID-19 Radiography Database, "Normal, Lung Opacity, and
COVID-19" (the builder `covid_radiography`, config 'three'; viral pneumonia left out), with the
same nine Keras architectures and Table 4's hyperparameters as on the brain MRI set (see
configs/brain_mri_densenet121.py): "Learning rate 1e-3, Batch size 32, Number of epochs 20,
Training set 0.7, Test set 0.3, Input shape 225 x 225 x 1, Momentum 9.39e-1, Decay 3e-4,
Optimizer Stochastic Gradient Descent with Momentum", "Decay" read as Keras' SGD `decay`
(config.optimizer.lr_decay). The imbalance "towards normal class ... was addressed through class
weighting during training" (figure 7), read as balanced weights n / (K n_k).

The model: Table 3's best on this set is InceptionResNetV2 (test accuracy 0.8957), which this
codebase does not implement; of the three models whose attributions 003 studies here
(Inception-ResNetV2, Xception, VGG16; figure 9) it has VGG16, also Table 3's second best
(0.8916). So this trains keras.applications' VGG16 with its classic head (FC 4096, FC 4096, no
dropout) and a 3-way softmax, from random weights (one gray channel rules out ImageNet weights).
003's DenseNet-121 on this set (0.8845) is configs/brain_mri_densenet121.py with
  --config.dataset.name=covid_radiography --config.dataset.builder_config=three
  --config.class_weights=balanced

Not stated in 003 and chosen here: the input scaling (the stored [0, 1] image, unnormalised, the
builder's 299 x 299 images resized to 225), a constant injected rate (the decay is the schedule)
and the selected epoch (validation accuracy; the builder splits images 60/10/30 stratified by
class, 003's 70% training share giving 10 points to validation: the set has no patient ids).
Point manual_dir at the folder holding COVID-19_Radiography_Dataset/ as unzipped from Kaggle
(see medxai_jax/data/builders/covid_radiography.py):
  --config.dataset.manual_dir=/path/to/download
The builder's options go on the same command line (`--config.dataset.builder.<option>`, see
configs/common.py); a copy without the masks and .xlsx sheets, e.g.:
  --config.dataset.builder.with_masks=False --config.dataset.builder.read_metadata=False
"""

import ml_collections

from configs import common

# Label order of covid_radiography's 'three' config (canonical names of its class folders).
COVID_CLASSES = ("covid", "lung_opacity", "normal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VGG16 on the three-class COVID-19 Radiography Database as in 003. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "covid_radiography_vgg16")
  config = common.base_config()
  config.dataset.update(dict(name="covid_radiography", builder_config="three"))
  config.model = ml_collections.ConfigDict(dict(
      name="vgg16", head="classic", num_outputs=len(COVID_CLASSES), input_shape=(225, 225, 1)))
  common.sgd_003(config)
  config.class_weights = "balanced"
  return common.runlocal(config) if common.RUNLOCAL in words else config
