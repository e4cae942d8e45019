"""Builder options from the command line, prepared datasets that follow manual_dir, and the errors
a new user meets on a real collection (the COVID-19 Radiography copy in ../shared)."""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Sequence

import numpy as np
import pytest
from absl import flags
from etils import epy
from ml_collections import config_flags

import real_data
import subprocess_env
from configs import covid_radiography_vgg16
from configs import demo
from medxai_jax.data import pipeline

REPO = pathlib.Path(subprocess_env.REPO)
COVID = "COVID-19_Radiography_Dataset"
# A few real files of each kind: small gray/RGB JPEGs and one 2000 x 2500 RGB PNG.
KEEP = ["COVID/images/COVID-1?.jpg", "Normal/images/*.jpg", "Normal/images/Normal-13.png",
        "Viral Pneumonia/images/*"]
ALL_SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def covid_source(tmp_path_factory) -> pathlib.Path:
  """One copy of part of the real COVID folder, as shipped (no masks, no .xlsx sheets)."""
  root = tmp_path_factory.mktemp("covid_source")
  real_data.copy_real(f"covid/{COVID}", root / COVID, keep=KEEP)
  return root


@pytest.fixture
def manual(covid_source, tmp_path) -> pathlib.Path:
  """This test's own, writable manual_dir holding COVID-19_Radiography_Dataset/."""
  return pathlib.Path(shutil.copytree(covid_source, tmp_path / "manual"))


def image_files(manual: pathlib.Path, folder: str) -> list[pathlib.Path]:
  """The image files of one class folder, listed independently of the builder."""
  return sorted(path for path in (manual / COVID / folder / "images").iterdir()
                if path.suffix.lower() in (".jpg", ".png"))


def covid_config(tmp_path, manual, **options):
  """covid_radiography_vgg16's config with what a user sets on the command line."""
  config = covid_radiography_vgg16.get_config()
  config.dataset.manual_dir = str(manual)
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.builder.update(dict(image_size=32, read_metadata=False, with_masks=False,
                                     classes=("COVID", "Normal")))
  config.dataset.builder.update(options)
  return config


def total_records(sources) -> int:
  return sum(len(source) for source in sources.values())


