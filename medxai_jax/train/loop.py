"""The epoch loop: train, validate, select, checkpoint, resume, and test the selected model."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medxai_jax import runs
from medxai_jax.attribution import cam
from medxai_jax.data import augment as augment_lib
from medxai_jax.data import pipeline
from medxai_jax.models import base
from medxai_jax.observe import profiling
from medxai_jax.observe import progress
from medxai_jax.observe import summaries
from medxai_jax.observe import timing
from medxai_jax.train import checkpoint
from medxai_jax.train import components
from medxai_jax.train import freeze
from medxai_jax.train import init_from as init_from_lib
from medxai_jax.train import metrics as metrics_lib
from medxai_jax.train import optim
from medxai_jax.train import parallel
from medxai_jax.train import preemption
from medxai_jax.train import results
from medxai_jax.train import schema
from medxai_jax.train import steps
from medxai_jax.train import workdir as workdir_lib

@dataclasses.dataclass
class LoopState:
  """Host-side progress saved with every checkpoint (JSON)."""

  epoch: int = 0  # epochs completed
  learning_rate: float = 0.0
  plateau: optim.PlateauState = dataclasses.field(default_factory=optim.PlateauState)
  best_score: float | None = None
  best_epoch: int = 0
  early_stopping_best: float | None = None
  epochs_since_improvement: int = 0
  stopped_early: bool = False

  def to_json(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "LoopState":
    """Inverse of `to_json`."""
    data = dict(data)
    data["plateau"] = optim.PlateauState(**data.get("plateau", {}))
    return cls(**data)


def evaluate(state: steps.TrainState, source: pipeline.RandomAccessSource, *, eval_fn,
             batch_size: int, label_key: str, split: str = "",
             warned: set[tuple[str, str]] | None = None, feature_keys: Sequence[str] = (),
             features: dict[str, np.ndarray] | None = None, workers: int = 0,
             prefetch: int = 2) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Metrics over a whole split, plus its logits and labels (padding removed).

  A metric that is undefined on the split (AUC with one class, ...) is None, with a warning
  naming it, the split and why (once per split and metric when `warned` is given). The scalar
  record features `feature_keys` (e.g. 'study_id') of the evaluated rows are put into
  `features` (one process only: on several, each host batch holds only its own rows).
  `workers`, `prefetch`: the input pipeline's (`pipeline.batch_iterator`).
  """
  logits, labels, losses = [], [], []
  columns: dict[str, list[np.ndarray]] = {key: [] for key in feature_keys}
  for batch in pipeline.iterate_batches(
      source, batch_size=batch_size, label_key=label_key, workers=workers, prefetch=prefetch,
      keys=("image", *[k for k in feature_keys if k != label_key])):
    extra = {key: batch["label"] if key == label_key else batch.pop(key)
             for key in feature_keys}  # iterate_batches renames the label feature 'label'
    for key in feature_keys:
      columns[key].append(extra[key][np.asarray(batch["weight"]) > 0])
    out = jax.device_get(eval_fn(state, batch))
    # On several hosts each host batch holds only this process's rows; the step then returns
    # the global batch's labels and weights (replicated) with its logits.
    real = np.asarray(out.get("weight", batch["weight"])) > 0
    logits.append(out["logits"][real])
    losses.append(out["loss"][real])
    labels.append(np.asarray(out.get("label", batch["label"]))[real])
  logits_all = np.concatenate(logits)
  labels_all = np.concatenate(labels)
  if features is not None:
    features.update({key: np.concatenate(values) for key, values in columns.items()})
  result = results.defined_metrics(metrics_lib.classification_metrics(labels_all, logits_all),
                           f"the {split} split" if split else "the evaluated split", warned)
  result["loss"] = float(np.concatenate(losses).mean())
  return result, logits_all, labels_all


def _format_metric(value: float | None) -> str:
  """'0.1234', or 'undefined' for None."""
  return "undefined" if value is None else f"{value:.4f}"


def _monitored(value: Any, mode: str) -> float:
  """A monitored value as a float; an undefined (None) one is the worst value of its mode."""
  if value is None:
    return -math.inf if mode == "max" else math.inf
  return float(value)


