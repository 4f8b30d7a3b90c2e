"""tf.data pipelines: training batches (binarized afresh each epoch for binary likelihoods),
the fixed evaluation images, and uint8 -> float scaling.

For the Bernoulli likelihood, grey-level training images are binarized afresh each epoch,
x ~ Bernoulli(pixel), and test images once with a fixed seed, so test numbers are comparable
across runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

# Binarization seed of fixed (test) sets; a constant so every run scores the same test bits.
TEST_BINARIZATION_SEED = 1312_6114


def to_unit_float(images) -> tf.Tensor:
  """uint8 0..255 -> float32 /255; floats pass through as float32."""
  images = tf.convert_to_tensor(images)
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) / 255.0
  return tf.cast(images, tf.float32)


def _bernoulli_draws(images: np.ndarray, seed: int) -> np.ndarray:
  """x ~ Bernoulli(pixel) with a fixed seed: a bool array shaped like images.

  numpy only, so that it runs before TensorFlow is set up (threads are fixed by its first op)
  and its float32 temporaries go back to the system, which TensorFlow's allocator keeps;
  pixel / 255 in float32 is bit for bit what `to_unit_float` computes.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    probabilities = images.astype(np.float32) / np.float32(255)
  else:
    probabilities = images.astype(np.float32, copy=False)
  return np.random.default_rng(seed).random(probabilities.shape, dtype=np.float32) < probabilities


def binarize(images: np.ndarray, seed: int = TEST_BINARIZATION_SEED) -> np.ndarray:
  """x ~ Bernoulli(pixel), once, with a fixed seed; float32 [N, H, W, C] of 0 and 1."""
  return _bernoulli_draws(images, seed).astype(np.float32)


def _dataset_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Autotuning stalls the start of Keras epochs on small CPUs; the pipeline is light anyway.
  options.autotune.enabled = False
  return options


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training batches per epoch: the full batches of M in N examples (one batch if N < M)."""
  return max(1, num_examples // batch_size)


def train_pipeline(images: np.ndarray, batch_size: int, seed: int, dynamic_binarization: bool,
                   first_epoch: int = 0, num_epochs: int | None = None,
                   epoch_transform: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
                   parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Training batches [M, H, W, C], epoch after epoch, as the model takes them.

  Batches keep the images' dtype, uint8 0..255 or float32 in [0, 1] (the VAE scales uint8
  itself, inside its step, so the pipeline moves a quarter of the bytes); dynamic binarization
  gives 0 and 255 (uint8) or 0 and 1 (floats).

  Each epoch is `steps_per_epoch(N, M)` = N // M full batches of a fresh permutation, so every
  batch has the static shape [M, H, W, C] (all N images in one batch if N < M), which lets
  TensorFlow plan the training step once. The N mod M images left over differ from epoch to
  epoch: each image is used with the same probability and every minibatch is an unbiased
  estimate of the dataset's bound.

  Epoch e's order (and, with dynamic binarization, its Bernoulli draws x ~ Bernoulli(pixel))
  depend only on (seed, e), so a run resumed at epoch e sees exactly the batches an
  uninterrupted run would. The stream is endless unless num_epochs is given, so pass
  steps_per_epoch to Keras fit, and shuffle=False: the order is the pipeline's.

  Args:
    images: [N, H, W, C] uint8 or float32.
    batch_size: M.
    seed: seeds the order and the binarization.
    dynamic_binarization: draw binary images afresh each epoch.
    first_epoch: the epoch to start at (a resumed run's initial epoch).
    num_epochs: stop before this epoch; None repeats forever.
    epoch_transform: applied to each epoch's dataset of batches (tfvae.runtime groups them
      into blocks there, so that no element spans two epochs).
    parallel_calls: threads that make batches, in order.
  """
  stored = tf.constant(images)
  count = int(images.shape[0])
  size = min(batch_size, count)  # the static batch size
  num_batches = steps_per_epoch(count, batch_size)
  batch_shape = [size, *images.shape[1:]]
  base_seed = tf.constant([seed, 0x5EED], tf.int64)

  def epoch_batches(epoch):
    epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
    order = tf.argsort(tf.random.stateless_uniform([count], seed=epoch_seed))  # a permutation

    def load_batch(index):
      # One dataset element per batch: slicing the permutation costs one op, where batching
      # its elements one by one cost a tf.data call per example.
      batch_indices = order[index * size:(index + 1) * size]  # [M]
      images = tf.ensure_shape(tf.gather(stored, batch_indices), batch_shape)  # [M, H, W, C]
      if not dynamic_binarization:
        return images
      noise_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index + 1)
      if images.dtype == tf.uint8:
        # u ~ U[0, 255) < pixel, i.e. u / 255 < pixel / 255, without a pass to scale the
        # pixels; a cast and a product make 0 and 255 in half the time of tf.where.
        uniform = tf.random.stateless_uniform(batch_shape, seed=noise_seed, maxval=255.0)
        return tf.cast(uniform < tf.cast(images, tf.float32), tf.uint8) * 255
      uniform = tf.random.stateless_uniform(batch_shape, seed=noise_seed)
      return tf.cast(uniform < tf.cast(images, tf.float32), images.dtype)

    # On parallel threads: one core binarizes fewer images/s than a GPU trains on.
    batches = tf.data.Dataset.range(num_batches).map(
        load_batch, num_parallel_calls=parallel_calls, deterministic=True)
    return batches if epoch_transform is None else epoch_transform(batches)

  epochs = tf.data.Dataset.range(first_epoch, num_epochs if num_epochs is not None
                                 else np.iinfo(np.int64).max)
  return epochs.flat_map(epoch_batches).prefetch(2).with_options(_dataset_options())


def eval_arrays(images: np.ndarray, bernoulli: bool, binary: bool) -> np.ndarray:
  """The fixed evaluation images: binarized once (fixed seed) for Bernoulli unless binary.

  Returns uint8 (0..255; binarized: 0 and 255) for uint8 images, which is what the VAE and
  tfvae.evaluation take and a quarter of float32's memory; float32 in [0, 1] for float images.
  Scale with `to_unit_float` before feeding anything else, e.g. a SavedModel signature.
  """
  if not bernoulli or binary:
    return images
  draws = _bernoulli_draws(images, TEST_BINARIZATION_SEED)
  if images.dtype == np.uint8:
    return draws.astype(np.uint8) * np.uint8(255)
  return draws.astype(np.float32)


def eval_pipeline(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
  """Images from `eval_arrays` (uint8 or float32) -> unshuffled batches of the same dtype."""
  batches = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  return batches.prefetch(2).with_options(_dataset_options())