def parse_command_line(*args: str):
  """The config exactly as experiments/train.py's --config flag parses these arguments."""
  argv = ["train", f"--config={REPO / 'configs' / 'covid_radiography_vgg16.py'}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config.", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_options_reach_the_builder(tmp_path, manual):
  config = parse_command_line(
    f"--config.dataset.manual_dir={manual}", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
    "--config.dataset.builder.image_size=32", "--config.dataset.builder.read_metadata=False",
    "--config.dataset.builder.with_masks=False", "--config.dataset.builder.resize_mode=pad",
    "--config.dataset.builder.classes=COVID,Normal",
    "--config.dataset.builder.split_fractions=0.5,0.25,0.25")
  assert config.dataset.builder.classes == ("COVID,Normal",)  # config_flags' tuple, split later
  builder = pipeline.load_builder(config.dataset)
  stored = builder.builder_config
  assert (stored.image_size, stored.resize_mode, stored.read_metadata, stored.with_masks) == (
    32, "pad", False, False)
  assert stored.classes == ("COVID", "Normal") and stored.split_fractions == (0.5, 0.25, 0.25)
  assert stored.name.startswith("three-")  # the named base config with the changes applied
  assert tuple(builder.info.features["label"].names) == ("covid", "normal")
  sources = pipeline.load_sources(config.dataset, ALL_SPLITS)
  counts = {name.lower(): len(image_files(manual, name)) for name in ("COVID", "Normal")}
  assert total_records(sources) == sum(counts.values())
  for split, source in sources.items():
    labels = pipeline.read_feature(source, "label")
    for label, name in enumerate(("covid", "normal")):  # stratified: each class cut 50/25/25
      share = {"train": 0.5, "validation": 0.25, "test": 0.25}[split]
      assert abs((labels == label).sum() - share * counts[name]) <= 1, (split, name)
    assert all(record["image"].shape == (32, 32, 1) for record in source.__getitems__(
      list(range(len(source)))))


def test_command_line_unknown_option_lists_the_options():
  with pytest.raises(KeyError) as error:
    parse_command_line("--config.dataset.builder.imagesize=32")
  message = str(error.value)
  assert '"image_size"' in message  # the close match
  for option in ("read_metadata", "with_masks", "classes", "body_parts", "on_corrupt"):
    assert option in message


def test_option_the_chosen_builder_lacks_lists_its_options(tmp_path, manual):
  config = covid_config(tmp_path, manual, body_parts=("wrist",))
  with pytest.raises(ValueError, match="has no option") as error:
    pipeline.load_sources(config.dataset, ["train"])
  message = str(error.value)
  assert "['body_parts']" in message
  assert "read_metadata (bool)" in message and "classes (tuple of str)" in message
  assert "validation_fraction" not in message  # mura's, not covid's
  with pytest.raises(ValueError, match="has no option.*'imagesize'"):
    pipeline.load_builder(dict(config.dataset.to_dict(), builder={"imagesize": 32}))


def test_bad_option_values_are_named(tmp_path, manual):
  with pytest.raises(ValueError, match="split_fractions must be 3 shares"):
    pipeline.load_builder(covid_config(tmp_path, manual, split_fractions=(0.5, 0.5)).dataset)
  with pytest.raises(ValueError, match=r"builder.image_size='32': expected an integer"):
    pipeline.load_builder(dict(covid_config(tmp_path, manual).dataset.to_dict(),
                               builder={"image_size": "32"}))
  with pytest.raises(ValueError, match="resize_mode"):
    pipeline.load_builder(covid_config(tmp_path, manual, resize_mode="crop").dataset)
  with pytest.raises(ValueError, match="classes must be distinct names"):
    pipeline.load_builder(covid_config(tmp_path, manual, classes=("COVID", "Pneumothorax")).dataset)


def test_metadata_and_mask_errors_give_the_command_line_spelling(tmp_path, manual):
  config = covid_config(tmp_path, manual, read_metadata=True)
  with pytest.raises(FileNotFoundError, match="--config.dataset.builder.read_metadata=False"):
    pipeline.load_builder(config.dataset)
  config = covid_config(tmp_path, manual, with_masks=True)
  with pytest.raises(FileNotFoundError, match="--config.dataset.builder.with_masks=False"):
    pipeline.load_builder(config.dataset)
  config = covid_config(tmp_path, manual, classes=("COVID", "Lung_Opacity", "Normal"))
  with pytest.raises(FileNotFoundError, match="Lung_Opacity.*--config.dataset.builder.classes="):
    pipeline.load_builder(config.dataset)


def test_the_shipped_defaults_on_a_folder_without_masks_and_sheets_name_every_option(tmp_path,
                                                                                      manual):
  config = covid_radiography_vgg16.get_config()  # 'three': COVID, Lung_Opacity, Normal
  config.dataset.update(dict(manual_dir=str(manual), data_dir=str(tmp_path / "tfds")))
  config.dataset.builder.image_size = 32
  with pytest.raises(FileNotFoundError) as error:
    pipeline.load_builder(config.dataset)
  message = str(error.value)
  present = sorted(path.name.replace(" ", "_") for path in (manual / COVID).iterdir())
  assert "['Lung_Opacity']" in message
  assert f"--config.dataset.builder.classes={','.join(present)}" in message
  assert "['COVID.metadata.xlsx', 'Normal.metadata.xlsx']" in message
  assert "--config.dataset.builder.read_metadata=False" in message
  assert "--config.dataset.builder.with_masks=False" in message


def test_a_changed_folder_is_prepared_again_and_the_old_one_kept(tmp_path, manual, caplog):
  config = covid_config(tmp_path, manual)
  first = pipeline.load_builder(config.dataset)
  before = total_records(pipeline.load_sources(config.dataset, ALL_SPLITS))
  assert before == len(image_files(manual, "COVID")) + len(image_files(manual, "Normal"))
  again = pipeline.load_builder(config.dataset)
  assert os.fspath(again.data_dir) == os.fspath(first.data_dir)  # unchanged folder: reused
  added = manual / COVID / "Normal" / "images" / "Normal-100.jpg"
  shutil.copyfile(image_files(manual, "Normal")[0], added)
  with caplog.at_level(logging.WARNING):
    second = pipeline.load_builder(config.dataset)
  assert os.fspath(second.data_dir) != os.fspath(first.data_dir)
  assert os.path.isdir(first.data_dir)  # the older preparation is not deleted, and is named
  kept = [record.getMessage() for record in caplog.records if "are kept" in record.getMessage()]
  assert len(kept) == 1 and os.path.dirname(first.data_dir) in kept[0], kept
  assert total_records(pipeline.load_sources(config.dataset, ALL_SPLITS)) == before + 1
  added.unlink()  # back to the first file list: the first preparation is used again
  assert os.fspath(pipeline.load_builder(config.dataset).data_dir) == os.fspath(first.data_dir)


def test_empty_or_missing_manual_dir_is_an_error_with_instructions(tmp_path, manual):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / ".DS_Store").write_bytes(b"hidden files do not count")
  for folder, state in ((empty, "holds no file"), (tmp_path / "absent", "does not exist")):
    config = covid_config(tmp_path, folder)
    with pytest.raises(FileNotFoundError) as error:
      pipeline.load_sources(config.dataset, ["train"])
    message = str(error.value)
    assert str(folder) in message and state in message
    assert "Download instructions" in message and "tawsifurrahman" in message
  config = covid_config(tmp_path, "")  # not set: tfds' default folder, which does not exist
  with pytest.raises(FileNotFoundError, match="set it with --config.dataset.manual_dir=DIR") as (
      error):
    pipeline.load_builder(config.dataset)
  assert str(tmp_path / "tfds" / "downloads" / "manual") in str(error.value)


