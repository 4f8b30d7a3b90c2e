#!/usr/bin/env python3
"""Test log-likelihood of a single-stochastic-layer model, on the protocol of Burda et al. (2015).

  python bench/loglik.py --objective=elbo --epochs=40
  python bench/loglik.py --objective=iwae --num_samples=50 --epochs=3

MNIST binarized afresh each epoch for training; the test set binarized once with tfvae's fixed
seed; log p(x) estimated with K = --eval_num_samples importance samples (5000 in the paper) on
the first --test_examples test images. Prints one JSON line with the numbers, the epochs and the
wall time of training and of evaluation.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("objective", "elbo", ["elbo", "iwae"], "Training bound.")
flags.DEFINE_integer("num_samples", 1, "K of the training bound (1 for the VAE).")
flags.DEFINE_integer("epochs", 40, "Training epochs.")
flags.DEFINE_list("hidden_sizes", ["500"], "Hidden widths.")
flags.DEFINE_integer("latent_size", 50, "Latent size (50 in Burda et al.).")
flags.DEFINE_float("learning_rate", 1e-3, "Adam step size.")
flags.DEFINE_integer("eval_num_samples", 5000, "K of the test log-likelihood.")
flags.DEFINE_integer("test_examples", 10000, "How many test images to score.")
flags.DEFINE_string("workdir", "/tmp/tfvae_bench_loglik", "Scratch folder.")
flags.DEFINE_string("data_dir", None, "Data folder (default $TFVAE_DATA_DIR).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import tfvae
  from tfvae import data, evaluation, training

  dataset = data.load("mnist", FLAGS.data_dir, validation_examples=0)
  model_config = training.model_config_for(
      dataset, latent_size=FLAGS.latent_size,
      hidden_sizes=tuple(int(h) for h in FLAGS.hidden_sizes), objective=FLAGS.objective,
      num_samples=FLAGS.num_samples)
  train_config = tfvae.TrainConfig(epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate)
  start = time.time()
  result = training.train(model_config, train_config, FLAGS.workdir, dataset=dataset, verbose=2)
  train_seconds = time.time() - start
  x_test = data.eval_arrays(dataset.x_test[:FLAGS.test_examples], True, False)
  start = time.time()
  metrics = evaluation.evaluate(result.vae, x_test, FLAGS.eval_num_samples, batch_size=100)
  print(json.dumps({
      "objective": FLAGS.objective, "train_num_samples": FLAGS.num_samples,
      "hidden_sizes": FLAGS.hidden_sizes, "latent_size": FLAGS.latent_size,
      "epochs": FLAGS.epochs, "train_seconds": round(train_seconds),
      "test_examples": len(x_test), "eval_num_samples": FLAGS.eval_num_samples,
      "test_log_likelihood": round(metrics["log_likelihood"], 2),
      "test_elbo": round(metrics["elbo"], 2), "eval_seconds": round(time.time() - start),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))


if __name__ == "__main__":
  app.run(main)
