"""The grain input pipeline (data/pipeline.py): batches, worker processes, resumable state."""

from __future__ import annotations

import gc
import json
import sys
from typing import Any, Sequence

from etils import epy
import numpy as np
import pytest

from medxai_jax.data import pipeline

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
