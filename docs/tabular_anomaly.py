"""Anomaly detection on tabular data: train on normal rows, serve scores, measure the AUROC.

  python docs/tabular_anomaly.py [--workdir=/tmp/tabular]

Generates sensor-like rows: 16 features in raw units (offsets of 1000, spreads of 50) that
depend on 3 hidden factors through a nonlinear map, plus noise. The training file holds normal
rows only; the test rows mix normal rows with two kinds of planted outliers: rows of the same
per-feature means and spreads whose features do not move together as the normal ones do, and
normal rows with one feature moved by half its spread (a subtle fault, each value of it still
common on its own). A VAE (16-64-64-3,
Gaussian likelihood on standardized features) trains on the npz as bin/train would, is
exported, and the SavedModel's anomaly_score signature (-ELBO in bits, a bound on -log2 p(x), on
raw rows [B, 16]) scores the test rows. Prints the AUROC of outliers against normal rows.
"""

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

FEATURES, FACTORS = 16, 3


def make_rows(rng: np.random.Generator, count: int) -> np.ndarray:
  """Normal rows [count, FEATURES]: a fixed nonlinear map of FACTORS hidden factors, plus noise."""
  mixing = np.random.default_rng(1234).normal(size=(2 * FACTORS, FEATURES))
  factors = rng.normal(size=(count, FACTORS))
  clean = np.concatenate([factors, np.tanh(2 * factors)], axis=1) @ mixing
  return (1000.0 + 50.0 * (clean + 0.1 * rng.normal(size=clean.shape))).astype(np.float32)


def make_outliers(rng: np.random.Generator, normal: np.ndarray, count: int) -> np.ndarray:
  """Rows with each feature's normal mean and spread, but independent features."""
  return (normal.mean(axis=0) + normal.std(axis=0) * rng.normal(size=(count, FEATURES))).astype(
      np.float32)


def shift_one_feature(rng: np.random.Generator, normal: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """rows with one random feature each moved up or down by half that feature's spread."""
  moved = rows.copy()
  feature = rng.integers(0, FEATURES, len(rows))
  sign = rng.choice([-1.0, 1.0], len(rows))
  moved[np.arange(len(rows)), feature] += sign * 0.5 * normal.std(axis=0)[feature]
  return moved


def auroc(normal_scores: np.ndarray, outlier_scores: np.ndarray) -> float:
  """P(an outlier scores above a normal row), ties counting half."""
  greater = (outlier_scores[:, None] > normal_scores[None, :]).mean()
  ties = (outlier_scores[:, None] == normal_scores[None, :]).mean()
  return float(greater + 0.5 * ties)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/tfvae_tabular")
  parser.add_argument("--epochs", type=int, default=40)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  rng = np.random.default_rng(0)
  train_rows, normal_test = make_rows(rng, 20_000), make_rows(rng, 2_000)
  outliers = make_outliers(rng, train_rows, 200)
  shifted = shift_one_feature(rng, train_rows, make_rows(rng, 200))
  path = workdir / "sensors.npz"
  np.savez(path, x_train=train_rows, x_test=normal_test)

  import tensorflow as tf

  import tfvae
  from tfvae import data, export, training

  dataset = data.load(f"npz:{path}")
  config = training.model_config_for(dataset, latent_size=FACTORS, hidden_sizes=(64, 64),
                                     likelihood="gaussian")
  result = training.train(config, tfvae.TrainConfig(epochs=args.epochs, batch_size=100),
                          workdir / "run", dataset=dataset, runtime=tfvae.Runtime(),
                          verbose=0, restart=True)
  exported = export.export(result.vae, workdir / "models", "sensors",
                           warmup_images=export.warmup_images(dataset, "gaussian"))
  score = tf.saved_model.load(str(exported)).signatures["anomaly_score"]
  normal_scores = score(x=tf.constant(normal_test))["anomaly_score"].numpy()
  print(f"test ELBO of normal rows: {result.test_metrics['elbo']:.2f} nats; median score"
        f" {np.median(normal_scores):.1f} bits")
  for name, rows in (("independent features", outliers), ("one feature moved", shifted)):
    scores = score(x=tf.constant(rows))["anomaly_score"].numpy()
    print(f"{name}: median score {np.median(scores):.1f} bits, AUROC against normal rows"
          f" {auroc(normal_scores, scores):.4f}")


if __name__ == "__main__":
  main()
