"""Watching a run: TensorBoard event files, progress lines, profiles and phase timings."""

import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

import tiny
from medxai_jax.attribution import api
from medxai_jax.attribution import cam
from medxai_jax.observe import profiling
from medxai_jax.observe import progress
from medxai_jax.observe import summaries
from medxai_jax.observe import timing
from medxai_jax.train import loop
from medxai_jax.train import schema
from medxai_jax.viz import run_report


# --- an event-file reader written from TFRecord's framing and TensorBoard's Event proto


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir):
  """Every Event of every event file under `logdir`, each record's two CRCs checked."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as file:
      data = file.read()
    position = 0
    while position < len(data):
      header = data[position:position + 8]
      (length,) = struct.unpack("<Q", header)
      (length_crc,) = struct.unpack("<I", data[position + 8:position + 12])
      assert length_crc == _masked_crc32c(header), path
      body = data[position + 12:position + 12 + length]
      (body_crc,) = struct.unpack("<I", data[position + 12 + length:position + 16 + length])
      assert body_crc == _masked_crc32c(body), path
      events.append(event_pb2.Event.FromString(body))
      position += 16 + length
  return events


def scalars_by_tag(events):
  found = {}
  for event in events:
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found


def values_of_kind(events, kind):
  return [(event.step, value) for event in events for value in event.summary.value
          if value.WhichOneof("value") == kind]


# --- a tiny training run with summaries and a profile of steps 2..3


def tiny_config(data_dir, **overrides):
  """The demo config on 40 px phantoms: 3 steps of 16 images per epoch, one epoch."""
  config = tiny.demo_config(data_dir, image_size=40, num_train=48, num_validation=16,
                            num_test=16, batch_size=16, eval_batch_size=16, num_epochs=1,
                            log_every_steps=1)
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("observe") / "run")
  config = tiny_config(data_dir, profile_steps="2,3")
  config.summaries.num_images = 2
  result = loop.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "history.jsonl")) as file:
    history = [json.loads(line) for line in file]
  return config, workdir, result, history, read_events(os.path.join(workdir, "tensorboard"))


def test_epoch_scalars_are_the_history_records(watched_run):
  _, _, _, history, events = watched_run
  scalars = scalars_by_tag(events)
  assert [r["epoch"] for r in history] == [1]
  for key in ("train_loss", "train_accuracy", "learning_rate", "images_per_second",
              "val_loss", "val_accuracy", "val_roc_auc"):
    steps, values = zip(*scalars[f"epoch/{key}"])
    assert list(steps) == [r["step"] for r in history], key
    np.testing.assert_allclose(values, [r[key] for r in history], rtol=1e-6, err_msg=key)
  assert not any(tag.startswith("epoch/selected") for tag in scalars)  # a flag, not a number


def test_step_scalars_average_to_the_epoch_loss(watched_run):
  _, _, _, history, events = watched_run
  scalars = scalars_by_tag(events)
  steps, losses = zip(*scalars["train/loss"])
  assert list(steps) == [1, 2, 3]  # log_every_steps=1, 3 steps per epoch
  _, accuracies = zip(*scalars["train/accuracy"])
  for epoch, record in enumerate(history):
    window = slice(3 * epoch, 3 * epoch + 3)  # equal batches: the epoch mean is their mean
    np.testing.assert_allclose(np.mean(losses[window]), record["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(np.mean(accuracies[window]), record["train_accuracy"],
                               rtol=1e-5)
  _, rates = zip(*scalars["train/learning_rate"])
  np.testing.assert_allclose(rates, history[0]["learning_rate"], rtol=1e-6)
  assert all(value > 0 for _, value in scalars["train/images_per_second"])


def test_test_metrics_config_text_and_grad_cam_images(watched_run):
  config, workdir, result, history, events = watched_run
  scalars = scalars_by_tag(events)
  np.testing.assert_allclose(scalars["test/accuracy"][0][1], result["test"]["accuracy"],
                             rtol=1e-6)
  texts = [value for _, value in values_of_kind(events, "tensor")
           if value.tag.startswith("config")]
  assert texts and config.model.name in b"".join(texts[0].tensor.string_val).decode()
  images = values_of_kind(events, "image")
  assert sorted({value.tag for _, value in images}) == ["gradcam/0", "gradcam/1"]
  assert sorted({step for step, _ in images}) == [r["step"] for r in history]
  decoded = np.asarray(Image.open(io.BytesIO(images[0][1].image.encoded_image_string)))
  assert decoded.shape == (40, 40, 3)


def test_profile_of_the_chosen_steps_is_written(watched_run):
  _, workdir, _, _, _ = watched_run
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*"))
  names = {os.path.basename(path).split(".", 1)[1] for path in traces}
  assert {"xplane.pb", "trace.json.gz"} <= names


def test_timings_and_report_table(watched_run):
  _, workdir, _, _, _ = watched_run
  phases = timing.read_timings(workdir)
  assert {"train/prepare_data", "train/steps", "train/validation", "train/test",
          "train/summary_images"} <= set(phases)
  assert phases["train/validation"]["compile_seconds"] is None  # one validation: no steady one
  steps = phases["train/steps"]
  assert 0 <= steps["compile_seconds"] <= steps["wall_seconds"]
  html = open(run_report.write_run_report(workdir)).read()
  assert "Timing" in html and "train/steps" in html and "compile seconds" in html


def test_disabled_writer_writes_nothing(tmp_path):
  writer = summaries.create_writer(str(tmp_path), enabled=False)
  assert isinstance(writer, summaries.NullWriter)
  with writer:
    writer.scalars(1, {"loss": 1.0})
    writer.images(1, {"image": np.zeros((4, 4, 3), np.uint8)})
    writer.text(1, "config", "x")
  assert os.listdir(tmp_path) == []
  unused = summaries.create_writer(str(tmp_path), enabled=True)  # opened on the first write
  unused.flush()
  unused.close()
  assert os.listdir(tmp_path) == []


def test_writer_round_trips_scalars_and_refuses_bad_values(tmp_path):
  with summaries.create_writer(str(tmp_path), enabled=True) as writer:
    writer.scalars(3, {"a": 0.25, "b": np.float32(2.0), "undefined": None})
    with pytest.raises(TypeError, match="'c'"):
      writer.scalars(3, {"c": "text"})
    with pytest.raises(ValueError, match="'d'.*within \\[0, 1\\]"):
      writer.images(3, {"d": np.full((2, 2), 1.5)})
  scalars = scalars_by_tag(read_events(os.path.join(tmp_path, summaries.TENSORBOARD_DIR)))
  assert scalars == {"a": [(3, 0.25)], "b": [(3, 2.0)]}


def test_grad_cam_matches_a_per_image_computation():
  keys = jax.random.split(jax.random.key(1), 3)
  kernel = jax.random.normal(keys[0], (3, 3, 1, 4))
  dense = jax.random.normal(keys[1], (6 * 6 * 4, 3)) * 0.1

  def features(images):  # a conv + tanh, cut there: [B, 6, 6, 4]
    return jnp.tanh(jax.lax.conv_general_dilated(
        images, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))

  def head(activation):  # a dense layer over every cell: the gradient differs per cell
    return activation.reshape(len(activation), -1) @ dense

  split = api.sequential_split(features, head)
  images = jax.random.normal(keys[2], (3, 13, 13, 1))
  targets = jnp.asarray([0, 2, 1])
  maps = jax.jit(lambda x, t: cam.grad_cam(split, x, t))(images, targets)

  @jax.jit
  def one_image(image, target):  # Selvaraju et al. eq. 1-2 for a batch of one
    activation = features(image[None])
    gradient = jax.grad(lambda a: head(a)[0, target])(activation)
    cam = jnp.maximum((activation[0] * gradient[0].mean(axis=(0, 1))).sum(-1), 0)
    return jax.image.resize(cam, (13, 13), method="bilinear")

  for b in range(3):
    np.testing.assert_allclose(maps[b], one_image(images[b], targets[b]), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(maps).max()) > 0 and maps.shape == (3, 13, 13)


def test_overlay_of_a_zero_map_is_the_gray_image():
  gray = np.linspace(0, 1, 16).reshape(4, 4)
  rgb = summaries.overlay(gray, np.zeros((4, 4)))
  np.testing.assert_array_equal(rgb, np.repeat(np.round(gray * 255)[..., None], 3, -1))
  hot = summaries.overlay(gray, np.eye(4))
  assert not np.array_equal(hot[0, 0], rgb[0, 0]) and np.array_equal(hot[0, 1], rgb[0, 1])


# --- progress lines


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_lines_rate_eta_and_cadence():
  clock, lines = FakeClock(), []
  bar = progress.Progress(10, "explain", every_seconds=5, clock=clock, log=lines.append)
  for _ in range(10):
    clock.now += 2.0  # one item every 2 s
    bar.update()
  bar.close()
  # First update, then once at least 5 s passed since the last line (items 4 and 7), the last.
  assert lines == [
      "explain: 1/10 (10%) | 0.5 items/s | elapsed 2s | ETA 18s",
      "explain: 4/10 (40%) | 0.5 items/s | elapsed 8s | ETA 12s",
      "explain: 7/10 (70%) | 0.5 items/s | elapsed 14s | ETA 6s",
      "explain: 10/10 (100%) | 0.5 items/s | elapsed 20s | ETA 0s"]


def test_track_logs_the_last_line_when_stopped_early_and_unknown_totals():
  clock, lines = FakeClock(), []

  def items():
    for index in range(100):
      clock.now += 30.0
      yield index

  for index in progress.track(items(), desc="xrai", unit="images", every_seconds=1000,
                              clock=clock, log=lines.append):
    if index == 2:  # the loop body of item 2 does not finish: 2 items are done
      break
  # The first line, none due for 1000 s, then the closing line when the loop stopped.
  assert lines == ["xrai: 1 images | 0.0333 images/s | elapsed 30s",
                   "xrai: 2 images | 0.0222 images/s | elapsed 1m30s"]
  with pytest.raises(ValueError, match="3 items done of a total of 2"):
    bar = progress.Progress(2, "p", log=lambda line: None)
    bar.update(3)


def test_format_duration():
  assert [progress.format_duration(s) for s in (0, 59.4, 61, 3599, 7260)] == [
      "0s", "59s", "1m01s", "59m59s", "2h01m"]


def test_phase_sequence_records_each_phase(tmp_path):
  clock, lines = FakeClock(), []
  phases = timing.PhaseSequence(str(tmp_path), "demo", total=2, clock=clock, log=lines.append)
  phases.start("train")
  clock.now += 7.0
  phases.start("report")
  phases.compile_seconds = 1.5
  clock.now += 3.0
  phases.finish()
  recorded = timing.read_timings(str(tmp_path))
  assert recorded == {"demo/train": {"wall_seconds": 7.0, "compile_seconds": None},
                      "demo/report": {"wall_seconds": 3.0, "compile_seconds": 1.5}}
  assert lines[-1] == "demo: 2/2 (100%) | 0.2 phases/s | elapsed 10s | ETA 0s"


def test_bad_profile_steps_and_summaries_are_refused(tmp_path):
  assert profiling.parse_steps("4,6") == (4, 6) and profiling.parse_steps("5") == (5, 5)
  assert profiling.parse_steps("") is None
  for spec in ("6,4", "0,2", "a,b", "1,2,3"):
    with pytest.raises(ValueError, match="config.profile_steps"):
      profiling.parse_steps(spec)
  config = tiny_config(str(tmp_path))
  config.summaries.num_images = -1
  with pytest.raises(ValueError, match="config.summaries.num_images"):
    schema.check_config(config)
  config = tiny_config(str(tmp_path), profile_steps="9,3")
  with pytest.raises(ValueError, match="config.profile_steps"):
    schema.check_config(config)
