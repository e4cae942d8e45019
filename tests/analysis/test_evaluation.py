"""Scoring explanations on real radiographs: without masks, with lung masks, with has_lung_mask.

The sets are prepared from copies of ../shared/real_radiographs through the command-line path:
`config.dataset.manual_dir` and `config.dataset.builder.<option>`, as `experiments/train.py` gets
them, so training and scoring run unchanged on them.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.filters
from PIL import Image

import real_data
from configs import common
from medxai_jax.analysis import evaluation as ee
from medxai_jax.analysis import faithfulness
from medxai_jax import explain
from medxai_jax import runs
from medxai_jax.train import loop
from medxai_jax.viz import evaluation_report

SIZE = 48  # the tiny custom CNN's five poolings need at least 32 px
COVID_CLASSES = ("COVID", "Normal", "Viral Pneumonia")  # the real sample has no Lung_Opacity
FAST = ee.ScoreOptions(curve_steps=4, sanity_methods=("gradients",), num_resamples=200)
METHODS = ("gradients", "grad_cam")


def _config(data_dir: pathlib.Path, manual: pathlib.Path, name: str, builder_config: str,
            num_outputs: int, batch_size: int = 8, **options) -> ml_collections.ConfigDict:
  """A tiny custom-CNN training config on `manual`, with builder options `options`."""
  config = common.base_config()
  config.dataset.update(dict(name=name, builder_config=builder_config, data_dir=str(data_dir),
                             manual_dir=str(manual)))
  for option, value in dict(image_size=SIZE, **options).items():
    config.dataset.builder[option] = value
  config.model = ml_collections.ConfigDict(dict(
    name="custom_cnn", num_outputs=num_outputs, input_shape=(SIZE, SIZE, 1),
    conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16), dropout_rate=0.0, init_std=None))
  config.batch_size = batch_size
  config.num_epochs = 2
  config.log_every_steps = 100
  return config


def _write_lung_masks(root: pathlib.Path) -> dict[str, bool]:
  """Writes masks/<image name> for every image (PNG content); every third one all zeros.

  Returns image path relative to root's parent -> whether its mask is non-empty.
  """
  has_mask = {}
  for index, path in enumerate(sorted(root.glob("*/images/*"))):
    mask = np.zeros((64, 64), np.uint8)
    if index % 3:
      mask[12 + index % 5:52, 8:28 + index % 7] = 255  # a 'right lung' rectangle
      mask[12:50, 36:56] = 255                          # and a 'left lung'
    target = path.parent.parent / "masks" / path.name
    target.parent.mkdir(exist_ok=True)
    Image.fromarray(mask).save(target, format="PNG")
    has_mask[path.relative_to(root.parent).as_posix()] = bool(index % 3)
  return has_mask


@pytest.fixture(scope="module")
def covid(tmp_path_factory):
  """A covid run trained without masks, and the same images prepared with and without masks."""
  base = tmp_path_factory.mktemp("covid")
  plain_manual = real_data.copy_real("covid", base / "plain")
  masked_manual = real_data.copy_real("covid", base / "masked")
  has_mask = _write_lung_masks(masked_manual / "COVID-19_Radiography_Dataset")
  options = dict(classes=COVID_CLASSES, read_metadata=False)
  config = _config(base / "data", plain_manual, "covid_radiography", "four", len(COVID_CLASSES),
                   with_masks=False, **options)
  loop.train_and_evaluate(config, str(base / "run"))
  masked_config = _config(base / "data", masked_manual, "covid_radiography", "four",
                          len(COVID_CLASSES), with_masks=True, **options)
  return {"config": config, "masked_config": masked_config, "run": str(base / "run"),
          "has_mask": has_mask, "base": base}


def test_covid_without_masks_scores_faithfulness_and_sanity_and_lists_the_rest(covid):
  workdir = covid["base"] / "plain_scores"
  summary = ee.evaluate_run(covid["config"], covid["run"], str(workdir), methods=METHODS,
                            num_images=4, label=-1, score_options=FAST, gallery_rows=2)
  assert summary["num_images"] == 4
  assert {"deletion_auc", "insertion_auc", "cascade_spearman_abs"} <= set(summary["metrics"])
  localisation = ee.localisation_metrics(FAST.top_percents)
  assert not set(localisation) & set(summary["metrics"])
  for method in (*METHODS, ee.RANDOM):
    scores = summary["leaderboard"][method]
    assert scores["deletion_auc"]["count"] == 4 and 0.0 <= scores["deletion_auc"]["mean"] <= 1.0
    assert not set(localisation) & set(scores)
  not_scored = summary["not_scored"]
  for metric in localisation:
    assert "lung_mask" in not_scored[metric] and "empty" in not_scored[metric]
  assert not_scored["marker_share"] == "covid_radiography declares no marker mask"
  assert "shuffled" in not_scored["data_spearman"]
  assert "cascade_spearman" not in not_scored
  written = json.loads((workdir / "evaluation.json").read_text())
  assert written["not_scored"] == not_scored and written["marker_share"] == {}
  table = (workdir / "leaderboard.md").read_text()
  assert "Not scored:" in table and "covid_radiography declares no marker mask" in table
  assert "pointing_game" not in table.split("Not scored:")[0]
  section = evaluation_report.leaderboard_section(summary, str(covid["base"]))
  text = " ".join(section.paragraphs)
  assert "Not scored: " in text and "marker_share: covid_radiography declares no marker" in text
  assert "Localisation against" not in text
  for name in ("gallery.png", "curves.png", "sanity.png", "scores.npz"):
    assert (workdir / name).stat().st_size > 0, name


def test_covid_with_lung_masks_scores_localisation_only_where_a_mask_exists(covid):
  config = covid["masked_config"]
  workdir = covid["base"] / "masked_scores"
  summary = ee.evaluate_run(config, covid["run"], str(workdir), methods=METHODS, num_images=13,
                            label=-1, score_options=FAST, gallery_rows=2)
  examples = explain.load_split(config, "test", ("image", "label", "lung_mask", "path"))
  chosen = np.asarray(summary["indices"])
  present = examples["lung_mask"][chosen].any(axis=(1, 2, 3))
  paths = [p.decode() if isinstance(p, bytes) else str(p) for p in examples["path"][chosen]]
  np.testing.assert_array_equal(present, [covid["has_mask"][p] for p in paths])
  assert 0 < present.sum() < len(chosen)  # both kinds among the test images
  coverage = summary["masks"]["localisation_coverage"]
  assert coverage["num_with_mask"] == present.sum()
  assert coverage["indices_without_mask"] == chosen[~present].tolist()
  assert {"pointing_game", "hit_rate", "miou", "energy"} <= set(summary["metrics"])
  assert "pointing_game" not in summary["not_scored"]
  scores = np.load(workdir / "scores.npz")
  for method in (*METHODS, ee.RANDOM):
    for metric in ("pointing_game", "hit_rate", "energy", "rank_accuracy"):
      values = scores[f"{method}/{metric}"]
      assert np.isnan(values[~present]).all(), (method, metric)  # never 0 without a mask
      assert np.isfinite(values[present]).all(), (method, metric)
      assert summary["leaderboard"][method][metric]["count"] == present.sum()
  # The gradient maps rebuilt here, scored by skimage's Otsu and numpy's argmax.
  selected = runs.restore_selected_model(config, covid["run"])
  model, variables, preprocess = selected.model, selected.variables, selected.preprocess
  images = jax.jit(preprocess)(jnp.asarray(examples["image"][chosen]))
  targets = jnp.asarray(examples["label"][chosen], jnp.int32)
  maps = np.asarray(faithfulness.as_maps(jax.jit(
    lambda v, x, t: explain.method_maps(model, v, x, t, "gradients", jax.random.key(0)))(
    variables, images, targets)))
  masks = examples["lung_mask"][chosen][..., 0] > 0
  for index in np.flatnonzero(present):
    saliency, mask = maps[index], masks[index]
    normalised = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    levels = np.uint8(np.float32(255) * normalised)
    segmentation = levels > skimage.filters.threshold_otsu(levels)
    expected_iou = (segmentation & mask).sum() / (segmentation | mask).sum()
    assert scores["gradients/miou"][index] == pytest.approx(expected_iou, abs=0.02)
    peak = np.unravel_index(np.argmax(saliency), saliency.shape)
    assert scores["gradients/hit_rate"][index] == float(mask[peak])
  section = evaluation_report.leaderboard_section(summary, str(covid["base"]))
  assert "Only" in " ".join(section.paragraphs)


def test_tb_shenzhen_real_lung_masks_scored_where_present_never_zero_elsewhere(tmp_path):
  manual = real_data.copy_real("tb", tmp_path / "manual")
  masks = sorted((manual / "ChinaSet_AllFiles" / "extra_lung_masks").glob("*_mask.png"))
  removed = {path.name.replace("_mask.png", ".png") for path in masks[::2]}
  for path in masks[::2]:
    path.unlink()  # these images keep has_lung_mask False
  config = _config(tmp_path / "data", manual, "tb_cxr", "shenzhen", 1, batch_size=4,
                   clahe=False, split_fractions=(0.4, 0.2, 0.4))
  loop.train_and_evaluate(config, str(tmp_path / "run"))
  summary = ee.evaluate_run(config, str(tmp_path / "run"), str(tmp_path / "scores"),
                            methods=("gradients",), num_images=4, label=0,
                            score_options=FAST, gallery_rows=1)
  assert summary["num_images"] == 4 and set(summary["targets"]) == {0}  # Shenzhen: normals
  examples = explain.load_split(config, "test", ("label", "path", "has_lung_mask"))
  chosen = np.asarray(summary["indices"])
  names = [pathlib.Path(p.decode() if isinstance(p, bytes) else str(p)).name
           for p in examples["path"][chosen]]
  present = np.asarray([name not in removed for name in names])
  np.testing.assert_array_equal(examples["has_lung_mask"][chosen], present)
  assert summary["leaderboard"]["gradients"]["insertion_auc"]["count"] == 4
  scores = np.load(tmp_path / "scores" / "scores.npz")
  for metric in ("pointing_game", "miou", "hit_rate", "energy"):
    values = scores[f"gradients/{metric}"]
    assert np.isnan(values[~present]).all(), metric  # never 0 without a mask
    assert np.isfinite(values[present]).all() or metric == "miou", metric
    assert summary["leaderboard"]["gradients"][metric]["count"] <= present.sum()
  if present.any():
    assert {"pointing_game", "hit_rate", "energy"} <= set(summary["metrics"])
  else:
    assert "lung_mask" in summary["not_scored"]["miou"]
  # The whole split streamed in shards of 3 (a padded tail) scores those images the same.
  streamed = ee.evaluate_run(config, str(tmp_path / "run"), str(tmp_path / "streamed"),
                             methods=("gradients",), num_images=None, batch_size=3,
                             score_options=FAST, gallery_rows=1)
  assert streamed["num_images"] == len(examples["label"])
  whole = np.load(tmp_path / "streamed" / "scores.npz")
  for metric in ("pointing_game", "miou", "hit_rate", "energy", "insertion_auc"):
    np.testing.assert_allclose(whole[f"gradients/{metric}"][chosen], scores[f"gradients/{metric}"],
                               rtol=1e-5, atol=1e-6, err_msg=metric)


def test_scoring_masks_use_has_flags_and_name_what_is_missing():
  shape = (3, 8, 8)
  masks = np.zeros((3, 8, 8, 1), np.uint8)
  masks[:, 2:5, 2:5] = 1
  examples = {"lung_mask": masks, "has_lung_mask": np.array([True, False, True])}
  found, problems = ee.scoring_masks("tb_cxr", examples, np.arange(3), shape)
  assert problems == {"marker": "tb_cxr declares no marker mask"}
  np.testing.assert_array_equal(np.asarray(found.localisation).any(axis=(1, 2)),
                                [True, False, True])  # has_lung_mask False: emptied
  assert found.localisation_key == "lung_mask" and found.marker is None
  _, problems = ee.scoring_masks("tb_cxr", {"image": masks}, np.arange(3), shape)
  assert "no 'lung_mask' feature" in problems["localisation"]
  _, problems = ee.scoring_masks("mura", {"image": masks}, np.arange(3), shape)
  assert problems["localisation"] == "mura declares no localisation mask"
  with pytest.raises(ValueError, match="lung_mask"):
    ee.scoring_masks("tb_cxr", {"lung_mask": np.zeros((3, 8, 8, 2))}, np.arange(3), shape)
  masks = np.zeros((4, 8, 8), bool)
  masks[[1, 3], 2, 2] = True
  np.testing.assert_array_equal(ee.gallery_rows_shown(masks, 4, 3), [1, 3, 0])
  np.testing.assert_array_equal(ee.gallery_rows_shown(None, 4, 6), [0, 1, 2, 3])
  reasons = ee.not_scored_metrics({"localisation": "why"}, (1.0,), ("gradients",), True)
  assert set(reasons) == set(ee.localisation_metrics((1.0,))) and set(reasons.values()) == {"why"}
