#!/usr/bin/env python3
"""Training under MirroredStrategy: one step per graph call against many.

  python bench/strategies.py              # 2 logical CPU devices on a machine without a GPU
  python bench/strategies.py --replicas 4

Model (b) of bench/throughput.py (784-400-20-400-784, ReLU, batch 128, Adam, Bernoulli), on
MNIST binarized once, trained as bin/train trains under --strategy=mirrored, each replica fed
its part of each batch as float32. Under
MirroredStrategy on all local GPUs, or on --replicas logical CPU devices where there is no GPU,
with 1 step per call (all that Keras 3.15's own multi-step function can run under the strategy;
timed here through the runtime's own loop with steps_per_execution=1) and with bin/train's
steps per call (the same loop); and, for reference, the same model without a strategy
(bin/train's default). One
epoch each in turn, the median of --epochs epochs after a warm-up (throughput.interleaved_rates;
the flag is bench/throughput.py's).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from throughput import interleaved_rates, tfvae_trainer  # noqa: E402  (bench/ is on sys.path)

flags.DEFINE_integer("replicas", 2, "Logical CPU devices to mirror over where there is no GPU.")
FLAGS = flags.FLAGS

BATCH_SIZE = 128


def main(argv):
  del argv
  import tensorflow as tf

  import tfvae
  from tfvae import data
  tfvae.Runtime().configure_threads()
  if not tf.config.list_physical_devices("GPU"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.replicas)
  x = data.eval_arrays(data.load("mnist", validation_examples=0).x_train, bernoulli=True,
                       binary=False)
  steps = data.steps_per_epoch(len(x), BATCH_SIZE)
  many = tfvae.Runtime(strategy="mirrored").steps_per_call(steps)
  strategy = tf.distribute.MirroredStrategy()
  replicas = strategy.num_replicas_in_sync
  trainers = {
      f"MirroredStrategy, {replicas} replicas, 1 step per call": tfvae_trainer(
          x, 400, "relu", BATCH_SIZE, strategy="mirrored", steps_per_call=1),
      f"MirroredStrategy, {replicas} replicas, {many} steps per call": tfvae_trainer(
          x, 400, "relu", BATCH_SIZE, strategy="mirrored", steps_per_call=many),
      "no strategy, blocks of steps per call (bin/train's default)": tfvae_trainer(
          x, 400, "relu", BATCH_SIZE),
  }
  results = interleaved_rates(trainers, FLAGS.epochs)
  devices = ", ".join(strategy.extended.worker_devices)
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, replicas on {devices}\n")
  print("| model (b), M=128 | examples/s | training loss, last epoch |\n|---|---|---|")
  for label, (rate, loss) in results.items():
    print(f"| {label} | {rate:,.0f} | {loss:.2f} |")
  one, several = (results[label][0] for label in list(trainers)[:2])
  print(f"\n{many} steps per call / 1 step per call under the strategy: {several / one:.2f}x")


if __name__ == "__main__":
  app.run(main)
