"""folder:PATH: image files below a folder, listed and checked up front, decoded as training reads.

PNG, JPEG, BMP and GIF (its first frame) in any subfolder; class subfolders are ignored. When
PATH has train/ and test/ subfolders they are the splits (and valid/ or validation/, if there,
the validation split); otherwise splits.TEST_FRACTION of the images, the same ones for every
run, are held out as the test split. Only the files' headers are read before training: their
size and colour mode. Grey folders give 1 channel, folders with an alpha channel (RGBA, grey
with alpha, or a palette with transparency) 4, others 3 (RGB); each image is converted to that
as it is decoded. Files are split by a digest of their path below PATH, so adding files leaves
the others in their split.
"""

from __future__ import annotations

import os
import pathlib

from tfvae.data.checks import DataError
from tfvae.data.splits import FileSplit, hold_out_test

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test",),
                  "validation": ("valid", "validation", "val")}
_GREY_MODES = ("1", "L", "I", "I;16", "F")


def list_images(root: pathlib.Path) -> list[pathlib.Path]:
  """The image files below root, sorted; hidden files and folders are skipped."""
  found = []
  for folder, subfolders, files in os.walk(root, followlinks=True):
    subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    found += [pathlib.Path(folder, name) for name in files
              if name.lower().endswith(SUFFIXES) and not name.startswith(".")]
  return sorted(found)


def _header(path: pathlib.Path) -> tuple[int, int, int]:
  """(height, width, channels as decoded: 1 grey, 2 grey+alpha, 3 colour, 4 colour+alpha)."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      width, height = image.size
      mode, transparent = image.mode, "transparency" in image.info
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise DataError(f"{path}: not a readable image ({e}); remove it or convert it to PNG"
                    f" or JPEG") from e
  if path.suffix.lower() == ".bmp" and mode in ("P", "1"):
    raise DataError(f"{path}: a {'palette' if mode == 'P' else '1-bit'} BMP, which TensorFlow"
                    f" does not decode to its colours; convert it to PNG")
  if mode in _GREY_MODES:
    channels = 1
  elif mode in ("LA", "La", "PA"):
    channels = 2
  elif mode in ("RGBA", "RGBa") or (mode == "P" and transparent):
    channels = 4
  else:
    channels = 3
  return height, width, channels


def _find_splits(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """split name -> its files: train/, test/ (and validation) when both are there, else all."""
  folders = {split: next((root / name for name in names if (root / name).is_dir()), None)
             for split, names in _SPLIT_FOLDERS.items()}
  if folders["train"] is None or folders["test"] is None:
    return {"all": list_images(root)}
  return {split: list_images(folder) for split, folder in folders.items() if folder is not None}


def load(path: str, image_size: tuple[int, int] | None = None):
  """The Dataset of the images below path, streamed from disk.

  Args:
    path: the folder.
    image_size: (H, W) to resize every image to; None requires all images to share one size.

  Raises:
    DataError: no such folder, no images (or an empty split), an unreadable file, or two
      images of different sizes without image_size.
  """
  from tfvae.data.sources import Dataset  # here: sources imports this module's loader
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f"{path}: no such folder; pass --dataset=folder:PATH with a folder of PNG,"
                    f" JPEG, BMP or GIF images")
  files = _find_splits(root)
  for split, paths in files.items():
    if not paths:
      where = root if split == "all" else f"{root}'s {split} folder"
      raise DataError(f"{where}: no {', '.join(SUFFIXES)} files found; put the images there")
  headers = {p: _header(p) for paths in files.values() for p in paths}
  channels = {c for _, _, c in headers.values()}
  channels = 1 if channels == {1} else 4 if channels & {2, 4} else 3
  if image_size is None:
    first, *_ = headers
    for other, (height, width, _) in headers.items():
      if (height, width) != headers[first][:2]:
        raise DataError(f"{first} is {headers[first][0]}x{headers[first][1]} but {other} is"
                        f" {height}x{width}; pass --image_size=HxW to resize them all")
    image_size = headers[first][:2]
    resize = False
  else:
    resize = any((h, w) != tuple(image_size) for h, w, _ in headers.values())
  shape = (*image_size, channels)

  def split_of(paths):
    return FileSplit(paths, shape, resize, root)

  if "all" in files:
    # By path digest (FileSplit.holdout).
    train, test = hold_out_test(split_of(files["all"]), str(root),
                                "add images, or train/ and test/ subfolders")
    validation = None
  else:
    train, test = split_of(files["train"]), split_of(files["test"])
    validation = split_of(files["validation"]) if "validation" in files else None
  return Dataset(f"folder:{path}", train, test, binary=False, validation=validation)
