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
tfvae trains as bin/train does (tfvae.Runtime(): fused Adam, steps per call). The comparison
is (b) in PyTorch, three ways: torch.optim.Adam as it runs on the CPU when no flag is given
(a for-loop over parameters), with fused=True (one kernel, as tfvae's Adam is), and fused
under torch.compile. Prints a Markdown table with each trainer's
last training loss (a check that all of them train the same objective) and tfvae (b)'s ratio to
each PyTorch loop and to the fastest.
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
flags.DEFINE_bool("torch", True, "Also time the PyTorch loops (needs torch installed).")
flags.DEFINE_bool("torch_compile", True,
                  "Also time the PyTorch loop under torch.compile (needs a C++ compiler).")
flags.DEFINE_bool("mixed_precision", False,
                  "Also time tfvae (b) under --mixed_precision (bfloat16 on a CPU, float16 on a"
                  " GPU).")
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


def tfvae_trainer(x, hidden, activation, batch_size, mixed_precision=False,
                  dynamic_binarization=False, strategy=None, steps_per_call=None):
  """tfvae as bin/train runs it: Keras's Adam under tfvae.Runtime(), the machine's defaults.

  The pipeline binarizes x afresh each epoch if dynamic_binarization (as bin/train does for
  MNIST), else feeds x as it is. `strategy` is a tfvae.runtime strategy name ("mirrored"...),
  under which the model is built and fed batches; steps_per_call overrides the runtime's
  choice. Returns (run_epoch, examples per epoch); run_epoch() trains one epoch and returns
  (seconds, mean training loss).
  """
  import dataclasses

  import keras

  import tfvae
  from tfvae import data, training
  keras.utils.set_random_seed(0)
  runtime = tfvae.Runtime(strategy=strategy or "default", mixed_precision=mixed_precision)
  if steps_per_call:
    runtime = dataclasses.replace(runtime, steps_per_execution=steps_per_call)
  distribution = runtime.make_strategy()
  pipeline, steps_per_call = runtime.training_stream(
      x, batch_size, seed=0, dynamic_binarization=dynamic_binarization, strategy=distribution)
  with runtime.scope(distribution):
    vae = tfvae.VAE(tfvae.ModelConfig(latent_size=20, hidden_sizes=(hidden,),
                                      activation=activation))
    vae.compile(optimizer=training.make_optimizer(tfvae.TrainConfig(batch_size=batch_size)))
  steps = data.steps_per_epoch(len(x), batch_size)
  epochs = []  # (seconds, mean training loss)

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epochs.append((time.perf_counter() - self.start, logs["loss"]))

  def run_epoch():
    with runtime.attach(vae, steps_per_call):
      vae.fit(pipeline, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Timer()],
              shuffle=False)  # the pipeline shuffles, as in train()
    return epochs[-1]

  return run_epoch, steps * batch_size


# PyTorch's Adam implementations: "for-loop" is what torch.optim.Adam runs on the CPU when neither
# flag is given (per parameter, a dozen element-wise ops); "fused" is one kernel per step for all
# parameters, as tfvae's Adam is one kernel per variable.
TORCH_ADAM = {"for-loop": {"foreach": False, "fused": False}, "fused": {"fused": True}}


def torch_trainer(x, adam="fused", compiled=False, batch_size=128):
  """The PyTorch examples' VAE, trained the fastest way a PyTorch user would write it.

  Tensors preloaded, a fresh permutation each epoch, full batches only (as tfvae trains).
  `adam` names a TORCH_ADAM implementation; `compiled` puts the forward pass and the loss
  under torch.compile (inductor, which needs a C++ compiler; AOTAutograd compiles the backward).
  On a machine with a CUDA GPU the model, the data and the permutations live on the GPU.
  Returns (run_epoch, examples per epoch, torch version, where it runs: its CPU threads or
  "cuda"); run_epoch() trains one epoch (or its first `steps` steps) and returns (seconds, mean
  training loss).
  """
  import torch
  from torch import nn
  from torch.nn import functional

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"

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

  model = VAE().to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **TORCH_ADAM[adam])
  data = torch.from_numpy(x.reshape(len(x), 784).astype(np.float32) / np.float32(255)).to(device)
  steps_per_epoch = len(data) // batch_size

  def batch_loss(batch):
    logits, mu, logvar = model(batch)
    bce = functional.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kl) / len(batch)

  if compiled:
    batch_loss = torch.compile(batch_loss)

  def run_epoch(steps=steps_per_epoch):
    start = time.perf_counter()
    order = torch.randperm(len(data), device=device)
    total = torch.zeros([], device=device)
    for i in range(steps):
      loss = batch_loss(data[order[i * batch_size:(i + 1) * batch_size]])
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      total += loss.detach()
    mean_loss = total.item() / steps  # waits for the GPU, if any, to finish the epoch
    return time.perf_counter() - start, mean_loss

  where = "cuda" if device == "cuda" else f"{torch.get_num_threads()} threads"
  return run_epoch, steps_per_epoch * batch_size, torch.__version__, where


