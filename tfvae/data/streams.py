"""A user's tf.data.Dataset as a tfvae Dataset, for training.train(..., dataset=...)."""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from tfvae.data.checks import CHANNELS, DataError, check_images, check_vectors
from tfvae.data.splits import StreamSplit, hold_out_test


def examples_of(element):
  """An element's (or a batch's) examples: itself, the first of (images, labels, ...), or a
  dict's "image" entry, as TFDS gives them.

  Raises:
    DataError: a dict without an "image" key.
  """
  if isinstance(element, dict):
    if "image" not in element:
      raise DataError(f"a dataset of dicts needs an 'image' key (got {sorted(element)}); map it"
                      f" to images first, e.g. dataset.map(lambda d: d['pixels'])")
    return element["image"]
  if isinstance(element, (tuple, list)):
    return element[0]
  return element


def _examples(*element):
  """examples_of for Dataset.map, which passes a tuple element's parts as arguments."""
  return examples_of(element[0] if len(element) == 1 else element)


def _is_batched(shape: tf.TensorShape) -> bool:
  """Batches: a first dimension of unknown size (.batch() without drop_remainder), rank 4
  (images [B, H, W, C]), or rank 3 whose last dimension is no channel count ([B, H, W])."""
  if not shape.rank:
    return False
  return (shape[0] is None or shape.rank == 4
          or (shape.rank == 3 and shape[-1] not in CHANNELS))


def _single_examples(dataset: tf.data.Dataset, batched: bool | None) -> tf.data.Dataset:
  """Single examples [H, W, C] or [D]: batches are unbatched, and grey images [H, W] get their
  channel axis."""
  dataset = dataset.map(_examples)
  spec = dataset.element_spec
  if not isinstance(spec, tf.TensorSpec):
    raise DataError(f"dataset elements are {spec}; tfvae takes images, (images, labels) or"
                    f" dicts with an 'image' key")
  if batched if batched is not None else _is_batched(spec.shape):
    dataset = dataset.unbatch()
    spec = dataset.element_spec
  if spec.shape.rank == 2:
    dataset = dataset.map(lambda image: image[..., tf.newaxis])
    spec = dataset.element_spec
  if spec.shape.rank not in (1, 3) or not spec.shape.is_fully_defined():
    raise DataError(f"dataset examples are shaped {spec.shape}; tfvae takes images [H, W, C]"
                    f" or vectors [D] of one size (map them to it first)")
  if spec.dtype != tf.uint8:
    dataset = dataset.map(lambda x: tf.cast(x, tf.float32))
  return dataset


def _count(dataset: tf.data.Dataset) -> int:
  count = int(dataset.cardinality())
  if count == tf.data.INFINITE_CARDINALITY:
    raise DataError("the dataset repeats forever; pass one pass over the data (no .repeat())")
  if count < 0:
    logging.info("Counting the dataset's examples: it does not say how many it holds.")
    count = int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
  if count == 0:
    raise DataError("the dataset holds no examples")
  return count


def _counted(examples: tf.data.Dataset, name: str) -> StreamSplit:
  """A checked StreamSplit of the examples, their count known to tf.data (and to Keras)."""
  count = _count(examples)
  examples = examples.apply(tf.data.experimental.assert_cardinality(count))
  return _checked(StreamSplit(examples, count), name)


def _checked(split: StreamSplit, name: str) -> StreamSplit:
  """The split, once its first examples pass tfvae.data.check_images (the range the model
  reads: uint8 0..255, floats in [0, 1]); vectors take any finite values."""
  head = split.head(256)
  (check_vectors if head.ndim == 2 else check_images)(head, f"{name} (its first examples)")
  return split


def from_tf_data(train: tf.data.Dataset, test: tf.data.Dataset | None = None,
                 name: str = "tf.data", binary: bool = False, batched: bool | None = None):
  """A tfvae Dataset streaming a user's tf.data.Dataset.

  Elements may be images [H, W, C] or [H, W] (uint8 0..255 or floats in [0, 1]), vectors [D],
  (images, labels) pairs or dicts with an "image" key, single or in batches; labels are
  ignored. Batches are told from single examples by their shape (see `_is_batched`); pass
  batched= where that guesses wrong (vectors batched with drop_remainder=True). The dataset
  must give its examples in the same order each pass (no reshuffle_each_iteration): tfvae
  shuffles each epoch itself, with the run's seed. Its first examples are checked for the
  value range the model reads.

  Args:
    train: the training examples, one pass.
    test: the test examples; None holds out the first splits.TEST_FRACTION of train.
    name: the dataset's name in logs and results.
    binary: every value is 0 or 1 already (no binarization for the Bernoulli likelihood).
    batched: whether the elements are batches; None tells from their shape.

  Raises:
    DataError: elements that are not images or vectors of one shape, or an endless dataset.
  """
  from tfvae.data.sources import Dataset  # here: sources imports this module's package

  split = _counted(_single_examples(train, batched), name)
  if test is None:  # the first examples (StreamSplit.holdout)
    split, test_split = hold_out_test(split, name, "pass test=")
  else:
    test_split = _counted(_single_examples(test, batched), f"{name} test")
    if test_split.shape != split.shape:
      raise DataError(f"{name}: training examples are {split.shape} but test examples are"
                      f" {test_split.shape}; they must match")
  return Dataset(name, split, test_split, binary=binary)
