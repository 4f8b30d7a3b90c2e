"""bin/train's default run from two checkouts, taking turns: wall time and test ELBO.

  git clone -q . ../baseline && git -C ../baseline checkout -q <commit>
  TFVAE_DATA_DIR=../shared/data python bench/train_ab.py --other=../baseline --rounds=3

Each round runs `bin/train --likelihood=bernoulli` (all defaults: MNIST, 40 epochs, export)
once from this checkout and once from --other, in fresh workdirs, one after the other, the
order alternating between rounds. Reports each run's wall time, from start to exported
SavedModel, and the test ELBO it printed; then the medians and their ratio.
"""

import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("other", None, "The other checkout (its root folder).", required=True)
flags.DEFINE_integer("rounds", 3, "Runs of each checkout.")
flags.DEFINE_list("args", [], "Extra bin/train flags for both, comma separated.")
FLAGS = flags.FLAGS

_ELBO = re.compile(r"test ELBO: (-?[\d.]+) nats")


def run(checkout: pathlib.Path, scratch: pathlib.Path) -> tuple[float, float]:
  """One bin/train run from checkout: (seconds, test ELBO)."""
  command = [sys.executable, str(checkout / "bin" / "train"), "--likelihood=bernoulli",
             f"--workdir={scratch / 'run'}", f"--export_dir={scratch / 'export'}", *FLAGS.args]
  start = time.perf_counter()
  completed = subprocess.run(command, cwd=checkout, capture_output=True, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  seconds = time.perf_counter() - start
  if completed.returncode:
    raise RuntimeError(f"{checkout}: bin/train failed:\n{completed.stderr[-3000:]}")
  return seconds, float(_ELBO.search(completed.stdout)[1])


def main(argv):
  del argv
  checkouts = {"this": pathlib.Path(__file__).resolve().parent.parent,
               "other": pathlib.Path(FLAGS.other).resolve()}
  results = {name: [] for name in checkouts}
  for round_ in range(FLAGS.rounds):
    order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
    for name in order:
      with tempfile.TemporaryDirectory() as scratch:
        results[name].append(run(checkouts[name], pathlib.Path(scratch)))
      seconds, elbo = results[name][-1]
      print(f"round {round_ + 1}, {name} ({checkouts[name]}): {seconds:.1f} s, test ELBO"
            f" {elbo:.2f}", flush=True)
  medians = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
  print("\n| checkout | wall time, each run | median | test ELBO, each run |\n|---|---|---|---|")
  for name, runs in results.items():
    print(f"| {name} ({checkouts[name].name}) | {' / '.join(f'{s:.1f} s' for s, _ in runs)} |"
          f" {medians[name]:.1f} s | {' / '.join(f'{e:.2f}' for _, e in runs)} |")
  print(f"\nthis / other, median wall time: {medians['this'] / medians['other']:.3f}")


if __name__ == "__main__":
  app.run(main)
