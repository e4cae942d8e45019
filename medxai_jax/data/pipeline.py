"""From TFDS builders to fixed-shape numpy batches (random access, seeded order, padded tails)."""

from __future__ import annotations

import dataclasses
import difflib
import gc
import glob
import hashlib
import os
import queue
import threading
from typing import Any, Iterator, Mapping, NamedTuple, Protocol, Sequence

import ml_collections
import numpy as np


class RandomAccessSource(Protocol):
  """What `builder.as_data_source(split)` returns: indexable records of numpy features."""

  def __len__(self) -> int: ...

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


def default_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (absolute)."""
  chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(chosen))


PHANTOMS_NAME = "radiograph_phantoms"
_OPTION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def manual_builder_classes() -> dict[str, type]:
  """Registered name -> class of every manual-download builder of this package (mura, tb_cxr,
  brain_tumor_mri, covid_radiography, medical_modalities, ...)."""
  import tensorflow_datasets as tfds  # heavy import, kept local

  import medxai_jax.data.builders  # noqa: F401  (registers the builders with tfds)
  from medxai_jax.data.builders import common

  found, pending = {}, list(common.ManualImageBuilder.__subclasses__())
  while pending:
    cls = pending.pop()
    pending.extend(cls.__subclasses__())
    try:
      registered = tfds.builder_cls(cls.name)
    except Exception:  # tfds raises several kinds for an unregistered name
      continue
    if registered is cls and getattr(cls, "BUILDER_CONFIGS", None):
      found[cls.name] = cls
  return dict(sorted(found.items()))


def dataset_names() -> list[str]:
  """Every value `config.dataset.name` accepts."""
  return [PHANTOMS_NAME, *manual_builder_classes()]


def configurable_builder_classes() -> dict[str, type]:
  """Registered name -> class of every builder whose options `config.dataset.builder` sets: the
  phantoms, then the manual-download builders."""
  from medxai_jax.data.builders import phantoms

  return {PHANTOMS_NAME: phantoms.RadiographPhantoms, **manual_builder_classes()}


class OptionSpec(NamedTuple):
  """The type of a builder option (int, float, str, bool or tuple) and of a tuple's elements."""

  type: type
  element: type | None = None


def _option_spec(field: dataclasses.Field, owner: str) -> OptionSpec:
  """The spec of a builder-config field, from its annotation (e.g. 'tuple[str, ...]')."""
  raw = field.type.__name__ if isinstance(field.type, type) else str(field.type)
  annotation = raw.replace("typing.", "").replace(" ", "")
  annotation = annotation.removesuffix("|None").removeprefix("None|")
  if annotation.startswith("Optional[") and annotation.endswith("]"):
    annotation = annotation[len("Optional["):-1]
  if annotation in _OPTION_TYPES:
    return OptionSpec(_OPTION_TYPES[annotation])
  if annotation.lower().startswith("tuple[") and annotation.endswith("]"):
    element = annotation[len("tuple["):-1].split(",")[0]
    return OptionSpec(tuple, _OPTION_TYPES.get(element))
  raise TypeError(f"{owner}.{field.name}: option type {raw!r} cannot be set from the command "
                  "line (use int, float, str, bool or tuple[...]).")


def builder_option_specs(builder_cls: type) -> dict[str, OptionSpec]:
  """Option name -> spec of one builder (the non-tfds fields of its config dataclass)."""
  from medxai_jax.data.builders import common

  config_cls = type(builder_cls.BUILDER_CONFIGS[0])
  return {field.name: _option_spec(field, config_cls.__name__)
          for field in dataclasses.fields(config_cls) if field.name not in common._BASE_FIELDS}


def all_builder_option_specs() -> dict[str, OptionSpec]:
  """Option name -> spec, over every builder, the phantoms included (an int/float clash is a
  float). A name several builders share (image_size) means what the chosen builder says."""
  merged: dict[str, OptionSpec] = {}
  for name, cls in configurable_builder_classes().items():
    for option, spec in builder_option_specs(cls).items():
      known = merged.setdefault(option, spec)
      if known != spec:
        if {known.type, spec.type} == {int, float}:
          merged[option] = OptionSpec(float)
        else:
          raise TypeError(f"Builder option {option!r} is {spec} in {name} but {known} in "
                          "another builder; one option name needs one type.")
  return dict(sorted(merged.items()))


