"""A run's workdir: its identity, its lock, and where it stands (fresh, interrupted, finished).

run.json records what the run is: the model config, the training config and a fingerprint of
the data. A rerun with the same identity resumes an interrupted run and leaves a finished one
alone; a longer --epochs continues it. Any other difference is refused before any work, naming
what differs and the two ways on (--restart, or another --workdir). One process at a time holds
a workdir, through a lock file that names its PID; the lock dies with its process.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
from typing import Any

from tfvae.config import ConfigError, ModelConfig, TrainConfig
from tfvae.data import Dataset, splits
from tfvae.files import write_json

RUN_FILE = "run.json"
LOCK_FILE = "lock"
# What a run leaves in its workdir; --restart removes these and nothing else.
RUN_OUTPUTS = ("backup", "logs", "last.keras", "best.keras", "metrics.csv", "results.json",
               "checkpoint_state.json", "reconstructions.png", "samples.png", "manifold.png",
               RUN_FILE)


class WorkdirError(ConfigError):
  """A workdir that holds another run, or one in use; the message names the ways on."""


def data_fingerprint(dataset: Dataset) -> str:
  """sha256 of what a run trains, validates and tests on: arrays' dtype, shape and bytes;
  files' names and sizes (tfvae.data.splits)."""
  parts = [dataset.train, dataset.test]
  if dataset.validation is not None:
    parts.append(dataset.validation)
  return splits.fingerprint(*parts)


def identity(model_config: ModelConfig, train_config: TrainConfig,
             fingerprint: str) -> dict[str, Any]:
  """What run.json holds: every setting that changes what is trained, and the data's sha256."""
  train = dataclasses.asdict(train_config)
  del train["data_dir"]  # a folder, not the data: the fingerprint says what the data is
  run = {"model_config": model_config.to_dict(), "train_config": train, "data": fingerprint}
  return json.loads(json.dumps(run))  # as run.json reads back: tuples become lists


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  names = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      names += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      names.append(f"{key} {a!r} -> {b!r}" if key != "data" else "the data")
  return names


@dataclasses.dataclass(frozen=True)
class Standing:
  """Where a workdir's run stands. epochs_done counts finished epochs; finished: all of them."""

  epochs_done: int
  finished: bool


def check(workdir: pathlib.Path, run: dict[str, Any], epochs_done: int) -> Standing:
  """Compares a workdir's recorded run with this one; records it when the workdir is fresh.

  Args:
    workdir: the run's folder.
    run: `identity(...)` of the run asked for.
    epochs_done: epochs the workdir's checkpoints hold (0 for none).

  Raises:
    WorkdirError: the workdir holds a run of another configuration, or more epochs than asked.
  """
  path = workdir / RUN_FILE
  fix = f"pass --restart to start over in {workdir}, or another --workdir"
  if not path.is_file():
    if epochs_done or (workdir / "last.keras").exists():
      raise WorkdirError(f"{workdir} holds checkpoints but no {RUN_FILE} saying what run made"
                         f" them; {fix}")
    write_json(path, {**run, "epochs_done": 0})
    return Standing(0, False)
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); {fix}") from e
  asked = run["train_config"]["epochs"]
  # A setting newer than the recorded run had its default then.
  defaults = identity(ModelConfig(), TrainConfig(), "")
  previous = {**recorded,
              "model_config": {**defaults["model_config"], **recorded.get("model_config", {})},
              "train_config": {**defaults["train_config"], **recorded.get("train_config", {}),
                               "epochs": asked}}
  previous.pop("epochs_done", None)
  differences = _differences(previous, run)
  if differences:
    raise WorkdirError(f"{workdir} holds a run of another configuration ({'; '.join(differences)});"
                       f" {fix}")
  done = max(epochs_done, int(recorded.get("epochs_done", 0)))
  if done > asked:
    raise WorkdirError(f"{workdir} holds a run of {done} epochs, more than --epochs={asked}; pass"
                       f" --epochs={done} or more to continue it, --restart to start over, or"
                       f" another --workdir")
  write_json(path, {**run, "epochs_done": done})
  return Standing(done, done == asked and (workdir / "results.json").is_file())


def record_epochs(workdir: pathlib.Path, epochs_done: int) -> None:
  """Notes in run.json that the run has finished epochs_done epochs."""
  path = workdir / RUN_FILE
  write_json(path, {**json.loads(path.read_text()), "epochs_done": epochs_done})


def restart(workdir: pathlib.Path) -> None:
  """Removes what a run left in workdir (its RUN_OUTPUTS), so the next run starts fresh."""
  for name in RUN_OUTPUTS:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)


class Lock:
  """workdir/lock, held by one process at a time: an flock on a file that names its holder.

  The kernel drops the flock when its process dies, so a dead holder's lock is taken over.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK_FILE
    self._file = None

  def __enter__(self) -> Lock:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(self.path, "a+")  # noqa: SIM115 -- held until __exit__
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        handle.close()
        raise
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise WorkdirError(f"{self.path.parent} is in use by {holder} (lock {self.path}); wait for"
                         f" it to finish, or pass another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc_info) -> None:
    # Emptied, not removed: a process that opened it meanwhile must lock this same file.
    self._file.truncate(0)
    self._file.close()  # drops the flock
    self._file = None

