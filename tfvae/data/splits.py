"""A dataset's splits: arrays in memory, image files streamed from disk, or a tf.data stream.

Each split answers the same questions: how many examples, of what shape and dtype, one epoch of
training batches in an order fixed by a seed, the examples in their fixed order, the first few
as numpy, a held-out part, and a fingerprint of what it holds. Files and streams are read
through tf.data as training goes, so memory does not grow with the number of examples.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import tensorflow as tf

from tfvae.data.checks import DataError

# Held-out parts (validation, or test where a source has none) are drawn with this seed, so a
# split is a property of the data, the same for every run.
HOLDOUT_SEED = 20_150_905


def _fixed_order(count: int) -> np.ndarray:
  return np.random.default_rng(HOLDOUT_SEED).permutation(count)


class Split:
  """One split of a dataset; see the module docstring. Subclasses hold the examples."""

  count: int
  shape: tuple[int, ...]  # of one example: (H, W, C) images or (D,) vectors
  dtype: np.dtype  # uint8 (0..255) or float32

  def examples(self) -> tf.data.Dataset:
    """Single examples [*shape] in the split's fixed order."""
    raise NotImplementedError

  def epoch(self, seed: tf.Tensor, batch_size: int, num_batches: int,
            parallel_calls: int) -> tf.data.Dataset:
    """num_batches full batches [batch_size, *shape] in an order that depends on seed alone."""
    raise NotImplementedError

  def holdout(self, count: int) -> tuple[Split, Split]:
    """(the rest, `count` held-out examples), the same for every run."""
    raise NotImplementedError

  def take(self, count: int) -> Split:
    """The first `count` examples."""
    raise NotImplementedError

  def head(self, count: int) -> np.ndarray:
    """The first `count` examples as one numpy array."""
    examples = list(self.examples().take(count).as_numpy_iterator())
    return np.stack(examples) if examples else np.zeros((0, *self.shape), self.dtype)

  def fingerprint(self, digest) -> None:
    """Adds what identifies the split's contents to a hashlib digest."""
    raise NotImplementedError

  def __len__(self) -> int:
    return self.count


class ArraySplit(Split):
  """Examples held in one numpy array [N, *shape]."""

  def __init__(self, array: np.ndarray):
    self.array = array
    self.count, self.shape, self.dtype = len(array), tuple(array.shape[1:]), array.dtype

  def examples(self) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(self.array)

  def holdout(self, count):
    order = _fixed_order(self.count)
    return (ArraySplit(self.array[np.sort(order[count:])]),
            ArraySplit(self.array[np.sort(order[:count])]))

  def take(self, count):
    return ArraySplit(self.array[:count])

  def head(self, count):
    return self.array[:count]

  def fingerprint(self, digest):
    digest.update(f"{self.array.dtype}{self.array.shape}".encode())
    digest.update(np.ascontiguousarray(self.array).data)


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """A decoded uint8 image [H, W, c], c in 1..4, with `channels` channels (1, 3 or 4)."""
  have = tf.shape(image)[-1]
  if channels == 1:
    return image[..., :1]
  grey = tf.concat([image[..., :1]] * 3, axis=-1)  # [H, W, 3]
  colour = tf.cond(have >= 3, lambda: image[..., :3], lambda: grey)
  if channels == 3:
    return colour
  opaque = tf.fill(tf.shape(image[..., :1]), tf.constant(255, tf.uint8))
  alpha = tf.cond(tf.equal(have, 4), lambda: image[..., 3:4],
                  lambda: tf.cond(tf.equal(have, 2), lambda: image[..., 1:2], lambda: opaque))
  return tf.concat([colour, alpha], axis=-1)


