"""experiments/train.py end to end: its command-line errors, and README's "Your own collection"
commands on copies of the real radiographs.

Each test copies one collection from ../shared/real_radiographs (as it ships) into a temporary
folder and runs what a new user types: `experiments.train` with `configs/cpu_trial.py`, then
`experiments.explain` and `experiments.evaluate_explanations` with only `--checkpoint`, and
checks the run directory: splits, metrics (strict JSON), the report's sections and figures, and
what is particular to the collection (MURA's study level and patient-disjoint splits, DICOM
orientation, Shenzhen's lung masks in the scores).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import real_data
import subprocess_env
from binaries import TINY
from binaries import run
from medxai_jax import runs
from medxai_jax.data import pipeline

REPO = pathlib.Path(subprocess_env.REPO)
TRAINING_SECTIONS = ("Test metrics", "Confusion matrix (test)", "ROC curves (test)",
                     "Training curves", "Class balance")
ADDED_SECTIONS = ("Explanations", "Scoring the explanations")
EXPLAIN = ("--methods=gradients,grad_cam", "--num_images=4", "--label=-1")
EVALUATE = (*EXPLAIN, "--curve_steps=5", "--sanity_methods=gradients")


def _run(module: str, *args: str, data_dir: pathlib.Path) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root, as the README shows it."""
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, f"{module} {args}:\n{result.stderr[-4000:]}"
  return result


def _strict_json(path: pathlib.Path):
  """The file parsed by a JSON reader that rejects NaN and Infinity."""
  def refuse(constant):
    raise ValueError(f"{path} holds {constant}")
  return json.loads(path.read_text(), parse_constant=refuse)


def _trial(tmp_path: pathlib.Path, dataset: str, manual: pathlib.Path, *overrides: str
           ) -> tuple[pathlib.Path, dict[str, subprocess.CompletedProcess]]:
  """Train -> explain -> evaluate of configs/cpu_trial.py:<dataset>; the run directory and the
  three processes."""
  data_dir, run = tmp_path / "tfds", tmp_path / "runs" / dataset
  run.parent.mkdir()
  done = {"train": _run("experiments.train", f"--config=configs/cpu_trial.py:{dataset}",
                        f"--workdir={run}", f"--config.dataset.manual_dir={manual}",
                        *overrides, data_dir=data_dir)}
  done["explain"] = _run("experiments.explain", f"--checkpoint={run}", *EXPLAIN,
                         data_dir=data_dir)
  done["evaluate"] = _run("experiments.evaluate_explanations", f"--checkpoint={run}",
                          *EVALUATE, data_dir=data_dir)
  return run, done


def _run_config(run: pathlib.Path, tmp_path: pathlib.Path):
  """The run's own config.json, reading the prepared data where the binaries put it."""
  config = runs.read_run_config(str(run))
  config.dataset.data_dir = str(tmp_path / "tfds")
  return config


def _check_report(run: pathlib.Path) -> str:
  """report.html has every training and added section, and every figure it shows exists."""
  html = (run / "report.html").read_text()
  for title in (*TRAINING_SECTIONS, *ADDED_SECTIONS):
    assert f">{title}</h2>" in html, title
  sources = re.findall(r'<img src="([^"]+)"', html)
  assert len(sources) >= 6, sources  # confusion, ROC, curves, overlays, gallery, deletion...
  for source in sources:
    assert (run / source).resolve().is_file(), source
  assert "overlays.png" in html  # maps drawn over the image
  return html


def _check_common(run: pathlib.Path, num_classes: int) -> dict:
  """Strict JSON files, consistent class counts, a class-balanced explanation sample."""
  metrics = _strict_json(run / "metrics.json")
  splits = _strict_json(run / "splits.json")
  assert len(metrics["class_names"]) == num_classes == len(splits["class_names"])
  confusion = np.asarray(metrics["test"]["confusion_matrix"])
  np.testing.assert_array_equal(confusion.sum(axis=1), splits["counts"]["test"])
  predictions = np.load(run / "predictions_test.npz")
  np.testing.assert_array_equal(np.bincount(predictions["labels"], minlength=num_classes),
                                splits["counts"]["test"])
  explained = _strict_json(run / "explain" / "explain.json")
  test_counts = np.asarray(splits["counts"]["test"])
  wanted = min(4, int(test_counts.sum()))
  assert len(explained["targets"]) == wanted
  per_class = np.bincount(explained["targets"], minlength=num_classes)
  # Class-balanced: no class gets two more than another that still had images to give.
  available = test_counts > per_class
  if available.any():
    assert per_class.max() - per_class[available].min() <= 1, (per_class, test_counts)
  evaluation = _strict_json(run / "evaluation" / "evaluation.json")
  assert {"deletion_auc", "insertion_auc", "cascade_spearman_abs"} <= set(evaluation["metrics"])
  _check_report(run)
  return evaluation


