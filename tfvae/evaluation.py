"""Importance-sampled log-likelihood, the ELBO, bits per dimension and an anomaly score.

log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)  (Burda et al., 2015,
appendix; Rezende et al., 2014). The K samples are drawn in chunks of `chunk_size`, merged with
a running logsumexp, so memory is O(chunk_size * B * D) whatever K is.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from tfvae import objectives
from tfvae.data import to_unit_float

DEFAULT_CHUNK_SIZE = 100
# The decodings run at once hold at most about this much in layer outputs (10,000 decodings of
# the MNIST MLP), so a conv decoder at full resolution cannot exhaust memory.
DECODE_BYTES = 80 * 2**20


def decodings_at_once(vae) -> int:
  """How many decodings of z fit in DECODE_BYTES, >= 1."""
  from tfvae import networks  # here: networks imports config, which imports distributions
  outputs = math.prod(networks.decoder_output_shape(vae.model_config))
  per_decoding = max(networks.activation_floats(vae.decoder.network), 2 * outputs)
  return max(1, DECODE_BYTES // (4 * per_decoding))


def importance_sampled_log_likelihood(vae, x: tf.Tensor, num_samples, seed: tf.Tensor,
                                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                                      content_noise: bool = False) -> tf.Tensor:
  """The K-sample estimate of log p(x), [B]; K = num_samples (a Python int or int32 tensor).

  Its expectation is the IWAE bound, which is >= the ELBO and grows to log p(x) with K.

  Args:
    vae: a tfvae.VAE.
    x: [B, H, W, C] float32 in [0, 1] or uint8 0..255.
    num_samples: K >= 1.
    seed: int32 [2] stateless seed.
    chunk_size: samples per chunk; bounds memory.
    content_noise: draw each example's noise from its content and the seed
      (tfvae.objectives.content_noise_sample), so its estimate does not depend on the rest of
      the batch, as the served scores must not; False draws it from the seed alone.
  """
  x = to_unit_float(x)
  posterior = vae.encoder(x)
  num_samples = tf.cast(num_samples, tf.int32)
  num_chunks = (num_samples + chunk_size - 1) // chunk_size
  def accumulate(i, total):
    count = tf.minimum(chunk_size, num_samples - i * chunk_size)
    log_weights, _ = objectives.log_importance_weights(
        x, posterior, vae.prior, vae.decoder, count, objectives.fold_in(seed, i),
        content_noise=content_noise)  # [count, B]
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
      [0, 1] (or vectors [N, D]); or a tf.data.Dataset of such batches
      (tfvae.data.eval_batches), whose own batch size is kept.
    num_samples: K for the importance-sampled log-likelihood; 0 skips it.
    chunk_size: samples of z decoded at once per example; made smaller where batch * chunk
      decodings would not fit in DECODE_BYTES.

  Returns:
    Dict with "elbo", "kl", "nll", when K > 0 "log_likelihood", and "bits_per_dim" with
    "bits_per_dim_of" (see `bits_per_dim_kind`), "num_samples", "num_examples".
  """
  if isinstance(x, tf.data.Dataset):
    batch = (tf.nest.flatten(x.element_spec)[0].shape[0]
             or tf.nest.flatten(next(iter(x)))[0].shape[0])  # a ragged last batch: the first's
  else:
    batch = min(batch_size, len(x))
  chunk_size = max(1, min(chunk_size, decodings_at_once(vae) // max(1, batch)))
  batch_terms = _batch_terms_function(vae, num_samples, chunk_size)
  base_seed = tf.constant([seed, 0], tf.int32)
  return _aggregate(
      lambda batch, index: batch_terms(batch, objectives.fold_in(base_seed, index)), x,
      num_samples, batch_size, bits_per_dim_kind(vae.model_config))


def bits_per_dim_kind(model_config) -> str | None:
  """How bits/dim is defined for a model: "discrete" (-log2 p(x) / D, for the Bernoulli and the
  discretized logistic), "dequantized" (a density on 8-bit images in [0, 1];
  tfvae.objectives.bits_per_dim), or None for standardized real features, where no
  quantization makes it a code length."""
  from tfvae.distributions import LIKELIHOODS  # here: distributions imports no evaluation
  if model_config.standardize:
    return None
  discrete = LIKELIHOODS[model_config.likelihood].data in ("binary", "8-bit")
  return "discrete" if discrete else "dequantized"


def evaluate_saved_model(path, x: np.ndarray, num_samples: int, seed: int = 0,
                         batch_size: int = 100) -> dict[str, float]:
  """`evaluate` through an exported SavedModel's signatures (serving_default, log_likelihood).

  Batches are made smaller where the export's request limits (assets.extra/tfvae.json) need.

  Returns:
    Dict with "elbo" (one sample per example), "log_likelihood" when K > 0, "bits_per_dim"
    and "bits_per_dim_of" as `evaluate` gives them, "num_samples" and "num_examples".

  Raises:
    ValueError: num_samples is more than the log_likelihood signature takes in one request.
  """
  if num_samples > 0:
    shape = x.element_spec.shape[1:] if isinstance(x, tf.data.Dataset) else x.shape[1:]
    batch_size = _batch_size_within_limits(path, tuple(shape), num_samples, batch_size)
  if isinstance(x, tf.data.Dataset):  # in batches the export's request limits take
    x = x.unbatch().batch(batch_size)
  model = tf.saved_model.load(str(path))  # kept alive here: the signatures use its variables
  signatures = model.signatures

  def batch_terms(batch, index):
    terms = {"elbo": signatures["serving_default"](x=batch)["elbo"]}
    if num_samples > 0:
      terms["log_likelihood"] = signatures["log_likelihood"](
          x=batch, num_samples=tf.constant(num_samples, tf.int32),
          seed=tf.constant(seed, tf.int64) * 1_000_003 + index)["log_likelihood"]
    return terms

  from tfvae import export  # here, since export imports this module
  from tfvae.config import ModelConfig
  config = ModelConfig.from_dict(export.load_metadata(path)["model_config"])
  return _aggregate(batch_terms, x, num_samples, batch_size, bits_per_dim_kind(config))


def _batch_size_within_limits(path, image_shape, num_samples: int, batch_size: int) -> int:
  """The largest batch size <= batch_size whose log_likelihood requests the export accepts.

  Raises:
    ValueError: num_samples alone is more than the export's log_likelihood signature takes.
  """
  from tfvae import export  # here, since export imports this module

  limits = export.load_metadata(path).get("request_limits", {})  # older exports: no limits
  pixels = math.prod(image_shape)
  max_num_samples = min(limits.get("max_num_samples", num_samples),
                        limits.get("max_log_likelihood_pixels", num_samples * pixels) // pixels)
  if num_samples > max_num_samples:
    raise ValueError(f"num_samples={num_samples} is more than {path} takes per request for"
                     f" {'x'.join(map(str, image_shape))} images; pass at most"
                     f" {max_num_samples}")
  if "max_log_likelihood_pixels" in limits:
    batch_size = min(batch_size, limits["max_log_likelihood_pixels"] // (num_samples * pixels))
  return batch_size


def complexity_bits(x: tf.Tensor) -> tf.Tensor:
  """L(x): each image's lossless compressed length in bits, its PNG's length * 8, [B].

  The complexity estimate of Serra et al., "Input complexity and out-of-distribution detection
  with likelihood-based generative models" (ICLR 2020), computed in the graph, so a SavedModel
  serves it. Floats in [0, 1] are quantized to 0..255 first; images of more than 4 channels
  (more than PNG holds) are encoded as one grey image of their channels side by side.

  Feature vectors [B, D] are no pictures: their complexity is 0, and the score is -log2 p(x).

  Args:
    x: [B, H, W, C] float in [0, 1] or uint8 0..255, H, W and C known when traced.
  """
  x = tf.convert_to_tensor(x)
  if x.shape.rank == 2:
    return tf.zeros(tf.shape(x)[:1], tf.float32)
  if x.dtype != tf.uint8:
    x = tf.cast(tf.round(tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 1.0) * 255.0), tf.uint8)
  height, width, channels = x.shape[1:]
  if channels > 4:
    x = tf.reshape(x, [-1, height, width * channels, 1])  # [B, H, W * C, 1]
  lengths = tf.map_fn(lambda image: tf.strings.length(tf.io.encode_png(image)), x,
                      fn_output_signature=tf.int32)  # [B] bytes
  return 8.0 * tf.cast(lengths, tf.float32)


def anomaly_score(log_likelihood: tf.Tensor, complexity: tf.Tensor) -> tf.Tensor:
  """S(x) = -log2 p(x) - L(x) in bits, [B]; higher is more anomalous (Serra et al., 2020).

  -log2 p(x) alone can rate simple images (a blank image, a single stroke) as more likely than
  the training data itself (Nalisnick et al., 2019); subtracting the compressed length takes out
  what a general-purpose compressor already finds simple.

  Args:
    log_likelihood: [B] log p(x) in nats: an ELBO or an importance-sampled estimate.
    complexity: [B] L(x) in bits, `complexity_bits` of the same images.
  """
  return -log_likelihood / math.log(2.0) - complexity


def _batches(x, batch_size: int):
  """Batches of x, an array (sliced: no second copy inside TensorFlow) or a tf.data.Dataset."""
  if isinstance(x, tf.data.Dataset):
    yield from x
    return
  for start in range(0, len(x), batch_size):
    yield x[start:start + batch_size]


def _aggregate(batch_terms, x, num_samples: int, batch_size: int,
               kind: str | None) -> dict[str, float]:
  """Per-example means of batch_terms(batch, index) -> {name: [B]} over x, plus bits/dim of
  the `bits_per_dim_kind` kind (of log_likelihood where computed, else of the ELBO)."""
  sums: dict[str, float] = {}
  count, num_dims = 0, None
  for index, batch in enumerate(_batches(x, batch_size)):
    batch = to_unit_float(batch)
    count += int(batch.shape[0])
    num_dims = math.prod(batch.shape[1:])
    for name, values in batch_terms(batch, tf.constant(index, tf.int64)).items():
      sums[name] = sums.get(name, 0.0) + float(tf.reduce_sum(tf.cast(values, tf.float64)))
  if not count:
    raise ValueError("nothing to evaluate: no examples")
  results = {name: total / count for name, total in sums.items()}
  estimate = (f"log_likelihood (importance sampled, K={num_samples})" if num_samples > 0
              else "elbo (above the log-likelihood's figure)")
  if kind is None:
    results.update(bits_per_dim=None, bits_per_dim_of="none: standardized real features")
  else:
    score = results.get("log_likelihood", results["elbo"])
    results["bits_per_dim"] = float(objectives.bits_per_dim(
        tf.constant(score, tf.float64), num_dims, dequantized=kind == "dequantized"))
    results["bits_per_dim_of"] = f"{estimate}, {kind}"
  results.update(num_samples=int(num_samples), num_examples=count)
  return results