def options_by_builder() -> str:
  """Which builder has which options, for error messages: the ones every builder has, the ones
  every manual builder has, then each builder's own."""
  specs = {name: set(builder_option_specs(cls))
           for name, cls in configurable_builder_classes().items()}
  manual = [specs[name] for name in specs if name != PHANTOMS_NAME]
  shared = set.intersection(*specs.values()) if specs else set()
  manual_shared = (set.intersection(*manual) if manual else set()) - shared
  parts = [f"every builder: {', '.join(sorted(shared))}",
           f"every manual builder: {', '.join(sorted(manual_shared))}"]
  for name, options in specs.items():
    own = options - shared - (set() if name == PHANTOMS_NAME else manual_shared)
    parts.append(f"{name}: {', '.join(sorted(own))}")
  return "; ".join(parts)


def unknown_option_error(option: str) -> KeyError:
  """The error for an option no builder has; it lists every builder's options."""
  close = difflib.get_close_matches(option, list(all_builder_option_specs()), n=1)
  hint = f' Did you mean "{close[0]}"?' if close else ""
  return KeyError(f"--config.dataset.builder.{option}: no builder has an option {option!r}."
                  f"{hint} Options ({options_by_builder()}).")


class BuilderOptions(ml_collections.ConfigDict):
  """`config.dataset.builder`: a ConfigDict whose unknown fields, as the command-line parser
  looks them up, raise `unknown_option_error` (listing every builder's options)."""

  def get_type(self, key: str) -> Any:
    if key not in self:
      raise unknown_option_error(key)
    return super().get_type(key)


def builder_options_config() -> BuilderOptions:
  """`config.dataset.builder`: every option of every builder (the phantoms' and the manual
  builders'), None (= the chosen builder's default) until set, e.g.
  --config.dataset.builder.image_size=64 on the command line."""
  return BuilderOptions({
      option: ml_collections.config_dict.placeholder(spec.type)
      for option, spec in all_builder_option_specs().items()})


def _options_listing(specs: Mapping[str, OptionSpec]) -> str:
  """'image_size (int), classes (tuple of str), ...' for an error message."""
  return ", ".join(
      f"{name} ({spec.type.__name__}{' of ' + spec.element.__name__ if spec.element else ''})"
      for name, spec in specs.items())


def normalise_option(name: str, value: Any, spec: OptionSpec, builder_name: str) -> Any:
  """A user's option value in the builder config's type; tuples of str also accept 'a,b,c'
  elements, tuples of numbers '0.7,0.1,0.2'. Raises ValueError naming the option."""
  flag = f"--config.dataset.builder.{name}"

  def bad(what: str) -> ValueError:
    return ValueError(f"{builder_name}: {flag}={value!r}: {what}.")

  if spec.type is tuple:
    elements = [value] if isinstance(value, (str, int, float)) else list(value)
    if spec.element is not None and spec.element is not str:
      elements = [piece for element in elements for piece in (
          element.split(",") if isinstance(element, str) else [element])]
      try:
        return tuple(spec.element(element) for element in elements)
      except (TypeError, ValueError):
        raise bad(f"expected {spec.element.__name__} values separated by commas") from None
    pieces = [piece.strip() for element in elements for piece in str(element).split(",")]
    if not all(pieces):
      raise bad("expected non-empty names separated by commas, e.g. "
                f"{flag}=COVID,Normal")
    return tuple(pieces)
  if spec.type is bool:
    if not isinstance(value, (bool, np.bool_)):
      raise bad("expected True or False")
    return bool(value)
  if spec.type is int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise bad("expected an integer")
    return int(value)
  if spec.type is float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      raise bad("expected a number")
    return float(value)
  if not isinstance(value, str):
    raise bad("expected a string")
  return value


def chosen_options(dataset_config: Mapping[str, Any]) -> dict[str, Any]:
  """The options of `dataset_config.builder` that are set (not None)."""
  options = dataset_config.get("builder") or {}
  return {name: value for name, value in dict(options).items() if value is not None}