def test_phantoms_reject_manual_dir_and_builder_options(tmp_path, manual):
  config = demo.get_config()
  config.dataset.manual_dir = str(manual)
  with pytest.raises(ValueError, match="--config.dataset.name") as error:
    pipeline.load_sources(config.dataset, ["train"])
  assert "covid_radiography" in str(error.value)  # the builders it could have meant
  config = demo.get_config()
  config.dataset.builder.with_masks = False  # a manual builder's option
  with pytest.raises(ValueError, match=r"'radiograph_phantoms' has no option\(s\) \['with_masks'\]"
                     ) as error:
    pipeline.load_builder(config.dataset)
  assert "num_train (int)" in str(error.value)  # it lists the phantoms' options


def test_unknown_dataset_name_lists_the_registered_names(tmp_path):
  config = demo.get_config()
  config.dataset.name = "covid_radiograph"
  with pytest.raises(ValueError, match="registered datasets") as error:
    pipeline.load_builder(config.dataset)
  for name in ("radiograph_phantoms", "covid_radiography", "mura", "tb_cxr", "brain_tumor_mri",
               "medical_modalities"):
    assert repr(name) in str(error.value)


def test_too_few_images_for_a_split_is_an_error_naming_counts_and_option(tmp_path, manual):
  # With shares of 0.001, every class (< 200 images) rounds to no validation or test image.
  config = covid_config(tmp_path, manual, split_fractions=(0.998, 0.001, 0.001))
  with pytest.raises(ValueError, match="split 'validation' came out empty") as error:
    pipeline.load_sources(config.dataset, ALL_SPLITS)
  message = str(error.value)
  counts = {name: len(image_files(manual, name)) for name in ("COVID", "Normal")}
  assert f"images per class: {counts}" in message
  assert "(0.998, 0.001, 0.001)" in message
  assert "--config.dataset.builder.split_fractions=" in message


def test_a_split_left_empty_on_purpose_names_the_split_when_requested(tmp_path, manual):
  config = covid_config(tmp_path, manual, split_fractions=(0.5, 0.0, 0.5))
  sources = pipeline.load_sources(config.dataset, ["train", "test"])  # validation share 0: fine
  with pytest.raises(ValueError, match=r"has no split\(s\) \['validation'\]") as error:
    pipeline.load_sources(config.dataset, ALL_SPLITS)
  message = str(error.value)
  for split, source in sources.items():
    labels = pipeline.read_feature(source, "label")
    assert f"'{split}': {{'covid': {(labels == 0).sum()}, 'normal': {(labels == 1).sum()}}}" in (
      message)
  assert "'split_fractions': (0.5, 0.0, 0.5)" in message
  assert "--config.dataset.builder.split_fractions=" in message


