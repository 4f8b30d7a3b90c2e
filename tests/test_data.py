"""Datasets: canonical files, checksums, parsers, bad files, pipelines."""

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import scipy.io
import tensorflow as tf

from tfvae import data
from tfvae.data import DataError


def _idx(images: np.ndarray, magic: int = 0x00000803) -> bytes:
  count, rows, cols = images.shape
  return gzip.compress(struct.pack(">IIII", magic, count, rows, cols) + images.tobytes())


def test_mnist_loads_with_canonical_shapes(mnist):
  assert mnist.x_train.shape == (50000, 28, 28, 1) and mnist.x_train.dtype == np.uint8
  assert mnist.x_valid.shape == (10000, 28, 28, 1)
  assert mnist.x_test.shape == (10000, 28, 28, 1)
  assert not mnist.binary and mnist.x_train.max() == 255


def test_binarized_mnist_is_fixed_50k_train_10k_test(data_dir):
  dataset = data.load("binarized_mnist", data_dir)
  assert dataset.x_train.shape == (50000, 28, 28, 1) and dataset.x_test.shape[0] == 10000
  assert dataset.binary and set(np.unique(dataset.x_test)) == {0, 255}  # uint8 0..255


def test_binarized_mnist_reaches_the_model_as_zeros_and_ones(data_dir):
  # Regression: its pixels were uint8 0/1, which the uint8 0..255 convention read as 0 and 1/255.
  dataset = data.load("binarized_mnist", data_dir, max_examples=500)
  batch = next(iter(data.train_pipeline(dataset.x_train, 500, seed=0,
                                        dynamic_binarization=False)))
  pixels = data.to_unit_float(batch).numpy()
  assert set(np.unique(pixels)) == {0.0, 1.0}
  assert 0.08 < pixels.mean() < 0.2  # MNIST's share of ink
  np.testing.assert_array_equal(data.eval_arrays(dataset.x_test, True, True), dataset.x_test)


def test_frey_face_is_1965_faces_of_28x20(data_dir):
  dataset = data.load("frey_face", data_dir)
  assert dataset.image_shape == (28, 20, 1)
  assert len(dataset.x_train) + len(dataset.x_valid) + len(dataset.x_test) == 1965


def test_max_examples_caps_the_training_set(data_dir):
  assert data.load("mnist", data_dir, max_examples=123).x_train.shape[0] == 123


def test_data_dir_order(monkeypatch, tmp_path):
  monkeypatch.setenv("TFVAE_DATA_DIR", str(tmp_path / "env"))
  assert data.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
  assert data.resolve_data_dir(None) == tmp_path / "env"
  monkeypatch.delenv("TFVAE_DATA_DIR")
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  assert data.resolve_data_dir(None) == tmp_path / "keras" / "datasets"


def test_a_file_with_the_wrong_sha256_is_never_parsed(data_dir, tmp_path):
  folder = tmp_path / "mnist"
  folder.mkdir()
  shutil.copy(data.fetch("mnist", "t10k-images-idx3-ubyte.gz", data_dir), folder)
  (folder / "train-images-idx3-ubyte.gz").write_bytes(_idx(np.zeros((2, 28, 28), np.uint8)))
  with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: sha256 [0-9a-f]{64},"
                                      r" expected 440fcabf.*delete it"):
    data.load("mnist", tmp_path)


def test_a_missing_file_that_cannot_be_downloaded_names_the_fix(tmp_path, monkeypatch):
  import keras

  def offline(*args, **kwargs):
    raise OSError("network unreachable")

  monkeypatch.setattr(keras.utils, "get_file", offline)
  with pytest.raises(DataError, match="missing and could not be downloaded.*--data_dir"):
    data.load("frey_face", tmp_path)


def test_idx_parser_round_trips_and_rejects_bad_bytes():
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  np.testing.assert_array_equal(data.parse_idx_images(_idx(images))[..., 0], images)
  with pytest.raises(DataError, match="magic number 0x00000801"):
    data.parse_idx_images(_idx(images, magic=0x00000801), "labels.gz")
  with pytest.raises(DataError, match="corrupt or truncated gzip"):
    data.parse_idx_images(_idx(images)[:-6], "cut.gz")
  raw = gzip.decompress(_idx(images))
  with pytest.raises(DataError, match="truncated or corrupt"):
    data.parse_idx_images(raw[:-1])


def test_amat_parser():
  lines = "\n".join(" ".join(["1", "0"] * 392) for _ in range(3)) + "\n"
  images = data.parse_amat(lines.encode())
  assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
  assert set(np.unique(images)) == {0, 255} and (images == 255).sum() == 3 * 392
  with pytest.raises(DataError, match="not a positive multiple of 784"):
    data.parse_amat(b"0 1 1\n")
  with pytest.raises(DataError, match="other than 0 and 1"):
    data.parse_amat(("2 " * 784).encode())


