"""Test log p(x) of a flagfile's run, as Burda et al.'s Table 1 reports it.

  TFVAE_DATA_DIR=../shared/data python bench/quality.py configs/burda_vae_30min.flags \
      [--workdir=runs/quality] [--num_samples=5000] [--extra=--epochs=10]

Trains the flagfile with bin/train in --workdir (a rerun resumes it, or finds it finished),
then scores last.keras with bin/evaluate on all 10,000 MNIST test images, binarized once with
tfvae's fixed seed: the importance-sampled log p(x) with K = --num_samples, and the ELBO. Prints
one JSON row: the flagfile, epochs, training wall time (of this call), log p(x), ELBO, K.
"""

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("flagfile")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--num_samples", type=int, default=5000)
  parser.add_argument("--extra", action="append", default=[],
                      help="more bin/train flags, e.g. --extra=--epochs=10")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir or f"runs/quality_{pathlib.Path(args.flagfile).stem}")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as exports:
    trained = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "train"), f"--flagfile={args.flagfile}",
         f"--workdir={workdir}", "--eval_num_samples=0", f"--export_dir={exports}",
         *args.extra], env=env, capture_output=True, text=True)
  train_seconds = time.perf_counter() - start
  if trained.returncode:
    sys.exit(f"bin/train failed:\n{trained.stderr[-3000:]}")
  scored = subprocess.run(
      [sys.executable, str(ROOT / "bin" / "evaluate"), f"--model={workdir / 'last.keras'}",
       "--dataset=mnist", "--split=test", f"--num_samples={args.num_samples}",
       "--batch_size=100"], env=env, capture_output=True, text=True, check=True)
  results = json.loads(scored.stdout)
  with open(workdir / "metrics.csv") as f:
    epochs = sum(1 for _ in csv.DictReader(f))
  print(json.dumps({"flagfile": args.flagfile, "epochs": epochs,
                    "train_seconds_this_call": round(train_seconds, 1),
                    "eval_seconds": round(time.perf_counter() - start - train_seconds, 1),
                    "test_log_likelihood": results["log_likelihood"],
                    "test_elbo": results["elbo"], "num_samples": results["num_samples"],
                    "num_examples": results["num_examples"]}))


if __name__ == "__main__":
  main()
