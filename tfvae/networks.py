"""Keras networks that emit raw parameter tensors; distributions are built in tfvae.model.

An encoder network maps images [B, H, W, C] (or vectors [B, D]) to [B, 2J] (means, raw scales);
a decoder network maps latents [B, J] to [B, H, W, C * k] (or [B, D * k]) raw likelihood
parameters, k from the likelihood.
"""

from __future__ import annotations

import math

import keras

from tfvae.config import ModelConfig
from tfvae.distributions import params_per_pixel


def _dense_stack(config: ModelConfig, sizes, name: str) -> list[keras.layers.Layer]:
  return [keras.layers.Dense(size, activation=config.activation, name=f"{name}_dense_{i}")
          for i, size in enumerate(sizes)]


def build_encoder_network(config: ModelConfig) -> keras.Sequential:
  """x [B, H, W, C] -> [B, 2 * latent_size]: the recognition model's parameters.

  mlp: Flatten, then Dense(h) for h in hidden_sizes (Kingma & Welling, appendix C.2).
  conv: two stride-2 3x3 convolutions with hidden_sizes[0] and hidden_sizes[-1] channels
    (H, W -> ceil(H/4), ceil(W/4)), then Flatten.
  """
  layers: list[keras.layers.Layer] = [keras.Input(shape=config.image_shape, name="x")]
  if config.architecture == "mlp":
    layers.append(keras.layers.Flatten(name="flatten"))
    layers += _dense_stack(config, config.hidden_sizes, "encoder")
  else:
    for i, channels in enumerate((config.hidden_sizes[0], config.hidden_sizes[-1])):
      layers.append(keras.layers.Conv2D(channels, 3, strides=2, padding="same",
                                        activation=config.activation, name=f"encoder_conv_{i}"))
    layers.append(keras.layers.Flatten(name="flatten"))
  layers.append(keras.layers.Dense(2 * config.latent_size, name="posterior_params"))
  return keras.Sequential(layers, name="encoder_network")


def decoder_output_shape(config: ModelConfig) -> tuple[int, ...]:
  """(H, W, C * k), or (D * k,) for vectors: a decoder network's output for one latent, k raw
  parameters per value."""
  *outer, last = config.image_shape
  return (*outer, last * params_per_pixel(config.likelihood))


def build_decoder_network(config: ModelConfig) -> keras.Sequential:
  """z [B, latent_size] -> [B, H, W, C * k] (or [B, D * k]): the generative model's raw
  parameters."""
  output_shape = decoder_output_shape(config)
  layers: list[keras.layers.Layer] = [keras.Input(shape=(config.latent_size,), name="z")]
  if config.architecture == "mlp":
    layers += _dense_stack(config, reversed(config.hidden_sizes), "decoder")
    layers += [keras.layers.Dense(math.prod(output_shape), name="likelihood_params"),
               keras.layers.Reshape(output_shape)]
  else:
    height, width, out_channels = output_shape
    first, last = config.hidden_sizes[0], config.hidden_sizes[-1]
    # Two doublings from ceil(H/4) x ceil(W/4), then a crop: any H and W, as the encoder takes.
    small = (-(-height // 4), -(-width // 4))
    layers += [keras.layers.Dense(math.prod((*small, last)),
                                  activation=config.activation, name="decoder_dense"),
               keras.layers.Reshape((*small, last))]
    for i, filters in enumerate((last, first)):
      layers.append(keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same",
                                                 activation=config.activation,
                                                 name=f"decoder_deconv_{i}"))
    extra_rows, extra_columns = 4 * small[0] - height, 4 * small[1] - width
    if extra_rows or extra_columns:
      layers.append(keras.layers.Cropping2D(
          ((extra_rows // 2, extra_rows - extra_rows // 2),
           (extra_columns // 2, extra_columns - extra_columns // 2)), name="crop"))
    layers.append(keras.layers.Conv2D(out_channels, 3, padding="same", name="likelihood_params"))
  return keras.Sequential(layers, name="decoder_network")