def selection_score(metric: str, train_accuracy: float, validation: Mapping[str, Any]) -> float:
  """Model-selection value of an epoch ('train_val_gap' is 000's -|train acc - val acc|).

  'train_accuracy' selects the epoch that fits the training split best (a model trained on
  shuffled labels, whose validation accuracy is chance by construction).
  """
  if metric == "train_accuracy":
    return float(train_accuracy)
  if metric == "train_val_gap":
    return -abs(train_accuracy - validation["accuracy"])
  return _monitored(validation[metric], schema.monitor_mode(metric, ""))


def _epoch_learning_rate(config: ml_collections.ConfigDict, epoch: int, loop: LoopState) -> float:
  """Learning rate to use for `epoch` under the configured schedule."""
  schedule = config.schedule
  if schedule.name == "constant":
    return config.learning_rate
  if schedule.name == "step_decay":
    return optim.step_decay_rate(config.learning_rate, epoch, config.num_epochs,
                                 tuple(schedule.boundaries), tuple(schedule.divisors))
  if schedule.name == "plateau":
    return loop.learning_rate or config.learning_rate
  raise ValueError(f"config.schedule.name={schedule.name!r} is not one of "
                   "'constant', 'step_decay', 'plateau'.")


def plateau_step(config: ml_collections.ConfigDict, learning_rate: float,
                 validation: Mapping[str, Any], plateau: optim.PlateauState
                 ) -> tuple[float, optim.PlateauState]:
  """Next epoch's rate under config.schedule ('plateau') after an epoch's validation metrics."""
  schedule = config.schedule
  mode = schema.monitor_mode(schedule.metric, schedule.mode)
  return optim.plateau_update(
      learning_rate, _monitored(validation[schedule.metric], mode), plateau,
      mode=mode, factor=schedule.factor,
      patience=schedule.patience, max_reductions=schedule.max_reductions or None,
      min_lr=schedule.min_learning_rate)


def early_stopping_step(config: ml_collections.ConfigDict, validation: Mapping[str, Any],
                        best: float | None, epochs_since_improvement: int
                        ) -> tuple[float | None, int, bool]:
  """(best, epochs without improvement, stop now?) after an epoch, under config.early_stopping."""
  stopping = config.early_stopping
  mode = schema.monitor_mode(stopping.metric, stopping.mode)
  value = _monitored(validation[stopping.metric], mode)
  if optim.improved(value, best, mode):
    best, epochs_since_improvement = value, 0
  else:
    epochs_since_improvement += 1
  return best, epochs_since_improvement, epochs_since_improvement >= stopping.patience


def _append_jsonl(path: str, record: Mapping[str, Any]) -> None:
  """Appends one JSON line."""
  with open(path, "a") as f:
    f.write(metrics_lib.strict_json_dumps(record) + "\n")


