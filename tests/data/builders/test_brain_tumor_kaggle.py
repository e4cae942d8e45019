"""The Kaggle brain MRI builder on copies of the real samples in ../shared/real_radiographs (tiny
image sizes): the folder release as it ships and its other spellings."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import real_data
import tiny
from fake_folders import prepare as _prepare
from fake_folders import records as _records

from medxai_jax.data import builders
from medxai_jax.data.builders import brain_tumor_kaggle


# The Kaggle class folders in label order (alphabetical, as Keras' flow_from_directory reads).
KAGGLE_FOLDERS = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")


def test_real_kaggle_brain_release_prepares_with_four_classes(tmp_path):
  manual = real_data.copy_real("brain_kaggle", tmp_path / "manual")
  (manual / "README.txt").write_text("downloaded from Kaggle")
  config = brain_tumor_kaggle.make_brain_kaggle_config(image_size=32, validation_fraction=0.25)
  builder = _prepare(brain_tumor_kaggle.BrainTumorKaggle, config, tmp_path / "data", manual)
  assert builder.info.features["label"].names == ["glioma", "meningioma", "no_tumor", "pituitary"]
  splits = {split: _records(builder, split) for split in ("train", "validation", "test")}
  on_disk = {split: sorted(p.relative_to(manual).as_posix()
                           for p in (manual / folder).rglob("*.jpg"))
             for split, folder in (("train", "Training"), ("test", "Testing"))}
  assert sorted(r["path"] for r in splits["test"]) == on_disk["test"]
  assert sorted(r["path"] for r in splits["train"] + splits["validation"]) == on_disk["train"]
  for split in ("train", "validation", "test"):
    for record in splits[split]:
      assert record["label"] == KAGGLE_FOLDERS.index(record["path"].split("/")[1])
      assert record["image"].shape == (32, 32, 1) and record["image"].dtype == np.uint8
      with Image.open(manual / record["path"]) as image:
        assert tuple(record["original_size"]) == (image.height, image.width)
  # A quarter of each class's distinct training images carved out as validation; byte-identical
  # copies (the release has some) stay on one side.
  digest = {r["path"]: hashlib.sha1((manual / r["path"]).read_bytes()).hexdigest()
            for records in splits.values() for r in records}
  for label in range(4):
    distinct = {digest[r["path"]] for r in splits["train"] + splits["validation"]
                if r["label"] == label}
    carved = {digest[r["path"]] for r in splits["validation"] if r["label"] == label}
    assert len(carved) == round(0.25 * len(distinct)), label
  assert not ({digest[r["path"]] for r in splits["train"]}
              & {digest[r["path"]] for r in splits["validation"]})
  groups: dict[str, list[str]] = {}
  for path, value in digest.items():
    groups.setdefault(value, []).append(path)
  assert builder.info.metadata["duplicate_files"] == sorted(
    sorted(group) for group in groups.values() if len(group) > 1)
  assert builder.info.metadata["duplicate_files"]  # the sample has some
  assert builder.info.metadata["unhandled_files"] == ["README.txt"]
  assert builders.mask_keys("brain_tumor_kaggle") == (None, None)
  # A slice is a dark background around a bright head: the centre outshines the corners.
  images = np.stack([r["image"][..., 0].astype(np.float64) for r in splits["test"]])
  corners = np.concatenate([images[:, :4, :4], images[:, :4, -4:], images[:, -4:, :4],
                            images[:, -4:, -4:]], axis=1)
  assert images[:, 10:22, 10:22].mean() > corners.mean() + 30


def test_kaggle_brain_other_spelling_in_a_top_folder(tmp_path):
  rng = np.random.default_rng(0)
  top = tmp_path / "manual" / "archive"
  folders = ("glioma", "meningioma", "notumor", "pituitary")
  for split in ("Training", "Testing"):
    for label, folder in enumerate(folders):
      for number in range(3):
        path = top / split / folder / f"Tr-{label}{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (20 + number, 16) if number % 2 else (18, 24, 3)  # gray and RGB, varied sizes
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
  config = brain_tumor_kaggle.make_brain_kaggle_config(image_size=8, validation_fraction=1 / 3)
  builder = _prepare(brain_tumor_kaggle.BrainTumorKaggle, config, tmp_path / "data",
                     tmp_path / "manual")
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {"train": 8, "validation": 4, "test": 12}
  for split in counts:
    for record in _records(builder, split):
      assert record["label"] == folders.index(record["path"].split("/")[1])
  (top / "Testing" / "notumor").rename(top / "Testing" / "healthy")
  with pytest.raises(ValueError, match=r"unexpected \['healthy'\], missing \['no_tumor'\]"):
    _prepare(brain_tumor_kaggle.BrainTumorKaggle, config, tmp_path / "data2", tmp_path / "manual")
  with pytest.raises(FileNotFoundError, match="Training/ and Testing/"):
    _prepare(brain_tumor_kaggle.BrainTumorKaggle, config, tmp_path / "data3", top / "Testing")


def test_kaggle_brain_config_loads_through_the_pipeline(tmp_path):
  from medxai_jax.data import pipeline

  manual = real_data.copy_real("brain_kaggle", tmp_path / "manual",
                               keep=["*/*/*1).jpg", "*/*/1.jpg", "*/*/1?.jpg"])
  sources = pipeline.load_sources(
    {"name": "brain_tumor_kaggle", "data_dir": str(tmp_path / "data"),
     "manual_dir": str(manual), "builder_config": "default"}, ["train", "test"])
  test_paths = sorted(p.relative_to(manual).as_posix() for p in (manual / "Testing").rglob("*"))
  assert sorted(sources["test"][i]["path"].decode() for i in range(len(sources["test"]))) == [
    path for path in test_paths if path.endswith(".jpg")]
  assert sources["train"][0]["image"].shape == (512, 512, 1)  # the default config's size


# --- test_kaggle_split_order.py
# On the real Kaggle brain MRI copy: its test split is stored in class order, so a whole-split
# explain run's figure must show a class-balanced sample (not the first rows); and the builder
# records where each split comes from (validation carved from Training/, test = Testing/), which
# the run report prints beside the test metrics.
#
# A small copy (3 images per class and folder) is prepared at 40 px; the model has random weights
# (`tiny.save_random_selected_model`): the figure's choice does not depend on it.


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
