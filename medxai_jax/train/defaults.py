"""The fields every training run has, with their neutral defaults: the one place they are written.

Paper configs (configs/) start from `base_config()` and override what their paper specifies;
`train.schema.with_defaults` fills an older run's config.json from it. It lives in the library,
not in configs/, so that code importing medxai_jax from anywhere can read a run.
"""

from __future__ import annotations

import ml_collections

from medxai_jax.data import pipeline


# Fields that moved, dotted path -> what to write instead: the message of a command line, a
# config or code that still spells one (a run's config.json is migrated: schema.migrate_config).
MOVED_FIELDS = {
    "dataset.phantoms": (
        "config.dataset.phantoms is gone: the phantoms' settings are builder options like any "
        "builder's, e.g. --config.dataset.builder.image_size=64 "
        "--config.dataset.builder.num_train=256 (in a config file: "
        "config.dataset.builder.update(dict(image_size=64, num_train=256)))."),
}


class DatasetSection(ml_collections.ConfigDict):
  """`config.dataset`: a ConfigDict whose missing `phantoms` field, looked up by the command-line
  parser or by code, raises a KeyError that names the new spelling (MOVED_FIELDS)."""

  def __getitem__(self, key: str):
    if key == "phantoms" and key not in self:
      raise KeyError(MOVED_FIELDS["dataset.phantoms"])
    return super().__getitem__(key)


