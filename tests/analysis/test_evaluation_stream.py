"""A whole split's leaderboard, streamed (`evaluate_run(num_images=None)`): shards of 5 on one
device, 8 on 4 devices and on 2 processes x 2 devices (padded tails) give the per-image scores
and bootstrap intervals of the one-batch path on the same images; a killed evaluation resumes at
its missing score shards; other settings are refused naming the field; the model-level checks
run on the recorded class-balanced sample, and equal `sanity_scores` of that sample.

The reference is the one-batch path (`evaluate_run` with the split's indices), whose scores the
other tests check against papers and libraries. The multi-device runs are this file run as a
script (tests/subprocess_env.py), as tests/test_explain_dataset.py does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

import subprocess_env
import tiny

NUM_TEST = 12
METHODS = ("gradients", "grad_cam")


def fast_options(**fields):
  from medxai_jax.analysis import evaluation

  return evaluation.ScoreOptions(**{
      "curve_steps": 4, "road_percentages": (20.0, 60.0), "sanity_methods": (),
      "num_resamples": 200, "sample_images": 4, **fields})


def make_run(root) -> None:
  """A run directory of random weights on 48 px phantoms, 12 test images (data prepared)."""
  from medxai_jax import explain

  config = tiny.demo_config(root / "tfds", num_train=4, num_validation=4, num_test=NUM_TEST,
                            dense_widths=(8,))
  tiny.save_random_selected_model(config, root / "run", scale=0.3)
  (root / "run" / "config.json").write_text(config.to_json_best_effort())
  explain.load_split(config, "test", ("label",))  # prepares the TFDS data once


def evaluate(root, workdir: str, num_images, **kwargs):
  from medxai_jax import runs
  from medxai_jax.analysis import evaluation

  kwargs.setdefault("score_options", fast_options())
  return evaluation.evaluate_run(runs.read_run_config(root / "run"), str(root / "run"),
                                 workdir, methods=METHODS, num_images=num_images, gallery_rows=3,
                                 **kwargs)


def _worker_main(argv: list[str]) -> None:
  """Subprocess entry: `test_evaluation_stream.py ROOT WORKDIR [ADDRESS PROCESSES PROCESS_ID]`."""
  import pathlib

  if len(argv) > 2:
    from medxai_jax.train import parallel

    assert parallel.initialize_distributed(argv[2], int(argv[3]), int(argv[4]))
  import jax

  summary = evaluate(pathlib.Path(argv[0]), argv[1], None, batch_size=8)
  print(json.dumps({"process_index": jax.process_index(), "devices": jax.device_count(),
                    "stream": summary["stream"], "has_leaderboard": "leaderboard" in summary},
                   default=str))


@pytest.fixture(scope="module")
def runs_(tmp_path_factory):
  """The one-batch and 1-device streamed evaluations (here), the 4-device and 2 x 2 ones
  started meanwhile."""
  import jax

  assert jax.device_count() == 1
  root = tmp_path_factory.mktemp("evaluation_stream")
  make_run(root)
  script = os.path.abspath(__file__)
  four = subprocess_env.spawn(script, 4, str(root), str(root / "four"))
  address = f"localhost:{subprocess_env.free_port()}"
  hosts = [subprocess_env.spawn(script, 2, str(root), str(root / "hosts"), address, "2", str(i))
           for i in range(2)]
  try:
    one_batch = evaluate(root, str(root / "one_batch"), NUM_TEST, indices=list(range(NUM_TEST)))
    streamed = evaluate(root, str(root / "streamed"), None, batch_size=5)
    yield {"root": root, "one_batch": one_batch, "streamed": streamed, "four": four,
           "hosts": hosts}
  finally:
    for process in (four, *hosts):
      if process.poll() is None:
        process.kill()
        process.wait()


def assert_same_scores(workdir, reference_dir, label: str) -> None:
  """Every per-image score and every leaderboard interval of `workdir` equals the reference's."""
  scores, reference = np.load(workdir / "scores.npz"), np.load(reference_dir / "scores.npz")
  assert sorted(scores.files) == sorted(reference.files), label
  for name in reference.files:
    np.testing.assert_allclose(scores[name], reference[name], rtol=1e-5, atol=1e-6,
                               err_msg=f"{label}: {name}")
  board = json.loads((workdir / "evaluation.json").read_text())["leaderboard"]
  expected = json.loads((reference_dir / "evaluation.json").read_text())["leaderboard"]
  assert board.keys() == expected.keys()
  for method, metrics in expected.items():
    assert board[method].keys() == metrics.keys(), (label, method)
    for metric, interval in metrics.items():
      got = board[method][metric]
      assert got["count"] == interval["count"], (label, method, metric)
      np.testing.assert_allclose([got[k] for k in ("mean", "low", "high")],
                                 [interval[k] for k in ("mean", "low", "high")], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{label}: {method} {metric}")


def test_streamed_shards_score_as_one_batch(runs_):
  root, streamed = runs_["root"], runs_["streamed"]
  assert streamed["num_images"] == NUM_TEST and streamed["indices"] == list(range(NUM_TEST))
  assert streamed["stream"]["num_shards"] == 3 and streamed["stream"]["shards_scored"] == [0, 1, 2]
  metrics = set(streamed["metrics"])
  assert {"pointing_game", "deletion_auc", "road_morf_auc", "marker_share"} <= metrics
  assert streamed["masks"]["localisation_coverage"]["num_images"] == NUM_TEST
  assert_same_scores(root / "streamed", root / "one_batch", "1 device, shards of 5")
  from medxai_jax import map_store

  maps = map_store.open_map_store(str(root / "streamed" / "maps"))  # explain's store format
  assert maps.methods == list(METHODS) and maps.complete()
  scores = map_store.open_map_store(str(root / "streamed" / "scores"))
  assert scores["gradients/deletion_auc"].shape == (NUM_TEST,)
  # The gallery: a class-balanced sample, not the first rows.
  labels = np.asarray(streamed["targets"])
  shown = streamed["gallery_indices"]
  assert len(shown) == 3 and set(labels[shown]) == set(labels.tolist())


def test_four_devices_score_as_one_batch(runs_):
  (output,) = subprocess_env.wait_json([runs_["four"]])
  assert output["devices"] == 4 and output["stream"]["num_devices"] == 4
  assert output["stream"]["num_shards"] == 2  # 8 and a padded tail of 4
  assert_same_scores(runs_["root"] / "four", runs_["root"] / "one_batch", "4 devices")


def test_two_processes_of_two_devices_score_as_one_batch(runs_):
  outputs = sorted(subprocess_env.wait_json(runs_["hosts"]), key=lambda o: o["process_index"])
  assert [o["devices"] for o in outputs] == [4, 4]
  assert [o["has_leaderboard"] for o in outputs] == [True, False]  # process 0 writes it
  assert [o["stream"]["shards_written"] for o in outputs] == [[0], [1]]
  assert_same_scores(runs_["root"] / "hosts", runs_["root"] / "one_batch", "2 x 2 devices")


def test_a_killed_evaluation_resumes_and_other_settings_are_refused(runs_, tmp_path):
  from medxai_jax import map_store

  workdir = tmp_path / "resumed"
  shutil.copytree(runs_["root"] / "streamed", workdir)
  scores = str(workdir / "scores")
  deleted = map_store.shard_path(scores, "grad_cam/deletion_auc", 1)
  os.remove(deleted)
  kept = map_store.shard_path(scores, "gradients/insertion_auc", 2)
  before = os.stat(kept).st_mtime_ns
  summary = evaluate(runs_["root"], str(workdir), None, batch_size=5)
  assert summary["stream"]["shards_scored"] == [1]
  assert os.path.exists(deleted) and os.stat(kept).st_mtime_ns == before
  assert all(not info["shards_computed"] for info in summary["methods"].values())  # maps kept
  assert_same_scores(workdir, runs_["root"] / "one_batch", "resumed")
  with pytest.raises(map_store.StoreMismatchError, match=r"score_options\.curve_steps: 4 -> 3"):
    evaluate(runs_["root"], str(workdir), None, batch_size=5,
             score_options=fast_options(curve_steps=3))


def test_model_level_checks_run_on_the_recorded_class_balanced_sample(runs_, tmp_path):
  import jax
  import jax.numpy as jnp

  from medxai_jax import explain
  from medxai_jax import runs
  from medxai_jax.analysis import evaluation

  workdir = tmp_path / "sanity"
  shutil.copytree(runs_["root"] / "streamed", workdir)  # maps and scores reused
  summary = evaluate(runs_["root"], str(workdir), None, batch_size=5,
                     score_options=fast_options(sanity_methods=("gradients",)))
  sample = np.asarray(summary["sample"]["indices"])
  labels = np.asarray(summary["targets"])
  assert len(sample) == 4 and set(labels[sample]) == set(labels.tolist())
  assert "class-balanced sample of 4 of the 12 images" in summary["sample"]["note"]
  assert summary["leaderboard"]["gradients"]["cascade_spearman"]["count"] == 4
  assert summary["leaderboard"]["gradients"]["deletion_auc"]["count"] == NUM_TEST
  config = runs.read_run_config(runs_["root"] / "run")
  selected = runs.restore_selected_model(config, str(runs_["root"] / "run"))
  examples = explain.load_split(config, "test", ("image", "label"))
  images = jax.jit(selected.preprocess)(jnp.asarray(examples["image"][sample]))
  sanity_key = jax.random.split(jax.random.key(0), 3)[2]
  expected = evaluation.sanity_scores(selected.model, selected.variables, images,
                                      jnp.asarray(examples["label"][sample], jnp.int32),
                                      "gradients", jax.random.fold_in(sanity_key, 0))
  got = summary["sanity"]["gradients"]["cascading"]["spearman"]
  np.testing.assert_allclose(got, np.nanmean(expected["cascading"]["spearman"], axis=1),
                             rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
