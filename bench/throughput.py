#!/usr/bin/env python3
"""Training throughput: tfvae against a matmul ceiling and a PyTorch loop, on one machine.

  pip install torch==2.13.0   # only for the comparison; not a tfvae dependency
  python bench/throughput.py

Models, both on the same binarized MNIST pixels (binarized once, reshuffled each epoch; tfvae
holds them as uint8 0/255 as it holds all images, PyTorch as preloaded float32 0/1):
  (a) the paper's MLP: 784-500-20 (decoder mirrored), tanh, batch 100, Adam
  (b) the PyTorch examples' VAE: 784-400-20-400-784, ReLU, batch 128, Adam, Bernoulli logits
      and the analytic KL
The trainers take turns, one epoch each per round (a warm-up round, then --epochs timed rounds),
so a noisy machine's slow and fast phases fall on all of them alike. For each: training
examples per second (the median epoch; every epoch is the full batches of a fresh permutation,
468 x 128 images for (b), as tfvae trains), and the achieved GFLOP/s = 6 x dense multiply-adds
per example x examples/s. The ceiling is a float32 matmul loop in graph mode with (b)'s shapes
([128, 784] x [784, 400] and the two transposed products of its gradient), measured in the same
run twice, with the threads per op tfvae trains with and in a fresh process with TensorFlow's
defaults; the better one counts.
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

flags.DEFINE_integer("epochs", 5, "Timed rounds, one epoch per trainer each (after a warm-up).")
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


def tfvae_trainer(x, hidden, activation, batch_size):
  """tfvae as bin/train runs it (its optimizer, batch shards, steps per execution).

  Returns (run_epoch, examples per epoch); run_epoch() trains one epoch and returns its seconds.
  """
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

  def run_epoch():
    vae.fit(pipeline, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Timer()])
    return times[-1]

  return run_epoch, steps * batch_size


def torch_trainer(x, batch_size=128):
  """The PyTorch examples' VAE, trained the fastest way a PyTorch user would write it.

  Tensors preloaded, a fresh permutation each epoch, full batches only (as tfvae trains).
  Returns (run_epoch, examples per epoch, torch version, torch threads).
  """
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
  steps = len(data) // batch_size

  def run_epoch():
    start = time.perf_counter()
    order = torch.randperm(len(data))
    for i in range(steps):
      batch = data[order[i * batch_size:(i + 1) * batch_size]]
      logits, mu, logvar = model(batch)
      bce = functional.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
      kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
      loss = (bce + kl) / len(batch)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    return time.perf_counter() - start

  return run_epoch, steps * batch_size, torch.__version__, torch.get_num_threads()


def interleaved_rates(trainers, rounds):
  """Examples/s of each trainer: median over `rounds` rounds of one epoch each, in turn.

  `trainers` maps a label to (run_epoch, examples per epoch, ...): run_epoch() trains one
  epoch and returns its seconds.

  One warm-up epoch each first. Taking turns epoch by epoch exposes every trainer to the same
  phases of a noisy machine; a short pause between turns lets the last one's threads go idle.
  """
  epoch_times = {label: [] for label in trainers}
  for round_index in range(rounds + 1):
    for label, (run_epoch, *_) in trainers.items():
      seconds = run_epoch()
      if round_index:
        epoch_times[label].append(seconds)
      time.sleep(0.2)
  return {label: examples / statistics.median(epoch_times[label])
          for label, (_, examples, *_) in trainers.items()}


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
  models = {"(a) paper MLP 784-500-20, tanh, M=100": (500, "tanh", 100),
            "(b) 784-400-20-400-784, ReLU, M=128": (400, "relu", 128)}
  # label -> (run_epoch, examples per epoch, hidden units)
  trainers = {f"tfvae {label}": (*tfvae_trainer(x, *settings), settings[0])
              for label, settings in models.items()}
  torch_label = None
  if FLAGS.torch:
    try:
      run_epoch, examples, version, threads = torch_trainer(x)
      torch_label = f"PyTorch {version} ({threads} threads) (b)"
      trainers[torch_label] = (run_epoch, examples, 400)
    except ImportError:
      print("torch is not installed: pip install torch==2.13.0 for the comparison")
  rates = interleaved_rates(trainers, FLAGS.epochs)
  rows = []
  for label, rate in rates.items():
    hidden = trainers[label][2]
    gflops = 6 * (dense_macs([784, hidden, 40]) + dense_macs([20, hidden, 784])) * rate / 1e9
    rows.append((label, rate, gflops))
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, step_shards"
        f" {training.default_step_shards()}, intra-op threads"
        f" {tf.config.threading.get_intra_op_parallelism_threads() or 'default'};"
        f" matmul ceiling for (b)'s shapes: {ceiling:.0f} GFLOP/s (graph mode; the better of"
        f" {own_threads:.0f} with these threads and {default_threads:.0f} with TensorFlow's"
        f" default threads)\n")
  print("| trainer | examples/s | GFLOP/s | % of ceiling |\n|---|---|---|---|")
  for label, rate, gflops in rows:
    print(f"| {label} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / ceiling:.0f}% |")
  if torch_label:
    tfvae_b = rates[f"tfvae {list(models)[1]}"]
    print(f"\ntfvae (b) / PyTorch (b): {tfvae_b / rates[torch_label]:.2f}x (ratio of medians)")


if __name__ == "__main__":
  app.run(main)
