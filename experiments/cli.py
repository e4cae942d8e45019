"""The command line shared by the binaries in experiments/: config flags whose unknown fields are
named, and user errors printed as one `error: ...` block instead of a traceback.

  _CONFIG = cli.define_config_file("config", None, "Training config file.")
  ...
  if __name__ == "__main__":
    cli.run(main)

A mistyped override (`--config.model.widht=3`) ends with
`error: --config.model.widht: config.model has no field 'widht'. Did you mean 'width'? Its
fields: ...` and exit status 1. So does a user error raised by `main` (`USER_ERRORS`: a bad value,
a missing or unwritable file, a corrupt image, ...): its message, which names the file, the field
or the index, is printed after `error: `. Other exceptions are bugs and keep their traceback.
$MEDXAI_TRACEBACK=1 shows the traceback of user errors too.

`run` also sets up the process (`medxai_jax.runtime`): the XLA:CPU defaults go into $XLA_FLAGS
before anything computes, and `--compilation_cache` (every binary has it; default: on, under
$MEDXAI_CACHE_DIR / $XDG_CACHE_HOME / ~/.cache) enables JAX's persistent compilation cache
before `main` runs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import os
import re
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from medxai_jax import runtime
from medxai_jax.attribution import registry
from medxai_jax.data import preprocess
from medxai_jax.train import defaults
from medxai_jax.train import loop
from medxai_jax.train import parallel
from medxai_jax.train import workdir as workdir_lib

# Flags defined through this module belong to the binary that calls it (its --helpshort).
flags.disclaim_key_flags()

TRACEBACK_VARIABLE = "MEDXAI_TRACEBACK"
TRACEBACK_HINT = f"({TRACEBACK_VARIABLE}=1 shows the traceback.)"
# Exceptions whose message is meant for the user: bad values, files that are missing, unwritable
# or not what they should be, corrupt images, missing decoders, a diverged training run.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError, preprocess.MissingDicomDecoderError,
    loop.NonFiniteLossError, workdir_lib.WorkdirLockedError)

_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", runtime.DEFAULT,
                                         runtime.CACHE_FLAG_HELP)

# Config flag name -> its default config file, for naming a bad override of either.
_CONFIG_FLAGS: dict[str, str | None] = {}


def traceback_wanted() -> bool:
  """Whether $MEDXAI_TRACEBACK asks for full tracebacks of user errors."""
  return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def exit_with_user_error(message: str) -> NoReturn:
  """Prints `error: <message>` (and how to see the traceback) to stderr; exits with status 1."""
  print(f"error: {message}\n{TRACEBACK_HINT}", file=sys.stderr, flush=True)
  sys.exit(1)


def error_message(error: BaseException) -> str:
  """The message an exception was raised with (a KeyError's without the quotes repr adds)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  return str(error) or type(error).__name__


def is_user_error(error: BaseException) -> bool:
  """A `USER_ERRORS` exception, except a KeyError whose message is a bare key (a lookup bug)."""
  if not isinstance(error, USER_ERRORS):
    return False
  return not isinstance(error, KeyError) or " " in error_message(error).strip()


def _fields(node: Any) -> list[str] | None:
  """The field names of a config section (ConfigDict, mapping or dataclass); None for a value."""
  if isinstance(node, (ml_collections.ConfigDict, Mapping)):
    return [str(key) for key in node.keys()]
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    return [field.name for field in dataclasses.fields(node)]
  return None


def _child(node: Any, name: str) -> Any:
  """Field `name` of a config section."""
  if isinstance(node, (ml_collections.ConfigDict, Mapping)):
    return node[name]
  return getattr(node, name)


def unknown_field_message(config: Any, path: str, flag_name: str = "config") -> str | None:
  """Why `--<flag_name>.<path>` names no field of `config` (the section's fields and the closest
  match), or None when every part of the dotted path exists."""
  parts = path.split(".")
  node = config
  for depth, part in enumerate(parts):
    if "[" in part:  # an indexed element (`layers[0]`): not checked here
      return None
    section = ".".join([flag_name, *parts[:depth]])
    fields = _fields(node)
    if fields is None:
      return (f"--{flag_name}.{path}: {section} is a value ({node!r}), not a section; it has no "
              f"field {part!r}.")
    moved = defaults.MOVED_FIELDS.get(".".join(parts[:depth + 1]))
    if part not in fields and moved:
      return f"--{flag_name}.{path}: {moved}"
    if part not in fields:
      close = difflib.get_close_matches(part, fields, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      return (f"--{flag_name}.{path}: {section} has no field {part!r}.{hint} Its fields: "
              f"{', '.join(sorted(fields))}.")
    node = _child(node, part)
  return None


def config_overrides(argv: Sequence[str], flag_name: str) -> list[str]:
  """The dotted paths overridden on the command line by `--<flag_name>.<path>[=value]`."""
  pattern = re.compile(rf"^--?(no)?{re.escape(flag_name)}\.([^=]+)")
  return [match.group(2) for match in map(pattern.match, argv) if match]


def config_file_argument(argv: Sequence[str], flag_name: str) -> str | None:
  """The value of `--<flag_name>=FILE` (or `--<flag_name> FILE`) in argv; the last one wins."""
  value = None
  for index, arg in enumerate(argv):
    if re.match(rf"^--?{re.escape(flag_name)}=", arg):
      value = arg.split("=", 1)[1]
    elif re.fullmatch(rf"--?{re.escape(flag_name)}", arg) and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def config_override_error(argv: Sequence[str], error: BaseException) -> str:
  """The one-line message for a failed `--<config>.<field>` override: the first override of a
  config flag that names no field of its config, else the raised message."""
  raised = error_message(error)
  if any(raised.startswith(f"--{name}.") for name in _CONFIG_FLAGS):
    return raised  # already names the flag and lists the choices (e.g. BuilderOptions)
  for name, default in _CONFIG_FLAGS.items():
    paths = config_overrides(argv, name)
    config_file = config_file_argument(argv, name) or default
    if not paths or not config_file:
      continue
    config = config_flags_lib.ConfigFileFlagParser(name=name, lock_config=False).parse(
        config_file)
    for path in paths:
      message = unknown_field_message(config, path, name)
      if message:
        return message
  return f"a config override failed: {raised}"


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
  """argv with any --flagfile expanded, as config_flags reads it (unchanged when a flagfile
  cannot be read: absl's own parsing reports that)."""
  try:
    return flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error:
    return list(argv)


def missing_config_file_message(argv: Sequence[str]) -> str | None:
  """The error for a `--<config>=FILE[:ARG]` whose FILE does not exist, or for overrides
  `--<config>.<field>` of a config flag that has neither a value nor a default; else None."""
  for name, default in _CONFIG_FLAGS.items():
    value = config_file_argument(argv, name)
    if value is None and default is None and config_overrides(argv, name):
      return (f"--{name}.{config_overrides(argv, name)[0]} overrides a field of --{name}, but "
              f"no --{name}=FILE is given; add e.g. --{name}=configs/demo.py before it.")
    if value is not None and not os.path.isfile(value.split(":", 1)[0]):
      return (f"--{name}={value}: the config file {value.split(':', 1)[0]!r} does not exist "
              f"(relative paths start at {os.getcwd()!r}).")
  return None


def define_config_file(name: str, default: str | None, help_string: str) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)` whose
  overrides of unknown fields end the program with `error: <which field, the valid ones>`."""
  _CONFIG_FLAGS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (KeyError, AttributeError) as error:  # a default config parses its overrides right here
    if traceback_wanted():
      raise
    exit_with_user_error(config_override_error(expand_flagfiles(sys.argv), error))


def define_model_flag() -> None:
  """--model: which of a run's models (`runs.restore_model`): 'selected' (a finished run's) or
  'best_so_far' (an unfinished run's best completed epoch: an explicit opt-in)."""
  from medxai_jax import runs  # noqa: PLC0415

  flags.DEFINE_enum(
      "model", runs.SELECTED, list(runs.MODEL_CHOICES),
      "selected: the finished run's selected_model/; best_so_far: the best epoch checkpoint of "
      "a run whose training has not finished (its epoch is recorded in the outputs).")


def define_multihost_flags() -> None:
  """--multihost, --coordinator_address, --num_processes and --process_id (a multi-host run;
  `initialize_distributed` reads them)."""
  flags.DEFINE_bool(
      "multihost", None, "Start jax.distributed with the cluster auto-detected (SLURM, Open MPI, "
      "TPU pods). Default: $MEDXAI_DISTRIBUTED=1.")
  flags.DEFINE_string(
      "coordinator_address", "", "HOST:PORT of process 0 for a multi-host run without "
      "auto-detection (default: $JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", 0, "Processes of a multi-host run (0: auto-detected).")
  flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run "
                       "(-1: auto-detected).")


def initialize_distributed() -> None:
  """Starts jax.distributed as `define_multihost_flags`' flags say (before any device use)."""
  values = flags.FLAGS
  parallel.initialize_distributed(values.coordinator_address, values.num_processes,
                                  values.process_id, auto=values.multihost)


# The explanation options of explain and evaluate_explanations: one spelling for both.
RENAMED_OPTION_FLAGS = {"steps": "num_steps", "samples": "num_samples"}


def define_explanation_flags() -> None:
  """--num_steps, --num_samples, --chunk_size and --method_options (unset: the registry's
  defaults), and the old --steps / --samples, which are refused with their new names."""
  flags.DEFINE_integer(
      "num_steps", None, f"Gradient evaluations of the path methods (IG, Blur IG, Guided IG, "
      f"XRAI; default {registry.NUM_STEPS}).")
  flags.DEFINE_integer("num_samples", None,
                       f"SmoothGrad noise samples (default {registry.NUM_SAMPLES}).")
  flags.DEFINE_integer(
      "chunk_size", None, f"Steps / samples / windows / masks per batch of every chunked "
      f"method (default {registry.CHUNK_SIZE}).")
  flags.DEFINE_list(
      "method_options", [], "One method's options as method.option=value, e.g. "
      "ig.rule=pair_uniform,occlusion.window=8.")
  for old, new in RENAMED_OPTION_FLAGS.items():
    flags.DEFINE_integer(old, None, f"Renamed: use --{new}.")


def _literal(text: str) -> Any:
  """A Python literal (number, tuple, None, True...) or, failing that, the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_method_options(entries: Sequence[str]) -> dict[str, dict[str, Any]]:
  """`--method_options` entries method.option=value as {method: {option: value}}."""
  parsed: dict[str, dict[str, Any]] = {}
  for entry in entries:
    name, equals, value = entry.partition("=")
    method, dot, option = name.partition(".")
    if not (equals and dot and method.strip() and option.strip()):
      raise ValueError(f"--method_options entries are method.option=value (no commas in "
                       f"a value); got {entry!r}.")
    parsed.setdefault(method.strip(), {})[option.strip()] = _literal(value.strip())
  return parsed


def explanation_overrides() -> dict[str, Any]:
  """The explanation overrides `define_explanation_flags`' flags give (only those set)."""
  values = flags.FLAGS
  for old, new in RENAMED_OPTION_FLAGS.items():
    if values[old].value is not None:
      raise ValueError(f"--{old} is now --{new} (one spelling for every method and "
                       f"binary): pass --{new}={values[old].value}.")
  overrides: dict[str, Any] = {name: values[name].value
                               for name in ("num_steps", "num_samples", "chunk_size")
                               if values[name].value is not None}
  for method, options in parse_method_options(values["method_options"].value).items():
    if method not in registry.REGISTRY:
      raise ValueError(f"--method_options names {method!r}, not a method; choose from "
                       f"{list(registry.REGISTRY)}.")
    overrides[method] = options
  return overrides


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (usage errors print as absl prints them); a missing config file, a
  failed config override or a config file's user error ends the program with `error: ...`."""
  missing = missing_config_file_message(expand_flagfiles(argv))
  if missing:
    exit_with_user_error(missing)
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    if traceback_wanted():
      raise
    exit_with_user_error(config_override_error(expand_flagfiles(argv), error))
  except Exception as error:  # e.g. a config file's get_config() raising a ValueError
    if traceback_wanted() or not is_user_error(error):
      raise
    exit_with_user_error(error_message(error))


def _report_user_errors(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  """Runs main(argv); a user error ends the program with `error: <message>` and status 1."""
  try:
    return main(argv)
  except Exception as error:
    if traceback_wanted() or not is_user_error(error):
      raise
    exit_with_user_error(error_message(error))


def _with_compilation_cache(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  """Enables the compilation cache `--compilation_cache` names, then runs main(argv)."""
  runtime.enable_compilation_cache(runtime.resolve_cache_dir(_COMPILATION_CACHE.value))
  return main(argv)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` (flags, --help, --helpfull) with user errors as one `error: ...` block,
  the XLA defaults and the compilation cache of `medxai_jax.runtime`."""
  runtime.apply_xla_defaults()
  app.run(functools.partial(_report_user_errors,
                            functools.partial(_with_compilation_cache, main)),
          flags_parser=parse_flags)
