"""Explaining a whole split into a sharded map store: 4 devices and 2 processes x 2 devices write
the maps one device writes, a killed run resumes at its missing shards, and the reader is lazy.

The reference is independent of the streaming code: `explain.run_methods` on all images in one
batch (the deterministic methods must match it; SmoothGrad draws per shard, so its shard 1 is
computed by hand with the documented key, and the device counts are compared with each other). JAX fixes its device count at start, so the multi-device runs are
this file run as a script in subprocesses (XLA_FLAGS=--xla_force_host_platform_device_count=N;
the 2-process run joined by jax.distributed on a free localhost port), as
tests/train/test_parallel.py does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import subprocess_env
import tiny

REPO = subprocess_env.REPO
HOST_METHOD = "host_scaled"  # registered by the tests: a numpy method, run on the host
NUM_IMAGES = 20  # shards of 8, 8 and 4 (a padded tail)
BATCH_SIZE = 8
METHODS = ("gradients", "grad_cam", "smoothgrad", HOST_METHOD)
OVERRIDES = {"num_samples": 3, "chunk_size": 3}


class ArraySource:
  """A random-access source over in-memory records (what `as_data_source` gives)."""

  def __init__(self, examples: dict[str, np.ndarray]):
    self._examples = examples
    self.decoded = 0  # records read so far

  def __len__(self) -> int:
    return len(self._examples["label"])

  def __getitems__(self, indices):
    self.decoded += len(indices)
    return [{key: value[i] for key, value in self._examples.items()} for i in indices]


def tiny_model():
  """conv 3x3 (4) -> ReLU -> conv 3x3 stride 2 (8) -> ReLU (tap 'conv') -> GAP -> dense: a
  GAP + dense head, so CAM applies too."""
  import flax.linen as nn

  from medxai_jax.models import base

  class GapCnn(nn.Module):
    def setup(self) -> None:
      self.stem = nn.Conv(4, (3, 3))
      self.conv = nn.Conv(8, (3, 3), strides=2)
      self.output = nn.Dense(1)

    def features(self, x, tap: str = "conv", train: bool = False):
      del tap, train
      return base.perturb_tap(self, "conv", nn.relu(self.conv(nn.relu(self.stem(x)))))

    def head(self, feature_map, train: bool = False):
      del train
      return self.output(feature_map.mean(axis=(1, 2)))

    def __call__(self, x, train: bool = False):
      return self.head(self.features(x))

  return base.Classifier(GapCnn(), taps=("conv",),
                         aliases={"stem": "conv", "last_conv": "conv", "embedding": "conv"},
                         input_shape=(32, 32, 1), num_outputs=1)


def host_scaled(logits_fn, images, targets):
  """Each image times (its target + 1), in numpy: fails under jit, so it runs only as a host
  method (as XRAI's segmentation does); its rows show whose image and target each map is."""
  del logits_fn
  return np.asarray(images) * (np.asarray(targets) + 1.0)[:, None, None, None]


@contextlib.contextmanager
def host_method_registered():
  """`HOST_METHOD` in the registry (a host method, like XRAI and CRM) while the block runs."""
  from medxai_jax.attribution import registry

  registry.register(registry.MethodSpec(HOST_METHOD, "Scaled images", host_scaled, "logits",
                                        True, 4))
  try:
    yield
  finally:
    del registry.REGISTRY[HOST_METHOD]


def random_variables(model, scale: float = 0.5):
  """Normal weights drawn in numpy for the model's variable shapes (no XLA compilation)."""
  import jax

  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda leaf: (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
      jax.eval_shape(model.init, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def tiny_setup():
  """The tiny model, randomly initialised, and 20 phantoms of 32 px."""
  import jax

  from medxai_jax.data import phantoms
  from medxai_jax.data import preprocess as preprocess_lib

  model = tiny_model()
  variables = random_variables(model)
  examples = phantoms.generate_phantoms(NUM_IMAGES, seed=1,
                                        config=phantoms.PhantomConfig(image_size=32))
  source = ArraySource({"image": examples["image"], "label": examples["label"].astype(np.int64)})
  preprocess = preprocess_lib.make_preprocess_fn((32, 32, 1), (0.5,), (0.25,))
  return model, variables, preprocess, source


def assert_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
  """Equal up to float32 summation order, relative to the maps' scale."""
  scale = float(np.abs(expected).max())
  assert scale > 1e-6, f"{name}: maps are all ~0; the comparison would be empty"
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def explain_into(store: str, batch_size: int = BATCH_SIZE, **kwargs) -> dict[str, Any]:
  import jax

  from medxai_jax import explain_dataset

  model, variables, preprocess, source = tiny_setup()
  return explain_dataset.explain_source(
      model, variables, preprocess, source, store, methods=list(METHODS), key=jax.random.key(3),
      split="test", batch_size=batch_size, overrides=OVERRIDES, settings={"run": "tiny"},
      **kwargs)


def _worker_main(argv: list[str]) -> None:
  """Subprocess entry: `test_explain_dataset.py STORE [ADDRESS PROCESSES PROCESS_ID]`."""
  store = argv[0]
  if len(argv) > 1:
    from medxai_jax.train import parallel

    assert parallel.initialize_distributed(argv[1], int(argv[2]), int(argv[3]))
  import jax

  with host_method_registered():
    result = explain_into(store)
    try:  # a shard size the devices cannot share
      explain_into(store + "_bad", batch_size=6)
      error = None
    except ValueError as raised:
      error = str(raised)
  print(json.dumps({"result": result, "process_index": jax.process_index(),
                    "devices": jax.device_count(), "decoded": tiny_setup()[3].decoded,
                    "bad_batch_error": error, "bad_store_created": os.path.exists(store + "_bad")},
                   default=str))


def _spawn(devices: int, *args: str) -> subprocess.Popen:
  return subprocess_env.spawn(__file__, devices, *args)


_wait = subprocess_env.wait_json
_free_port = subprocess_env.free_port


def _all_maps(store: str) -> dict[str, np.ndarray]:
  from medxai_jax import map_store

  opened = map_store.open_map_store(store)
  assert opened.complete(), opened.missing()
  return {name: np.concatenate(list(opened[name])) for name in opened.methods}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The 1-device store (this process), and the 4-device and 2x2 runs started meanwhile."""
  import jax

  assert jax.device_count() == 1
  root = tmp_path_factory.mktemp("explain_dataset")
  four = _spawn(4, str(root / "four"))
  address = f"localhost:{_free_port()}"
  hosts = [_spawn(2, str(root / "hosts"), address, "2", str(i)) for i in range(2)]
  try:
    with host_method_registered():
      result = explain_into(str(root / "one"))
      yield {"root": root, "result": result, "four": four, "hosts": hosts}
  finally:
    for process in (four, *hosts):
      if process.poll() is None:
        process.kill()
        process.wait()


def test_the_store_holds_the_maps_of_one_batch_of_every_image(one_device):
  from medxai_jax import explain
  from medxai_jax import map_store

  store = str(one_device["root"] / "one")
  opened = map_store.open_map_store(store)
  np.testing.assert_array_equal(opened.indices, np.arange(NUM_IMAGES))
  assert [len(s["indices"]) for s in opened.index["shards"]] == [8, 8, 4]
  assert opened.methods == list(METHODS) and not opened.skipped
  model, variables, preprocess, source = tiny_setup()
  batch = source.__getitems__(range(NUM_IMAGES))
  import jax
  import jax.numpy as jnp

  images = jax.jit(preprocess)(jnp.asarray(np.stack([r["image"] for r in batch])))
  targets = jnp.asarray([int(r["label"]) for r in batch], jnp.int32)
  deterministic = ["gradients", "grad_cam"]
  reference, _ = explain.run_methods(model, variables, images, targets, deterministic,
                                     jax.random.key(0))
  maps = _all_maps(store)
  for name in deterministic:
    assert maps[name].shape == reference[name].shape
    assert_close(maps[name], reference[name], name)
  # SmoothGrad's shard s draws from fold_in(fold_in(key, 2), s): shard 1 by hand.
  options = explain.method_options(["smoothgrad"], OVERRIDES)["smoothgrad"]
  shard_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 2), 1)
  by_hand = jax.jit(lambda x, t: explain.method_maps(model, variables, x, t, "smoothgrad",
                                                    shard_key, options))(images[8:16],
                                                                         targets[8:16])
  assert_close(maps["smoothgrad"][8:16], np.asarray(by_hand), "smoothgrad")
  assert not np.allclose(maps["smoothgrad"], maps["gradients"], rtol=0.01)
  assert_close(maps[HOST_METHOD], np.asarray(images) * (np.asarray(targets) + 1.0)[:, None, None,
                                                                                  None],
               HOST_METHOD)
  info = one_device["result"]["methods"]
  assert info["gradients"]["shards_computed"] == info["gradients"]["shards_written"] == [0, 1, 2]
  assert info["gradients"]["compile_seconds"] is not None
  assert info[HOST_METHOD]["host"] and info[HOST_METHOD]["compile_seconds"] is None


def test_four_devices_write_the_maps_of_one_device(one_device):
  (output,) = _wait([one_device["four"]])
  assert output["devices"] == 4 and output["result"]["num_devices"] == 4
  assert "--batch_size=6 is not divisible by the 4 devices" in output["bad_batch_error"]
  assert not output["bad_store_created"]  # refused before anything is written
  four, one = _all_maps(str(one_device["root"] / "four")), _all_maps(str(one_device["root"] /
                                                                         "one"))
  assert sorted(four) == sorted(one)
  for name in one:
    assert_close(four[name], one[name], name)


def test_two_processes_of_two_devices_write_the_maps_of_one_device(one_device):
  outputs = _wait(one_device["hosts"])
  assert sorted(o["process_index"] for o in outputs) == [0, 1]
  assert all(o["devices"] == 4 and o["result"]["num_processes"] == 2 for o in outputs)
  store = str(one_device["root"] / "hosts")
  # Each process read only its rows of every shard (4 of 8; the tail's padding included) and
  # one sample record, and wrote its share of the shard files (shard s by process s % 2).
  for output in sorted(outputs, key=lambda o: o["process_index"]):
    assert output["decoded"] == 3 * 4 + 1
    written = [[0, 2], [1]][output["process_index"]]
    assert all(info["shards_written"] == written for info in output["result"]["methods"].values())
  hosts, one = _all_maps(store), _all_maps(str(one_device["root"] / "one"))
  for name in one:
    assert_close(hosts[name], one[name], name)


def test_a_killed_run_resumes_at_the_shards_it_has_not_written(one_device, tmp_path):
  from medxai_jax import map_store

  store = str(tmp_path / "store")
  shutil.copytree(one_device["root"] / "one", store)
  before = _all_maps(store)
  deleted = map_store.shard_path(store, "grad_cam", 1)
  os.remove(deleted)
  truncated = map_store.shard_path(store, "smoothgrad", 2)
  np.save(truncated, np.zeros((3, 32, 32, 1), np.float32))  # wrong row count: not finished
  with open(map_store.shard_path(store, "gradients", 0) + ".tmp123", "wb") as file:
    file.write(b"half a shard")  # what a kill during a write leaves: ignored
  opened = map_store.open_map_store(store)
  assert opened.missing() == {"gradients": [], "grad_cam": [1], "smoothgrad": [2],
                              HOST_METHOD: []}
  with pytest.raises(FileNotFoundError, match=r"shard 1 of method 'grad_cam' was not written"):
    opened["grad_cam"][9]
  paths = [map_store.shard_path(store, m, s) for m in METHODS for s in range(3)]
  times = {path: os.stat(path).st_mtime_ns for path in paths if os.path.exists(path)}
  result = explain_into(store)
  assert result["methods"]["gradients"]["shards_computed"] == []
  assert result["methods"]["grad_cam"]["shards_computed"] == [1]
  assert result["methods"]["smoothgrad"]["shards_computed"] == [2]
  changed = {path for path in paths if os.stat(path).st_mtime_ns != times.get(path)}
  assert changed == {deleted, truncated}
  after = _all_maps(store)
  for name in before:
    assert_close(after[name], before[name], name)


def test_other_settings_under_an_existing_store_are_refused_naming_the_field(one_device,
                                                                             tmp_path):
  import jax

  from medxai_jax import explain_dataset
  from medxai_jax import map_store

  store = str(tmp_path / "store")
  shutil.copytree(one_device["root"] / "one", store)
  model, variables, preprocess, source = tiny_setup()
  common = dict(methods=list(METHODS), key=jax.random.key(3), split="test",
                batch_size=BATCH_SIZE, settings={"run": "tiny"})
  with pytest.raises(map_store.StoreMismatchError,
                     match=r"options\.smoothgrad\.num_samples: 3 -> 5"):
    explain_dataset.explain_source(model, variables, preprocess, source, store,
                                   overrides={**OVERRIDES, "num_samples": 5}, **common)
  with pytest.raises(map_store.StoreMismatchError, match=r"batch_size: 8 -> 4"):
    explain_dataset.explain_source(model, variables, preprocess, source, store,
                                   overrides=OVERRIDES, **{**common, "batch_size": 4})


def test_the_reader_is_lazy_and_indexes_across_shards(one_device):
  from medxai_jax import map_store

  store = str(one_device["root"] / "one")
  opened = map_store.open_map_store(store)
  maps = opened["gradients"]
  whole = _all_maps(store)["gradients"]
  assert len(maps) == NUM_IMAGES and maps.shape == whole.shape
  assert isinstance(maps.shard(1), np.memmap)
  np.testing.assert_array_equal(maps[6:11], whole[6:11])  # shards 0 and 1
  np.testing.assert_array_equal(maps[[19, 0, 8]], whole[[19, 0, 8]])
  np.testing.assert_array_equal(maps[-1], whole[-1])
  with pytest.raises(KeyError, match="no maps of 'ig'"):
    opened["ig"]
  with pytest.raises(IndexError, match="Row 20 is outside the 20 rows"):
    maps[20]
  with pytest.raises(FileNotFoundError, match="is not a map store"):
    map_store.open_map_store(str(one_device["root"]))


def test_num_images_is_a_count_or_all():
  from medxai_jax import explain

  assert explain.parse_num_images("8") == 8 and explain.parse_num_images(3) == 3
  assert explain.parse_num_images(" All ") is None
  with pytest.raises(ValueError, match="drop --indices"):
    explain.parse_num_images("all", ["3"])
  with pytest.raises(ValueError, match="a number or 'all'; got 'every'"):
    explain.parse_num_images("every")
  with pytest.raises(ValueError, match="at least 1"):
    explain.parse_num_images("0")
  # 'all' (None) is every index of the split, whatever the label; evaluate_run chooses so too.
  labels = np.array([1, 0, 0, 1, 1])
  np.testing.assert_array_equal(explain.choose_indices(labels, None, 1), np.arange(5))
  with pytest.raises(ValueError, match="drop --indices"):
    explain.choose_indices(labels, None, 1, indices=[2])


def _fake_run(workdir, data_dir: str):
  """A run directory as experiments/train.py leaves it (config.json, selected_model/), of
  random weights: 48 px phantoms, 12 test images."""
  from configs import demo

  config = demo.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.builder.update(dict(image_size=48, num_train=4, num_validation=4, num_test=12))
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                           dense_widths=(8,)))
  tiny.save_random_selected_model(config, workdir, scale=0.3)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  return config


def test_the_binary_explains_a_whole_split_into_a_store_of_the_run_settings(tmp_path):
  from medxai_jax import explain
  from medxai_jax import explain_dataset
  from medxai_jax import map_store
  from medxai_jax import runs

  run_dir = tmp_path / "run"
  config = _fake_run(run_dir, str(tmp_path / "tfds"))
  command = [sys.executable, "-m", "experiments.explain", f"--checkpoint={run_dir}",
             "--split=test", "--num_images=all", "--methods=gradients,grad_cam,cam",
             "--batch_size=8"]

  first = subprocess.run(command, env=subprocess_env.forced_cpu_environment(1), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-4000:]
  workdir = run_dir / "explain"
  assert "12 images explained into the map store" in first.stdout
  opened = map_store.open_map_store(str(workdir / "maps"))
  np.testing.assert_array_equal(opened.indices, np.arange(12))  # every image: no label filter
  assert opened.methods == ["gradients", "grad_cam"]
  assert "CAM" in opened.skipped["cam"]  # the custom CNN's head is not GAP + dense
  summary = json.loads((workdir / "explain.json").read_text())
  labels = explain.load_split(config, "test", ("label",))["label"]
  shown = explain.choose_indices(labels, 8, -1, seed=0)  # the figure: class-balanced, seeded
  assert summary["num_images"] == 12 and summary["indices"] == shown.tolist()
  assert (workdir / "attributions.png").exists()
  np.testing.assert_array_equal(np.load(workdir / "maps_grad_cam.npy"), opened["grad_cam"][shown])
  assert set(labels.tolist()) == {0, 1} and summary["targets"] == labels[shown].tolist()
  # A rerun resumes when its settings equal the stored ones (test_a_killed_run_resumes...):
  # they are the run's, recomputed here from its config as a second invocation would.
  settings = json.loads(json.dumps(explain_dataset.run_settings(runs.read_run_config(run_dir),
                                                                str(run_dir))))
  stored = opened.index["settings"]
  assert {k: stored[k] for k in settings} == settings and stored["seed"] == 0
  assert stored["options"]["grad_cam"] == {"relu": True, "upsample": True}


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