class FileSplit(Split):
  """Image files (PNG, JPEG, BMP, GIF), decoded as they are read, [H, W, C] uint8.

  Args:
    paths: the files, in their fixed order.
    shape: (H, W, C) of every decoded image; files of another size are resized when resize.
    resize: resize every image to H x W (bilinear, antialiased).
    root: the folder the fingerprint names paths relative to.
  """

  def __init__(self, paths, shape, resize: bool, root):
    self.paths = tuple(str(p) for p in paths)
    self.count, self.shape, self.dtype = len(self.paths), tuple(shape), np.dtype(np.uint8)
    self.resize, self.root = resize, pathlib.Path(root)
    self._table = None

  def _path_table(self) -> tf.lookup.StaticHashTable:
    """index -> path, made on first use (after the runtime has set TensorFlow's threads).

    A table, not a constant: a constant of every path would be copied into each tf.data graph
    and its rewrites, memory that grows with the number of files.
    """
    if self._table is None:
      with tf.init_scope():  # eagerly, also when first asked inside a tf.data function
        self._table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.range(self.count, dtype=tf.int64), tf.constant(self.paths)), default_value="")
    return self._table

  def _like(self, paths) -> FileSplit:
    return FileSplit(paths, self.shape, self.resize, self.root)

  def decode(self, path: tf.Tensor) -> tf.Tensor:
    """One file -> uint8 [H, W, C]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    image = _to_channels(image, self.shape[-1])
    if self.resize:
      resized = tf.image.resize(image, self.shape[:2], antialias=True)
      image = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(image, self.shape)

  def _decoded(self, indices: tf.data.Dataset, parallel_calls: int) -> tf.data.Dataset:
    table = self._path_table()
    return indices.map(lambda index: self.decode(table.lookup(index)),
                       num_parallel_calls=parallel_calls, deterministic=True)

  def examples(self):
    return self._decoded(tf.data.Dataset.range(self.count), tf.data.AUTOTUNE)

  def epoch(self, seed, batch_size, num_batches, parallel_calls):
    order = tf.argsort(tf.random.stateless_uniform([self.count], seed=seed))  # a permutation
    indices = tf.data.Dataset.from_tensor_slices(
        tf.cast(order[:num_batches * batch_size], tf.int64))
    return self._decoded(indices, parallel_calls).batch(batch_size, drop_remainder=True)

  def holdout(self, count):
    # By a digest of each path below root: a file stays in its split when others are added.
    digests = [hashlib.sha256(os.path.relpath(p, self.root).encode()).digest()
               for p in self.paths]
    held = set(sorted(range(self.count), key=digests.__getitem__)[:count])
    return (self._like([p for i, p in enumerate(self.paths) if i not in held]),
            self._like([p for i, p in enumerate(self.paths) if i in held]))

  def take(self, count):
    return self._like(self.paths[:count])

  def fingerprint(self, digest):
    digest.update(f"files{self.shape}{self.resize}".encode())
    for path in self.paths:
      digest.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\n".encode())


class StreamSplit(Split):
  """Examples from a tf.data.Dataset of single examples in a fixed order (TFDS, a user's).

  Training epochs shuffle it within consecutive windows of `shuffle_buffer` examples, each
  window permuted by a seed of the epoch and its index, so a resumed run reads what an
  uninterrupted one would. (TFDS writes its examples shuffled already.)
  """

  def __init__(self, dataset: tf.data.Dataset, count: int, shuffle_buffer: int = 10_000):
    spec = dataset.element_spec
    self.dataset, self.count, self.shuffle_buffer = dataset, int(count), shuffle_buffer
    self.shape, self.dtype = tuple(spec.shape), np.dtype(spec.dtype.as_numpy_dtype)

  def examples(self):
    return self.dataset

  def epoch(self, seed, batch_size, num_batches, parallel_calls):
    del parallel_calls  # the stream's own

    def permuted(index, window):  # window [W, *shape]
      keys = tf.random.stateless_uniform(
          tf.shape(window)[:1], seed=tf.random.experimental.stateless_fold_in(seed, index))
      return tf.data.Dataset.from_tensor_slices(tf.gather(window, tf.argsort(keys)))

    windows = self.dataset.batch(min(self.shuffle_buffer, self.count)).enumerate()
    shuffled = windows.flat_map(permuted)
    return shuffled.batch(batch_size, drop_remainder=True).take(num_batches)

  def holdout(self, count):
    return (StreamSplit(self.dataset.skip(count), self.count - count, self.shuffle_buffer),
            StreamSplit(self.dataset.take(count), count, self.shuffle_buffer))

  def take(self, count):
    return StreamSplit(self.dataset.take(count), min(count, self.count), self.shuffle_buffer)

  def fingerprint(self, digest):
    # The whole stream would be read to hash it all: its spec, size and first examples stand in.
    digest.update(f"stream{self.shape}{self.dtype}{self.count}".encode())
    for example in self.examples().take(256).as_numpy_iterator():
      digest.update(np.ascontiguousarray(example).data)


TEST_FRACTION = 0.1  # held out as the test split where a source has none


def hold_out_test(split: Split, name: str, fix: str) -> tuple[Split, Split]:
  """(train, test): TEST_FRACTION of split's examples held out as test, by `Split.holdout`.

  Raises:
    DataError: too few examples to hold out at least one and keep one; `fix` says what to do.
  """
  count = int(round(split.count * TEST_FRACTION))
  if count < 1 or count >= split.count:
    raise DataError(f"{name}: {split.count} examples are too few to hold out"
                    f" {TEST_FRACTION:.0%} as the test split; {fix}")
  return split.holdout(count)


def as_split(x) -> Split:
  """A Split as it is, or a numpy array wrapped in one."""
  return x if isinstance(x, Split) else ArraySplit(np.asarray(x))


def fingerprint(*splits: Split) -> str:
  """sha256 over the splits' fingerprints."""
  digest = hashlib.sha256()
  for split in splits:
    split.fingerprint(digest)
  return digest.hexdigest()


def require_array(split: Split, what: str) -> np.ndarray:
  """The split's array; DataError for a streamed split."""
  if not isinstance(split, ArraySplit):
    raise DataError(f"{what} is streamed ({type(split).__name__}), not held in memory; read it"
                    f" with .examples() or .head(n)")
  return split.array
