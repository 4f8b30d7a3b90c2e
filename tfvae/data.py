"""Datasets: canonical files, checksums, parsing, and tf.data pipelines.

Every dataset becomes a `Dataset` of uint8 (grey levels 0..255) or float32 (in [0, 1]) images
shaped [N, H, W, C]. The pipelines turn them into float32 batches in [0, 1]; for the Bernoulli
likelihood, grey-level training images are binarized afresh each epoch, x ~ Bernoulli(pixel),
and test images once with a fixed seed, so test numbers are comparable across runs.

Files are looked up in <data_dir>/<dataset>/<canonical name>, data_dir being the argument, else
$TFVAE_DATA_DIR, else the Keras cache (~/.keras/datasets). A missing file is downloaded from its
canonical URL; a file whose sha256 differs from the canonical one is never parsed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import struct
import zlib

import numpy as np
import tensorflow as tf

# Binarization seed of fixed (test) sets; a constant so every run scores the same test bits.
TEST_BINARIZATION_SEED = 1312_6114


def available_cores() -> int:
  """The CPU cores this process may run on (its affinity; all of the machine's elsewhere)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# Threads that make training batches, in order. Binarizing a batch of 100 MNIST images takes
# about 0.4 ms of one CPU core; on one H100 a training step of the paper's MLP took 0.2 ms.
_PIPELINE_THREADS = min(8, available_cores())

_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_FREY_FACE_URL = "https://cs.nyu.edu/~roweis/data/"

# dataset -> canonical file name -> (sha256 of the file, or None when checked after decoding).
_FILES = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    },
    "binarized_mnist": {
        "binarized_mnist_train.amat":
            "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
        "binarized_mnist_valid.amat":
            "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
        "binarized_mnist_test.amat":
            "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    },
    # .mat files differ byte-wise between faithful encoders: check the decoded `ff` instead.
    "frey_face": {"frey_rawface.mat": None},
}
_URLS = {"mnist": _MNIST_URL, "binarized_mnist": _BINARIZED_MNIST_URL,
         "frey_face": _FREY_FACE_URL}
_FREY_FACE_ARRAY_SHA256 = "fbd70c2c992104024a20f4d253da1a1132eb6bf8ed142dccbe7d2b1743b705c4"
_FREY_FACE_TEST_FRACTION = 0.1


class DataError(ValueError):
  """A data file or array that cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train/test pair of images, [N, H, W, C], uint8 0..255 or float32 in [0, 1].

  Attributes:
    name: the dataset's name ("mnist", ..., "npz:PATH").
    x_train, x_test: the images.
    binary: True when every pixel is already 0 or 1 (no binarization needed).
  """

  name: str
  x_train: np.ndarray
  x_test: np.ndarray
  binary: bool

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])


# ---- locating and verifying files -----------------------------------------------------------

def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """--data_dir, else $TFVAE_DATA_DIR, else the Keras cache (~/.keras/datasets)."""
  if data_dir:
    return pathlib.Path(data_dir).expanduser()
  if os.environ.get("TFVAE_DATA_DIR"):
    return pathlib.Path(os.environ["TFVAE_DATA_DIR"]).expanduser()
  return pathlib.Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets"


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fetch(dataset: str, filename: str, data_dir=None) -> pathlib.Path:
  """Returns the verified path of a canonical file, downloading it when missing.

  Raises:
    DataError: the file's sha256 differs from the canonical one, or it cannot be downloaded.
  """
  root = resolve_data_dir(data_dir)
  path = root / dataset / filename
  expected = _FILES[dataset][filename]
  if not path.exists():
    import keras  # Only needed to download.
    try:
      keras.utils.get_file(fname=filename, origin=_URLS[dataset] + filename, file_hash=expected,
                           hash_algorithm="sha256", cache_dir=str(root), cache_subdir=dataset)
    except Exception as e:  # noqa: BLE001 -- network, permission and hash errors alike.
      raise DataError(f"{path}: missing and could not be downloaded from {_URLS[dataset]}"
                      f"{filename} ({e}); put the file there or pass --data_dir") from e
  if expected is not None:
    actual = sha256_of(path)
    if actual != expected:
      raise DataError(f"{path}: sha256 {actual}, expected {expected}; the file is corrupt or"
                      f" not the canonical one: delete it to download it again, or pass"
                      f" --data_dir")
  return path


# ---- parsers ---------------------------------------------------------------------------------