def test_builder_options_config_holds_every_option_of_every_builder():
  from medxai_jax.data.builders import common

  options = covid_radiography_vgg16.get_config().dataset.builder
  expected = set()
  for builder_cls in pipeline.configurable_builder_classes().values():  # the phantoms included
    config = builder_cls.BUILDER_CONFIGS[0]
    expected |= set(common.config_fields(config))
  assert set(options) == expected and all(options[name] is None for name in options)
  assert {"image_size", "read_metadata", "with_masks", "on_corrupt", "storage_bits",
          "split_fractions", "classes", "body_parts", "sources"} <= expected
  assert options.get_type("split_fractions") is tuple and options.get_type("clahe") is bool


def test_normalise_option_reads_command_line_tuples():
  spec = pipeline.all_builder_option_specs()
  assert pipeline.normalise_option("classes", ("COVID,Normal",), spec["classes"], "x") == (
    "COVID", "Normal")
  assert pipeline.normalise_option("classes", ("COVID", "Normal"), spec["classes"], "x") == (
    "COVID", "Normal")
  assert pipeline.normalise_option("split_fractions", (0.7, 0.1, 0.2), spec["split_fractions"],
                                   "x") == (0.7, 0.1, 0.2)
  assert pipeline.normalise_option("split_fractions", "0.5,0.25,0.25", spec["split_fractions"],
                                   "x") == (0.5, 0.25, 0.25)
  assert pipeline.normalise_option("body_parts", (), spec["body_parts"], "x") == ()  # = all
  assert pipeline.normalise_option("validation_fraction", 0, spec["validation_fraction"],
                                   "x") == 0.0
  with pytest.raises(ValueError, match="expected non-empty names"):
    pipeline.normalise_option("classes", ("COVID,",), spec["classes"], "x")
  with pytest.raises(ValueError, match="expected float values"):
    pipeline.normalise_option("split_fractions", ("a,b,c",), spec["split_fractions"], "x")
  with pytest.raises(ValueError, match="expected True or False"):
    pipeline.normalise_option("with_masks", "no", spec["with_masks"], "x")
  with pytest.raises(ValueError, match="expected an integer"):
    pipeline.normalise_option("image_size", True, spec["image_size"], "x")


