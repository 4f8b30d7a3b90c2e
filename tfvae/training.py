"""train(model_config, train_config, workdir): data, strategy, fit, checkpoints, evaluation.

What a run leaves in `workdir`:
  last.keras, best.keras   the model after the last epoch and at the best validation loss
                           (the training loss when there is no validation split)
  metrics.csv              per-epoch training and validation metrics (per-example nats)
  logs/                    TensorBoard event files
  backup/                  Keras BackupAndRestore state; a rerun resumes from it
  results.json             final test metrics of the last model
  reconstructions.png, samples.png (and manifold.png for a 2-D latent space)
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import shutil
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfvae import data as data_lib
from tfvae import evaluation, networks, plots, runs
from tfvae.config import ConfigError, ModelConfig, TrainConfig
from tfvae.distributions import LIKELIHOODS
from tfvae.files import atomic_path, write_json
from tfvae.model import VAE
from tfvae.runtime import Runtime, is_chief


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; the message names the metric and what to try."""


class DiskFullError(OSError):
  """Too little space left for an epoch's checkpoints; the message says what was kept."""


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the trained model, its history and its test metrics.

  is_chief is False on the non-chief workers of a multi-worker run, whose workdir is
  <workdir>/workers/<task>; only the chief should export. already_done is True when the
  workdir held this run finished: nothing was trained, and vae is its last.keras.
  """

  vae: VAE
  history: dict[str, list[float]]
  test_metrics: dict[str, Any]
  workdir: pathlib.Path
  is_chief: bool = True
  already_done: bool = False


BURDA_STAGES = 8  # Burda et al.'s schedule: 3^0 + ... + 3^7 = 3,280 epochs


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
  """config.learning_rate, or the keras.optimizers.schedules schedule config.lr_schedule names."""
  rate, total = config.learning_rate, config.epochs * steps_per_epoch
  schedules = keras.optimizers.schedules
  if config.lr_schedule == "constant":
    return rate
  if config.lr_schedule == "burda":
    ends = np.cumsum([3**i for i in range(BURDA_STAGES)]) * steps_per_epoch  # stage ends
    # Keras gives values[i] up to and including boundaries[i]; step `end` starts the next stage.
    return schedules.PiecewiseConstantDecay(
        [int(end) - 1 for end in ends[:-1]], [rate * 10 ** (-i / 7) for i in range(BURDA_STAGES)])
  if config.lr_schedule == "cosine":
    return schedules.CosineDecay(rate, decay_steps=total)
  return schedules.ExponentialDecay(rate, decay_steps=total, decay_rate=0.01)


def make_optimizer(config: TrainConfig, steps_per_epoch: int = 1) -> keras.optimizers.Optimizer:
  """The optimizer named by config.optimizer, with its learning rate (schedule), epsilon and
  weight decay; steps_per_epoch sizes the schedules."""
  kwargs = {"learning_rate": learning_rate_schedule(config, steps_per_epoch),
            "weight_decay": config.weight_decay or None}
  if config.optimizer in ("adam", "adamw"):
    kwargs["epsilon"] = config.adam_epsilon
  if config.optimizer == "adamw":
    kwargs["weight_decay"] = config.weight_decay  # AdamW always decays; 0 turns it off.
  return {
      "adam": keras.optimizers.Adam,
      "adamw": keras.optimizers.AdamW,
      "adagrad": keras.optimizers.Adagrad,
      "sgd": keras.optimizers.SGD,
      "rmsprop": keras.optimizers.RMSprop,
  }[config.optimizer](**kwargs)


def model_config_for(dataset: data_lib.Dataset, **overrides) -> ModelConfig:
  """A ModelConfig whose image_shape is the dataset's; vectors are standardized for Gaussian
  likelihoods unless overrides say otherwise."""
  likelihood = overrides.get("likelihood", ModelConfig.likelihood)
  overrides.setdefault("standardize",
                       dataset.vectors and LIKELIHOODS[likelihood].data == "real")
  return ModelConfig(image_shape=dataset.image_shape, **overrides)


class StopOnNonFinite(keras.callbacks.Callback):
  """Raises NonFiniteLossError as soon as a logged metric is NaN or Inf.

  Checked after every call into the graph (steps_per_execution optimizer steps) and at epoch
  end, before the checkpoint callbacks run, so a broken model is never saved over a good one.
  """

  def __init__(self):
    super().__init__()
    self._epoch, self._first_step = 0, 0

  def _check(self, logs, where: str):
    for name, value in (logs or {}).items():
      value = float(value)
      if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{name} became {value} {where}; stopped, and the last good checkpoint is kept."
            f" Try a lower --learning_rate (now {self._learning_rate()}), or a likelihood that"
            f" suits the data (bernoulli for binary pixels, gaussian for grey levels)")

  def _learning_rate(self) -> str:
    try:
      # convert_to_numpy: float() fails on a variable created under a distribution strategy.
      # A schedule's learning_rate is its current value.
      return f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):g}"
    except (TypeError, ValueError, AttributeError):
      return "unknown"

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_begin(self, batch, logs=None):
    self._first_step = batch

  def on_train_batch_end(self, batch, logs=None):
    # Keras numbers a call's steps within the epoch; the last call of an epoch may run fewer.
    last = min(batch, ((self.params or {}).get("steps") or batch + 1) - 1)
    steps = (f"optimizer step {last + 1}" if last == self._first_step else
             f"optimizer steps {self._first_step + 1}-{last + 1}")
    self._check(logs, f"in {steps} of epoch {self._epoch + 1}")

  def on_epoch_end(self, epoch, logs=None):
    self._check(logs, f"in epoch {epoch + 1}")


class DiskSpaceCheck(keras.callbacks.Callback):
  """Stops before an epoch's checkpoints are written where the disk has no room for them.

  A checkpoint written to a full disk can crash inside HDF5 and leave a truncated backup, so
  the room for all of the epoch's files is checked first: backup/, last.keras and best.keras,
  each beside its previous copy until renamed, at the size of the model and optimizer state.
  """

  def __init__(self, workdir: pathlib.Path):
    super().__init__()
    self.workdir = workdir
    self._epochs_done = 0

  def on_train_begin(self, logs=None):
    variables = [*self.model.variables, *self.model.optimizer.variables]
    state = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    self._needed = 3 * 2 * state + 2**20  # three files, each beside its old copy; 1 MiB slack

  def on_epoch_begin(self, epoch, logs=None):
    self._epochs_done = epoch

  def on_epoch_end(self, epoch, logs=None):
    needed = self._needed
    free = shutil.disk_usage(self.workdir).free
    if free < needed:
      kept = (f"the checkpoints of epoch {self._epochs_done}" if self._epochs_done
              else "nothing yet (no epoch had finished)")
      raise DiskFullError(errno.ENOSPC,
                          f"{self.workdir}: {free / 2**20:.1f} MiB free, and epoch {epoch + 1}'s"
                          f" checkpoints need about {needed / 2**20:.1f} MiB; stopped before"
                          f" writing them, keeping {kept}. Free some space and run the same"
                          f" command to resume")


class LowerBoundCurve(keras.callbacks.Callback):
  """Records the train and test lower bound against the number of training samples seen.

  The curves of Kingma & Welling's Figure 2: every `every_epochs` epochs, the per-example ELBO
  (L = 1, fixed seed) of fixed train and test arrays.

  Attributes:
    rows: dicts with samples_seen, epoch, train_elbo and test_elbo.
  """

  def __init__(self, x_train_eval: np.ndarray, x_test_eval: np.ndarray,
               examples_per_epoch: int, batch_size: int, every_epochs: int = 1, seed: int = 0):
    super().__init__()
    self.x_train_eval, self.x_test_eval = x_train_eval, x_test_eval
    self.examples_per_epoch = examples_per_epoch
    self.batch_size, self.every_epochs, self.seed = batch_size, every_epochs, seed
    self.rows: list[dict[str, float]] = []

  def on_epoch_end(self, epoch, logs=None):
    if (epoch + 1) % self.every_epochs:
      return
    train = evaluation.evaluate(self.model, self.x_train_eval, 0, self.seed, self.batch_size)
    test = evaluation.evaluate(self.model, self.x_test_eval, 0, self.seed, self.batch_size)
    self.rows.append({"samples_seen": (epoch + 1) * self.examples_per_epoch, "epoch": epoch + 1,
                      "train_elbo": train["elbo"], "test_elbo": test["elbo"]})


class AtomicCheckpoint(keras.callbacks.Callback):
  """Saves last.keras every epoch and best.keras on a new best `monitor`, atomically.

  Each file is written beside its target and renamed over it, so a crash mid-save leaves the
  previous file intact. The best value so far is kept in checkpoint_state.json, so a resumed
  run does not replace best.keras with a worse model.
  """

  STATE_FILE = "checkpoint_state.json"

  def __init__(self, directory: str | os.PathLike, monitor: str = "val_loss"):
    super().__init__()
    self.directory = pathlib.Path(directory)
    self.monitor = monitor
    state = self.directory / self.STATE_FILE
    self.best = json.loads(state.read_text())["best"] if state.is_file() else math.inf

  def _save(self, name: str) -> None:
    with atomic_path(self.directory / name) as temporary:
      self.model.save(temporary)

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    self._save("last.keras")
    value = float(logs.get(self.monitor, logs.get("loss", math.inf)))
    if value < self.best:
      self.best = value
      self._save("best.keras")
      write_json(self.directory / self.STATE_FILE, {"best": value, "epoch": epoch + 1})


def resume_epoch(backup_dir: pathlib.Path) -> int:
  """Epochs finished by an interrupted run whose BackupAndRestore state is in backup_dir."""
  metadata = backup_dir / "training_metadata.json"
  if not metadata.is_file():
    return 0
  try:
    return int(json.loads(metadata.read_text())["epoch"])
  except (ValueError, KeyError, TypeError):
    return 0  # unreadable: BackupAndRestore falls back to its previous copy or starts over


def train(model_config: ModelConfig, train_config: TrainConfig, workdir: str | os.PathLike,
          dataset: data_lib.Dataset | tf.data.Dataset | None = None, runtime: Runtime | None = None,
          verbose: str | int = "auto", callbacks: list[keras.callbacks.Callback] | None = None,
          restart: bool = False) -> TrainResult:
  """Trains a VAE, checkpoints it, evaluates it on the test split and writes pictures.

  The workdir belongs to one run (tfvae.runs): the same configuration resumes an interrupted
  run, continues a finished one to a larger train_config.epochs, and returns a finished one
  as it is (already_done); another configuration is refused unless restart.

  Args:
    model_config: the model; its image_shape must match the data.
    train_config: data, optimization and randomness.
    workdir: folder for checkpoints, logs, metrics and pictures (created if needed).
    dataset: already loaded data (a tfvae.data.Dataset), or a tf.data.Dataset of images,
      (images, labels) or dicts with an "image" key (tfvae.data.from_tf_data: its first 10% is
      the test split); by default loaded from train_config. Its validation split is settled
      by train_config.validation_examples.
    runtime: how this machine runs the training (tfvae.runtime.Runtime); by default
      Runtime.plain(), Keras as it comes. bin/train passes Runtime(), tuned for the machine.
    verbose: Keras fit verbosity.
    callbacks: extra Keras callbacks.
    restart: remove the run in workdir first and start over.

  Returns:
    A TrainResult.

  Raises:
    ConfigError: the model does not fit the data.
    tfvae.runs.WorkdirError: the workdir holds another run or is in use by another process.
    tfvae.data.DataError: the data cannot be loaded.
    NonFiniteLossError: training diverged; workdir keeps the last good checkpoints.
  """
  runtime = runtime or Runtime.plain()
  runtime.configure_threads()  # first: TensorFlow fixes its thread pools at its first op
  strategy = runtime.make_strategy()
  workdir, chief = _workdir_of_this_task(workdir, strategy)
  with runs.Lock(workdir):
    if restart:
      runs.restart(workdir)
    dataset = _dataset(dataset, train_config)
    check_model_fits(model_config, dataset)
    run = runs.identity(model_config, train_config, runs.data_fingerprint(dataset))
    # The backup's epochs, or a finished run's (run.json), are where training starts.
    standing = runs.check(workdir, run, resume_epoch(workdir / "backup"))
    if standing.finished:
      logging.info("%s holds this run, finished: nothing to train.", workdir)
      results = json.loads((workdir / "results.json").read_text())
      return TrainResult(vae=keras.saving.load_model(workdir / "last.keras"), history={},
                         test_metrics=results["test"], workdir=workdir, is_chief=chief,
                         already_done=True)
    first_epoch = _resume_or_start(workdir, standing)
    feeds = _Feeds.of(dataset, model_config, train_config, runtime, strategy, first_epoch)
    del dataset  # the training pipeline holds its own copy of the images
    result = _fit_and_report(model_config, train_config, workdir, runtime, strategy, feeds,
                             first_epoch, verbose, callbacks)
    runs.record_epochs(workdir, train_config.epochs)
  return dataclasses.replace(result, is_chief=chief)


def _dataset(dataset, train_config: TrainConfig) -> data_lib.Dataset:
  """The run's data, loaded from train_config unless given, its validation split settled."""
  if dataset is None:
    return data_lib.load(train_config.dataset, train_config.data_dir, train_config.max_examples,
                         train_config.validation_examples, train_config.image_size)
  if isinstance(dataset, tf.data.Dataset):
    dataset = data_lib.from_tf_data(dataset)
  return data_lib.with_validation(dataset, train_config.validation_examples)


