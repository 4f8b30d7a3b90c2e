"""Data sources: one record per source, their canonical files, checksums and parsers.

Every source loads into a `Dataset`: splits of uint8 (grey levels 0..255) or float32 (in
[0, 1]) images shaped [N, H, W, C], or float32 vectors [N, D]. The canonical sets' files are
looked up in <data_dir>/<source>/<canonical name>, data_dir being the argument, else
$TFVAE_DATA_DIR, else the Keras cache (~/.keras/datasets). A missing file is downloaded from its
canonical URL; a file whose sha256 differs from the canonical one is never parsed. A user's own
data (npz:, csv:, folder:) is read where the path says; tfds: from TFDS's data folder.

Adding a source is one `Source` record in SOURCES (plus its loader here and its tests).
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
from collections.abc import Callable

import numpy as np

from tfvae.data import splits
from tfvae.data.checks import DataError, check_examples, is_binary

_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_FREY_FACE_URL = "https://cs.nyu.edu/~roweis/data/"

_FREY_FACE_ARRAY_SHA256 = "fbd70c2c992104024a20f4d253da1a1132eb6bf8ed142dccbe7d2b1743b705c4"
_FREY_FACE_TEST_FRACTION = 0.1



@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's splits: images [N, H, W, C] (uint8 0..255 or float32 in [0, 1]) or vectors
  [N, D] (float32, any real values).

  Arrays given for train, test or validation are wrapped in tfvae.data.splits.ArraySplit;
  folders and TFDS give splits streamed from disk.

  Attributes:
    name: the dataset's name ("mnist", ..., "npz:PATH").
    train, test: the splits (Split objects, or numpy arrays).
    binary: True when every value is already 0 or 1 (no binarization needed).
    validation: examples held out from training for model selection; None when no validation
      split is settled yet (see `with_validation`).
    validation_settled: `with_validation` has run (validation may still be None: none wanted).
    default_validation: how many training examples `with_validation` holds out by default;
      None means 10%, at most 10,000.
  """

  name: str
  train: splits.Split
  test: splits.Split
  binary: bool
  validation: splits.Split | None = None
  validation_settled: bool = False
  default_validation: int | None = None

  def __post_init__(self):
    for field in ("train", "test", "validation"):
      value = getattr(self, field)
      if value is not None:
        object.__setattr__(self, field, splits.as_split(value))

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of an image, or (D,) of a vector."""
    return tuple(self.train.shape)

  @property
  def vectors(self) -> bool:
    return len(self.image_shape) == 1

  @property
  def x_train(self) -> np.ndarray:
    return splits.require_array(self.train, f"{self.name}'s training split")

  @property
  def x_test(self) -> np.ndarray:
    return splits.require_array(self.test, f"{self.name}'s test split")

  @property
  def x_valid(self) -> np.ndarray | None:
    if self.validation is None:
      return None
    return splits.require_array(self.validation, f"{self.name}'s validation split")


DEFAULT_VALIDATION_FRACTION, MAX_DEFAULT_VALIDATION = 0.1, 10_000


def with_validation(dataset: Dataset, validation_examples: int | None = None) -> Dataset:
  """The dataset with its validation split settled: examples held out from training.

  A source's own validation split (binarized MNIST's, a folder's valid/, a TFDS validation
  split, an npz's x_valid) is used, cut to validation_examples; otherwise validation_examples
  training examples are held out, the same ones for every run (tfvae.data.splits.HOLDOUT_SEED).

  Args:
    dataset: the data.
    validation_examples: how many; None means the source's default (its own split, else
      dataset.default_validation, else 10% of the training examples, at most 10,000); 0
      means none.

  Raises:
    DataError: so many that no training examples would be left.
  """
  if dataset.validation_settled:
    return dataset
  validation, train = dataset.validation, dataset.train
  if validation_examples == 0:
    validation = None
  elif validation is not None:
    if validation_examples is not None and validation_examples < validation.count:
      validation = validation.take(validation_examples)
  else:
    count = validation_examples
    if count is None:
      count = dataset.default_validation
    if count is None:
      count = min(MAX_DEFAULT_VALIDATION, int(round(train.count * DEFAULT_VALIDATION_FRACTION)))
    if count >= train.count:
      raise DataError(f"{dataset.name}: validation_examples={count} would leave none of its"
                      f" {train.count} training examples; pass a smaller --validation_examples"
                      f" (0 for none)")
    train, validation = train.holdout(count) if count else (train, None)
  return dataclasses.replace(dataset, train=train, validation=validation,
                             validation_settled=True)


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
  source = SOURCES[dataset]
  expected = source.files[filename]
  if not path.exists():
    import keras  # Only needed to download.
    try:
      keras.utils.get_file(fname=filename, origin=source.url + filename, file_hash=expected,
                           hash_algorithm="sha256", cache_dir=str(root), cache_subdir=dataset)
    except Exception as e:  # noqa: BLE001 -- network, permission and hash errors alike.
      raise DataError(f"{path}: missing and could not be downloaded from {source.url}"
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


# ---- loaders: (data_dir, argument, image_size) -> Dataset ------------------------------------

def _parsed(dataset, parse, filename, data_dir):
  path = fetch(dataset, filename, data_dir)
  return parse(path.read_bytes(), str(path))


def _load_mnist(data_dir, argument, image_size):
  del argument, image_size
  return Dataset("mnist", _parsed("mnist", parse_idx_images, "train-images-idx3-ubyte.gz",
                                  data_dir),
                 _parsed("mnist", parse_idx_images, "t10k-images-idx3-ubyte.gz", data_dir),
                 binary=False, default_validation=10_000)


def _load_binarized_mnist(data_dir, argument, image_size):
  del argument, image_size
  files = ("train", "test", "valid")
  train, test, valid = (_parsed("binarized_mnist", parse_amat,
                                f"binarized_mnist_{split}.amat", data_dir) for split in files)
  return Dataset("binarized_mnist", train, test, binary=True, validation=valid)


def _load_frey_face(data_dir, argument, image_size):
  del argument, image_size
  images = _parsed("frey_face", parse_frey_face, "frey_rawface.mat", data_dir)  # [1965, 28, 20, 1]
  order = np.random.default_rng(0).permutation(len(images))
  num_test = int(round(len(images) * _FREY_FACE_TEST_FRACTION))
  return Dataset("frey_face", images[order[num_test:]], images[order[:num_test]], binary=False)


def memory_budget() -> int:
  """Bytes one array of a user's file may take: half the memory available now."""
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024 // 2
  except (OSError, ValueError, IndexError):
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def check_npz_members(path: str, names=("x_train", "x_test"), budget: int | None = None) -> None:
  """Reads only the .npy headers of an npz's arrays and checks what they declare.

  An npz is a zip: a small file can declare gigabytes. Each array's declared size must agree
  with its member's uncompressed size and fit in the memory budget, before any is read.

  Raises:
    DataError: not a zip of .npy arrays, a missing array, or a size that disagrees or is too
      large.
  """
  import zipfile
  budget = memory_budget() if budget is None else budget
  fix = "save it with np.savez(path, x_train=..., x_test=...)"
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise DataError(f"{path}: not an .npz archive ({e}); {fix}") from e
  with archive:
    members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    missing = [name for name in names if name not in members]
    if missing:
      raise DataError(f"{path}: no array {' or '.join(missing)} (found {sorted(members)}); {fix}")
    for name in names:
      info = members[name]
      try:
        with archive.open(info) as member:
          version = np.lib.format.read_magic(member)
          read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                         (2, 0): np.lib.format.read_array_header_2_0}.get(version)
          if read_header is None:
            raise ValueError(f".npy format version {version}")
          shape, _, dtype = read_header(member)
          header = member.tell()
      except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}:{name} is not a readable .npy array ({e}); {fix}") from e
      if dtype.hasobject:
        raise DataError(f"{path}:{name} holds Python objects ({dtype}); tfvae reads numbers only:"
                        f" save uint8 or float arrays")
      declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if header + declared != info.file_size:
        raise DataError(f"{path}:{name} declares {shape} {dtype} ({declared:,} bytes) but holds"
                        f" {info.file_size - header:,}; the file is truncated or corrupt")
      if declared > budget:
        raise DataError(f"{path}:{name} declares {shape} {dtype}, {declared / 2**30:.1f} GiB,"
                        f" more than the {budget / 2**30:.1f} GiB it may use here (half the"
                        f" memory available); use a smaller file, e.g. --max_examples on a"
                        f" subset saved as its own npz")