def test_mat_without_ff_and_with_a_wrong_array(tmp_path):
  path = tmp_path / "x.mat"
  scipy.io.savemat(path, {"faces": np.zeros((560, 3), np.uint8)})
  with pytest.raises(DataError, match="no variable `ff`.*faces"):
    data.parse_frey_face(path.read_bytes(), str(path))
  scipy.io.savemat(path, {"ff": np.zeros((560, 3), np.uint8)})
  with pytest.raises(DataError, match="decoded `ff` has sha256"):
    data.parse_frey_face(path.read_bytes(), str(path))
  assert data.parse_frey_face(path.read_bytes(), check_sha256=False).shape == (3, 28, 20, 1)
  with pytest.raises(DataError, match="not a readable .mat file"):
    data.parse_frey_face(b"garbage", "garbage.mat")


def test_frey_face_is_checked_by_its_decoded_array(data_dir):
  path = data.fetch("frey_face", "frey_rawface.mat", data_dir)
  raw = path.read_bytes()
  ff = scipy.io.loadmat(path)["ff"]
  assert hashlib.sha256(np.ascontiguousarray(ff).tobytes()).hexdigest().startswith("fbd70c2c")
  assert data.parse_frey_face(raw).shape == (1965, 28, 20, 1)


def test_npz_user_data(tmp_path):
  path = tmp_path / "mine.npz"
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (10, 8, 12), dtype=np.uint8),
           x_test=rng.integers(0, 256, (4, 8, 12), dtype=np.uint8), y_train=np.zeros(10))
  dataset = data.load(f"npz:{path}")
  assert dataset.image_shape == (8, 12, 1) and not dataset.binary


@pytest.mark.parametrize("arrays, phrase", [
    ({"x_train": np.zeros((2, 4, 4))}, "no array x_test"),
    ({"x_train": np.full((2, 4, 4), np.nan), "x_test": np.zeros((2, 4, 4))}, "NaN or Inf"),
    ({"x_train": np.full((2, 4, 4), 3.0), "x_test": np.zeros((2, 4, 4))}, "divide by 255"),
    ({"x_train": np.zeros((0, 4, 4)), "x_test": np.zeros((2, 4, 4))}, "holds no images"),
    ({"x_train": np.zeros((2, 2, 2, 2, 2)), "x_test": np.zeros((2, 16))},
     "expected \\[N, H, W\\]"),
    ({"x_train": np.zeros((2, 3, 8, 8)), "x_test": np.zeros((2, 3, 8, 8))},
     "channels-first .* save x.transpose\\(0, 2, 3, 1\\)"),
    ({"x_train": np.array([[0.0, np.nan]]), "x_test": np.zeros((2, 2))}, "NaN or Inf values"),
    ({"x_train": np.zeros((2, 4, 4)), "x_test": np.zeros((2, 5, 4))}, "must match"),
    ({"x_train": np.eye(4, dtype=np.uint8)[None], "x_test": np.zeros((2, 4, 4), np.uint8)},
     "multiply by 255"),
])
def test_bad_npz_data_fails_with_the_file_and_the_fix(tmp_path, arrays, phrase):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=phrase) as error:
    data.load(f"npz:{path}")
  assert str(path) in str(error.value)