def parse_idx_images(raw: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes a (gzipped) IDX3 image file into uint8 [N, rows, cols, 1].

  Raises:
    DataError: not gzip, a wrong magic number, or a size that disagrees with the header.
  """
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{source}: corrupt or truncated gzip ({e}); delete it to download it"
                      f" again") from e
  if len(raw) < 16:
    raise DataError(f"{source}: {len(raw)} bytes is too short for an IDX image header")
  magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
  if magic != 0x00000803:
    raise DataError(f"{source}: IDX magic number {magic:#010x}, expected 0x00000803 (unsigned"
                    f" bytes, 3 dimensions); this is not an MNIST image file")
  expected = count * rows * cols
  if len(raw) - 16 != expected or expected == 0:
    raise DataError(f"{source}: header says {count} images of {rows}x{cols} ({expected} bytes)"
                    f" but {len(raw) - 16} bytes follow; the file is truncated or corrupt")
  return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols, 1)


def parse_amat(raw: bytes, source: str = "<bytes>", image_shape=(28, 28)) -> np.ndarray:
  """Decodes a binarized-MNIST .amat file (one image of 0/1 per line): uint8 [N, 28, 28, 1].

  Pixels come back as 0 and 255, tfvae's uint8 convention (0..255; see `to_unit_float`).
  """
  size = image_shape[0] * image_shape[1]
  values = np.frombuffer(raw, np.uint8)
  # Fast path: the canonical layout is one digit and one separator per pixel.
  if (len(raw) % (2 * size) == 0 and len(raw) > 0
      and np.all((values[1::2] == ord(" ")) | (values[1::2] == ord("\n")))):
    digits = values[0::2] - ord("0")
  else:
    try:
      digits = np.array([int(token) for token in raw.split()], dtype=np.int64)
    except ValueError as e:
      raise DataError(f"{source}: not an .amat file of 0/1 pixels ({e})") from e
  if digits.size == 0 or digits.size % size:
    raise DataError(f"{source}: {digits.size} pixels is not a positive multiple of {size}"
                    f" ({image_shape[0]}x{image_shape[1]} images); the file is truncated")
  if np.any((digits != 0) & (digits != 1)):
    raise DataError(f"{source}: pixels other than 0 and 1; this is not binarized MNIST")
  return (digits.astype(np.uint8) * np.uint8(255)).reshape(-1, *image_shape, 1)


def parse_frey_face(raw: bytes, source: str = "<bytes>", check_sha256: bool = True) -> np.ndarray:
  """Decodes frey_rawface.mat into uint8 [1965, 28, 20, 1] (images are ff.T.reshape(-1, 28, 20))."""
  import scipy.io
  try:
    contents = scipy.io.loadmat(io.BytesIO(raw))
  except Exception as e:  # noqa: BLE001 -- scipy raises many types for bad files.
    raise DataError(f"{source}: not a readable .mat file ({type(e).__name__}: {e}); delete it to"
                    f" download it again") from e
  if "ff" not in contents:
    raise DataError(f"{source}: no variable `ff` in the .mat file (found"
                    f" {sorted(k for k in contents if not k.startswith('__'))}); this is not"
                    f" frey_rawface.mat")
  ff = np.ascontiguousarray(contents["ff"])
  if ff.dtype != np.uint8 or ff.ndim != 2 or ff.shape[0] != 28 * 20:
    raise DataError(f"{source}: `ff` is {ff.dtype} {ff.shape}, expected uint8 (560, N)")
  if check_sha256:
    actual = hashlib.sha256(ff.tobytes()).hexdigest()
    if actual != _FREY_FACE_ARRAY_SHA256:
      raise DataError(f"{source}: decoded `ff` has sha256 {actual}, expected"
                      f" {_FREY_FACE_ARRAY_SHA256}; delete the file to download it again")
  return ff.T.reshape(-1, 28, 20, 1)


def check_images(x, source: str) -> np.ndarray:
  """Validates a user's image array and returns it as [N, H, W, C] uint8 or float32.

  Raises:
    DataError: empty, wrong rank, non-numeric, NaN/Inf, or floats outside [0, 1].
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., np.newaxis]
  if x.ndim != 4:
    raise DataError(f"{source}: shape {x.shape}; expected [N, H, W] or [N, H, W, C] images")
  if x.shape[0] == 0 or 0 in x.shape:
    raise DataError(f"{source}: shape {x.shape} holds no images")
  if x.dtype == np.uint8:
    if x.max() == 1:
      raise DataError(f"{source}: uint8 pixels are only 0 and 1, but tfvae reads uint8 as 0..255"
                      f" (1 would be almost black); multiply by 255, or pass floats in [0, 1]")
    return x
  if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
    raise DataError(f"{source}: dtype {x.dtype}; expected uint8 in 0..255 or floats in [0, 1]")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise DataError(f"{source}: {np.size(x) - np.isfinite(x).sum()} NaN or Inf pixels; clean"
                    f" the data first")
  if x.min() < 0 or x.max() > 1:
    raise DataError(f"{source}: values in [{x.min():g}, {x.max():g}]; expected uint8 0..255 or"
                    f" floats in [0, 1] (divide by 255?)")
  return x