def test_folder_fingerprint_follows_names_sizes_and_mtimes(tmp_path):
  folder = tmp_path / "folder"
  (folder / "a").mkdir(parents=True)
  (folder / "a" / "one.png").write_bytes(b"1234")
  (folder / "two.jpg").write_bytes(b"56")
  base = pipeline.folder_fingerprint(str(folder))
  assert (base.num_files, base.num_bytes) == (2, 6)
  assert pipeline.folder_fingerprint(str(folder)) == base
  (folder / ".hidden").write_bytes(b"ignored")
  (folder / ".cache").mkdir()
  (folder / ".cache" / "x.png").write_bytes(b"ignored")
  assert pipeline.folder_fingerprint(str(folder)) == base
  (folder / "tfds").mkdir()
  (folder / "tfds" / "record").write_bytes(b"prepared data")
  assert pipeline.folder_fingerprint(str(folder), exclude=[str(folder / "tfds")]) == base
  assert pipeline.folder_fingerprint(str(folder)) != base
  shutil.rmtree(folder / "tfds")
  stat = os.stat(folder / "two.jpg")
  os.utime(folder / "two.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  touched = pipeline.folder_fingerprint(str(folder))
  assert touched != base and touched.num_files == 2
  os.rename(folder / "two.jpg", folder / "three.jpg")
  assert pipeline.folder_fingerprint(str(folder)) not in (base, touched)
  (folder / "three.jpg").write_bytes(b"567")
  assert pipeline.folder_fingerprint(str(folder)).num_bytes == 7
  copied = shutil.copytree(folder, tmp_path / "copy")  # copy2 keeps mtimes: same file list
  assert pipeline.folder_fingerprint(str(copied)) == pipeline.folder_fingerprint(str(folder))
  assert len(pipeline.folder_fingerprint(str(folder)).digest) == 40  # a full SHA-1


# ----------------------------------------------------------------------------------------------
# The grain input pipeline (data/pipeline.py): batches, worker processes, resumable state.

# A worker process imports this module to unpickle ListSource: the training modules are imported
# inside the one test that needs them, so the worker's start stays light.


class ListSource:
  """An in-memory random-access source whose image pixels hold the row number."""

  def __init__(self, count: int):
    self.count = count

  def __len__(self) -> int:
    return self.count

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [{"image": np.full((3, 2, 1), i, np.uint16), "grade": np.int64(i % 4),
             "study": np.int64(100 + i)} for i in indices]


def _naive_batches(count: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
                   drop_remainder: bool) -> list[dict[str, np.ndarray]]:
  """The batches by hand: rows in numpy's permutation of seed [seed, epoch], the short tail
  padded with its last row (weight 0)."""
  rows = (np.random.default_rng([seed, epoch]).permutation(count) if shuffle
          else np.arange(count))
  batches = []
  for start in range(0, count, batch_size):
    chunk = list(rows[start:start + batch_size])
    if len(chunk) < batch_size and drop_remainder:
      break
    weight = [1.0] * len(chunk) + [0.0] * (batch_size - len(chunk))
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    batches.append({
        "image": np.stack([np.full((3, 2, 1), i, np.uint16) for i in chunk]),
        "study": np.asarray([100 + i for i in chunk], np.int64),
        "label": np.asarray([i % 4 for i in chunk], np.int32),
        "weight": np.asarray(weight, np.float32)})
  return batches


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
  assert len(got) == len(expected) > 0
  for index, (a, b) in enumerate(zip(got, expected)):
    assert sorted(a) == sorted(b), index
    for key in b:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (index, key)
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {index}, {key!r}")


@pytest.mark.parametrize("shuffle, drop_remainder", [(True, False), (True, True), (False, False)])
def test_batches_equal_a_naive_loop(shuffle, drop_remainder):
  got = list(pipeline.iterate_batches(
      ListSource(11), batch_size=4, keys=("image", "study"), label_key="grade", seed=5,
      epoch=2, shuffle=shuffle, drop_remainder=drop_remainder))
  _assert_same_batches(got, _naive_batches(11, 4, 5, 2, shuffle, drop_remainder))
  # Random access: batch i of the dataset is the i-th batch iterated.
  dataset = pipeline.batch_dataset(ListSource(11), batch_size=4, keys=("image", "study"),
                                   label_key="grade", seed=5, epoch=2, shuffle=shuffle,
                                   drop_remainder=drop_remainder)
  _assert_same_batches([dataset[i] for i in range(len(dataset))], got)


def test_a_stream_resumes_from_its_json_state_at_the_same_batch():
  dataset = pipeline.batch_dataset(ListSource(23), batch_size=3, keys=("image",),
                                   label_key="grade", seed=1, shuffle=True)
  everything = list(pipeline.BatchStream(dataset))
  stream = pipeline.BatchStream(dataset)
  first = [next(stream) for _ in range(3)]
  state = json.loads(json.dumps(stream.state()))  # as a checkpoint's JSON metadata holds it
  assert state["next"] == 3 and state["workers"] == 0
  stream.close()
  resumed = pipeline.BatchStream.resume(dataset, state, 3)
  _assert_same_batches(first + list(resumed), everything)
  # Saved again after more batches of the resumed stream, it still continues where it was.
  again = pipeline.BatchStream.resume(dataset, state, 3)
  [next(again) for _ in range(2)]
  later = json.loads(json.dumps(again.state()))
  _assert_same_batches(list(pipeline.BatchStream.resume(dataset, later, 5)), everything[5:])
  # State of another worker count (grain's differs): continues from the batch index instead.
  other = dict(state, workers=3, iterator={"unreadable": True})
  _assert_same_batches(list(pipeline.BatchStream.resume(dataset, other, 3, workers=0)),
                       everything[3:])
  with pytest.raises(ValueError, match=r"ckpt/partial: the input iterator state is at batch 3 "
                     r"but the training position at batch 4"):
    pipeline.BatchStream.resume(dataset, state, 4, where="ckpt/partial")


def test_one_worker_process_gives_the_in_process_batches_and_state(monkeypatch):
  dataset = pipeline.batch_dataset(ListSource(10), batch_size=4, keys=("image", "study"),
                                   label_key="grade", seed=2, shuffle=True)
  in_process = list(pipeline.BatchStream(dataset, workers=0))
  stream = pipeline.BatchStream(dataset, workers=1)
  first = next(stream)
  state = json.loads(json.dumps(stream.state()))
  rest = list(stream)
  _assert_same_batches([first, *rest], in_process)
  assert all(type(value) is np.ndarray for value in first.values())  # not shared memory
  resumed = pipeline.BatchStream.resume(dataset, state, 1, workers=1)
  _assert_same_batches(list(resumed), in_process[1:])
  # Ended streams leave nothing whose finaliser fails in a garbage collection that runs inside
  # tfds' lazy-import context (multiprocessing's finalisers import a module when they run).
  del stream, resumed
  failures = []
  monkeypatch.setattr(sys, "unraisablehook", failures.append)
  with epy.lazy_imports():
    gc.collect()
  assert not failures, [str(failure.exc_value) for failure in failures]


def test_bad_input_settings_name_the_field():
  from configs import demo
  from medxai_jax.train import schema

  config = demo.get_config()
  assert schema.input_settings(config) == {"workers": 0, "prefetch": 2}
  config.input.workers = -1
  with pytest.raises(ValueError, match=r"config.input.workers must be an integer >= 0, got -1"):
    schema.input_settings(config)


# ----------------------------------------------------------------------------------------------
# Record filters and label-shuffled views of random-access sources (data/pipeline.py).

class RecordListSource:
  """An in-memory random-access source."""

  def __init__(self, records: list[dict[str, Any]]):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self.records[i] for i in indices]


