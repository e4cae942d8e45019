"""The training config's checks (train/schema.py)."""

import copy
import json

import pytest

from resumption import tiny_config

from configs import demo
from experiments import cli
from medxai_jax import runs
from medxai_jax.data import pipeline
from medxai_jax.data.builders import phantoms as phantoms_builder
from medxai_jax.train import defaults
from medxai_jax.train import schema
from medxai_jax.train import workdir as workdir_lib


def test_bad_every_steps_is_refused(data_dir):
  config = tiny_config(data_dir)
  config.checkpoint.every_steps = -1
  with pytest.raises(ValueError, match=r"config.checkpoint.every_steps must be an integer >= 0"):
    schema.check_config(config)


# --- test_schema.py
# train/schema: reading configs written before a field moved (config.dataset.phantoms ->
# config.dataset.builder), and what resume and the command line make of the two spellings.


# The dataset section of a config.json written before the phantoms' settings were builder
# options (configs/demo.py as that code wrote it, the phantoms shrunk as the tests shrink them):
# every field of old base_config's `phantoms` is explicit, the builder holds only the manual
# builders' options, all unset.
OLD_BUILDER = {name: None for name in (
    "allow_bit_depth_reduction", "body_parts", "border_tolerance", "channels", "clahe",
    "class_names", "classes", "dicom_patient_ids", "image_size", "montgomery_bit_depth",
    "on_corrupt", "read_metadata", "remove_border", "resize_mode", "sources", "split_fractions",
    "split_seed", "storage_bits", "test_fold", "validation_fraction", "with_masks")}
OLD_PHANTOMS = {"image_size": 48, "num_train": 32, "num_validation": 16, "num_test": 16,
                "seed": 0, "train_marker_agreement": 0.8, "validation_marker_agreement": 0.8,
                "test_marker_agreement": 0.5, "frame_probability": 0.0}
OLD_DATASET = {"name": "radiograph_phantoms", "data_dir": "", "manual_dir": "",
               "builder_config": "", "builder": OLD_BUILDER, "label_key": "label",
               "train_split": "train", "validation_split": "validation", "test_split": "test",
               "filter": "", "shuffle_labels": False, "shuffle_labels_seed": 0,
               "phantoms": OLD_PHANTOMS}
# The same settings in today's spelling: only what differs from the phantom builder's defaults.
NEW_OPTIONS = {"image_size": 48, "num_train": 32, "num_validation": 16, "num_test": 16,
               "train_marker_agreement": 0.8, "validation_marker_agreement": 0.8}


def _old_run(tmp_path, dataset=OLD_DATASET):
  """A run directory whose config.json and prepared_dataset.json are in the old form."""
  config = json.loads(demo.get_config().to_json_best_effort())
  config["dataset"] = copy.deepcopy(dataset)
  run_dir = tmp_path / "old_run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text(json.dumps(config, indent=2))
  (run_dir / workdir_lib.PREPARED_DATASET_FILE).write_text(json.dumps(
      {"name": dataset["name"], "phantoms": dataset["phantoms"]}))
  return run_dir


def _settings(builder_config) -> dict:
  """A phantom builder config's name and settings (not its description's wording)."""
  return {"name": builder_config.name,
          **{name: getattr(builder_config, name) for name in pipeline.builder_option_specs(
              phantoms_builder.RadiographPhantoms)}}


def _new_config(**options):
  config = demo.get_config()
  for name in config.dataset.builder:
    config.dataset.builder[name] = None
  config.dataset.builder.update(options)
  return config


def test_base_config_has_no_phantom_field_outside_the_builder_options():
  config = defaults.base_config()
  specs = pipeline.builder_option_specs(phantoms_builder.RadiographPhantoms)
  phantom_only = set(specs) - {"image_size"}  # image_size: every builder's option
  flat = runs.flatten_config({key: value for key, value in config.items() if key != "dataset"})
  flat.update(runs.flatten_config(
      {key: value for key, value in config.dataset.items() if key != "builder"}))
  named_like_phantom_options = {path for path in flat if path.split(".")[-1] in phantom_only}
  assert named_like_phantom_options == {"seed"}  # the training seed, not the phantoms'
  assert "phantoms" not in config.dataset
  assert all(config.dataset.builder[name] is None for name in specs)  # defaults: the builder's
  assert config.dataset.name == pipeline.PHANTOMS_NAME


def test_an_old_config_json_is_read_with_the_phantom_settings_as_builder_options(tmp_path):
  run_config = runs.read_run_config(str(_old_run(tmp_path)))
  assert "phantoms" not in run_config.dataset
  assert {name: run_config.dataset.builder[name] for name in OLD_PHANTOMS} == OLD_PHANTOMS
  assert run_config.dataset.builder.with_masks is None  # the rest untouched
  resolved = pipeline.phantoms_builder_config(run_config.dataset)
  old_code = phantoms_builder.make_builder_config(**OLD_PHANTOMS)  # what load_builder built then
  assert _settings(resolved) == _settings(old_code)
  assert _settings(resolved) == _settings(
      pipeline.phantoms_builder_config(_new_config(**NEW_OPTIONS).dataset))


def test_old_phantom_settings_of_a_manual_builder_run_are_left_out():
  dataset = dict(OLD_DATASET, name="mura", builder=dict(OLD_BUILDER, image_size=320))
  migrated = schema.migrate_config({"dataset": dataset})["dataset"]
  assert "phantoms" not in migrated  # mura never read them
  assert migrated["builder"] == dict(OLD_BUILDER, image_size=320)
  assert dataset["phantoms"] == OLD_PHANTOMS  # the input is not changed