def builder_config_for(builder_cls: type, base: str, options: Mapping[str, Any]):
  """The named config `base` ('' = the builder's default) with `options` applied, validated and
  named `<base>-<hash of the changes>` (see `common.derive_config`).

  An option the builder does not have is a ValueError listing the builder's options.
  """
  from medxai_jax.data.builders import common

  values = checked_options(builder_cls, options)
  base = base or builder_cls.DEFAULT_BUILDER_CONFIG_NAME
  return common.config_by_name(builder_cls.BUILDER_CONFIGS, base, builder_cls.name, **values)


def checked_options(builder_cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
  """`options` in the types of `builder_cls`'s config; one it does not have is a ValueError
  listing the builder's options."""
  specs = builder_option_specs(builder_cls)
  foreign = sorted(set(options) - set(specs))
  if foreign:
    raise ValueError(
        f"Dataset {builder_cls.name!r} has no option(s) {foreign} (set as "
        f"--config.dataset.builder.<option>); its options are: {_options_listing(specs)}.")
  return {name: normalise_option(name, value, specs[name], builder_cls.name)
          for name, value in options.items()}


def phantom_options(dataset_config: Mapping[str, Any]) -> dict[str, Any]:
  """The phantom builder's options that `dataset_config.builder` sets, checked (manual_dir, a
  named config or another builder's option is a ValueError); unset ones keep its defaults."""
  from medxai_jax.data.builders import phantoms

  _check_phantoms_settings(dataset_config)
  return checked_options(phantoms.RadiographPhantoms, chosen_options(dataset_config))


def phantoms_builder_config(dataset_config: Mapping[str, Any]):
  """The phantoms' builder config for `dataset_config` (every setting, defaults included)."""
  from medxai_jax.data.builders import phantoms

  return phantoms.make_builder_config(**phantom_options(dataset_config))


def resolved_builder_config(dataset_config: Mapping[str, Any]):
  """The builder config `dataset_config` names (its named config with the options set), checked
  but neither prepared nor keyed by manual_dir's files: two dataset configs with the same
  resolved config (and name) prepare the same dataset from the same files."""
  name = dataset_config["name"]
  if name == PHANTOMS_NAME:
    return phantoms_builder_config(dataset_config)
  builders = manual_builder_classes()
  if name not in builders:
    raise ValueError(f"Unknown dataset config.dataset.name={name!r}; registered datasets: "
                     f"{dataset_names()}.")
  return builder_config_for(builders[name], dataset_config.get("builder_config") or "",
                            chosen_options(dataset_config))


def _check_phantoms_settings(dataset_config: Mapping[str, Any]) -> None:
  """The phantoms are generated: manual_dir and named configs other than 'default' are errors."""
  if dataset_config.get("manual_dir"):
    raise ValueError(
        f"config.dataset.manual_dir={dataset_config['manual_dir']!r} is set but config.dataset."
        f"name is {PHANTOMS_NAME!r} (synthetic phantoms, which read no folder): set "
        "--config.dataset.name to the builder of your collection, one of "
        f"{list(manual_builder_classes())}.")
  if dataset_config.get("builder_config") not in (None, "", "default"):
    raise ValueError(
        f"config.dataset.builder_config={dataset_config['builder_config']!r}: the phantoms have "
        "one config, 'default'; set their options as --config.dataset.builder.<option> (e.g. "
        "--config.dataset.builder.image_size=64 --config.dataset.builder.num_train=256).")


def resolve_manual_dir(manual_dir: str, data_dir: str) -> str:
  """`manual_dir`, else tfds' default `<data_dir>/downloads/manual` (absolute)."""
  chosen = manual_dir or os.path.join(data_dir, "downloads", "manual")
  return os.path.abspath(os.path.expanduser(chosen))


class FolderFingerprint(NamedTuple):
  """The file list of a folder: a SHA-1 of relative names, sizes and mtimes, and counts."""

  digest: str
  num_files: int
  num_bytes: int


def _walk_files(root: str, exclude: frozenset[str]) -> Iterator[tuple[str, int, int]]:
  """(path relative to root, size, mtime in ns) of every non-hidden file under root, with one
  os.scandir walk (symbolic links followed, each directory visited once)."""
  seen: set[tuple[int, int]] = set()
  pending = [root]
  while pending:
    folder = pending.pop()
    info = os.stat(folder)
    if (info.st_dev, info.st_ino) in seen or folder in exclude:
      continue
    seen.add((info.st_dev, info.st_ino))
    with os.scandir(folder) as entries:
      for entry in entries:
        if entry.name.startswith("."):
          continue
        if entry.is_dir():
          pending.append(entry.path)
        elif entry.is_file():
          stat = entry.stat()
          yield os.path.relpath(entry.path, root), stat.st_size, stat.st_mtime_ns


def folder_fingerprint(folder: str, exclude: Sequence[str] = ()) -> FolderFingerprint:
  """Fingerprint of the non-hidden files under `folder` (relative names, sizes, mtimes): it
  changes when a file is added, removed, renamed, resized or rewritten. `exclude`: absolute
  folders left out (e.g. a TFDS data dir inside `folder`)."""
  files = sorted(_walk_files(folder, frozenset(os.path.abspath(path) for path in exclude)))
  digest = hashlib.sha1()
  for relative, size, mtime in files:
    digest.update(f"{relative}\0{size}\0{mtime}\n".encode())
  return FolderFingerprint(digest.hexdigest(), len(files), sum(size for _, size, _ in files))


def check_manual_dir(manual_dir: str, builder_cls: type, given: bool) -> None:
  """Raises FileNotFoundError, naming the folder and repeating the builder's download
  instructions, if `manual_dir` is missing or holds no (non-hidden) file."""
  if os.path.isdir(manual_dir) and any(True for _ in _walk_files(manual_dir, frozenset())):
    return
  state = "does not exist" if not os.path.exists(manual_dir) else (
      "is not a folder" if not os.path.isdir(manual_dir) else "holds no file")
  where = (f"config.dataset.manual_dir={manual_dir!r}" if given else
           f"The default manual folder {manual_dir!r} (config.dataset.manual_dir is not set; "
           "set it with --config.dataset.manual_dir=DIR)")
  raise FileNotFoundError(
      f"{builder_cls.name}: {where} {state}. Download the dataset there first.\n"
      f"Download instructions:\n{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def keyed_by_files(config, fingerprint: FolderFingerprint, manual_dir: str):
  """`config` renamed `<name>-files<digest>`: a prepared directory per content of manual_dir."""
  return dataclasses.replace(
      config, name=f"{config.name}-files{fingerprint.digest[:10]}",
      description=f"{config.description} Prepared from {manual_dir} ({fingerprint.num_files} "
      f"files, {fingerprint.num_bytes} bytes, file-list SHA-1 {fingerprint.digest}).")


def _log_preparation(builder, options_name: str, fingerprint: FolderFingerprint,
                     manual_dir: str) -> None:
  """Logs which prepared directory is used and which older ones (same options, earlier content
  of manual_dir) are kept."""
  from absl import logging

  target = os.fspath(builder.data_dir)
  dataset_root = os.path.dirname(os.path.dirname(target))
  pattern = os.path.join(dataset_root, f"{options_name}-files*")
  older = sorted(path for path in glob.glob(pattern)
                 if os.path.abspath(path) != os.path.dirname(target))
  state = "reusing" if os.path.isdir(target) else "preparing"
  logging.info("%s: %s %s from manual_dir %s (%d files, %d bytes).", builder.name, state, target,
               manual_dir, fingerprint.num_files, fingerprint.num_bytes)
  if older:
    logging.warning("%s: using %s, prepared from the files manual_dir %s holds now; other "
                    "preparations of these options, from other contents of manual_dir, are kept "
                    "(delete them by hand if unwanted): %s", builder.name, target, manual_dir,
                    older)


def load_builder(dataset_config: Mapping[str, Any]):
  """Prepares (offline) and returns the TFDS builder that `dataset_config` names.

  The phantoms: generated with the options of `dataset_config.builder` that are set (the phantom
  builder's defaults for the rest), into a directory named after the non-default ones.
  A manual builder: `builder_config` (a named config, '' = the default) with the options of
  `dataset_config.builder` that are set; the prepared directory is keyed by those options and by
  the file list of manual_dir, so a changed folder is prepared again (into a new directory).
  """
  import tensorflow_datasets as tfds  # heavy import, kept local

  name = dataset_config["name"]
  data_dir = default_data_dir(dataset_config.get("data_dir"))
  if name == PHANTOMS_NAME:
    from medxai_jax.data.builders import phantoms

    return phantoms.load_phantoms_builder(data_dir, **phantom_options(dataset_config))
  config = resolved_builder_config(dataset_config)
  builder_cls = manual_builder_classes()[name]
  given = bool(dataset_config.get("manual_dir"))
  manual_dir = resolve_manual_dir(dataset_config.get("manual_dir") or "", data_dir)
  check_manual_dir(manual_dir, builder_cls, given)
  fingerprint = folder_fingerprint(manual_dir, exclude=[data_dir])
  builder = builder_cls(config=keyed_by_files(config, fingerprint, manual_dir),
                        data_dir=data_dir, file_format="array_record")
  _log_preparation(builder, config.name, fingerprint, manual_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _array_decoders(features) -> dict[str, Any]:
  """TFDS decoders that leave the image and array features (masks) undecoded."""
  import tensorflow_datasets as tfds  # heavy import, kept local

  return {key: tfds.decode.SkipDecoding() for key, feature in features.items()
          if isinstance(feature, tfds.features.Image)
          or (isinstance(feature, tfds.features.Tensor) and len(feature.shape) > 0)}


def load_sources(dataset_config: Mapping[str, Any], splits: Sequence[str], *,
                 skip_arrays: bool = False) -> dict[str, RandomAccessSource]:
  """Random-access sources for `splits` of the configured dataset, filtered and label-shuffled.

  `dataset_config.filter` (e.g. 'body_part=XR_WRIST,XR_HAND') keeps only the matching records of
  every split; `dataset_config.shuffle_labels` replaces the training split's labels with a fixed
  permutation of them (seed `shuffle_labels_seed`), for Adebayo et al.'s data-randomisation test.
  `skip_arrays`: images and masks are left undecoded (bytes), to read the scalar features fast.
  """
  builder = load_builder(dataset_config)
  available = list(builder.info.splits.keys())
  missing = [split for split in splits if split not in available]
  if missing:
    raise missing_split_error(builder, missing, dataset_config.get("label_key", "label"))
  decoders = _array_decoders(builder.info.features) if skip_arrays else None
  sources = {split: builder.as_data_source(split=split, decoders=decoders) for split in splits}
  conditions = parse_filter(dataset_config.get("filter") or "")
  if conditions:
    features = getattr(builder.info, "features", None)
    conditions = resolve_filter_values(conditions, features)
    sources = {split: filter_source(source, conditions, name=f"split {split!r}")
               for split, source in sources.items()}
  train_split = dataset_config.get("train_split", "train")
  if dataset_config.get("shuffle_labels") and train_split in sources:
    sources[train_split] = LabelShuffledSource(
        sources[train_split], label_key=dataset_config.get("label_key", "label"),
        seed=int(dataset_config.get("shuffle_labels_seed", 0)))
  return sources


_SPLIT_OPTIONS = ("split_fractions", "validation_fraction", "test_fold")


def prepared_class_counts(builder, label_key: str = "label") -> dict[str, dict[str, int]]:
  """Split -> class name -> records, of a prepared builder (images are not decoded)."""
  import tensorflow_datasets as tfds  # heavy import, kept local

  features = builder.info.features
  names = list(getattr(features[label_key], "names", None) or [])
  skip = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
          if key != label_key and isinstance(feature, (tfds.features.Image, tfds.features.Tensor))}
  counts = {}
  for split in builder.info.splits:
    labels = read_feature(builder.as_data_source(split=split, decoders=skip), label_key)
    values, number = np.unique(labels, return_counts=True)
    counts[split] = {(names[int(value)] if names else str(value)): int(n)
                     for value, n in zip(values, number)}
  return counts


def split_provenance(dataset_config: Mapping[str, Any]) -> dict[str, str]:
  """Where each split's images come from, as the builder recorded it when it prepared the data
  (`builders.common.record_split_provenance`); {} for a builder (or an older preparation) that
  records none."""
  metadata = getattr(load_builder(dataset_config).info, "metadata", None) or {}
  return dict(metadata.get("split_provenance") or {})


def split_labels(dataset_config: Mapping[str, Any], split: str) -> np.ndarray:
  """The label (`dataset_config.label_key`) of every record of a split, in the order of
  `load_sources`' source, without decoding the images."""
  source = load_sources(dataset_config, [split], skip_arrays=True)[split]
  return read_feature(source, dataset_config.get("label_key", "label")).astype(np.int64)


def missing_split_error(builder, missing: Sequence[str], label_key: str = "label") -> ValueError:
  """The error for requested splits a prepared dataset lacks (they came out empty): it names
  them, the images per class of every split, the split options and how to set them."""
  config = builder.builder_config
  options = {name: getattr(config, name) for name in _SPLIT_OPTIONS if hasattr(config, name)}
  try:
    per_split = prepared_class_counts(builder, label_key)
  except (KeyError, ValueError, TypeError):
    per_split = {split: {"(all)": info.num_examples} for split, info in builder.info.splits.items()}
  settings = " ".join(f"--config.dataset.builder.{name}=..." for name in options) or (
      "--config.dataset.builder.<option>")
  return ValueError(
      f"Dataset {builder.name!r} ({builder.data_dir}) has no split(s) {list(missing)}: they came "
      f"out empty. Images per class of the splits it has: {per_split}; split options "
      f"{options}. Add images, or change the split with {settings}.")


class SubsetSource:
  """The rows `indices` of a random-access source, renumbered 0..len(indices)-1."""

  def __init__(self, source: RandomAccessSource, indices: Sequence[int]):
    self._source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return self._source.__getitems__([int(self.indices[i]) for i in indices])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]


class LabelShuffledSource:
  """A source whose `label_key` values are a fixed random permutation of the original labels.

  The label distribution is unchanged; the link between image and label is destroyed (Adebayo
  et al. 2018's data-randomisation test trains a model on such a split).
  """

  def __init__(self, source: RandomAccessSource, *, label_key: str = "label", seed: int = 0):
    self.original_source = source
    self._label_key = label_key
    self.original_labels = read_feature(source, label_key)
    permutation = np.random.default_rng([seed, 0x5EED]).permutation(len(self.original_labels))
    self.labels = self.original_labels[permutation]

  def __len__(self) -> int:
    return len(self.original_source)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    records = self.original_source.__getitems__(indices)
    return [dict(record, **{self._label_key: self.labels[int(i)]})
            for record, i in zip(records, indices)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]


def read_features(source: RandomAccessSource, keys: Sequence[str], chunk: int = 1024
                  ) -> dict[str, np.ndarray]:
  """Scalar features `keys` of every record of a source, as arrays [N], in one pass."""
  values = {key: [] for key in keys}
  for start in range(0, len(source), chunk):
    records = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    missing = [key for key in keys if records and key not in records[0]]
    if missing:
      raise KeyError(f"Records have no feature(s) {missing}; they have {sorted(records[0])}.")
    for key in keys:
      values[key].extend(np.asarray(record[key]) for record in records)
  return {key: np.asarray(column) for key, column in values.items()}


def read_feature(source: RandomAccessSource, key: str) -> np.ndarray:
  """One scalar feature of every record of a source, as an array [N]."""
  return read_features(source, [key])[key]


def parse_filter(spec: str) -> dict[str, tuple[str, ...]]:
  """'feature=a,b;other=c' -> {'feature': ('a', 'b'), 'other': ('c',)} (records must match all)."""
  conditions = {}
  for clause in filter(None, (part.strip() for part in spec.split(";"))):
    feature, sep, values = clause.partition("=")
    allowed = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not feature.strip() or not allowed:
      raise ValueError(f"config.dataset.filter clause {clause!r} is not 'feature=value[,value]'"
                       f" (full filter: {spec!r}).")
    conditions[feature.strip()] = allowed
  return conditions


def resolve_filter_values(conditions: Mapping[str, Sequence[str]], features: Any = None
                          ) -> dict[str, frozenset]:
  """Filter values as the stored values: class names of a ClassLabel feature become its ints."""
  resolved = {}
  for feature, values in conditions.items():
    spec = features[feature] if features is not None and feature in features else None
    names = list(getattr(spec, "names", None) or [])
    allowed = set()
    for value in values:
      if value in names:
        allowed.add(names.index(value))
      elif value.lstrip("-").isdigit():
        allowed.add(int(value))
      elif names:
        raise ValueError(f"config.dataset.filter: {value!r} is not a class of feature "
                         f"{feature!r}; its classes are {names}.")
      else:
        allowed.add(value)
    resolved[feature] = frozenset(allowed)
  return resolved


def _matches(value: Any, allowed: frozenset) -> bool:
  value = np.asarray(value)
  if value.dtype.kind in "SO":
    value = value.item()
    value = value.decode() if isinstance(value, bytes) else value
    return value in allowed
  return value.item() in allowed


def filter_source(source: RandomAccessSource, conditions: Mapping[str, frozenset], *,
                  name: str = "source") -> SubsetSource:
  """The records of `source` whose features take one of the allowed values for every condition."""
  keep = np.ones(len(source), bool)
  columns = read_features(source, list(conditions))
  for feature, allowed in conditions.items():
    keep &= np.asarray([_matches(value, allowed) for value in columns[feature]], bool)
  if not keep.any():
    raise ValueError(f"config.dataset.filter {dict(conditions)} keeps no record of {name} "
                     f"({len(source)} records).")
  return SubsetSource(source, np.flatnonzero(keep))


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """Example order for one epoch; depends only on (seed, epoch) so resumed runs match."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _stack(records: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Stacks the chosen features of decoded records into batch arrays."""
  return {key: np.stack([np.asarray(record[key]) for record in records]) for key in keys}


class BatchReader:
  """Batch `index` of an epoch: the rows `order[index * batch_size:][:batch_size]` of `source`
  (a short tail padded with copies of its last row), 'label' and a 'weight' column (0 = padding).

  A picklable callable, so grain worker processes can decode batches.
  """

  def __init__(self, source: RandomAccessSource, order: np.ndarray, *, batch_size: int,
               feature_keys: Sequence[str], label_key: str):
    self.source = source
    self.order = np.asarray(order, np.int64)
    self.batch_size = batch_size
    self.feature_keys = list(feature_keys)
    self.label_key = label_key

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    indices = self.order[index * self.batch_size:(index + 1) * self.batch_size]
    real = len(indices)
    if real == 0:
      raise IndexError(f"Batch {index} is past the end of the epoch ({len(self.order)} rows, "
                       f"batch_size {self.batch_size}).")
    if real < self.batch_size:
      indices = np.concatenate([indices, np.full(self.batch_size - real, indices[-1])])
    batch = _stack(self.source.__getitems__([int(i) for i in indices]), self.feature_keys)
    batch["label"] = batch.pop(self.label_key).astype(np.int32)
    batch["weight"] = (np.arange(self.batch_size) < real).astype(np.float32)
    return batch


def batch_dataset(source: RandomAccessSource, *, batch_size: int, keys: Sequence[str] = (
    "image", "label"), label_key: str = "label", seed: int = 0, epoch: int = 0,
                  shuffle: bool = False, drop_remainder: bool = False):
  """One epoch of batches as a random-access `grain.MapDataset` (element i = batch i).

  Rows come in `epoch_order(seed, epoch)`; each batch holds `keys` plus 'label' (the
  `label_key` feature, int32) and 'weight' (float32, 0 marks the padding rows of the last batch,
  which repeat its last real row). Every batch has exactly `batch_size` rows, so a jitted step
  compiles once; `drop_remainder` leaves out a short last batch instead.
  """
  import grain  # kept local: only iteration needs it

  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  order = epoch_order(len(source), seed=seed, epoch=epoch, shuffle=shuffle)
  reader = BatchReader(source, order, batch_size=batch_size,
                       feature_keys=list(dict.fromkeys([*keys, label_key])), label_key=label_key)
  return grain.MapDataset.range(num_batches(len(order), batch_size, drop_remainder)).map(reader)


def _parse_grain_flags() -> None:
  """Marks absl flags parsed (at their defaults) if no absl binary parsed them: grain 0.2.18's
  worker processes read one of its flags and fail otherwise (google/grain#1355)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batch_iterator(dataset, *, workers: int = 0, prefetch: int = 2):
  """A checkpointable grain iterator over `dataset` (`get_state()` / `set_state()`).

  `workers` > 0 decodes in that many worker processes (each `prefetch` batches ahead); 0 decodes
  in this process, in one background thread `prefetch` batches ahead (0: no thread, no
  read-ahead). The batches and their order do not depend on `workers` or `prefetch`.
  """
  import grain  # kept local: only iteration needs it

  if workers < 0 or prefetch < 0:
    raise ValueError(f"config.input.workers={workers} and config.input.prefetch={prefetch} "
                     "must be >= 0.")
  threads = 1 if prefetch else 0
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                       prefetch_buffer_size=prefetch))
  if workers:
    _parse_grain_flags()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  return iter(iterable)


class BatchStream:
  """The batches of a `batch_dataset` from batch `start`, with a JSON-able `state()` that
  `resume` continues from at the same batch (grain's iterator state, the worker count, where the
  stream started and the next batch's index)."""

  def __init__(self, dataset, *, workers: int = 0, prefetch: int = 2, start: int = 0,
               iterator_state: Mapping[str, Any] | None = None):
    self.workers, self.start, self.next_index = workers, start, start
    self._final_state: dict[str, Any] | None = None
    self._iterator = batch_iterator(dataset[start:], workers=workers, prefetch=prefetch)
    if iterator_state is not None:
      self._iterator.set_state(dict(iterator_state))

  @classmethod
  def resume(cls, dataset, state: Mapping[str, Any] | None, next_index: int, *, workers: int = 0,
             prefetch: int = 2, where: str = "the checkpoint") -> "BatchStream":
    """The stream that continues at batch `next_index`: from grain's saved iterator `state`
    when it was saved with `workers` workers (and agrees with `next_index`), else a fresh
    iterator from that batch (grain's state does not carry over to another worker count)."""
    if state is None or int(state["workers"]) != workers:
      return cls(dataset, workers=workers, prefetch=prefetch, start=next_index)
    if int(state["next"]) != next_index:
      raise ValueError(f"{where}: the input iterator state is at batch {state['next']} but the "
                       f"training position at batch {next_index}; the checkpoint is inconsistent.")
    stream = cls(dataset, workers=workers, prefetch=prefetch, start=int(state["start"]),
                 iterator_state=state["iterator"])
    stream.next_index = next_index
    return stream

  def __iter__(self) -> "BatchStream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      raise StopIteration
    batch = next(self._iterator, None)
    if batch is None:  # closed outside an except block, whose traceback holds the iterator
      self.close()
      raise StopIteration
    if self.workers:  # own copies: grain's shared-memory arrays are freed at once, not at exit
      batch = {key: np.array(value) for key, value in batch.items()}
    self.next_index += 1
    return batch

  def state(self) -> dict[str, Any]:
    """What `resume` needs to continue after the batches returned so far (JSON-serialisable)."""
    iterator_state = (self._final_state if self._iterator is None
                      else self._iterator.get_state())
    return {"workers": self.workers, "start": self.start, "next": self.next_index,
            "iterator": iterator_state}

  def close(self) -> None:
    """Stops the worker processes and threads (done at the end of the stream too)."""
    iterator, self._iterator = self._iterator, None
    if iterator is None:
      return
    self._final_state = iterator.get_state()
    iterator.close()
    if self.workers:
      # grain's multiprocessing queues and events are left in reference cycles; their
      # finalisers import multiprocessing.resource_tracker, which fails when a later garbage
      # collection runs inside tfds' lazy-import context. Collect them now, outside it.
      del iterator
      gc.collect()


def iterate_batches(source: RandomAccessSource, *, batch_size: int, keys: Sequence[str] = (
    "image", "label"), label_key: str = "label", seed: int = 0, epoch: int = 0,
                    shuffle: bool = False, drop_remainder: bool = False, workers: int = 0,
                    prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Yields batches of `keys` plus 'label' and 'weight' (0 marks padding in the last batch).

  Every batch has exactly `batch_size` rows, so a jitted step compiles once. `workers` and
  `prefetch`: see `batch_iterator`; see `batch_dataset` for the rest.
  """
  return BatchStream(batch_dataset(source, batch_size=batch_size, keys=keys,
                                   label_key=label_key, seed=seed, epoch=epoch, shuffle=shuffle,
                                   drop_remainder=drop_remainder),
                     workers=workers, prefetch=prefetch)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches `iterate_batches` yields."""
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs any `iterator` in a background thread, `size` items ahead (decoding overlaps compute);
  batches of a source come from `iterate_batches` / `BatchStream`, which read ahead already."""
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce() -> None:
    try:
      for item in iterator:
        buffer.put(item)
    except BaseException as error:  # re-raised in the consumer
      buffer.put(error)
      return
    buffer.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = buffer.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


def label_counts(source: RandomAccessSource, label_key: str, num_classes: int) -> np.ndarray:
  """Examples per class in a source."""
  labels = read_feature(source, label_key).astype(np.int64)
  return np.bincount(labels, minlength=num_classes)[:num_classes]
