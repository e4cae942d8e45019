"""On the real Kaggle brain MRI copy: its test split is stored in class order, so a whole-split
explain run's figure must show a class-balanced sample (not the first rows); and the builder
records where each split comes from (validation carved from Training/, test = Testing/), which
the run report prints beside the test metrics.

A small copy (3 images per class and folder) is prepared at 40 px; the model has random weights
(`tiny.save_random_selected_model`): the figure's choice does not depend on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import real_data
import tiny

def first_images(per_folder: int = 3) -> list[str]:
  """The first `per_folder` files (sorted) of each class folder of Training/ and Testing/."""
  root = real_data.real_root() / "brain_kaggle"
  return [path.relative_to(root).as_posix() for split in ("Training", "Testing")
          for folder in sorted((root / split).iterdir())
          for path in sorted(folder.iterdir())[:per_folder]]


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory):
  from configs import cpu_trial

  root = tmp_path_factory.mktemp("kaggle")
  manual = real_data.copy_real("brain_kaggle", root / "manual", keep=first_images())
  config = cpu_trial.get_config("brain_tumor_kaggle")
  config.dataset.update(dict(data_dir=str(root / "tfds"), manual_dir=str(manual)))
  config.dataset.builder.update(dict(image_size=40, validation_fraction=1 / 3))
  config.model.update(dict(input_shape=(40, 40, 1), conv_widths=(4, 4, 4, 4, 4),
                           dense_widths=(4,)))
  tiny.save_random_selected_model(config, root / "run", scale=0.3)
  (root / "run" / "config.json").write_text(config.to_json_best_effort())
  return root, config


def test_a_class_ordered_test_split_gets_a_class_balanced_figure(kaggle_run):
  from medxai_jax import explain_dataset
  from medxai_jax.data import pipeline

  root, config = kaggle_run
  labels = pipeline.split_labels(config.dataset, "test")
  assert len(labels) == 12 and list(labels) == sorted(labels)  # stored in class order
  assert len(set(labels[:explain_dataset.FIGURE_IMAGES].tolist())) < 4  # the first 8: 3 classes
  summary = explain_dataset.explain_split_run(config, str(root / "run"), str(root / "explain"),
                                              split="test", methods=["gradients"],
                                              batch_size=4)
  assert summary["num_images"] == 12 and len(summary["indices"]) == 8
  assert sorted(set(summary["targets"])) == [0, 1, 2, 3]  # every class in the figure's rows
  assert np.bincount(summary["targets"]).tolist() == [2, 2, 2, 2]
  np.testing.assert_array_equal(labels[summary["indices"]], summary["targets"])
  written = json.loads((root / "explain" / "explain.json").read_text())
  assert written["indices"] == summary["indices"]
  assert written["figure_sample"] == "class-balanced, seeded"
  from medxai_jax import map_store

  store = map_store.open_map_store(str(root / "explain" / "maps"))
  np.testing.assert_array_equal(np.load(root / "explain" / "maps_gradients.npy"),
                                store["gradients"][summary["indices"]])


def test_the_builder_records_where_each_split_comes_from_and_the_report_says_it(kaggle_run,
                                                                               tmp_path):
  from medxai_jax.data import pipeline
  from medxai_jax.viz import run_report

  _, config = kaggle_run
  provenance = pipeline.split_provenance(config.dataset)
  assert provenance["test"].startswith("the release's Testing/ folder")
  assert provenance["validation"].startswith("33% of Training/ per class")
  assert provenance["train"] == "Training/ less the validation carve"
  # Test: Testing/'s 12 images; train + validation: Training/'s, split 2:1 per class.
  sizes = {split: len(source) for split, source in
           pipeline.load_sources(config.dataset, ["train", "validation", "test"]).items()}
  assert sizes == {"train": 8, "validation": 4, "test": 12}
  files = run_report.RunFiles(str(tmp_path), metrics={"test": {"accuracy": 0.25},
                                                      "validation": {}, "selected_epoch": 1},
                              splits={"provenance": provenance})
  text = " ".join(run_report.metrics_section(files).paragraphs)
  assert f"test: {provenance['test']}" in text and f"validation: {provenance['validation']}" in text
  bare = run_report.RunFiles(str(tmp_path), metrics={"test": {"accuracy": 0.25}},
                             splits={"counts": {}})
  assert "Where the splits come from" not in " ".join(run_report.metrics_section(bare).paragraphs)
