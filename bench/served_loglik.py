"""Test log p(x) through an export's log_likelihood signature, on MNIST test images binarized
here, independently of tfvae's own fixed binarization.

  python bench/served_loglik.py savedmodels/burda_vae_2h/1 [--seed=123] [--num_samples=5000]

Reads the MNIST test images with tfvae.data (from $TFVAE_DATA_DIR, sha256-checked), binarizes
every pixel once with numpy (Bernoulli of its intensity), scores all 10,000 images in requests
of 20 and prints the mean log p(x) with its standard error.
"""

import argparse
import pathlib
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tfvae import data  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("export")
  parser.add_argument("--seed", type=int, default=123)
  parser.add_argument("--num_samples", type=int, default=5000)
  args = parser.parse_args()
  images = data.load("mnist").x_test  # uint8 [10000, 28, 28, 1]
  x = (np.random.default_rng(args.seed).random(images.shape) < images / 255).astype(np.float32)
  signature = tf.saved_model.load(args.export).signatures["log_likelihood"]
  start, scores = time.perf_counter(), []
  for i in range(0, len(x), 20):  # 20 x 5000 samples: within the export's request limit
    scores.append(signature(x=tf.constant(x[i:i + 20]),
                            num_samples=tf.constant(args.num_samples),
                            seed=tf.constant(i, tf.int64))["log_likelihood"].numpy())
  scores = np.concatenate(scores)
  print(f"{args.export}: {len(scores)} test images binarized with seed {args.seed},"
        f" K={args.num_samples}: log p(x) {scores.mean():.2f} (standard error"
        f" {scores.std() / np.sqrt(len(scores)):.2f}), {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
