"""Importance-sampled marginal log-likelihood, the ELBO and bits per dimension.

log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)  (Burda et al., 2015,
appendix; Rezende et al., 2014). The K samples are drawn in chunks of `chunk_size`, merged with
a running logsumexp, so memory is O(chunk_size * B * D) whatever K is: for the default MNIST
model, B = 100 and chunk_size = 100, the process peaks about 110 MiB above its baseline, the
same at K = 1000 and K = 5000 (measured with getrusage; see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from tfvae import objectives
from tfvae.data import to_unit_float

DEFAULT_CHUNK_SIZE = 100


def importance_sampled_log_likelihood(vae, x: tf.Tensor, num_samples, seed: tf.Tensor,
                                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> tf.Tensor:
  """The K-sample estimate of log p(x), [B]; K = num_samples (a Python int or int32 tensor).

  Its expectation is the IWAE bound, which is >= the ELBO and grows to log p(x) with K.

  Args:
    vae: a tfvae.VAE.
    x: [B, H, W, C] float32 in [0, 1] or uint8 0..255.
    num_samples: K >= 1.
    seed: int32 [2] stateless seed.
    chunk_size: samples per chunk; bounds memory.
  """
  x = to_unit_float(x)
  posterior = vae.encoder(x)
  num_samples = tf.cast(num_samples, tf.int32)
  num_chunks = (num_samples + chunk_size - 1) // chunk_size
  def accumulate(i, total):
    count = tf.minimum(chunk_size, num_samples - i * chunk_size)
    log_weights, _ = objectives.log_importance_weights(
        x, posterior, vae.prior, vae.decoder, count,
        objectives.fold_in(seed, i))  # [count, B]
    chunk_total = tf.reduce_logsumexp(log_weights, axis=0)  # [B]
    return i + 1, tf.reduce_logsumexp(tf.stack([total, chunk_total]), axis=0)

  start = tf.fill(tf.shape(x)[:1], tf.constant(-np.inf, tf.float32))  # [B] running logsumexp
  # An explicit while_loop (not autograph), so it also traces inside exported signatures.
  _, total = tf.while_loop(lambda i, _: i < num_chunks, accumulate, (tf.constant(0), start))
  return total - tf.math.log(tf.cast(num_samples, tf.float32))


# vae -> {(num_samples, chunk_size): tf.function}, so repeated evaluations trace once.
_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch_terms_function(vae, num_samples: int, chunk_size: int):
  """A cached tf.function (batch, seed [2]) -> {name: [B]}: ELBO terms and, if K > 0, log p(x)."""
  functions = _FUNCTIONS.setdefault(vae, {})
  key = (num_samples, chunk_size)
  if key not in functions:

    @tf.function(reduce_retracing=True)
    def batch_terms(batch, batch_seed):
      terms = objectives.elbo_terms(batch, vae.encoder(batch), vae.prior, vae.decoder, 1,
                                    objectives.fold_in(batch_seed, 0))
      if num_samples > 0:
        terms["log_likelihood"] = importance_sampled_log_likelihood(
            vae, batch, num_samples, objectives.fold_in(batch_seed, 1), chunk_size)
      return terms

    functions[key] = batch_terms
  return functions[key]


def evaluate(vae, x: np.ndarray, num_samples: int, seed: int = 0, batch_size: int = 100,
             chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
  """Per-example means over x of the ELBO (L = 1) and, when num_samples > 0, log p(x).

  Args:
    vae: a tfvae.VAE.
    x: [N, H, W, C] evaluation images from tfvae.data.eval_arrays: uint8 0..255 or float32 in
      [0, 1].
    num_samples: K for the importance-sampled log-likelihood; 0 skips it.

  Returns:
    Dict with "elbo", "kl", "nll" and, when K > 0, "log_likelihood" and "bits_per_dim" (of
    log_likelihood; else of the ELBO), and "num_samples", "num_examples".
  """
  batch_terms = _batch_terms_function(vae, num_samples, chunk_size)
  base_seed = tf.constant([seed, 0], tf.int32)
  return _aggregate(
      lambda batch, index: batch_terms(batch, objectives.fold_in(base_seed, index)), x,
      num_samples, batch_size)


def evaluate_saved_model(path, x: np.ndarray, num_samples: int, seed: int = 0,
                         batch_size: int = 100) -> dict[str, float]:
  """`evaluate` through an exported SavedModel's signatures (serving_default, log_likelihood).

  Returns:
    Dict with "elbo" (one sample per example), "log_likelihood" and "bits_per_dim" when K > 0,
    "num_samples" and "num_examples".
  """
  model = tf.saved_model.load(str(path))  # kept alive here: the signatures use its variables
  signatures = model.signatures

  def batch_terms(batch, index):
    terms = {"elbo": signatures["serving_default"](x=batch)["elbo"]}
    if num_samples > 0:
      terms["log_likelihood"] = signatures["log_likelihood"](
          x=batch, num_samples=tf.constant(num_samples, tf.int32),
          seed=tf.constant(seed, tf.int64) * 1_000_003 + index)["log_likelihood"]
    return terms

  return _aggregate(batch_terms, x, num_samples, batch_size)


def _aggregate(batch_terms, x: np.ndarray, num_samples: int,
               batch_size: int) -> dict[str, float]:
  """Per-example means of batch_terms(batch, index) -> {name: [B]} over x, plus bits/dim."""
  sums: dict[str, float] = {}
  # Batch by batch from the array: no second copy of the whole set inside TensorFlow.
  for index, start in enumerate(range(0, len(x), batch_size)):
    batch = to_unit_float(x[start:start + batch_size])
    for name, values in batch_terms(batch, tf.constant(index, tf.int64)).items():
      sums[name] = sums.get(name, 0.0) + float(tf.reduce_sum(tf.cast(values, tf.float64)))
  results = {name: total / len(x) for name, total in sums.items()}
  num_dims = math.prod(x.shape[1:])
  score = results.get("log_likelihood", results["elbo"])
  results["bits_per_dim"] = float(objectives.bits_per_dim(tf.constant(score), num_dims))
  results.update(num_samples=int(num_samples), num_examples=int(len(x)))
  return results