def _is_binary(x: np.ndarray) -> bool:
  """Every pixel black or white: 0 or 255 for uint8, 0 or 1 for floats."""
  white = 255 if x.dtype == np.uint8 else 1
  return bool(np.all((x == 0) | (x == white)))


# ---- datasets --------------------------------------------------------------------------------

def _load_mnist(data_dir):
  train, test = (parse_idx_images(p.read_bytes(), str(p)) for p in (
      fetch("mnist", "train-images-idx3-ubyte.gz", data_dir),
      fetch("mnist", "t10k-images-idx3-ubyte.gz", data_dir)))
  return train, test, False


def _load_binarized_mnist(data_dir):
  train, test = (parse_amat(p.read_bytes(), str(p)) for p in (
      fetch("binarized_mnist", "binarized_mnist_train.amat", data_dir),
      fetch("binarized_mnist", "binarized_mnist_test.amat", data_dir)))
  return train, test, True


def _load_frey_face(data_dir):
  path = fetch("frey_face", "frey_rawface.mat", data_dir)
  images = parse_frey_face(path.read_bytes(), str(path))  # [1965, 28, 20, 1]
  order = np.random.default_rng(0).permutation(len(images))
  num_test = int(round(len(images) * _FREY_FACE_TEST_FRACTION))
  return images[order[num_test:]], images[order[:num_test]], False


def _load_npz(path: str):
  try:
    with np.load(path, allow_pickle=False) as contents:
      missing = [k for k in ("x_train", "x_test") if k not in contents]
      if missing:
        raise DataError(f"{path}: no array {' or '.join(missing)} (found {sorted(contents)});"
                        f" save x_train and x_test, e.g. np.savez(path, x_train=..., x_test=...)")
      train = check_images(contents["x_train"], f"{path}:x_train")
      test = check_images(contents["x_test"], f"{path}:x_test")
  except (OSError, ValueError, zlib.error) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: not a readable .npz file ({e})") from e
  if train.shape[1:] != test.shape[1:]:
    raise DataError(f"{path}: x_train images are {train.shape[1:]} but x_test images are"
                    f" {test.shape[1:]}; they must match")
  return train, test, _is_binary(train) and _is_binary(test)


def load(name: str, data_dir=None, max_examples: int | None = None) -> Dataset:
  """Loads a dataset by name: mnist, binarized_mnist, frey_face, or npz:PATH.

  Args:
    name: the dataset.
    data_dir: see `resolve_data_dir`.
    max_examples: keep only the first max_examples training images.

  Raises:
    DataError: an unknown name, a missing, corrupt or non-canonical file, or bad arrays.
  """
  if name.startswith("npz:"):
    train, test, binary = _load_npz(name[len("npz:"):])
  elif name == "mnist":
    train, test, binary = _load_mnist(data_dir)
  elif name == "binarized_mnist":
    train, test, binary = _load_binarized_mnist(data_dir)
  elif name == "frey_face":
    train, test, binary = _load_frey_face(data_dir)
  else:
    raise DataError(f"unknown dataset {name!r}; use mnist, binarized_mnist, frey_face or npz:PATH")
  if max_examples is not None:
    train = train[:max_examples]
  return Dataset(name=name, x_train=train, x_test=test, binary=binary)


# ---- pipelines -------------------------------------------------------------------------------

def to_unit_float(images) -> tf.Tensor:
  """uint8 0..255 -> float32 /255; floats pass through as float32."""
  images = tf.convert_to_tensor(images)
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) / 255.0
  return tf.cast(images, tf.float32)


