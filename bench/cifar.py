#!/usr/bin/env python3
"""CIFAR-10 from its JPEG folder: test bits/dim after fixed training budgets, tfvae and PyTorch.

  pip install torch   # only for the comparison; not a tfvae dependency
  python bench/cifar.py --budgets=10,30
  python bench/cifar.py --export=savedmodels/cifar10_conv/1   # score an export of bin/train
  python bench/cifar.py --pictures_of=/tmp/cifar_models/tfvae_30min.keras  # docs/cifar10/*.png

Both trainers train the same model on the same decoded pixels (the JPEGs of
../shared/data/cifar10-jpeg decoded once with PIL, uint8): the conv VAE of
configs/cifar10_conv.flags (tfvae.networks: a residual net of conv_channels 16,32,64, group
normalization in the residual branches, z an 8x8x16 map) with the discretized logistic
likelihood of R, G and B coupled as in PixelCNN++, batch 64, Adam 1e-3 at a constant rate,
so a run's state at 10 minutes is what a 10-minute budget gives. The PyTorch peer is that
network written as a PyTorch user would: nn.Modules, a uint8 tensor in memory indexed by a
fresh permutation each epoch, fused Adam, and torch.compile when it trains faster than eager
on this machine (checked first, in a short trial, outside the budget).

A budget is training time, after each trainer's first step (tracing, compiling). The trainers
take turns: tfvae trains for the largest budget, its weights kept at each smaller one, then
PyTorch does the same. Each kept model is then scored on the same test images: importance-
sampled log p(x) with K samples (--num_samples), as bits/dim = -log2 p(x) / 3072 of the 8-bit
values, and the ELBO. The factorized baseline is a 256-bin histogram per pixel-channel of the
training images (add-one smoothing). Prints a Markdown table.
"""

import copy
import json
import math
import os
import pathlib
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("folder", str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"),
                    "The CIFAR-10 JPEG folder (train/ and test/ of class folders).")
flags.DEFINE_list("budgets", ["10", "30"], "Training budgets in minutes.")
flags.DEFINE_integer("test_examples", 1000, "Test images scored (the first of each class).")
flags.DEFINE_integer("num_samples", 100, "K of the importance-sampled log-likelihood.")
flags.DEFINE_list("conv_channels", ["16", "32", "64"], "The conv net's stage widths.")
flags.DEFINE_integer("latent_size", 1024, "Dimension of z (with --spatial_latent, 16 channels"
                     " on the 8x8 grid).")
flags.DEFINE_bool("coupled_channels", True, "A pixel's R, G and B coupled in order, as in"
                  " PixelCNN++ (bin/train's --coupled_channels).")
flags.DEFINE_bool("spatial_latent", True, "z a map on the coarsest grid (bin/train's"
                  " --spatial_latent); --latent_size a multiple of its cells.")
flags.DEFINE_bool("torch", True, "Also train the PyTorch peer (needs torch installed).")
flags.DEFINE_enum("trainer", None, ["tfvae", "torch"], "Run one trainer and print its rows"
                  " as JSON (what the table run does in a subprocess per trainer).")
flags.DEFINE_string("export", None, "Instead of training: score this exported SavedModel's"
                    " log_likelihood signature on the test JPEGs, decoded here with PIL, against"
                    " the factorized baseline.")
flags.DEFINE_string("pictures_of", None, "Instead of training: write reconstructions of the"
                    " test images and samples of this .keras model (from --out) to docs/cifar10/.")
flags.DEFINE_string("out", None, "Folder for the kept tfvae models (.keras), default none.")
FLAGS = flags.FLAGS

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
PIXELS = 32 * 32 * 3


def _conv_channels() -> tuple[int, ...]:
  return tuple(int(c) for c in FLAGS.conv_channels)


