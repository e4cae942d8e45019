"""User errors of the binaries end in one `error: ...` block naming the thing, with exit status 1:
unknown config fields and the binaries' flags (experiments/cli.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import ml_collections
import pytest

import subprocess_env
from experiments import cli

REPO = subprocess_env.REPO


def run(module, *args, env_extra=None):
  """Runs `python -m module args` from the repository root, as a user does."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(cli.TRACEBACK_VARIABLE, None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def load_config(relative_path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file, loaded independently of config_flags."""
  spec = importlib.util.spec_from_file_location("config_under_test",
                                                os.path.join(REPO, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def listed_fields(message: str) -> set[str]:
  """The field names after 'Its fields: ' in an error message."""
  match = re.search(r"Its fields: (.*)\.$", message.strip())
  assert match, message
  return set(match.group(1).split(", "))


def assert_one_error_block(result: subprocess.CompletedProcess) -> str:
  """Exit status 1, no traceback, and the `error: ` line; returns that line's message."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  assert cli.TRACEBACK_HINT in result.stderr
  return lines[0].removeprefix("error: ")


# ----------------------------------------------------------------------------------------------
# Unknown config fields, in-process.

def small_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=0.1, num_epochs=3,
      model=dict(name="cnn", width=8, depth=2), dataset=dict(name="x", splits=("a", "b"))))


def test_unknown_top_level_field_lists_the_fields_and_the_closest_match():
  config = small_config()
  message = cli.unknown_field_message(config, "learnig_rate")
  assert message.startswith("--config.learnig_rate: config has no field 'learnig_rate'.")
  assert "Did you mean 'learning_rate'?" in message
  assert listed_fields(message) == set(config.keys())


def test_unknown_nested_field_names_its_section():
  config = small_config()
  message = cli.unknown_field_message(config, "model.widht", "config_b")
  assert message.startswith("--config_b.model.widht: config_b.model has no field 'widht'.")
  assert "Did you mean 'width'?" in message
  assert listed_fields(message) == set(config.model.keys())
  # Nothing close: no guess, still the fields.
  message = cli.unknown_field_message(config, "zzzz.qqqq")
  assert "Did you mean" not in message and listed_fields(message) == set(config.keys())


def test_a_value_is_not_a_section_and_existing_paths_pass():
  config = small_config()
  message = cli.unknown_field_message(config, "num_epochs.x")
  assert "config.num_epochs is a value (3), not a section" in message
  for path in ("learning_rate", "model.width", "dataset.splits"):
    assert cli.unknown_field_message(config, path) is None


def test_overrides_and_config_file_are_read_from_argv():
  argv = ["prog", "--config=a.py:mura", "--config.model.width=3", "--noconfig.flag",
          "--config_b", "b.py", "-config_b.seed", "4", "--configx.y=1"]
  assert cli.config_overrides(argv, "config") == ["model.width", "flag"]
  assert cli.config_overrides(argv, "config_b") == ["seed"]
  assert cli.config_file_argument(argv, "config") == "a.py:mura"
  assert cli.config_file_argument(argv, "config_b") == "b.py"
  assert cli.config_file_argument(argv, "config_a") is None


def test_user_errors_print_one_block_and_bugs_keep_their_exception(capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)

  def failing(error):
    def main(argv):
      raise error
    return main

  with pytest.raises(SystemExit) as exit_info:
    cli._report_user_errors(failing(KeyError("Records have no feature(s) ['x']")), ["prog"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.startswith("error: Records have no feature(s) ['x']\n")
  with pytest.raises(RuntimeError, match="a bug"):
    cli._report_user_errors(failing(RuntimeError("a bug")), ["prog"])
  with pytest.raises(KeyError):  # a bare key: a lookup bug, not a message for the user
    cli._report_user_errors(failing(KeyError("x")), ["prog"])
  monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
  with pytest.raises(ValueError, match="bad value"):
    cli._report_user_errors(failing(ValueError("bad value")), ["prog"])


# ----------------------------------------------------------------------------------------------
# Unknown config fields, per binary (each fails at flag parsing: a few seconds of imports).

DEMO_CONFIG = "configs/demo.py"


@pytest.mark.parametrize("override, section", [
    ("foo=1", ""), ("model.widht=3", "model"), ("learnig_rate=0.1", "")])
def test_train_names_an_unknown_field_and_its_section(override, section, tmp_path):
  result = run("experiments.train", f"--config={DEMO_CONFIG}", f"--workdir={tmp_path / 'w'}",
               f"--config.{override}")
  message = assert_one_error_block(result)
  path = override.split("=")[0]
  assert message.startswith(f"--config.{path}: config{'.' + section if section else ''} has no "
                            f"field '{path.split('.')[-1]}'.")
  config = load_config(DEMO_CONFIG)
  assert listed_fields(message) == set((config[section] if section else config).keys())
  if path == "learnig_rate":
    assert "Did you mean 'learning_rate'?" in message
  assert not (tmp_path / "w").exists()


def test_train_names_an_unknown_builder_option(tmp_path):
  result = run("experiments.train", f"--config={DEMO_CONFIG}", f"--workdir={tmp_path / 'w'}",
               "--config.dataset.builder.imagesize=32")
  message = assert_one_error_block(result)
  assert message.startswith("--config.dataset.builder.imagesize: no builder has an option "
                            "'imagesize'. Did you mean \"image_size\"?")


@pytest.mark.parametrize("module, args, flag", [
    ("experiments.explain", ["--checkpoint=/nonexistent", f"--config={DEMO_CONFIG}"], "config"),
    ("experiments.evaluate_explanations", ["--checkpoint=/nonexistent",
                                           f"--config={DEMO_CONFIG}"], "config"),
    ("experiments.compare_layers", ["--workdir_a=/a", "--workdir_b=/b",
                                    f"--config_b={DEMO_CONFIG}"], "config_b"),
    ("experiments.demo", [], "config"),  # its default config: parsed as the flag is defined
])
def test_other_binaries_name_an_unknown_nested_field(module, args, flag):
  result = run(module, *args, f"--{flag}.modle.width=3")
  message = assert_one_error_block(result)
  assert message.startswith(f"--{flag}.modle.width: {flag} has no field 'modle'. "
                            "Did you mean 'model'?")
  assert listed_fields(message) == set(load_config(DEMO_CONFIG).keys())


def test_progressive_transfer_names_an_unknown_field_of_its_default_config():
  result = run("experiments.progressive_transfer", "--config.trainn=1")
  message = assert_one_error_block(result)
  assert message.startswith("--config.trainn: config has no field 'trainn'.")
  assert listed_fields(message) == set(load_config("configs/progressive_transfer.py").keys())


def test_a_missing_config_file_and_an_override_without_a_config_are_named(tmp_path):
  message = assert_one_error_block(run("experiments.train", "--config=configs/nosuch.py",
                                       f"--workdir={tmp_path}"))
  assert "--config=configs/nosuch.py: the config file 'configs/nosuch.py' does not exist" in message
  message = assert_one_error_block(run("experiments.explain", "--checkpoint=/nonexistent",
                                       "--config.num_epochs=1"))
  assert message.startswith("--config.num_epochs overrides a field of --config, but no "
                            "--config=FILE is given")


def test_the_config_flag_stays_a_flag_of_the_binary():
  # Defined through experiments/cli.py, it still belongs to the binary: --helpshort lists it.
  result = run("experiments.train", "--helpshort")
  assert "--config: Training config file." in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# User errors raised by main(), and MEDXAI_TRACEBACK.

def test_a_user_error_of_main_is_one_block_and_the_variable_shows_the_traceback(tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("not a directory")
  args = [f"--config={DEMO_CONFIG}", f"--workdir={workdir}"]
  message = assert_one_error_block(run("experiments.train", *args))
  assert message == (f"--workdir={str(workdir)!r} exists and is not a directory; give a "
                     "directory (or move the file away).")
  shown = run("experiments.train", *args, env_extra={cli.TRACEBACK_VARIABLE: "1"})
  assert shown.returncode != 0
  assert "Traceback (most recent call last)" in shown.stderr
  assert "NotADirectoryError" in shown.stderr and "error: " not in shown.stderr


def test_explain_of_a_missing_run_is_one_block():
  message = assert_one_error_block(run("experiments.explain", "--checkpoint=/nonexistent_run"))
  assert "'/nonexistent_run' does not exist" in message


def test_explain_refuses_the_old_option_flags_and_unknown_method_options():
  # Checked before the run is read: one spelling, --num_steps / --num_samples, everywhere.
  message = assert_one_error_block(run("experiments.explain", "--checkpoint=/nonexistent_run",
                                       "--steps=8"))
  assert message == ("--steps is now --num_steps (one spelling for every method and binary): "
                     "pass --num_steps=8.")
  message = assert_one_error_block(run("experiments.explain", "--checkpoint=/nonexistent_run",
                                       "--method_options=ig.window=4"))
  assert message.startswith("Method 'ig' has no option(s) ['window']; its options are")


def test_evaluate_explanations_spells_the_options_as_explain_does():
  # The same flags as explain: --num_steps / --num_samples; the old names are refused.
  message = assert_one_error_block(run("experiments.evaluate_explanations",
                                       "--checkpoint=/nonexistent_run", "--samples=4"))
  assert message == ("--samples is now --num_samples (one spelling for every method and "
                     "binary): pass --num_samples=4.")
  message = assert_one_error_block(run("experiments.evaluate_explanations",
                                       "--checkpoint=/nonexistent_run",
                                       "--method_options=nosuch.window=4"))
  assert message.startswith("--method_options names 'nosuch', not a method")