def test_phantom_settings_given_twice_differently_are_an_error():
  dataset = dict(OLD_DATASET, builder=dict(OLD_BUILDER, image_size=64))
  with pytest.raises(ValueError, match=r"set image_size differently: phantoms.image_size=48, "
                                       r"builder.image_size=64"):
    schema.migrate_config({"dataset": dataset})
  same = dict(OLD_DATASET, builder=dict(OLD_BUILDER, image_size=48))
  assert schema.migrate_config({"dataset": same})["dataset"]["builder"]["image_size"] == 48


def test_an_old_run_resumes_with_its_settings_in_the_new_spelling(tmp_path):
  run_dir = _old_run(tmp_path)
  run_dataset = workdir_lib.read_prepared_dataset(str(run_dir))
  given = _new_config(**NEW_OPTIONS)
  dataset = workdir_lib.prepared_dataset(given.dataset)
  assert run_dataset == dataset == {
      "name": pipeline.PHANTOMS_NAME, "version": "1.0.0",
      "prepared_config": phantoms_builder.make_builder_config(**OLD_PHANTOMS).name}
  differences = workdir_lib.check_resume(
      runs.read_run_config(str(run_dir)), json.loads(given.to_json_best_effort()),
      config_file=str(run_dir / "config.json"), completed_epochs=2, run_dataset=run_dataset,
      dataset=dataset)
  # seed, test_marker_agreement, frame_probability: explicit defaults then, unset now
  assert {d.path for d in differences} == {"dataset.builder.seed",
                                           "dataset.builder.test_marker_agreement",
                                           "dataset.builder.frame_probability"}


@pytest.mark.parametrize("option, value", [("num_train", 80), ("seed", 1),
                                           ("noise_std", 0.1)])
def test_a_changed_phantom_option_is_refused_on_resume_naming_the_field(tmp_path, option,
                                                                        value):
  run_dir = _old_run(tmp_path)
  given = _new_config(**dict(NEW_OPTIONS, **{option: value}))
  old = runs.read_run_config(str(run_dir)).dataset.builder[option]
  with pytest.raises(workdir_lib.ConfigChangeError) as error:
    workdir_lib.check_resume(
        runs.read_run_config(str(run_dir)), json.loads(given.to_json_best_effort()),
        config_file=str(run_dir / "config.json"), completed_epochs=2,
        run_dataset=workdir_lib.read_prepared_dataset(str(run_dir)),
        dataset=workdir_lib.prepared_dataset(given.dataset))
  assert f"dataset.builder.{option}: {old!r} -> {value!r}" in str(error.value)
  assert "the prepared dataset" in str(error.value)


def test_a_new_runs_option_spelled_at_its_default_is_no_change(tmp_path):
  run = _new_config(**NEW_OPTIONS)
  given = _new_config(**dict(NEW_OPTIONS, seed=0, noise_std=0.04))  # the builder's defaults
  differences = workdir_lib.check_resume(
      run, json.loads(given.to_json_best_effort()), config_file=str(tmp_path / "config.json"),
      completed_epochs=1, run_dataset=workdir_lib.prepared_dataset(run.dataset),
      dataset=workdir_lib.prepared_dataset(given.dataset))
  assert {d.path for d in differences} == {"dataset.builder.seed", "dataset.builder.noise_std"}


def test_the_phantoms_take_their_options_from_the_builder_section():
  from absl import flags
  from ml_collections import config_flags

  argv = ["train", "--config=configs/demo.py", "--config.dataset.builder.image_size=64",
          "--config.dataset.builder.num_train=256", "--config.dataset.builder.seed=3"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  resolved = pipeline.phantoms_builder_config(values.config.dataset)
  expected = dict(demo.get_config().dataset.builder.items())
  expected = {name: value for name, value in expected.items() if value is not None}
  expected.update(image_size=64, num_train=256, seed=3)
  assert _settings(resolved) == _settings(phantoms_builder.make_builder_config(**expected))
  assert (resolved.image_size, resolved.num_train, resolved.seed) == (64, 256, 3)


def test_an_option_the_chosen_builder_lacks_lists_that_builders_options():
  mura = {"name": "mura", "builder": {"num_train": 5}}  # a phantom option
  with pytest.raises(ValueError, match=r"'mura' has no option\(s\) \['num_train'\]") as error:
    pipeline.resolved_builder_config(mura)
  assert "body_parts (tuple of str)" in str(error.value) and " seed (int)" not in str(error.value)
  phantoms = {"name": pipeline.PHANTOMS_NAME, "builder": {"split_seed": 1}}  # mura's seed
  with pytest.raises(ValueError, match=r"'radiograph_phantoms' has no option\(s\) "
                                       r"\['split_seed'\]") as error:
    pipeline.resolved_builder_config(phantoms)
  assert "seed (int)" in str(error.value)
  with pytest.raises(ValueError, match="the phantoms have one config, 'default'"):
    pipeline.resolved_builder_config({"name": pipeline.PHANTOMS_NAME, "builder_config": "wrist"})


def test_the_old_command_line_spelling_names_the_new_one():
  from absl import flags
  from ml_collections import config_flags

  argv = ["train", "--config=configs/demo.py", "--config.dataset.phantoms.image_size=64"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises(KeyError, match=r"--config.dataset.builder.image_size=64"):
    values(argv)
  message = cli.unknown_field_message(demo.get_config(), "dataset.phantoms.image_size")
  assert message.startswith("--config.dataset.phantoms.image_size: config.dataset.phantoms is "
                            "gone")
  assert "--config.dataset.builder.image_size=64" in message
  with pytest.raises(AttributeError, match="config.dataset.builder.update"):
    demo.get_config().dataset.phantoms.update(dict(image_size=64))  # a user's own config file