def _load_npz(data_dir, path: str, image_size):
  del data_dir  # a user's own file
  if image_size is not None:
    raise DataError(f"--image_size applies to folder: and tfds: images; resize the arrays of"
                    f" {path} before saving them")
  if not pathlib.Path(path).is_file():
    raise DataError(f"{path}: no such file; pass --dataset=npz:PATH with the path of an .npz"
                    f" holding x_train and x_test")
  check_npz_members(path)
  try:
    with np.load(path, allow_pickle=False) as contents:
      valid_name = next((name for name in _NPZ_VALIDATION_NAMES if name in contents.files), None)
      if valid_name:
        check_npz_members(path, (valid_name,))
      arrays = {name: check_examples(contents[name], f"{path}:{name}")
                for name in ("x_train", "x_test", valid_name) if name}
  except (OSError, ValueError, EOFError, zlib.error) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  shape = arrays["x_train"].shape[1:]
  for name, array in arrays.items():
    if array.shape[1:] != shape:
      raise DataError(f"{path}: x_train examples are {shape} but {name}'s are"
                      f" {array.shape[1:]}; they must match")
  return Dataset(f"npz:{path}", arrays["x_train"], arrays["x_test"],
                 binary=all(is_binary(a) for a in arrays.values()),
                 validation=arrays.get(valid_name))