def decode(folder: pathlib.Path, split: str, per_class: int | None = None) -> np.ndarray:
  """uint8 [N, 32, 32, 3]: the split's JPEGs, class by class, sorted, decoded with PIL."""
  from PIL import Image
  paths = [path for klass in sorted((folder / split).iterdir())
           for path in sorted(klass.glob("*.jpg"))[:per_class]]
  return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def histogram_bits_per_dim(train: np.ndarray, test: np.ndarray) -> float:
  """The factorized baseline: each pixel-channel's 256-bin histogram of train, add-one."""
  flat_train, flat_test = train.reshape(len(train), -1), test.reshape(len(test), -1)
  counts = np.ones((flat_train.shape[1], 256))
  for column in range(flat_train.shape[1]):
    counts[column] += np.bincount(flat_train[:, column], minlength=256)
  log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
  picked = log_p[np.arange(flat_test.shape[1])[None, :], flat_test]  # [N, D]
  return float(-picked.sum(axis=1).mean() / (PIXELS * math.log(2)))


class Budgets:
  """Training-time marks: keep(state) at each budget, stop after the last."""

  def __init__(self, minutes):
    self.marks = sorted(float(m) * 60 for m in minutes)
    self.kept = []  # (minutes, seconds, examples, state)
    self.start = None
    self.examples = 0

  def after_step(self, examples: int, state) -> bool:
    """Called after each training call; returns whether to stop."""
    if self.start is None:  # the first call traces or compiles: not timed
      self.start = time.perf_counter()
      return False
    self.examples += examples
    elapsed = time.perf_counter() - self.start
    while self.marks and elapsed >= self.marks[0]:
      self.kept.append((self.marks.pop(0) / 60, elapsed, self.examples, state()))
    return not self.marks


def train_tfvae(train: np.ndarray, budgets: Budgets):
  """tfvae as bin/train runs it (tfvae.Runtime()); returns the VAE (last kept weights)."""
  import keras

  import tfvae
  from tfvae import data, training
  runtime = tfvae.Runtime()
  runtime.configure_threads()  # before any TensorFlow op, as bin/train does
  keras.utils.set_random_seed(0)
  config = tfvae.ModelConfig(image_shape=(32, 32, 3), latent_size=FLAGS.latent_size,
                             architecture="conv", conv_channels=_conv_channels(),
                             likelihood="discretized_logistic",
                             coupled_channels=FLAGS.coupled_channels,
                             spatial_latent=FLAGS.spatial_latent)
  strategy = runtime.make_strategy()
  vae = tfvae.VAE(config)
  step_flops = tfvae.networks.training_flops(config, vae.encoder.network,
                                             vae.decoder.network, BATCH_SIZE)
  stream, steps_per_call = runtime.training_stream(
      train, BATCH_SIZE, seed=0, dynamic_binarization=False, strategy=strategy,
      step_flops=step_flops)
  vae.compile(optimizer=training.make_optimizer(
      tfvae.TrainConfig(batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE)))

  class Marks(keras.callbacks.Callback):
    steps = 0

    def on_train_batch_end(self, batch, logs=None):
      steps, self.steps = self.steps, int(vae.optimizer.iterations)  # an epoch's last call
      if budgets.after_step((self.steps - steps) * BATCH_SIZE, vae.get_weights):  # runs fewer
        self.model.stop_training = True

  with runtime.attach(vae, steps_per_call):
    vae.fit(stream, epochs=10_000, steps_per_epoch=data.steps_per_epoch(len(train), BATCH_SIZE),
            verbose=0, shuffle=False, callbacks=[Marks()])
  return vae, steps_per_call


def score_tfvae(vae, weights, test: np.ndarray, num_samples: int) -> dict:
  from tfvae import evaluation
  vae.set_weights(weights)
  metrics = evaluation.evaluate(vae, test, num_samples, seed=0, batch_size=100)
  return {"bits_per_dim": metrics["bits_per_dim"],
          "elbo_bits_per_dim": -metrics["elbo"] / (PIXELS * math.log(2))}