def _truncate_history(path: str, completed_epochs: int) -> None:
  """Drops history lines of epochs after the resumed checkpoint (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if json.loads(line).get("epoch", 0) <= completed_epochs]
  with open(path, "w") as f:
    f.writelines(kept)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def _check_finite(loss: float, epoch: int, step: int, learning_rate: float, store_dir: str,
                  last_checkpoint: int | None) -> None:
  """Raises NonFiniteLossError with what to do next if `loss` is not finite."""
  if not math.isfinite(loss):
    where = (f"the last good checkpoint (epoch {last_checkpoint}) is in {store_dir} and the run "
             "resumes from it" if last_checkpoint else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"Training loss became {loss} at epoch {epoch + 1}, step {step} (learning rate "
        f"{learning_rate:g}); {where}. Lower config.learning_rate or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains with checkpoints and resumption, selects an epoch, and evaluates it on the test split.

  Writes `config.json`, `history.jsonl` (one line per epoch) and `metrics.json` into `workdir`,
  checkpoints into `workdir/checkpoints/{latest,best}`, the selected epoch's variables into
  `workdir/selected_model/` (what `runs.restore_selected_model` and config.init_from read), and
  returns the metrics.json content.
  metrics.json (strict JSON: an undefined metric is null, with a warning) holds `class_names`,
  the test metrics and, when the test records carry `study_id` / `body_part`, `test_by_study`
  (MURA's study-level metrics) and `test_by_body_part`. Also writes `splits.json` (class names,
  examples per class of each split after config.dataset.filter, and where each split comes from
  when the builder records it: `provenance`) and `predictions_test.npz`
  (`write_predictions`).
  `config.train` freezes parameters (`freeze.py`: the head only, the last N layers, a head-only
  warm-up), sets the compute dtype and gradient accumulation; `config.augment` transforms
  training batches on the device (`data/augment.py`).

  The steps run data-parallel over every device (`parallel.py`): the state replicated, each
  global batch of config.batch_size rows split over the devices. On several hosts (after
  `parallel.initialize_distributed`) every process runs this function; process 0 writes the
  JSON files, all of them write their part of the checkpoints.

  One run per workdir: the run holds `workdir.RunLock` while it runs; a second one raises
  `workdir.WorkdirLockedError` naming the holder. A workdir holding checkpoints is resumed, after
  `workdir.check_resume` compared the config with the run's config.json: a change to what was
  trained raises `workdir.ConfigChangeError` before anything is written; allowed changes are
  appended to `config_history.jsonl`. SIGTERM stops training after the current step with a
  checkpoint of it (`checkpoints/partial`, also written every config.checkpoint.every_steps
  steps) and raises `preemption.Preempted` (exit status 0); the next run continues from that
  step exactly as an uninterrupted run would.

  Process 0 also writes TensorBoard summaries into `workdir/tensorboard/` (`config.summaries`:
  the config as text; loss, accuracy, learning rate and images/s of the steps since the last
  log line, every config.log_every_steps steps, as 'train/<name>'; every number of an epoch's
  history.jsonl line as 'epoch/<key>'; the test metrics as 'test/<metric>'; a Grad-CAM overlay
  of the first config.summaries.num_images validation images per epoch as 'gradcam/<i>') and
  each phase's wall and compile seconds into `timings.json` (observe/timing.py).
  `config.profile_steps='a,b'` traces global steps a..b into `workdir/profile/`
  (observe/profiling.py).
  """
  config = schema.with_defaults(config)
  schema.check_config(config)
  fine_tuning = schema.train_settings(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh,
                            accumulation_steps=fine_tuning["accumulation_steps"])
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.RunLock(workdir, jax.process_index()), \
      preemption.SigtermWatch() as sigterm, \
      profiling.StepProfiler(os.path.join(workdir, profiling.PROFILE_DIR),
                             profiling.parse_steps(config.profile_steps)) as profiler, \
      summaries.create_writer(workdir, enabled=jax.process_index() == 0 and (
          config.summaries.enabled)) as writer:
    return _train_in_workdir(config, workdir, mesh, sigterm, writer=writer, profiler=profiler)


def fixed_summary_images(source: pipeline.RandomAccessSource, label_key: str, count: int
                         ) -> dict[str, np.ndarray] | None:
  """The stored images and labels of the first `count` records of `source` (the validation
  split): the fixed images whose Grad-CAM the summaries show every epoch. None when `count` is
  0, and (with a warning) on several processes, where no process holds the whole model's
  inputs to run it alone."""
  if count == 0 or len(source) == 0:
    return None
  if jax.process_count() > 1:
    logging.warning("config.summaries.num_images=%d: Grad-CAM summary images are drawn in "
                    "single-process runs only; this run has %d processes, so none are written.",
                    count, jax.process_count())
    return None
  rows = source.__getitems__(list(range(min(count, len(source)))))
  return {"images": np.stack([np.asarray(row["image"]) for row in rows]),
          "labels": np.asarray([int(row[label_key]) for row in rows], np.int32)}


