#!/usr/bin/env python3
"""Training throughput: tfvae against a matmul ceiling and a PyTorch loop, on one machine.

  pip install torch==2.13.0   # only for the comparison; not a tfvae dependency
  python bench/throughput.py

Models, both on the same binarized MNIST tensors (pre-binarized once, reshuffled each epoch):
  (a) the paper's MLP: 784-500-20 (decoder mirrored), tanh, batch 100, Adam
  (b) the PyTorch examples' VAE: 784-400-20-400-784, ReLU, batch 128, Adam, Bernoulli logits
      and the analytic KL
For each: training examples per second (median over --epochs epochs after one warm-up epoch),
and the achieved GFLOP/s = 6 x dense multiply-adds per example x examples/s. The ceiling is a
float32 matmul loop in graph mode with (b)'s shapes ([128, 784] x [784, 400] and the two
transposed products of its gradient), measured in the same run. Prints a Markdown table.
"""

import os
import statistics
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


def tfvae_throughput(x, hidden, activation, batch_size):
  import keras

  import tfvae
  from tfvae import data
  keras.utils.set_random_seed(0)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=20, hidden_sizes=(hidden,),
                                    activation=activation))
  steps = data.steps_per_epoch(len(x), batch_size)
  spe = max(d for d in range(1, 21) if steps % d == 0)
  vae.compile(optimizer=keras.optimizers.Adam(1e-3), steps_per_execution=spe)
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
  data = torch.from_numpy(x.reshape(len(x), 784).astype(np.float32))
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

  from tfvae import data
  mnist = data.load("mnist")
  x = data.binarize(mnist.x_train[:FLAGS.examples])
  ceiling = matmul_ceiling()
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
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs; matmul ceiling for (b)'s shapes:"
        f" {ceiling:.0f} GFLOP/s (graph mode)\n")
  print("| trainer | examples/s | GFLOP/s | % of ceiling |\n|---|---|---|---|")
  for label, rate, gflops in rows:
    print(f"| {label} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / ceiling:.0f}% |")
  if torch_rate:
    print(f"\ntfvae (b) / PyTorch (b): {rows[1][1] / torch_rate:.2f}x")


if __name__ == "__main__":
  app.run(main)
