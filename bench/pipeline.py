#!/usr/bin/env python3
"""The training pipeline: how fast it makes MNIST batches, and what binarizing them costs.

  python bench/pipeline.py

1. The pipeline alone: images per second that tfvae.data.train_pipeline yields from MNIST's
   60,000 training images as bin/train feeds them (batches of 100 in blocks of steps), with and
   without dynamic binarization (x ~ Bernoulli(pixel/255) drawn afresh each epoch); the median
   of --rounds epochs after a warm-up epoch.
2. End to end: bin/train's model (784-500-20, ReLU, M = 100, trained as bench/throughput.py's
   tfvae_trainer trains) on the pipeline that binarizes the grey images each epoch, as
   bin/train does, and on images binarized once beforehand, as bench/throughput.py trains; one
   epoch each in turn, medians of --rounds epochs after a warm-up (throughput.interleaved_rates).

To time an earlier version of the pipeline, run this script from a checkout of it with
bench/pipeline.py and bench/throughput.py copied in.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from throughput import interleaved_rates, tfvae_trainer  # noqa: E402  (bench/ is on sys.path)

flags.DEFINE_integer("rounds", 7, "Timed epochs per measurement, after a warm-up epoch.")
FLAGS = flags.FLAGS

BATCH_SIZE = 100  # bin/train's


def pipeline_rate(x, dynamic_binarization, rounds):
  """Images/s of the training pipeline alone, the median epoch of `rounds`."""
  import tfvae
  from tfvae import data
  runtime = tfvae.Runtime()
  blocks, steps_per_call = runtime.training_stream(x, BATCH_SIZE, seed=0,
                                                   dynamic_binarization=dynamic_binarization,
                                                   strategy=runtime.make_strategy())
  iterator = iter(blocks)
  steps = data.steps_per_epoch(len(x), BATCH_SIZE)
  seconds = []
  for round_index in range(rounds + 1):
    start = time.perf_counter()
    for _ in range(-(-steps // steps_per_call)):  # the epoch's blocks
      next(iterator)
    if round_index:
      seconds.append(time.perf_counter() - start)
  return steps * BATCH_SIZE / statistics.median(seconds)


def main(argv):
  del argv
  import tensorflow as tf

  import tfvae
  from tfvae import data
  tfvae.Runtime().configure_threads()
  grey = data.load("mnist", validation_examples=0).x_train
  binarized = data.eval_arrays(grey, bernoulli=True, binary=False)  # once, with a fixed seed
  threads = tfvae.Runtime().pipeline_threads
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, pipeline threads {threads}\n")
  print("| pipeline alone, blocks of batches of 100 | images/s |\n|---|---|")
  for label, dynamic in (("binarized once (no work per batch)", False),
                         ("binarized afresh each epoch", True)):
    print(f"| {label} | {pipeline_rate(grey, dynamic, FLAGS.rounds):,.0f} |")
  trainers = {
      "binarized afresh each epoch (bin/train)": tfvae_trainer(
          grey, 500, "relu", BATCH_SIZE, dynamic_binarization=True),
      "binarized once (bench/throughput.py)": tfvae_trainer(
          binarized, 500, "relu", BATCH_SIZE, dynamic_binarization=False),
  }
  results = interleaved_rates(trainers, FLAGS.rounds)
  print("\n| training 784-500-20 ReLU, M=100, on images | examples/s | training loss, last epoch |"
        "\n|---|---|---|")
  for label, (rate, loss) in results.items():
    print(f"| {label} | {rate:,.0f} | {loss:.2f} |")


if __name__ == "__main__":
  app.run(main)
