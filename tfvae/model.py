"""The Kingma & Welling VAE as Keras 3 models.

`Encoder` and `Decoder` are Keras models whose call returns a TFP distribution; `VAE` ties
them to the prior, trains with a custom `train_step` on the per-example objective of
tfvae.objectives, and exposes tensors-only `call`, `reconstruct` and `sample` for predict,
serving and plots.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from absl import logging

from tfvae import distributions, networks, objectives
from tfvae.config import ModelConfig
from tfvae.data import check_images, to_unit_float

tfd = tfp.distributions

_PACKAGE = "tfvae"

# The fix named by the errors about blocks of batches under a distribution strategy.
_FEED_BATCHES = ("under a distribution strategy feed batches [M, H, W, C]"
                 " (tfvae.data.train_pipeline with steps_per_block=1)")


# The metrics every step reports, per-example means in nats.
METRIC_NAMES = ("loss", "elbo", "kl", "nll")


class TermMeans(keras.metrics.Metric):
  """Weighted means of the objective's per-example terms, kept in one pair of variables.

  The same numbers as one keras.metrics.Mean per term (sum of w * value over sum of w since
  the last reset; w = 1 without sample weights), in a handful of ops per step instead of about
  thirty: training the 784-400-20 VAE on a 2-core CPU ran 3% faster (docs/BENCHMARKS.md).
  result() is a dict {name: mean}; Keras puts its entries into the logs as they are.
  """

  def __init__(self, names=METRIC_NAMES, name="term_means", dtype=None):
    super().__init__(name=name, dtype=dtype)
    self.names = tuple(names)
    self.total = self.add_variable(shape=(len(self.names),), initializer="zeros",
                                   dtype=self.dtype, name="total")
    self.count = self.add_variable(shape=(), initializer="zeros", dtype=self.dtype,
                                   name="count")

  def update_state(self, terms: dict[str, tf.Tensor], sample_weight=None):
    """Adds a batch: terms maps every name to a [B] tensor; sample_weight is [B] or None."""
    values = tf.stack([tf.cast(terms[name], self.dtype) for name in self.names],
                      axis=-1)  # [B, T]
    if sample_weight is None:
      self.total.assign_add(tf.reduce_sum(values, axis=0))
      self.count.assign_add(tf.cast(tf.shape(values)[0], self.dtype))
    else:
      weights = tf.cast(tf.reshape(sample_weight, [-1, 1]), self.dtype)  # [B, 1]
      self.total.assign_add(tf.reduce_sum(values * weights, axis=0))
      self.count.assign_add(tf.reduce_sum(weights))

  def result(self) -> dict[str, tf.Tensor]:
    means = tf.math.divide_no_nan(tf.convert_to_tensor(self.total),
                                  tf.convert_to_tensor(self.count))
    return dict(zip(self.names, tf.unstack(means), strict=True))

  def get_config(self):
    return {**super().get_config(), "names": list(self.names)}


def _as_config(model_config: ModelConfig | dict[str, Any]) -> ModelConfig:
  if isinstance(model_config, ModelConfig):
    return model_config
  return ModelConfig.from_dict(model_config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Encoder(keras.Model):
  """Recognition model: x [B, H, W, C] -> q(z|x), a diagonal Normal with event shape [J].

  x is float in [0, 1], or uint8 0..255 (scaled by 1/255 here).
  """

  def __init__(self, model_config: ModelConfig | dict[str, Any], **kwargs):
    super().__init__(**kwargs)
    self.model_config = _as_config(model_config)
    self.network = networks.build_encoder_network(self.model_config)

  def call(self, x, training=None) -> tfd.Distribution:
    params = tf.cast(self.network(to_unit_float(x), training=training), tf.float32)  # [B, 2J]
    loc, raw_scale = tf.split(params, 2, axis=-1)  # [B, J] each
    return distributions.make_posterior(loc, raw_scale)

  def get_config(self):
    return {**super().get_config(), "model_config": self.model_config.to_dict()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Decoder(keras.Model):
  """Generative model: z [..., J] -> p(x|z) with event shape [H, W, C] and batch shape [...]."""

  def __init__(self, model_config: ModelConfig | dict[str, Any], **kwargs):
    super().__init__(**kwargs)
    self.model_config = _as_config(model_config)
    self.network = networks.build_decoder_network(self.model_config)

  def call(self, z, training=None) -> tfd.Distribution:
    z = tf.convert_to_tensor(z)
    batch_shape = tf.shape(z)[:-1]  # e.g. [L, B]
    flat_z = tf.reshape(z, [-1, self.model_config.latent_size])  # [L * B, J]
    flat_params = tf.cast(self.network(flat_z, training=training), tf.float32)
    params = tf.reshape(flat_params, tf.concat([batch_shape, tf.shape(flat_params)[1:]], 0))
    return distributions.make_likelihood(self.model_config.likelihood, params,  # [L, B, H, W, Ck]
                                         self.model_config.observation_scale)

  def get_config(self):
    return {**super().get_config(), "model_config": self.model_config.to_dict()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VAE(keras.Model):
  """Variational auto-encoder trained on the SGVB estimator (Kingma & Welling, eq. 10).

  Typical use:

    vae = tfvae.VAE(tfvae.ModelConfig(latent_size=20))
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    vae.fit(x_train, validation_data=x_test, epochs=10, batch_size=100)
    z_mean = vae.encoder(x_test).mean()
    images = vae.sample(16, seed=0)

  x is float in [0, 1] or uint8 0..255 (scaled by 1/255 inside the model), shaped
  [N, H, W, C] as in `model_config.image_shape`. Metrics are
  per-example means in nats: loss (what is minimized), elbo, kl and nll (-E_q log p(x|z)).

  Args:
    model_config: a ModelConfig or its dict.
    seed: seeds the reparameterization noise of training and evaluation steps.
    step_shards: split each training and test batch into this many shards of (nearly) equal
      size whose forward and backward passes are independent branches of the step's graph,
      which TensorFlow runs concurrently on a multi-core CPU. The loss and gradient are the
      same batch means (each shard draws its own noise). 1 runs the batch whole, as a GPU
      wants; see tfvae.training.default_step_shards and docs/BENCHMARKS.md.
  """

  def __init__(self, model_config: ModelConfig | dict[str, Any] | None = None, seed: int = 0,
               step_shards: int = 1, **kwargs):
    super().__init__(**kwargs)
    self.model_config = _as_config(model_config or ModelConfig())
    self.seed = int(seed)
    if int(step_shards) < 1:
      raise ValueError(f"step_shards={step_shards} must be >= 1 (1 runs each batch whole)")
    self.step_shards = int(step_shards)
    self.encoder = Encoder(self.model_config, name="encoder")
    self.decoder = Decoder(self.model_config, name="decoder")
    self.prior = distributions.make_prior(self.model_config.latent_size)
    self.seed_generator = keras.random.SeedGenerator(self.seed, name="noise_seed")
    self._term_means = TermMeans()
    # The networks start with keras.Input, so every weight exists now; marking the model built
    # lets BackupAndRestore and load_weights work before the first batch.
    self.build((None, *self.model_config.image_shape))

  # ---- tensors-only views, used by predict, serving and plots --------------------------------

  def call(self, x, training=None) -> dict[str, tf.Tensor]:
    """Deterministic encoding and reconstruction of x [B, H, W, C].

    Returns:
      Dict of "latent_mean" [B, J], "latent_scale" [B, J] and "reconstruction" [B, H, W, C],
      the mean of p(x|z) at z = E[z|x].
    """
    if self._has_block_rank(x):
      # Keras also calls the model on a first element to build it under a distribution strategy.
      raise ValueError(f"VAE.call takes a batch [B, H, W, C], not a block of batches {x.shape};"
                       f" blocks are for fit and evaluate without a distribution strategy:"
                       f" {_FEED_BATCHES}")
    posterior = self.encoder(x, training=training)
    reconstruction = self.decoder(posterior.mean(), training=training).mean()
    return {"latent_mean": posterior.mean(), "latent_scale": posterior.stddev(),
            "reconstruction": reconstruction}

  def reconstruct(self, x) -> tf.Tensor:
    """E[x | z = E[z|x]], [B, H, W, C]."""
    return self(x)["reconstruction"]

  def sample(self, num_samples: int, seed: int | tf.Tensor = 0,
             return_latents: bool = False):
    """Draws z ~ N(0, I) and returns the mean of p(x|z), [num_samples, H, W, C].

    The same seed gives the same images (stateless sampling). With return_latents, returns
    (images, z [num_samples, J]).
    """
    z = self.prior.sample(num_samples, seed=_stateless_seed(seed))  # [N, J]
    images = self.decoder(z).mean()
    return (images, z) if return_latents else images

  # ---- training ------------------------------------------------------------------------------

  def per_example_terms(self, x, seed, training=False,
                        num_samples: int | None = None) -> dict[str, tf.Tensor]:
    """The objective's per-example [B] terms for x; see tfvae.objectives.per_example_loss."""
    x = to_unit_float(x)
    return objectives.per_example_loss(
        self.model_config.objective, x, self.encoder(x, training=training), self.prior,
        lambda z: self.decoder(z, training=training),
        num_samples or self.model_config.num_samples, seed, beta=self.model_config.beta)

  def _sharded_terms(self, x, seed, training: bool) -> dict[str, tf.Tensor]:
    """per_example_terms of x [B, ...] computed in `step_shards` independent branches, [B]."""
    if self.step_shards == 1:
      return self.per_example_terms(x, seed, training=training)
    size = tf.shape(x)[0]
    bounds = [size * i // self.step_shards for i in range(self.step_shards + 1)]
    shards = [self.per_example_terms(x[start:stop], objectives.fold_in(seed, i),
                                     training=training)
              for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    return {name: tf.concat([shard[name] for shard in shards], axis=0) for name in shards[0]}

  def _next_seed(self) -> tf.Tensor:
    """A fresh [2] int32 stateless seed per call, for evaluation steps."""
    return tf.cast(self.seed_generator.next(), tf.int32)

  def _train_seed(self) -> tf.Tensor:
    """The reparameterization noise seed of a training step: f(seed, step, replica).

    A function of the optimizer's step counter, which checkpoints restore, so a resumed run
    draws the same noise as an uninterrupted one; replicas fold in their id so their noise
    differs.
    """
    context = tf.distribute.get_replica_context()
    replica = context.replica_id_in_sync_group if context is not None else 0
    base = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(replica, tf.int64)])
    step = tf.cast(self.optimizer.iterations, tf.int64)
    return tf.cast(tf.random.experimental.stateless_fold_in(base, step), tf.int32)

  def _has_block_rank(self, x) -> bool:
    """Whether x has the rank of a block [K, M, H, W, C] rather than of a batch [M, H, W, C]."""
    return len(x.shape) == len(self.model_config.image_shape) + 2

  def _is_block(self, x: tf.Tensor) -> bool:
    """Whether x is a block of K batches; a block under a distribution strategy is an error."""
    if not self._has_block_rank(x):
      return False
    if tf.distribute.has_strategy():
      # Even with one replica: the optimizer's cross-replica update cannot run in a graph loop.
      strategy = tf.distribute.get_strategy()
      raise ValueError(f"a block of batches {x.shape} trains only without a distribution"
                       f" strategy, but this is {type(strategy).__name__} with"
                       f" {strategy.num_replicas_in_sync} replica(s); {_FEED_BATCHES}")
    return True

  def _for_each_batch(self, step, x, sample_weight) -> None:
    """step(batch, weights) on x, a batch or a block (K calls, in order, in one graph loop)."""
    x = tf.convert_to_tensor(x)
    if not self._is_block(x):
      step(x, sample_weight)
      return

    def body(k):
      step(x[k], None if sample_weight is None else sample_weight[k])
      return (k + 1,)

    tf.while_loop(lambda k: k < tf.shape(x)[0], body, (tf.constant(0),))

  def _train_batch(self, x, sample_weight) -> None:
    with tf.GradientTape() as tape:
      terms = self._sharded_terms(x, self._train_seed(), training=True)
      loss = _weighted_mean(terms["loss"], sample_weight)
      if self.losses:
        loss += tf.add_n(self.losses)
      # Keras sums gradients over replicas, so each replica contributes 1/num_replicas.
      loss = loss / tf.distribute.get_replica_context().num_replicas_in_sync
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.trainable_variables)
    self.optimizer.apply(gradients, self.trainable_variables)
    self._term_means.update_state(terms, sample_weight)

  def _test_batch(self, x, sample_weight) -> None:
    terms = self._sharded_terms(x, self._next_seed(), training=False)
    self._term_means.update_state(terms, sample_weight)

  def train_step(self, data):
    """One optimizer step on a batch x [M, H, W, C], or K steps on a block [K, M, H, W, C].

    A block is K batches in order (tfvae.data.train_pipeline(..., steps_per_block=K)): the
    same updates, noise and metrics as K calls with one batch each, without a trip through the
    input pipeline per step. Sample weights, if any, are [M] per batch or [K, M] per block.
    Blocks train only without a distribution strategy.
    """
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    self._for_each_batch(self._train_batch, x, sample_weight)
    return self._term_means.result()

  def test_step(self, data):
    """Adds a batch [M, H, W, C] or a block [K, M, H, W, C] to the metrics."""
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    self._for_each_batch(self._test_batch, x, sample_weight)
    return self._term_means.result()

  def make_train_function(self, force=False):
    """Keras's train function, or the VAE's own where loops_steps_under(its strategy)."""
    if self.run_eagerly or not loops_steps_under(self.distribute_strategy):
      return super().make_train_function(force)
    if self.train_function is None or force:
      self.train_function = self._replicated_steps(self.train_step)
    return self.train_function

  def make_test_function(self, force=False):
    """Keras's test function, or the VAE's own where loops_steps_under(its strategy)."""
    if self.run_eagerly or not loops_steps_under(self.distribute_strategy):
      return super().make_test_function(force)
    if self.test_function is None or force:
      self.test_function = self._replicated_steps(self.test_step)
    return self.test_function

  def _replicated_steps(self, step_function):
    """fit's or evaluate's function under a mirrored strategy: steps_per_execution steps a call.

    Keras 3.15's multi-step function runs each step inside a tf.cond, where the optimizer's
    cross-replica update fails under MirroredStrategy ("You must feed a value for placeholder
    tensor", keras-team/keras#19246), so Keras can train only one step per call there. Here
    the steps are a graph loop in the cross-replica context around strategy.run, with a
    tf.cond only around fetching the next batch. As in Keras, a call runs steps_per_execution
    steps, or fewer where the data ends, and raises StopIteration when the data had no batch
    left. It returns what the last step returned, the metrics' results, averaged over replicas:
    read once after the loop, so a call reduces across replicas (or workers) once, not once per
    step. With 2 replicas on 2 CPU cores, 78 steps per call trained 1.2-1.4 times as fast as
    one (bench/strategies.py). The steps are not compiled with XLA. A replica's step compiled
    by XLA failed in both settings tried: under MirroredStrategy on two devices its optimizer
    update touches the other replica's variables ("Trying to access resource ... located in
    device CPU:1 from device CPU:0"; Keras 3.15's own function with jit_compile=True fails the
    same way), and under MultiWorkerMirroredStrategy with two CPU workers "Collectives are not
    yet implemented for CPU devices when compiling with XLA". So compile(jit_compile=True) is
    ignored here, with a warning; Keras's "auto" picks no XLA under a strategy anyway.
    """
    strategy = self.distribute_strategy
    steps = self.steps_per_execution
    if self.jit_compile:
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

      steps_run, _ = tf.while_loop(more, body,
                                   (tf.constant(0), iterator.get_next_as_optional()))
      outputs = strategy.run(self._term_means.result)  # what train_step and test_step return
      return steps_run, {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                         for name, value in outputs.items()}

    def function(iterator):
      steps_run, outputs = multi_step(iterator)
      if not steps_run:
        raise StopIteration
      return outputs

    return function

  def fit(self, x=None, *args, **kwargs):
    """keras.Model.fit; numpy images (x, and validation_data passed by name) are checked first.

    Raises:
      tfvae.data.DataError: numpy images with NaN or Inf, floats outside [0, 1] (e.g. 0..255
        as floats), or uint8 holding only 0 and 1.
    """
    _check_numpy_images(x, "VAE.fit x")
    validation_data = kwargs.get("validation_data")
    if isinstance(validation_data, (tuple, list)) and validation_data:
      validation_data = validation_data[0]
    _check_numpy_images(validation_data, "VAE.fit validation_data")
    return super().fit(x, *args, **kwargs)

  def evaluate(self, x=None, *args, **kwargs):
    """keras.Model.evaluate; numpy images are checked first, as in fit."""
    _check_numpy_images(x, "VAE.evaluate x")
    return super().evaluate(x, *args, **kwargs)

  @property
  def metrics(self):
    return [self._term_means]

  def build(self, input_shape=None):
    # Everything is built in __init__; defining build tells Keras so (no "unbuilt state" warning,
    # which its default build gives for the metrics and the seed generator).
    super().build(input_shape)

  # ---- serialization -------------------------------------------------------------------------

  def get_config(self):
    return {**super().get_config(), "model_config": self.model_config.to_dict(),
            "seed": self.seed, "step_shards": self.step_shards}