@dataclasses.dataclass(frozen=True)
class _Feeds:
  """What fit and the report read of the data."""

  train: tf.data.Dataset  # endless training batches, as the runtime feeds them
  steps: int  # optimizer steps an epoch
  steps_per_call: int
  validation: tf.data.Dataset | None  # the validation batches, once, for model selection
  test: tf.data.Dataset  # the fixed test batches, once, for the report
  test_head: np.ndarray  # the first test examples, for pictures
  train_split: data_lib.Split  # for the standardization statistics
  name: str
  num_train: int

  @classmethod
  def of(cls, dataset, model_config, train_config, runtime, strategy, first_epoch) -> _Feeds:
    binary_likelihood = LIKELIHOODS[model_config.likelihood].data == "binary"
    binarize = binary_likelihood and not dataset.binary
    step_flops = networks.training_flops(
        model_config, networks.build_encoder_network(model_config),
        networks.build_decoder_network(model_config), train_config.batch_size)
    train, steps_per_call = runtime.training_stream(
        dataset.train, train_config.batch_size, train_config.seed,
        dynamic_binarization=binarize, strategy=strategy, first_epoch=first_epoch,
        step_flops=step_flops)

    def fixed(split):
      return data_lib.eval_batches(split, train_config.batch_size, binary_likelihood,
                                   dataset.binary)

    validation = (runtime.feed(fixed(dataset.validation), strategy)
                  if dataset.validation is not None else None)
    return cls(train, data_lib.steps_per_epoch(dataset.train.count, train_config.batch_size),
               steps_per_call, validation, fixed(dataset.test),
               data_lib.eval_head(dataset.test, 32, binary_likelihood, dataset.binary),
               dataset.train, dataset.name, dataset.train.count)


