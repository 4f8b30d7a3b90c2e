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
  scale = np.logaddexp(0, raw[..., 1:] + np.log(np.expm1(1.0))) + distributions.PIXEL_MIN_SCALE
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


def test_a_pixel_gaussian_density_never_exceeds_256_so_bits_per_dim_stay_positive():
  from tfvae import objectives
  x = np.full((1, 4, 4, 3), 0.25, np.float32)
  # The sharpest Gaussian the decoder can emit, centred on every pixel.
  params = np.concatenate([np.full_like(x, special.logit(0.25)), np.full_like(x, -1e4)], -1)
  log_p = distributions.make_likelihood("gaussian", tf.constant(params)).log_prob(x).numpy()
  assert log_p[0] <= x.size * np.log(256.0) + 1e-3 * x.size
  np.testing.assert_allclose(log_p[0], x.size * np.log(256.0), rtol=1e-5)  # the floor binds
  assert objectives.bits_per_dim(tf.constant(log_p, tf.float64), x.size,
                                 dequantized=True).numpy()[0] >= -1e-6


def test_posterior_is_diagonal_normal_with_event_shape_latent():
  loc = tf.constant([[0.5, -1.0, 2.0]])
  posterior = distributions.make_posterior(loc, tf.zeros_like(loc))
  assert posterior.event_shape == [3] and posterior.batch_shape == [1]
  z = np.array([[0.1, 0.2, 0.3]], np.float32)
  expected = stats.norm(loc.numpy(), 1.0 + distributions.MIN_SCALE).logpdf(z).sum()
  np.testing.assert_allclose(posterior.log_prob(z).numpy(), [expected], rtol=1e-5)


# ---- the discretized logistic -------------------------------------------------------------------

def _discretized_logistic_reference(levels, loc, scale, logits):
  """P(k) in float64 from the CDF: F(k/255 + 1/510) - F(k/255 - 1/510), open edge bins."""
  cdf = lambda t: special.expit((t - loc) / scale)  # noqa: E731
  upper = np.where(levels == 255, 1.0, cdf(levels / 255 + 0.5 / 255))
  lower = np.where(levels == 0, 0.0, cdf(levels / 255 - 0.5 / 255))
  weights = special.softmax(logits, axis=-1)
  with np.errstate(divide="ignore"):  # float64 underflows far from the mass
    return np.log(np.sum(weights * (upper - lower), axis=-1))


def test_discretized_logistic_matches_a_numpy_reference_and_sums_to_one():
  rng = np.random.default_rng(7)
  loc = rng.normal(0.5, 0.6, (5, 3))  # [batch, M]
  scale = np.exp(rng.normal(-3.5, 1.0, (5, 3)))
  logits = rng.normal(size=(5, 3))
  levels = np.arange(256.0)[:, None, None]  # [256, 1, 1]
  dist = distributions.DiscretizedLogistic(loc.astype(np.float32), scale.astype(np.float32),
                                           logits.astype(np.float32))
  actual = dist.log_prob((levels[..., 0] / 255).astype(np.float32)).numpy()  # [256, 5]
  expected = _discretized_logistic_reference(levels, loc, scale, logits)
  resolved = expected > -25  # where float64's CDF difference keeps digits
  assert resolved.mean() > 0.5
  np.testing.assert_allclose(actual[resolved], expected[resolved], rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(actual)) and np.all(actual[~resolved] < -20)
  np.testing.assert_allclose(np.exp(actual).sum(axis=0), 1.0, rtol=1e-5)
  expected_mean = np.sum(np.exp(expected) * levels[..., 0] / 255, axis=0)
  np.testing.assert_allclose(dist.mean().numpy(), expected_mean, rtol=1e-5, atol=1e-6)
  draws = dist.sample(20_000, seed=(3, 4)).numpy()  # [20000, 5]
  assert np.all(np.round(draws * 255) == draws * 255)
  standard_error = draws.std(axis=0) / np.sqrt(len(draws))
  np.testing.assert_array_less(np.abs(draws.mean(axis=0) - expected_mean), 4.5 * standard_error)


