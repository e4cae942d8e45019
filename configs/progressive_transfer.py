"""Progressive transfer learning, 001_1a0a1523609161bb.txt (sections 3.1-3.2, 4.1, 4.3, Table 2,
figure 11): the four arms WristNet, RadiNetRand_wrist, ImageNet_wrist and RadiNet_wrist, run by
`experiments/progressive_transfer.py`.

Layout: the top level is the *target* task's training config (what WristNet trains with, and
every target stage); `transfer.source` lists only what the *source* stage (RadiNet /
RadiNetRand, body-part classification) changes, merged onto the top level. So
`--config.num_epochs=3` changes both stages and `--config.transfer.source.num_epochs=5` only the
source. `transfer.imagenet_init` is a directory written by `experiments/port_weights.py`; with
'' the ImageNet arms are skipped and marked so in the table (issue 7: "skipped, not faked").
`train.head_only_epochs` is 001's warm-up "where no fine-tuning does occur, if any": it applies
only to stages that start from weights (ImageNet or a source run), never to a random start.

Default (no argument): the phantoms. Source task = the phantoms' `body_part` (5 classes,
softmax) on its own phantoms (seed 1, 1,200 training images), target task = `label`
(abnormal vs normal, sigmoid) on 400 training images from seed 0: a scarce target, a larger
source, disjoint images. The target uses all five body parts by default;
`--config.dataset.filter=body_part=forearm` restricts every target stage to one body part, as
001's wrist target (the source stage always keeps all parts: its `filter` is ''). The L/R marker is uninformative (50%)
in every split, so the target is lesion detection, not the shortcut. Model: a small DenseNet
(blocks 2-2-2-2, growth 8, stem 16) at 64 x 64 x 1 with RadiNet's dense-stack head (widths
64-32-32-16); Adam 1e-3, batch 16, 001's plateau schedule (x0.1 after 3 epochs without a
lower validation loss) and balanced class weights; 8 source / 12 target epochs, a 1-epoch
head-only warm-up on transferred stages, the epoch of lowest validation loss selected. Runtime
of the default (WristNet + RadiNetRand_wrist, 3 stages): 3 min 22 s wall, 2 min 8 s CPU, on the
two CPU cores shared with other jobs (load ~8); compilation is ~30 s of each stage, an epoch
1-5 s. The ImageNet arms need DenseNet-169 ImageNet weights and so the `mura` settings (a
ported file does not fit this small DenseNet: the binary says so before training).

`--config=configs/progressive_transfer.py:mura`: the real protocol of 001 section 4.1 on MURA
(source: builder 'all', 7 body parts; target: builder 'wrist', abnormal vs normal; 001's own
target is the AUBMC wrist set, not public: point `--config.dataset.name/builder_config` at any
builder of a wrist fracture set), every stage with configs/radinet_densenet169.py's recipe:
DenseNet-169 at 320 x 320 x 3 with the RadiNet head (1024-512-256-128 + output), Adam 1e-4
(beta 0.9/0.999), x0.1 after a 3-epoch validation-loss plateau down to 1e-7, a 25-epoch
head-only warm-up, early stopping after 10 epochs without a better validation loss, balanced
class weights, ImageNet mean/std input (epoch budget 100, batch size 8 and the selection rule,
lowest validation loss, are not stated in 001; see that file). Run:
  python -m experiments.progressive_transfer --config=configs/progressive_transfer.py:mura \
      --config.dataset.manual_dir=DIR --config.transfer.imagenet_init=PORTED --workdir=runs/pt
where DIR holds MURA-v1.1/ and PORTED is `experiments/port_weights.py --arch=densenet169`.
"""

import ml_collections

from configs import common
from configs import radinet_densenet169

_MURA_BODY_PARTS = 7  # medxai_jax/data/builders/mura.py BODY_PARTS
_PHANTOM_BODY_PARTS = 5  # medxai_jax/data/phantoms.py BODY_PARTS


def _transfer_section(source: dict) -> ml_collections.ConfigDict:
  """The experiment's own settings: source-stage overrides, ImageNet weights, arms."""
  return ml_collections.ConfigDict(dict(
      source=source,
      imagenet_init="",  # experiments/port_weights.py directory; '' skips the ImageNet arms
      arms="wristnet,radinetrand_wrist,imagenet_wrist,radinet_wrist"))


def _phantoms() -> ml_collections.ConfigDict:
  """Small DenseNet on the phantoms: a few minutes on two CPU cores."""
  config = common.base_config()
  config.dataset.builder.update(dict(
      image_size=64, num_train=400, num_validation=200, num_test=400, seed=0,
      train_marker_agreement=0.5, validation_marker_agreement=0.5, test_marker_agreement=0.5))
  config.preprocess.update(dict(mean=(0.25,), std=(0.25,)))
  config.model = ml_collections.ConfigDict(dict(
      name="densenet", num_outputs=1, head="radinet", input_shape=(64, 64, 1),
      block_sizes=(2, 2, 2, 2), growth_rate=8, stem_width=16,
      head_hidden_widths=(64, 32, 32, 16)))
  config.optimizer = ml_collections.ConfigDict(dict(name="adam", b1=0.9, b2=0.999))
  config.learning_rate = 1e-3
  config.schedule.update(dict(name="plateau", metric="loss", factor=0.1, patience=3,
                              min_learning_rate=1e-7))
  config.class_weights = "balanced"
  config.batch_size = 16
  config.num_epochs = 12
  config.selection.metric = "loss"
  config.train.head_only_epochs = 1
  config.log_every_steps = 25
  config.transfer = _transfer_section(dict(
      dataset=dict(label_key="body_part", filter="", builder=dict(seed=1, num_train=1200)),
      model=dict(num_outputs=_PHANTOM_BODY_PARTS),
      num_epochs=8))
  return config


def _mura() -> ml_collections.ConfigDict:
  """001's protocol on MURA: source = all body parts, target = the wrist images."""
  config = radinet_densenet169.get_config()  # 001 section 4.1's recipe, one source of truth
  config.dataset.update(dict(name="mura", builder_config="wrist", label_key="label"))
  config.transfer = _transfer_section(dict(
      dataset=dict(builder_config="all", label_key="body_part", filter=""),
      model=dict(num_outputs=_MURA_BODY_PARTS),
      num_epochs=config.num_epochs))
  return config


def get_config(preset: str = "phantoms") -> ml_collections.ConfigDict:
  """'phantoms' (default) or 'mura' (`--config=configs/progressive_transfer.py:mura`)."""
  presets = {"phantoms": _phantoms, "mura": _mura}
  if preset not in presets:
    raise ValueError(f"configs/progressive_transfer.py:{preset} is not one of {sorted(presets)}.")
  return presets[preset]()
