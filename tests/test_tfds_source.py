"""TFDS datasets: tiny ones prepared offline here, read back through tfds: as streamed splits."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from tfvae.data import sources, tfds_source
from tfvae.data.checks import DataError
from tfvae.data.splits import StreamSplit

tfds = pytest.importorskip("tensorflow_datasets")


def _images(seed: int, count: int, shape=(8, 8, 1)) -> np.ndarray:
  """count uint8 images, the same for a seed; shape None for sizes varying in 4..9."""
  rng = np.random.default_rng(seed)
  if shape is not None:
    return rng.integers(0, 256, (count, *shape), dtype=np.uint8)
  return [rng.integers(0, 256, (*rng.integers(4, 10, 2), 3), dtype=np.uint8)
          for _ in range(count)]


class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny dataset from numpy, written in the order generated; no downloads."""

  VERSION = tfds.core.Version("1.0.0")
  IMAGE = tfds.features.Image(shape=(8, 8, 1))
  SPLITS = {"train": (0, 40), "test": (1, 10)}  # split -> (seed, count)
  SHAPE = (8, 8, 1)

  def _info(self):
    features = {"image": self.IMAGE, "label": tfds.features.ClassLabel(num_classes=2)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(*spec) for split, spec in self.SPLITS.items()}

  def _generate_examples(self, seed=0, count=0):
    for i, image in enumerate(_images(seed, count, self.SHAPE)):
      yield i, {"image": image, "label": i % 2}


class TinyShapes(_Tiny, skip_registration=True):
  pass


class TinyShapesValid(_Tiny, skip_registration=True):
  SPLITS = {"train": (2, 30), "validation": (3, 6), "test": (4, 8)}


