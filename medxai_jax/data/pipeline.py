"""From TFDS builders to fixed-shape numpy batches (random access, seeded order, padded tails)."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np


class RandomAccessSource(Protocol):
  """What `builder.as_data_source(split)` returns: indexable records of numpy features."""

  def __len__(self) -> int: ...

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


def default_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (absolute)."""
  chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(chosen))


def load_builder(dataset_config: Mapping[str, Any]):
  """Prepares (offline) and returns the TFDS builder that `dataset_config` names."""
  import tensorflow_datasets as tfds  # heavy import, kept local

  import medxai_jax.data.builders  # noqa: F401  (registers mura, tb_cxr, ... with tfds)

  name = dataset_config["name"]
  data_dir = default_data_dir(dataset_config.get("data_dir"))
  if name == "radiograph_phantoms":
    from medxai_jax.data.builders import phantoms

    return phantoms.load_phantoms_builder(data_dir, **dict(dataset_config.get("phantoms", {})))
  manual_dir = dataset_config.get("manual_dir") or None
  if manual_dir and not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f"config.dataset.manual_dir={manual_dir!r} does not exist; download the dataset there "
        "first (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record",
                         config=dataset_config.get("builder_config") or None)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_sources(dataset_config: Mapping[str, Any], splits: Sequence[str]
                 ) -> dict[str, RandomAccessSource]:
  """Random-access sources for `splits` of the configured dataset, filtered and label-shuffled.

  `dataset_config.filter` (e.g. 'body_part=XR_WRIST,XR_HAND') keeps only the matching records of
  every split; `dataset_config.shuffle_labels` replaces the training split's labels with a fixed
  permutation of them (seed `shuffle_labels_seed`), for Adebayo et al.'s data-randomisation test.
  """
  builder = load_builder(dataset_config)
  available = list(builder.info.splits.keys())
  missing = [split for split in splits if split not in available]
  if missing:
    raise ValueError(f"Dataset {dataset_config['name']!r} has no split(s) {missing}; it has "
                     f"{available}.")
  sources = {split: builder.as_data_source(split=split) for split in splits}
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


def iterate_batches(source: RandomAccessSource, *, batch_size: int, keys: Sequence[str] = (
    "image", "label"), label_key: str = "label", seed: int = 0, epoch: int = 0,
                    shuffle: bool = False, drop_remainder: bool = False,
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Yields batches of `keys` plus 'label' and 'weight' (0 marks padding in the last batch).

  Every batch has exactly `batch_size` rows, so a jitted step compiles once.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  order = epoch_order(len(source), seed=seed, epoch=epoch, shuffle=shuffle)
  feature_keys = list(dict.fromkeys([*keys, label_key]))
  for start in range(0, len(order), batch_size):
    indices = order[start:start + batch_size]
    real = len(indices)
    if real < batch_size:
      if drop_remainder:
        return
      indices = np.concatenate([indices, np.full(batch_size - real, indices[-1])])
    batch = _stack(source.__getitems__([int(i) for i in indices]), feature_keys)
    batch["label"] = batch.pop(label_key).astype(np.int32)
    batch["weight"] = (np.arange(batch_size) < real).astype(np.float32)
    yield batch


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches `iterate_batches` yields."""
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `size` items ahead (decoding overlaps compute)."""
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
