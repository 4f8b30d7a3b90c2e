"""train(model_config, train_config, workdir): data, strategy, fit, checkpoints, evaluation.

What a run leaves in `workdir`:
  last.keras, best.keras   the model after the last epoch and at the best validation loss
  metrics.csv              per-epoch training and validation metrics (per-example nats)
  logs/                    TensorBoard event files
  backup/                  Keras BackupAndRestore state; a rerun resumes from it
  results.json             final test metrics of the last model
  reconstructions.png, samples.png (and manifold.png for a 2-D latent space)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfvae import data as data_lib
from tfvae import evaluation, plots
from tfvae.config import ConfigError, ModelConfig, TrainConfig
from tfvae.files import atomic_path
from tfvae.model import VAE, loops_steps_under
from tfvae.optimizers import FusedAdam, FusedAdamW


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; the message names the metric and what to try."""


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the trained model, its history and its test metrics.

  is_chief is False on the non-chief workers of a multi-worker run, whose workdir is
  <workdir>/workers/<task>; only the chief should export.
  """

  vae: VAE
  history: dict[str, list[float]]
  test_metrics: dict[str, Any]
  workdir: pathlib.Path
  is_chief: bool = True


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
  """The optimizer named by config.optimizer, with its learning rate and weight decay."""
  kwargs = {"learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay or None}
  if config.optimizer == "adamw":
    kwargs["weight_decay"] = config.weight_decay  # AdamW always decays; 0 turns it off.
  return {
      "adam": FusedAdam,
      "adamw": FusedAdamW,
      "adagrad": keras.optimizers.Adagrad,
      "sgd": keras.optimizers.SGD,
      "rmsprop": keras.optimizers.RMSprop,
  }[config.optimizer](**kwargs)


def default_step_shards() -> int:
  """2 concurrent batch shards on a multi-core CPU-only machine, else 1 (whole batches).

  On the 2-core CPU of docs/BENCHMARKS.md, two shards with one thread per op trained the
  784-400-20 VAE faster than whole batches with two threads per op: the two branches keep both
  cores busy without the per-op thread hand-offs. Accelerators want the whole batch.
  """
  accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
  return 2 if not accelerators and data_lib.available_cores() >= 2 else 1


def configure_threads(train_config: TrainConfig, step_shards: int) -> None:
  """Sets TensorFlow's threads per op from train_config.intra_op_threads (0: see TrainConfig).

  TensorFlow fixes its thread pools when it runs its first op. An explicit setting that comes
  too late raises ConfigError; the automatic one is then skipped with a log line.
  """
  threads = train_config.intra_op_threads
  explicit = threads > 0
  if not explicit and step_shards > 1:
    threads = max(1, data_lib.available_cores() // step_shards)
  if not threads:
    return
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
  except RuntimeError as e:
    if explicit:
      raise ConfigError(f"intra_op_threads={threads} cannot be applied: TensorFlow already"
                        f" ran an op in this process ({e}); set it before any TensorFlow work,"
                        f" or leave it at 0") from e
    logging.info("Keeping TensorFlow's threads per op (%s); it was initialized already.", e)


def choose_steps_per_execution(steps_per_epoch: int, limit: int,
                               loops_supported: bool = True) -> int:
  """The largest divisor of steps_per_epoch up to limit; 1 where steps cannot loop in a call.

  train() runs this many steps per call into the compiled graph, so every epoch must be whole
  calls: a call that overran the epoch would shift every later epoch's data. loops_supported
  is False under a strategy other than default, mirrored and multi_worker (tpu), where Keras's
  own multi-step function runs and fails ("You must feed a value for placeholder tensor" with
  Keras 3.15 under mirrored; not tried on a TPU): there it is 1, with a warning.
  """
  if not loops_supported and limit > 1:
    logging.warning("steps_per_execution=%d is not supported under this distribution strategy;"
                    " using 1 (it is under default, mirrored and multi_worker).", limit)
    return 1
  return max(d for d in range(1, min(limit, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]},'
                      ' "task": {"type": "worker", "index": 0}}')


def make_strategy(name: str) -> tf.distribute.Strategy:
  """default | mirrored (all local devices) | multi_worker (TF_CONFIG) | tpu.

  Raises:
    ConfigError: TF_CONFIG is not a valid cluster, or no TPU is found.
  """
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    try:
      return tf.distribute.MultiWorkerMirroredStrategy()
    except ValueError as e:  # TF_CONFIG that is not JSON, or names no valid task
      raise ConfigError(
          f"strategy=multi_worker cannot use TF_CONFIG={os.environ.get('TF_CONFIG')!r}:"
          f" {str(e).rstrip('.')}."
          f" Set TF_CONFIG on each machine to the cluster and that machine's task, e.g."
          f" {_TF_CONFIG_EXAMPLE} (index 1 on the second), or unset it to train on this"
          f" machine alone") from e
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise ConfigError(f"strategy=tpu found no TPU ({e}): run on a Cloud TPU VM, or set"
                        f" TPU_NAME to the TPU's name or grpc:// address; without a TPU, use"
                        f" --strategy=default or mirrored") from e
    return tf.distribute.TPUStrategy(resolver)
  raise ConfigError(f"strategy={name!r} is not one of default, mirrored, multi_worker, tpu")


_CPUINFO = pathlib.Path("/proc/cpuinfo")
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of instructions that compute in bfloat16.
_BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_lacks_bfloat16() -> bool:
  """True where /proc/cpuinfo lists the CPU's flags and none is a bfloat16 instruction set.

  Without them TensorFlow emulates bfloat16 arithmetic: on the Ice Lake CPU of
  docs/BENCHMARKS.md, the 784-400-20 VAE trained 2.5 times slower under mixed_bfloat16 than in
  float32. False where nothing is known (no /proc/cpuinfo, no flags line).
  """
  try:
    text = _CPUINFO.read_text()
  except OSError:
    return False
  cpu_flags = set()
  for line in text.splitlines():
    name, _, value = line.partition(":")
    if name.strip() in ("flags", "Features"):
      cpu_flags.update(value.split())
  return bool(cpu_flags) and not cpu_flags & _BFLOAT16_CPU_FLAGS


def mixed_precision_policy() -> str:
  """The Keras policy of --mixed_precision here: mixed_float16 on a GPU, else mixed_bfloat16.

  float16 needs loss scaling (its smallest normal number is 6e-5, where small gradients
  underflow) and is what GPUs compute fastest; bfloat16 has float32's range and is what TPUs
  and recent CPUs compute in.
  """
  return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
  """Builds layers under mixed_precision_policy() when asked.

  Layers keep the policy they were built with, so the global policy is restored afterwards.
  Encoder and Decoder cast network outputs to float32, so the KL, log-likelihood and ELBO stay
  float32; under mixed_float16, Keras's compile wraps the optimizer in a LossScaleOptimizer.
  """
  previous = keras.mixed_precision.global_policy()
  if mixed_precision:
    policy = mixed_precision_policy()
    keras.mixed_precision.set_global_policy(policy)
    if (policy == "mixed_bfloat16" and not tf.config.list_logical_devices("TPU")
        and cpu_lacks_bfloat16()):
      logging.warning("mixed precision computes in bfloat16 on this CPU, which has no bfloat16"
                      " instructions (%s in /proc/cpuinfo), so TensorFlow emulates them and"
                      " training is slower than in float32 (2.5 times, docs/BENCHMARKS.md)."
                      " Leave mixed precision (--mixed_precision) off on this machine.",
                      " or ".join(sorted(_BFLOAT16_CPU_FLAGS)))
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's outputs: always, except a non-chief worker."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  if resolver.task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def model_config_for(dataset: data_lib.Dataset, **overrides) -> ModelConfig:
  """A ModelConfig whose image_shape is the dataset's."""
  return ModelConfig(image_shape=dataset.image_shape, **overrides)