def _bernoulli_draws(images: np.ndarray, seed: int) -> np.ndarray:
  """x ~ Bernoulli(pixel) with a fixed seed: a bool array shaped like images.

  numpy only, so that it runs before TensorFlow is set up (threads are fixed by its first op)
  and its float32 temporaries go back to the system (TensorFlow's allocator kept 60 MiB of them
  for the MNIST test set); pixel / 255 in float32 is bit for bit what `to_unit_float` computes.
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
                   steps_per_block: int = 1) -> tf.data.Dataset:
  """Training batches [M, H, W, C] or blocks of them, epoch after epoch, as the model takes them.

  Batches keep the images' dtype, uint8 0..255 or float32 in [0, 1] (the VAE scales uint8
  itself, inside its step, so the pipeline moves a quarter of the bytes); dynamic binarization
  gives 0 and 255 (uint8) or 0 and 1 (floats).

  Each epoch is `steps_per_epoch(N, M)` = N // M full batches of a fresh permutation, so every
  batch has the static shape [M, H, W, C] (all N images in one batch if N < M). The N mod M
  images left over differ from epoch to epoch: each image is used with the same probability and
  every minibatch is an unbiased estimate of the dataset's bound. A static batch size lets
  TensorFlow plan the training step once: a step traced for an unknown batch size ran about
  20% slower on a 2-core CPU (docs/BENCHMARKS.md).

  Epoch e's order (and, with dynamic binarization, its Bernoulli draws x ~ Bernoulli(pixel))
  depend only on (seed, e), so a run resumed at epoch e sees exactly the batches an
  uninterrupted run would. The stream is endless unless num_epochs is given, so pass
  steps_per_epoch to Keras fit (divided by steps_per_block), and shuffle=False: the order is
  the pipeline's (Keras ignores its own shuffle for a dataset, with a warning).

  With steps_per_block = K > 1, each element is a block [K, M, H, W, C] of K consecutive
  batches, the same batches in the same order, for VAE.train_step to take K optimizer steps
  on in one call: fetching one element per step from a tf.data iterator cost about 15% of the
  training speed of the 784-400-20 VAE on a 2-core CPU (docs/BENCHMARKS.md). K must divide
  the epoch's steps.

  Args:
    images: [N, H, W, C] uint8 or float32.
    batch_size: M.
    seed: seeds the order and the binarization.
    dynamic_binarization: draw binary images afresh each epoch.
    first_epoch: the epoch to start at (a resumed run's initial epoch).
    num_epochs: stop before this epoch; None repeats forever.
    steps_per_block: K, batches per element; 1 yields the batches themselves.

  Raises:
    ValueError: steps_per_block is not a divisor of the epoch's steps.
  """
  stored = tf.constant(images)
  count = int(images.shape[0])
  size = min(batch_size, count)  # the static batch size
  num_batches = steps_per_epoch(count, batch_size)
  if steps_per_block < 1 or num_batches % steps_per_block:
    raise ValueError(f"steps_per_block={steps_per_block} does not divide the {num_batches}"
                     f" batches of {size} in an epoch of {count} images; pick a divisor of"
                     f" {num_batches} (tfvae.training.choose_steps_per_execution finds one)")
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

    # On parallel threads: one core binarizes fewer images/s than a GPU trains on (BENCHMARKS.md).
    batches = tf.data.Dataset.range(num_batches).map(
        load_batch, num_parallel_calls=_PIPELINE_THREADS, deterministic=True)
    # [K, M, H, W, C]; K divides the epoch, so no block spans two epochs and none is short
    # (drop_remainder only makes K static).
    return (batches if steps_per_block == 1
            else batches.batch(steps_per_block, drop_remainder=True))

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


def eval_pipeline(images: np.ndarray, batch_size: int,
                  steps_per_block: int = 1) -> tf.data.Dataset:
  """Images from `eval_arrays` (uint8 or float32) -> unshuffled batches of the same dtype.

  With steps_per_block = K > 1, elements are blocks of batches for VAE.test_step, as
  train_pipeline's are for train_step: the N // M full batches in blocks [K, M, H, W, C] (the
  last may hold fewer), then the N mod M images left over as one block [1, N mod M, H, W, C].
  """
  if steps_per_block == 1:
    batches = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  else:
    full = len(images) // batch_size * batch_size
    batches = tf.data.Dataset.from_tensor_slices(
        images[:full].reshape(-1, batch_size, *images.shape[1:])  # [N // M, M, H, W, C]
    ).batch(steps_per_block)
    if full < len(images):
      batches = batches.concatenate(
          tf.data.Dataset.from_tensors(images[np.newaxis, full:]))  # [1, N mod M, H, W, C]
  return batches.prefetch(2).with_options(_dataset_options())
