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

from tfvae import distributions, networks, objectives
from tfvae.config import ModelConfig
from tfvae.data import check_examples, examples_of, moments, to_unit_float

tfd = tfp.distributions

_PACKAGE = "tfvae"

# The metrics every step reports, per-example means in nats.
METRIC_NAMES = ("loss", "elbo", "kl", "nll")


class TermMeans(keras.metrics.Metric):
  """Weighted means of the objective's per-example terms, kept in one pair of variables.

  The same numbers as one keras.metrics.Mean per term (sum of w * value over sum of w since
  the last reset; w = 1 without sample weights), in a handful of ops per step instead of about
  thirty. result() is a dict {name: mean}; Keras puts its entries into the logs as they are.
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


def _checked_network(network: keras.Model, input_shape, output_shape, role: str):
  """Builds a user's network on one zero example and checks what it emits."""
  outputs = network(np.zeros((1, *input_shape), np.float32))
  actual = tuple(outputs.shape[1:])
  if actual != tuple(output_shape):
    raise ValueError(f"{role} network maps [B, {', '.join(map(str, input_shape))}] to"
                     f" [B, {', '.join(map(str, actual))}]; a tfvae {role} network must emit"
                     f" [B, {', '.join(map(str, output_shape))}] raw parameters"
                     f" (tfvae.networks says what they are)")
  return network


def _network_config(layer) -> dict[str, Any]:
  """get_config's entry for a network: its serialization when the user supplied it."""
  return ({"network": keras.saving.serialize_keras_object(layer.network)}
          if layer.custom_network else {})


