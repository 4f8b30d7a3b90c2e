"""The VAE objectives, per example: every function returns a [B] tensor in nats.

Written once and shared by VAE.train_step, VAE.test_step, tfvae.evaluation and the SavedModel
signatures; batch means happen only in the model's metrics.

Notation (Kingma & Welling, 2013): q(z|x) the posterior (encoder), p(z) = N(0, I) the prior,
p(x|z) the likelihood (decoder), L Monte Carlo samples z_l = mu + sigma * eps_l, eps_l ~ N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

# z [K, B, J] -> p(x|z) with batch shape [K, B].
DecodeFn = Callable[[tf.Tensor], tfd.Distribution]


def fold_in(seed: tf.Tensor, index) -> tf.Tensor:
  """An int32 [2] stateless seed derived from seed [2] and an integer index (a chunk of samples)."""
  return tf.cast(tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64)),
                 tf.int32)


def analytic_kl(posterior: tfd.Distribution, prior: tfd.Distribution) -> tf.Tensor:
  """KL(q(z|x) || p(z)) in closed form, [B].

  For a diagonal Gaussian against N(0, I) this is 0.5 * sum_j (mu_j^2 + sigma_j^2
  - log sigma_j^2 - 1), the negative of eq. 10's first term.
  """
  return tfd.kl_divergence(posterior, prior)


_MASK32 = 0xFFFFFFFF
# Fixed integer weights of the content digest, and the digest's resolution (2**16 levels of x).
_DIGEST_SEED, _DIGEST_LEVELS = (1312, 6114), 2**16


def _xor(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  return tf.bitwise.bitwise_xor(a, b)


def _low32(h: tf.Tensor) -> tf.Tensor:
  return tf.bitwise.bitwise_and(h, tf.constant(_MASK32, tf.int64))


def _mix32(h: tf.Tensor) -> tf.Tensor:
  """MurmurHash3's finalizer on 32-bit values held in int64: each output bit depends on all.

  The int64 products may wrap; their low 32 bits, all that is kept, are exact either way.
  """
  shift = tf.bitwise.right_shift
  h = _xor(h, shift(h, tf.constant(16, tf.int64)))
  h = _low32(h * 0x85EBCA6B)
  h = _xor(h, shift(h, tf.constant(13, tf.int64)))
  h = _low32(h * 0xC2B2AE35)
  return _xor(h, shift(h, tf.constant(16, tf.int64)))


def content_digest(x: tf.Tensor) -> tf.Tensor:
  """A 32-bit digest of each example of x [B, ...] in [0, 1], int64 [B].

  An integer weighted sum of x quantized to 2**16 levels, so it is exact in any order: an
  example's digest is the same alone and inside any batch.
  """
  flat = tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])  # [B, D]
  levels = tf.cast(tf.round(flat * _DIGEST_LEVELS), tf.int64)  # [B, D]
  weights = tf.random.stateless_uniform(tf.shape(flat)[1:], seed=_DIGEST_SEED, minval=1,
                                        maxval=2**20, dtype=tf.int64)  # [D]
  total = tf.reduce_sum(levels * weights, axis=1)  # [B], under 2**63 for D < 2**27
  high = _low32(tf.bitwise.right_shift(total, tf.constant(32, tf.int64)))
  return _mix32(_xor(_mix32(_low32(total)), high))


def content_noise_sample(x: tf.Tensor, posterior: tfd.Distribution, num_samples: int | tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """z_l = mu + sigma * eps_l with eps_l ~ N(0, I) a function of the example's content and seed.

  An example's draws depend only on the example and the seed, not on the other examples of
  the batch or on its position among them, so a served score is a function of the image
  alone; different images draw independent noise, so a mean over many stays precise. eps
  comes from a counter hash of (digest, seed, l, j) through the normal quantile function.

  Args:
    x: [B, H, W, C] observations in [0, 1].
    posterior: q(z|x), a diagonal Normal with batch shape [B] and event shape [J], as
      tfvae.distributions.make_posterior builds it.
    num_samples: L.
    seed: int32 [2] stateless seed.

  Returns:
    z [L, B, J].
  """
  loc = posterior.mean()  # [B, J]
  scale = posterior.stddev()  # [B, J]
  seed = _low32(tf.cast(seed, tf.int64))
  key = _mix32(_xor(_mix32(_xor(content_digest(x), seed[0])), seed[1]))  # [B]
  size = tf.cast(tf.shape(loc)[-1], tf.int64)
  counter = (tf.range(tf.cast(num_samples, tf.int64))[:, None, None] * size
             + tf.range(size)[None, None, :])  # [L, 1, J]
  bits = _mix32(_xor(_mix32(_low32(counter)), key[None, :, None]))  # [L, B, J]
  uniform = (tf.cast(bits, tf.float64) + 0.5) / 2.0**32  # in (0, 1)
  noise = tf.cast(tf.math.ndtri(uniform), loc.dtype)  # [L, B, J]
  return loc + scale * noise  # [L, B, J]


def sample_log_likelihoods(x: tf.Tensor, posterior: tfd.Distribution, decode: DecodeFn,
                           num_samples: int | tf.Tensor, seed: tf.Tensor,
                           content_noise: bool = False):
  """Draws z_l ~ q(z|x) by reparameterization and scores x under each p(x|z_l).

  Args:
    x: [B, H, W, C] observations.
    posterior: q(z|x), batch shape [B], event shape [J], reparameterized.
    decode: z [L, B, J] -> p(x|z) with batch shape [L, B].
    num_samples: L.
    seed: int32 [2] stateless seed.
    content_noise: draw the noise with `content_noise_sample` (a function of each example's
      content and the seed, for scores that do not depend on the batch) instead of from the
      seed alone.

  Returns:
    (z [L, B, J], log p(x|z_l) [L, B]).
  """
  if content_noise:
    z = content_noise_sample(x, posterior, num_samples, seed)  # [L, B, J]
  else:
    z = posterior.sample(num_samples, seed=seed)  # [L, B, J]; z = mu + sigma * eps
  return z, decode(z).log_prob(x)  # [L, B]


def elbo_terms(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
               decode: DecodeFn, num_samples: int, seed: tf.Tensor,
               content_noise: bool = False) -> dict[str, tf.Tensor]:
  """The SGVB estimator B(theta, phi; x) of eq. 10, split into its terms.

  Args:
    content_noise: see `sample_log_likelihoods`; False for training.

  Returns:
    Dict of [B] tensors: "kl" (analytic), "nll" (-(1/L) sum_l log p(x|z_l)) and
    "elbo" = -(kl + nll).
  """
  _, log_likelihoods = sample_log_likelihoods(x, posterior, decode, num_samples, seed,
                                              content_noise)
  nll = -tf.reduce_mean(log_likelihoods, axis=0)  # [B]
  kl = analytic_kl(posterior, prior)  # [B]
  return {"kl": kl, "nll": nll, "elbo": -(kl + nll)}


def log_importance_weights(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
                           decode: DecodeFn, num_samples: int | tf.Tensor, seed: tf.Tensor,
                           content_noise: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
  """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x).

  Args:
    content_noise: see `sample_log_likelihoods`.

  Returns:
    (log w [K, B], log p(x|z_k) [K, B]).
  """
  z, log_likelihoods = sample_log_likelihoods(x, posterior, decode, num_samples, seed,
                                              content_noise)
  log_weights = log_likelihoods + prior.log_prob(z) - posterior.log_prob(z)  # [K, B]
  return log_weights, log_likelihoods


def log_mean_exp(log_values: tf.Tensor, axis: int = 0) -> tf.Tensor:
  """log((1/K) sum_k exp(v_k)) along `axis`, computed stably with logsumexp."""
  count = tf.cast(tf.shape(log_values)[axis], log_values.dtype)
  return tf.reduce_logsumexp(log_values, axis=axis) - tf.math.log(count)


def iwae_terms(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
               decode: DecodeFn, num_samples: int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """The K-sample importance weighted bound of Burda et al. (2015), eq. 8, and ELBO terms.

  iwae = log (1/K) sum_k w_k; the "elbo", "kl" and "nll" entries reuse the same K samples
  with the analytic KL, so they are comparable with `elbo_terms`.
  """
  log_weights, log_likelihoods = log_importance_weights(x, posterior, prior, decode,
                                                        num_samples, seed)
  nll = -tf.reduce_mean(log_likelihoods, axis=0)  # [B]
  kl = analytic_kl(posterior, prior)  # [B]
  return {"iwae": log_mean_exp(log_weights, axis=0), "kl": kl, "nll": nll, "elbo": -(kl + nll)}


def iwae_dreg_terms(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
                    decode: DecodeFn, num_samples: int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """`iwae_terms` whose "loss" has the doubly reparameterized gradient (Tucker et al., 2018).

  The value of loss is -iwae. Its gradient is, with normalized weights w~_k = w_k / sum_j w_j:
  for the decoder, the IWAE gradient -sum_k w~_k grad log w_k; for the encoder,
  -sum_k w~_k^2 (d log w_k / d z_k) dz_k/dphi, with log q's parameters held fixed in log w_k.
  Both are unbiased; the encoder's has far less variance at large K (Tucker et al., eq. 8).
  The w~_k^2 comes from one decoding: the gradient reaching z_k is scaled by w~_k on its way
  back, and the surrogate sum_k w~_k log w_k gives the other w~_k.
  """
  weights = {}

  @tf.custom_gradient
  def scaled_on_the_way_back(z):  # identity; the gradient to z_k [K, B, J] times w~_k
    return tf.identity(z), lambda upstream: upstream * weights["normalized"][..., None]

  z = scaled_on_the_way_back(posterior.sample(num_samples, seed=seed))  # [K, B, J]
  fixed_q = tfd.Independent(tfd.Normal(tf.stop_gradient(posterior.mean()),
                                       tf.stop_gradient(posterior.stddev())),
                            reinterpreted_batch_ndims=1)
  log_likelihoods = decode(z).log_prob(x)  # [K, B]
  log_weights = log_likelihoods + prior.log_prob(z) - fixed_q.log_prob(z)  # [K, B]
  weights["normalized"] = tf.stop_gradient(tf.nn.softmax(log_weights, axis=0))  # [K, B]
  surrogate = tf.reduce_sum(weights["normalized"] * log_weights, axis=0)  # [B]
  iwae = log_mean_exp(log_weights, axis=0)  # [B]
  nll = -tf.reduce_mean(log_likelihoods, axis=0)  # [B]
  kl = analytic_kl(posterior, prior)  # [B]
  return {"iwae": iwae, "kl": kl, "nll": nll, "elbo": -(kl + nll),
          # The value of -iwae, the gradient of -surrogate alone.
          "loss": -(tf.stop_gradient(iwae) + surrogate - tf.stop_gradient(surrogate))}


def per_example_loss(objective: str, x: tf.Tensor, posterior: tfd.Distribution,
                     prior: tfd.Distribution, decode: DecodeFn, num_samples: int,
                     seed: tf.Tensor, beta: float | tf.Tensor = 1.0,
                     gradient_estimator: str = "standard") -> dict[str, tf.Tensor]:
  """The training loss and the reported terms, all [B].

  Args:
    objective: "elbo": loss = nll + beta * kl (beta = 1 is -ELBO, beta = 0 an auto-encoder;
      a scalar tensor for a schedule); "iwae": loss = -iwae bound (beta must be 1).
    gradient_estimator: for iwae, "standard" (the reparameterization gradient of the bound)
      or "dreg" (`iwae_dreg_terms`).

  Returns:
    Dict with "loss", "elbo", "kl", "nll" (and "iwae" for that objective).
  """
  if objective == "elbo":
    terms = elbo_terms(x, posterior, prior, decode, num_samples, seed)
    terms["loss"] = terms["nll"] + beta * terms["kl"]
  elif objective == "iwae" and gradient_estimator == "dreg":
    terms = iwae_dreg_terms(x, posterior, prior, decode, num_samples, seed)
  elif objective == "iwae":
    terms = iwae_terms(x, posterior, prior, decode, num_samples, seed)
    terms["loss"] = -terms["iwae"]
  else:
    raise ValueError(f"objective={objective!r} is not one of elbo, iwae")
  return terms


def bits_per_dim(log_likelihood: tf.Tensor, num_dims: int,
                 dequantized: bool = False) -> tf.Tensor:
  """Nats per example -> bits per dimension, one definition for every report.

  A discrete likelihood (Bernoulli on binary values) gives a code length: -log2 p(x) / D. A
  density on 8-bit values scaled to [0, 1] is not one (it can exceed 1, and -log2 go
  negative); with dequantized, it is moved to the 0..256 scale, -(log p(x) - D log 256) /
  (D log 2), the figure PixelCNN and IAF papers report. That is a code length for a density of
  dequantized values x + u/256 and stays >= 0 unless the density exceeds 256 per value.
  """
  bits = -log_likelihood / (num_dims * math.log(2.0))
  return bits + 8.0 if dequantized else bits
