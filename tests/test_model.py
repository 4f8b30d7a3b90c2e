"""The VAE as a Keras model: fit from user code, metrics, predict, sampling, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import data
from tfvae.model import METRIC_NAMES, Decoder, Encoder


def test_encoder_and_decoder_return_distributions(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  posterior = vae.encoder(binary_batch)
  assert posterior.batch_shape == [8] and posterior.event_shape == [4]
  likelihood = vae.decoder(tf.zeros([3, 8, 4]))  # leading sample dimension kept
  assert likelihood.batch_shape == [3, 8] and likelihood.event_shape == [28, 28, 1]
  assert likelihood.log_prob(binary_batch).shape == [3, 8]


_LIKELIHOOD_CASES = [  # (likelihood, observation_scale, mixture_components, coupled_channels)
    ("bernoulli", None, 1, False), ("gaussian", None, 1, False), ("gaussian_fixed", 0.2, 1, False),
    ("discretized_logistic", None, 1, False), ("discretized_logistic", None, 3, False),
    ("discretized_logistic", None, 1, True), ("discretized_logistic", None, 3, True)]


@pytest.mark.parametrize("likelihood, scale, mixture, coupled, channels", [
    (*case, channels) for case in _LIKELIHOOD_CASES for channels in (1, 3, 4)
    if channels > 1 or not case[3]])  # one channel has nothing to couple (test_config)
@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_every_likelihood_and_architecture_builds(likelihood, scale, mixture, coupled,
                                                  channels, architecture):
  config = tfvae.ModelConfig(image_shape=(27, 21, channels), latent_size=2, hidden_sizes=(8,),
                             conv_channels=(4, 8, 8), architecture=architecture,
                             likelihood=likelihood, observation_scale=scale,
                             mixture_components=mixture, coupled_channels=coupled)
  vae = tfvae.VAE(config)
  x = np.random.default_rng(0).integers(0, 256, (3, 27, 21, channels)).astype(np.uint8)
  terms = vae.per_example_terms(x, tf.constant([0, 1]))
  assert all(terms[k].shape == [3] and np.all(np.isfinite(terms[k])) for k in terms)
  reconstruction = vae.reconstruct(x).numpy()
  assert reconstruction.shape == (3, 27, 21, channels)
  assert np.all((reconstruction >= 0) & (reconstruction <= 1))


@pytest.mark.parametrize("image_shape, conv_channels", [((27, 21, 3), (4, 8, 8)),
                                                        ((8, 8, 1), (4,))])
def test_a_spatial_latent_is_a_map_on_the_coarsest_grid(image_shape, conv_channels):
  # 27x21 in three stages: a 7x6 grid, so latent_size 84 is a two-channel map.
  cells = 42 if len(conv_channels) == 3 else 64
  config = tfvae.ModelConfig(image_shape=image_shape, latent_size=2 * cells,
                             architecture="conv", conv_channels=conv_channels,
                             spatial_latent=True, likelihood="discretized_logistic")
  vae = tfvae.VAE(config)
  assert config.coarsest_grid == ((7, 6) if cells == 42 else (8, 8))
  assert vae.encoder.network.get_layer("posterior_loc").output.shape[1:] == (
      *config.coarsest_grid, 2)
  assert vae.decoder.network.get_layer("decoder_grid").output.shape[1:] == (
      *config.coarsest_grid, 2)
  assert not any(isinstance(layer, keras.layers.Dense)
                 for network in (vae.encoder.network, vae.decoder.network)
                 for layer in network.layers)
  x = np.random.default_rng(0).integers(0, 256, (3, *image_shape)).astype(np.uint8)
  posterior = vae.encoder(x)
  assert posterior.event_shape == [2 * cells]
  # The means are the loc head's map, position-major.
  head = keras.Model(vae.encoder.network.input,
                     vae.encoder.network.get_layer("posterior_loc").output)
  np.testing.assert_allclose(posterior.mean().numpy(),
                             head(x.astype(np.float32) / 255).numpy().reshape(3, -1), rtol=1e-5)
  terms = vae.per_example_terms(x, tf.constant([0, 1]))
  assert all(np.all(np.isfinite(terms[k])) for k in terms)
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
  try:  # the posterior's parameters stay float32 from the heads on
    mixed = tfvae.VAE(config).encoder.network
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  assert mixed.get_layer("encoder_stem").compute_dtype == "bfloat16"
  assert all(mixed.get_layer(f"{kind}_{part}").compute_dtype == "float32"
             for kind in ("posterior", "flatten") for part in ("loc", "scale"))


def test_fit_on_real_mnist_lowers_the_loss(mnist_slice):
  x_train, x_test = mnist_slice
  keras.utils.set_random_seed(0)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=8, hidden_sizes=(128,)))
  vae.compile(optimizer=keras.optimizers.Adam(2e-3))
  train = data.train_pipeline(x_train, 50, seed=0, dynamic_binarization=True)
  test = data.eval_arrays(x_test, bernoulli=True, binary=False)
  before = vae.evaluate(test, batch_size=100, verbose=0, return_dict=True)
  history = vae.fit(train, validation_data=data.eval_pipeline(test, 100), epochs=5, verbose=0,
                    steps_per_epoch=data.steps_per_epoch(len(x_train), 50), shuffle=False)
  after = vae.evaluate(test, batch_size=100, verbose=0, return_dict=True)
  assert set(history.history) >= {"loss", "elbo", "kl", "nll", "val_loss", "val_elbo"}
  losses = history.history["loss"]
  assert losses[-1] < losses[0] - 50, losses
  assert after["loss"] < before["loss"] - 100, (before, after)
  # Per-example bookkeeping: -ELBO = KL + NLL, and the KL is positive.
  assert after["kl"] > 0
  np.testing.assert_allclose(-after["elbo"], after["kl"] + after["nll"], rtol=1e-4)


def test_fit_from_user_code_with_numpy_arrays(binary_batch):
  x = np.concatenate([binary_batch] * 4)  # [32, 28, 28, 1]
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=2, hidden_sizes=(16,)))
  vae.compile(optimizer="adam")
  history = vae.fit(x, validation_data=x[:8], epochs=2, batch_size=8, verbose=0)
  assert np.all(np.isfinite(history.history["val_elbo"]))
  results = vae.evaluate(x, batch_size=16, verbose=0, return_dict=True)
  assert set(results) == {"loss", "elbo", "kl", "nll"}
  outputs = vae.predict(x, batch_size=16, verbose=0)
  assert outputs["latent_mean"].shape == (32, 2)
  assert outputs["latent_scale"].min() > 0
  assert outputs["reconstruction"].shape == (32, 28, 28, 1)
  assert vae.encoder(x).mean().shape == (32, 2)


def test_fit_and_evaluate_reject_numpy_pixels_the_model_would_misread(binary_batch):
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=2, hidden_sizes=(16,)))
  vae.compile(optimizer="adam")
  weights = [w.numpy() for w in vae.weights]
  grey_255 = binary_batch * 255  # float 0..255, not scaled
  nan = binary_batch.copy()
  nan[0, 0, 0, 0] = np.nan
  binary_uint8 = binary_batch.astype(np.uint8)  # 0/1 as uint8, read as almost black
  for call, phrase in (
      (lambda: vae.fit(grey_255, epochs=1, verbose=0),
       r"VAE.fit x: values in \[0, 255\]; .*\(divide by 255\?\)"),
      (lambda: vae.fit(binary_batch, validation_data=(grey_255,), verbose=0),
       r"VAE.fit validation_data: values in \[0, 255\]"),
      (lambda: vae.fit(binary_batch, validation_data=grey_255, verbose=0),
       r"VAE.fit validation_data: values in \[0, 255\]"),
      (lambda: vae.fit(nan, verbose=0), r"VAE.fit x: 1 NaN or Inf pixels"),
      (lambda: vae.fit(binary_uint8, verbose=0), r"VAE.fit x: uint8 pixels are only 0 and 1"),
      (lambda: vae.evaluate(grey_255, verbose=0), r"VAE.evaluate x: values in \[0, 255\]")):
    with pytest.raises(data.DataError, match=phrase):
      call()
  for before, after in zip(weights, vae.weights, strict=True):  # nothing ran
    np.testing.assert_array_equal(before, after.numpy())
  # Keras's positional arguments still reach fit (y, batch_size, epochs, verbose, callbacks,
  # validation_split, validation_data).
  history = vae.fit(binary_batch, None, 8, 1, 0, None, 0.0, binary_batch)
  assert "val_loss" in history.history


def test_sample_weights_weight_the_per_example_mean(binary_batch):
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=2, hidden_sizes=(16,)))
  vae.compile(optimizer="adam")
  weights = np.zeros(8, np.float32)
  weights[0] = 1.0
  # Keras drops sample weights that come without y, so weighted data is an (x, y, w) dataset;
  # y is ignored by the VAE.
  weighted_data = tf.data.Dataset.from_tensor_slices(
      (binary_batch, np.zeros(8, np.float32), weights)).batch(8)
  weighted = vae.evaluate(weighted_data, verbose=0, return_dict=True)
  # With all weight on the first example, the KL is that example's (the KL is deterministic).
  only_first = vae.evaluate(binary_batch[:1], batch_size=8, verbose=0, return_dict=True)
  unweighted = vae.evaluate(binary_batch, batch_size=8, verbose=0, return_dict=True)
  np.testing.assert_allclose(weighted["kl"], only_first["kl"], rtol=1e-5)
  assert abs(unweighted["kl"] - only_first["kl"]) > 1e-4


def test_metrics_are_per_example_means_over_all_batches(binary_batch, small_config):
  # Batches of 3, 3 and 2: the KL (free of noise) reported is the mean over the 8 examples.
  vae = tfvae.VAE(small_config)
  vae.compile(optimizer="adam")
  reported = vae.evaluate(binary_batch, batch_size=3, verbose=0, return_dict=True)
  per_example = vae.per_example_terms(binary_batch, tf.constant([0, 0]))["kl"]
  np.testing.assert_allclose(reported["kl"], np.mean(per_example), rtol=1e-5)
  assert set(reported) == set(METRIC_NAMES)


def test_kl_warmup_weighs_the_kl_of_each_training_step_by_the_optimizers_step(binary_batch,
                                                                                tmp_path):
  config = tfvae.ModelConfig(latent_size=4, hidden_sizes=(32,), beta=0.5, kl_warmup_steps=4)
  vae = tfvae.VAE(config)
  vae.compile(optimizer=keras.optimizers.Adam(1e-3))
  # One step an epoch, so each epoch's means are one step's: loss = nll + w_t kl at step t.
  history = vae.fit(binary_batch, batch_size=8, epochs=3, verbose=0).history
  weights = [0.0, 0.125, 0.25]  # 0.5 * t / 4
  np.testing.assert_allclose(history["loss"],
                             np.add(history["nll"], np.multiply(weights, history["kl"])),
                             rtol=1e-6)
  assert min(history["kl"]) > 1e-3  # a weight ignored would show
  evaluated = vae.evaluate(binary_batch, batch_size=8, verbose=0, return_dict=True)
  np.testing.assert_allclose(evaluated["loss"], evaluated["nll"] + 0.5 * evaluated["kl"],
                             rtol=1e-6)  # evaluation weighs the KL by beta
  # The weight follows the optimizer's step, which the .keras file keeps: a reloaded model
  # goes on from 0.375 to beta.
  vae.save(tmp_path / "vae.keras")
  loaded = keras.saving.load_model(tmp_path / "vae.keras")
  assert float(loaded.kl_weight()) == 0.375
  history = loaded.fit(binary_batch, batch_size=8, epochs=3, verbose=0).history
  np.testing.assert_allclose(history["loss"],
                             np.add(history["nll"], np.multiply([0.375, 0.5, 0.5],
                                                                history["kl"])),
                             rtol=1e-6)


def test_sampling_is_deterministic_per_seed(small_config):
  vae = tfvae.VAE(small_config)
  a, b, c = vae.sample(5, seed=3), vae.sample(5, seed=3), vae.sample(5, seed=4)
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.allclose(a.numpy(), c.numpy())
  assert a.shape == (5, 28, 28, 1) and float(tf.reduce_min(a)) >= 0


def test_config_round_trip_rebuilds_the_same_architecture(small_config):
  vae = tfvae.VAE(small_config, seed=7)
  clone = tfvae.VAE.from_config(vae.get_config())
  assert clone.model_config == small_config and clone.seed == 7
  assert [w.shape for w in clone.weights] == [w.shape for w in vae.weights]
  for cls in (Encoder, Decoder):
    part = cls(small_config)
    assert cls.from_config(part.get_config()).model_config == small_config


def test_keras_file_round_trip_gives_identical_outputs(tmp_path, binary_batch):
  config = tfvae.ModelConfig(latent_size=3, hidden_sizes=(16,), likelihood="gaussian")
  vae = tfvae.VAE(config)
  vae.compile(optimizer="adam")
  vae.fit(binary_batch, epochs=1, batch_size=4, verbose=0)
  path = tmp_path / "vae.keras"
  vae.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded, tfvae.VAE) and loaded.model_config == config
  for key, value in vae.predict(binary_batch, verbose=0).items():
    np.testing.assert_array_equal(loaded.predict(binary_batch, verbose=0)[key], value)
  np.testing.assert_array_equal(loaded.sample(4, seed=1), vae.sample(4, seed=1))
  seed = tf.constant([3, 3])
  np.testing.assert_array_equal(loaded.per_example_terms(binary_batch, seed)["elbo"],
                                vae.per_example_terms(binary_batch, seed)["elbo"])


def test_uint8_images_are_read_as_0_to_255(small_config, binary_batch):
  vae = tfvae.VAE(small_config)
  as_uint8 = (binary_batch * 255).astype(np.uint8)
  seed = tf.constant([1, 2])
  for name, value in vae.per_example_terms(binary_batch, seed).items():
    np.testing.assert_array_equal(vae.per_example_terms(as_uint8, seed)[name], value)
  np.testing.assert_array_equal(vae.reconstruct(as_uint8), vae.reconstruct(binary_batch))
  vae.compile(optimizer="adam")
  scores = [vae.evaluate(x, batch_size=8, verbose=0, return_dict=True)["kl"]
            for x in (as_uint8, binary_batch)]
  assert scores[0] == scores[1]


def _user_networks(config):
  height, width, channels = config.image_shape
  encoder = keras.Sequential([
      keras.Input(config.image_shape), keras.layers.Conv2D(4, 3, strides=2, activation="elu"),
      keras.layers.Flatten(), keras.layers.Dense(2 * config.latent_size)], name="my_encoder")
  decoder = keras.Sequential([
      keras.Input((config.latent_size,)), keras.layers.Dense(32, activation="elu"),
      keras.layers.Dense(height * width * channels),
      keras.layers.Reshape(config.image_shape)], name="my_decoder")
  return encoder, decoder


def test_user_networks_train_save_and_reload(tmp_path, mnist_slice):
  config = tfvae.ModelConfig(latent_size=3)
  encoder, decoder = _user_networks(config)
  vae = tfvae.VAE(config, encoder_network=encoder, decoder_network=decoder)
  assert vae.encoder.network is encoder and vae.decoder.network is decoder
  x = data.eval_arrays(mnist_slice[0][:400], bernoulli=True, binary=False)
  vae.compile(optimizer=keras.optimizers.Adam(3e-3))
  history = vae.fit(x, batch_size=50, epochs=3, verbose=0).history
  assert history["loss"][-1] < history["loss"][0]
  vae.save(tmp_path / "vae.keras")
  loaded = keras.saving.load_model(tmp_path / "vae.keras")
  assert loaded.encoder.network.name == "my_encoder" and loaded.decoder.network.name == "my_decoder"
  assert isinstance(loaded.encoder.network.layers[0], keras.layers.Conv2D)
  seed = tf.constant([2, 2])
  np.testing.assert_array_equal(loaded.per_example_terms(x[:16], seed)["elbo"],
                                vae.per_example_terms(x[:16], seed)["elbo"])
  loaded.fit(x, batch_size=50, epochs=1, verbose=0)  # and trains on from there


def test_a_user_network_of_the_wrong_shape_is_refused_with_what_it_must_emit():
  config = tfvae.ModelConfig(latent_size=3)
  encoder, decoder = _user_networks(tfvae.ModelConfig(latent_size=5))
  with pytest.raises(ValueError, match=r"encoder network maps \[B, 28, 28, 1\] to \[B, 10\];"
                     r" a tfvae encoder network must emit \[B, 6\]"):
    tfvae.VAE(config, encoder_network=encoder)
  gaussian = tfvae.ModelConfig(latent_size=5, likelihood="gaussian")  # 2 parameters a pixel
  with pytest.raises(ValueError, match=r"must emit \[B, 28, 28, 2\]"):
    tfvae.VAE(gaussian, decoder_network=decoder)


def test_config_names_no_machine_knobs(small_config):
  assert set(tfvae.VAE(small_config).get_config()) == {"name", "trainable", "dtype",
                                                       "model_config", "seed"}


def test_building_a_vae_warns_about_nothing(small_config):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tfvae.VAE(small_config)


def _colourfulness(images: np.ndarray) -> np.ndarray:
  """Per image, the mean over pixels of max - min across the channels: 0 for grey."""
  return (images.max(axis=-1) - images.min(axis=-1)).mean(axis=(1, 2))


# Every likelihood offered for colour images (bin/train refuses bernoulli on them).
_COLOUR_CASES = {
    "discretized_logistic": {"likelihood": "discretized_logistic"},
    "coupled": {"likelihood": "discretized_logistic", "coupled_channels": True},
    "gaussian_fixed": {"likelihood": "gaussian_fixed", "observation_scale": 0.1},
    # An 8x8x16 map with a KL warm-up, without which it collapses at this rate (BENCHMARKS.md).
    "gaussian": {"likelihood": "gaussian", "spatial_latent": True, "latent_size": 1024,
                 "kl_warmup_steps": 200},
    "gaussian_mlp": {"likelihood": "gaussian", "architecture": "mlp", "hidden_sizes": (500,)},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", _COLOUR_CASES)
def test_reconstructions_of_real_colour_images_keep_their_colour(cifar_jpegs, case):
  train_images, test_images = cifar_jpegs
  keras.utils.set_random_seed(0)
  config = tfvae.ModelConfig(**{"image_shape": (32, 32, 3), "latent_size": 32,
                                "architecture": "conv", "conv_channels": (16, 32, 64),
                                **_COLOUR_CASES[case]})
  vae = tfvae.VAE(config)
  vae.compile(optimizer=keras.optimizers.Adam(2e-3))
  train = data.train_pipeline(train_images, 50, seed=0, dynamic_binarization=False)
  vae.fit(train, epochs=14, steps_per_epoch=data.steps_per_epoch(len(train_images), 50),
          shuffle=False, verbose=0)
  x = test_images / 255.0
  reconstruction = vae.reconstruct(test_images).numpy()
  # Colour kept: a grey reconstruction scores 0 on both; blur costs some of the first.
  ratio = _colourfulness(reconstruction).mean() / _colourfulness(x).mean()
  assert ratio > 0.35, ratio
  red_minus_blue = [(images[..., 0] - images[..., 2]).mean(axis=(1, 2))
                    for images in (x, reconstruction)]
  assert np.corrcoef(*red_minus_blue)[0, 1] > 0.8, np.corrcoef(*red_minus_blue)
