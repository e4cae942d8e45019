"""The run report (medxai_jax/viz/run_report.py) from fabricated run files, the overlay figure,
added sections, and experiments.train writing report.html end to end."""

from __future__ import annotations

import html.parser
import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

import real_data
import subprocess_env
from medxai_jax.data import preprocess
from medxai_jax.viz import figures
from medxai_jax.viz import report
from medxai_jax.viz import run_report

REPO = subprocess_env.REPO


class _ReportParser(html.parser.HTMLParser):
  """Section titles, paragraphs, tables (rows of cell texts) and <img src> of a report."""

  def __init__(self):
    super().__init__()
    self.titles, self.paragraphs, self.tables, self.images = [], [], [], []
    self._text, self._tag = None, None

  def handle_starttag(self, tag, attrs):
    if tag == "table":
      self.tables.append([])
    elif tag == "tr":
      self.tables[-1].append([])
    elif tag in ("td", "th", "h2", "p"):
      self._text, self._tag = "", tag
    elif tag == "img":
      self.images.append(dict(attrs)["src"])

  def handle_data(self, data):
    if self._text is not None:
      self._text += data

  def handle_endtag(self, tag):
    if tag != self._tag:
      return
    if tag in ("td", "th"):
      self.tables[-1][-1].append(self._text)
    elif tag == "h2":
      self.titles.append(self._text)
    else:
      self.paragraphs.append(self._text)
    self._text = self._tag = None


def parse(path):
  parser = _ReportParser()
  with open(path) as file:
    parser.feed(file.read())
  return parser


def table_with_header(parsed, first_cell):
  matches = [t for t in parsed.tables if t and t[0] and t[0][0] == first_cell]
  assert len(matches) == 1, (first_cell, [t[0] for t in parsed.tables])
  return matches[0]


def naive_confusion(labels, predictions, classes):
  matrix = np.zeros((classes, classes), np.int64)
  for true, predicted in zip(labels, predictions):
    matrix[true, predicted] += 1
  return matrix


def naive_auc(positive, scores):
  """P(score of a positive > score of a negative) + half the ties, over every pair."""
  pos, neg = scores[positive], scores[~positive]
  return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def fabricate_run(run_dir, names, labels, probabilities, *, test_auc, extra_metrics=None,
                  skip=()):
  """The files train_and_evaluate writes, from given labels and probabilities (none computed by
  the code under test)."""
  os.makedirs(run_dir, exist_ok=True)
  labels = np.asarray(labels, np.int64)
  predictions = probabilities.argmax(axis=1)
  confusion = naive_confusion(labels, predictions, len(names))
  history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.1 * e,
              "val_loss": 1.2 / e, "val_accuracy": 0.45 + 0.1 * e,
              "val_roc_auc": None if e == 1 else 0.6 + 0.05 * e, "learning_rate": 0.001,
              "selected": e == 2} for e in (1, 2, 3)]
  metrics = {"selected_epoch": 2, "selection_metric": "val_accuracy", "epochs_run": 3,
             "class_names": list(names), "validation": {"val_accuracy": 0.65, "val_f1": 0.61},
             "test": {"accuracy": float(np.mean(predictions == labels)), "roc_auc": test_auc,
                      "cohen_kappa": 0.4321, "f1": 0.5678, "num_examples": len(labels),
                      "confusion_matrix": confusion.tolist()},
             **(extra_metrics or {})}
  splits = {"class_names": list(names),
            "counts": {"train": [20 + 3 * k for k in range(len(names))],
                       "validation": [5] * len(names),
                       "test": np.bincount(labels, minlength=len(names)).tolist()}}
  files = {"config.json": {"model": {"name": "custom_cnn"},
                           "dataset": {"name": "radiograph_phantoms"}},
           "metrics.json": metrics, "splits.json": splits}
  for name, content in files.items():
    if name not in skip:
      with open(os.path.join(run_dir, name), "w") as file:
        json.dump(content, file)
  if "history.jsonl" not in skip:
    with open(os.path.join(run_dir, "history.jsonl"), "w") as file:
      file.writelines(json.dumps(record) + "\n" for record in history)
  if "predictions_test.npz" not in skip:
    np.savez(os.path.join(run_dir, "predictions_test.npz"), labels=labels,
             logits=np.log(probabilities).astype(np.float32),
             probabilities=probabilities.astype(np.float32))
  return {"metrics": metrics, "splits": splits, "history": history, "confusion": confusion}


