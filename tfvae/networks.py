"""Keras networks that emit raw parameter tensors; distributions are built in tfvae.model.

An encoder network maps images [B, H, W, C] (or vectors [B, D]) to [B, 2J] (means, raw scales);
a decoder network maps latents [B, J] to [B, H, W, P] (or [B, P]) raw likelihood parameters,
P = tfvae.distributions.output_channels (C * k, k from the likelihood).
"""

from __future__ import annotations

import math

import keras

from tfvae.config import ModelConfig
from tfvae.distributions import output_channels


def _dense_stack(config: ModelConfig, sizes, name: str) -> list[keras.layers.Layer]:
  return [keras.layers.Dense(size, activation=config.activation, name=f"{name}_dense_{i}")
          for i, size in enumerate(sizes)]


def _residual_block(h, config: ModelConfig, name: str):
  """h + conv(act(conv(act(norm(h))))): a pre-activation residual block (He et al., 2016) of
  3x3 convolutions keeping h's width, normalized once (half the cost of twice, on a CPU)."""
  channels = h.shape[-1]
  y = _norm_act(h, config, name)
  y = keras.layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_0")(y)
  y = keras.layers.Activation(config.activation, name=f"{name}_act_1")(y)
  y = keras.layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_1")(y)
  return keras.layers.Add(name=f"{name}_add")([h, y])


def _norm_act(h, config: ModelConfig, name: str):
  # Group normalization: per example, so batches of 1 or 1000, and the L*B decodings of a
  # batch, are normalized alike.
  groups = math.gcd(h.shape[-1], 8)
  # At least 16 values a group: on a 1x1 grid a one-channel group has variance 0, which would
  # leave the branch only the norm's offset.
  while groups > 1 and math.prod(h.shape[1:]) // groups < 16:
    groups //= 2
  h = keras.layers.GroupNormalization(groups, name=f"{name}_norm")(h)
  return keras.layers.Activation(config.activation, name=f"{name}_act")(h)


def build_encoder_network(config: ModelConfig) -> keras.Model:
  """x [B, H, W, C] -> [B, 2 * latent_size]: the recognition model's parameters.

  mlp: Flatten, then Dense(h) for h in hidden_sizes (Kingma & Welling, appendix C.2).
  conv: a 3x3 convolution to conv_channels[0], then one residual block per stage, each stage
    after the first entered by a stride-2 3x3 convolution to its width (H, W -> ceil(H/2),
    ceil(W/2)), group normalization inside the blocks' branches; Flatten, then Dense; or with
    spatial_latent two 1x1 convolutions to the means and raw scales of a latent map on the
    coarsest grid, each flattened.
  """
  x = keras.Input(shape=config.image_shape, name="x")
  if config.architecture == "mlp":
    return keras.Sequential([x, keras.layers.Flatten(name="flatten"),
                             *_dense_stack(config, config.hidden_sizes, "encoder"),
                             keras.layers.Dense(2 * config.latent_size, name="posterior_params",
                                                dtype="float32")],
                            name="encoder_network")
  h = keras.layers.Conv2D(config.conv_channels[0], 3, padding="same", name="encoder_stem")(x)
  for i, channels in enumerate(config.conv_channels):
    if i:
      h = keras.layers.Conv2D(channels, 3, strides=2, padding="same",
                              name=f"encoder_down_{i}")(h)
    h = _residual_block(h, config, f"encoder_block_{i}")
  # Normalized only inside the residual branches: a per-example normalization here would
  # remove each image's mean colour and contrast.
  h = keras.layers.Activation(config.activation, name="encoder_out_act")(h)
  # The parameters stay float32 under mixed precision (16 bits would round them coarsely).
  if config.spatial_latent:  # means, then raw scales, each a map flattened position-major
    heads = []
    for part in ("loc", "scale"):
      head = keras.layers.Conv2D(latent_channels(config), 1, name=f"posterior_{part}",
                                 dtype="float32")(h)
      heads.append(keras.layers.Flatten(name=f"flatten_{part}", dtype="float32")(head))
    params = keras.layers.Concatenate(name="posterior_params", dtype="float32")(heads)
  else:
    h = keras.layers.Flatten(name="flatten")(h)
    params = keras.layers.Dense(2 * config.latent_size, name="posterior_params",
                                dtype="float32")(h)
  return keras.Model(x, params, name="encoder_network")


def latent_channels(config: ModelConfig) -> int:
  """Channels of a spatial latent: latent_size values on the conv net's coarsest grid."""
  height, width = config.coarsest_grid
  return config.latent_size // (height * width)