def grad_cam_inputs(model: base.Classifier, preprocess: Any, variables: base.Variables,
                    images: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Grad-CAM maps [B, H, W] of the stored `images`' `targets` at the model's last
  convolution, and the preprocessed inputs [B, H, W, C] they explain (both float32)."""
  inputs = preprocess(images)
  maps = cam.grad_cam(model.split(variables, "last_conv"), inputs, targets)
  return maps.astype(jnp.float32), inputs.astype(jnp.float32)


def write_grad_cam_images(writer: summaries.Writer, step: int, cam_fn: Any,
                          variables: base.Variables, fixed: Mapping[str, np.ndarray]
                          ) -> Mapping[str, np.ndarray] | None:
  """Writes the 'gradcam/<i>' overlays of the `fixed` images at `step`; returns `fixed`, or
  None, with a warning, when the model has no spatial last convolution for Grad-CAM."""
  try:
    maps, inputs = jax.device_get(cam_fn(variables, fixed["images"], fixed["labels"]))
  except ValueError as error:
    logging.warning("No Grad-CAM summary images (config.summaries.num_images=0 silences "
                    "this): %s", error)
    return None
  writer.images(step, summaries.grad_cam_overlays(maps, inputs))
  return fixed


def record_run_start(config: ml_collections.ConfigDict, workdir: str, *, completed_epochs: int,
                     partial_step: int | None, dataset: Mapping[str, Any], lead: bool) -> None:
  """Checks a resumed run's config against its config.json (raising ConfigChangeError before
  anything is written), then writes config.json, prepared_dataset.json and, for allowed
  changes, a config_history.jsonl line. A new run (no checkpoint) starts a fresh record."""
  config_file = runs.config_path(workdir)
  resuming = completed_epochs > 0 or partial_step is not None
  given = json.loads(config.to_json_best_effort())  # as config.json stores it
  history_file = os.path.join(workdir, workdir_lib.CONFIG_HISTORY_FILE)
  if resuming and os.path.isfile(config_file):
    run_dataset = workdir_lib.read_prepared_dataset(workdir)
    if run_dataset is None:
      logging.warning("%s has no %s (a run from before it was recorded): the prepared dataset "
                      "cannot be compared; recording the current one.", workdir,
                      workdir_lib.PREPARED_DATASET_FILE)
    differences = workdir_lib.check_resume(
        runs.read_run_config(workdir), given, config_file=config_file,
        completed_epochs=completed_epochs, run_dataset=run_dataset, dataset=dataset)
    if differences:
      logging.info("Resuming %s (%d epochs done) with changed field(s), recorded in %s:%s",
                   workdir, completed_epochs, history_file,
                   "".join(f"\n  {difference}" for difference in differences))
      if lead:
        workdir_lib.record_config_change(workdir, completed_epochs, partial_step, differences)
  elif resuming:
    logging.warning("%s holds checkpoints but no config.json: the config they were trained "
                    "with cannot be checked; writing this one.", workdir)
  elif lead and os.path.exists(history_file):
    os.remove(history_file)  # the record of an earlier run that never checkpointed
  if lead:
    with open(config_file, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    workdir_lib.write_prepared_dataset(workdir, dataset)


def _train_in_workdir(config: ml_collections.ConfigDict, workdir: str, mesh: Any,
                      sigterm: preemption.SigtermWatch, *, writer: summaries.Writer | None = None,
                      profiler: profiling.StepProfiler | None = None) -> dict[str, Any]:
  """`train_and_evaluate` in a prepared, locked workdir, SIGTERM watched by `sigterm`,
  summaries written through `writer`, steps profiled by `profiler`."""
  writer = writer or summaries.NullWriter()
  profiler = profiler or profiling.StepProfiler("", None)
  fine_tuning = schema.train_settings(config)
  inputs = schema.input_settings(config)  # the input pipeline's workers and read-ahead
  accumulation_steps = fine_tuning["accumulation_steps"]
  eval_batch_size = parallel.round_up_batch_size(
      config.eval_batch_size, mesh)
  replicated = parallel.replicated_sharding(mesh)
  data_sharding = parallel.batch_sharding(mesh)
  lead = jax.process_index() == 0  # writes the JSON files
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.checkpoint.max_to_keep)
  try:
    record_run_start(config, workdir, completed_epochs=store.latest_step() or 0,
                     partial_step=store.partial_step(),
                     dataset=workdir_lib.prepared_dataset(config.dataset), lead=lead)
  except BaseException:
    store.close()
    raise
  writer.text(0, "config", summaries.config_markdown(config.to_json_best_effort(indent=2)))
  phase_start = time.perf_counter()
  dataset = config.dataset
  splits = [dataset.train_split, dataset.validation_split, dataset.test_split]
  sources = pipeline.load_sources(dataset, splits)
  train_source = sources[dataset.train_split]
  model, tx, preprocess = components.build_components(config)
  classes = model.num_classes
  features = components.dataset_features(dataset)
  names = components.class_names(features, dataset.label_key, classes)
  # After config.dataset.filter; shuffled training labels are a permutation: the same counts.
  counts = {role: components.class_counts(
      pipeline.read_feature(sources[split], dataset.label_key), classes, split)
            for role, split in zip(("train", "validation", "test"), splits)}
  # Where each role's split comes from, as the builder recorded it (empty when it records none).
  recorded = pipeline.split_provenance(dataset)
  provenance = {role: recorded[split] for role, split in zip(("train", "validation", "test"),
                                                             splits) if split in recorded}
  weights = components.resolve_class_weights(config.class_weights, np.asarray(counts["train"]))
  warned: set[tuple[str, str]] = set()
  steps_per_epoch = pipeline.num_batches(len(train_source), config.batch_size, True)
  if steps_per_epoch == 0:
    raise ValueError(f"The training split has {len(train_source)} examples, fewer than "
                     f"config.batch_size={config.batch_size}.")
  # Each phase's wall seconds and compile estimate (observe/timing.py), written at the end.
  phases: dict[str, dict[str, Any]] = {
      "train/prepare_data": {"wall_seconds": time.perf_counter() - phase_start}}
  state = steps.create_train_state(model, tx, jax.random.key(config.seed))
  history_path = os.path.join(workdir, "history.jsonl")
  loop = LoopState(learning_rate=config.learning_rate)
  init_report = None
  latest_epoch, partial_step = store.latest_step(), store.partial_step()
  # A mid-epoch checkpoint older than the newest epoch one was superseded (a kill between them).
  resume_partial = partial_step is not None and partial_step > (latest_epoch or 0) * (
      steps_per_epoch)
  position = None  # where in an epoch a mid-epoch checkpoint stopped
  if config.init_from and latest_epoch is None and not resume_partial:
    state, init_report = init_from_lib.initialise_from(state, config.init_from, config.model)
  state = parallel.replicate(state, mesh)
  if resume_partial:
    state, metadata = store.restore_partial(state)  # into the replicated template's sharding
    loop = LoopState.from_json(metadata["loop"])
    position = metadata["position"]
    if lead:
      _truncate_history(history_path, loop.epoch)
    logging.info("Resumed from %s/partial at epoch %d, step %d of %d.", store.directory,
                 loop.epoch + 1, position["step"], steps_per_epoch)
  elif latest_epoch is not None:
    state, metadata = store.restore_latest(state)  # into the replicated template's sharding
    loop = LoopState.from_json(metadata["loop"])
    if lead:
      _truncate_history(history_path, loop.epoch)
    logging.info("Resumed from %s at epoch %d.", store.directory, loop.epoch)
  elif lead and os.path.exists(history_path):
    os.remove(history_path)

  head_only_epochs = fine_tuning["head_only_epochs"]
  main_mask = None if fine_tuning["trainable"] == "all" else freeze.trainable_mask(
      model, fine_tuning["trainable"], fine_tuning["num_trainable_layers"])
  head_mask = freeze.trainable_mask(model, "head") if head_only_epochs else None
  if head_mask is not None and head_mask == main_mask:
    head_mask = main_mask  # trainable='head' with a warm-up: one mask, one compilation
  augment_fn = augment_lib.make_augment_fn(config.augment)
  compiled_steps = {}

  def train_step_for(mask: Any):
    """The jitted train step of a trainable mask (one compilation per mask)."""
    if id(mask) not in compiled_steps:
      compiled_steps[id(mask)] = jax.jit(functools.partial(
          steps.train_step, model=model, tx=tx, preprocess=preprocess,
          class_weights=None if weights is None else jnp.asarray(weights, jnp.float32),
          augment=augment_fn, trainable=mask, accumulation_steps=accumulation_steps,
          bit_depth=config.preprocess.bit_depth),
          in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
          donate_argnums=0)
    return compiled_steps[id(mask)]

  def eval_outputs(state: steps.TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Eval logits and losses with the batch's labels and weights (all replicated)."""
    out = steps.eval_step(state, batch, model=model, preprocess=preprocess)
    return dict(out, label=batch["label"], weight=batch["weight"])

  eval_jit = jax.jit(eval_outputs, in_shardings=(replicated, data_sharding),
                     out_shardings=replicated)
  summary_images = fixed_summary_images(
      sources[dataset.validation_split], dataset.label_key,
      config.summaries.num_images if not isinstance(
          writer, summaries.NullWriter) else 0)
  cam_jit = jax.jit(lambda variables, images, targets: grad_cam_inputs(
      model, preprocess, variables, images, targets))

  def eval_fn(state: steps.TrainState, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The jitted eval step on a host batch, sharded over the mesh."""
    return eval_jit(state, parallel.shard_batch(batch, mesh))

  def host_source(source: pipeline.RandomAccessSource, batch_size: int):
    """`source`, or on several hosts a view that decodes only this process's rows."""
    if jax.process_count() == 1:
      return source
    return parallel.ProcessLocalSource(source, parallel.local_rows(mesh, batch_size), batch_size)
  selection_metric = config.selection.metric
  selection_mode = schema.monitor_mode(selection_metric, config.selection.mode)
  stopping = config.early_stopping
  run_start = time.time()
  every_steps = config.checkpoint.every_steps
  sigterm_step = preemption.hooked_sigterm_step()
  num_processes = jax.process_count()

  def preempted(message: str) -> preemption.Preempted:
    """Closes the checkpoints and logs why the run stops; the exception to raise."""
    store.close()
    logging.warning("%s", message)
    return preemption.Preempted(message)

  first_epoch = loop.epoch
  first_calls: dict[int, float] = {}  # seconds of each compiled train step's first call
  step_seconds, compile_seconds, validation_seconds, summary_seconds = 0.0, 0.0, [], 0.0
  if loop.stopped_early and first_epoch < config.num_epochs:
    logging.info("The run stopped early after epoch %d; it is not trained further.", first_epoch)
  last_epoch = first_epoch if loop.stopped_early else config.num_epochs
  for epoch in range(first_epoch, last_epoch):
    learning_rate = _epoch_learning_rate(config, epoch, loop)
    state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, learning_rate))
    mask = freeze.epoch_mask(epoch, head_only_epochs, head_mask, main_mask)
    train_step = train_step_for(mask)
    trainable_parameters = (base.parameter_count({"params": state.params}) if mask is None
                            else freeze.count_trainable(state.params, mask))
    if epoch == first_epoch or epoch == head_only_epochs:
      logging.info("Epoch %d trains %d of %d parameters%s.", epoch + 1, trainable_parameters,
                   base.parameter_count({"params": state.params}),
                   " (head-only warm-up)" if epoch < head_only_epochs else "")
    epoch_start = time.time()
    # A resumed epoch continues its training sums (same additions, same order: same floats).
    resumed = position if position is not None and position["epoch"] == epoch else None
    position = None
    done_steps = int(resumed["step"]) if resumed else 0
    totals = (dict(resumed["totals"]) if resumed else
              {"loss_sum": 0.0, "correct": 0.0, "count": 0.0})
    seconds_before = float(resumed["train_seconds"]) if resumed else 0.0
    pending = []
    window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "steps": 0, "start": epoch_start}
    epoch_first_calls = []
    # The epoch's batches in (seed, epoch) order; a resumed epoch continues grain's saved
    # iterator state at the next batch.
    batches = pipeline.BatchStream.resume(
        pipeline.batch_dataset(host_source(train_source, config.batch_size),
                               batch_size=config.batch_size, label_key=dataset.label_key,
                               seed=config.seed, epoch=epoch, shuffle=True, drop_remainder=True),
        resumed.get("input") if resumed else None, done_steps, **inputs,
        where=f"{store.directory}/partial")
    for index, host_batch in enumerate(batches, start=done_steps + 1):
      batch = parallel.shard_batch(host_batch, mesh)
      global_step = epoch * steps_per_epoch + index
      profiler.before_step(global_step)
      call_start = time.perf_counter()
      state, stats = train_step(state, batch)
      if id(mask) not in first_calls:  # includes the compilation: timed to its end
        jax.block_until_ready(stats)
        first_calls[id(mask)] = time.perf_counter() - call_start
        epoch_first_calls.append(first_calls[id(mask)])
      profiler.after_step(global_step, stats)
      pending.append(stats)
      window["steps"] += 1
      if global_step == sigterm_step:
        preemption.send_sigterm_to_self()
      log_now = index % config.log_every_steps == 0 or index == steps_per_epoch
      periodic = bool(every_steps) and index % every_steps == 0
      # Several processes must agree to stop at the same step: they compare at sync points.
      stop = index < steps_per_epoch and (sigterm.requested if num_processes == 1 else (
          (log_now or periodic) and sigterm.agreed(num_processes)))
      save_now = index < steps_per_epoch and (stop or periodic)
      if log_now or save_now:
        fetched = jax.device_get(pending)
        pending = []
        for item in fetched:
          _check_finite(float(item["loss"]), epoch, int(state.step), learning_rate,
                        store.directory, store.latest_step())
          for key in totals:
            totals[key] += float(item[key])
            window[key] += float(item[key])
      if log_now:
        now = time.time()
        elapsed = now - epoch_start
        remaining = (steps_per_epoch - index) + steps_per_epoch * (config.num_epochs - epoch - 1)
        done_now = index - done_steps
        logging.info(
            "epoch %d/%d step %d/%d loss %.4f acc %.3f lr %.2g | %.1f img/s | ETA %s",
            epoch + 1, config.num_epochs, index, steps_per_epoch,
            totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"],
            learning_rate, done_now * config.batch_size / elapsed,
            progress.format_duration(remaining * elapsed / done_now))
        # The steps since the last line: their mean loss and accuracy, their images per second.
        writer.scalars(global_step, {
            "train/loss": window["loss_sum"] / window["count"],
            "train/accuracy": window["correct"] / window["count"],
            "train/learning_rate": learning_rate,
            "train/images_per_second":
            window["steps"] * config.batch_size / max(now - window["start"], 1e-9)})
        window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "steps": 0, "start": now}
      if save_now:
        store.save_partial(global_step, state, {
            "loop": loop.to_json(),
            "position": {"epoch": epoch, "step": index, "totals": totals,
                         "train_seconds": seconds_before + time.time() - epoch_start,
                         "input": batches.state()}})
      if stop:
        batches.close()
        raise preempted(
            f"Stopped on SIGTERM after step {index} of {steps_per_epoch} of epoch {epoch + 1}, "
            f"checkpointed in {store.directory}/partial/{global_step}. Run the same command "
            "again to continue from this step.")
    train_seconds = seconds_before + time.time() - epoch_start
    this_run = time.time() - epoch_start  # this invocation's part of the epoch
    step_seconds += this_run
    steady_steps = index - done_steps - len(epoch_first_calls)  # steps without a compilation
    steady = ((this_run - sum(epoch_first_calls)) / steady_steps if steady_steps > 0 else None)
    compile_seconds += sum(timing.compile_estimate(first, steady) or 0.0
                           for first in epoch_first_calls)
    train_loss = totals["loss_sum"] / totals["count"]
    train_accuracy = totals["correct"] / totals["count"]
    validation_start = time.perf_counter()
    validation, _, _ = evaluate(
        state, host_source(sources[dataset.validation_split], eval_batch_size),
        eval_fn=eval_fn, batch_size=eval_batch_size, label_key=dataset.label_key,
        split=dataset.validation_split, warned=warned, **inputs)
    validation_seconds.append(time.perf_counter() - validation_start)
    completed = epoch + 1

    score = selection_score(selection_metric, train_accuracy, validation)
    is_best = optim.improved(score, loop.best_score, selection_mode)
    if is_best:
      loop.best_score, loop.best_epoch = score, completed
    if config.schedule.name == "plateau":
      loop.learning_rate, loop.plateau = plateau_step(config, learning_rate, validation,
                                                      loop.plateau)
    if stopping.patience:
      (loop.early_stopping_best, loop.epochs_since_improvement,
       loop.stopped_early) = early_stopping_step(config, validation, loop.early_stopping_best,
                                                 loop.epochs_since_improvement)
    loop.epoch = completed

    record = {"epoch": completed, "step": int(state.step), "learning_rate": learning_rate,
              "train_loss": train_loss, "train_accuracy": train_accuracy,
              "train_seconds": train_seconds, "trainable_parameters": trainable_parameters,
              "images_per_second":
              steps_per_epoch * config.batch_size / train_seconds, "selected": is_best,
              **{f"val_{k}": v for k, v in validation.items()}}
    if lead:
      _append_jsonl(history_path, record)
    writer.scalars(record["step"], summaries.numeric_items(record, "epoch/"))
    if summary_images is not None:
      images_start = time.perf_counter()
      summary_images = write_grad_cam_images(writer, record["step"], cam_jit, state.variables,
                                             summary_images)
      summary_seconds += time.perf_counter() - images_start
    metadata = {"loop": loop.to_json(), "record": record}
    if is_best:
      store.save_best(completed, state, metadata)
    store.save_latest(completed, state, metadata)
    store.delete_partial()  # superseded by the epoch checkpoint
    logging.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auc %s%s",
                 completed, train_loss, train_accuracy, validation["loss"],
                 validation["accuracy"], _format_metric(validation["roc_auc"]),
                 " (best)" if is_best else "")
    if loop.stopped_early:
      logging.info("Early stopping after epoch %d (%s did not improve for %d epochs).",
                   completed, stopping.metric, stopping.patience)
      break
    if completed < config.num_epochs and sigterm.agreed(num_processes):
      raise preempted(f"Stopped on SIGTERM after epoch {completed}, checkpointed in "
                      f"{store.directory}. Run the same command again to continue.")

  profiler.stop()  # a run that ends before the last profiled step
  if validation_seconds:  # epochs trained now (a finished run keeps its recorded timings)
    phases["train/steps"] = {"wall_seconds": step_seconds, "compile_seconds": compile_seconds}
    phases["train/validation"] = {
        "wall_seconds": sum(validation_seconds), "compile_seconds": timing.compile_estimate(
            validation_seconds[0], float(np.mean(validation_seconds[1:])))
        if len(validation_seconds) > 1 else None}
    if summary_seconds:
      phases["train/summary_images"] = {"wall_seconds": summary_seconds}
  phase_start = time.perf_counter()
  best_state, best_metadata = store.restore_best(state)
  test_source = sources[dataset.test_split]
  present = [key for key in results.RECORD_FEATURES if key in test_source.__getitems__([0])[0]]
  single = jax.process_count() == 1
  test_features: dict[str, np.ndarray] = {}
  test, test_logits, test_labels = evaluate(
      best_state, host_source(test_source, eval_batch_size), eval_fn=eval_fn,
      batch_size=eval_batch_size, label_key=dataset.label_key, split=dataset.test_split,
      warned=warned, feature_keys=present if single else (), features=test_features, **inputs)
  if not single:  # host batches hold this process's rows only: read the features in order
    test_features = pipeline.read_features(test_source, present)
  test_features = {key: results.text_column(value, components.feature_names(features, key))
                   for key, value in test_features.items()}
  store.close()
  phases["train/test"] = {"wall_seconds": time.perf_counter() - phase_start}
  writer.scalars(int(state.step), summaries.numeric_items(test, "test/"))
  writer.flush()
  result = {"selected_epoch": best_metadata["loop"]["best_epoch"],
            "selection_metric": selection_metric, "epochs_run": loop.epoch,
            "stopped_early": loop.stopped_early, "validation": best_metadata["record"],
            "test": test, "train_wall_seconds": time.time() - run_start,
            "num_parameters": base.parameter_count({"params": best_state.params}),
            "devices": [str(device) for device in jax.devices()],
            "num_devices": parallel.num_shards(mesh), "num_processes": jax.process_count(),
            "global_batch_size": config.batch_size,
            "per_device_batch_size": config.batch_size // parallel.num_shards(mesh),
            "eval_batch_size": eval_batch_size, "accumulation_steps": accumulation_steps,
            "compute_dtype": fine_tuning["compute_dtype"], "class_names": names,
            **results.grouped_metrics(test_labels, test_logits, test_features, "test", warned)}
  if init_report is not None:
    result["init_from"] = {k: v for k, v in init_report.items() if k != "kept_from_init"}
    result["init_from"]["kept_from_init"] = len(init_report["kept_from_init"])
  checkpoint.save_variables(
      os.path.join(workdir, runs.SELECTED_MODEL_DIR), best_state.variables,
      {"model_config": config.model.to_dict(), "selected_epoch": result["selected_epoch"],
       "kept_from_init": []})
  if lead:
    for phase, fields in phases.items():
      timing.record_phase(workdir, phase, **fields)
    metrics_lib.write_json(os.path.join(workdir, "metrics.json"), result)
    metrics_lib.write_json(os.path.join(workdir, runs.SPLITS_FILE),
                           {"class_names": names, "counts": counts,
                            "provenance": provenance})
    results.write_predictions(os.path.join(workdir, runs.PREDICTIONS_FILE), test_labels,
                              test_logits, test_features)
  logging.info("Test (epoch %d): accuracy %.4f, ROC AUC %s, kappa %s.",
               result["selected_epoch"], test["accuracy"], _format_metric(test["roc_auc"]),
               _format_metric(test["cohen_kappa"]))
  if "test_by_study" in result:
    study = result["test_by_study"]
    logging.info("Test, study level (%d studies): accuracy %.4f, ROC AUC %s, kappa %s.",
                 study["num_examples"], study["accuracy"], _format_metric(study["roc_auc"]),
                 _format_metric(study["cohen_kappa"]))
  return result

