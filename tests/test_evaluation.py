"""Importance-sampled log-likelihood against numerical integration and the ELBO."""

import numpy as np
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
