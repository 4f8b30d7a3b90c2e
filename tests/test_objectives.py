"""The objective's terms against closed forms, and the reparameterization trick's gradients."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfvae import VAE, ModelConfig, distributions, objectives


def test_kl_matches_the_closed_form():
  rng = np.random.default_rng(0)
  mu = rng.normal(size=(5, 7)).astype(np.float32)
  raw = rng.normal(size=(5, 7)).astype(np.float32)
  posterior = distributions.make_posterior(tf.constant(mu), tf.constant(raw))
  sigma = posterior.stddev().numpy().astype(np.float64)
  expected = 0.5 * np.sum(mu**2 + sigma**2 - np.log(sigma**2) - 1, axis=-1)
  actual = objectives.analytic_kl(posterior, distributions.make_prior(7)).numpy()
  np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_kl_is_zero_at_the_prior():
  posterior = distributions.make_posterior(tf.zeros([2, 3]), tf.fill([2, 3], -30.0))
  # raw -30 gives sigma = MIN_SCALE + tiny, so instead build the exact prior:
  prior = distributions.make_prior(3)
  np.testing.assert_allclose(objectives.analytic_kl(prior, prior).numpy(), 0.0, atol=1e-7)
  assert np.all(objectives.analytic_kl(posterior, prior).numpy() > 0)


def test_log_mean_exp_is_stable():
  values = tf.constant([[1000.0, 1000.0], [1000.0, -1000.0]])
  np.testing.assert_allclose(objectives.log_mean_exp(values, axis=0).numpy(),
                             [1000.0, 1000.0 - np.log(2.0)], rtol=1e-6)


def test_bits_per_dim():
  np.testing.assert_allclose(objectives.bits_per_dim(tf.constant(-784 * np.log(2.0)), 784), 1.0)


def _terms(vae, x, objective, num_samples, seed=(1, 2)):
  return objectives.per_example_loss(objective, x, vae.encoder(x), vae.prior, vae.decoder,
                                     num_samples, tf.constant(seed, tf.int32))


def test_elbo_is_kl_plus_nll_and_beta_zero_drops_the_kl(small_config, binary_batch):
  vae = VAE(small_config)
  terms = _terms(vae, binary_batch, "elbo", 3)
  np.testing.assert_allclose(terms["loss"], -terms["elbo"], rtol=1e-6)
  np.testing.assert_allclose(terms["elbo"], -(terms["kl"] + terms["nll"]), rtol=1e-6)
  auto_encoder = objectives.per_example_loss(
      "elbo", binary_batch, vae.encoder(binary_batch), vae.prior, vae.decoder, 3,
      tf.constant([1, 2]), beta=0.0)
  np.testing.assert_allclose(auto_encoder["loss"], terms["nll"], rtol=1e-6)


def test_the_monte_carlo_term_is_the_mean_over_samples(small_config, binary_batch):
  vae = VAE(small_config)
  seed = tf.constant([4, 5], tf.int32)
  posterior = vae.encoder(binary_batch)
  z = posterior.sample(6, seed=seed).numpy()  # the same draws elbo_terms makes
  expected = -np.mean([vae.decoder(z[i]).log_prob(binary_batch).numpy() for i in range(6)], 0)
  terms = objectives.elbo_terms(binary_batch, posterior, vae.prior, vae.decoder, 6, seed)
  np.testing.assert_allclose(terms["nll"].numpy(), expected, rtol=1e-5)


def test_iwae_bound_lies_between_the_elbo_and_zero_and_equals_it_at_k_1(small_config,
                                                                         binary_batch):
  vae = VAE(small_config)
  iwae = _terms(vae, binary_batch, "iwae", 50)
  assert np.all(iwae["iwae"].numpy() >= iwae["elbo"].numpy() - 1e-3)
  one = objectives.iwae_terms(binary_batch, vae.encoder(binary_batch), vae.prior, vae.decoder,
                              1, tf.constant([7, 7]))
  log_w, _ = objectives.log_importance_weights(binary_batch, vae.encoder(binary_batch),
                                               vae.prior, vae.decoder, 1, tf.constant([7, 7]))
  np.testing.assert_allclose(one["iwae"].numpy(), log_w.numpy()[0], rtol=1e-6)


def test_reparameterized_gradient_reaches_the_encoder(small_config, binary_batch):
  vae = VAE(small_config)
  with tf.GradientTape() as tape:
    terms = _terms(vae, binary_batch, "elbo", 1)
    # Only the Monte Carlo term: its encoder gradient flows through z = mu + sigma * eps.
    nll = tf.reduce_mean(terms["nll"])
  gradients = tape.gradient(nll, vae.encoder.trainable_variables)
  assert gradients and all(g is not None for g in gradients)
  assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in gradients)


def test_iwae_gradient_reaches_both_networks():
  vae = VAE(ModelConfig(latent_size=3, hidden_sizes=(16,), objective="iwae", num_samples=5))
  x = (np.random.default_rng(0).random((4, 28, 28, 1)) < 0.5).astype(np.float32)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(vae.per_example_terms(x, tf.constant([1, 1]))["loss"])
  gradients = tape.gradient(loss, vae.trainable_variables)
  assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in gradients)


def test_content_noise_is_standard_normal_the_same_for_an_image_and_independent_across():
  rng = np.random.default_rng(1)
  images = (rng.random((3, 6, 6, 1)) < 0.5).astype(np.float32)
  images[2] = images[0]  # the same image twice
  loc = rng.normal(size=(3, 5)).astype(np.float32)
  posterior = distributions.make_posterior(tf.constant(loc),
                                           tf.constant(rng.normal(size=(3, 5)), tf.float32))
  z = objectives.content_noise_sample(images, posterior, 20000, tf.constant([3, 4])).numpy()
  assert z.shape == (20000, 3, 5)
  noise = (z - loc) / posterior.stddev().numpy()  # [K, B, J]
  np.testing.assert_allclose(noise[:, 2], noise[:, 0], atol=1e-4)  # same image, same draws
  flat = noise[:, :2].reshape(20000, -1)  # two different images, 5 latents each
  assert np.all(np.abs(flat.mean(0)) < 0.03) and np.all(np.abs(flat.std(0) - 1) < 0.03)
  correlations = np.corrcoef(flat, rowvar=False)[np.triu_indices(10, 1)]
  assert np.all(np.abs(correlations) < 0.03)  # across latents, samples and images
  assert abs(stats.kurtosis(flat[:, 0])) < 0.1 and abs(stats.skew(flat[:, 0])) < 0.05
  other_seed = objectives.content_noise_sample(images, posterior, 100, tf.constant([3, 5]))
  assert not np.allclose(other_seed.numpy(), z[:100])


def test_with_content_noise_an_example_scores_the_same_alone_and_in_any_batch(small_config,
                                                                               binary_batch):
  vae = VAE(small_config)
  seed = tf.constant([1, 2], tf.int32)
  image = binary_batch[:1]
  batch = np.concatenate([binary_batch[1:4], image, image, binary_batch[4:]])  # at 3 and 4

  def elbo(x, content_noise):
    return objectives.elbo_terms(x, vae.encoder(x), vae.prior, vae.decoder, 2, seed,
                                 content_noise=content_noise)["elbo"].numpy()

  alone = elbo(image, True)
  np.testing.assert_allclose(elbo(batch, True)[3:5], [alone[0]] * 2, rtol=1e-6)
  # Independent noise (training's) scores the same image differently at each position.
  assert abs(elbo(batch, False)[3] - elbo(batch, False)[4]) > 1e-3
  log_w, _ = objectives.log_importance_weights(batch, vae.encoder(batch), vae.prior,
                                               vae.decoder, 7, seed, content_noise=True)
  log_w_alone, _ = objectives.log_importance_weights(image, vae.encoder(image), vae.prior,
                                                     vae.decoder, 7, seed, content_noise=True)
  np.testing.assert_allclose(log_w.numpy()[:, 3:5], np.repeat(log_w_alone.numpy(), 2, 1),
                             rtol=1e-5)


def _gradients(estimator: str, seeds: int, train_steps: int = 300):
  """Per-seed gradients of the K=10 IWAE loss of a tiny VAE on 4 binary vectors, after
  train_steps of training (the same for both estimators): encoder and decoder, each
  [seeds, parameters]."""
  config = ModelConfig(image_shape=(6,), latent_size=2, hidden_sizes=(5,),
                       activation="tanh", objective="iwae", num_samples=10,
                       gradient_estimator=estimator)
  keras.utils.set_random_seed(0)  # the same weights for both estimators
  vae = VAE(config, seed=0)
  x = tf.constant(np.random.default_rng(0).random((4, 6)) < 0.4, tf.float32)
  encoder, decoder = vae.encoder.trainable_variables, vae.decoder.trainable_variables
  if train_steps:  # near a trained posterior, where DReG's advantage is meant to show
    plain = VAE(dataclasses.replace(config, gradient_estimator="standard"), seed=0)
    plain.set_weights(vae.get_weights())
    plain.compile(optimizer=keras.optimizers.Adam(1e-2))
    plain.fit(tf.data.Dataset.from_tensors(x).repeat(train_steps), epochs=1, verbose=0,
              shuffle=False)
    vae.set_weights(plain.get_weights())

  @tf.function
  def gradient(seed):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(vae.per_example_terms(x, seed, training=True)["loss"])
    grads = tape.gradient(loss, encoder + decoder)
    flat = [tf.reshape(g, [-1]) for g in grads]
    return tf.concat(flat[:len(encoder)], 0), tf.concat(flat[len(encoder):], 0), loss

  rows = [gradient(tf.constant([s, 17])) for s in range(seeds)]
  return (np.stack([r[0].numpy() for r in rows]), np.stack([r[1].numpy() for r in rows]),
          np.array([float(r[2]) for r in rows]))


def test_dreg_has_the_iwae_gradient_in_expectation_and_less_encoder_variance():
  seeds = 400
  standard_encoder, standard_decoder, standard_loss = _gradients("standard", seeds)
  dreg_encoder, dreg_decoder, dreg_loss = _gradients("dreg", seeds)
  # The same noise for both: the loss values are the same bound, draw by draw.
  np.testing.assert_allclose(dreg_loss, standard_loss, rtol=1e-5)
  for standard, dreg in ((standard_encoder, dreg_encoder), (standard_decoder, dreg_decoder)):
    difference = dreg.mean(axis=0) - standard.mean(axis=0)
    error = np.sqrt((dreg.var(axis=0, ddof=1) + standard.var(axis=0, ddof=1)) / seeds)
    z = difference / np.maximum(error, 1e-12)
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))  # dozens of coordinates, none off
  np.testing.assert_allclose(dreg_decoder, standard_decoder, rtol=1e-4, atol=1e-6)
  # 0.04 here after 300 steps; at initialization, with q far from the posterior, the score
  # term the standard gradient keeps acts as a control variate and DReG's variance is higher.
  encoder_ratio = dreg_encoder.var(axis=0).sum() / standard_encoder.var(axis=0).sum()
  assert encoder_ratio < 0.25, encoder_ratio


def test_dreg_needs_the_iwae_objective():
  from tfvae.config import ConfigError
  with pytest.raises(ConfigError, match="dreg is for the IWAE bound"):
    ModelConfig(gradient_estimator="dreg")
