"""Peak memory of training from an image folder: it must not grow with the number of files.

  python bench/folder_memory.py ../shared/data/cifar10-jpeg 10000 50000 [--rounds=2]

Builds folders of symbolic links to the first N training JPEGs of each count (spread over the
class folders) beside the same 1,000 test JPEGs, and trains each (MLP 3072-500-20, Gaussian
likelihood, M = 100, tfvae.Runtime(), 10% held out for validation) in its own process for the
same number of optimizer steps: max(counts) / N epochs, since memory also grows over a run's
first graph calls. The counts take turns for --rounds rounds. Prints each run's peak RSS (the
child's ru_maxrss), seconds and examples/s, then the medians per count.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _link_folder(source: pathlib.Path, target: pathlib.Path, count: int, test: int) -> None:
  for split, wanted in (("train", count), ("test", test)):
    classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
    files = [sorted(c.iterdir()) for c in classes]
    chosen = [f for group in zip(*files, strict=False) for f in group][:wanted]
    for path in chosen:
      link = target / split / path.parent.name / path.name
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(path.resolve())


def _child(folder: str, workdir: str, epochs: str) -> None:
  sys.path.insert(0, str(ROOT))
  import tfvae
  from tfvae import training
  start = time.perf_counter()
  dataset = tfvae.data.load(f"folder:{folder}")
  config = training.model_config_for(dataset, likelihood="gaussian")
  training.train(config, tfvae.TrainConfig(epochs=int(epochs), batch_size=100), workdir,
                 dataset=dataset, runtime=tfvae.Runtime(), verbose=0)
  seconds = time.perf_counter() - start
  seen = dataset.train.count * int(epochs)
  print(json.dumps({"train_examples": dataset.train.count, "epochs": int(epochs),
                    "seconds": seconds, "examples_per_s": seen / seconds,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("source")
  parser.add_argument("counts", type=int, nargs="+")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(*args.child)
    return
  with tempfile.TemporaryDirectory() as scratch:
    folders = {}
    for count in args.counts:
      folders[count] = pathlib.Path(scratch, f"cifar_{count}")
      _link_folder(pathlib.Path(args.source), folders[count], count, 1000)
    results = {count: [] for count in args.counts}
    for round_ in range(args.rounds):
      for count in args.counts:
        workdir = pathlib.Path(scratch, f"run_{count}_{round_}")
        output = subprocess.run(
            [sys.executable, __file__, args.source, "0", "--child", str(folders[count]),
             str(workdir), str(max(args.counts) // count)],
            check=True, capture_output=True, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
        row = json.loads(output.strip().splitlines()[-1])
        results[count].append(row)
        print(json.dumps(row), flush=True)
  for count, rows in results.items():
    print(f"{count} files: median peak RSS"
          f" {statistics.median(r['peak_rss_mib'] for r in rows):.0f} MiB, median"
          f" {statistics.median(r['examples_per_s'] for r in rows):.0f} examples/s end to end")


if __name__ == "__main__":
  main()
