"""Time and peak-memory growth of the largest serving requests, one request a process.

  python bench/serving_memory.py                         # exports an untrained default model
  python bench/serving_memory.py --model=savedmodels/mnist_vae/1

For each request (the largest `sample` and `log_likelihood` requests the caps allow, and two
over them), a fresh process loads the SavedModel as a server does, warms the signature up,
then times one request and reads its peak resident memory before and after (getrusage). Cost
does not depend on the weights, so an untrained model of the default architecture (784-500-20,
ReLU) is exported when --model is not given. Prints a Markdown table.
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", None, "SavedModel version folder; default: export a fresh one.")
flags.DEFINE_string("request", None, "Internal: run this one request in this process.")
FLAGS = flags.FLAGS

# name -> (signature, batch of images or None, count or num_samples)
REQUESTS = {
    "sample, count 10000": ("sample", None, 10_000),
    "sample, count 10^6 (over the cap)": ("sample", None, 10**6),
    "log_likelihood, 100 images x K 1000": ("log_likelihood", 100, 1000),
    "log_likelihood, 1000 images x K 100": ("log_likelihood", 1000, 100),
    "log_likelihood, 10000 images x K 10": ("log_likelihood", 10_000, 10),
    "log_likelihood, 1 image x K 100000": ("log_likelihood", 1, 100_000),
    "log_likelihood, 100 images x K 100000 (over the cap)": ("log_likelihood", 100, 100_000),
}


def _one_request(model_path: str, name: str) -> dict:
  import resource
  import time

  import numpy as np
  import tensorflow as tf
  signatures = tf.saved_model.load(model_path).signatures
  signature, batch, number = REQUESTS[name]
  seed = tf.constant(0, tf.int64)
  if signature == "sample":
    signatures["sample"](count=tf.constant(2), seed=seed)  # warm-up

    def request():
      return signatures["sample"](count=tf.constant(number), seed=seed)
  else:
    images = (np.random.default_rng(0).random((batch, 28, 28, 1)) < 0.3).astype(np.float32)
    signatures["log_likelihood"](x=images[:1], num_samples=tf.constant(2), seed=seed)

    def request():
      return signatures["log_likelihood"](x=images, num_samples=tf.constant(number), seed=seed)

  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  try:
    [value.numpy() for value in request().values()]
    result = "answered"
  except tf.errors.InvalidArgumentError as e:
    result = "refused: " + e.message.splitlines()[0][:80]
  seconds = time.perf_counter() - start
  growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  return {"seconds": seconds, "growth_mib": growth, "result": result}


def main(argv):
  del argv
  if FLAGS.request:
    print(json.dumps(_one_request(FLAGS.model, FLAGS.request)))
    return
  with tempfile.TemporaryDirectory() as scratch:
    model = FLAGS.model
    if model is None:
      import tfvae
      from tfvae import export
      model = str(export.export(tfvae.VAE(tfvae.ModelConfig()), scratch, "default"))
    print("| request | seconds | peak memory growth | result |\n|---|---|---|---|")
    for name in REQUESTS:
      output = subprocess.run([sys.executable, __file__, f"--model={model}",
                               f"--request={name}"], check=True, capture_output=True,
                              text=True).stdout
      row = json.loads(output.strip().splitlines()[-1])
      print(f"| {name} | {row['seconds']:.3f} | {row['growth_mib']:.0f} MiB | {row['result']} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