def _fit_and_report(model_config, train_config, workdir, runtime, strategy, feeds: _Feeds,
                    first_epoch, verbose, callbacks) -> TrainResult:
  keras.utils.set_random_seed(train_config.seed)
  with runtime.scope(strategy):
    if first_epoch and not (workdir / "backup").is_dir():  # a finished run, continued
      vae = keras.saving.load_model(workdir / "last.keras")
      if train_config.lr_schedule in ("cosine", "exponential"):
        # Sized for the old last epoch; resized to the new one, its rate rises again.
        vae.optimizer.learning_rate = learning_rate_schedule(train_config, feeds.steps)
        logging.info("Continuing with the %s schedule resized to %d epochs.",
                     train_config.lr_schedule, train_config.epochs)
    else:
      vae = VAE(model_config, seed=train_config.seed)
      vae.compile(optimizer=make_optimizer(train_config, feeds.steps))
      if model_config.standardize:  # a resumed run restores them with the weights
        vae.adapt(feeds.train_split)
      if train_config.init_output_bias:
        init_output_bias(vae, feeds.train_split)
  logging.info("Training on %d %s images %s for %d epochs of %d optimizer steps, %d steps per"
               " graph call.", feeds.num_train, feeds.name, model_config.image_shape,
               train_config.epochs, feeds.steps, feeds.steps_per_call)
  with runtime.attach(vae, feeds.steps_per_call):
    history = vae.fit(feeds.train, validation_data=feeds.validation, epochs=train_config.epochs,
                      initial_epoch=first_epoch, steps_per_epoch=feeds.steps, shuffle=False,
                      verbose=verbose,
                      callbacks=_callbacks(workdir, train_config, feeds.validation, callbacks))
  epochs_trained = first_epoch + len(history.history.get("loss", []))
  test_metrics = _report(vae, feeds, model_config, train_config, workdir, epochs_trained)
  return TrainResult(vae=vae, history=history.history, test_metrics=test_metrics,
                     workdir=workdir)


