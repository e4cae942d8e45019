"""CRM's multi-modality classifier: VGG16 with a GAP head (004_883d77b264ed2d14.txt, sections
2.1 and 2.2).

"Built based on the pretrained VGG16 network. We first truncated the VGG16 at the deepest
convolutional layer. A convolutional layer with 512 filters, each with a 3 x 3 spatial
dimension, followed by a global average pooling (GAP) and a dense layer was then added"; seven
modality classes (abdomen CT, brain MRI, cardiac abdomen ultrasound, chest X-ray, fluorescence
microscopy, retinal funduscopy, statistical graphs), so a softmax over 7. "Data were augmented
with rotations and horizontal and vertical shifts in the ranges [-5, 5] and [-3, 3]", "resampled
to 300 x 300-pixel resolutions and normalized for mean"; "a mini-batch size of 10 ... and 'Adam'
optimizer"; trained end to end.

Not stated in the paper and chosen here: the learning rate (its randomised grid search ranged
over [1e-5, 1e-1]; 1e-4 is a common Adam fine-tuning rate), 20 epochs, a constant rate, and the
selected epoch by validation accuracy. Mean normalisation follows Keras' VGG16 preprocessing
(ImageNet mean pixel subtracted on the 0-255 scale, no division), which ported Keras weights
expect (Keras feeds them BGR: see PREPROCESSING in medxai_jax/models/porting.py). Start from
ImageNet weights with `--config.init_from=<checkpoint of experiments/port_weights.py>`.

By default this trains on the phantoms' body-part label (5 of the 7 outputs used); on the real
collection (builder `medical_modalities`: DIR holds one folder per modality class, stored RGB at
300 x 300, classes in the order of MODALITIES) these overrides do it:
  --config.dataset.name=medical_modalities --config.dataset.label_key=label
  --config.dataset.manual_dir=DIR
(another class set: --config.dataset.builder.class_names=a,b,c and --config.model.num_outputs).
The shifts are in stored pixels, so +-3 pixels of the 300 x 300 images, as in 004.
"""

import ml_collections

from configs import common

MODALITIES = ("abdomen_ct", "brain_mri", "cardiac_abdomen_ultrasound", "chest_xray",
              "fluorescence_microscopy", "retinal_funduscopy", "statistical_graph")
# Keras' 'caffe' preprocessing: the ImageNet mean pixel (B, G, R = 103.939, 116.779, 123.68 on
# the 0-255 scale), here in RGB order on the [0, 1] scale, with std 1/255 (no scaling).
CAFFE_MEAN_RGB = (123.68 / 255, 116.779 / 255, 103.939 / 255)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VGG16-GAP modality classifier as in 004. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "modality_vgg16_gap")
  config = common.base_config()
  config.dataset.label_key = "body_part"  # the real builder's label is the modality
  config.preprocess.update(dict(mean=CAFFE_MEAN_RGB, std=(1 / 255,) * 3))
  config.model = ml_collections.ConfigDict(dict(
      name="vgg16", head="gap", num_outputs=len(MODALITIES), input_shape=(300, 300, 3)))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam"))
  config.learning_rate = 1e-4
  config.batch_size = 10
  config.eval_batch_size = 50
  config.num_epochs = 20
  config.augment.update(dict(rotation_degrees=5.0, shift_pixels=3.0))
  config.selection.metric = "accuracy"
  return common.runlocal(config) if common.RUNLOCAL in words else config
