#!/usr/bin/env python3
"""Training throughput: tfvae against a matmul ceiling and a PyTorch loop, on one machine.

  pip install torch==2.13.0   # only for the comparison; not a tfvae dependency
  python bench/throughput.py

Models, both on the same binarized MNIST pixels (binarized once, reshuffled each epoch; tfvae
holds them as uint8 0/255 as it holds all images, PyTorch as preloaded float32 0/1):
  (a) the paper's MLP: 784-500-20 (decoder mirrored), tanh, batch 100, Adam
  (b) the PyTorch examples' VAE: 784-400-20-400-784, ReLU, batch 128, Adam, Bernoulli logits
      and the analytic KL
For each: training examples per second (median over --epochs epochs after one warm-up epoch),
and the achieved GFLOP/s = 6 x dense multiply-adds per example x examples/s. The ceiling is a
float32 matmul loop in graph mode with (b)'s shapes ([128, 784] x [784, 400] and the two
transposed products of its gradient), measured in the same run twice, with the threads per op
tfvae trains with and in a fresh process with TensorFlow's defaults; the better one counts.
tfvae trains as bin/train does (tfvae.training: fused Adam, batch shards, threads per op,
steps per execution). Prints a Markdown table.
"""

import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import median_seconds  # noqa: E402  (bench/ is on sys.path when run as a script)

flags.DEFINE_integer("epochs", 4, "Timed epochs per measurement (after one warm-up epoch).")
flags.DEFINE_integer("examples", 60000, "Training examples per epoch.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch loop (needs torch installed).")
flags.DEFINE_bool("ceiling_only", False, "Print the matmul ceiling (GFLOP/s) and exit.")
FLAGS = flags.FLAGS


def dense_macs(sizes):
  """Multiply-adds of an encoder/decoder MLP, e.g. [784, 400, 40] + [20, 400, 784]."""
  return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def matmul_ceiling(iterations=200):
  import tensorflow as tf
  a = tf.random.normal([128, 784])
  w = tf.random.normal([784, 400])
  g = tf.random.normal([128, 400])

  @tf.function
  def loop():
    def body(i, total):
      forward = tf.matmul(a, w)                        # [128, 400]
      grad_w = tf.matmul(a, g, transpose_a=True)       # [784, 400]
      grad_a = tf.matmul(g, w, transpose_b=True)       # [128, 784]
      return i + 1, total + forward[0, 0] + grad_w[0, 0] + grad_a[0, 0]
    return tf.while_loop(lambda i, _: i < iterations, body, (0, 0.0))[1]

  loop()
  flops = 3 * 2 * 128 * 784 * 400 * iterations
  return flops / median_seconds(loop) / 1e9


def default_threads_ceiling():
  """The ceiling in a fresh process with TensorFlow's default threads per op."""
  output = subprocess.run([sys.executable, os.path.abspath(__file__), "--ceiling_only"],
                          check=True, capture_output=True, text=True).stdout
  return float(output.strip().splitlines()[-1])


def tfvae_throughput(x, hidden, activation, batch_size):
  """tfvae as bin/train runs it: its optimizer, batch shards and steps per execution."""
  import keras

  import tfvae
  from tfvae import data, training
  keras.utils.set_random_seed(0)
  train_config = tfvae.TrainConfig(batch_size=batch_size)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=20, hidden_sizes=(hidden,),
                                    activation=activation),
                  step_shards=training.default_step_shards())
  steps = data.steps_per_epoch(len(x), batch_size)
  vae.compile(optimizer=training.make_optimizer(train_config),
              steps_per_execution=training.choose_steps_per_execution(
                  steps, train_config.steps_per_execution))
  pipeline = data.train_pipeline(x, batch_size, seed=0, dynamic_binarization=False)
  times = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.start)

  vae.fit(pipeline, epochs=FLAGS.epochs + 1, steps_per_epoch=steps, verbose=0,
          callbacks=[Timer()])
  return len(x) / statistics.median(times[1:])


def torch_throughput(x, batch_size=128):
  import torch
  from torch import nn
  from torch.nn import functional

  torch.manual_seed(0)

  class VAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
      self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
      h = functional.relu(self.fc1(x))
      mu, logvar = self.fc21(h), self.fc22(h)
      z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
      return self.fc4(functional.relu(self.fc3(z))), mu, logvar

  model = VAE()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  data = torch.from_numpy(x.reshape(len(x), 784).astype(np.float32) / np.float32(255))
  times = []
  for _ in range(FLAGS.epochs + 1):
    start = time.perf_counter()
    order = torch.randperm(len(data))
    for i in range(0, len(data), batch_size):
      batch = data[order[i:i + batch_size]]
      logits, mu, logvar = model(batch)
      bce = functional.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
      kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
      loss = (bce + kl) / len(batch)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    times.append(time.perf_counter() - start)
  return len(x) / statistics.median(times[1:]), torch.__version__, torch.get_num_threads()


def main(argv):
  del argv
  import tensorflow as tf

  import tfvae
  from tfvae import data, training
  if FLAGS.ceiling_only:
    print(matmul_ceiling())
    return
  # Threads per op as train() sets them, before TensorFlow runs its first op.
  training.configure_threads(tfvae.TrainConfig(), training.default_step_shards())
  mnist = data.load("mnist")
  # Binarized once, held as tfvae holds images (uint8 0/255, scaled inside its step); the
  # PyTorch loop gets the same pixels as preloaded float32 0/1.
  x = data.eval_arrays(mnist.x_train[:FLAGS.examples], bernoulli=True, binary=False)
  own_threads = matmul_ceiling()
  default_threads = default_threads_ceiling()
  ceiling = max(own_threads, default_threads)
  rows = []
  for label, hidden, activation, batch in (("(a) paper MLP 784-500-20, tanh, M=100", 500, "tanh",
                                            100),
                                           ("(b) 784-400-20-400-784, ReLU, M=128", 400, "relu",
                                            128)):
    rate = tfvae_throughput(x, hidden, activation, batch)
    gflops = 6 * dense_macs([784, hidden, 40]) * rate / 1e9
    gflops += 6 * dense_macs([20, hidden, 784]) * rate / 1e9
    rows.append((f"tfvae {label}", rate, gflops))
  torch_rate = None
  if FLAGS.torch:
    try:
      torch_rate, version, threads = torch_throughput(x)
      gflops = 6 * (dense_macs([784, 400, 40]) + dense_macs([20, 400, 784])) * torch_rate / 1e9
      rows.append((f"PyTorch {version} ({threads} threads) (b)", torch_rate, gflops))
    except ImportError:
      print("torch is not installed: pip install torch==2.13.0 for the comparison")
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, step_shards"
        f" {training.default_step_shards()}, intra-op threads"
        f" {tf.config.threading.get_intra_op_parallelism_threads() or 'default'};"
        f" matmul ceiling for (b)'s shapes: {ceiling:.0f} GFLOP/s (graph mode; the better of"
        f" {own_threads:.0f} with these threads and {default_threads:.0f} with TensorFlow's"
        f" default threads)\n")
  print("| trainer | examples/s | GFLOP/s | % of ceiling |\n|---|---|---|---|")
  for label, rate, gflops in rows:
    print(f"| {label} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / ceiling:.0f}% |")
  if torch_rate:
    print(f"\ntfvae (b) / PyTorch (b): {rows[1][1] / torch_rate:.2f}x")


if __name__ == "__main__":
  app.run(main)