def decoder_output_shape(config: ModelConfig) -> tuple[int, ...]:
  """(H, W, P), or (P,) for vectors: a decoder network's output for one latent,
  P = tfvae.distributions.output_channels (C * k, k raw parameters per value)."""
  *outer, last = config.image_shape
  return (*outer, output_channels(config.likelihood, last, config.mixture_components,
                                  config.coupled_channels))


def build_decoder_network(config: ModelConfig) -> keras.Model:
  """z [B, latent_size] -> [B, H, W, C * k] (or [B, D * k]): the generative model's raw
  parameters.

  mlp: Dense(h) for h in reversed(hidden_sizes), then Dense to the parameters.
  conv: the encoder mirrored: Dense to the coarsest grid at conv_channels[-1] (with
    spatial_latent: z reshaped to its map, then a 3x3 convolution to that width), a residual
    block per stage, each stage after it entered by a stride-2 transposed convolution that
    doubles H and W; a centred crop to H x W, then a 3x3 convolution to the parameters.
  """
  output_shape = decoder_output_shape(config)
  z = keras.Input(shape=(config.latent_size,), name="z")
  if config.architecture == "mlp":
    return keras.Sequential([z, *_dense_stack(config, reversed(config.hidden_sizes), "decoder"),
                             keras.layers.Dense(math.prod(output_shape), name="likelihood_params",
                                                dtype="float32"),
                             keras.layers.Reshape(output_shape)], name="decoder_network")
  height, width, out_channels = output_shape
  small = config.coarsest_grid
  widths = config.conv_channels[::-1]
  if config.spatial_latent:
    h = keras.layers.Reshape((*small, latent_channels(config)), name="decoder_grid")(z)
    h = keras.layers.Conv2D(widths[0], 3, padding="same", name="decoder_stem")(h)
  else:
    h = keras.layers.Dense(math.prod((*small, widths[0])), name="decoder_dense")(z)
    h = keras.layers.Reshape((*small, widths[0]), name="decoder_grid")(h)
  for i, channels in enumerate(widths):
    if i:
      h = keras.layers.Conv2DTranspose(channels, 3, strides=2, padding="same",
                                       name=f"decoder_up_{i}")(h)
    h = _residual_block(h, config, f"decoder_block_{i}")
  extra_rows, extra_columns = h.shape[1] - height, h.shape[2] - width
  if extra_rows or extra_columns:  # sizes that are not multiples of the strides
    h = keras.layers.Cropping2D(((extra_rows // 2, extra_rows - extra_rows // 2),
                                 (extra_columns // 2, extra_columns - extra_columns // 2)),
                                name="crop")(h)
  h = keras.layers.Activation(config.activation, name="decoder_out_act")(h)
  params = keras.layers.Conv2D(out_channels, 3, padding="same", name="likelihood_params",
                               dtype="float32")(h)
  return keras.Model(z, params, name="decoder_network")


def leaf_layers(network: keras.Model):
  """network's layers, with the layers of any model nested in it (a user's network) in its place."""
  for layer in network.layers:
    if isinstance(layer, keras.Model):
      yield from leaf_layers(layer)
    else:
      yield layer


def multiply_adds(network: keras.Model) -> int:
  """Multiply-adds of one example through network's Dense and convolution layers.

  A layer whose shapes are unknown (a subclassed network's) counts its weights once.
  """
  total = 0
  for layer in leaf_layers(network):
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
      continue
    try:
      grid = (layer.input if isinstance(layer, keras.layers.Conv2DTranspose)
              else layer.output).shape[1:-1]
    except (AttributeError, ValueError):
      grid = ()
    total += math.prod(kernel.shape) * math.prod(d or 1 for d in grid)  # unknown sizes: 1
  return total or network.count_params()


def activation_floats(network: keras.Model) -> int:
  """Values one example leaves in the outputs of network's layers (nested models included):
  what a forward pass holds per example, at most. Layers of unknown shape count 0."""
  total = 0
  for layer in leaf_layers(network):
    try:
      shape = layer.output.shape[1:]
    except (AttributeError, ValueError):
      continue
    total += math.prod(d or 1 for d in shape)
  return total


def training_flops(config: ModelConfig, encoder: keras.Model, decoder: keras.Model,
                   batch_size: int) -> float:
  """Floating-point operations of one training step: 2 per multiply-add, forward and twice
  that backward, the decoder once per sample of z."""
  per_example = multiply_adds(encoder) + config.num_samples * multiply_adds(decoder)
  return 6.0 * per_example * batch_size
