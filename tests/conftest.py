"""Shared fixtures: the data folder, a small real MNIST slice, toy datasets, a tiny model config."""

import os
import pathlib
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402

# float32 is float32 in the tests on any machine. On a recent NVIDIA GPU TensorFlow multiplies
# float32 matrices in TensorFloat-32 by default (a 10-bit mantissa: about 3e-4 relative error
# per product on an H100), past the tolerances at which tests compare two float32 computations.
tf.config.experimental.enable_tensor_float_32_execution(False)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """$TFVAE_DATA_DIR, else ../shared/data beside the checkout, else the Keras cache.

  tfvae.data downloads whatever is missing from the canonical URLs.
  """
  from tfvae import data
  candidates = [os.environ.get("TFVAE_DATA_DIR"), ROOT.parent / "shared" / "data"]
  for candidate in candidates:
    if candidate and (pathlib.Path(candidate) / "mnist").is_dir():
      return pathlib.Path(candidate)
  return data.resolve_data_dir(None)


@pytest.fixture(scope="session")
def mnist(data_dir):
  from tfvae import data
  return data.load("mnist", data_dir)


@pytest.fixture(scope="session")
def mnist_slice(mnist):
  """1000 training and 200 test images of real MNIST, uint8 [N, 28, 28, 1]."""
  return mnist.x_train[:1000], mnist.x_test[:200]


@pytest.fixture
def small_config():
  from tfvae import ModelConfig
  return ModelConfig(latent_size=4, hidden_sizes=(32,))


@pytest.fixture
def binary_batch():
  rng = np.random.default_rng(0)
  return (rng.random((8, 28, 28, 1)) < 0.3).astype(np.float32)


@pytest.fixture
def toy_dataset():
  """make(seed, num_train, num_test): a Dataset of random uint8 [N, 8, 8, 1] images."""
  from tfvae import data

  def make(seed: int, num_train: int, num_test: int):
    rng = np.random.default_rng(seed)
    return data.Dataset("npz:toy", rng.integers(0, 256, (num_train, 8, 8, 1), dtype=np.uint8),
                        rng.integers(0, 256, (num_test, 8, 8, 1), dtype=np.uint8), False)
  return make


@pytest.fixture(scope="session")
def cifar_jpegs(data_dir):
  """(train [2000, 32, 32, 3], test [200, 32, 32, 3]) uint8: real CIFAR-10 JPEGs of every class,
  decoded with PIL."""
  from PIL import Image
  folder = data_dir / "cifar10-jpeg"
  if not folder.is_dir():
    pytest.skip(f"no {folder}")

  def decode(split, per_class):
    paths = [path for klass in sorted((folder / split).iterdir())
             for path in sorted(klass.glob("*.jpg"))[:per_class]]
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
  return decode("train", 200), decode("test", 20)
