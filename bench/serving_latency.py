#!/usr/bin/env python3
"""Latency of every exported signature, in process, at batch 1 and batch 100.

  python bench/serving_latency.py                                  # exports a default MNIST model
  python bench/serving_latency.py --model=savedmodels/mnist_vae/1  # an existing export

Loads the SavedModel with tf.saved_model.load (what a server runs), warms each signature up,
then times --repeats calls each and prints the median and 99th percentile in microseconds, as
a Markdown table. "compute" is the time per call of the same signature called --repeats times
inside one graph: the work a server does, without this Python process's call overhead.
Latency does not depend on the weights, so an untrained model of the default architecture
(784-500-20, ReLU) is exported when --model is not given.
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import median_seconds  # noqa: E402  (bench/ is on sys.path when run as a script)

flags.DEFINE_string("model", None, "SavedModel version folder; default: export a fresh one.")
flags.DEFINE_integer("repeats", 500, "Timed calls per signature and batch size.")
flags.DEFINE_integer("num_samples", 100, "K of the log_likelihood signature.")
FLAGS = flags.FLAGS


def _compute(function, kwargs, repeats):
  """Seconds per call with the Python call overhead removed: `repeats` calls in one graph.

  Inputs are read from variables and the seed varies with the loop counter, so the optimizer
  cannot hoist the call out of the loop as loop-invariant.
  """
  import tensorflow as tf
  variables = {k: tf.Variable(v) for k, v in kwargs.items() if k != "seed"}

  @tf.function
  def loop():
    def body(i, total):
      inputs = {k: v.read_value() for k, v in variables.items()}
      if "seed" in kwargs:
        inputs["seed"] = kwargs["seed"] + tf.cast(i, tf.int64)
      outputs = function(**inputs)  # use every output, so none is pruned as dead code
      return i + 1, total + tf.add_n([tf.reduce_sum(v) for v in outputs.values()])
    return tf.while_loop(lambda i, _: i < repeats, body, (0, 0.0))[1]

  loop()
  return median_seconds(loop) / repeats


def _time(function, kwargs, repeats):
  for _ in range(20):
    function(**kwargs)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outputs = function(**kwargs)
    for value in outputs.values():
      value.numpy()  # results are ready
    times.append(time.perf_counter() - start)
  return np.median(times) * 1e6, np.percentile(times, 99) * 1e6


def main(argv):
  del argv
  import tensorflow as tf
  path = FLAGS.model
  if path is None:
    import tfvae
    from tfvae import export
    path = str(export.export(tfvae.VAE(tfvae.ModelConfig()), tempfile.mkdtemp(), "bench"))
  model = tf.saved_model.load(path)  # keep a reference: the signatures use its variables
  signatures = model.signatures
  rng = np.random.default_rng(0)
  seed = tf.constant(0, tf.int64)
  print(f"model: {path}; tensorflow {tf.__version__}; {os.cpu_count()} CPUs;"
        f" {FLAGS.repeats} calls each\n")
  print("| signature | batch | median (us) | p99 (us) | compute (us) |\n|---|---|---|---|---|")
  for batch in (1, 100):
    x = tf.constant((rng.random((batch, 28, 28, 1)) < 0.3).astype(np.float32))
    z = tf.constant(rng.normal(size=(batch, 20)).astype(np.float32))
    calls = {
        "serving_default": {"x": x}, "encode": {"x": x}, "decode": {"z": z},
        "reconstruct": {"x": x}, "sample": {"count": tf.constant(batch), "seed": seed},
        "log_likelihood": {"x": x, "num_samples": tf.constant(FLAGS.num_samples),
                           "seed": seed},
    }
    for name, kwargs in calls.items():
      repeats = FLAGS.repeats if name != "log_likelihood" else FLAGS.repeats // 10
      median, p99 = _time(signatures[name], kwargs, repeats)
      compute = _compute(signatures[name], kwargs, repeats) * 1e6
      label = f"{name} (K={FLAGS.num_samples})" if name == "log_likelihood" else name
      print(f"| {label} | {batch} | {median:.0f} | {p99:.0f} | {compute:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
