"""A training run read back from its directory: its config, its selected model, its splits.

`experiments/train.py --workdir=RUN` writes `RUN/config.json` (the full training config, every
override included), `RUN/selected_model/` (the variables of the selected epoch, written when
training finishes), `RUN/metrics.json` and `RUN/splits.json`. Everything that uses a trained
model (explain, evaluate_explanations, compare_layers, the demo, config.init_from) reads it from
there: the config (`read_run_config`, filled with base_config's defaults for the fields an
older config.json lacks), the selected model (`restore_selected_model`), the split files
(`Run`). No training override is typed twice; a config given on a command line is compared with
the run's (`config_differences`) and then applied (`merge_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from medxai_jax.models import base
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import schema

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SPLITS_FILE = "splits.json"
PREDICTIONS_FILE = "predictions_test.npz"
# The selected epoch's variables (no optimiser state): what inference and init_from read.
SELECTED_MODEL_DIR = "selected_model"
# Fields every training config has (configs/common.py); a config.json without them is not one.
REQUIRED_FIELDS = ("dataset", "model", "preprocess")
# config.model fields that may differ between an init_from source run and the model it starts:
# the head is rebuilt (new classes), the input size only changes the spatial grid.
HEAD_FIELDS = frozenset({"num_outputs", "head", "head_hidden_widths", "dropout_rate",
                         "input_shape", "dtype", "bn_epsilon"})
_ABSENT = "<absent>"


@dataclasses.dataclass(frozen=True)
class Difference:
  """One field whose value differs between a run's config and another config."""

  path: str  # dotted, e.g. 'model.num_outputs'
  run_value: Any  # '<absent>' when the run's config has no such field
  given_value: Any  # '<absent>' when the given config has no such field

  def __str__(self) -> str:
    return f"{self.path}: {self.run_value!r} -> {self.given_value!r}"


def _tuples(value: Any) -> Any:
  """JSON lists as tuples (the config files write sequences as tuples), recursively."""
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def config_path(run_dir: str) -> str:
  """Absolute path of a run's config.json."""
  return os.path.join(os.path.abspath(os.path.expanduser(run_dir)), CONFIG_FILE)


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The training config a run was trained with (`<run_dir>/config.json`), unlocked, with
  base_config's default for every field it lacks (`schema.with_defaults`: a run written before
  the field existed was trained as its default says).

  Sequences come back as tuples, null fields (e.g. an unset `preprocess.bit_depth`) as None.
  Raises FileNotFoundError naming the file when it is missing, ValueError when it is not a
  training config.
  """
  path = config_path(run_dir)
  if not os.path.isdir(os.path.dirname(path)):
    raise FileNotFoundError(f"The run directory {os.path.dirname(path)!r} does not exist; give "
                            "the --workdir of a finished `python -m experiments.train` run.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {os.path.dirname(path)!r} is not a training "
                            "run directory (experiments/train.py writes config.json into its "
                            "--workdir).")
  try:
    with open(path) as file:
      content = json.load(file)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}.") from error
  missing = [field for field in REQUIRED_FIELDS
             if not isinstance(content, dict) or not isinstance(content.get(field), dict)]
  if missing:
    raise ValueError(f"{path} is not a training config: it lacks the section(s) {missing} that "
                     "experiments/train.py writes.")
  return schema.with_defaults(_tuples(content))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> {'a.b': leaf}; an empty section is one leaf."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)) and len(value):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def flatten_config(tree: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """A nested config or mapping as {'a.b': leaf}; an empty section is one leaf."""
  return _flatten(tree.to_dict() if isinstance(tree, ml_collections.ConfigDict) else tree)


def read_json(path: str) -> Any:
  """A JSON file's content; invalid JSON raises ValueError naming the file."""
  with open(path) as file:
    try:
      return json.load(file)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON: {error}.") from error


def _comparable(value: Any) -> Any:
  """A value as JSON would store it (tuples as lists), for comparison."""
  if isinstance(value, (Mapping, ml_collections.ConfigDict)):
    return {key: _comparable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_comparable(item) for item in value]
  return value