class StopOnNonFinite(keras.callbacks.Callback):
  """Raises NonFiniteLossError as soon as a logged metric is NaN or Inf.

  Checked after every steps_per_execution block and at epoch end, before the checkpoint
  callbacks run, so a broken model is never saved over a good one.
  """

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

  def on_train_batch_end(self, batch, logs=None):
    self._check(logs, f"at step {batch + 1}")

  def on_epoch_end(self, epoch, logs=None):
    self._check(logs, f"in epoch {epoch + 1}")


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
      _write_json(self.directory / self.STATE_FILE, {"best": value, "epoch": epoch + 1})


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
          dataset: data_lib.Dataset | None = None, verbose: str | int = "auto",
          callbacks: list[keras.callbacks.Callback] | None = None) -> TrainResult:
  """Trains a VAE, checkpoints it, evaluates it on the test split and writes pictures.

  Args:
    model_config: the model; its image_shape must match the data.
    train_config: data, optimization and randomness.
    workdir: folder for checkpoints, logs, metrics and pictures (created if needed). A workdir
      holding backup/ from an interrupted run resumes from its last finished epoch.
    dataset: already loaded data; by default loaded from train_config.
    verbose: Keras fit verbosity.
    callbacks: extra Keras callbacks.

  Returns:
    A TrainResult.

  Raises:
    ConfigError: the model does not fit the data.
    tfvae.data.DataError: the data cannot be loaded.
    NonFiniteLossError: training diverged; workdir keeps the last good checkpoints.
  """
  # First: thread pools and multi-worker collectives are fixed when TensorFlow runs its first op.
  step_shards = train_config.step_shards or default_step_shards()
  configure_threads(train_config, step_shards)
  strategy = make_strategy(train_config.strategy)
  chief = is_chief(strategy)
  workdir = pathlib.Path(workdir)
  if not chief:  # other workers keep their own state, out of the chief's way
    task = strategy.cluster_resolver
    workdir = workdir / "workers" / f"{task.task_type}_{task.task_id}"
  workdir.mkdir(parents=True, exist_ok=True)
  if dataset is None:
    dataset = data_lib.load(train_config.dataset, train_config.data_dir,
                            train_config.max_examples)
  if tuple(model_config.image_shape) != dataset.image_shape:
    raise ConfigError(f"model image_shape {model_config.image_shape} does not match the"
                      f" {dataset.name} images {dataset.image_shape}; build the config with"
                      f" tfvae.training.model_config_for(dataset)")
  keras.utils.set_random_seed(train_config.seed)
  backup_dir = workdir / "backup"
  first_epoch = resume_epoch(backup_dir)
  if first_epoch == 0:  # a fresh run: forget any finished run's per-epoch records
    for stale in ("metrics.csv", AtomicCheckpoint.STATE_FILE):
      (workdir / stale).unlink(missing_ok=True)
  else:
    logging.info("Resuming %s after epoch %d.", workdir, first_epoch)
  bernoulli = model_config.likelihood == "bernoulli"
  dataset_name, num_train = dataset.name, len(dataset.x_train)
  steps = data_lib.steps_per_epoch(num_train, train_config.batch_size)
  # Without a strategy each call into the compiled graph takes one block of its steps' batches,
  # fed as one element [K, M, H, W, C]: a tf.data element per step cost about 15% of the speed
  # on a 2-core CPU. Under a strategy, which splits each element's first axis across replicas,
  # elements are batches and the model loops over steps_per_call of them (VAE._replicated_steps).
  blocks = train_config.strategy == "default"
  steps_per_call = choose_steps_per_execution(
      steps, train_config.steps_per_execution,
      loops_supported=blocks or loops_steps_under(strategy))
  steps_per_block = steps_per_call if blocks else 1
  elements_per_epoch = steps // steps_per_block  # what Keras counts as steps
  train_data = data_lib.train_pipeline(dataset.x_train, train_config.batch_size,
                                       train_config.seed,
                                       dynamic_binarization=bernoulli and not dataset.binary,
                                       first_epoch=first_epoch, steps_per_block=steps_per_block)
  x_test = data_lib.eval_arrays(dataset.x_test, bernoulli, dataset.binary)
  # The pipeline holds its own TensorFlow copy of the training images: when train() loaded the
  # data itself, dropping this reference frees the numpy copy (47 MB for MNIST).
  del dataset
  test_data = data_lib.eval_pipeline(x_test, train_config.batch_size, steps_per_block)
  if strategy.num_replicas_in_sync > 1:
    # Keras's multi-worker input handling runs collectives, which take no uint8 tensors.
    train_data, test_data = (pipeline.map(data_lib.to_unit_float)
                             for pipeline in (train_data, test_data))

  with strategy.scope(), dtype_policy(train_config.mixed_precision):
    vae = VAE(model_config, seed=train_config.seed, step_shards=step_shards)
    vae.compile(optimizer=make_optimizer(train_config),
                steps_per_execution=1 if blocks else steps_per_call)

  all_callbacks = [
      StopOnNonFinite(),
      keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
      AtomicCheckpoint(workdir),
      keras.callbacks.CSVLogger(str(workdir / "metrics.csv"), append=True),
      keras.callbacks.TensorBoard(str(workdir / "logs"), write_graph=False,
                                  profile_batch=0),
      *(callbacks or []),
  ]
  logging.info("Training on %d %s images %s for %d epochs of %d steps, %d steps per call"
               " (Keras's progress counts %s: %d an epoch).", num_train, dataset_name,
               model_config.image_shape, train_config.epochs, steps, steps_per_call,
               "blocks of batches" if blocks else "steps", elements_per_epoch)
  history = vae.fit(train_data, validation_data=test_data, epochs=train_config.epochs,
                    steps_per_epoch=elements_per_epoch,
                    callbacks=all_callbacks, verbose=verbose, shuffle=False)

  test_metrics = evaluation.evaluate(vae, x_test, train_config.eval_num_samples,
                                     seed=train_config.seed, batch_size=train_config.batch_size)
  test_metrics.update(dataset=dataset_name, split="test")
  _write_json(workdir / "results.json", {
      "test": test_metrics, "model_config": model_config.to_dict(),
      "train_config": dataclasses.asdict(train_config)})
  plots.save_reconstructions(vae, x_test, workdir / "reconstructions.png")
  plots.save_samples(vae, workdir / "samples.png", seed=train_config.seed)
  if model_config.latent_size == 2:
    plots.save_manifold(vae, workdir / "manifold.png")
  return TrainResult(vae=vae, history=history.history, test_metrics=test_metrics,
                     workdir=workdir, is_chief=chief)


def _write_json(path: pathlib.Path, values: dict[str, Any]) -> None:
  with atomic_path(path) as temporary:
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