def _workdir_of_this_task(workdir, strategy) -> tuple[pathlib.Path, bool]:
  """The workdir, or <workdir>/workers/<task> on a non-chief worker; and whether chief."""
  chief = is_chief(strategy)
  workdir = pathlib.Path(workdir)
  if not chief:  # other workers keep their own state, out of the chief's way
    task = strategy.cluster_resolver
    workdir = workdir / "workers" / f"{task.task_type}_{task.task_id}"
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir, chief


def check_model_fits(model_config: ModelConfig, dataset: data_lib.Dataset) -> None:
  """Raises ConfigError, naming the fix, where model_config cannot model dataset's examples."""
  if tuple(model_config.image_shape) != dataset.image_shape:
    raise ConfigError(f"model image_shape {model_config.image_shape} does not match the"
                      f" {dataset.name} examples {dataset.image_shape}; build the config with"
                      f" tfvae.training.model_config_for(dataset)")
  channels = dataset.image_shape[-1]
  if (not dataset.vectors and channels > 1 and not dataset.binary
      and LIKELIHOODS[model_config.likelihood].data == "binary"):
    # Binarized, each channel keeps 1 bit of 8, too little for z to learn colour reliably.
    raise ConfigError(f"{dataset.name} holds images of {channels} channels, which"
                      f" likelihood={model_config.likelihood} would binarize channel by channel;"
                      f" it is for black-and-white pixels. Pass"
                      f" --likelihood=discretized_logistic (8-bit pixels) or gaussian")
  if dataset.vectors and model_config.likelihood == "bernoulli" and not dataset.binary:
    values = dataset.train.head(10_000)
    if values.min() < 0 or values.max() > 1:
      raise ConfigError(f"{dataset.name} holds real values in [{values.min():g},"
                        f" {values.max():g}], which the Bernoulli likelihood cannot model (it"
                        f" takes 0/1 values, or probabilities in [0, 1]); pass"
                        f" --likelihood=gaussian")
  if dataset.vectors and not model_config.standardize and (
      LIKELIHOODS[model_config.likelihood].data == "real"):
    raise ConfigError(f"{dataset.name} holds real-valued vectors: a Gaussian likelihood on them"
                      f" needs ModelConfig(standardize=True) (model_config_for sets it), or its"
                      f" means stay in (0, 1)")


