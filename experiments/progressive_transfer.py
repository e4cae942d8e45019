r"""Progressive transfer learning (001_1a0a1523609161bb.txt, Table 2, figures 10-11): four arms.

  python -m experiments.progressive_transfer --workdir=runs/progressive_transfer
  python -m experiments.progressive_transfer --config=configs/progressive_transfer.py:mura \
      --config.dataset.manual_dir=DIR --config.transfer.imagenet_init=PORTED --workdir=runs/pt

The protocol lives in medxai_jax/train/transfer.py. Each arm is a chain of `loop.train_and_evaluate` calls linked by `init_from` (arrays with the
same path and shape are loaded; a head whose number of outputs changes keeps its fresh init):

  WristNet           random               -> target           WORKDIR/wristnet/target
  RadiNetRand_wrist  random   -> source   -> target           WORKDIR/radinetrand_wrist/{source,target}
  ImageNet_wrist     ImageNet             -> target           WORKDIR/imagenet_wrist/target
  RadiNet_wrist      ImageNet -> source   -> target           WORKDIR/radinet_wrist/{source,target}

The source stage is RadiNet (RadiNetRand from a random start): body-part classification. The
target is abnormality (001: wrist fracture). The config's top level is the target stage,
`config.transfer.source` what the source stage changes (configs/progressive_transfer.py). With no
`config.transfer.imagenet_init` the ImageNet arms are skipped and marked so, never faked.

A stage with `metrics.json` is finished and is not re-run; an interrupted one resumes from its
own checkpoint (train_and_evaluate does that). A stage directory trained with a different value
of any config field is an error (delete it or use another --workdir), so stale results are
never reused; fields that a code change added or removed since, and log_every_steps,
profile_steps and config.summaries (what is watched, not trained), are not compared. A progress
line (stage k of n, rate, ETA) follows each stage.
Writes into --workdir: comparison.csv and comparison.md (arm x test accuracy, F1, kappa,
ROC AUC of the target stage), training_loss.png (figure 11), comparison.png (figure 10) and
report.html.

On the phantoms the target uses all five body parts unless `--config.dataset.filter` (e.g.
'body_part=forearm') keeps one; the source stage is never filtered.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from experiments import cli
from medxai_jax import logs
from medxai_jax.train import transfer
from medxai_jax.train import workdir as workdir_lib


def _define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """The binary's flags (defined only when run as __main__)."""
  config = cli.define_config_file(
      "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "progressive_transfer.py"),
      "Progressive transfer config file.")
  workdir = flags.DEFINE_string("workdir", "runs/progressive_transfer", "Output directory.")
  return config, workdir


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  start = time.time()
  written = transfer.run(_CONFIG.value, workdir_lib.prepare_workdir(_WORKDIR.value))
  with open(written["md"]) as f:
    print(f.read())
  print(f"Progressive transfer took {time.time() - start:.0f} s. Report: {written['report']}")


if __name__ == "__main__":
  _CONFIG, _WORKDIR = _define_flags()
  cli.run(main)