def torch_model():
  """The tfvae conv VAE in PyTorch: (encoder, decoder) nn.Modules."""
  conv_channels = _conv_channels()
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, channels):
      super().__init__()
      self.branch = nn.Sequential(
          nn.GroupNorm(math.gcd(channels, 8), channels, eps=1e-3), nn.ReLU(),
          nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
          nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h):
      return h + self.branch(h)

  encoder_layers = [nn.Conv2d(3, conv_channels[0], 3, padding=1)]
  for i, channels in enumerate(conv_channels):
    if i:
      encoder_layers.append(nn.Conv2d(conv_channels[i - 1], channels, 3, stride=2, padding=1))
    encoder_layers.append(Block(channels))
  small = 32 // 2 ** (len(conv_channels) - 1)
  widths = conv_channels[::-1]
  if FLAGS.spatial_latent:  # z a map of latent_size / small^2 channels; flattened channel-major
    channels = FLAGS.latent_size // small**2
    encoder_layers += [nn.ReLU(), nn.Conv2d(conv_channels[-1], 2 * channels, 1), nn.Flatten()]
    decoder_layers = [nn.Unflatten(1, (channels, small, small)),
                      nn.Conv2d(channels, widths[0], 3, padding=1)]
  else:
    encoder_layers += [nn.ReLU(), nn.Flatten(),
                       nn.Linear(small * small * conv_channels[-1], 2 * FLAGS.latent_size)]
    decoder_layers = [nn.Linear(FLAGS.latent_size, small * small * widths[0]),
                      nn.Unflatten(1, (widths[0], small, small))]
  for i, channels in enumerate(widths):
    if i:
      decoder_layers.append(nn.ConvTranspose2d(widths[i - 1], channels, 3, stride=2, padding=1,
                                               output_padding=1))
    decoder_layers.append(Block(channels))
  outputs = 9 if FLAGS.coupled_channels else 6  # locations, raw scales (, raw coefficients)
  decoder_layers += [nn.ReLU(), nn.Conv2d(widths[-1], outputs, 3, padding=1)]
  torch.manual_seed(0)
  return nn.Sequential(*encoder_layers), nn.Sequential(*decoder_layers)


def train_torch(train: np.ndarray, budgets: Budgets):
  import torch
  encoder, decoder = torch_model()
  parameters = [*encoder.parameters(), *decoder.parameters()]
  optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, eps=1e-7, fused=True)
  data = torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]

  def step(batch):
    unit = batch.float() / 255
    loc, raw = encoder(unit).chunk(2, dim=1)
    scale = torch.nn.functional.softplus(raw + math.log(math.expm1(1.0))) + 1e-3
    kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
    z = loc + scale * torch.randn_like(loc)
    log_px = _torch_log_px(decoder(z), batch)
    loss = (kl - log_px).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  def trial(function, steps=8):
    for i in range(steps + 2):
      if i == 2:
        start = time.perf_counter()
      function(data[i * BATCH_SIZE:(i + 1) * BATCH_SIZE])
    return (time.perf_counter() - start) / steps

  snapshot = [copy.deepcopy(m.state_dict()) for m in (encoder, decoder)]
  eager = trial(step)
  try:
    compiled_step = torch.compile(step)
    compiled = trial(compiled_step)
  except Exception as e:  # noqa: BLE001  (no compiler: eager it is)
    print(f"torch.compile failed ({type(e).__name__}); eager", file=sys.stderr)
    compiled = math.inf
  how = "torch.compile" if compiled < eager else "eager"
  run = compiled_step if compiled < eager else step
  print(f"PyTorch step: eager {eager * 1e3:.0f} ms, compiled {compiled * 1e3:.0f} ms: {how}",
        file=sys.stderr)
  for module, state in zip((encoder, decoder), snapshot, strict=True):
    module.load_state_dict(state)  # the trial's steps do not count
  optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, eps=1e-7, fused=True)
  generator = torch.Generator().manual_seed(0)
  steps = len(data) // BATCH_SIZE

  def state():
    return [copy.deepcopy(m.state_dict()) for m in (encoder, decoder)]

  while True:
    order = torch.randperm(len(data), generator=generator)
    for i in range(steps):
      run(data[order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]])
      if budgets.after_step(BATCH_SIZE, state):
        return (encoder, decoder), how


