"""Rajaraman et al.'s pre-trained VGG16 with only its last layers fine-tuned
(002_5c5237004c36e0a4.txt, section II-C "Usage of pre-trained models", with the training
settings of section II-B).

"The last-three layers of the pre-trained models are fine-tuned for the binary classification
task of interest. All the layers from the pre-trained models are extracted, except the last three
layers that are replaced with a fully-connected layer, a Softmax, and a classification output
layer. The fully-connected layer is set to have the size of the number of classes"; "initialized
to a learning rate of 1e-3 and run for 60 epochs". Section II-B's training settings: SGD with
momentum, "L2-regularization, setting the penalty multiplier to 0.0005", the learning rate
"divided by 10 when the validation accuracy ceased to improve and is reduced thrice", and
dropout 0.5 in the fully connected layers (VGG16's drop6 / drop7).

Read here as: VGG16 (classic head, 224 x 224 x 3) with a new 2-way softmax 'predictions' layer;
config.train.trainable='last_n_layers' with num_trainable_layers=3 trains the last three layers
that own parameters (fc1, fc2, predictions = MATLAB's fc6, fc7 and the new fc8) and freezes
every convolution. In MATLAB's layer list "the last three layers" are fc8, softmax and the
output layer, i.e. one weighted layer; for that reading set num_trainable_layers=1.

Not stated in 002 and chosen here: momentum 0.9 (MATLAB's default), batch size 32, a 2-epoch
plateau patience (as configs/chest_xray_custom_cnn.py), Keras' 'caffe' input normalisation
(ImageNet mean pixel, 0-255 scale), which ported Keras VGG16 weights expect. 002 also raises the
learning rate of the new layer ("WeightLearnRateFactor"); per-layer rates are not implemented.

Start from ImageNet weights with `--config.init_from=<experiments/port_weights.py --arch=vgg16
output>` (its 1000-way 'predictions' does not match and keeps its fresh initialisation). By
default this trains on the phantoms (abnormal vs normal, resized to 224); on the Shenzhen and
Montgomery TB sets (DIR holding the collections as shipped):
  --config.dataset.name=tb_cxr --config.dataset.manual_dir=DIR
"""

import ml_collections

from configs import common
from configs import modality_vgg16_gap


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VGG16 fine-tuning recipe of 002. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "chest_xray_vgg16_finetune")
  config = common.base_config()
  config.preprocess.update(dict(mean=modality_vgg16_gap.CAFFE_MEAN_RGB, std=(1 / 255,) * 3))
  config.model = ml_collections.ConfigDict(dict(
      name="vgg16", head="classic", num_outputs=2, input_shape=(224, 224, 3), dropout_rate=0.5))
  config.train.update(dict(trainable="last_n_layers", num_trainable_layers=3))
  common.sgd_002(config)
  config.eval_batch_size = 64
  return common.runlocal(config) if common.RUNLOCAL in words else config
