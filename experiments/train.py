r"""Trains a classifier from a config and evaluates the selected epoch on the test split.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo \
      --config.num_epochs=3 --config.learning_rate=3e-4

Re-running with the same --workdir resumes from the last end-of-epoch checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from medxai_jax import logs
from medxai_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
