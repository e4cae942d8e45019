"""003's brain tumour recipe (configs/brain_mri_densenet121.py) on the Kaggle folder release.

The same DenseNet-121 and Table 4 hyperparameters of 003 (learning rate 1e-3, batch size 32,
20 epochs, input 225 x 225 x 1, SGD with momentum 0.939 and Keras' decay 3e-4 as an inverse-time
decay; random initial weights, as one gray channel rules out ImageNet weights), with a 4-way
softmax for the Kaggle release's classes in the builder's fixed order: glioma, meningioma,
no_tumor, pituitary (builder `brain_tumor_kaggle`; folders glioma_tumor/.../pituitary_tumor or
glioma/meningioma/notumor/pituitary are both accepted). 003 used Cheng's figshare set instead
(3 tumour types, no "no tumour" class); these are not 003's data, so its numbers do not carry
over.

Splits: `Testing/` is the test split; `Training/` is split 90/10 into train and validation,
stratified by class (seeded). The Kaggle release has no patient ids, so the validation carve is
by image, and slices of one patient may sit in train and validation (the release's own
Training/Testing split is not known to be patient-wise either). The builder stores 512 x 512
gray images (aspect kept by padding), resized here to 225. Point manual_dir at the unzipped
release (the folder holding Training/ and Testing/, or its parent):
  --config.dataset.manual_dir=/path/to/brain-tumor-classification-mri
"""

import ml_collections

from configs import common

# Label order of brain_tumor_kaggle (medxai_jax/data/builders/brain_tumor_kaggle.py).
KAGGLE_TUMOUR_CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DenseNet-121 on the Kaggle brain tumour MRI folder release, 003's hyperparameters. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "brain_mri_kaggle_densenet121")
  config = common.base_config()
  config.dataset.update(dict(name="brain_tumor_kaggle", builder_config="default"))
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", depth=121, head="softmax", num_outputs=len(KAGGLE_TUMOUR_CLASSES),
      input_shape=(225, 225, 1)))
  common.sgd_003(config)
  return common.runlocal(config) if common.RUNLOCAL in words else config