def interleaved_rates(trainers, rounds):
  """Examples/s of each trainer, the median over `rounds` rounds of one epoch each, in turn.

  `trainers` maps a label to (run_epoch, examples per epoch, ...): run_epoch() trains one
  epoch and returns (seconds, mean training loss).

  One warm-up epoch each first (it also compiles whatever compiles). Taking turns epoch by
  epoch exposes every trainer to the same phases of a noisy machine; a short pause between turns
  lets the last one's threads go idle.

  Returns:
    {label: (examples/s, the last epoch's mean training loss)}.
  """
  epochs = {label: [] for label in trainers}
  for round_index in range(rounds + 1):
    for label, (run_epoch, *_) in trainers.items():
      seconds, loss = run_epoch()
      if round_index:
        epochs[label].append((seconds, loss))
      time.sleep(0.2)
  return {label: (examples / statistics.median(seconds for seconds, _ in epochs[label]),
                  epochs[label][-1][1])
          for label, (_, examples, *_) in trainers.items()}


def main(argv):
  del argv
  import tensorflow as tf

  import tfvae
  from tfvae import data, runtime
  if FLAGS.ceiling_only:
    print(matmul_ceiling())
    return
  # Threads per op as train() sets them, before TensorFlow runs its first op.
  tfvae.Runtime().configure_threads()
  mnist = data.load("mnist", validation_examples=0)
  # Binarized once, held as tfvae holds images (uint8 0/255, scaled inside its step); the
  # PyTorch loop gets the same pixels as preloaded float32 0/1.
  x = data.eval_arrays(mnist.x_train[:FLAGS.examples], bernoulli=True, binary=False)
  own_threads = matmul_ceiling()
  default_threads = default_threads_ceiling()
  ceiling = max(own_threads, default_threads)
  model_b = "(b) 784-400-20-400-784, ReLU, M=128"
  models = {"(a) paper MLP 784-500-20, tanh, M=100": (500, "tanh", 100),
            model_b: (400, "relu", 128)}
  # label -> (run_epoch, examples per epoch, hidden units)
  trainers = {f"tfvae {label}": (*tfvae_trainer(x, *settings), settings[0])
              for label, settings in models.items()}
  if FLAGS.mixed_precision:
    settings = models[model_b]
    trainers[f"tfvae (b), {runtime.mixed_precision_policy()}"] = (
        *tfvae_trainer(x, *settings, mixed_precision=True), settings[0])
  if FLAGS.torch:
    trainers.update(torch_trainers(x))
  results = interleaved_rates(trainers, FLAGS.epochs)
  print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, intra-op threads"
        f" {tf.config.threading.get_intra_op_parallelism_threads() or 'default'};"
        f" matmul ceiling for (b)'s shapes: {ceiling:.0f} GFLOP/s (graph mode; the better of"
        f" {own_threads:.0f} with these threads and {default_threads:.0f} with TensorFlow's"
        f" default threads)\n")
  print("| trainer | examples/s | GFLOP/s | % of ceiling | training loss, last epoch |\n"
        "|---|---|---|---|---|")
  for label, (rate, loss) in results.items():
    hidden = trainers[label][2]
    gflops = 6 * (dense_macs([784, hidden, 40]) + dense_macs([20, hidden, 784])) * rate / 1e9
    print(f"| {label} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / ceiling:.0f}% |"
          f" {loss:.2f} |")
  tfvae_b = results[f"tfvae {model_b}"][0]
  torch_rates = {label: rate for label, (rate, _) in results.items()
                 if label.startswith("PyTorch")}
  for label, rate in torch_rates.items():
    print(f"\ntfvae (b) / {label}: {tfvae_b / rate:.2f}x (ratio of medians)")
  if torch_rates:
    print(f"\ntfvae (b) / the fastest PyTorch loop: {tfvae_b / max(torch_rates.values()):.2f}x")


def torch_trainers(x):
  """{label: (run_epoch, examples per epoch, 400)} for the PyTorch loops that run here."""
  variants = [("for-loop", False), ("fused", False)]
  if FLAGS.torch_compile:
    variants.append(("fused", True))
  trainers = {}
  for adam, compiled in variants:
    try:
      run_epoch, examples, version, where = torch_trainer(x, adam, compiled)
    except ImportError:
      print("torch is not installed: pip install torch==2.13.0 for the comparison")
      return {}
    label = (f"PyTorch {version} ({where}) (b), {adam} Adam"
             + (", torch.compile" if compiled else ""))
    if compiled:
      try:
        run_epoch(steps=1)  # compiles (about 20 s here): a failure shows before the rounds
      except Exception as e:  # noqa: BLE001  (inductor raises many kinds; the row is optional)
        print(f"torch.compile failed, {label} left out: {type(e).__name__}: {e}")
        continue
    trainers[label] = (run_epoch, examples, 400)
  return trainers


if __name__ == "__main__":
  app.run(main)