def _check_numpy_images(x, source: str) -> None:
  """tfvae.data.check_images for numpy arrays: the pixel range the model reads.

  Tensors and datasets pass unchecked; checking them would cost every step.
  """
  if isinstance(x, np.ndarray):
    check_images(x, source)


def loops_steps_under(strategy: tf.distribute.Strategy) -> bool:
  """Whether VAE runs its own loop of steps per graph call under this strategy.

  True for MirroredStrategy and MultiWorkerMirroredStrategy, the strategies tested with it;
  under others (TPUStrategy) Keras's own functions run, one step per call.
  """
  return isinstance(strategy, (tf.distribute.MirroredStrategy,
                               tf.distribute.MultiWorkerMirroredStrategy))


def _weighted_mean(values: tf.Tensor, sample_weight) -> tf.Tensor:
  if sample_weight is None:
    return tf.reduce_mean(values)
  weights = tf.cast(tf.reshape(sample_weight, [-1]), values.dtype)
  return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))


def _stateless_seed(seed: int | tf.Tensor) -> tf.Tensor:
  """An int seed (Python or scalar tensor) -> the int32 [2] stateless seed TFP expects."""
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  if seed.shape.rank == 1:
    return tf.cast(seed, tf.int32)
  return tf.cast(tf.stack([seed // 2**31, seed % 2**31]), tf.int32)
