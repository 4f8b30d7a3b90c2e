#!/usr/bin/env python3
"""Colour kept: which likelihoods, latents and schedules reconstruct CIFAR-10 in colour.

  python bench/colour.py                        # the table of docs/BENCHMARKS.md
  python bench/colour.py --runs='gaussian dense 40' --runs='gaussian spatial 14 lr=2e-3'

Each run trains a VAE (the conv net of conv_channels 16,32,64, or the MLP; Adam, batch 50) on
2,000 CIFAR-10 training JPEGs (200 a class, decoded with PIL) and reconstructs 200 test JPEGs
(20 a class), as tests/test_model.py's colour test does. Prints a Markdown row per run:
  - colour ratio: the mean over pixels of max - min across R, G and B, reconstructions over
    originals (0 for grey reconstructions);
  - R-B correlation: across test images, of the mean red-minus-blue of an original and of its
    reconstruction (about 0 where the colour is lost);
  - the last epoch's KL in nats (near 0: the posterior collapsed onto the prior).

A run is `LIKELIHOOD NET EPOCHS [key=value ...]`: NET is dense (the conv net, z of 32 through a
Dense layer), spatial (the conv net, z an 8x8x16 map: --spatial_latent) or mlp (the MLP of one
hidden layer of 500, z of 32); keys: lr (default 2e-3), warmup (kl_warmup_steps), size (16
averages 2x2 blocks of the 32x32 images), coupled (1 couples the discretized logistic's
channels), scale (gaussian_fixed's observation_scale, default 0.1).
"""

import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("folder", str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"),
                    "The CIFAR-10 JPEG folder (train/ and test/ of class folders).")
flags.DEFINE_multi_string("runs", [
    "discretized_logistic dense 14", "discretized_logistic spatial 14 coupled=1 lr=1e-3",
    "discretized_logistic spatial 14 coupled=1", "discretized_logistic spatial 14 coupled=1"
    " warmup=200", "gaussian_fixed dense 14", "gaussian dense 14", "gaussian dense 40",
    "gaussian dense 40 size=16", "gaussian spatial 14 lr=1e-3", "gaussian spatial 14",
    "gaussian spatial 14 warmup=200", "bernoulli dense 14", "bernoulli dense 40",
    "bernoulli dense 40 size=16", "discretized_logistic mlp 14", "gaussian_fixed mlp 14",
    "gaussian mlp 14"], "The runs, in order.")
FLAGS = flags.FLAGS


def _images(folder: pathlib.Path, split: str, per_class: int) -> np.ndarray:
  from PIL import Image
  paths = [path for klass in sorted((folder / split).iterdir())
           for path in sorted(klass.glob("*.jpg"))[:per_class]]
  return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def _colourfulness(images: np.ndarray) -> np.ndarray:
  return (images.max(axis=-1) - images.min(axis=-1)).mean(axis=(1, 2))  # [N]


def _halved(images: np.ndarray) -> np.ndarray:
  """[N, 32, 32, 3] -> [N, 16, 16, 3], the mean of each 2x2 block."""
  blocks = images.reshape(len(images), 16, 2, 16, 2, 3).astype(np.float32)
  return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def run(spec: str, train_images: np.ndarray, test_images: np.ndarray) -> str:
  import keras

  import tfvae
  from tfvae import data
  likelihood, net, epochs, *settings = spec.split()
  options = dict(setting.split("=") for setting in settings)
  if options.get("size") == "16":
    train_images, test_images = _halved(train_images), _halved(test_images)
  spatial = net == "spatial"
  keras.utils.set_random_seed(0)
  config = tfvae.ModelConfig(
      image_shape=train_images.shape[1:], latent_size=1024 if spatial else 32,
      spatial_latent=spatial, architecture="mlp" if net == "mlp" else "conv",
      conv_channels=(16, 32, 64), hidden_sizes=(500,),
      likelihood=likelihood, coupled_channels=options.get("coupled") == "1",
      observation_scale=(float(options.get("scale", 0.1)) if likelihood == "gaussian_fixed"
                         else None),
      kl_warmup_steps=int(options.get("warmup", 0)))
  vae = tfvae.VAE(config)
  vae.compile(optimizer=keras.optimizers.Adam(float(options.get("lr", 2e-3))))
  train = data.train_pipeline(train_images, 50, seed=0,
                              dynamic_binarization=likelihood == "bernoulli")
  start = time.perf_counter()
  history = vae.fit(train, epochs=int(epochs),
                    steps_per_epoch=data.steps_per_epoch(len(train_images), 50),
                    shuffle=False, verbose=0).history
  seconds = time.perf_counter() - start
  x = test_images / 255.0
  reconstruction = vae.reconstruct(test_images).numpy()
  ratio = _colourfulness(reconstruction).mean() / _colourfulness(x).mean()
  red_minus_blue = [(images[..., 0] - images[..., 2]).mean(axis=(1, 2))
                    for images in (x, reconstruction)]
  correlation = (np.corrcoef(*red_minus_blue)[0, 1] if np.std(red_minus_blue[1]) > 1e-6
                 else 0.0)  # constant reconstructions: no colour to correlate
  return (f"| `{spec}` | {ratio:.2f} | {correlation:.3f} | {history['kl'][-1]:.1f} |"
          f" {seconds:.0f} |")


def main(argv):
  del argv
  folder = pathlib.Path(FLAGS.folder)
  train_images, test_images = _images(folder, "train", 200), _images(folder, "test", 20)
  print("| run | colour ratio | R-B correlation | KL (nats) | seconds |")
  print("|---|---|---|---|---|")
  for spec in FLAGS.runs:
    print(run(spec, train_images, test_images), flush=True)


if __name__ == "__main__":
  app.run(main)