def test_discretized_logistic_samples_in_a_graph_and_takes_equal_weights_without_logits():
  loc = np.array([[0.1, 0.9]], np.float32)  # two far-apart components
  scale = np.full_like(loc, 0.01)
  plain = distributions.DiscretizedLogistic(loc, scale)
  weighted = distributions.DiscretizedLogistic(loc, scale, np.zeros_like(loc))
  levels = (np.arange(256)[:, None] / 255).astype(np.float32)
  np.testing.assert_allclose(plain.log_prob(levels).numpy(), weighted.log_prob(levels).numpy(),
                             rtol=1e-6)
  np.testing.assert_allclose(np.exp(plain.log_prob(levels).numpy()).sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(plain.mean().numpy(), [0.5], atol=1e-3)
  draws = tf.function(lambda: plain.sample(4000, seed=(1, 2)))().numpy()  # [4000, 1]
  assert abs((draws > 0.5).mean() - 0.5) < 0.05  # both components drawn, half each


def test_discretized_logistic_stays_finite_far_from_its_mass():
  # A sharp logistic far from the value: the CDF difference is 0 in float32, its log is not.
  loc, scale = np.float32([[3.0]]), np.float32([[1e-3]])
  dist = distributions.DiscretizedLogistic(loc, scale)
  x = tf.constant([0.0, 0.2, 1.0])[:, None]
  with tf.GradientTape() as tape:
    tape.watch(x)
    loc_t = tf.constant(loc)
    tape.watch(loc_t)
    log_p = distributions.DiscretizedLogistic(loc_t, scale).log_prob(x[:, 0:1])
  upper = (0.2 + 0.5 / 255 - 3.0) / 1e-3  # log P(k) ~ a + log(1 - exp(-1/(255 s))) far below
  np.testing.assert_allclose(log_p.numpy()[1, 0],
                             upper + np.log(-np.expm1(-1 / (255 * 1e-3))), rtol=1e-5)
  assert np.all(np.isfinite(log_p)) and np.all(np.isfinite(tape.gradient(log_p, loc_t)))
  np.testing.assert_allclose(dist.log_prob(tf.constant([[1.0]])).numpy(), 0.0, atol=1e-6)


def test_discretized_logistic_from_decoder_outputs_is_per_image_and_per_mixture():
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (2, 4, 3, 3)) / 255.0  # [B, H, W, C]
  for components in (1, 4):
    parts = 2 if components == 1 else 3
    params = rng.normal(size=(2, 4, 3, 3 * parts * components)).astype(np.float32)
    log_p = distributions.make_likelihood("discretized_logistic", tf.constant(params),
                                          mixture_components=components).log_prob(
                                              images.astype(np.float32)).numpy()  # [B]
    split = np.split(params.astype(np.float64), parts, axis=-1)  # each [B, H, W, C * M]
    loc, raw_scale = (p.reshape(2, 4, 3, 3, components) for p in split[:2])
    scale = np.logaddexp(0, raw_scale + np.log(np.expm1(1.0))) + distributions.MIN_SCALE
    logits = (split[2].reshape(loc.shape) if parts == 3 else np.zeros_like(loc))
    expected = _discretized_logistic_reference(np.round(images * 255)[..., None], loc + 0.5,
                                               scale, logits).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(log_p, expected, rtol=1e-5)


def _coupled_reference(levels, loc, scale, coefficients, logits):
  """log P(x) in float64 of levels [..., C] under PixelCNN++'s coupling: per component m,
  channel c's logistic at loc_cm + sum_{j<c} coefficient_cjm level_j / 255."""
  channels = loc.shape[-2]
  log_p, k = 0.0, 0
  for c in range(channels):
    shifted = loc[..., c, :].copy()
    for j in range(c):
      shifted = shifted + coefficients[..., k, :] * levels[..., j, None] / 255
      k += 1
    cdf = lambda t, shifted=shifted, c=c: special.expit((t - shifted) / scale[..., c, :])  # noqa: E731
    level = levels[..., c, None]
    upper = np.where(level == 255, 1.0, cdf(level / 255 + 0.5 / 255))
    lower = np.where(level == 0, 0.0, cdf(level / 255 - 0.5 / 255))
    log_p = log_p + np.log(upper - lower)  # [..., M]
  return special.logsumexp(special.log_softmax(logits, axis=-1) + log_p, axis=-1)


