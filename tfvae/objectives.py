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
  """An int32 [2] stateless seed derived from seed [2] and an integer index (chunk, shard...)."""
  return tf.cast(tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64)),
                 tf.int32)


def analytic_kl(posterior: tfd.Distribution, prior: tfd.Distribution) -> tf.Tensor:
  """KL(q(z|x) || p(z)) in closed form, [B].

  For a diagonal Gaussian against N(0, I) this is 0.5 * sum_j (mu_j^2 + sigma_j^2
  - log sigma_j^2 - 1), the negative of eq. 10's first term.
  """
  return tfd.kl_divergence(posterior, prior)


def sample_log_likelihoods(x: tf.Tensor, posterior: tfd.Distribution, decode: DecodeFn,
                           num_samples: int | tf.Tensor, seed: tf.Tensor):
  """Draws z_l ~ q(z|x) by reparameterization and scores x under each p(x|z_l).

  Args:
    x: [B, H, W, C] observations.
    posterior: q(z|x), batch shape [B], event shape [J], reparameterized.
    decode: z [L, B, J] -> p(x|z) with batch shape [L, B].
    num_samples: L.
    seed: int32 [2] stateless seed.

  Returns:
    (z [L, B, J], log p(x|z_l) [L, B]).
  """
  z = posterior.sample(num_samples, seed=seed)  # [L, B, J]; z = mu + sigma * eps
  return z, decode(z).log_prob(x)  # [L, B]


def elbo_terms(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
               decode: DecodeFn, num_samples: int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """The SGVB estimator B(theta, phi; x) of eq. 10, split into its terms.

  Returns:
    Dict of [B] tensors: "kl" (analytic), "nll" (-(1/L) sum_l log p(x|z_l)) and
    "elbo" = -(kl + nll).
  """
  _, log_likelihoods = sample_log_likelihoods(x, posterior, decode, num_samples, seed)
  nll = -tf.reduce_mean(log_likelihoods, axis=0)  # [B]
  kl = analytic_kl(posterior, prior)  # [B]
  return {"kl": kl, "nll": nll, "elbo": -(kl + nll)}


def log_importance_weights(x: tf.Tensor, posterior: tfd.Distribution, prior: tfd.Distribution,
                           decode: DecodeFn, num_samples: int | tf.Tensor,
                           seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x).

  Returns:
    (log w [K, B], log p(x|z_k) [K, B]).
  """
  z, log_likelihoods = sample_log_likelihoods(x, posterior, decode, num_samples, seed)
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


def per_example_loss(objective: str, x: tf.Tensor, posterior: tfd.Distribution,
                     prior: tfd.Distribution, decode: DecodeFn, num_samples: int,
                     seed: tf.Tensor, beta: float = 1.0) -> dict[str, tf.Tensor]:
  """The training loss and the reported terms, all [B].

  Args:
    objective: "elbo": loss = nll + beta * kl (beta = 1 is -ELBO, beta = 0 an auto-encoder);
      "iwae": loss = -iwae bound (beta must be 1).

  Returns:
    Dict with "loss", "elbo", "kl", "nll" (and "iwae" for that objective).
  """
  if objective == "elbo":
    terms = elbo_terms(x, posterior, prior, decode, num_samples, seed)
    terms["loss"] = terms["nll"] + beta * terms["kl"]
  elif objective == "iwae":
    terms = iwae_terms(x, posterior, prior, decode, num_samples, seed)
    terms["loss"] = -terms["iwae"]
  else:
    raise ValueError(f"objective={objective!r} is not one of elbo, iwae")
  return terms


def bits_per_dim(log_likelihood: tf.Tensor, num_dims: int) -> tf.Tensor:
  """-log2 p(x) / D: nats per example -> bits per dimension."""
  return -log_likelihood / (num_dims * math.log(2.0))
