"""Checks of a user's arrays, each failing with one line that names the problem and the fix."""

from __future__ import annotations

import numpy as np


class DataError(ValueError):
  """A data file or array that cannot be used; the message names it and the fix."""


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


def is_binary(x: np.ndarray) -> bool:
  """Every pixel black or white: 0 or 255 for uint8, 0 or 1 for floats."""
  white = 255 if x.dtype == np.uint8 else 1
  return bool(np.all((x == 0) | (x == white)))