def _torch_log_px(params, x):
  """log p(x|z) [B] of the discretized logistic, for uint8 x [B, 3, 32, 32]; coupled, G's
  location moves with R's value and B's with R's and G's (tfvae's CoupledDiscretizedLogistic)."""
  import torch
  from torch.nn import functional
  level = x.float()
  if FLAGS.coupled_channels:
    mean, raw_scale, raw_coefficients = params.chunk(3, dim=1)
    c, value = torch.tanh(raw_coefficients), level / 255
    mean = torch.stack([mean[:, 0], mean[:, 1] + c[:, 0] * value[:, 0],
                        mean[:, 2] + c[:, 1] * value[:, 0] + c[:, 2] * value[:, 1]], dim=1)
  else:
    mean, raw_scale = params.chunk(2, dim=1)
  s = functional.softplus(raw_scale + math.log(math.expm1(1.0))) + 1e-3
  a = ((level + 0.5) / 255 - (0.5 + mean)) / s
  width = 1 / (255 * s)
  first, last = level == 0, level == 255
  log_upper = torch.where(last, 0.0, -functional.softplus(-a))
  log_lower = torch.where(first, 0.0, -functional.softplus(a - width))
  log_gap = torch.where(first | last, 0.0, torch.log(-torch.expm1(-width)))
  return (log_upper + log_lower + log_gap).flatten(1).sum(-1)


def score_torch(modules, states, test: np.ndarray, num_samples: int) -> dict:
  import torch
  encoder, decoder = modules
  for module, state in zip(modules, states, strict=True):
    module.load_state_dict(state)
  torch.manual_seed(0)
  data = torch.from_numpy(test).permute(0, 3, 1, 2).contiguous()
  log_likelihood, elbo = [], []
  with torch.no_grad():
    for start in range(0, len(data), 100):
      batch = data[start:start + 100]
      unit = batch.float() / 255
      loc, raw = encoder(unit).chunk(2, dim=1)
      scale = torch.nn.functional.softplus(raw + math.log(math.expm1(1.0))) + 1e-3
      kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)
      log_w = []
      for _ in range(num_samples):
        z = loc + scale * torch.randn_like(loc)
        log_px = _torch_log_px(decoder(z), batch)
        # log w = log p(x|z) + log p(z) - log q(z|x)
        log_w.append(log_px + (-0.5 * z.pow(2) + 0.5 * ((z - loc) / scale).pow(2)
                               + scale.log()).sum(-1))
        if len(log_w) == 1:
          elbo.append(log_px - kl)
      log_likelihood.append(torch.logsumexp(torch.stack(log_w), 0) - math.log(num_samples))
  to_bits = PIXELS * math.log(2)
  return {"bits_per_dim": float(-torch.cat(log_likelihood).mean() / to_bits),
          "elbo_bits_per_dim": float(-torch.cat(elbo).mean() / to_bits)}


def run_trainer(name: str, train: np.ndarray, test: np.ndarray) -> list:
  """Trains `name` for the budgets; rows (trainer, how, minutes, examples, examples/s, scores)."""
  budgets = Budgets(FLAGS.budgets)
  rows = []
  if name == "tfvae":
    vae, steps_per_call = train_tfvae(train, budgets)
    for minutes, seconds, examples, weights in budgets.kept:
      rows.append(("tfvae", f"Runtime(), {steps_per_call} steps per call", minutes, examples,
                   examples / seconds, score_tfvae(vae, weights, test, FLAGS.num_samples)))
      if FLAGS.out:
        pathlib.Path(FLAGS.out).mkdir(parents=True, exist_ok=True)
        vae.save(pathlib.Path(FLAGS.out) / f"tfvae_{minutes:g}min.keras")
  else:
    import torch
    modules, how = train_torch(train, budgets)
    for minutes, seconds, examples, states in budgets.kept:
      rows.append((f"PyTorch {torch.__version__}", f"{how}, {torch.get_num_threads()} threads",
                   minutes, examples, examples / seconds,
                   score_torch(modules, states, test, FLAGS.num_samples)))
  return rows


