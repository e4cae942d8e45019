"""Rajaraman et al., "Visualizing abnormalities in chest radiographs through salient network
activations" (002_5c5237004c36e0a4.txt), section II-B: the customised CNN from scratch.

227x227x3 inputs; SGD with momentum, L2 penalty 5e-4, learning rate 1e-3 divided by 10 when the
validation accuracy stops improving, at most three times; 60 epochs (15,000 iterations, so about
250 iterations an epoch); dropout 0.5 on FC6/FC7; weights from N(0, 0.01). The paper trains on
the Shenzhen/Montgomery TB sets; by default this runs on the phantoms (128 px, resized to 227 on
the device, as every collection's stored images are). On the TB sets (builder `tb_cxr`; the
folder holding MontgomerySet/ and ChinaSet_AllFiles/ as shipped, see
medxai_jax/data/builders/tb_cxr.py):
  --config.dataset.name=tb_cxr --config.dataset.manual_dir=/path/to/download
Not stated in the paper and chosen here: momentum 0.9 (MATLAB's default), batch size 32, a
2-epoch plateau patience.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The custom CNN recipe of 002. `:runlocal` shrinks it for a CPU trial (common.runlocal)."""
  words = common.parse_arg(arg, "chest_xray_custom_cnn")
  config = common.base_config()
  config.preprocess.update(dict(mean=(0.5,), std=(0.25,)))
  config.model = ml_collections.ConfigDict(dict(
      name="custom_cnn", num_outputs=2, input_shape=(227, 227, 3),
      conv_widths=(96, 128, 256, 256, 256), dense_widths=(4096, 4096), dropout_rate=0.5,
      init_std=0.01))
  common.sgd_002(config)
  return common.runlocal(config) if common.RUNLOCAL in words else config
