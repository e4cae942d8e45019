r"""Trains a classifier from a config and evaluates the selected epoch on the test split.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo \
      --config.num_epochs=3 --config.learning_rate=3e-4

Re-running with the same --workdir resumes from the last end-of-epoch checkpoint. At the end,
<workdir>/report.html shows the test metrics, confusion matrix, ROC curves, training curves and
class balance (medxai_jax/viz/run_report.py; explain and evaluate_explanations add their
sections to it later).

Every local device trains data-parallel (medxai_jax/train/parallel.py): config.batch_size is the
global batch, split over the devices, so it must be a multiple of the device count. Optional:
--config.train.compute_dtype=bfloat16 (float32 parameters) and
--config.train.accumulation_steps=K (K micro-batches per optimiser step).

Several hosts: start one process per host with the same command plus --multihost (the cluster is
detected by jax.distributed: SLURM, Open MPI, TPU pods, ...), or name the coordinator yourself
with --coordinator_address=HOST:PORT --num_processes=N --process_id=I. The work directory must be
on a file system every host sees (checkpoints are written by all processes; the JSON files by
process 0). For example, SLURM, 2 nodes with 8 GPUs each, one process per node:

  srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
      .venv/bin/python -m experiments.train --config=configs/mura_densenet169.py \
      --workdir=/shared/runs/mura --config.batch_size=64 --multihost

and a TPU pod slice (one process per TPU VM host):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd medxai-jax && \
      .venv/bin/python -m experiments.train --config=configs/mura_densenet169.py \
      --workdir=/mnt/shared/runs/mura --config.batch_size=64 --multihost"

Without SLURM or a TPU pod (e.g. two plain machines), on each machine I in {0, 1}:

  .venv/bin/python -m experiments.train ... --coordinator_address=10.0.0.1:12345 \
      --num_processes=2 --process_id=I

$MEDXAI_DISTRIBUTED=1 acts as --multihost, and $JAX_COORDINATOR_ADDRESS as --coordinator_address.
"""

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import cli
from medxai_jax import logs
from medxai_jax.train import loop
from medxai_jax.viz import run_report

_CONFIG = cli.define_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
cli.define_multihost_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  # Before anything touches a device.
  cli.initialize_distributed()
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:  # the process that wrote the run's JSON files
    logging.info("Report: %s", run_report.write_run_report(_WORKDIR.value))


if __name__ == "__main__":
  cli.run(main)