def assert_images_exist(parsed, run_dir):
  assert parsed.images
  for source in parsed.images:
    assert os.path.isfile(os.path.join(run_dir, source)), source


def binary_predictions(count=40, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(count) % 2
  positive = np.clip(0.35 * labels + 0.65 * rng.random(count), 0.01, 0.99)
  return labels, np.stack([1 - positive, positive], axis=1)


def test_binary_run_report_shows_the_files_values(tmp_path):
  labels, probabilities = binary_predictions()
  run = str(tmp_path / "run")
  made = fabricate_run(run, ["normal", "abnormal"], labels, probabilities, test_auc=0.8123)
  path = run_report.write_run_report(run)
  assert path == os.path.join(run, "report.html")
  parsed = parse(path)
  assert parsed.titles == ["Run", "Test metrics", "Confusion matrix (test)", "ROC curves (test)",
                           "Training curves", "Class balance"]
  assert_images_exist(parsed, run)
  metrics_rows = {row[0]: row[1:] for row in table_with_header(parsed, "metric")[1:]}
  test = made["metrics"]["test"]
  for name in ("accuracy", "roc_auc", "cohen_kappa", "f1", "num_examples"):
    assert metrics_rows[name][0] == report.format_cell(test[name]), name
  assert metrics_rows["accuracy"][1] == report.format_cell(0.65)  # validation of epoch 2
  assert metrics_rows["cohen_kappa"][1] == "-"  # not in the validation record
  confusion = table_with_header(parsed, "true \\ predicted")
  assert confusion[0] == ["true \\ predicted", "normal", "abnormal", "total"]
  for k, name in enumerate(["normal", "abnormal"]):
    assert confusion[1 + k] == [name, *map(str, made["confusion"][k]),
                                str(made["confusion"][k].sum())]
  roc = table_with_header(parsed, "curve")
  auc = naive_auc(labels == 1, probabilities[:, 1])
  assert roc[1] == ["abnormal vs normal", str(int(labels.sum())), str(int((labels == 0).sum())),
                    report.format_cell(auc)]
  balance = table_with_header(parsed, "split")
  assert balance[1] == ["train", "20", "23", "43"]
  assert table_with_header(parsed, "share of the split")[1] == ["train", "46.5%", "53.5%"]
  epochs = table_with_header(parsed, "epoch")
  assert [row[-1] for row in epochs[1:]] == ["", "selected", ""]
  assert epochs[1][5] == "n/a"  # epoch 1's null val_roc_auc
  assert not any("missing" in p for p in parsed.paragraphs)


def test_three_classes_with_one_absent_from_the_test_split(tmp_path):
  rng = np.random.default_rng(1)
  labels = np.arange(30) % 2  # class 2 ('pneumonia') never occurs in the test split
  logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[labels]
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  run = str(tmp_path / "run")
  names = ["covid", "normal", "pneumonia"]
  made = fabricate_run(run, names, labels, probabilities, test_auc=None)
  parsed = parse(run_report.write_run_report(run))
  assert_images_exist(parsed, run)
  metrics_rows = {row[0]: row[1:] for row in table_with_header(parsed, "metric")[1:]}
  assert metrics_rows["roc_auc"][0] == "n/a"  # null in metrics.json
  assert "Class pneumonia is absent from the test split (no true examples)." in parsed.paragraphs
  roc = {row[0]: row[1:] for row in table_with_header(parsed, "curve")[1:]}
  for k in (0, 1):
    assert roc[f"{names[k]} vs rest"][2] == report.format_cell(
        naive_auc(labels == k, probabilities[:, k]))
  assert roc["pneumonia vs rest"][2].startswith("no ROC curve: pneumonia is absent")
  confusion = table_with_header(parsed, "true \\ predicted")
  assert confusion[3][1:] == [*map(str, made["confusion"][2]), "0"]
  assert "The test split has no example of class pneumonia." in parsed.paragraphs


def test_roc_curves_use_the_positive_probability_and_their_area_is_the_auc():
  labels, probabilities = binary_predictions(count=60, seed=3)
  probabilities[:10, 1] = 0.5  # ties
  (result,) = run_report.roc_curves(labels, probabilities, ["a", "b"])
  assert result.name == "b vs a" and result.num_positive == 30 and result.num_negative == 30
  assert result.fpr[0] == 0 and result.tpr[0] == 0 and result.fpr[-1] == 1 and result.tpr[-1] == 1
  assert np.all(np.diff(result.fpr) >= 0) and np.all(np.diff(result.tpr) >= 0)
  area = float(np.sum(np.diff(result.fpr) * (result.tpr[1:] + result.tpr[:-1]) / 2))
  assert area == pytest.approx(naive_auc(labels == 1, probabilities[:, 1]))
  assert result.auc == pytest.approx(area)
  # One class only: a reason, no curve.
  (alone,) = run_report.roc_curves(np.zeros(5, np.int64), probabilities[:5], ["a", "b"])
  assert alone.fpr is None and "b is absent" in alone.reason
  with pytest.raises(ValueError, match="3 class names"):
    run_report.roc_curves(labels, probabilities, ["a", "b", "c"])


def test_study_and_body_part_tables_render_what_metrics_json_holds(tmp_path):
  labels, probabilities = binary_predictions()
  by_study = {"accuracy": 0.75, "cohen_kappa": 0.5, "num_studies": 12}
  by_part = {"XR_ELBOW": {"image": {"accuracy": 0.7, "num_examples": 9},
                          "study": {"accuracy": 0.8, "roc_auc": None}},
             "XR_HAND": {"image": {"accuracy": 0.6}, "study": {"accuracy": 0.5}}}
  run = str(tmp_path / "run")
  fabricate_run(run, ["negative", "positive"], labels, probabilities, test_auc=0.7,
                extra_metrics={"test_by_study": by_study, "test_by_body_part": by_part})
  parsed = parse(run_report.write_run_report(run))
  study = [t for t in parsed.tables if t[1][0] == "studies"]
  assert len(study) == 1
  header, row = study[0]
  assert dict(zip(header[1:], row[1:])) == {k: report.format_cell(v) for k, v in by_study.items()}
  parts = [t for t in parsed.tables if t[1][0] == "XR_ELBOW / image"][0]
  cells = {row[0]: dict(zip(parts[0][1:], row[1:])) for row in parts[1:]}
  assert set(cells) == {"XR_ELBOW / image", "XR_ELBOW / study", "XR_HAND / image",
                        "XR_HAND / study"}
  assert cells["XR_ELBOW / study"] == {"num_examples": "-", "accuracy": "0.8", "roc_auc": "n/a"}
  assert cells["XR_ELBOW / image"]["num_examples"] == "9"


def test_missing_and_unreadable_files_give_a_report_that_says_so(tmp_path):
  labels, probabilities = binary_predictions()
  still_training = str(tmp_path / "training")
  fabricate_run(still_training, ["a", "b"], labels, probabilities, test_auc=0.5,
                skip=("metrics.json", "predictions_test.npz", "splits.json"))
  parsed = parse(run_report.write_run_report(still_training))
  assert len(parsed.titles) == 6
  text = " ".join(parsed.paragraphs)
  for name in ("metrics.json", "predictions_test.npz", "splits.json"):
    assert f"Not used: {name} is missing" in text
  assert "Epoch 2 is selected." in parsed.paragraphs  # from the history's 'selected' flags
  assert parsed.images == ["report_figures/training_curves.png"]
  assert_images_exist(parsed, still_training)

  empty = tmp_path / "empty"
  empty.mkdir()
  parsed = parse(run_report.write_run_report(str(empty)))
  assert len(parsed.titles) == 6 and not parsed.images
  assert sum("is missing in this run directory" in p for p in parsed.paragraphs) == 5

  broken = str(tmp_path / "broken")
  fabricate_run(broken, ["a", "b"], labels, probabilities, test_auc=0.5)
  with open(os.path.join(broken, "metrics.json"), "w") as file:
    file.write('{"test": ')
  np.savez(os.path.join(broken, "predictions_test.npz"), labels=labels,
           probabilities=probabilities[:5])
  parsed = parse(run_report.write_run_report(broken))
  text = " ".join(parsed.paragraphs)
  assert "metrics.json is unreadable" in text
  assert "'probabilities' must be [N=40, K]; got shape (5, 2)" in text
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run_report.write_run_report(str(tmp_path / "nowhere"))


def _figure(path):
  fig, ax = plt.subplots(figsize=(1, 1))
  ax.plot([0, 1])
  return figures.save_figure(fig, str(path))


def test_add_section_replaces_a_key_in_place_and_keeps_the_others(tmp_path):
  labels, probabilities = binary_predictions()
  run = tmp_path / "run"
  fabricate_run(str(run), ["a", "b"], labels, probabilities, test_auc=0.5)
  elsewhere = tmp_path / "explain"
  elsewhere.mkdir()
  _figure(elsewhere / "first.png")
  wide = report.Table([f"column {i}" for i in range(16)], [[f"v{i}" for i in range(16)]])
  run_report.add_section(str(run), "explanations", report.Section(
      "Explanations v1", paragraphs=["first"], figures=[report.Figure("../explain/first.png")]))
  run_report.add_section(str(run), "evaluation", report.Section("Scores", tables=[wide]))
  _figure(run / "second.png")
  path = run_report.add_section(str(run), "explanations", report.Section(
      "Explanations v2", figures=[report.Figure(str(run / "second.png"), "again")]))
  parsed = parse(path)
  assert parsed.titles[6:] == ["Explanations v2", "Scores"]  # replaced where it was
  assert "Explanations v1" not in parsed.titles
  assert "second.png" in parsed.images and "../explain/first.png" not in parsed.images
  assert_images_exist(parsed, str(run))
  stored = json.loads((run / "report_sections" / "explanations.json").read_text())
  assert stored["section"]["figures"] == [{"path": "second.png", "caption": "again"}]
  assert table_with_header(parsed, "column 0")[1] == [f"v{i}" for i in range(16)]
  # Re-rendering after training again keeps the added sections; a vanished figure is named.
  os.remove(run / "second.png")
  parsed = parse(run_report.write_run_report(str(run)))
  assert parsed.titles[6:] == ["Explanations v2", "Scores"]
  assert "Figure second.png is missing (removed after this section was added)." in \
      parsed.paragraphs
  with pytest.raises(FileNotFoundError, match="nothing.png"):
    run_report.add_section(str(run), "x", report.Section("x", figures=[
        report.Figure("nothing.png")]))
  assert not (run / "report_sections" / "x.json").exists()  # a refused section leaves nothing
  with pytest.raises(ValueError, match="Section key"):
    run_report.add_section(str(run), "../x", report.Section("x"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run_report.add_section(str(tmp_path / "nowhere"), "x", report.Section("x"))
  assert not (tmp_path / "nowhere").exists()
  (run / "report_sections" / "evaluation.json").write_text('{"order": 2}')
  parsed = parse(run_report.write_run_report(str(run)))
  assert parsed.titles[6:] == ["Explanations v2", "Section evaluation"]
  assert any("evaluation.json is unreadable (no 'section' with a 'title')" in p
             for p in parsed.paragraphs)


def test_report_layout_scrolls_wide_tables_and_keeps_the_demo_api(tmp_path):
  text = report.render_report("t", [report.Section(
      "s", tables=[report.Table(["a", "b"], [[1, None]], caption="c")])])
  assert "<div class='table-scroll'><table>" in text and "overflow-x: auto" in text
  assert "position: sticky" in text and "max-width: 1100px" not in text
  assert "<td>n/a</td>" in text and "<a href='#section-1'>s</a>" in text
  with pytest.raises(FileNotFoundError, match="gone.png"):
    report.write_report(str(tmp_path / "r.html"), "t",
                        [report.Section("s", figures=[report.Figure("gone.png")])])


def test_overlay_rgba_is_clear_below_the_cut_and_jet_above():
  strength = np.linspace(0, 1, 101).reshape(1, 101)
  rgba = figures.overlay_rgba(strength, alpha_max=0.7, low_cut=0.25)
  assert rgba.shape == (1, 101, 4)
  alpha = rgba[0, :, 3]
  assert np.all(alpha[strength[0] <= 0.25] == 0)
  assert np.all(alpha[strength[0] > 0.25] > 0)
  assert alpha[-1] == pytest.approx(0.7)
  assert np.all(np.diff(alpha) >= 0)
  np.testing.assert_allclose(rgba[0, :, :3], plt.get_cmap("jet")(strength[0])[:, :3])
  with pytest.raises(ValueError, match="overlay_strength"):
    figures.overlay_rgba(strength * 2)


def test_overlay_strength_counts_magnitude_and_clips_at_the_percentile():
  rng = np.random.default_rng(0)
  signed = rng.normal(size=(16, 16, 3))
  strength = figures.overlay_strength(signed, percentile=90.0)
  np.testing.assert_allclose(strength, figures.overlay_strength(-signed, percentile=90.0))
  magnitude = np.abs(signed).sum(axis=-1)
  top = np.percentile(magnitude, 90.0)
  np.testing.assert_allclose(strength, np.clip(magnitude / top, 0, 1))
  assert np.mean(strength == 1.0) == pytest.approx(0.1, abs=0.01)


def test_plot_overlay_grid_on_real_radiographs(tmp_path):
  copied = real_data.copy_real("covid/COVID-19_Radiography_Dataset", tmp_path / "covid",
                               keep=["Normal/images/Normal-1.jpg", "COVID/images/COVID-1.jpg"])
  images = [preprocess.read_image(path) for path in sorted(copied.glob("*/images/*.jpg"))]
  assert sorted(image.shape[-1] for image in images) == [1, 3]  # one gray, one RGB JPEG
  images = np.stack([preprocess.resize_np(preprocess.to_gray(preprocess.to_unit_float(image)),
                                          64, 64) for image in images])
  yy, xx = np.mgrid[:16, :16]
  blob = np.exp(-((yy - 5.0) ** 2 + (xx - 10.0) ** 2) / 8.0)  # a map smaller than the image
  maps = {"blob": np.stack([blob, blob.T]), "signed": np.stack([blob - 0.5, 0.5 - blob])}
  path = figures.plot_overlay_grid(images, maps, str(tmp_path / "grid.png"),
                                   titles=["Normal-1", "COVID-1"],
                                   masks=np.stack([np.ones((64, 64))] * 2))
  rendered = plt.imread(path)
  assert rendered.shape[0] < rendered.shape[1]  # 2 rows, 3 columns and a colour bar
  with pytest.raises(ValueError, match=r"maps_by_method\['blob'\] holds 1 maps for 2 images"):
    figures.plot_overlay_grid(images, {"blob": blob[None]}, str(tmp_path / "bad.png"))
  with pytest.raises(ValueError, match=r"masks\[0\] has shape \(16, 16\); its image is 64x64"):
    figures.plot_overlay_grid(images, maps, str(tmp_path / "bad.png"), masks=np.ones((2, 16, 16)))
  with pytest.raises(ValueError, match="1 titles for 2 images"):
    figures.plot_overlay_grid(images, maps, str(tmp_path / "bad.png"), titles=["x"])


def test_explanation_section_overlays_each_method_and_names_the_skipped(tmp_path):
  labels, probabilities = binary_predictions()
  run = tmp_path / "run"
  fabricate_run(str(run), ["normal", "fracture"], labels, probabilities, test_auc=0.5)
  workdir = tmp_path / "explain"
  workdir.mkdir()
  rng = np.random.default_rng(0)
  np.save(workdir / "maps_gradients.npy", rng.normal(size=(2, 16, 16, 1)))
  np.save(workdir / "maps_grad_cam.npy", rng.random((2, 8, 8)))
  _figure(workdir / "attributions.png")
  summary = {"checkpoint": str(run), "split": "test", "indices": [3, 7], "targets": [1, 1],
             "options": {"steps": 8, "samples": 4, "chunk_size": 16},
             "methods": {"gradients": {"compile_seconds": 0.5, "seconds_per_image": 0.01},
                         "cam": {"skipped": "the head is not GAP + dense"},
                         "grad_cam": {"compile_seconds": 0.7, "seconds_per_image": 0.02}},
             "figure": "attributions.png"}
  section = run_report.explanation_section(str(workdir), summary, str(run),
                                           images=rng.random((2, 16, 16, 1)))
  assert [f.path for f in section.figures] == ["../explain/overlays.png",
                                               "../explain/attributions.png"]
  parsed = parse(run_report.add_section(str(run), "explanations", section))
  assert parsed.titles[-1] == "Explanations"
  assert "cam skipped: the head is not GAP + dense" in parsed.paragraphs
  assert any("indices [3, 7]" in p and "(fracture, fracture)" in p for p in parsed.paragraphs)
  timings = table_with_header(parsed, "method")
  assert timings[1:] == [["gradients", "0.01", "0.5"], ["grad_cam", "0.02", "0.7"]]
  assert_images_exist(parsed, str(run))
  with pytest.raises(ValueError, match="3 images given for the 2 explained indices"):
    run_report.explanation_section(str(workdir), summary, str(run), images=np.zeros((3, 16, 16)))


def test_train_binary_writes_the_report(tmp_path):
  workdir = tmp_path / "run"
  tiny = ["--config.dataset.builder.image_size=48", "--config.dataset.builder.num_train=32",
          "--config.dataset.builder.num_validation=16", "--config.dataset.builder.num_test=16",
          "--config.model.input_shape=(48, 48, 1)", "--config.model.conv_widths=(4, 4, 4, 4, 4)",
          "--config.model.dense_widths=(8, 8)", "--config.batch_size=8",
          "--config.num_epochs=2"]
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/demo.py",
                           f"--workdir={workdir}", *tiny], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Report: {workdir}/report.html" in result.stderr
  parsed = parse(workdir / "report.html")
  assert parsed.titles[:6] == ["Run", "Test metrics", "Confusion matrix (test)",
                               "ROC curves (test)", "Training curves", "Class balance"]
  assert_images_exist(parsed, str(workdir))
  metrics = json.loads((workdir / "metrics.json").read_text())
  confusion = table_with_header(parsed, "true \\ predicted")
  assert [row[1:-1] for row in confusion[1:-1]] == [
      [str(c) for c in row] for row in metrics["test"]["confusion_matrix"]]
  epochs = table_with_header(parsed, "epoch")
  assert [row[0] for row in epochs[1:]] == ["1", "2"]


def test_explained_inputs_reads_the_chosen_records_and_their_masks():
  rng = np.random.default_rng(0)
  source = [{"image": rng.integers(0, 255, (8, 8, 1), dtype=np.uint8),
             "lung_mask": rng.integers(0, 2, (8, 8, 1), dtype=np.uint8), "label": k % 2}
            for k in range(5)]
  images, masks = run_report.explained_inputs(source, [4, 1], "lung_mask")
  np.testing.assert_array_equal(images, np.stack([source[4]["image"], source[1]["image"]]))
  np.testing.assert_array_equal(masks, np.stack([source[4]["lung_mask"][..., 0],
                                                 source[1]["lung_mask"][..., 0]]))
  assert run_report.explained_inputs(source, [0], None)[1] is None
  assert run_report.explained_inputs(source, [0], "tumor_mask")[1] is None
  with pytest.raises(ValueError, match="Index 5 is outside the split's 5 records"):
    run_report.explained_inputs(source, [5], None)


def test_the_module_renders_the_report_of_an_existing_run_from_the_command_line(tmp_path):
  labels, probabilities = binary_predictions()
  run = tmp_path / "old_run"
  fabricate_run(str(run), ["a", "b"], labels, probabilities, test_auc=0.5,
                skip=("predictions_test.npz", "splits.json"))
  command = [sys.executable, "-m", "medxai_jax.viz.run_report"]
  result = subprocess.run([*command, str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == str(run / "report.html")
  assert "predictions_test.npz is missing" in result.stderr
  assert_images_exist(parse(run / "report.html"), str(run))
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "usage" in result.stderr
