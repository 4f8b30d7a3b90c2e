"""TensorFlow Datasets already prepared on disk, read as streamed splits of uint8 images.

--dataset=tfds:NAME[:CONFIG] opens the prepared folder <root>/<NAME>[/<CONFIG>]/<version>/ (the
highest version holding dataset_info.json) with tfds.builder_from_directory: neither the
dataset's code nor a download is needed, and none is ever made. root is --data_dir, else
$TFDS_DATA_DIR, else ~/tensorflow_datasets. Only the image feature is read; labels and other
features are ignored. tensorflow_datasets is optional and imported only when a tfds: dataset
is loaded.
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import tensorflow as tf

from tfvae.data import splits
from tfvae.data.checks import CHANNELS, DataError

VALIDATION_SPLITS = ("validation", "valid", "val")

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _import_tfds():
  """tensorflow_datasets; DataError where it is not installed."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"--dataset=tfds:... needs TensorFlow Datasets ({e}); pip install"
                    f" tensorflow-datasets") from e
  return tfds


def resolve_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """TFDS's data folder: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return pathlib.Path(data_dir).expanduser()
  if os.environ.get("TFDS_DATA_DIR"):
    return pathlib.Path(os.environ["TFDS_DATA_DIR"]).expanduser()
  return pathlib.Path("~/tensorflow_datasets").expanduser()


def parse(argument: str) -> tuple[str, str | None]:
  """"NAME" or "NAME:CONFIG" (or TFDS's own "NAME/CONFIG") -> (NAME, CONFIG or None).

  Raises:
    DataError: an empty name or config, more than one config, or a name that is no folder name.
  """
  parts = re.split(r"[:/]", argument)
  if len(parts) > 2 or not all(parts) or not all(_NAME.fullmatch(p) and p.strip(".")
                                                 for p in parts):
    raise DataError(f"tfds:{argument} is not NAME or NAME:CONFIG; pass --dataset=tfds:NAME or"
                    f" --dataset=tfds:NAME:CONFIG, e.g. tfds:mnist")
  return parts[0], (parts[1] if len(parts) == 2 else None)


def _version(folder: pathlib.Path) -> tuple[int, int, int] | None:
  """The version a prepared folder's name says, None for anything else (incomplete.*, ...)."""
  match = _VERSION.fullmatch(folder.name)
  if not match or not (folder / "dataset_info.json").is_file():
    return None
  return tuple(int(n) for n in match.groups())


def _newest_version(base: pathlib.Path) -> pathlib.Path | None:
  if not base.is_dir():
    return None
  versions = {v: d for d in base.iterdir() if d.is_dir() and (v := _version(d))}
  return versions[max(versions)] if versions else None


def prepared_folder(root: pathlib.Path, name: str, config: str | None) -> pathlib.Path:
  """The highest prepared version folder <root>/<name>[/<config>]/<version>/.

  Without a config, a dataset prepared in exactly one config is read in that config.

  Raises:
    DataError: none is prepared there, or several configs are and none is named.
  """
  base = root / name / config if config else root / name
  folder = _newest_version(base)
  if folder is not None:
    return folder
  if config is None and base.is_dir():
    configs = {d.name: f for d in sorted(base.iterdir()) if d.is_dir()
               and (f := _newest_version(d)) is not None}
    if len(configs) == 1:
      return next(iter(configs.values()))
    if configs:
      raise DataError(f"tfds:{name} is prepared under {base} in configs {', '.join(configs)};"
                      f" pick one: --dataset=tfds:{name}:CONFIG")
  build = f"{name}/{config}" if config else name
  raise DataError(f"tfds:{name}{':' + config if config else ''} is not prepared under {root}"
                  f" (no {base}/<version>/dataset_info.json); prepare it with `tfds build"
                  f" {build} --data_dir={root}` (this downloads), or pass --data_dir")


def image_feature(features, tfds, name: str):
  """(key, feature) of the dataset's image feature; key None where the whole example is one.

  Raises:
    DataError: no image feature, or several and none keyed "image".
  """
  if isinstance(features, tfds.features.Image):
    return None, features
  items = dict(features.items()) if hasattr(features, "items") else {}
  images = {key: f for key, f in items.items() if isinstance(f, tfds.features.Image)}
  if not images:
    raise DataError(f"tfds:{name} has no image feature (its features: {', '.join(items)});"
                    f" tfvae reads datasets with a tfds.features.Image")
  if len(images) > 1:
    if "image" in images:
      return "image", images["image"]
    raise DataError(f"tfds:{name} has several image features ({', '.join(images)}) and none"
                    f" named 'image'; tfvae reads one: prepare a dataset with one image feature")
  return next(iter(images.items()))


def image_shape(feature, name: str,
                image_size: tuple[int, int] | None) -> tuple[tuple[int, int, int], bool]:
  """((H, W, C) of every image read, whether images are resized to it).

  Raises:
    DataError: images that are not uint8, of varying size without image_size, or of an
      unknown or unsupported number of channels.
  """
  dtype = np.dtype(feature.np_dtype)
  if dtype != np.uint8:
    raise DataError(f"tfds:{name} has {dtype} images; tfvae reads uint8 (0..255) images only")
  height, width, channels = feature.shape
  if channels not in CHANNELS:
    raise DataError(f"tfds:{name} has images of {channels or 'unfixed'} channels; tfvae reads"
                    f" 1, 3 or 4: prepare it with an Image feature of fixed channels")
  if image_size is None:
    if height is None or width is None:
      raise DataError(f"tfds:{name} has images of varying size ({height}x{width}); pass"
                      f" --image_size=HxW")
    return (height, width, channels), False
  target = (int(image_size[0]), int(image_size[1]))
  return (*target, channels), target != (height, width)


def _stream(builder, split: str, key: str | None, shape, resize: bool,
            scale: int = 1) -> splits.StreamSplit:
  """One split as a StreamSplit of uint8 [H, W, C] images in TFDS's stored order; scale 255
  turns images of 0/1 values into tfvae's 0/255."""

  def image(example):
    pixels = example if key is None else example[key]
    if scale != 1:
      pixels = pixels * tf.constant(scale, pixels.dtype)
    if resize:
      resized = tf.image.resize(pixels, shape[:2], antialias=True)
      pixels = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(pixels, shape)

  options = tf.data.Options()
  options.deterministic = True  # the fixed order holdout and take rely on
  dataset = builder.as_dataset(split=split, shuffle_files=False).with_options(options)
  dataset = dataset.map(image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return splits.StreamSplit(dataset, builder.info.splits[split].num_examples)


def load(argument: str, data_dir: str | None, image_size: tuple[int, int] | None):
  """Loads a prepared TFDS dataset's images as streamed splits; never downloads.

  Args:
    argument: "NAME" or "NAME:CONFIG", what follows --dataset=tfds:.
    data_dir: TFDS's data folder; None means $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    image_size: (H, W) to resize every image to (antialiased); needed for images of varying
      size.

  Returns:
    A tfvae.data.sources.Dataset of StreamSplits, uint8 [H, W, C]: train, test (10% of train
    held out where there is no test split) and validation (the dataset's validation, valid or
    val split, else None).

  Raises:
    DataError: tensorflow_datasets missing, the dataset not prepared, no train split, no
      usable image feature, or images of varying size without image_size.
  """
  from tfvae.data.sources import Dataset  # here: sources imports this module
  tfds = _import_tfds()
  name, config = parse(argument)
  root = resolve_root(data_dir)
  folder = prepared_folder(root, name, config)
  try:
    builder = tfds.builder_from_directory(str(folder))
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"tfds:{argument}: {folder} cannot be read ({type(e).__name__}: {e});"
                    f" prepare it again with `tfds build {name}"
                    f"{'/' + config if config else ''} --data_dir={root}`") from e
  key, feature = image_feature(builder.info.features, tfds, argument)
  shape, resize = image_shape(feature, argument, image_size)
  found = list(builder.info.splits.keys())
  if "train" not in found:
    raise DataError(f"tfds:{argument} has no train split (its splits: {', '.join(found)});"
                    f" tfvae trains on the split named train")
  train = _stream(builder, "train", key, shape, resize)
  # Images of 0 and 1 (TFDS's binarized_mnist) are binary data, not near-black grey levels.
  binary = int(train.head(256).max()) <= 1
  scale = 255 if binary else 1
  if binary:
    train = _stream(builder, "train", key, shape, resize, scale)
  if "test" in found:
    test = _stream(builder, "test", key, shape, resize, scale)
  else:
    train, test = splits.hold_out_test(train, f"tfds:{argument}", "use at least 10 examples")
  valid_name = next((s for s in VALIDATION_SPLITS if s in found), None)
  validation = (_stream(builder, valid_name, key, shape, resize, scale) if valid_name
                else None)
  return Dataset(name=f"tfds:{argument}", train=train, test=test, binary=binary,
                 validation=validation)
