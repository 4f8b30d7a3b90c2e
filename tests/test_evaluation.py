"""Importance-sampled log-likelihood against numerical integration and the ELBO."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, special, stats

import tfvae
from tfvae import evaluation, objectives


def _tiny_vae():
  # A 1-D latent space over 2x2 binary images, so log p(x) is a 1-D integral.
  tf.keras.utils.set_random_seed(3)
  return tfvae.VAE(tfvae.ModelConfig(image_shape=(2, 2, 1), latent_size=1, hidden_sizes=(8,)))


def _integrated_log_likelihood(vae, x):
  """log p(x) = log int p(x|z) N(z; 0, 1) dz by the trapezoid rule on a fine grid."""
  z = np.linspace(-10, 10, 20001, dtype=np.float32)
  log_px_given_z = vae.decoder(z[:, None, None]).log_prob(x).numpy()  # [Z, B]
  integrand = np.exp(log_px_given_z.astype(np.float64) + stats.norm.logpdf(z)[:, None])
  return np.log(integrate.trapezoid(integrand, z, axis=0))


def test_estimate_matches_numerical_integration():
  vae = _tiny_vae()
  x = np.array([[[[0], [1]], [[1], [1]]], [[[0], [0]], [[0], [1]]]], np.float32)
  exact = _integrated_log_likelihood(vae, x)
  estimate = evaluation.importance_sampled_log_likelihood(
      vae, x, 5000, tf.constant([1, 2]), chunk_size=700).numpy()
  np.testing.assert_allclose(estimate, exact, atol=0.02)


def test_estimate_is_above_the_elbo_and_grows_with_k(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  seed = tf.constant([5, 6])
  elbo = objectives.elbo_terms(binary_batch, vae.encoder(binary_batch), vae.prior,
                               vae.decoder, 2000, seed)["elbo"].numpy()
  estimates = [evaluation.importance_sampled_log_likelihood(vae, binary_batch, k, seed).numpy()
               for k in (1, 10, 1000)]
  assert np.all(estimates[2] > elbo)
  assert np.mean(estimates[2]) > np.mean(estimates[1]) > np.mean(estimates[0])


def test_k_1_equals_the_elbo_in_expectation(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  x = binary_batch[:2]
  draws = np.stack([evaluation.importance_sampled_log_likelihood(
      vae, x, 1, tf.constant([i, 0])).numpy() for i in range(400)])  # [400, 2]
  # The single-sample MC ELBO (MC KL too) averaged over many draws -> the analytic-KL ELBO.
  elbo = objectives.elbo_terms(x, vae.encoder(x), vae.prior, vae.decoder, 20000,
                               tf.constant([9, 9]))["elbo"].numpy()
  standard_error = draws.std(0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(0) - elbo) < 4 * standard_error + 0.05), (draws.mean(0), elbo)


def test_chunks_merge_into_the_logsumexp_over_all_samples(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  seed = tf.constant([1, 1])
  estimate = evaluation.importance_sampled_log_likelihood(vae, binary_batch, 150, seed,
                                                          chunk_size=64).numpy()
  posterior = vae.encoder(binary_batch)
  log_weights = np.concatenate([objectives.log_importance_weights(
      binary_batch, posterior, vae.prior, vae.decoder, count,
      objectives.fold_in(seed, i))[0].numpy() for i, count in enumerate((64, 64, 22))])
  assert log_weights.shape == (150, 8)
  np.testing.assert_allclose(estimate, special.logsumexp(log_weights, axis=0) - np.log(150),
                             rtol=1e-6)


def test_evaluate_reports_per_example_means(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  results = evaluation.evaluate(vae, binary_batch, num_samples=50, batch_size=3)
  assert results["num_examples"] == 8 and results["num_samples"] == 50
  assert results["log_likelihood"] > results["elbo"]
  np.testing.assert_allclose(results["bits_per_dim"],
                             -results["log_likelihood"] / (784 * np.log(2)), rtol=1e-6)


def test_content_noise_estimates_what_independent_noise_does(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  estimates = {content: np.stack([evaluation.importance_sampled_log_likelihood(
      vae, binary_batch, 2000, tf.constant([seed, 7]), content_noise=content).numpy()
      for seed in range(6)]) for content in (True, False)}  # [seeds, B]
  shared, independent = estimates[True], estimates[False]
  assert not np.allclose(shared[0], independent[0], rtol=0, atol=1e-6)  # other draws
  standard_error = np.sqrt((shared.var(0) + independent.var(0)) / len(shared))
  difference = np.abs(shared.mean(0) - independent.mean(0))
  assert np.all(difference < 4 * standard_error + 0.02), (difference, standard_error)


def test_evaluate_matches_numerical_integration():
  vae = _tiny_vae()
  x = np.array([[[[i >> 3 & 1], [i >> 2 & 1]], [[i >> 1 & 1], [i & 1]]] for i in range(16)],
               np.float32)  # every 2x2 binary image
  exact = _integrated_log_likelihood(vae, x)
  results = evaluation.evaluate(vae, x, num_samples=2000, batch_size=8)
  assert abs(results["log_likelihood"] - exact.mean()) < 0.02, (results, exact.mean())


def test_complexity_bits_is_the_png_length_of_the_quantized_image():
  rng = np.random.default_rng(0)
  images = np.stack([np.zeros((28, 28, 1)), np.ones((28, 28, 1)),
                     rng.random((28, 28, 1)) < 0.5, rng.random((28, 28, 1))]).astype(np.float32)
  bits = evaluation.complexity_bits(images).numpy()
  quantized = np.round(images * 255).astype(np.uint8)
  expected = [8 * len(tf.io.encode_png(image).numpy()) for image in quantized]
  np.testing.assert_array_equal(bits, expected)
  assert max(bits[:2]) < bits[2] < bits[3]  # constant, then 1 bit of noise per pixel, then 8
  np.testing.assert_array_equal(evaluation.complexity_bits(quantized), bits)  # uint8 as it is
  # More channels than PNG holds are encoded side by side.
  assert evaluation.complexity_bits(np.zeros((2, 4, 4, 6), np.float32)).shape == (2,)
  log_likelihood = tf.constant([-100.0, -10.0, -50.0, -500.0])
  np.testing.assert_allclose(evaluation.anomaly_score(log_likelihood, bits),
                             -log_likelihood.numpy() / np.log(2) - bits, rtol=1e-6)


def test_evaluate_saved_model_keeps_each_request_within_the_export_limits(tmp_path,
                                                                          monkeypatch):
  from tfvae import export

  vae = _tiny_vae()
  monkeypatch.setattr(export, "MAX_LOG_LIKELIHOOD_PIXELS", 4 * 100)  # batch * K <= 100
  path = export.export(vae, tmp_path, "tiny")
  x = (np.random.default_rng(0).random((8, 2, 2, 1)) < 0.5).astype(np.float32)
  with pytest.raises(tf.errors.InvalidArgumentError, match="ask in batches of at most 3 images"):
    tf.saved_model.load(str(path)).signatures["log_likelihood"](
        x=tf.constant(x), num_samples=tf.constant(30), seed=tf.constant(0, tf.int64))
  results = evaluation.evaluate_saved_model(path, x, num_samples=30, batch_size=8)
  assert results["num_examples"] == 8 and results["log_likelihood"] > results["elbo"]
  with pytest.raises(ValueError, match="pass at most 100"):
    evaluation.evaluate_saved_model(path, x, num_samples=101)


def test_bits_per_dim_has_one_definition_per_kind_of_likelihood(small_config, binary_batch):
  bernoulli = evaluation.evaluate(tfvae.VAE(small_config), binary_batch, num_samples=0)
  assert bernoulli["bits_per_dim_of"] == "elbo (above the log-likelihood's figure), discrete"
  np.testing.assert_allclose(bernoulli["bits_per_dim"],
                             -bernoulli["elbo"] / (784 * np.log(2)), rtol=1e-6)
  grey = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  gaussian = dataclasses.replace(small_config, likelihood="gaussian")
  results = evaluation.evaluate(tfvae.VAE(gaussian), grey, num_samples=10)
  assert results["bits_per_dim_of"] == "log_likelihood (importance sampled, K=10), dequantized"
  # -(log p(x) - D log 256) / (D log 2): 8 bits above the [0, 1] density's figure.
  np.testing.assert_allclose(results["bits_per_dim"],
                             8 - results["log_likelihood"] / (784 * np.log(2)), rtol=1e-6)
  assert 0 < results["bits_per_dim"] < 16
  vectors = tfvae.ModelConfig(image_shape=(3,), latent_size=2, hidden_sizes=(4,),
                              likelihood="gaussian", standardize=True)
  rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  assert evaluation.evaluate(tfvae.VAE(vectors), rows, num_samples=0)["bits_per_dim"] is None


def test_bits_per_dim_formula():
  log_p = tf.constant(-784 * np.log(2.0) * 3, tf.float64)
  np.testing.assert_allclose(objectives.bits_per_dim(log_p, 784), 3.0)
  np.testing.assert_allclose(objectives.bits_per_dim(log_p, 784, dequantized=True), 11.0)


def test_bits_per_dim_kind_is_discrete_for_levels_and_dequantized_for_densities():
  kind = lambda **kwargs: evaluation.bits_per_dim_kind(tfvae.ModelConfig(**kwargs))  # noqa: E731
  assert kind(likelihood="bernoulli") == "discrete"
  assert kind(likelihood="discretized_logistic", image_shape=(4, 4, 3)) == "discrete"
  assert kind(likelihood="gaussian") == "dequantized"
  assert kind(likelihood="gaussian_fixed", observation_scale=0.1) == "dequantized"
  assert kind(likelihood="gaussian", image_shape=(6,), standardize=True) is None


def test_decodings_at_once_bound_memory_and_keep_the_mlp_at_100_by_100():
  assert evaluation.decodings_at_once(tfvae.VAE(tfvae.ModelConfig())) >= 100 * 100
  conv = tfvae.VAE(tfvae.ModelConfig(image_shape=(32, 32, 3), architecture="conv",
                                     likelihood="discretized_logistic"))
  floats = tfvae.networks.activation_floats(conv.decoder.network)
  assert floats > 32 * 32 * 32 * 6  # six outputs of 32 channels at full size in the last stage
  at_once = evaluation.decodings_at_once(conv)
  assert 1 <= at_once < 100 and at_once * 4 * floats <= evaluation.DECODE_BYTES


def test_evaluate_decodes_fewer_samples_at_once_where_they_would_not_fit(monkeypatch):
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=2, hidden_sizes=(8,)))
  x = np.random.default_rng(0).random((10, 28, 28, 1)).astype(np.float32)
  chunks = []
  build = evaluation._batch_terms_function
  monkeypatch.setattr(evaluation, "_batch_terms_function",
                      lambda vae, k, chunk: chunks.append(chunk) or build(vae, k, chunk))
  plain = evaluation.evaluate(vae, x, num_samples=20, batch_size=10)
  per_decoding = max(tfvae.networks.activation_floats(vae.decoder.network), 2 * 784)
  monkeypatch.setattr(evaluation, "DECODE_BYTES", 4 * per_decoding * 30)  # 30 at once
  small = evaluation.evaluate(vae, x, num_samples=20, batch_size=10)
  assert chunks == [100, 3]
  # Other chunks draw other noise: the same estimate within its Monte Carlo error.
  assert abs(small["log_likelihood"] - plain["log_likelihood"]) < 5
