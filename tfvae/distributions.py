"""Raw network outputs -> TFP distributions: the posterior, the prior and the likelihoods.

Networks emit unconstrained tensors; this module alone turns them into distributions, so the
numerics live in one place: Bernoulli from logits (never probabilities), scales through
`softplus(raw + softplus_inverse(1)) + MIN_SCALE` so a zero raw output means a unit scale and
no scale reaches 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

# Smallest standard deviation of the posterior and of the Gaussian likelihoods. 1e-3 is far below
# a pixel's quantization step (1/255) yet keeps log sigma >= -6.9, so no density can blow up.
MIN_SCALE = 1e-3
# A pixel's Gaussian keeps its density at or below 256 per value, so an 8-bit image's
# dequantized bits/dim, -(log p(x) - D log 256) / (D log 2), is never negative.
PIXEL_MIN_SCALE = 1.0 / (256.0 * math.sqrt(2.0 * math.pi))
_SOFTPLUS_INVERSE_ONE = float(np.log(np.expm1(1.0)))  # softplus(this) == 1


def positive_scale(raw: tf.Tensor, floor: float = MIN_SCALE) -> tf.Tensor:
  """Maps an unconstrained tensor to a standard deviation in (floor, inf); 0 maps to ~1."""
  return tf.nn.softplus(raw + _SOFTPLUS_INVERSE_ONE) + floor


def make_posterior(loc: tf.Tensor, raw_scale: tf.Tensor) -> tfd.Distribution:
  """q(z|x) = N(loc, diag(scale^2)), event shape [J] (Kingma & Welling, appendix C.2).

  Args:
    loc: [..., J] means.
    raw_scale: [..., J] unconstrained; see `positive_scale`.

  Returns:
    A tfd.Independent over tfd.Normal with batch shape [...] and event shape [J].
  """
  return tfd.Independent(tfd.Normal(loc=loc, scale=positive_scale(raw_scale)),
                         reinterpreted_batch_ndims=1)


def make_prior(latent_size: int, dtype=tf.float32) -> tfd.Distribution:
  """p(z) = N(0, I) with event shape [latent_size]."""
  zeros = tf.zeros([latent_size], dtype=dtype)
  return tfd.Independent(tfd.Normal(loc=zeros, scale=tf.ones_like(zeros)),
                         reinterpreted_batch_ndims=1)


def _sum_to_shape(gradient: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
  """Sums a broadcast gradient back to the shape of the input it was broadcast from."""
  axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=shape, s1=tf.shape(gradient))
  return tf.reshape(tf.reduce_sum(gradient, axes), shape)


def bernoulli_log_prob(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Elementwise log Bernoulli(x; rho = sigmoid(logits)), with its gradient in closed form.

  x log rho + (1 - x) log(1 - rho) = x * logits - softplus(logits): exact for every finite
  logit (no log of a rounded probability; logits of +-inf, which no network with finite
  weights produces, give NaN), and for x in [0, 1] the cross-entropy. The gradients are
  d/dlogits = x - sigmoid(logits) and d/dx = logits. Broadcasts like x * logits; x is cast
  to the logits' dtype.

  One softplus forward and one sigmoid backward, where tfd.Bernoulli's log_prob takes two of
  each and a dozen more element-wise passes.
  """
  return _bernoulli_log_prob(tf.cast(x, logits.dtype), logits)


def _softplus(logits: tf.Tensor) -> tf.Tensor:
  """log(1 + exp(l)) = max(l, 0) + log(1 + exp(-|l|)), to float32 rounding.

  exp(-|l|) is in (0, 1], so nothing overflows, and rounding 1 + exp(-|l|) costs at most half
  an ulp of 1: closer to float64 than TensorFlow's CPU Softplus kernel, and faster on one
  thread.
  """
  return tf.nn.relu(logits) + tf.math.log(1 + tf.exp(-tf.abs(logits)))


