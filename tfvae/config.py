"""Typed, validated configuration for tfvae models and training runs.

The command line (bin/train) turns flags into these dataclasses; library code only ever sees
them. Every check runs in `__post_init__`, so a bad value fails before any data is read or any
graph is built, with one line that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tfvae.data import sources
from tfvae.distributions import LIKELIHOODS, PIXEL_MIN_SCALE

ARCHITECTURES = ("mlp", "conv")
OBJECTIVES = ("elbo", "iwae")
GRADIENT_ESTIMATORS = ("standard", "dreg")
OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "burda", "cosine", "exponential")


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field and the fix."""


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless condition."""
  if not condition:
    raise ConfigError(message)


def _one_of(name: str, value: str, choices) -> None:
  require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _require_activation(name: str) -> None:
  import keras  # here: configs built without a model stay light
  try:
    keras.activations.get(name)
  except (ValueError, TypeError):
    raise ConfigError(f"activation={name!r} is not a Keras activation; use e.g. relu, tanh,"
                      f" elu, gelu or softplus") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a VAE's architecture and objective.

  Attributes:
    image_shape: (height, width, channels) of one image, or (D,) of one feature vector.
    latent_size: dimension J of z.
    hidden_sizes: widths of the hidden layers of the MLP (encoder order; the decoder mirrors
      them).
    architecture: "mlp" (as in the paper) or "conv" (a residual network; tfvae.networks).
    conv_channels: the conv net's widths, one stage each (encoder order; the decoder mirrors
      them); each stage after the first halves the height and width.
    spatial_latent: the conv net's z is a map on its coarsest grid, latent_size / (h w)
      channels, flattened position-major; the decoder starts from it with a convolution
      instead of a Dense layer.
    activation: any Keras activation name for the hidden layers (the paper used tanh; relu
      reaches a better bound in the same time with Adam).
    likelihood: a name in tfvae.distributions.LIKELIHOODS: "bernoulli" (binary pixels, from
      logits), "gaussian" (learned per-pixel scale, paper appendix C) or "gaussian_fixed"
      (scale = observation_scale), or "discretized_logistic" (8-bit pixels).
    observation_scale: the fixed pixel standard deviation of "gaussian_fixed".
    mixture_components: logistics in each pixel-channel's mixture (discretized_logistic).
    coupled_channels: discretized_logistic of a pixel's channels coupled in order, each
      channel's locations shifted by the earlier channels' values (PixelCNN++'s R, G, B), with
      one mixture a pixel.
    num_samples: L, the Monte Carlo samples of z per example (K for the IWAE bound).
    objective: "elbo" (Kingma & Welling, eq. 10) or "iwae" (Burda et al., 2015).
    beta: weight of the KL term in the training loss; 1 is the ELBO, 0 an auto-encoder.
    kl_warmup_steps: the KL weight of training steps rises linearly from 0 to beta over this
      many optimizer steps (Bowman et al., 2016; Sonderby et al., 2016), so the decoder learns
      to use z before the KL can push q(z|x) onto the prior; 0 trains on beta from the first
      step. Evaluation always weighs the KL by beta.
    gradient_estimator: "standard", or "dreg" for objective=iwae: the doubly reparameterized
      gradient of Tucker et al. (2018), the same in expectation with less encoder variance.
    standardize: real-valued features: the model standardizes them with statistics of the
      training data it stores (VAE.adapt), and its Gaussian means are not squashed into
      (0, 1); the likelihood is of the raw values.
  """

  image_shape: tuple[int, int, int] = (28, 28, 1)
  latent_size: int = 20
  hidden_sizes: tuple[int, ...] = (500,)
  architecture: str = "mlp"
  activation: str = "relu"
  likelihood: str = "bernoulli"
  observation_scale: float | None = None
  conv_channels: tuple[int, ...] = (32, 64, 128)
  mixture_components: int = 1
  coupled_channels: bool = False
  spatial_latent: bool = False
  num_samples: int = 1
  objective: str = "elbo"
  beta: float = 1.0
  kl_warmup_steps: int = 0
  standardize: bool = False
  gradient_estimator: str = "standard"

  def __post_init__(self):
    # Normalize sequences so configs from JSON (lists) compare equal to configs from code.
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
    object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
    require(len(self.image_shape) in (1, 3) and all(d > 0 for d in self.image_shape),
            f"image_shape={self.image_shape} must be (height, width, channels) or (D,) for"
            f" vectors, all positive")
    require(self.latent_size >= 1,
            f"latent_size={self.latent_size} must be at least 1 (the paper uses 2 to 200)")
    require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
            f"hidden_sizes={self.hidden_sizes} needs at least one positive width, e.g. 500")
    _one_of("architecture", self.architecture, ARCHITECTURES)
    require(len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
            f"conv_channels={self.conv_channels} needs at least one positive width, e.g."
            f" 32,64,128")
    _require_activation(self.activation)
    _one_of("likelihood", self.likelihood, LIKELIHOODS)
    _one_of("objective", self.objective, OBJECTIVES)
    require(self.num_samples >= 1, f"num_samples={self.num_samples} must be at least 1")
    require(not (self.objective == "iwae" and self.num_samples < 2),
            "objective=iwae with num_samples=1 is just the ELBO; pass --num_samples=K with K >= 2"
            " (Burda et al. use K=5 or 50)")
    require(math.isfinite(self.beta) and self.beta >= 0,
            f"beta={self.beta} must be a finite number >= 0 (1 is the ELBO, 0 an auto-encoder)")
    require(self.objective != "iwae" or self.beta == 1.0,
            f"objective=iwae has no KL weight; drop --beta={self.beta} or use --objective=elbo")
    require(self.kl_warmup_steps >= 0,
            f"kl_warmup_steps={self.kl_warmup_steps} must be >= 0 (0: no warm-up)")
    require(self.objective != "iwae" or not self.kl_warmup_steps,
            f"objective=iwae has no KL weight to warm up; drop"
            f" --kl_warmup_steps={self.kl_warmup_steps} or use --objective=elbo")
    if LIKELIHOODS[self.likelihood].fixed_scale:
      require(self.observation_scale is not None and math.isfinite(self.observation_scale)
               and self.observation_scale > 0,
               "likelihood=gaussian_fixed needs a positive --observation_scale, e.g. 0.1")
      require(self.standardize or self.observation_scale >= PIXEL_MIN_SCALE,
              f"observation_scale={self.observation_scale:g} is below 1/(256 sqrt(2 pi)) ="
              f" {PIXEL_MIN_SCALE:.5f}: a pixel density above 256 gives negative bits/dim;"
              f" pass a larger --observation_scale, e.g. 0.1")
    else:
      require(self.observation_scale is None,
               f"observation_scale is only used by a likelihood with a fixed scale"
               f" (gaussian_fixed), not {self.likelihood}; drop --observation_scale or pass"
               f" --likelihood=gaussian_fixed")
    require(self.mixture_components >= 1,
            f"mixture_components={self.mixture_components} must be at least 1")
    require(self.mixture_components == 1 or LIKELIHOODS[self.likelihood].mixture,
            f"mixture_components={self.mixture_components} is for a mixture likelihood"
            f" (discretized_logistic), not {self.likelihood}; drop --mixture_components")
    if self.coupled_channels:
      require(LIKELIHOODS[self.likelihood].mixture,
              f"coupled_channels is for discretized_logistic, not {self.likelihood}; drop"
              f" --coupled_channels")
      require(len(self.image_shape) == 3 and self.image_shape[-1] >= 2,
              f"coupled_channels couples a pixel's channels; images of shape"
              f" {self.image_shape} have one; drop --coupled_channels")
    _one_of("gradient_estimator", self.gradient_estimator, GRADIENT_ESTIMATORS)
    require(self.gradient_estimator != "dreg" or self.objective == "iwae",
            "gradient_estimator=dreg is for the IWAE bound; pass --objective=iwae"
            " --num_samples=K, or drop --gradient_estimator")
    require(not self.standardize or LIKELIHOODS[self.likelihood].data == "real",
            f"standardized features need a likelihood of real values (gaussian or"
            f" gaussian_fixed), not {self.likelihood}")
    require(LIKELIHOODS[self.likelihood].data != "8-bit" or len(self.image_shape) == 3,
            f"likelihood={self.likelihood} models 8-bit pixels, not vectors"
            f" {self.image_shape}; use --likelihood=gaussian")
    if self.architecture == "conv":
      require(len(self.image_shape) == 3,
              f"architecture=conv takes images, not vectors {self.image_shape}; use"
              f" --architecture=mlp")
    if self.spatial_latent:
      require(self.architecture == "conv",
              "spatial_latent is a map on the conv net's grid; pass --architecture=conv or drop"
              " --spatial_latent")
      cells = math.prod(self.coarsest_grid)
      require(self.latent_size % cells == 0,
              f"spatial_latent puts latent_size={self.latent_size} on the {self.coarsest_grid[0]}x"
              f"{self.coarsest_grid[1]} grid: pass a multiple of {cells}, e.g."
              f" --latent_size={cells * max(1, round(self.latent_size / cells))}")

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-friendly dict that `from_dict` turns back into an equal config."""
    values = dataclasses.asdict(self)
    values["image_shape"] = list(self.image_shape)
    values["hidden_sizes"] = list(self.hidden_sizes)
    values["conv_channels"] = list(self.conv_channels)
    return values

  @property
  def coarsest_grid(self) -> tuple[int, int]:
    """The conv net's smallest height and width: each stage after the first halves them,
    rounding up (a stride-2 convolution with "same" padding)."""
    height, width = self.image_shape[:2]
    halvings = 2 ** (len(self.conv_channels) - 1)
    return -(-height // halvings), -(-width // halvings)

  @property
  def event_ndims(self) -> int:
    """Dimensions of one example: 3 for images, 1 for vectors."""
    return len(self.image_shape)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train: data, optimization, randomness.

  How this machine runs it (threads, strategy, steps per call) is a tfvae.runtime.Runtime,
  never part of the run's configuration.

  Attributes:
    dataset: a source of tfvae.data.sources: "mnist", "binarized_mnist", "frey_face",
      "npz:PATH", "csv:PATH", "folder:PATH" or "tfds:NAME[:CONFIG]".
    data_dir: folder holding <dataset>/<canonical file>; None means $TFVAE_DATA_DIR, else the
      Keras cache (~/.keras/datasets).
    batch_size: M, examples per step.
    epochs: passes over the training set.
    optimizer: "adam", "adamw", "adagrad", "sgd" or "rmsprop".
    learning_rate: step size of the optimizer (at the start, under a schedule).
    lr_schedule: "constant"; "burda" (Burda et al. 2015: stage i = 0, 1, ... runs 3^i epochs
      at learning_rate * 10^(-i/7)); "cosine" (to 0 at the last epoch); "exponential" (to 1%
      of learning_rate at the last epoch). Functions of the optimizer's step, so a resumed run
      continues them exactly.
    adam_epsilon: epsilon of adam and adamw (Keras's default 1e-7; Burda et al. used 1e-4).
    weight_decay: decoupled weight decay (AdamW style), 0 for none.
    seed: seeds weights, shuffling, binarization and the reparameterization noise.
    max_examples: keep only the first N training examples (quick runs); None keeps all.
    validation_examples: examples held out from training for model selection (best.keras);
      None: the source's default (tfvae.data.sources.with_validation), 0: none.
    image_size: (height, width) to resize folder and TFDS images to; None keeps their size.
    early_stopping_patience: stop after this many epochs without a better validation loss;
      0 never stops early.
    init_output_bias: start the Bernoulli decoder's output bias at the logit of the training
      set's mean pixel, clipped to [0.001, 0.999] (Burda et al.); False keeps zeros.
    eval_num_samples: K for the importance-sampled test log-likelihood at the end; 0 skips it.
  """

  dataset: str = "mnist"
  data_dir: str | None = None
  batch_size: int = 100
  epochs: int = 40
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"
  adam_epsilon: float = 1e-7
  weight_decay: float = 0.0
  seed: int = 0
  max_examples: int | None = None
  eval_num_samples: int = 0
  validation_examples: int | None = None
  image_size: tuple[int, int] | None = None
  early_stopping_patience: int = 0
  init_output_bias: bool = False

  def __post_init__(self):
    try:
      sources.parse(self.dataset)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
    require(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
    require(0 <= self.seed < 2**31, f"seed={self.seed} must be in [0, 2**31), e.g. 0")
    _one_of("optimizer", self.optimizer, OPTIMIZERS)
    require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate={self.learning_rate} must be a positive number, e.g. 1e-3")
    _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
    require(math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0,
            f"adam_epsilon={self.adam_epsilon} must be a positive number, e.g. 1e-7 or 1e-4")
    require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay={self.weight_decay} must be >= 0")
    require(self.max_examples is None or self.max_examples >= 1,
            f"max_examples={self.max_examples} must be at least 1 (or unset for all)")
    require(self.validation_examples is None or self.validation_examples >= 0,
            f"validation_examples={self.validation_examples} must be >= 0 (0: none)")
    if self.image_size is not None:
      object.__setattr__(self, "image_size", tuple(int(d) for d in self.image_size))
      require(len(self.image_size) == 2 and all(d >= 1 for d in self.image_size),
              f"image_size={self.image_size} must be (height, width), e.g. 32x32")
    require(self.early_stopping_patience >= 0,
            f"early_stopping_patience={self.early_stopping_patience} must be >= 0 (0: off)")
    require(not (self.early_stopping_patience and self.validation_examples == 0),
            "early stopping watches the validation loss; drop --validation_examples=0 or"
            " --early_stopping_patience")
    require(self.eval_num_samples >= 0,
            f"eval_num_samples={self.eval_num_samples} must be >= 0 (0 skips the estimate)")
