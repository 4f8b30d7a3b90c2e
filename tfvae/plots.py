"""Image grids as PNG files: reconstructions, samples and 2-D latent manifolds."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image
from scipy import stats

from tfvae.data import to_unit_float
from tfvae.files import atomic_path


def image_grid(images: np.ndarray, columns: int, padding: int = 1) -> np.ndarray:
  """Tiles images [N, H, W, C] in [0, 1] into one uint8 picture [rows*(H+p)-p, cols*(W+p)-p, C]."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  count, height, width, channels = images.shape
  rows = -(-count // columns)
  grid = np.ones((rows * (height + padding) - padding, columns * (width + padding) - padding,
                  channels), np.float32)
  for i, image in enumerate(images):
    top, left = (i // columns) * (height + padding), (i % columns) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return np.round(grid * 255).astype(np.uint8)


def save_png(picture: np.ndarray, path: str | os.PathLike, scale: int = 2) -> pathlib.Path:
  """Writes a uint8 [H, W, C] picture, enlarged `scale` times, atomically to `path`."""
  mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(picture.shape[-1], "RGB")
  if picture.shape[-1] > 4:  # more channels than a PNG holds: the first three
    picture = picture[..., :3]
  image = Image.fromarray(picture[..., 0] if mode == "L" else picture, mode=mode)
  image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  with atomic_path(path) as temporary:
    image.save(temporary, format="PNG")
  return pathlib.Path(path)


def save_reconstructions(vae, x: np.ndarray, path, count: int = 32) -> pathlib.Path:
  """Rows of originals above their reconstructions E[x|z = E[z|x]]."""
  x = to_unit_float(x[:count]).numpy()
  reconstructions = vae.reconstruct(x).numpy()
  columns = min(len(x), 8)
  pairs = []
  for start in range(0, len(x), columns):
    pairs += [x[start:start + columns], reconstructions[start:start + columns]]
  return save_png(image_grid(np.concatenate(pairs), columns), path)


def save_samples(vae, path, count: int = 64, seed: int = 0) -> pathlib.Path:
  """Means of p(x|z) for z ~ N(0, I)."""
  return save_png(image_grid(vae.sample(count, seed=seed).numpy(), int(np.sqrt(count))), path)


def save_manifold(vae, path, steps: int = 20) -> pathlib.Path:
  """Kingma & Welling, Figure 4: means of p(x|z) over a 2-D latent grid.

  The grid's coordinates are Normal quantiles of evenly spaced probabilities in (0, 1), so the
  picture covers the prior's mass evenly.

  Raises:
    ValueError: the model's latent space is not 2-D.
  """
  if vae.model_config.latent_size != 2:
    raise ValueError(f"the manifold needs latent_size=2, not {vae.model_config.latent_size}")
  quantiles = stats.norm.ppf(np.linspace(0.05, 0.95, steps)).astype(np.float32)
  z = np.stack(np.meshgrid(quantiles, quantiles[::-1]), axis=-1).reshape(-1, 2)  # [steps^2, 2]
  images = vae.decoder(z).mean().numpy()
  return save_png(image_grid(images, steps, padding=0), path, scale=1)


def save_learning_curves(curves: dict[str, list[dict[str, float]]], path, title: str,
                         ylabel: str = "lower bound per datapoint (nats)") -> pathlib.Path:
  """Kingma & Welling, Figure 2: train (solid) and test (dashed) bound vs samples seen.

  Args:
    curves: label -> rows with "samples_seen", "train_elbo", "test_elbo".
  """
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  figure, axes = plt.subplots(figsize=(5, 3.6), dpi=100)
  for index, (label, rows) in enumerate(curves.items()):
    color = f"C{index}"
    seen = [row["samples_seen"] for row in rows]
    axes.plot(seen, [row["train_elbo"] for row in rows], color=color, label=f"{label} train")
    axes.plot(seen, [row["test_elbo"] for row in rows], color=color, linestyle="--",
              label=f"{label} test")
  axes.set_xscale("log")
  axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes.set_xlabel("# training samples evaluated")
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=6, ncol=2)
  figure.tight_layout()
  with atomic_path(path) as temporary:
    figure.savefig(temporary)
  plt.close(figure)
  return pathlib.Path(path)
