"""How this machine runs training: steps per call, fused Adam, threads, strategy, precision.

A tfvae.VAE trains one batch per `train_step` wherever it runs. A `Runtime` makes that fast on
a given machine from outside the model, the way an experiment wraps an untouched step function
in a scan and a pmap:

  steps per call   K training steps in one call into the compiled graph, fed as one block
                   [K, M, H, W, C] of K batches, since a tf.data element per step is costly
                   next to a small step; under mirrored and multi_worker, where Keras's
                   multi-step function fails, a graph loop over batches.
  batch shards     each batch split into concurrent branches of one step, so two CPU cores work
                   on one small batch without handing each op between threads.
  threads          TensorFlow's threads per op, matched to the shards.
  fused Adam       Keras's Adam update in one kernel per variable.
  fused group norm Keras's GroupNormalization compiled by XLA, which fuses its element-wise
                   ops over a conv net's feature maps; the rest of the step stays as it is.
  strategy         a tf.distribute strategy: mirrored, multi_worker or tpu.
  mixed precision  16-bit compute, float32 objective.

`train()` takes a Runtime; bin/train passes `Runtime()`, tuned for the machine it runs on.
From Python it is opt-in:

  runtime = tfvae.Runtime()                  # this machine's defaults
  runtime.configure_threads()                # before any TensorFlow work
  strategy = runtime.make_strategy()
  batches, steps_per_call = runtime.training_stream(x_train, batch_size, seed=0,
                                                    dynamic_binarization=True,
                                                    strategy=strategy)
  with runtime.scope(strategy):
    vae = tfvae.VAE(config)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
  with runtime.attach(vae, steps_per_call):
    vae.fit(batches, steps_per_epoch=len(x_train) // batch_size, epochs=10, shuffle=False)

Nothing here is saved with a model: `vae.save` and the SavedModel see the plain VAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib

import keras
import tensorflow as tf
from absl import logging

from tfvae import networks, objectives
from tfvae.config import ConfigError, require
from tfvae.data import steps_per_epoch, train_pipeline
from tfvae.data import to_unit_float as _to_unit_float

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# Work per call into the graph: about a second on a 2-core CPU; 100 times it with an
# accelerator.
FLOPS_PER_CALL = 1e11


def available_cores() -> int:
  """The CPU cores this process may run on (its affinity; all of the machine's elsewhere)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _has_accelerator() -> bool:
  return bool(tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU"))


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How to run training on this machine; see the module docstring.

  Attributes:
    strategy: "default", "mirrored" (all local devices), "multi_worker" (TF_CONFIG) or "tpu".
    mixed_precision: compute in mixed_float16 on a GPU, mixed_bfloat16 elsewhere; the
      objective stays float32.
    steps_per_execution: at most this many training steps per call into the compiled graph.
    step_shards: concurrent branches each batch is split into; 0 picks 2 on a multi-core CPU
      without an accelerator, else 1.
    intra_op_threads: TensorFlow's threads per op; 0 picks cores / shards when the batch is
      split, else TensorFlow's default. Takes effect only before TensorFlow's first op.
    fused_adam: update keras.optimizers.Adam and AdamW with one ResourceApplyAdam kernel per
      variable (the same update, in one pass over its memory instead of a dozen).
    fused_group_norm: compute the networks' keras.layers.GroupNormalization layers with XLA
      while training (the same function; exports and saved models stay XLA-free).
  """

  strategy: str = "default"
  mixed_precision: bool = False
  steps_per_execution: int = 100
  step_shards: int = 0
  intra_op_threads: int = 0
  fused_adam: bool = True
  fused_group_norm: bool = True

  def __post_init__(self):
    require(self.strategy in STRATEGIES,
            f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
    require(self.steps_per_execution >= 1,
            f"steps_per_execution={self.steps_per_execution} must be at least 1")
    require(self.step_shards >= 0,
            f"step_shards={self.step_shards} must be >= 0 (0 picks one for the machine)")
    require(self.intra_op_threads >= 0,
            f"intra_op_threads={self.intra_op_threads} must be >= 0 (0 picks a default)")

  @classmethod
  def plain(cls) -> Runtime:
    """Keras as it comes: one step per call, whole batches, TensorFlow's threads and Adam."""
    return cls(steps_per_execution=1, step_shards=1, fused_adam=False, fused_group_norm=False)

  @property
  def shards(self) -> int:
    """step_shards, with 0 resolved for this machine."""
    if self.step_shards:
      return self.step_shards
    return 2 if not _has_accelerator() and available_cores() >= 2 else 1

  @property
  def pipeline_threads(self) -> int:
    """Threads that make training batches: up to 8, the cores this process may use."""
    return min(8, available_cores())

  def configure_threads(self) -> None:
    """Sets TensorFlow's threads per op (see intra_op_threads).

    TensorFlow fixes its thread pools when it runs its first op. An explicit setting that comes
    too late raises ConfigError; the automatic one is then skipped with a log line.
    """
    threads = self.intra_op_threads
    explicit = threads > 0
    if not explicit and self.shards > 1:
      threads = max(1, available_cores() // self.shards)
    if not threads:
      return
    try:
      tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError as e:
      if explicit:
        raise ConfigError(f"intra_op_threads={threads} cannot be applied: TensorFlow already"
                          f" ran an op in this process ({e}); set it before any TensorFlow"
                          f" work, or leave it at 0") from e
      logging.info("Keeping TensorFlow's threads per op (%s); it was initialized already.", e)

  def make_strategy(self) -> tf.distribute.Strategy:
    return make_strategy(self.strategy)

  @contextlib.contextmanager
  def scope(self, strategy: tf.distribute.Strategy | None = None):
    """Builds models under the strategy and the mixed-precision policy."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope(), dtype_policy(self.mixed_precision):
      yield

  def steps_per_call(self, steps_per_epoch: int, step_flops: float | None = None) -> int:
    """Training steps per graph call for epochs of steps_per_epoch steps.

    step_flops, a training step's floating-point operations (tfvae.networks.training_flops),
    caps the steps so that a call does about FLOPS_PER_CALL of work, about a second here:
    Ctrl-C and the progress bar wait for the call in flight.

    Without a strategy: up to steps_per_execution, the epoch's last call taking what is left.
    Under mirrored and multi_worker, the batches come from one endless stream, so a call must
    not run past the epoch: the largest divisor of the epoch's steps up to the limit, with a
    warning when that is under half of it. Under tpu, 1 (Keras's multi-step function there is
    untested with tfvae).
    """
    limit = min(self.steps_per_execution, steps_per_epoch)
    if step_flops:
      budget = FLOPS_PER_CALL * (100 if _has_accelerator() else 1)
      limit = max(1, min(limit, int(budget // step_flops)))
    if self.strategy == "default":
      return limit
    if self.strategy == "tpu":
      if limit > 1:
        logging.warning("steps_per_execution=%d is not supported under strategy=tpu; using 1.",
                        limit)
      return 1
    divisor = max(d for d in range(1, limit + 1) if steps_per_epoch % d == 0)
    if divisor < limit / 2:
      logging.warning("Under strategy=%s an epoch of %d steps has no divisor between %d and %d,"
                      " so each graph call runs %d steps, which is slower; a batch size that"
                      " makes the epoch's steps a multiple of %d avoids it.", self.strategy,
                      steps_per_epoch, (limit + 1) // 2, limit, divisor, limit)
    return divisor

  def training_stream(self, images, batch_size: int, seed: int, dynamic_binarization: bool,
                      strategy: tf.distribute.Strategy, first_epoch: int = 0,
                      step_flops: float | None = None):
    """tfvae.data.train_pipeline as this runtime feeds it, and the steps per graph call
    (`steps_per_call`, step_flops the cost of one step).

    Returns:
      (dataset, steps_per_call): without a strategy, blocks [K, M, H, W, C] of K =
      steps_per_call consecutive batches, each epoch's last block holding what is left, so no
      block spans two epochs; under a strategy, which splits each element's first axis across
      replicas, batches. Pass steps_per_call to `attach` and the epoch's steps to fit.
    """
    steps = steps_per_epoch(len(images), batch_size)
    steps_per_call = self.steps_per_call(steps, step_flops)
    blocks = self.strategy == "default" and steps_per_call > 1
    # A static block size where it divides the epoch lets TensorFlow plan the loop once.
    whole = steps % steps_per_call == 0
    batches = train_pipeline(
        images, batch_size, seed, dynamic_binarization, first_epoch=first_epoch,
        epoch_transform=((lambda epoch: epoch.batch(steps_per_call, drop_remainder=whole))
                         if blocks else None),
        parallel_calls=self.pipeline_threads)
    return self.feed(batches, strategy), steps_per_call

  def feed(self, dataset: tf.data.Dataset, strategy: tf.distribute.Strategy) -> tf.data.Dataset:
    """dataset as the strategy takes it: float images where there are several replicas.

    Keras's multi-worker input handling runs collectives, which take no uint8 tensors.
    """
    if strategy.num_replicas_in_sync > 1:
      return dataset.map(_to_unit_float)
    return dataset

  @contextlib.contextmanager
  def attach(self, vae: keras.Model, steps_per_call: int = 1):
    """Trains and evaluates `vae` with this runtime's step functions while the context is open.

    Runs steps_per_call optimizer steps per call into the graph (Keras's steps_per_execution,
    set here rather than in compile so that a saved model does not carry it): one block of
    batches from `training_stream` per call without a strategy; under mirrored and
    multi_worker, a graph loop over batches; under tpu, Keras's own functions. With
    step_shards > 1, each batch's per-example terms are computed in that many independent
    branches; with fused_adam, a keras.optimizers.Adam or AdamW updates each variable in one
    kernel; with fused_group_norm, the networks' group normalizations run under XLA. All of it
    is undone on exit, so the model saves and exports as the plain VAE it is.
    """
    strategy = vae.distribute_strategy
    saved_steps = vae.steps_per_execution
    adam = _plain_adam(vae.optimizer) if self.fused_adam else None
    norms = _group_norms(vae) if self.fused_group_norm else []
    try:
      vae.steps_per_execution = steps_per_call
      if adam is not None:
        adam.update_step = functools.partial(_fused_adam_update, adam)
      for norm in norms:
        norm.call = functools.partial(_fused_group_norm, norm)
      if self.shards > 1:
        vae.per_example_terms = _sharded(vae.per_example_terms, self.shards)
      vae.train_function = vae.test_function = None
      if self.strategy == "default" and steps_per_call > 1:
        vae.train_function = _block_steps(vae)
      elif _loops_steps_under(strategy):
        vae.train_function = _replicated_steps(vae, vae.train_step)
        vae.test_function = _replicated_steps(vae, vae.test_step)
      yield vae
    finally:
      if adam is not None:
        del adam.update_step  # the class's own again
      for norm in norms:
        del norm.call
      vae.__dict__.pop("per_example_terms", None)
      vae.steps_per_execution = saved_steps
      vae.train_function = vae.test_function = None  # Keras builds its own when next needed


def _loops_steps_under(strategy: tf.distribute.Strategy) -> bool:
  """MirroredStrategy and MultiWorkerMirroredStrategy, the strategies tested with tfvae."""
  return isinstance(strategy, (tf.distribute.MirroredStrategy,
                               tf.distribute.MultiWorkerMirroredStrategy))


_FUSED_DTYPES = (tf.float32, tf.float64)


def _group_norms(vae: keras.Model) -> list[keras.layers.GroupNormalization]:
  """The channels-last, scaled and centred GroupNormalization layers of vae's networks."""
  return [layer for network in (vae.encoder.network, vae.decoder.network)
          for layer in networks.leaf_layers(network)
          if type(layer) is keras.layers.GroupNormalization and layer.axis == -1
          and layer.scale and layer.center]


def _fused_group_norm(layer: keras.layers.GroupNormalization, inputs):
  """layer(inputs), the normalization in one XLA cluster (Keras's runs each op on its own)."""
  return _group_norm_xla(inputs, layer.gamma.value, layer.beta.value, layer.groups,
                         layer.epsilon)


@tf.function(jit_compile=True)
def _group_norm_xla(inputs, gamma, beta, groups: int, epsilon: float):
  """Keras's GroupNormalization(groups, axis=-1, epsilon) of inputs [B, ..., C], with its
  statistics in float32 as Keras computes them:

    y = (x - mean_g) / sqrt(var_g + epsilon) * gamma + beta,

  mean_g and var_g over each example's values in the channels of group g.
  """
  shape = tf.shape(inputs)
  channels = inputs.shape[-1]
  grouped = tf.reshape(tf.cast(inputs, tf.float32),
                       tf.concat([shape[:-1], [groups, channels // groups]], 0))  # [B, ..., G, C/G]
  rank = inputs.shape.rank
  mean, variance = tf.nn.moments(grouped, [*range(1, rank - 1), rank], keepdims=True)
  scale = tf.math.rsqrt(variance + epsilon) * tf.reshape(tf.cast(gamma, tf.float32), [groups, -1])
  offset = tf.reshape(tf.cast(beta, tf.float32), [groups, -1]) - mean * scale
  return tf.cast(tf.reshape(grouped * scale + offset, shape), inputs.dtype)


def _plain_adam(optimizer):
  """The Adam or AdamW inside optimizer (a LossScaleOptimizer's too) that fuses, else None."""
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  if type(optimizer) in (keras.optimizers.Adam, keras.optimizers.AdamW) and not optimizer.amsgrad:
    return optimizer
  return None


def _fused_adam_update(optimizer, gradient, variable, learning_rate):
  """Keras's Adam update_step in one ResourceApplyAdam kernel:

    m <- m + (1 - beta_1) (g - m),  v <- v + (1 - beta_2) (g^2 - v)
    var <- var - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)

  AdamW's decoupled decay is applied by Keras before it, as for Keras's own update. Sparse
  gradients and dtypes the kernel does not take go to Keras's own update.
  """
  dtype = tf.as_dtype(variable.dtype)
  if isinstance(gradient, tf.IndexedSlices) or dtype not in _FUSED_DTYPES:
    return type(optimizer).update_step(optimizer, gradient, variable, learning_rate)
  index = optimizer._get_variable_index(variable)
  step = tf.cast(optimizer.iterations + 1, dtype)
  beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
  # Under tf.distribute, variable is this device's copy, and so are the slots' handles.
  tf.raw_ops.ResourceApplyAdam(
      var=variable.handle, m=optimizer._momentums[index].value.handle,
      v=optimizer._velocities[index].value.handle,
      beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
      lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
      epsilon=tf.cast(optimizer.epsilon, dtype), grad=tf.cast(gradient, dtype))
  return None


def _sharded(per_example_terms, shards: int):
  """per_example_terms of x [B, ...] computed on `shards` slices of x as independent branches.

  Each shard draws its own noise (the seed folded with the shard's index); the [B] terms come
  back in the batch's order, so the batch mean, the gradient and the metrics are those of
  the whole batch.
  """

  def sharded(x, seed, training=False, num_samples=None):
    size = tf.shape(x)[0]
    bounds = [size * i // shards for i in range(shards + 1)]
    parts = [per_example_terms(x[start:stop], objectives.fold_in(seed, i), training=training,
                               num_samples=num_samples)
             for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    return {name: tf.concat([part[name] for part in parts], axis=0) for name in parts[0]}

  return sharded


def _block_steps(vae: keras.Model):
  """A train function taking one block [K, M, ...] per call: K train_steps in a graph loop.

  The same updates, noise and metrics as K calls of one batch each. Keras counts each call as
  steps_per_execution steps; the epoch's last block may hold fewer.
  """

  @tf.function(reduce_retracing=True, jit_compile=vae.jit_compile is True)
  def run_block(block):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(block)

    def body(k):
      if y is None and sample_weight is None:
        vae.train_step(x[k])
      else:
        vae.train_step(tuple(None if part is None else part[k]
                             for part in (x, y, sample_weight)))
      return (k + 1,)

    tf.while_loop(lambda k: k < tf.shape(x)[0], body, (tf.constant(0),))
    return vae.get_metrics_result()

  def function(iterator):
    block = iterator.get_next_as_optional()
    if not block.has_value():
      raise StopIteration
    return run_block(block.get_value())

  return function


def _replicated_steps(vae: keras.Model, step_function):
  """fit's or evaluate's function under a mirrored strategy: steps_per_execution steps a call.

  Keras 3.15's multi-step function runs each step inside a tf.cond, where the optimizer's
  cross-replica update fails under MirroredStrategy (keras-team/keras#19246). Here the steps
  are a graph loop around strategy.run in the cross-replica context, with the tf.cond only
  around fetching the next batch; the metrics are reduced once a call. Not XLA-compiled: a
  replica's step compiled by XLA failed under both strategies (docs/BENCHMARKS.md).
  """
  strategy = vae.distribute_strategy
  steps = vae.steps_per_execution
  if vae.jit_compile is True:
    logging.warning("compile(jit_compile=True) is ignored under %s: the steps run without"
                    " XLA, which could not compile a replica's step across devices or CPU"
                    " workers. Pass jit_compile=False (or leave the default) to silence this.",
                    type(strategy).__name__)

  @tf.function(reduce_retracing=True)
  def multi_step(iterator):
    def more(step, batch):
      return tf.logical_and(step < steps, batch.has_value())

    def body(step, batch):
      strategy.run(step_function, args=(batch.get_value(),))
      batch = tf.cond(step + 1 < steps, iterator.get_next_as_optional, lambda: batch)
      return step + 1, batch

    steps_run, _ = tf.while_loop(more, body, (tf.constant(0), iterator.get_next_as_optional()))
    outputs = strategy.run(vae.get_metrics_result)
    return steps_run, {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                       for name, value in outputs.items()}

  def function(iterator):
    steps_run, outputs = multi_step(iterator)
    if not steps_run:
      raise StopIteration
    return outputs

  return function


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
  raise ConfigError(f"strategy={name!r} is not one of {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's outputs: always, except a non-chief worker."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  if resolver.task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


_CPUINFO = pathlib.Path("/proc/cpuinfo")
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of instructions that compute in bfloat16.
_BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_lacks_bfloat16() -> bool:
  """True where /proc/cpuinfo lists the CPU's flags and none is a bfloat16 instruction set.

  Without them TensorFlow emulates bfloat16 arithmetic, slower than float32. False where
  nothing is known (no /proc/cpuinfo, no flags line).
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
  """mixed_float16 on a GPU (what it computes fastest; needs loss scaling), else mixed_bfloat16."""
  return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
  """Builds layers under mixed_precision_policy() when asked; restores the global policy after.

  Encoder and Decoder cast network outputs to float32, so the objective stays float32; under
  mixed_float16, Keras's compile wraps the optimizer in a LossScaleOptimizer.
  """
  previous = keras.mixed_precision.global_policy()
  if mixed_precision:
    policy = mixed_precision_policy()
    keras.mixed_precision.set_global_policy(policy)
    if (policy == "mixed_bfloat16" and not tf.config.list_logical_devices("TPU")
        and cpu_lacks_bfloat16()):
      logging.warning("mixed precision computes in bfloat16 on this CPU, which has no bfloat16"
                      " instructions (%s in /proc/cpuinfo), so TensorFlow emulates them and"
                      " training is slower than in float32 (docs/BENCHMARKS.md)."
                      " Leave mixed precision (--mixed_precision) off on this machine.",
                      " or ".join(sorted(_BFLOAT16_CPU_FLAGS)))
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)
