"""Raw network outputs -> TFP distributions: the posterior, the prior and the likelihoods.

Networks emit unconstrained tensors; this module alone turns them into distributions, so the
numerics live in one place: Bernoulli from logits (never probabilities), scales through
`softplus(raw + softplus_inverse(1)) + MIN_SCALE` so a zero raw output means a unit scale and
no scale reaches 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

# Smallest standard deviation of the posterior and of the Gaussian likelihoods. 1e-3 is far below
# a pixel's quantization step (1/255) yet keeps log sigma >= -6.9, so no density can blow up.
MIN_SCALE = 1e-3
_SOFTPLUS_INVERSE_ONE = float(np.log(np.expm1(1.0)))  # softplus(this) == 1


def positive_scale(raw: tf.Tensor) -> tf.Tensor:
  """Maps an unconstrained tensor to a standard deviation in (MIN_SCALE, inf); 0 maps to ~1."""
  return tf.nn.softplus(raw + _SOFTPLUS_INVERSE_ONE) + MIN_SCALE


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
  return _normal(raw_loc, positive_scale(raw_scale), event_ndims, standardization)


def _gaussian_fixed(params: tf.Tensor, observation_scale: float | None, event_ndims: int,
                    standardization) -> tfd.Distribution:
  # log p(x|z) = -||x - mu(z)||^2 / (2 s^2) - D log(s sqrt(2 pi)): a scaled squared error.
  scale = tf.constant(observation_scale, params.dtype)
  return _normal(params, scale, event_ndims, standardization)


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """One likelihood p(x|z): what config validation, the CLI, the networks and the data read.

  Attributes:
    name: the --likelihood value.
    params_per_value: raw decoder outputs per pixel-channel (the decoder emits C * k channels).
    build: (params [..., H, W, C * k], observation_scale, event_ndims, standardization) -> a
      distribution with event shape [H, W, C] (or [D] for vectors, params [..., D * k]);
      standardization is None, or the (mean, std) of standardized features.
    data: what it models: "binary" (grey levels are binarized for it), "8-bit" or "real".
    fixed_scale: whether it takes --observation_scale.
    summary: one line for --help.
  """

  name: str
  params_per_value: int
  build: Callable[..., tfd.Distribution]
  data: str
  fixed_scale: bool = False
  summary: str = ""


LIKELIHOODS = {record.name: record for record in (
    Likelihood("bernoulli", 1, _bernoulli, "binary",
               summary="binary pixels, from logits"),
    Likelihood("gaussian", 2, _gaussian, "real",
               summary="grey levels in [0, 1] or real features, learned per-value scale"),
    Likelihood("gaussian_fixed", 1, _gaussian_fixed, "real", fixed_scale=True,
               summary="grey levels in [0, 1] or real features, scale --observation_scale"),
)}


def params_per_pixel(likelihood: str) -> int:
  """How many raw decoder outputs each pixel-channel needs for `likelihood`."""
  return LIKELIHOODS[likelihood].params_per_value


def make_likelihood(likelihood: str, params: tf.Tensor, observation_scale: float | None = None,
                    event_ndims: int = 3, standardization=None) -> tfd.Distribution:
  """p(x|z) from raw decoder outputs [..., H, W, C * k] (event shape [H, W, C]), or [..., D * k]
  (event shape [D], event_ndims 1).

  Args:
    standardization: None, or (mean [D], std [D]) of standardized features: the decoder's
      outputs are in standardized units, the distribution is of raw values.
  """
  return LIKELIHOODS[likelihood].build(params, observation_scale, event_ndims, standardization)