_NPZ_VALIDATION_NAMES = ("x_valid", "x_val", "x_validation")


def _load_csv(data_dir, path: str, image_size):
  from tfvae.data import tabular  # here: only csv needs it
  del data_dir
  if image_size is not None:
    raise DataError("--image_size applies to folder: and tfds: images, not to csv: vectors")
  vectors = tabular.read_csv(path, budget=memory_budget())
  train, test = splits.hold_out_test(splits.ArraySplit(vectors), path, "use at least 10 rows")
  return Dataset(f"csv:{path}", train, test, binary=is_binary(vectors))


def _load_folder(data_dir, path: str, image_size):
  from tfvae.data import folders  # here: only folders need it
  del data_dir
  return folders.load(path, image_size)


def _load_tfds(data_dir, argument: str, image_size):
  from tfvae.data import tfds_source  # here: tensorflow_datasets is optional
  return tfds_source.load(argument, data_dir, image_size)


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source: what --dataset names, where its files come from, how it loads.

  Attributes:
    name: the --dataset value, or its prefix before ":" for sources that take an argument.
    load: (data_dir, argument, image_size) -> Dataset; argument is what follows "name:",
      image_size (H, W) or None.
    files: canonical file name -> sha256 (None where the decoded contents are checked).
    url: where missing files are downloaded from.
    argument: what follows "name:" (e.g. "PATH"), for sources that take one.
    summary: one line for --help.
  """

  name: str
  load: Callable[[str | None, str | None, tuple[int, int] | None], Dataset]
  files: dict[str, str | None] = dataclasses.field(default_factory=dict)
  url: str | None = None
  argument: str | None = None
  summary: str = ""


SOURCES = {record.name: record for record in (
    Source("mnist", _load_mnist, url=_MNIST_URL, summary="MNIST digits, 60k/10k, grey levels",
           files={
               "train-images-idx3-ubyte.gz":
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
               "t10k-images-idx3-ubyte.gz":
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
           }),
    Source("binarized_mnist", _load_binarized_mnist, url=_BINARIZED_MNIST_URL,
           summary="the fixed binarization of MNIST, 50k/10k/10k", files={
               "binarized_mnist_train.amat":
                   "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
               "binarized_mnist_valid.amat":
                   "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
               "binarized_mnist_test.amat":
                   "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
           }),
    # .mat files differ byte-wise between faithful encoders: the decoded `ff` is checked instead.
    Source("frey_face", _load_frey_face, url=_FREY_FACE_URL, files={"frey_rawface.mat": None},
           summary="1965 faces of 28x20, a fixed 90/10 split"),
    Source("npz", _load_npz, argument="PATH",
           summary="your arrays x_train, x_test (and x_valid): images, uint8 0..255 or float"
                   " in [0, 1], or real vectors [N, D]"),
    Source("csv", _load_csv, argument="PATH",
           summary="numeric columns (header optional), one vector per row; 10% held out as"
                   " test"),
    Source("folder", _load_folder, argument="PATH",
           summary="image files (PNG, JPEG, BMP, GIF) below PATH; train/ and test/ if there,"
                   " else 10% held out as test"),
    Source("tfds", _load_tfds, argument="NAME[:CONFIG]",
           summary="a TensorFlow Datasets dataset already prepared under --data_dir"),
)}


def names() -> list[str]:
  """The --dataset values, e.g. ["mnist", ..., "npz:PATH"]."""
  return [f"{s.name}:{s.argument}" if s.argument else s.name for s in SOURCES.values()]


def parse(name: str) -> tuple[Source, str | None]:
  """--dataset -> (its Source, the argument after ":" or None).

  Raises:
    DataError: an unknown source, or a missing or stray argument.
  """
  prefix, colon, argument = name.partition(":")
  source = SOURCES.get(prefix)
  if source is None:
    raise DataError(f"unknown dataset {name!r}; use one of {', '.join(names())}")
  if source.argument and not argument:
    raise DataError(f"dataset={name!r} needs a {source.argument}: --dataset={source.name}:"
                    f"{source.argument}")
  if not source.argument and colon:
    raise DataError(f"dataset={name!r}: {source.name} takes no argument; use {source.name}")
  return source, argument or None


def load(name: str, data_dir=None, max_examples: int | None = None,
         validation_examples: int | None = None,
         image_size: tuple[int, int] | None = None) -> Dataset:
  """Loads a dataset by its --dataset name, with its validation split settled.

  Args:
    name: the dataset: a name in SOURCES, or "source:ARGUMENT" (npz:PATH, csv:PATH,
      folder:PATH, tfds:NAME[:CONFIG]).
    data_dir: see `resolve_data_dir`.
    max_examples: keep only the first max_examples training examples (after the validation
      examples are held out).
    validation_examples: see `with_validation`.
    image_size: (H, W) to resize folder and TFDS images to.

  Raises:
    DataError: an unknown name, a missing, corrupt or non-canonical file, or bad arrays.
  """
  source, argument = parse(name)
  dataset = source.load(data_dir, argument, tuple(image_size) if image_size else None)
  dataset = with_validation(dataset, validation_examples)
  if max_examples is not None:
    dataset = dataclasses.replace(dataset, train=dataset.train.take(max_examples))
  return dataset


def default_model_name(name: str) -> str:
  """The model name a --dataset value gives by default, e.g. "mnist_vae", "faces_1a2b3c_vae".

  A file or folder's own name, with a digest of its absolute path so two different files of
  the same name never share a workdir or an export folder; a TFDS dataset's name and config.
  """
  source, argument = parse(name)
  if argument is None:
    return f"{source.name}_vae"
  if source.name == "tfds":
    stem = argument.replace(":", "_").replace("/", "_")
    return f"{_safe(stem)}_vae"
  path = pathlib.Path(argument).expanduser().resolve()
  stem = path.stem if path.suffix in (".npz", ".csv") else path.name
  digest = hashlib.sha256(str(path).encode()).hexdigest()[:6]
  return f"{_safe(stem)}_{digest}_vae"


def _safe(text: str) -> str:
  """text with anything but letters, digits, '.', '-' and '_' replaced by '_'."""
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in text) or "data"