def _resume_or_start(workdir: pathlib.Path, standing: runs.Standing) -> int:
  """The epoch to start at: after an interrupted run's last finished epoch, or after a
  finished run's last epoch when it continues, else 0."""
  first_epoch = standing.epochs_done
  if first_epoch == 0:  # a fresh run: forget any stale per-epoch records
    for stale in ("metrics.csv", AtomicCheckpoint.STATE_FILE):
      (workdir / stale).unlink(missing_ok=True)
  else:
    logging.info("Resuming %s after epoch %d.", workdir, first_epoch)
  return first_epoch


def init_output_bias(vae: VAE, train: data_lib.Split, batch_size: int = 1000) -> None:
  """Sets the Bernoulli decoder's output bias to logit(mean training pixel), clipped to [0.001,
  0.999] (Burda et al., 2015), so training starts from the data's marginals.

  Raises:
    ConfigError: not the Bernoulli likelihood, or a decoder network without a final layer
      named "likelihood_params" holding that bias.
  """
  if vae.model_config.likelihood != "bernoulli":
    raise ConfigError(f"init_output_bias is for the Bernoulli likelihood, not"
                      f" {vae.model_config.likelihood}")
  try:
    layer = vae.decoder.network.get_layer("likelihood_params")
  except ValueError:
    raise ConfigError("init_output_bias needs the decoder's last layer named"
                      " 'likelihood_params' (tfvae's own networks)") from None
  mean = np.clip(data_lib.moments(train, batch_size)[0], 0.001, 0.999)  # [H, W, C]
  logits = np.log(mean) - np.log1p(-mean)
  bias = layer.bias
  if tuple(bias.shape) != (logits.size,):  # a convolution: one bias per channel
    logits = logits.reshape(-1, bias.shape[0]).mean(axis=0)
  bias.assign(logits.reshape(bias.shape).astype(np.float32))


