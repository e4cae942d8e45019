"""Builder options from the command line, prepared datasets that follow manual_dir, and the errors
a new user meets on a real collection (the COVID-19 Radiography copy in ../shared)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import pytest
from absl import flags
from ml_collections import config_flags

import real_data
from configs import covid_radiography_vgg16
from configs import demo
from medxai_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
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