class FakeClassLabel:
  def __init__(self, names):
    self.names = names


def _records(count: int = 50) -> list[dict[str, Any]]:
  rng = np.random.default_rng(0)
  return [{"image": np.full((2, 2, 1), i, np.uint8), "label": int(rng.integers(0, 3)),
           "body_part": i % 5, "study": f"s{i % 7}".encode()} for i in range(count)]


def test_parse_filter_and_errors():
  assert pipeline.parse_filter("body_part=hand, elbow; label=1") == {
      "body_part": ("hand", "elbow"), "label": ("1",)}
  assert pipeline.parse_filter("") == {}
  with pytest.raises(ValueError, match="'body_part'"):
    pipeline.parse_filter("body_part")
  with pytest.raises(ValueError, match="not a class of feature 'body_part'"):
    pipeline.resolve_filter_values({"body_part": ("knee",)},
                                   {"body_part": FakeClassLabel(["forearm", "hand"])})


def test_filter_source_keeps_exactly_the_matching_records():
  records = _records()
  source = RecordListSource(records)
  features = {"body_part": FakeClassLabel(["forearm", "lower_leg", "finger", "hand", "elbow"])}
  conditions = pipeline.resolve_filter_values(
      pipeline.parse_filter("body_part=hand,0;study=s3"), features)
  assert conditions["body_part"] == {3, 0}
  view = pipeline.filter_source(source, conditions)
  expected = [i for i, r in enumerate(records)
              if r["body_part"] in (0, 3) and r["study"] == b"s3"]
  assert len(view) == len(expected) > 0
  got = [int(r["image"][0, 0, 0]) for r in view.__getitems__(list(range(len(view))))]
  assert got == expected
  with pytest.raises(ValueError, match="keeps no record"):
    pipeline.filter_source(source, {"body_part": frozenset({9})})


def test_label_shuffled_source_permutes_labels_only():
  records = _records(200)
  source = RecordListSource(records)
  view = pipeline.LabelShuffledSource(source, seed=3)
  shuffled = view.__getitems__(list(range(len(view))))
  original = np.asarray([r["label"] for r in records])
  labels = np.asarray([r["label"] for r in shuffled])
  np.testing.assert_array_equal(np.sort(labels), np.sort(original))  # same label counts
  assert (labels != original).mean() > 0.4  # ~2/3 differ for three balanced classes
  for before, after in zip(records, shuffled):
    np.testing.assert_array_equal(before["image"], after["image"])
  again = pipeline.LabelShuffledSource(source, seed=3)
  np.testing.assert_array_equal(again.labels, view.labels)
  assert not np.array_equal(pipeline.LabelShuffledSource(source, seed=4).labels, view.labels)
  # Batches through iterate_batches carry the shuffled labels.
  batch = next(pipeline.iterate_batches(view, batch_size=200))
  np.testing.assert_array_equal(batch["label"], labels)