def _callbacks(workdir: pathlib.Path, train_config: TrainConfig, validation,
               extra) -> list[keras.callbacks.Callback]:
  stopping = ([keras.callbacks.EarlyStopping(monitor="val_loss",
                                             patience=train_config.early_stopping_patience)]
              if train_config.early_stopping_patience and validation is not None else [])
  return [
      StopOnNonFinite(),
      DiskSpaceCheck(workdir),
      keras.callbacks.BackupAndRestore(str(workdir / "backup"), double_checkpoint=True),
      AtomicCheckpoint(workdir),
      keras.callbacks.CSVLogger(str(workdir / "metrics.csv"), append=True),
      keras.callbacks.TensorBoard(str(workdir / "logs"), write_graph=False, profile_batch=0),
      *stopping,
      *(extra or []),
  ]


def _report(vae, feeds: _Feeds, model_config, train_config, workdir,
            epochs_trained: int) -> dict[str, Any]:
  """Test metrics into results.json, and the pictures (of images; vectors have none).

  A run that early stopping ended counts as finished; results.json says after which epoch.
  """
  test_metrics = evaluation.evaluate(vae, feeds.test, train_config.eval_num_samples,
                                     seed=train_config.seed, batch_size=train_config.batch_size)
  test_metrics.update(dataset=feeds.name, split="test")
  write_json(workdir / "results.json", {
      "test": test_metrics, "model_config": model_config.to_dict(),
      "train_config": dataclasses.asdict(train_config), "epochs_trained": epochs_trained,
      "stopped_early": epochs_trained < train_config.epochs})
  if model_config.event_ndims == 3:
    plots.save_reconstructions(vae, feeds.test_head, workdir / "reconstructions.png")
    plots.save_samples(vae, workdir / "samples.png", seed=train_config.seed)
    if model_config.latent_size == 2:
      plots.save_manifold(vae, workdir / "manifold.png")
  return test_metrics

