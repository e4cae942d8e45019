"""The demo: a small custom CNN learns fracture/hardware vs normal on synthetic radiographs.

The train and validation splits carry an "L"/"R" marker that agrees with the label 80% of the
time; in the test split it agrees 50% of the time, so test accuracy shows whether the model
learned the lesions rather than the marker (000_09513d2f8ec1fa7b.txt's text-legend finding).
At 90% agreement this small model leans on the marker (test accuracy about 0.87, 0.76 where the
marker contradicts the label); at 80% it reaches about 0.93. Sized to train in about three and a
half minutes on two CPU cores.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Demo config."""
  config = common.base_config()
  config.dataset.builder.update(dict(image_size=96, num_train=3000, num_validation=500,
                                     num_test=1000, train_marker_agreement=0.8,
                                     validation_marker_agreement=0.8))
  config.preprocess.update(dict(mean=(0.25,), std=(0.25,)))
  config.model = ml_collections.ConfigDict(dict(
      name="custom_cnn", num_outputs=1, input_shape=(96, 96, 1),
      conv_widths=(32, 64, 64, 64, 64), dense_widths=(96, 96), dropout_rate=0.0,
      init_std=None))  # He init: N(0, 0.01) starves a narrow net of signal
  config.optimizer = ml_collections.ConfigDict(dict(name="adam"))
  config.learning_rate = 3e-3
  config.batch_size = 32
  config.num_epochs = 10
  config.log_every_steps = 25
  # Demo report settings.
  config.explain = ml_collections.ConfigDict(dict(
      num_images=8,
      methods=("gradients", "smoothgrad", "ig", "blur_ig", "guided_ig", "xrai", "grad_cam",
               "crm"),
      num_steps=32, num_samples=16,  # path-method gradient evaluations, SmoothGrad samples
      num_roi_images=128,         # 004's Table 3 (ROI sizes) on this many test images
      num_scored=16,              # images scored per method in the explanation leaderboard
      representation=dict(num_images=384, perplexity=30.0, tsne_iters=500)))
  # 001's report auto-annotation on synthetic wrist reports (medxai_jax/annotation/reports.py).
  config.annotation = ml_collections.ConfigDict(dict(
      num_reports=600, label_noise=0.02, unlabelled_fraction=0.35, num_folds=5))
  return config
