"""csv:PATH: numeric columns, one vector per row, a header line optional."""

from __future__ import annotations

import csv
import pathlib

import numpy as np

from tfvae.data.checks import DataError, check_vectors

# A float32 value takes 4 bytes in memory and at least 2 in a csv ("0,"): the array is at most
# twice the file, and reading it takes a few times that.
_BYTES_IN_MEMORY_PER_FILE_BYTE = 8


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def read_csv(path: str, budget: int) -> np.ndarray:
  """The rows of a csv file of numbers as float32 [N, D].

  A first line that is not all numbers is taken as the header and skipped.

  Raises:
    DataError: no such file, too large for the memory budget, ragged rows, text or empty cells,
      NaN or Inf.
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise DataError(f"{path}: no such file; pass --dataset=csv:PATH with a csv of numbers")
  if file.stat().st_size * _BYTES_IN_MEMORY_PER_FILE_BYTE > budget:
    raise DataError(f"{path}: {file.stat().st_size / 2**30:.1f} GiB of text would need more"
                    f" than the {budget / 2**30:.1f} GiB it may use here; save a subset, or"
                    f" an npz of float32")
  with open(file, newline="") as f:
    sample = f.read(1 << 16)
    f.seek(0)
    try:
      dialect = csv.Sniffer().sniff(sample, delimiters=",;\t ")
    except csv.Error:
      dialect = csv.excel
    rows = [row for row in csv.reader(f, dialect) if row]
  if rows and not all(_is_number(cell) for cell in rows[0]):
    rows = rows[1:]  # a header
  if not rows:
    raise DataError(f"{path}: no rows of numbers")
  width = len(rows[0])
  for number, row in enumerate(rows):
    if len(row) != width:
      raise DataError(f"{path}: row {number + 1} has {len(row)} columns, the first has {width};"
                      f" every row must have the same columns")
  try:
    values = np.array(rows, dtype=np.float32)
  except ValueError as e:
    raise DataError(f"{path}: a cell is not a number ({e}); keep numeric columns only") from e
  return check_vectors(values, path)