class _ConfiguredModel(keras.Model):
  """A Keras model built from a ModelConfig and, optionally, a user's network.

  With model_config.standardize it holds the features' training mean and standard deviation,
  non-trainable weights that VAE.adapt sets and the saved model keeps.
  """

  def __init__(self, model_config, network, build_network, input_shape, output_shape, role,
               **kwargs):
    super().__init__(**kwargs)
    self.model_config = _as_config(model_config)
    if self.model_config.standardize:
      shape = self.model_config.image_shape
      self.feature_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                          name="feature_mean")
      self.feature_std = self.add_weight(shape=shape, initializer="ones", trainable=False,
                                         name="feature_std")
    self.custom_network = network is not None
    if isinstance(network, dict):
      network = keras.saving.deserialize_keras_object(network)
    self.network = (build_network(self.model_config) if network is None else
                    _checked_network(network, input_shape(self.model_config),
                                     output_shape(self.model_config), role))

  def get_config(self):
    return {**super().get_config(), "model_config": self.model_config.to_dict(),
            **_network_config(self)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Encoder(_ConfiguredModel):
  """Recognition model: x [B, H, W, C] -> q(z|x), a diagonal Normal with event shape [J].

  x is float in [0, 1], or uint8 0..255 (scaled by 1/255 here); or feature vectors [B, D],
  standardized here when model_config.standardize. network, if given, is a Keras model
  mapping float images [B, H, W, C] (or standardized vectors [B, D]) to [B, 2J] (means, then
  raw scales).
  """

  def __init__(self, model_config: ModelConfig | dict[str, Any],
               network: keras.Model | None = None, **kwargs):
    super().__init__(model_config, network, networks.build_encoder_network,
                     lambda c: c.image_shape, lambda c: (2 * c.latent_size,), "encoder",
                     **kwargs)

  def call(self, x, training=None) -> tfd.Distribution:
    x = to_unit_float(x)
    if self.model_config.standardize:
      x = (x - self.feature_mean) / self.feature_std
    params = tf.cast(self.network(x, training=training), tf.float32)  # [B, 2J]
    loc, raw_scale = tf.split(params, 2, axis=-1)  # [B, J] each
    return distributions.make_posterior(loc, raw_scale)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Decoder(_ConfiguredModel):
  """Generative model: z [..., J] -> p(x|z) with event shape [H, W, C] (or [D]) and batch shape
  [...].

  network, if given, is a Keras model mapping z [B, J] to [B, H, W, C * k] (or [B, D * k]) raw
  likelihood parameters, C * k = tfvae.distributions.output_channels(likelihood, C, M, ...); in
  standardized units when model_config.standardize, and p(x|z) is of the raw values.
  """

  def __init__(self, model_config: ModelConfig | dict[str, Any],
               network: keras.Model | None = None, **kwargs):
    super().__init__(model_config, network, networks.build_decoder_network,
                     lambda c: (c.latent_size,), networks.decoder_output_shape, "decoder",
                     **kwargs)

  def call(self, z, training=None) -> tfd.Distribution:
    z = tf.convert_to_tensor(z)
    batch_shape = tf.shape(z)[:-1]  # e.g. [L, B]
    flat_z = tf.reshape(z, [-1, self.model_config.latent_size])  # [L * B, J]
    flat_params = tf.cast(self.network(flat_z, training=training), tf.float32)
    params = tf.reshape(flat_params, tf.concat([batch_shape, tf.shape(flat_params)[1:]], 0))
    config = self.model_config
    standardization = ((tf.convert_to_tensor(self.feature_mean),
                        tf.convert_to_tensor(self.feature_std)) if config.standardize else None)
    return distributions.make_likelihood(config.likelihood, params,  # [L, B, H, W, Ck]
                                         config.observation_scale, config.event_ndims,
                                         standardization, config.mixture_components,
                                         config.coupled_channels)


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
  [N, H, W, C] as in `model_config.image_shape`; or real feature vectors [N, D] (with
  model_config.standardize, call `adapt` on the training data before fit). fit also takes a
  tf.data.Dataset of batches of images, of (images, labels) or of dicts with an "image" key;
  labels are ignored. Metrics are per-example means in nats: loss
  (what is minimized), elbo, kl and nll (-E_q log p(x|z)). train_step and test_step take one
  batch; tfvae.runtime runs them faster on a given machine from outside.

  Args:
    model_config: a ModelConfig or its dict.
    seed: seeds the reparameterization noise of training and evaluation steps.
    encoder_network: a Keras model x [B, H, W, C] -> [B, 2J] to use instead of the one
      model_config describes; saved and reloaded with the VAE.
    decoder_network: likewise z [B, J] -> [B, H, W, C * k].
  """

  def __init__(self, model_config: ModelConfig | dict[str, Any] | None = None, seed: int = 0,
               encoder_network: keras.Model | dict | None = None,
               decoder_network: keras.Model | dict | None = None, **kwargs):
    super().__init__(**kwargs)
    self.model_config = _as_config(model_config or ModelConfig())
    self.seed = int(seed)
    self.encoder = Encoder(self.model_config, encoder_network, name="encoder")
    self.decoder = Decoder(self.model_config, decoder_network, name="decoder")
    self.prior = distributions.make_prior(self.model_config.latent_size)
    self.seed_generator = keras.random.SeedGenerator(self.seed, name="noise_seed")
    self.term_means = TermMeans()
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

  def adapt(self, data, batch_size: int = 1000) -> None:
    """Sets the standardization statistics (model_config.standardize) from training data.

    Like keras.layers.Normalization.adapt: the mean and standard deviation of each feature over
    data, an array [N, D], a tf.data.Dataset of batches (of features, (features, labels) or
    dicts with an "image" key), or a tfvae.data.splits.Split; in the units the model reads
    (uint8 scaled by 1/255). A feature that never varies gets a standard deviation of 1.
    """
    if not self.model_config.standardize:
      raise ValueError("adapt sets the statistics of standardized features; this model's"
                       " model_config.standardize is False")
    mean, std = moments(data, batch_size)
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    for layer in (self.encoder, self.decoder):
      layer.feature_mean.assign(mean.astype(np.float32))
      layer.feature_std.assign(std.astype(np.float32))

  # ---- training ------------------------------------------------------------------------------

  def per_example_terms(self, x, seed, training=False,
                        num_samples: int | None = None) -> dict[str, tf.Tensor]:
    """The objective's per-example [B] terms for x; see tfvae.objectives.per_example_loss.

    A training step's loss weighs the KL by `kl_weight()`; any other, by model_config.beta.
    """
    x = to_unit_float(x)
    return objectives.per_example_loss(
        self.model_config.objective, x, self.encoder(x, training=training), self.prior,
        lambda z: self.decoder(z, training=training),
        num_samples or self.model_config.num_samples, seed,
        beta=self.kl_weight() if training else self.model_config.beta,
        gradient_estimator=self.model_config.gradient_estimator)

  def kl_weight(self) -> float | tf.Tensor:
    """The KL weight of the next training step: beta * min(1, step / kl_warmup_steps).

    A function of the optimizer's step counter, like the learning-rate schedules, so a resumed
    run continues the warm-up where it stopped.
    """
    beta, warmup = self.model_config.beta, self.model_config.kl_warmup_steps
    optimizer = getattr(self, "optimizer", None)  # None: not compiled, no step taken
    if not warmup or optimizer is None:
      return beta
    step = tf.cast(optimizer.iterations, tf.float32)
    return beta * tf.minimum(1.0, step / warmup)

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

  def train_step(self, data):
    """One optimizer step on a batch x [M, H, W, C] (sample weights [M], if any)."""
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    x = examples_of(x)
    with tf.GradientTape() as tape:
      terms = self.per_example_terms(x, self._train_seed(), training=True)
      loss = _weighted_mean(terms["loss"], sample_weight)
      if self.losses:
        loss += tf.add_n(self.losses)
      # Keras sums gradients over replicas, so each replica contributes 1/num_replicas.
      loss = loss / tf.distribute.get_replica_context().num_replicas_in_sync
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.trainable_variables)
    self.optimizer.apply(gradients, self.trainable_variables)
    return self._update_metrics(terms, sample_weight)

  def test_step(self, data):
    """Adds a batch x [M, H, W, C] to the metrics."""
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    x = examples_of(x)
    terms = self.per_example_terms(x, tf.cast(self.seed_generator.next(), tf.int32),
                                   training=False)
    return self._update_metrics(terms, sample_weight)

  def _update_metrics(self, terms, sample_weight) -> dict[str, tf.Tensor]:
    self.term_means.update_state(terms, sample_weight)
    return self.term_means.result()

  @property
  def metrics(self):
    return [self.term_means]

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

  def build(self, input_shape=None):
    # Everything is built in __init__; defining build tells Keras so (no "unbuilt state" warning,
    # which its default build gives for the metrics and the seed generator).
    super().build(input_shape)

  # ---- serialization -------------------------------------------------------------------------

  def get_config(self):
    config = {**super().get_config(), "model_config": self.model_config.to_dict(),
              "seed": self.seed}
    for name, layer in (("encoder_network", self.encoder), ("decoder_network", self.decoder)):
      if layer.custom_network:
        config[name] = keras.saving.serialize_keras_object(layer.network)
    return config


def _check_numpy_images(x, source: str) -> None:
  """tfvae.data.check_examples for numpy arrays: the pixel range the model reads.

  Tensors and datasets pass unchecked; checking them would cost every step.
  """
  if isinstance(x, np.ndarray):
    check_examples(x, source)



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
