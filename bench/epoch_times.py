"""Epoch times of bin/train's default model, trained by one checkout's own training.train.

  TFVAE_DATA_DIR=../shared/data python bench/epoch_times.py /path/to/checkout 8

Trains MNIST (784-500-20 ReLU, M = 100, binarized afresh each epoch) for the given epochs in a
fresh workdir, with tfvae.Runtime() where the checkout has one (bin/train's machinery either
way), and prints each epoch's seconds (a Keras callback from on_epoch_begin to on_epoch_end),
the median of all but the first (tracing), the total and the test ELBO. Run it for two
checkouts in turn to compare them.
"""

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
checkout, epochs = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, checkout)

import keras  # noqa: E402

import tfvae  # noqa: E402
from tfvae import data, training  # noqa: E402


class EpochTimes(keras.callbacks.Callback):
  def on_train_begin(self, logs=None):
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self.start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self.start)


times, start = EpochTimes(), time.perf_counter()
try:  # all 60,000 training images, as checkouts before the validation split trained on
  dataset = data.load("mnist", validation_examples=0)
except TypeError:
  dataset = data.load("mnist")
runtime = {"runtime": tfvae.Runtime()} if hasattr(tfvae, "Runtime") else {}
with tempfile.TemporaryDirectory() as workdir:
  result = training.train(training.model_config_for(dataset), tfvae.TrainConfig(epochs=epochs),
                          workdir, dataset=dataset, verbose=0, callbacks=[times], **runtime)
print(f"{checkout}: epochs {[round(s, 2) for s in times.seconds]}, median"
      f" {statistics.median(times.seconds[1:]):.3f} s, total {time.perf_counter() - start:.1f} s,"
      f" test ELBO {result.test_metrics['elbo']:.2f}")