def config_differences(run_config: ml_collections.ConfigDict,
                       given: ml_collections.ConfigDict) -> list[Difference]:
  """Fields whose values differ between a run's config and `given`, sorted by path."""
  run_flat = _flatten(run_config.to_dict() if hasattr(run_config, "to_dict") else run_config)
  given_flat = _flatten(given.to_dict() if hasattr(given, "to_dict") else given)
  differences = []
  for path in sorted(set(run_flat) | set(given_flat)):
    run_value = run_flat.get(path, _ABSENT)
    given_value = given_flat.get(path, _ABSENT)
    if _comparable(run_value) != _comparable(given_value):
      differences.append(Difference(path, run_value, given_value))
  return differences


def merge_config(run_config: ml_collections.ConfigDict,
                 given: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`given`, plus the fields only the run's config has (a copy; neither input changes)."""
  merged = _tuples(json.loads(run_config.to_json_best_effort()))

  def apply(node: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
      if isinstance(value, Mapping) and isinstance(node.get(key), dict):
        apply(node[key], value)
      else:
        node[key] = value

  apply(merged, given.to_dict())
  return ml_collections.ConfigDict(merged)


def resolve_config(run_dir: str, given: ml_collections.ConfigDict | None = None,
                   *, flag: str = "--config") -> ml_collections.ConfigDict:
  """The run's config, or with `given` (a command-line config) applied after printing how they
  differ (one line per field: path, run value -> given value).

  A run directory without config.json (checkpoints made by hand or elsewhere) is used with
  `given` alone, with a warning; without `given` that is an error naming the file.
  """
  path = config_path(run_dir)
  if given is not None and os.path.isdir(os.path.dirname(path)) and not os.path.exists(path):
    message = f"{path} does not exist; using {flag} as given."
    print(message)
    logging.warning(message)
    return given
  run_config = read_run_config(run_dir)
  if given is None:
    return run_config
  differences = config_differences(run_config, given)
  header = (f"{flag} differs from {config_path(run_dir)} in {len(differences)} field(s) "
            "(run value -> given value); the given values are used:" if differences else
            f"{flag} matches {config_path(run_dir)}.")
  print(header)
  for difference in differences:
    print(f"  {difference}")
  logging.info("%s%s", header, "".join(f"\n  {d}" for d in differences))
  return merge_config(run_config, given)


@dataclasses.dataclass(frozen=True)
class SelectedModel:
  """A run's selected model, for inference: it computes in float32 whatever the run trained in."""

  model: base.Classifier
  variables: base.Variables
  preprocess: components.Preprocess  # stored images -> the model's inputs
  epoch: int | None  # the selected epoch (None when its metadata does not say)


def check_trained(run_dir: str) -> str:
  """The absolute `run_dir`; raises FileNotFoundError, creating nothing, unless it holds the
  selected model of a finished training run (`selected_model/variables`)."""
  directory = os.path.abspath(os.path.expanduser(run_dir))
  selected = os.path.join(directory, SELECTED_MODEL_DIR)
  if os.path.isdir(os.path.join(selected, "variables")):
    return directory
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"The training run {directory!r} does not exist; give the --workdir "
                            "of a finished `python -m experiments.train` run.")
  epochs = os.path.join(directory, "checkpoints", "best")
  unfinished = (f": its training has not finished ({epochs} holds epoch checkpoints; the "
                "selected model is written after the last epoch). Run the same `python -m "
                "experiments.train` command again to finish it (a finished run from before "
                "selected_model/ existed is not retrained: the command only writes it), or "
                "give --model=best_so_far to use its best epoch so far"
                if os.path.isdir(epochs) else "")
  raise FileNotFoundError(f"The training run {directory!r} has no checkpoint in "
                          f"{selected}{unfinished}.")


def _fit_variables(expected: Any, loaded: Any, what: str, hint: str = "") -> Any:
  """`loaded` (arrays by path) in the structure of `expected` (shapes by path); raises
  ValueError naming `what` and the first arrays missing, extra or of another shape."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  wanted = {jax.tree_util.keystr(path): leaf.shape for path, leaf in leaves}
  found = {jax.tree_util.keystr(path): leaf
           for path, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  problems = [f"{name}: missing (expected {shape})" if name not in found else
              f"{name}: {tuple(found[name].shape)}, expected {shape}"
              for name, shape in wanted.items()
              if name not in found or tuple(found[name].shape) != tuple(shape)]
  problems += [f"{name}: not an array of the model" for name in sorted(set(found) - set(wanted))]
  if problems:
    raise ValueError(f"{what}: {len(problems)} array(s) differ: {problems[:5]}.{hint}")
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(found[name]) for name in wanted])


def restore_selected_model(config: ml_collections.ConfigDict, run_dir: str) -> SelectedModel:
  """The model of `config` (in float32), the run's selected variables and the preprocessing.

  Raises FileNotFoundError (`check_trained`) for a run without a selected model and ValueError
  naming the file and the arrays when the variables do not fit config.model.
  """
  directory = os.path.join(check_trained(run_dir), SELECTED_MODEL_DIR)
  model = components.build_model(config, compute_dtype="float32")
  loaded, metadata = checkpoint.load_variables(directory)
  variables = _fit_variables(
      jax.eval_shape(model.init, jax.random.key(0)), loaded,
      f"{directory}/variables does not match the model of config.model {dict(config.model)}",
      " Give the run's own config (without --config its config.json is used).")
  return SelectedModel(model, variables, components.build_preprocess(config, model),
                       metadata.get("selected_epoch"))


SELECTED = "selected"
BEST_SO_FAR = "best_so_far"
MODEL_CHOICES = (SELECTED, BEST_SO_FAR)


def restore_best_so_far(config: ml_collections.ConfigDict, run_dir: str) -> SelectedModel:
  """The model-selection winner among the epochs a (possibly unfinished) run has completed: its
  `checkpoints/best` epoch checkpoint, restored as training restores it (`epoch`: that epoch).

  Raises FileNotFoundError when the run has no epoch checkpoint yet.
  """
  from medxai_jax.train import steps  # the train state's structure; kept local (heavy import)

  directory = os.path.abspath(os.path.expanduser(run_dir))
  best = os.path.join(directory, "checkpoints", "best")
  if not os.path.isdir(best) or not os.listdir(best):
    raise FileNotFoundError(f"The training run {directory!r} has no epoch checkpoint in {best} "
                            "yet: --model=best_so_far needs at least one completed epoch.")
  model, tx, _ = components.build_components(config)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # any process, any writer
  template = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
      jax.eval_shape(lambda key: steps.create_train_state(model, tx, key), jax.random.key(0)))
  store = checkpoint.CheckpointStore(os.path.join(directory, "checkpoints"))
  try:
    state, metadata = store.restore_best(template)
  finally:
    store.close()
  float_model = components.build_model(config, compute_dtype="float32")
  variables = _fit_variables(jax.eval_shape(float_model.init, jax.random.key(0)),
                             state.variables, f"{best} does not match config.model")
  return SelectedModel(float_model, variables, components.build_preprocess(config, float_model),
                       metadata.get("loop", {}).get("best_epoch"))


def restore_model(config: ml_collections.ConfigDict, run_dir: str, which: str = SELECTED
                  ) -> SelectedModel:
  """`restore_selected_model` ('selected': a finished run's selected model) or, an explicit
  opt-in for an unfinished run, `restore_best_so_far` ('best_so_far')."""
  if which == SELECTED:
    return restore_selected_model(config, run_dir)
  if which == BEST_SO_FAR:
    return restore_best_so_far(config, run_dir)
  raise ValueError(f"--model must be one of {MODEL_CHOICES}; got {which!r}.")


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished training run: its directory and config (see `load_run`)."""

  directory: str
  config: ml_collections.ConfigDict

  def restore_selected_model(self) -> SelectedModel:
    """The selected model (`restore_selected_model` with the run's config)."""
    return restore_selected_model(self.config, self.directory)

  def metrics(self) -> dict[str, Any] | None:
    """metrics.json (None before training finished)."""
    return _read_optional_json(os.path.join(self.directory, METRICS_FILE))

  def splits(self) -> dict[str, Any] | None:
    """splits.json: class names and examples per class of each split (None if absent)."""
    return _read_optional_json(os.path.join(self.directory, SPLITS_FILE))


def _read_optional_json(path: str) -> dict[str, Any] | None:
  """A JSON file's content, or None when there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path) as file:
    return json.load(file)


def load_run(run_dir: str, given: ml_collections.ConfigDict | None = None, *,
             flag: str = "--config") -> Run:
  """The run in `run_dir` with its config (`resolve_config`: `given` applied if not None)."""
  directory = os.path.abspath(os.path.expanduser(run_dir))
  return Run(directory, resolve_config(directory, given, flag=flag))


def source_run_dir(init_from: str) -> str | None:
  """The training run directory an init_from path names (the run or its selected_model/), or
  None when it is not a training run (e.g. weights written by experiments/port_weights.py)."""
  path = os.path.abspath(os.path.expanduser(init_from))
  for candidate in (path, os.path.dirname(path)):
    if os.path.isfile(os.path.join(candidate, CONFIG_FILE)) and os.path.isdir(
        os.path.join(candidate, SELECTED_MODEL_DIR)):
      return candidate
  return None


def resolve_init_from(path: str) -> str:
  """Directory holding `variables/`: `path` itself or a training run's `selected_model/`."""
  path = os.path.abspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, SELECTED_MODEL_DIR)):
    if os.path.isdir(os.path.join(candidate, "variables")):
      return candidate
  raise FileNotFoundError(
      f"config.init_from={path!r} holds no 'variables/' checkpoint: give a directory written by "
      "experiments/port_weights.py or a finished training run (its selected_model/).")