@pytest.mark.slow  # (all of README's commands, a training each)
def test_covid_radiography_as_shipped(tmp_path):
  manual = real_data.copy_real("covid", tmp_path / "covid")
  run, _ = _trial(tmp_path, "covid_radiography", manual,
                  "--config.dataset.builder.classes=COVID,Normal,Viral_Pneumonia",
                  "--config.dataset.builder.with_masks=False",
                  "--config.dataset.builder.read_metadata=False")
  root = manual / "COVID-19_Radiography_Dataset"
  on_disk = [len(list((root / folder / "images").iterdir()))
             for folder in ("COVID", "Normal", "Viral Pneumonia")]
  splits = _strict_json(run / "splits.json")
  assert splits["class_names"] == ["covid", "normal", "viral_pneumonia"]
  np.testing.assert_array_equal(np.sum([splits["counts"][s] for s in splits["counts"]], axis=0),
                                on_disk)  # every image in exactly one split
  evaluation = _check_common(run, 3)
  assert "lung_mask" in evaluation["not_scored"]["pointing_game"]  # built without masks
  assert evaluation["not_scored"]["marker_share"] == (
      "covid_radiography declares no marker mask")


@pytest.mark.slow  # (all of README's commands, a training each)
def test_brain_mri_kaggle_folder_release(tmp_path):
  manual = real_data.copy_real("brain_kaggle", tmp_path / "brain")
  run, _ = _trial(tmp_path, "brain_tumor_kaggle", manual)
  splits = _strict_json(run / "splits.json")
  assert splits["class_names"] == ["glioma", "meningioma", "no_tumor", "pituitary"]
  testing = {folder.name: len(list(folder.iterdir()))
             for folder in sorted((manual / "Testing").iterdir())}
  assert splits["counts"]["test"] == [testing["glioma_tumor"], testing["meningioma_tumor"],
                                      testing["no_tumor"], testing["pituitary_tumor"]]
  # Where the splits come from (Testing/ is not drawn from Training/'s pool), in the report too.
  assert splits["provenance"]["test"].startswith("the release's Testing/ folder")
  assert "validation: 10% of Training/ per class" in (run / "report.html").read_text()
  _check_common(run, 4)


@pytest.mark.slow  # (all of README's commands, a training each)
def test_shenzhen_with_its_lung_masks(tmp_path):
  manual = real_data.copy_real("tb", tmp_path / "tb")
  run, done = _trial(tmp_path, "tb_cxr", manual, "--config.dataset.builder_config=shenzhen",
                     "--config.dataset.builder.split_fractions=0.4,0.2,0.4",
                     "--config.batch_size=2")
  metrics = _strict_json(run / "metrics.json")
  assert metrics["test"]["roc_auc"] is None  # the sample holds normals only
  assert "roc_auc is undefined on the test split" in done["train"].stderr
  evaluation = _check_common(run, 2)
  assert evaluation["masks"]["localisation_coverage"]["indices_without_mask"] == []
  for metric in ("pointing_game", "energy", "hit_rate", "miou"):
    assert metric in evaluation["metrics"], metric
    assert evaluation["leaderboard"]["gradients"][metric]["count"] == evaluation["num_images"]