def _coupled_parameters(rng, channels, components, batch=2, spread=0.3):
  loc = rng.normal(0.5, spread, (batch, channels, components))
  scale = np.exp(rng.normal(-3.0, 0.5, (batch, channels, components)))
  coefficients = np.tanh(rng.normal(0, 1, (batch, channels * (channels - 1) // 2, components)))
  logits = rng.normal(size=(batch, components))
  return loc, scale, coefficients, logits


def test_coupled_discretized_logistic_matches_a_numpy_reference_and_sums_to_one():
  rng = np.random.default_rng(11)
  loc, scale, coefficients, logits = _coupled_parameters(rng, 3, 2)
  dist = distributions.CoupledDiscretizedLogistic(
      *(p.astype(np.float32) for p in (loc, scale, coefficients, logits)))
  assert dist.batch_shape == [2] and dist.event_shape == [3]
  levels = np.round(dist.sample(500, seed=(1, 2)).numpy() * 255).astype(np.float64)
  levels[:20, :, 0] = 0
  levels[20:40, :, 2] = 255  # the open edge bins
  actual = dist.log_prob((levels / 255).astype(np.float32)).numpy()
  with np.errstate(divide="ignore"):  # float64 underflows far from the mass
    expected = _coupled_reference(levels, loc, scale, coefficients, logits)
  resolved = expected > -25
  assert resolved.mean() > 0.9 and np.all(np.isfinite(actual))
  np.testing.assert_allclose(actual[resolved], expected[resolved], rtol=1e-4, atol=1e-4)
  # All 256^3 values of each pixel, a red level at a time.
  grid = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 2)
  mass = tf.function(lambda red: tf.reduce_sum(tf.exp(dist.log_prob(tf.concat(
      [tf.fill([len(grid), 2, 1], red), tf.constant(grid[:, None, :] / 255, tf.float32)
       * tf.ones([1, 2, 1])], axis=-1))), axis=0))
  total = sum(mass(tf.constant(red / 255, tf.float32)).numpy() for red in range(256))
  np.testing.assert_allclose(total, 1.0, rtol=1e-4)


def test_coupled_discretized_logistic_mean_and_samples_match_its_probabilities():
  # Two channels, so every value's probability can be listed: E[x], E[x_0 x_1] exactly.
  rng = np.random.default_rng(12)
  loc, scale, coefficients, logits = _coupled_parameters(rng, 2, 3, spread=0.1)
  # Channel 1's shifted locations kept near channel 0's: clear of 0 and 1, where the mean is exact.
  loc[:, 1] -= coefficients[:, 0] * loc[:, 0] + 0.5 * (loc[:, 0] - loc[:, 1])
  scale = np.maximum(scale, 0.02)
  dist = distributions.CoupledDiscretizedLogistic(
      *(p.astype(np.float32) for p in (loc, scale, coefficients, logits)))
  grid = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 1, 2)
  p = np.exp(_coupled_reference(grid.astype(np.float64), loc, scale, coefficients, logits))
  values = grid / 255  # [65536, 1, 2]
  np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-6)
  mean = (p[..., None] * values).sum(axis=0)  # [2, 2]
  np.testing.assert_allclose(dist.mean().numpy(), mean, atol=2e-4)
  cross = (p * values[..., 0] * values[..., 1]).sum(axis=0)  # [2]
  draws = tf.function(lambda: dist.sample(40_000, seed=(5, 6)))().numpy()  # [40000, 2, 2]
  np.testing.assert_allclose(draws * 255, np.round(draws * 255), atol=1e-4)  # levels
  for statistic, expected in ((draws, mean), (draws[..., 0] * draws[..., 1], cross)):
    standard_error = statistic.std(axis=0) / np.sqrt(len(draws))
    np.testing.assert_array_less(np.abs(statistic.mean(axis=0) - expected),
                                 4.5 * standard_error + 1e-6)


def test_coupled_discretized_logistic_from_decoder_outputs_reads_its_blocks():
  rng = np.random.default_rng(13)
  images = rng.integers(0, 256, (2, 4, 3, 3)).astype(np.float64)  # [B, H, W, C]
  for components in (1, 4):
    width = distributions.output_channels("discretized_logistic", 3, components, True)
    assert width == (9 if components == 1 else 10 * components)
    params = rng.normal(size=(2, 4, 3, width)).astype(np.float32)
    likelihood = distributions.make_likelihood("discretized_logistic", tf.constant(params),
                                               mixture_components=components,
                                               coupled_channels=True)
    assert likelihood.batch_shape == [2] and likelihood.event_shape == [4, 3, 3]
    log_p = likelihood.log_prob((images / 255).astype(np.float32)).numpy()
    m, raw = components, params.astype(np.float64)
    blocks = np.split(raw, np.cumsum([3 * m, 3 * m, 3 * m]), axis=-1)
    loc, raw_scale, raw_coefficients = (b.reshape(2, 4, 3, 3, m) for b in blocks[:3])
    scale = np.logaddexp(0, raw_scale + np.log(np.expm1(1.0))) + distributions.MIN_SCALE
    logits = blocks[3] if m > 1 else np.zeros((2, 4, 3, 1))
    expected = _coupled_reference(images, loc + 0.5, scale, np.tanh(raw_coefficients), logits)
    np.testing.assert_allclose(log_p, expected.sum(axis=(1, 2)), rtol=1e-5)
