"""What each piece of tfvae.runtime buys bin/train: an interleaved A/B, one epoch per trainer.

  TFVAE_DATA_DIR=../shared/data python bench/runtime.py --rounds=6
  python bench/runtime.py --model=conv --rounds=5   # the pieces that matter to a conv net

bin/train's default run (MNIST binarized afresh each epoch, 784-500-20 ReLU MLP, M = 100,
Adam 1e-3) timed as bin/train trains it and with one piece changed at a time. Threads per op
are fixed for a process, so each round starts one process per thread setting, one after the
other; inside a process each trainer first trains a warm-up epoch (tracing), then every trainer
trains one timed epoch in turn. The table gives each trainer's median examples/s over the
rounds and its ratio to the default. Results: docs/BENCHMARKS.md.

--model=conv times a CIFAR-10 conv net instead (32x32x3, conv_channels 16,32,64 as in
configs/cifar10_conv.flags, but a 64-d latent through Dense layers and uncoupled channels, as
that file had them when the table was made; batch 64) on 6,400 random 8-bit images, 100 steps
an epoch: a convolution's cost does not depend on the pixel values.
"""

import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("rounds", 6, "Timed rounds (each a fresh process per thread setting).")
flags.DEFINE_enum("model", "mlp", ["mlp", "conv"], "bin/train's default MLP on MNIST, or the"
                  " CIFAR-10 conv net on random pixels.")
flags.DEFINE_string("worker", None, "Internal: run one round of this process's trainers.")
FLAGS = flags.FLAGS

DEFAULT = "bin/train's Runtime(): blocks of 100 steps, 2 shards, 1 thread per op, fused Adam"
# process (threads per op) -> trainers: name -> (Runtime changes, other changes).
PROCESSES = {
    "one thread per op": {
        DEFAULT: ({}, {}),
        "steps per call as batches (Keras's multi-step function)": ({}, {"blocks": False}),
        "Keras's Adam update": ({"fused_adam": False}, {}),
        "whole batches (1 shard), 1 thread per op": ({"step_shards": 1}, {}),
        "tfd.Bernoulli's log_prob": ({}, {"tfd_bernoulli": True}),
    },
    "TensorFlow's threads": {
        "whole batches (1 shard), TensorFlow's threads per op": ({"step_shards": 1}, {}),
        "Runtime.plain(): Keras as it comes, 1 step per call": (None, {}),
    },
}
# The conv net's pieces: the default now includes the XLA group norm.
CONV_PROCESSES = {
    "one thread per op": {
        "the default, with XLA group norm (Runtime.fused_group_norm)": ({}, {}),
        "Keras's GroupNormalization": ({"fused_group_norm": False}, {}),
        "Keras's Adam update": ({"fused_adam": False}, {}),
        "whole batches (1 shard), 1 thread per op": ({"step_shards": 1}, {}),
    },
    "TensorFlow's threads": {
        "whole batches (1 shard), TensorFlow's threads per op": ({"step_shards": 1}, {}),
    },
}


def _processes():
  return CONV_PROCESSES if FLAGS.model == "conv" else PROCESSES


def _model_and_data():
  """(ModelConfig, uint8 training images, batch size, dynamic binarization) of --model."""
  import numpy as np

  import tfvae
  from tfvae import data
  if FLAGS.model == "conv":
    images = np.random.default_rng(0).integers(0, 256, (6400, 32, 32, 3), dtype=np.uint8)
    return (tfvae.ModelConfig(image_shape=(32, 32, 3), latent_size=64, architecture="conv",
                              conv_channels=(16, 32, 64), likelihood="discretized_logistic"),
            images, 64, False)
  return tfvae.ModelConfig(), data.load("mnist", validation_examples=0).x_train, 100, True


@contextlib.contextmanager
def _likelihood(tfd_bernoulli: bool):
  """While tracing: the Bernoulli likelihood as tfvae builds it, or through tfd.Bernoulli."""
  import dataclasses

  import tensorflow_probability as tfp

  from tfvae import distributions
  saved = distributions.LIKELIHOODS["bernoulli"]
  if tfd_bernoulli:
    tfd = tfp.distributions
    distributions.LIKELIHOODS["bernoulli"] = dataclasses.replace(saved, build=lambda p, _: (
        tfd.Independent(tfd.Bernoulli(logits=p, dtype=p.dtype), reinterpreted_batch_ndims=3)))
  try:
    yield
  finally:
    distributions.LIKELIHOODS["bernoulli"] = saved


def _worker(process: str) -> dict[str, float]:
  import dataclasses

  import keras

  import tfvae
  from tfvae import data
  threads = 1 if process == "one thread per op" else 0
  base = tfvae.Runtime(step_shards=2 if threads else 1, intra_op_threads=threads)
  base.configure_threads()
  config, images, batch_size, binarize = _model_and_data()
  steps = data.steps_per_epoch(len(images), batch_size)
  strategy = base.make_strategy()
  epochs = {}
  with contextlib.ExitStack() as stack:
    for name, (changes, other) in _processes()[process].items():
      runtime = tfvae.Runtime.plain() if changes is None else dataclasses.replace(base, **changes)
      vae = tfvae.VAE(config)
      step_flops = tfvae.networks.training_flops(config, vae.encoder.network,
                                                 vae.decoder.network, batch_size)
      batches, steps_per_call = runtime.training_stream(
          images, batch_size, seed=0, dynamic_binarization=binarize, strategy=strategy,
          step_flops=step_flops)
      vae.compile(optimizer=keras.optimizers.Adam(1e-3))
      stack.enter_context(runtime.attach(vae, steps_per_call))
      if not other.get("blocks", True):  # Keras's own multi-step function, over batches
        batches = data.train_pipeline(images, batch_size, seed=0, dynamic_binarization=binarize,
                                      parallel_calls=runtime.pipeline_threads)
        vae.train_function = None

      def epoch(vae=vae, batches=batches):
        start = time.perf_counter()
        vae.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        return steps * batch_size / (time.perf_counter() - start)

      with _likelihood(other.get("tfd_bernoulli", False)):
        epoch()  # warm-up: traces the step
      epochs[name] = epoch
    return {name: epoch() for name, epoch in epochs.items()}


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(_worker(FLAGS.worker)))
    return
  results: dict[str, list[float]] = {}
  for round_ in range(FLAGS.rounds):
    for process in _processes():
      output = subprocess.run([sys.executable, __file__, f"--worker={process}",
                               f"--model={FLAGS.model}"], check=True,
                              capture_output=True, text=True).stdout
      for name, value in json.loads(output.strip().splitlines()[-1]).items():
        results.setdefault(name, []).append(value)
    print(f"round {round_ + 1}: " + ", ".join(f"{v[-1]:,.0f}" for v in results.values()),
          flush=True)
  default = statistics.median(next(iter(results.values())))
  print("\n| trainer | examples/s (median) | against the default | each round |")
  print("|---|---|---|---|")
  for name, values in results.items():
    median = statistics.median(values)
    print(f"| {name} | {median:,.0f} | {median / default:.3f} |"
          f" {' / '.join(f'{v:,.0f}' for v in values)} |")


if __name__ == "__main__":
  app.run(main)
