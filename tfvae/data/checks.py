"""Checks of a user's arrays, each failing with one line that names the problem and the fix."""

from __future__ import annotations

import numpy as np


class DataError(ValueError):
  """A data file or array that cannot be used; the message names it and the fix."""


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def check_images(x, source: str) -> np.ndarray:
  """Validates a user's image array and returns it as [N, H, W, C] uint8 or float32.

  Raises:
    DataError: empty, wrong rank, channels first, non-numeric, NaN/Inf, or floats outside
      [0, 1].
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., np.newaxis]
  if x.ndim != 4:
    raise DataError(f"{source}: shape {x.shape}; expected [N, H, W] or [N, H, W, C] images, or"
                    f" [N, D] vectors")
  if x.shape[0] == 0 or 0 in x.shape:
    raise DataError(f"{source}: shape {x.shape} holds no images")
  if x.shape[-1] not in CHANNELS and x.shape[1] in CHANNELS:
    raise DataError(f"{source}: shape {x.shape} looks channels-first ([N, C, H, W]); tfvae"
                    f" takes channels last: save x.transpose(0, 2, 3, 1)")
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


def is_binary(x: np.ndarray) -> bool:
  """Every pixel black or white: 0 or 255 for uint8, 0 or 1 for floats."""
  white = 255 if x.dtype == np.uint8 else 1
  return bool(np.all((x == 0) | (x == white)))




def check_vectors(x, source: str) -> np.ndarray:
  """Validates a user's real-valued vectors [N, D] and returns them as float32.

  Raises:
    DataError: empty, non-numeric, or NaN/Inf values.
  """
  x = np.asarray(x)
  if x.ndim != 2 or 0 in x.shape:
    raise DataError(f"{source}: shape {x.shape}; expected vectors [N, D] with N, D >= 1")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == np.bool_):
    raise DataError(f"{source}: dtype {x.dtype}; expected numbers")
  x = x.astype(np.float32)
  bad = np.size(x) - np.isfinite(x).sum()
  if bad:
    rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    raise DataError(f"{source}: {bad} NaN or Inf values (first in row {rows[0]}); drop or"
                    f" impute those rows first")
  return x


def check_examples(x, source: str) -> np.ndarray:
  """`check_vectors` for [N, D] arrays, else `check_images`."""
  return check_vectors(x, source) if np.ndim(x) == 2 else check_images(x, source)
