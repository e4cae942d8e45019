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
  """Random-access sources for `splits` of the configured dataset."""
  builder = load_builder(dataset_config)
  available = list(builder.info.splits.keys())
  missing = [split for split in splits if split not in available]
  if missing:
    raise ValueError(f"Dataset {dataset_config['name']!r} has no split(s) {missing}; it has "
                     f"{available}.")
  return {split: builder.as_data_source(split=split) for split in splits}


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


def label_counts(source: RandomAccessSource, label_key: str, num_classes: int,
                 chunk: int = 1024) -> np.ndarray:
  """Examples per class in a source."""
  counts = np.zeros(num_classes, np.int64)
  for start in range(0, len(source), chunk):
    records = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    labels = np.asarray([record[label_key] for record in records])
    counts += np.bincount(labels, minlength=num_classes)[:num_classes]
  return counts