def base_config() -> ml_collections.ConfigDict:
  """Fields every training run has, with neutral defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = DatasetSection()
  # Every recipe trains on the synthetic phantoms until the user names a collection
  # (--config.dataset.name=mura ...); their settings are builder options like any builder's.
  config.dataset.name = pipeline.PHANTOMS_NAME
  config.dataset.data_dir = ""  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.dataset.manual_dir = ""  # where a manually downloaded dataset lives
  config.dataset.builder_config = ""  # a named config of the builder ('' = its default)
  # The builders' options, applied on top of builder_config: every option of every builder
  # (image_size, classes, with_masks, read_metadata, on_corrupt, storage_bits, split_fractions,
  # the phantoms' num_train, seed, train_marker_agreement, ...), None = the chosen builder's
  # default. E.g. --config.dataset.builder.image_size=64
  # --config.dataset.builder.read_metadata=False --config.dataset.builder.classes=COVID,Normal
  # --config.dataset.builder.split_fractions=0.7,0.1,0.2. Setting one the chosen builder lacks is
  # an error listing its options.
  config.dataset.builder = pipeline.builder_options_config()
  config.dataset.label_key = "label"
  config.dataset.train_split = "train"
  config.dataset.validation_split = "validation"
  config.dataset.test_split = "test"
  # Keep only matching records in every split: 'feature=value[,value][;feature=value]', values
  # as class names or ints (e.g. 'body_part=forearm' on the phantoms, 'body_part=XR_WRIST' on MURA).
  config.dataset.filter = ""
  # Adebayo et al.'s data-randomisation test: train on a fixed permutation of the training labels.
  config.dataset.shuffle_labels = False
  config.dataset.shuffle_labels_seed = 0

  # Stored images -> [0, 1] -> (x - mean) / std, per channel. bit_depth: None divides uint8 by
  # 255 and uint16 by 65535 (float images are taken as [0, 1]); an int b divides integer images
  # by 2**b - 1, e.g. --config.preprocess.bit_depth=12 for raw 12-bit values in 16-bit PNGs.
  # tb_cxr's `montgomery_16bit` stores uint16 rescaled to the full 16 bits: use 16 (or None).
  config.preprocess = ml_collections.ConfigDict(dict(
      mean=(0.0,), std=(1.0,), bit_depth=ml_collections.config_dict.placeholder(int)))

  config.model = ml_collections.ConfigDict()
  # A checkpoint to start from (e.g. ImageNet weights written by experiments/port_weights.py);
  # '' = random initialisation.
  config.init_from = ""
  # Fine-tuning controls (medxai_jax/train/freeze.py). trainable: 'all' | 'head' (only what
  # model.head reads, after the 'last_conv' tap) | 'last_n_layers' (the last
  # num_trainable_layers layers that own parameters, in forward order). head_only_epochs: train
  # only the head for this many epochs first (001's warm-up), then `trainable`.
  # compute_dtype: 'float32' | 'bfloat16' (activations and matrix products; parameters, optimiser
  # state, BatchNorm statistics and the loss stay float32). accumulation_steps: k > 1 splits
  # each batch of batch_size into k micro-batches whose gradients are summed before one
  # optimiser step (batch_size stays the global batch: per device batch_size / devices / k).
  config.train = ml_collections.ConfigDict(dict(
      trainable="all", num_trainable_layers=0, head_only_epochs=0, compute_dtype="float32",
      accumulation_steps=1))
  # On-device training augmentation (medxai_jax/data/augment.py), all off by default: horizontal
  # flips, rotations by up to rotation_degrees, shifts by up to shift_pixels (stored-image
  # pixels), zoom by a factor in [1 - zoom, 1 + zoom]; fill_mode 'constant' (fill_value, on the
  # [0, 1] scale) or 'nearest'.
  config.augment = ml_collections.ConfigDict(dict(
      flip=False, rotation_degrees=0.0, shift_pixels=0.0, zoom=0.0, fill_mode="constant",
      fill_value=0.0))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam"))
  config.learning_rate = 1e-3
  # name: 'constant' | 'step_decay' (boundaries as fractions of num_epochs, divisors) |
  # 'plateau' (metric, factor, patience, max_reductions (0 = unlimited), min_learning_rate).
  config.schedule = ml_collections.ConfigDict(dict(
      name="constant", boundaries=(), divisors=(), metric="loss", mode="", factor=0.1,
      patience=3, max_reductions=0, min_learning_rate=0.0))
  # The global batch, whatever the device count (it must divide evenly over the devices); the
  # eval batch size is rounded up to a multiple of the device count.
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 10
  config.class_weights = ""  # '' | 'balanced' | comma-separated weights, one per class
  # metric: a validation metric ('accuracy', 'loss', 'roc_auc', ...) or 'train_val_gap'.
  config.selection = ml_collections.ConfigDict(dict(metric="accuracy", mode=""))
  config.early_stopping = ml_collections.ConfigDict(dict(patience=0, metric="loss", mode=""))
  # max_to_keep: end-of-epoch checkpoints kept. every_steps: also checkpoint every N training
  # steps within an epoch (0 = at the end of each epoch only), so a long epoch killed midway
  # resumes from its last such step, bit-identically. SIGTERM always checkpoints the current step.
  config.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2, every_steps=0))
  config.log_every_steps = 50
  # The input pipeline (grain; medxai_jax/data/pipeline.py): workers = processes decoding
  # batches (0 = in this process, in one background thread; a GPU host with CPU cores to spare:
  # e.g. --config.input.workers=8), prefetch = batches each reads ahead. The batches and
  # their order do not depend on either, so a resumed run may change them.
  config.input = ml_collections.ConfigDict(dict(workers=0, prefetch=2))
  # TensorBoard event files under <workdir>/tensorboard/, written by process 0
  # (medxai_jax/observe/summaries.py; view with `tensorboard --logdir <workdir>/tensorboard`):
  # the config, step and epoch scalars, the test metrics and, per epoch, a Grad-CAM overlay of
  # the first num_images validation images (0 = none). enabled=False writes no event files.
  config.summaries = ml_collections.ConfigDict(dict(enabled=True, num_images=4))
  # 'a,b': a jax.profiler trace of global training steps a..b (from 1) into <workdir>/profile/
  # (TensorBoard's profile plugin / XProf, or its .trace.json.gz in https://ui.perfetto.dev);
  # 'a' traces one step; '' = no profile.
  config.profile_steps = ""
  return config