class TinySizes(_Tiny, skip_registration=True):
  IMAGE = tfds.features.Image(shape=(None, None, 3))
  SPLITS = {"train": (5, 20)}  # no test: 10% of train is held out
  SHAPE = None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A TFDS data folder holding tiny_shapes, tiny_shapes_valid and tiny_sizes, prepared."""
  root = tmp_path_factory.mktemp("tensorflow_datasets")
  for builder in (TinyShapes, TinyShapesValid, TinySizes):
    builder(data_dir=str(root)).download_and_prepare()
  return root


def _array(split) -> np.ndarray:
  return np.stack(list(split.examples().as_numpy_iterator()))


def _load(name, root, validation_examples=None, image_size=None):
  return sources.load(name, data_dir=str(root), validation_examples=validation_examples,
                      image_size=image_size)


def test_a_prepared_dataset_loads_as_uint8_streams_in_its_stored_order(root):
  dataset = _load("tfds:tiny_shapes", root, validation_examples=5)
  assert dataset.name == "tfds:tiny_shapes" and not dataset.binary
  assert dataset.image_shape == (8, 8, 1)
  assert (dataset.train.count, dataset.validation.count, dataset.test.count) == (35, 5, 10)
  for split in (dataset.train, dataset.validation, dataset.test):
    assert isinstance(split, StreamSplit) and split.dtype == np.uint8
    assert split.examples().element_spec == tf.TensorSpec((8, 8, 1), tf.uint8)
  train = _images(0, 40)
  np.testing.assert_array_equal(_array(dataset.validation), train[:5])  # the stream's first 5
  np.testing.assert_array_equal(_array(dataset.train), train[5:])
  np.testing.assert_array_equal(_array(dataset.test), _images(1, 10))
  np.testing.assert_array_equal(_array(dataset.train), _array(dataset.train))  # deterministic


def test_training_epochs_are_full_batches_of_the_images(root):
  dataset = _load("tfds:tiny_shapes", root, validation_examples=5)
  batches = list(dataset.train.epoch(tf.constant([1, 2]), 8, 4, 2).as_numpy_iterator())
  assert len(batches) == 4 and batches[0].shape == (8, 8, 8, 1)
  seen = {image.tobytes() for image in np.concatenate(batches)}
  assert seen <= {image.tobytes() for image in _images(0, 40)[5:]}


def test_a_validation_split_of_the_dataset_is_used(root):
  dataset = _load("tfds:tiny_shapes_valid", root)
  assert (dataset.train.count, dataset.validation.count, dataset.test.count) == (30, 6, 8)
  np.testing.assert_array_equal(_array(dataset.validation), _images(3, 6))
  np.testing.assert_array_equal(_array(dataset.train), _images(2, 30))
  cut = _load("tfds:tiny_shapes_valid", root, validation_examples=4)
  assert cut.validation.count == 4 and cut.train.count == 30


def test_images_of_varying_size_need_image_size(root):
  with pytest.raises(DataError, match="--image_size"):
    tfds_source.load("tiny_sizes", str(root), None)
  dataset = _load("tfds:tiny_sizes", root, validation_examples=0, image_size=(6, 6))
  assert dataset.image_shape == (6, 6, 3) and dataset.validation is None
  assert (dataset.train.count, dataset.test.count) == (18, 2)  # 10% held out as test
  assert dataset.test.examples().element_spec == tf.TensorSpec((6, 6, 3), tf.uint8)
  first = _images(5, 20, None)[0]  # the held-out test's first
  expected = tf.image.resize(first, (6, 6), antialias=True)
  expected = np.clip(np.round(expected.numpy()), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(_array(dataset.test)[0], expected)


def test_image_size_resizes_fixed_size_images_too(root):
  dataset = tfds_source.load("tiny_shapes", str(root), (4, 5))
  assert dataset.image_shape == (4, 5, 1) and _array(dataset.test).shape == (10, 4, 5, 1)
  same = tfds_source.load("tiny_shapes", str(root), (8, 8))  # its own size: pixels kept
  np.testing.assert_array_equal(_array(same.test), _images(1, 10))


def test_a_dataset_not_prepared_names_the_folder_and_tfds_build(tmp_path):
  with pytest.raises(DataError, match="tfds build no_such_set") as error:
    tfds_source.load("no_such_set", str(tmp_path), None)
  assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
  with pytest.raises(DataError, match=r"tfds build no_such_set/cfg"):
    tfds_source.load("no_such_set:cfg", str(tmp_path), None)


def test_the_data_folder_order(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  assert tfds_source.resolve_root(str(tmp_path / "flag")) == tmp_path / "flag"
  assert tfds_source.resolve_root(None) == tmp_path / "env"
  monkeypatch.delenv("TFDS_DATA_DIR")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert tfds_source.resolve_root(None) == tmp_path / "tensorflow_datasets"


def test_the_highest_prepared_version_and_the_only_config_are_found(tmp_path):
  for version in ("1.0.0", "1.10.0", "1.9.0", "2.0.0"):
    (tmp_path / "set" / "cfg" / version).mkdir(parents=True)
  for version in ("1.0.0", "1.10.0", "1.9.0"):
    (tmp_path / "set" / "cfg" / version / "dataset_info.json").write_text("{}")
  (tmp_path / "set" / "cfg" / "incomplete.AB12_3.0.0").mkdir()  # a build under way
  found = tmp_path / "set" / "cfg" / "1.10.0"
  assert tfds_source.prepared_folder(tmp_path, "set", "cfg") == found
  assert tfds_source.prepared_folder(tmp_path, "set", None) == found
  (tmp_path / "set" / "other" / "1.0.0").mkdir(parents=True)
  (tmp_path / "set" / "other" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(DataError, match="configs cfg, other; pick one: --dataset=tfds:set:CONFIG"):
    tfds_source.prepared_folder(tmp_path, "set", None)


@pytest.mark.parametrize("argument", ["", "a:", ":b", "a:b:c", "..", "a b"])
def test_a_malformed_argument_is_refused(argument):
  with pytest.raises(DataError, match="NAME:CONFIG"):
    tfds_source.parse(argument)


def test_name_and_config():
  assert tfds_source.parse("mnist") == ("mnist", None)
  assert tfds_source.parse("cifar10_corrupted:fog_1") == ("cifar10_corrupted", "fog_1")
  assert tfds_source.parse("celeb_a/align") == ("celeb_a", "align")


def test_the_image_feature_is_found_by_its_type():
  image = tfds.features.Image(shape=(8, 8, 3))
  label = tfds.features.ClassLabel(num_classes=2)
  features = tfds.features.FeaturesDict({"picture": image, "label": label})
  assert tfds_source.image_feature(features, tfds, "x") == ("picture", features["picture"])
  several = tfds.features.FeaturesDict({"image": image, "mask": image})
  assert tfds_source.image_feature(several, tfds, "x")[0] == "image"
  with pytest.raises(DataError, match="several image features \\(left, right\\)"):
    tfds_source.image_feature(tfds.features.FeaturesDict({"left": image, "right": image}),
                              tfds, "x")
  with pytest.raises(DataError, match="no image feature \\(its features: label\\)"):
    tfds_source.image_feature(tfds.features.FeaturesDict({"label": label}), tfds, "x")


def test_images_must_be_uint8_of_fixed_channels():
  with pytest.raises(DataError, match="unfixed channels"):
    tfds_source.image_shape(tfds.features.Image(shape=(8, 8, None)), "x", None)
  with pytest.raises(DataError, match="uint16 images"):
    tfds_source.image_shape(tfds.features.Image(shape=(8, 8, 1), dtype=np.uint16), "x", None)


def test_without_tensorflow_datasets_the_error_says_pip_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  with pytest.raises(DataError, match="pip install tensorflow-datasets"):
    tfds_source.load("tiny_shapes", str(tmp_path), None)
