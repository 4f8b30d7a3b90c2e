"""Likelihoods and posteriors against scipy/numpy closed forms."""

import numpy as np
import tensorflow as tf
from scipy import special, stats

from tfvae import distributions


def test_bernoulli_log_likelihood_matches_the_formula_with_both_logs():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 5, 1)).astype(np.float32) * 3
  x = (rng.random((3, 4, 5, 1)) < 0.5).astype(np.float32)
  rho = special.expit(logits.astype(np.float64))
  # sum_k x_k log rho_k + (1 - x_k) log(1 - rho_k)
  expected = np.sum(x * np.log(rho) + (1 - x) * np.log(1 - rho), axis=(1, 2, 3))
  scipy_expected = stats.bernoulli(rho).logpmf(x).sum(axis=(1, 2, 3))
  actual = distributions.make_likelihood("bernoulli", tf.constant(logits)).log_prob(x).numpy()
  np.testing.assert_allclose(actual, expected, rtol=1e-5)
  np.testing.assert_allclose(actual, scipy_expected, rtol=1e-5)


def test_bernoulli_from_logits_stays_finite_where_probabilities_would_underflow():
  logits = tf.constant([[[[-200.0], [200.0]]]])  # rho = 0 and 1 in float32
  x = tf.constant([[[[1.0], [0.0]]]])
  log_p = distributions.make_likelihood("bernoulli", logits).log_prob(x).numpy()
  np.testing.assert_allclose(log_p, [-400.0], rtol=1e-6)


def test_bernoulli_log_prob_is_within_float32_rounding_of_float64_everywhere():
  # log p(1) = -softplus(-l), log p(0) = -softplus(l); exact values from numpy in float64.
  logits = np.concatenate([np.linspace(-120, 120, 48001), [-3e38, -1e30, 1e30, 3e38]])
  logits = logits.astype(np.float32)
  exact = logits.astype(np.float64)
  for x, expected in ((1.0, -np.logaddexp(0, -exact)), (0.0, -np.logaddexp(0, exact))):
    actual = distributions.bernoulli_log_prob(tf.fill(logits.shape, x), tf.constant(logits))
    assert np.all(np.isfinite(actual))
    # Within half an ulp of a logit near 16, where x * l and softplus(l) cancel.
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-7, atol=1e-6)


def test_bernoulli_gradients_are_the_closed_forms_and_broadcast_over_samples():
  rng = np.random.default_rng(4)
  logits = tf.constant(rng.normal(size=(3, 2, 4, 5, 1)).astype(np.float32) * 3)  # [L, B, ...]
  x = tf.constant((rng.random((2, 4, 5, 1)) < 0.4).astype(np.float32))  # [B, ...]
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([logits, x])
    log_p = distributions.make_likelihood("bernoulli", logits).log_prob(x)  # [L, B]
    total = tf.reduce_sum(log_p * tf.constant([[1.0, 2.0]]))  # weight the examples unequally
  weights = np.array([1.0, 2.0]).reshape(1, 2, 1, 1, 1)
  # d/dlogits [x log rho + (1 - x) log(1 - rho)] = x - rho; d/dx = log rho - log(1 - rho).
  expected_dlogits = weights * (x.numpy() - special.expit(logits.numpy().astype(np.float64)))
  expected_dx = np.sum(weights * logits.numpy(), axis=0)  # summed over the L samples
  np.testing.assert_allclose(tape.gradient(total, logits), expected_dlogits, atol=1e-6)
  np.testing.assert_allclose(tape.gradient(total, x), expected_dx, rtol=1e-5, atol=1e-5)


def test_bernoulli_of_grey_levels_is_the_cross_entropy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 3, 1)).astype(np.float32) * 2
  x = rng.random((2, 3, 3, 1)).astype(np.float32)
  rho = special.expit(logits.astype(np.float64))
  expected = np.sum(x * np.log(rho) + (1 - x) * np.log1p(-rho), axis=(1, 2, 3))
  actual = distributions.make_likelihood("bernoulli", tf.constant(logits)).log_prob(x).numpy()
  np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_bernoulli_built_from_probabilities_keeps_tfp_log_prob():
  probs = np.array([0.2, 0.9], np.float32)
  dist = distributions.BernoulliLogits(probs=probs, dtype=tf.float32)
  np.testing.assert_allclose(dist.log_prob([1.0, 0.0]).numpy(), np.log([0.2, 0.1]), rtol=1e-5)


def test_gaussian_log_likelihood_matches_scipy():
  rng = np.random.default_rng(2)
  raw = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)  # C = 1, two params per pixel
  x = rng.random((2, 3, 3, 1)).astype(np.float32)
  loc = special.expit(raw[..., :1].astype(np.float64))
  scale = np.logaddexp(0, raw[..., 1:] + np.log(np.expm1(1.0))) + distributions.MIN_SCALE
  expected = stats.norm(loc, scale).logpdf(x).sum(axis=(1, 2, 3))
  actual = distributions.make_likelihood("gaussian", tf.constant(raw)).log_prob(x).numpy()
  np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_fixed_gaussian_is_a_scaled_squared_error():
  rng = np.random.default_rng(3)
  raw = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
  x = rng.random((2, 4, 4, 1)).astype(np.float32)
  s = 0.1
  mu = special.expit(raw.astype(np.float64))
  squared_error = np.sum((x - mu) ** 2, axis=(1, 2, 3))
  expected = -squared_error / (2 * s**2) - 16 * np.log(s * np.sqrt(2 * np.pi))
  actual = distributions.make_likelihood("gaussian_fixed", tf.constant(raw), s).log_prob(x)
  np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5)


def test_scales_are_one_at_zero_and_bounded_below():
  raw = tf.constant([0.0, -1e4, 50.0])
  scale = distributions.positive_scale(raw).numpy()
  np.testing.assert_allclose(scale[0], 1.0 + distributions.MIN_SCALE, rtol=1e-6)
  assert scale[1] >= distributions.MIN_SCALE
  assert np.all(np.isfinite(scale))


def test_posterior_is_diagonal_normal_with_event_shape_latent():
  loc = tf.constant([[0.5, -1.0, 2.0]])
  posterior = distributions.make_posterior(loc, tf.zeros_like(loc))
  assert posterior.event_shape == [3] and posterior.batch_shape == [1]
  z = np.array([[0.1, 0.2, 0.3]], np.float32)
  expected = stats.norm(loc.numpy(), 1.0 + distributions.MIN_SCALE).logpdf(z).sum()
  np.testing.assert_allclose(posterior.log_prob(z).numpy(), [expected], rtol=1e-5)