def score_export(path: str, train: np.ndarray, test: np.ndarray) -> str:
  """A line: the export's importance-sampled test bits/dim, and the factorized baseline's."""
  import tensorflow as tf
  served = tf.saved_model.load(path).signatures["log_likelihood"]
  log_p = np.concatenate([served(x=tf.constant(test[start:start + 50] / 255, tf.float32),
                                 num_samples=tf.constant(FLAGS.num_samples),
                                 seed=tf.constant(start, tf.int64))["log_likelihood"].numpy()
                          for start in range(0, len(test), 50)])
  bits = -log_p / (PIXELS * math.log(2))
  return (f"{path}: {len(test)} test JPEGs decoded with PIL, log_likelihood K ="
          f" {FLAGS.num_samples}: {bits.mean():.3f} bits/dim (min {bits.min():.3f}, max"
          f" {bits.max():.3f}); factorized 256-bin baseline"
          f" {histogram_bits_per_dim(train, test):.3f} bits/dim")


def main(argv):
  del argv
  folder = pathlib.Path(FLAGS.folder)
  start = time.perf_counter()
  train, test = decode(folder, "train"), decode(folder, "test", FLAGS.test_examples // 10)
  print(f"decoded {len(train)} training and {len(test)} test JPEGs in"
        f" {time.perf_counter() - start:.0f} s", file=sys.stderr)
  if FLAGS.trainer:
    print(json.dumps(run_trainer(FLAGS.trainer, train, test)))
    return
  if FLAGS.export:
    print(score_export(FLAGS.export, train, test))
    return
  if FLAGS.pictures_of:
    import keras

    import tfvae  # noqa: F401  (registers the model's classes)
    from tfvae import plots
    vae = keras.saving.load_model(FLAGS.pictures_of)
    pictures = ROOT / "docs" / "cifar10"
    pictures.mkdir(exist_ok=True)
    plots.save_reconstructions(vae, test[::len(test) // 32], pictures / "reconstructions.png")
    plots.save_samples(vae, pictures / "samples.png", seed=0)
    print(f"wrote {pictures}/reconstructions.png and samples.png")
    return
  rows = []
  # One process per trainer: TensorFlow and PyTorch's compiler crash in one process.
  for trainer in ("tfvae", "torch") if FLAGS.torch else ("tfvae",):
    output = subprocess.run([sys.executable, __file__, f"--trainer={trainer}",
                             *[arg for arg in sys.argv[1:] if not arg.startswith("--trainer")]],
                            check=True, stdout=subprocess.PIPE, text=True).stdout
    rows += json.loads(output.strip().splitlines()[-1])
    print(rows[-1], file=sys.stderr)
  baseline = histogram_bits_per_dim(train, test)
  print(f"\nTest images: {len(test)}; K = {FLAGS.num_samples}; factorized 256-bin baseline:"
        f" {baseline:.3f} bits/dim.\n")
  print("| trainer | how | budget | examples | examples/s | test bits/dim (IS) | ELBO bits/dim |")
  print("|---|---|---|---|---|---|---|")
  for trainer, how, minutes, examples, rate, scores in rows:
    print(f"| {trainer} | {how} | {minutes:g} min | {examples:,} | {rate:.0f} |"
          f" {scores['bits_per_dim']:.3f} | {scores['elbo_bits_per_dim']:.3f} |")


if __name__ == "__main__":
  app.run(main)