def test_not_an_npz_file(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_bytes(b"not a zip")
  with pytest.raises(DataError, match="not an .npz archive"):
    data.load(f"npz:{path}")


def test_dynamic_binarization_changes_each_epoch_and_keeps_the_mean(mnist_slice):
  x_train, _ = mnist_slice
  batches = iter(data.train_pipeline(x_train, 1000, seed=0, dynamic_binarization=True))
  first, second = next(batches).numpy(), next(batches).numpy()  # epochs 0 and 1
  assert first.dtype == np.uint8 and set(np.unique(first)) == {0, 255}  # as stored: uint8
  assert 0.05 < np.mean(first != second) < 0.3  # reshuffled and rebinarized
  np.testing.assert_allclose(first.mean() / 255, x_train.mean() / 255, atol=0.005)
  floats = next(iter(data.train_pipeline(x_train.astype(np.float32) / 255, 1000, seed=0,
                                         dynamic_binarization=True)))
  np.testing.assert_array_equal(floats.numpy(), first / 255)  # same draws, float 0/1


def test_dynamic_binarization_draws_each_grey_level_with_its_probability():
  # 40 copies of an image whose pixel j has grey level j, so the order of the images in a batch
  # does not matter; 40 epochs of one batch each: 1600 draws x ~ Bernoulli(p / 255) per level p.
  images = np.tile(np.arange(256, dtype=np.uint8), (40, 1)).reshape(40, 256, 1, 1)
  pipeline = data.train_pipeline(images, 40, seed=3, dynamic_binarization=True, num_epochs=40)
  white = sum((batch.numpy() == 255).sum(axis=0).ravel() for batch in pipeline)
  frequency, p = white / 1600, np.arange(256) / 255
  assert frequency[0] == 0 and frequency[255] == 1  # black stays black, white stays white
  # Within 4.5 standard deviations for every level (one level past that: about 1 in 500 seeds).
  sigma = np.sqrt(p * (1 - p) / 1600)
  assert np.all(np.abs(frequency - p)[1:255] < 4.5 * sigma[1:255]), np.abs(frequency - p).max()
  # All levels together: a chi-square of 254 degrees of freedom (mean 254, sd 22.5).
  chi2 = np.sum(((frequency - p)[1:255] / sigma[1:255]) ** 2)
  assert chi2 < 254 + 5 * 22.5, chi2


def test_each_epoch_is_full_batches_of_a_fresh_permutation():
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  pipeline = data.train_pipeline(images, 4, seed=1, dynamic_binarization=False, num_epochs=400)
  assert pipeline.element_spec.shape == (4, 1, 1, 1)  # static: the step is traced for M = 4
  epochs = np.array([b.numpy().ravel() for b in pipeline]).reshape(400, 8)  # 2 batches an epoch
  for epoch in epochs:
    assert len(set(epoch)) == 8  # drawn without replacement
  assert len({tuple(epoch) for epoch in epochs[:10]}) == 10  # reshuffled every epoch
  # The 2 images left out change from epoch to epoch: each is used in 8/10 of the epochs.
  counts = np.bincount(epochs.ravel().astype(int), minlength=10)
  np.testing.assert_allclose(counts / 400, 0.8, atol=0.08)


def test_fewer_images_than_a_batch_make_one_batch_of_all():
  images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
  assert data.steps_per_epoch(3, 100) == 1
  (batch,) = data.train_pipeline(images, 100, seed=0, dynamic_binarization=False, num_epochs=1)
  assert sorted(batch.numpy().ravel()) == [0, 1, 2]


def test_pipelines_are_reproducible_and_resume_at_any_epoch(mnist_slice):
  x_train, _ = mnist_slice
  steps = data.steps_per_epoch(len(x_train), 300)
  assert steps == 3
  a = [b.numpy() for b in data.train_pipeline(x_train, 300, seed=4, dynamic_binarization=True,
                                              num_epochs=3)]
  b = [b.numpy() for b in data.train_pipeline(x_train, 300, seed=4, dynamic_binarization=True,
                                              num_epochs=3)]
  resumed = [b.numpy() for b in data.train_pipeline(x_train, 300, seed=4,
                                                    dynamic_binarization=True, first_epoch=2,
                                                    num_epochs=3)]
  assert [x.shape[0] for x in a] == [300, 300, 300] * 3
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(a[2 * steps:], resumed, strict=True):
    np.testing.assert_array_equal(x, y)


def test_an_epoch_transform_sees_each_epoch_alone(mnist_slice):
  # tfvae.runtime groups an epoch's batches into blocks: 10 batches in blocks of 4, 4 and 2.
  x_train, _ = mnist_slice  # 1000 images: 10 batches of 100 an epoch
  batches = [b.numpy() for b in data.train_pipeline(x_train, 100, seed=2,
                                                    dynamic_binarization=True, num_epochs=2)]
  blocks = [b.numpy() for b in data.train_pipeline(
      x_train, 100, seed=2, dynamic_binarization=True, num_epochs=2,
      epoch_transform=lambda epoch: epoch.batch(4))]
  assert [len(b) for b in blocks] == [4, 4, 2] * 2
  np.testing.assert_array_equal(np.concatenate(blocks), np.stack(batches))


def test_test_sets_are_binarized_once_with_a_fixed_seed(mnist_slice):
  _, x_test = mnist_slice
  first = data.eval_arrays(x_test, bernoulli=True, binary=False)
  np.testing.assert_array_equal(first, data.eval_arrays(x_test, bernoulli=True, binary=False))
  assert first.dtype == np.uint8 and set(np.unique(first)) == {0, 255}
  # The same draws as binarize, which gives float 0/1.
  np.testing.assert_array_equal(first / 255, data.binarize(x_test))
  # x ~ Bernoulli(pixel / 255): the same draws from uint8 pixels and from the floats the
  # model sees for them.
  as_floats = data.to_unit_float(x_test).numpy()
  np.testing.assert_array_equal(first / 255, data.eval_arrays(as_floats, True, False))
  grey = data.eval_arrays(x_test, bernoulli=False, binary=False)
  assert grey is x_test  # kept as uint8 0..255; the model scales it
  batches = list(data.eval_pipeline(first, 64))
  np.testing.assert_array_equal(tf.concat(batches, 0).numpy(), first)