@pytest.mark.slow  # (all of README's commands, a training each)
def test_mura_study_level_and_patient_disjoint_splits(tmp_path):
  manual = real_data.copy_real("mura", tmp_path / "mura")
  run, _ = _trial(tmp_path, "mura", manual, "--config.batch_size=2")
  metrics = _strict_json(run / "metrics.json")
  predictions = np.load(run / "predictions_test.npz")
  studies = sorted(set(predictions["study_id"].tolist()))
  assert metrics["test_by_study"]["num_examples"] == len(studies)
  parts = sorted(set(predictions["body_part"].tolist()))
  assert sorted(metrics["test_by_body_part"]) == parts
  for part in parts:
    assert set(metrics["test_by_body_part"][part]) == {"image", "study"}
  # The study-level probability is the mean of the study's image probabilities (MURA paper).
  probabilities = predictions["probabilities"][:, 1]
  study_means = {s: probabilities[predictions["study_id"] == s].mean() for s in studies}
  labels = {s: predictions["labels"][predictions["study_id"] == s][0] for s in studies}
  accuracy = np.mean([(study_means[s] >= 0.5) == labels[s] for s in studies])
  assert metrics["test_by_study"]["accuracy"] == pytest.approx(accuracy)
  html = _check_report(run)
  assert "study" in html.lower()
  _check_common(run, 2)
  # No patient in two splits.
  config = _run_config(run, tmp_path)
  sources = pipeline.load_sources(config.dataset, ["train", "validation", "test"])
  patients = {split: set(pipeline.read_feature(source, "patient_id").tolist())
              for split, source in sources.items()}
  assert not patients["train"] & patients["validation"]
  assert not (patients["train"] | patients["validation"]) & patients["test"]


@pytest.mark.slow  # (all of README's commands, a training each)
def test_dicom_class_folder(tmp_path):
  loose = real_data.copy_real("torchxrayvision_tests", tmp_path / "loose")
  monochrome2 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
  layout = {
      "train/normal": ["00000001_000.png", "tbx11k_test_data/imgs/health/h0001.png"],
      "train/abnormal": ["tbx11k_test_data/imgs/tb/tb0005.png",
                         "covid-19-pneumonia-58-prior.jpg"],
      "val/normal": ["00027426_000.png"], "val/abnormal": ["tbx11k_test_data/imgs/tb/tb0007.png"],
      "test/normal": [monochrome2], "test/abnormal": ["Fake_MONOHR1.dcm", "16747_3_1.jpg"],
  }
  manual = tmp_path / "dicom_folder"
  for folder, names in layout.items():
    (manual / folder).mkdir(parents=True)
    for name in names:
      (manual / folder / pathlib.Path(name).name).write_bytes((loose / name).read_bytes())
  (manual / "test" / "abnormal" / "reading.docx").write_text("not an image")
  run, _ = _trial(tmp_path, "medical_modalities", manual,
                  "--config.dataset.builder.class_names=abnormal,normal",
                  "--config.model.num_outputs=2", "--config.batch_size=2")
  splits = _strict_json(run / "splits.json")
  assert splits["counts"] == {"train": [2, 2], "validation": [1, 1], "test": [2, 1]}
  _check_common(run, 2)
  # The stored DICOMs: MONOCHROME2 shows the lungs darker than the mediastinum; the fake
  # MONOCHROME1 file holds the same pixels, so honouring its photometric interpretation
  # stores their inverse (what the DICOM standard and torchxrayvision's reader do).
  builder = pipeline.load_builder(_run_config(run, tmp_path).dataset)
  assert builder.info.metadata["unhandled_files"] == ["test/abnormal/reading.docx"]
  source = builder.as_data_source(split="test")
  stored = {pathlib.Path(record["path"].decode()).name: record["image"][..., 0].astype(float)
            for record in (source[i] for i in range(len(source)))}
  normal, fake = stored[monochrome2], stored["Fake_MONOHR1.dcm"]
  size = normal.shape[0]
  rows = slice(size // 3, 2 * size // 3)
  lungs = np.concatenate([normal[rows, size // 5:2 * size // 5],
                          normal[rows, 3 * size // 5:4 * size // 5]]).mean()
  mediastinum = normal[rows, 9 * size // 20:11 * size // 20].mean()
  assert lungs < mediastinum - 20, (lungs, mediastinum)
  np.testing.assert_allclose(fake, 255.0 - normal, atol=1.0)


def test_train_cli_rejects_unknown_override_and_missing_parent(tmp_path, data_dir):
  result = run("experiments.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
               "--config.learnig_rate=0.1", data_dir=data_dir)
  assert result.returncode != 0
  assert "learnig_rate" in result.stderr
  result = run("experiments.train", "--config=configs/demo.py",
               f"--workdir={tmp_path / 'no' / 'such' / 'dir'}", *TINY, data_dir=data_dir)
  assert result.returncode != 0
  assert "does not exist" in result.stderr