@tf.custom_gradient
def _bernoulli_log_prob(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  def gradient(upstream):
    return (_sum_to_shape(upstream * logits, tf.shape(x)),
            _sum_to_shape(upstream * (x - tf.sigmoid(logits)), tf.shape(logits)))

  return x * logits - _softplus(logits), gradient


class BernoulliLogits(tfd.Bernoulli):
  """tfd.Bernoulli whose log_prob is `bernoulli_log_prob` of its logits.

  Everything else (sampling, mean, entropy, KL, serialization) is tfd.Bernoulli's. Build it with
  logits; built from probs it behaves exactly like tfd.Bernoulli.
  """

  def _log_prob(self, event):
    if self._logits is None:
      return super()._log_prob(event)
    return bernoulli_log_prob(event, tf.convert_to_tensor(self._logits))


def _bernoulli(params: tf.Tensor, observation_scale: float | None, event_ndims: int,
               standardization) -> tfd.Distribution:
  del observation_scale, standardization  # Bernoulli has no scale; binary data no statistics.
  # log p(x|z) = sum_k x_k log rho_k + (1 - x_k) log(1 - rho_k), computed from logits.
  return tfd.Independent(BernoulliLogits(logits=params, dtype=params.dtype),
                         reinterpreted_batch_ndims=event_ndims)


def _normal(loc: tf.Tensor, scale: tf.Tensor, event_ndims: int, standardization):
  """N(loc, scale^2) per value; with standardization (mean, std) a Normal of raw values.

  Images: means squashed to (0, 1) as the paper does for Frey Face. Standardized features:
  means unsquashed, and x = mean + std * x_std, so N(loc, scale^2) of x_std is
  N(mean + std * loc, (std * scale)^2) of x, whose log-density has the Jacobian -sum log std.
  """
  if standardization is None:
    return tfd.Independent(tfd.Normal(loc=tf.sigmoid(loc), scale=scale),
                           reinterpreted_batch_ndims=event_ndims)
  mean, std = standardization
  return tfd.Independent(tfd.Normal(loc=mean + std * loc, scale=std * scale),
                         reinterpreted_batch_ndims=event_ndims)


def _gaussian(params: tf.Tensor, observation_scale: float | None, event_ndims: int,
              standardization) -> tfd.Distribution:
  del observation_scale  # Learned per value.
  raw_loc, raw_scale = tf.split(params, 2, axis=-1)
  floor = PIXEL_MIN_SCALE if standardization is None else MIN_SCALE
  return _normal(raw_loc, positive_scale(raw_scale, floor), event_ndims, standardization)


def _gaussian_fixed(params: tf.Tensor, observation_scale: float | None, event_ndims: int,
                    standardization) -> tfd.Distribution:
  # log p(x|z) = -||x - mu(z)||^2 / (2 s^2) - D log(s sqrt(2 pi)): a scaled squared error.
  scale = tf.constant(observation_scale, params.dtype)
  return _normal(params, scale, event_ndims, standardization)


# 8-bit pixels in [0, 1] take the values k / LEVELS_MINUS_ONE, k = 0..255.
LEVELS_MINUS_ONE = 255


def _levels(x: tf.Tensor, dtype) -> tf.Tensor:
  """The levels k = round(255 x), clipped to 0..255, as floats."""
  return tf.clip_by_value(tf.round(tf.cast(x, dtype) * LEVELS_MINUS_ONE), 0., LEVELS_MINUS_ONE)


def _log_bin_probability(level: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """log P(level) under each discretized logistic (loc, scale), stably from logits.

  With a = (k/255 + h - loc) / s and b = a - 1/(255 s), log [sigmoid(a) - sigmoid(b)] =
  -softplus(-a) - softplus(b) + log(1 - exp(b - a)); the edge levels drop the CDF term their
  open bin does not have. Broadcasts level against loc and scale.
  """
  upper = (level + 0.5) / LEVELS_MINUS_ONE
  a = (upper - loc) / scale
  width = 1. / (LEVELS_MINUS_ONE * scale)  # a - b
  first, last = level == 0., level == LEVELS_MINUS_ONE
  log_upper = tf.where(last, tf.zeros_like(a), -tf.nn.softplus(-a))
  log_lower = tf.where(first, tf.zeros_like(a), -tf.nn.softplus(a - width))
  log_gap = tf.where(first | last, tf.zeros_like(a), tfp.math.log1mexp(width))
  return log_upper + log_lower + log_gap


def _component_means(loc: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """E[x] of each discretized logistic (loc, scale), in [0, 1]: E[k] = sum_{j=1..255} P(k >= j)
  = sum_j 1 - F((j - 1/2) / 255)."""
  thresholds = (tf.range(LEVELS_MINUS_ONE, dtype=loc.dtype) + 0.5) / LEVELS_MINUS_ONE
  loc, scale = loc[..., tf.newaxis], scale[..., tf.newaxis]
  # 15 thresholds at a time (255 = 17 x 15): 17 loop steps, each 15 times loc's memory.
  below = tf.foldl(
      lambda total, t: total + tf.reduce_sum(tf.sigmoid((t - loc) / scale), axis=-1),
      tf.reshape(thresholds, [-1, 15]), initializer=tf.zeros_like(loc[..., 0]))
  return 1. - below / LEVELS_MINUS_ONE


def _logistic_levels(loc: tf.Tensor, scale: tf.Tensor, seed) -> tf.Tensor:
  """A draw of each discretized logistic (loc, scale): k / 255, k = round(255 clip(y, 0, 1))."""
  u = tf.random.stateless_uniform(tf.shape(loc), seed, minval=1e-6, maxval=1. - 1e-6,
                                  dtype=loc.dtype)
  values = loc + scale * (tf.math.log(u) - tf.math.log1p(-u))
  return tf.round(tf.clip_by_value(values, 0., 1.) * LEVELS_MINUS_ONE) / LEVELS_MINUS_ONE


class DiscretizedLogistic(tfd.Distribution):
  """A mixture of logistics discretized to the 256 levels of 8-bit pixels in [0, 1].

  Mathematical details: a value x in [0, 1] stands for the level k = round(255 x); with the
  logistic CDF F_m(t) = sigmoid((t - loc_m) / scale_m) and h = 1/510 (half a level),

    P(k) = sum_m pi_m [F_m(k/255 + h) - F_m(k/255 - h)],

  where the first level takes all mass below it (F_m(-h) := 0) and the last all mass above it
  (F_m(1 + h) := 1), so the 256 probabilities sum to 1 (Salimans et al., 2017, PixelCNN++;
  Kingma et al., 2016, IAF). In logits, with a = (k/255 + h - loc) / s and b = a - 1/(255 s):

    log [sigmoid(a) - sigmoid(b)] = -softplus(-a) - softplus(b) + log(1 - exp(b - a)),

  finite for every finite loc and s, with no difference of rounded probabilities.

  Values are floats in [0, 1] (TFP casts any input to the distribution's dtype first, so
  uint8 levels must be divided by 255 before log_prob; tfvae.VAE does that for its inputs).
  Batch shape is loc's without its last axis (the M mixture components); event shape [].
  """

  def __init__(self, loc, scale, mixture_logits=None, validate_args=False, allow_nan_stats=True,
               name="DiscretizedLogistic"):
    """Args: loc, scale [..., M]; mixture_logits [..., M] or None (one component)."""
    parameters = dict(locals())
    self._loc = tf.convert_to_tensor(loc)
    self._scale = tf.convert_to_tensor(scale)
    self._mixture_logits = (None if mixture_logits is None
                            else tf.convert_to_tensor(mixture_logits))
    super().__init__(dtype=self._loc.dtype, reparameterization_type=tfd.NOT_REPARAMETERIZED,
                     validate_args=validate_args, allow_nan_stats=allow_nan_stats,
                     parameters=parameters, name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    return dict(loc=tfp.util.ParameterProperties(event_ndims=1),
                scale=tfp.util.ParameterProperties(event_ndims=1),
                mixture_logits=tfp.util.ParameterProperties(event_ndims=1))

  def _batch_shape(self):
    return self._loc.shape[:-1]

  def _batch_shape_tensor(self):
    return tf.shape(self._loc)[:-1]

  def _event_shape(self):
    return tf.TensorShape([])

  def _event_shape_tensor(self):
    return tf.constant([], tf.int32)

  def _log_mixture_weights(self):
    logits = tf.zeros_like(self._loc) if self._mixture_logits is None else self._mixture_logits
    return tf.nn.log_softmax(logits, axis=-1)  # no logits: equal weights

  def _log_prob(self, x):
    level = _levels(x, self.dtype)[..., tf.newaxis]  # [..., 1]
    return tf.reduce_logsumexp(
        self._log_mixture_weights() + _log_bin_probability(level, self._loc, self._scale),
        axis=-1)

  def _mean(self):
    return tf.reduce_sum(tf.exp(self._log_mixture_weights())
                         * _component_means(self._loc, self._scale), axis=-1)

  def _sample_n(self, n, seed=None):
    component_seed, noise_seed = tfp.random.split_seed(seed, n=2)
    shape = tf.concat([[n], tf.shape(self._loc)], axis=0)  # [n, ..., M]
    levels = _logistic_levels(tf.broadcast_to(self._loc, shape), self._scale, noise_seed)
    if self._loc.shape[-1] == 1:
      return levels[..., 0]
    chosen = tfd.Categorical(logits=self._log_mixture_weights()).sample(n, seed=component_seed)
    return tf.reduce_sum(levels * tf.one_hot(chosen, tf.shape(levels)[-1], dtype=self.dtype),
                         axis=-1)


class CoupledDiscretizedLogistic(tfd.Distribution):
  """The C channels of a pixel, discretized logistics coupled in channel order.

  Mathematical details: a mixture over the whole pixel (one component m for all its channels),
  in which channel c, given the levels x_j of the channels before it, is the discretized
  logistic of `DiscretizedLogistic` with

    location loc_cm + sum_{j < c} coefficient_cjm x_j,   scale scale_cm,

  so P(x) = sum_m pi_m prod_c P_cm(x_c | x_<c): PixelCNN++'s R, then G given R, then B given R
  and G (Salimans et al., 2017), exact and summing to 1 over the 256^C values of a pixel.

  The mean: the first channel's exactly; each later channel's given the earlier ones at their
  means, per component. That is E[x] wherever the locations stay clear of 0 and 1 (there a
  channel's mean is its location, linear in the earlier values, up to the rounding's ripple at
  scales below a level), and a Jensen gap of the clipping where they do not.

  Args:
    loc, scale: [..., C, M].
    coefficients: [..., C (C - 1) / 2, M], for (c, j) = (1, 0), (2, 0), (2, 1), (3, 0), ...
    mixture_logits: [..., M] or None (equal weights).

  Batch shape is loc's without its last two axes; event shape [C].
  """

  def __init__(self, loc, scale, coefficients, mixture_logits=None, validate_args=False,
               allow_nan_stats=True, name="CoupledDiscretizedLogistic"):
    parameters = dict(locals())
    self._loc = tf.convert_to_tensor(loc)
    self._scale = tf.convert_to_tensor(scale)
    self._coefficients = tf.convert_to_tensor(coefficients)
    self._mixture_logits = (None if mixture_logits is None
                            else tf.convert_to_tensor(mixture_logits))
    super().__init__(dtype=self._loc.dtype, reparameterization_type=tfd.NOT_REPARAMETERIZED,
                     validate_args=validate_args, allow_nan_stats=allow_nan_stats,
                     parameters=parameters, name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    return dict(loc=tfp.util.ParameterProperties(event_ndims=2),
                scale=tfp.util.ParameterProperties(event_ndims=2),
                coefficients=tfp.util.ParameterProperties(event_ndims=2),
                mixture_logits=tfp.util.ParameterProperties(event_ndims=1))

  @property
  def _channels(self) -> int:
    return self._loc.shape[-2]

  def _batch_shape(self):
    return self._loc.shape[:-2]

  def _batch_shape_tensor(self):
    return tf.shape(self._loc)[:-2]

  def _event_shape(self):
    return tf.TensorShape([self._channels])

  def _event_shape_tensor(self):
    return tf.constant([self._channels], tf.int32)

  def _log_mixture_weights(self):
    if self._mixture_logits is None:
      return tf.nn.log_softmax(tf.zeros_like(self._loc[..., 0, :]), axis=-1)
    return tf.nn.log_softmax(self._mixture_logits, axis=-1)

  def _location(self, c: int, earlier) -> tf.Tensor:
    """Channel c's component locations [..., M] given the earlier channels' values (a list of
    c tensors broadcasting against [..., M])."""
    first = c * (c - 1) // 2  # the coefficient of (c, 0)
    return self._loc[..., c, :] + sum(self._coefficients[..., first + j, :] * value
                                      for j, value in enumerate(earlier))

  def _log_prob(self, x):
    level = _levels(x, self.dtype)[..., tf.newaxis]  # [..., C, 1]
    values = [level[..., c, :] / LEVELS_MINUS_ONE for c in range(self._channels)]
    log_p = sum(_log_bin_probability(level[..., c, :], self._location(c, values[:c]),
                                     self._scale[..., c, :])
                for c in range(self._channels))  # [..., M]
    return tf.reduce_logsumexp(self._log_mixture_weights() + log_p, axis=-1)

  def _mean(self):
    means = []  # per component, channel after channel
    for c in range(self._channels):
      means.append(_component_means(self._location(c, means), self._scale[..., c, :]))
    weights = tf.exp(self._log_mixture_weights())[..., tf.newaxis, :]  # [..., 1, M]
    return tf.reduce_sum(weights * tf.stack(means, axis=-2), axis=-1)  # [..., C]

  def _sample_n(self, n, seed=None):
    component_seed, *noise_seeds = tfp.random.split_seed(seed, n=1 + self._channels)
    shape = tf.concat([[n], tf.shape(self._loc[..., 0, :])], axis=0)  # [n, ..., M]
    chosen = tfd.Categorical(logits=self._log_mixture_weights()).sample(n, seed=component_seed)
    pick = tf.one_hot(chosen, shape[-1], dtype=self.dtype)  # [n, ..., M]
    values = []  # [n, ..., 1] each: the drawn component's level, channel after channel
    for c, noise_seed in enumerate(noise_seeds):
      location = tf.broadcast_to(self._location(c, values), shape)
      levels = _logistic_levels(location, self._scale[..., c, :], noise_seed)
      values.append(tf.reduce_sum(levels * pick, axis=-1, keepdims=True))
    return tf.concat(values, axis=-1)


def _discretized_logistic(params: tf.Tensor, observation_scale: float | None, event_ndims: int,
                          standardization, mixture_components: int = 1,
                          coupled: bool = False) -> tfd.Distribution:
  del observation_scale, standardization  # Learned per value; 8-bit images have no statistics.
  if coupled:  # one distribution a pixel: event shape [C], so two dimensions left for [H, W]
    return tfd.Independent(_coupled_logistic(params, mixture_components),
                           reinterpreted_batch_ndims=event_ndims - 1)
  parts = 2 if mixture_components == 1 else 3
  # [..., C * k] -> parts of [..., C, M]: locations, scales, then the mixture's logits.
  shape = tf.concat([tf.shape(params)[:-1], [-1, mixture_components]], axis=0)
  raw = [tf.reshape(part, shape) for part in tf.split(params, parts, axis=-1)]
  return tfd.Independent(
      DiscretizedLogistic(loc=0.5 + raw[0], scale=positive_scale(raw[1]),
                          mixture_logits=raw[2] if parts == 3 else None),
      reinterpreted_batch_ndims=event_ndims)


def _coupled_logistic(params: tf.Tensor, mixture_components: int) -> CoupledDiscretizedLogistic:
  """[..., P] -> blocks of locations [C M], raw scales [C M], raw coefficients [C (C-1)/2 M]
  and, for M > 1, the mixture's logits [M]; coefficients squashed into (-1, 1) by tanh, as in
  PixelCNN++."""
  m = mixture_components
  per_component = params.shape[-1] // m - (m > 1)
  channels = next((c for c in range(1, per_component + 1) if c * (c + 3) // 2 == per_component),
                  None)
  if channels is None:
    raise ValueError(f"{params.shape[-1]} raw outputs a pixel are not output_channels(...,"
                     f" mixture_components={m}, coupled_channels=True) for any channel count")
  pairs = channels * (channels - 1) // 2
  loc, raw_scale, raw_coefficients, *logits = tf.split(
      params, [channels * m, channels * m, pairs * m] + [m] * (m > 1), axis=-1)

  def rows(block, count):  # [..., count * M] -> [..., count, M], channel-major
    return tf.reshape(block, tf.concat([tf.shape(params)[:-1], [count, m]], axis=0))

  return CoupledDiscretizedLogistic(
      loc=0.5 + rows(loc, channels), scale=positive_scale(rows(raw_scale, channels)),
      coefficients=tf.tanh(rows(raw_coefficients, pairs)),
      mixture_logits=logits[0] if logits else None)


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """One likelihood p(x|z): what config validation, the CLI, the networks and the data read.

  Attributes:
    name: the --likelihood value.
    params_per_value: raw decoder outputs per pixel-channel (the decoder emits C * k channels).
    build: (params [..., H, W, C * k], observation_scale, event_ndims, standardization) -> a
      distribution with event shape [H, W, C] (or [D] for vectors, params [..., D * k]);
      standardization is None, or the (mean, std) of standardized features.
    data: what it models: "binary" (grey levels are binarized for it), "8-bit" (levels
      k / 255 of 8-bit images) or "real".
    fixed_scale: whether it takes --observation_scale.
    mixture: whether it takes --mixture_components M (then 3 M raw outputs per value for
      M > 1: locations, scales, logits) and --coupled_channels (see `output_channels`).
    summary: one line for --help.
  """

  name: str
  params_per_value: int
  build: Callable[..., tfd.Distribution]
  data: str
  fixed_scale: bool = False
  mixture: bool = False
  summary: str = ""


LIKELIHOODS = {record.name: record for record in (
    Likelihood("bernoulli", 1, _bernoulli, "binary",
               summary="binary pixels, from logits"),
    Likelihood("gaussian", 2, _gaussian, "real",
               summary="grey levels in [0, 1] or real features, learned per-value scale"),
    Likelihood("gaussian_fixed", 1, _gaussian_fixed, "real", fixed_scale=True,
               summary="grey levels in [0, 1] or real features, scale --observation_scale"),
    Likelihood("discretized_logistic", 2, _discretized_logistic, "8-bit", mixture=True,
               summary="8-bit pixels, a mixture of --mixture_components logistics"),
)}


def params_per_pixel(likelihood: str, mixture_components: int = 1) -> int:
  """How many raw decoder outputs each pixel-channel needs for `likelihood`."""
  record = LIKELIHOODS[likelihood]
  if record.mixture and mixture_components > 1:
    return 3 * mixture_components
  return record.params_per_value


def output_channels(likelihood: str, channels: int, mixture_components: int = 1,
                    coupled_channels: bool = False) -> int:
  """The last axis of the raw decoder outputs for images of `channels` channels (or of vectors
  of `channels` features): C * k, or with coupled_channels M (2C + C (C - 1) / 2) plus M
  mixture logits for M > 1, 9 for one RGB logistic, 10 M for a mixture."""
  if not coupled_channels:
    return channels * params_per_pixel(likelihood, mixture_components)
  m = mixture_components
  return m * (2 * channels + channels * (channels - 1) // 2) + m * (m > 1)


def make_likelihood(likelihood: str, params: tf.Tensor, observation_scale: float | None = None,
                    event_ndims: int = 3, standardization=None, mixture_components: int = 1,
                    coupled_channels: bool = False) -> tfd.Distribution:
  """p(x|z) from raw decoder outputs [..., H, W, C * k] (event shape [H, W, C]), or [..., D * k]
  (event shape [D], event_ndims 1).

  Args:
    standardization: None, or (mean [D], std [D]) of standardized features: the decoder's
      outputs are in standardized units, the distribution is of raw values.
    mixture_components: M of a likelihood with a mixture (discretized_logistic).
    coupled_channels: for such a likelihood, a pixel's channels coupled in order
      (`CoupledDiscretizedLogistic`), params [..., H, W, output_channels(...)].
  """
  record = LIKELIHOODS[likelihood]
  extra = ({"mixture_components": mixture_components, "coupled": coupled_channels}
           if record.mixture else {})
  return record.build(params, observation_scale, event_ndims, standardization, **extra)
