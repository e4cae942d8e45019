"""An unfinished run (no selected_model/ yet) is explained only on the explicit opt-in
`model='best_so_far'`: its best epoch checkpoint, restored through `runs.restore_model`, with
the epoch recorded in the outputs; never a silent fallback.

The oracle: a finished 2-epoch run's selected_model/ (written by training from its best
checkpoint) and metrics.json's selected epoch; the run is then made unfinished by removing them.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import tiny


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
  from medxai_jax import runs
  from medxai_jax.train import loop

  root = tmp_path_factory.mktemp("best_so_far")
  config = tiny.demo_config(root / "tfds", num_train=16, num_validation=8, num_test=4,
                            dense_widths=(8,), num_epochs=2, batch_size=8)
  run = root / "run"
  loop.train_and_evaluate(config, str(run))
  selected = runs.restore_selected_model(config, str(run))
  epoch = json.loads((run / "metrics.json").read_text())["selected_epoch"]
  shutil.rmtree(run / runs.SELECTED_MODEL_DIR)  # as a run stopped before its last epoch
  (run / "metrics.json").unlink()
  return config, run, selected, epoch


def test_best_so_far_restores_the_best_epoch_and_records_it(unfinished, tmp_path):
  from medxai_jax import explain
  from medxai_jax import runs

  config, run, selected, epoch = unfinished
  with pytest.raises(FileNotFoundError, match="training has not finished.*--model=best_so_far"):
    runs.restore_model(config, str(run))  # the default stays the selected model: no fallback
  best = runs.restore_model(config, str(run), runs.BEST_SO_FAR)
  assert best.epoch == epoch and epoch in (1, 2)
  for got, want in zip(jax.tree_util.tree_leaves(best.variables),
                       jax.tree_util.tree_leaves(selected.variables)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  summary = explain.explain_run(config, str(run), str(tmp_path / "explain"),
                                methods=["gradients"], num_images=2, label=-1,
                                model=runs.BEST_SO_FAR)
  assert summary["model"] == {"which": "best_so_far", "epoch": epoch}
  written = json.loads((tmp_path / "explain" / "explain.json").read_text())
  assert written["model"] == summary["model"]
  with pytest.raises(ValueError, match=r"--model must be one of \('selected', 'best_so_far'\)"):
    runs.restore_model(config, str(run), "latest")


def test_best_so_far_needs_an_epoch_checkpoint(tmp_path):
  from medxai_jax import runs

  config = tiny.demo_config(tmp_path / "tfds")
  (tmp_path / "run").mkdir()
  with pytest.raises(FileNotFoundError, match="no epoch checkpoint .* yet"):
    runs.restore_model(config, str(tmp_path / "run"), runs.BEST_SO_FAR)
