"""Atomic file output: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
  """Yields a hidden temporary path beside `path` (same suffix); renames it over `path` on success.

  A crash or an exception mid-write leaves the previous `path` intact and removes the temporary.

    with atomic_path("runs/x/last.keras") as temporary:
      model.save(temporary)
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
  try:
    yield temporary
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, values) -> None:
  """Writes values as indented, key-sorted JSON to path, atomically."""
  with atomic_path(path) as temporary:
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