def describe_source_run(init_from: str, model_config: Mapping[str, Any]
                        ) -> dict[str, Any] | None:
  """What a training run given as config.init_from was (its config.json: dataset, model, test
  accuracy), or None for other weights; raises ValueError naming both models when its
  architecture is not config.model's (only the head and input size may differ)."""
  run_dir = source_run_dir(init_from)
  if run_dir is None:
    return None
  source = read_run_config(run_dir)
  differing = check_compatible_models(
      source.model, model_config, source_name=f"config.init_from={run_dir!r}",
      target_name="config.model")
  metrics = Run(run_dir, source).metrics() or {}
  description = {"directory": run_dir, "dataset": source.dataset.name,
                 "builder_config": source.dataset.builder_config,
                 "filter": source.dataset.filter, "model": source.model.to_dict(),
                 "head_fields_changed": differing,
                 "test_accuracy": (metrics.get("test") or {}).get("accuracy")}
  logging.info("config.init_from is the training run %s (dataset %s, model %s, test accuracy "
               "%s)%s.", run_dir, description["dataset"], description["model"],
               description["test_accuracy"],
               f"; new values of {differing}" if differing else "")
  return description


def check_compatible_models(source: Mapping[str, Any], target: Mapping[str, Any], *,
                            source_name: str, target_name: str,
                            allowed: Sequence[str] = tuple(HEAD_FIELDS)) -> list[str]:
  """Raises ValueError naming both models unless `target` has `source`'s architecture (its
  name and every field both set, but those in `allowed`); returns the allowed fields that differ."""
  source = _comparable(dict(source))
  target = _comparable(dict(target))
  structural = sorted(key for key in set(source) & set(target)
                      if key not in allowed and source[key] != target[key])
  if source.get("name") != target.get("name") and "name" not in structural:
    structural.insert(0, "name")
  if structural:
    details = ", ".join(f"{key}: {source.get(key)!r} vs {target.get(key)!r}"
                        for key in structural)
    raise ValueError(f"{target_name} cannot start from {source_name}: the architectures differ "
                     f"({details}). {source_name}: model {source}; {target_name}: model "
                     f"{target}.")
  return sorted(key for key in set(source) & set(target) & set(allowed)
                if source[key] != target[key])
