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

from tfvae.data.splits import ArraySplit, Split

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


def _binarized(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """x ~ Bernoulli(pixel), as 0 and 255 (uint8) or 0 and 1 (floats), like images."""
  if images.dtype == tf.uint8:
    # u ~ U[0, 255) < pixel, i.e. u / 255 < pixel / 255, without a pass to scale the pixels; a
    # cast and a product make 0 and 255 in half the time of tf.where.
    uniform = tf.random.stateless_uniform(tf.shape(images), seed=seed, maxval=255.0)
    return tf.cast(uniform < tf.cast(images, tf.float32), tf.uint8) * 255
  uniform = tf.random.stateless_uniform(tf.shape(images), seed=seed)
  return tf.cast(uniform < tf.cast(images, tf.float32), images.dtype)


def train_pipeline(images: np.ndarray | Split, batch_size: int, seed: int,
                   dynamic_binarization: bool, first_epoch: int = 0, num_epochs: int | None = None,
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
    images: [N, H, W, C] uint8 or float32 (or [N, D] float32), or a tfvae.data.splits.Split:
      arrays are gathered from memory, files and streams read as the epoch goes.
    batch_size: M.
    seed: seeds the order and the binarization.
    dynamic_binarization: draw binary images afresh each epoch.
    first_epoch: the epoch to start at (a resumed run's initial epoch).
    num_epochs: stop before this epoch; None repeats forever.
    epoch_transform: applied to each epoch's dataset of batches (tfvae.runtime groups them
      into blocks there, so that no element spans two epochs).
    parallel_calls: threads that make batches, in order.
  """
  if isinstance(images, ArraySplit):
    images = images.array
  count = int(len(images))
  size = min(batch_size, count)  # the static batch size
  num_batches = steps_per_epoch(count, batch_size)
  base_seed = tf.constant([seed, 0x5EED], tf.int64)
  if isinstance(images, Split):
    load_epoch = _streamed_epoch(images, size, num_batches, dynamic_binarization,
                                 parallel_calls)
  else:
    load_epoch = _array_epoch(images, size, num_batches, dynamic_binarization, parallel_calls)

  def epoch_batches(epoch):
    batches = load_epoch(tf.random.experimental.stateless_fold_in(base_seed, epoch))
    return batches if epoch_transform is None else epoch_transform(batches)

  epochs = tf.data.Dataset.range(first_epoch, num_epochs if num_epochs is not None
                                 else np.iinfo(np.int64).max)
  return epochs.flat_map(epoch_batches).prefetch(2).with_options(_dataset_options())


def _array_epoch(images: np.ndarray, size, num_batches, dynamic_binarization, parallel_calls):
  """epoch seed -> the epoch's batches, gathered from the images held in one constant."""
  stored = tf.constant(images)
  count = int(images.shape[0])
  batch_shape = [size, *images.shape[1:]]

  def load_epoch(epoch_seed):
    order = tf.argsort(tf.random.stateless_uniform([count], seed=epoch_seed))  # a permutation

    def load_batch(index):
      # One dataset element per batch: slicing the permutation costs one op, where batching
      # its elements one by one cost a tf.data call per example.
      batch_indices = order[index * size:(index + 1) * size]  # [M]
      images = tf.ensure_shape(tf.gather(stored, batch_indices), batch_shape)  # [M, H, W, C]
      if not dynamic_binarization:
        return images
      return _binarized(images, tf.random.experimental.stateless_fold_in(epoch_seed, index + 1))

    # On parallel threads: one core binarizes fewer images/s than a GPU trains on.
    return tf.data.Dataset.range(num_batches).map(
        load_batch, num_parallel_calls=parallel_calls, deterministic=True)

  return load_epoch


def _streamed_epoch(split: Split, size, num_batches, dynamic_binarization, parallel_calls):
  """epoch seed -> the epoch's batches, read from the split's files or stream."""
  def load_epoch(epoch_seed):
    batches = split.epoch(epoch_seed, size, num_batches, parallel_calls)
    if not dynamic_binarization:
      return batches
    return batches.enumerate().map(
        lambda index, images: _binarized(
            images, tf.random.experimental.stateless_fold_in(epoch_seed, index + 1)),
        num_parallel_calls=parallel_calls, deterministic=True)

  return load_epoch


def moments(data, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """(mean, standard deviation) of each value over the examples, float64, in unit floats
  (uint8 scaled by 1/255).

  Args:
    data: an array [N, ...], a Split, or a tf.data.Dataset of batches (of examples,
      (examples, labels) or dicts with an "image" key).

  Raises:
    ValueError: no examples.
  """
  from tfvae.data.streams import examples_of  # here: streams imports sources, which import us
  if isinstance(data, np.ndarray):
    batches = [data]
  elif isinstance(data, Split):
    batches = data.examples().batch(batch_size).as_numpy_iterator()
  else:
    batches = data.as_numpy_iterator()
  count, total, squares = 0, 0.0, 0.0
  for batch in batches:
    batch = np.asarray(to_unit_float(examples_of(batch)), np.float64)
    count += len(batch)
    total = total + batch.sum(axis=0)
    squares = squares + np.square(batch).sum(axis=0)
  if count == 0:
    raise ValueError("no examples to take moments of")
  mean = total / count
  return mean, np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))


def eval_batches(split: Split | np.ndarray, batch_size: int, bernoulli: bool,
                 binary: bool) -> tf.data.Dataset:
  """A split's fixed evaluation batches, as `eval_arrays` and `eval_pipeline` give them.

  Streamed splits are binarized example by example, each with a seed of its index, so their
  bits do not depend on the batch size either.
  """
  if not isinstance(split, Split) or isinstance(split, ArraySplit):
    array = split.array if isinstance(split, ArraySplit) else split
    return eval_pipeline(eval_arrays(array, bernoulli, binary), batch_size)
  examples = split.examples()
  if bernoulli and not binary:
    base = tf.constant([TEST_BINARIZATION_SEED, 0], tf.int64)
    examples = examples.enumerate().map(
        lambda index, image: _binarized(image, tf.random.experimental.stateless_fold_in(
            base, index)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return examples.batch(batch_size).prefetch(2).with_options(_dataset_options())


def eval_head(split: Split | np.ndarray, count: int, bernoulli: bool,
              binary: bool) -> np.ndarray:
  """The first `count` evaluation examples of a split, as `eval_batches` gives them."""
  if not isinstance(split, Split) or isinstance(split, ArraySplit):
    array = split.array if isinstance(split, ArraySplit) else split
    return eval_arrays(array[:count], bernoulli, binary)
  for batch in eval_batches(split, count, bernoulli, binary).take(1):
    return batch.numpy()
  return split.head(0)


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
