"""absl flag definitions shared by the bin/ scripts, and their conversion to configs.

Only bin/ imports this module: the rest of the library takes typed configs and never reads
FLAGS. It lives in the package (not in bin/) so that installed scripts find it.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import sys
import zipfile
import zlib

from absl import flags, logging

from tfvae import config, runtime
from tfvae.data import sources
from tfvae.distributions import LIKELIHOODS

FLAGS = flags.FLAGS

# --help's sections: flag names in the order shown; the flags are defined below.
HELP_GROUPS = {
    "data": ["dataset", "data_dir", "image_size", "validation_examples", "max_examples"],
    "model": ["likelihood", "observation_scale", "mixture_components", "coupled_channels",
              "latent_size", "hidden_sizes", "architecture", "conv_channels", "spatial_latent",
              "activation", "num_samples", "objective", "gradient_estimator", "beta",
              "kl_warmup_steps"],
    "training": ["epochs", "batch_size", "optimizer", "learning_rate", "lr_schedule",
                 "adam_epsilon", "weight_decay", "seed", "early_stopping_patience",
                 "init_output_bias", "eval_num_samples"],
    "this machine (tfvae.runtime; never saved with the model)": [
        "strategy", "mixed_precision", "steps_per_execution", "step_shards",
        "intra_op_threads"],
    "output": ["workdir", "restart", "export_dir", "model_name"],
}


def define_data_flags() -> None:
  flags.DEFINE_string("dataset", "mnist", "; ".join(
      f"{name} ({source.summary})" for name, source in zip(
          sources.names(), sources.SOURCES.values(), strict=True)) + ".")
  flags.DEFINE_string("data_dir", None, "Folder holding <dataset>/<canonical file>; default"
                      " $TFVAE_DATA_DIR, else ~/.keras/datasets (tfds: $TFDS_DATA_DIR, else"
                      " ~/tensorflow_datasets).")
  flags.DEFINE_string("image_size", None, "HxW, e.g. 32x32: resize folder and tfds images to"
                      " it (default: keep their size, which must be the same for all).")
  flags.DEFINE_integer("validation_examples", None, "Examples held out from training to choose"
                       " best.keras: default the source's validation split, else 10,000 for"
                       " mnist, else 10% (at most 10,000); 0 for none.")


def define_model_flags() -> None:
  defaults = config.ModelConfig()
  flags.DEFINE_enum("likelihood", defaults.likelihood, list(LIKELIHOODS), "p(x|z): " + "; ".join(
      f"{record.name} ({record.summary})" for record in LIKELIHOODS.values()) + ".")
  flags.DEFINE_float("observation_scale", None, "Pixel standard deviation of a likelihood with"
                     " a fixed scale (gaussian_fixed).")
  flags.DEFINE_integer("latent_size", defaults.latent_size, "Dimension of z.")
  flags.DEFINE_integer("mixture_components", defaults.mixture_components,
                       "Logistics per pixel-channel of --likelihood=discretized_logistic.")
  flags.DEFINE_bool("coupled_channels", defaults.coupled_channels, "For"
                    " --likelihood=discretized_logistic: couple a pixel's channels in order"
                    " (PixelCNN++'s R, then G given R, then B), one mixture a pixel.")
  flags.DEFINE_list("hidden_sizes", [str(h) for h in defaults.hidden_sizes],
                    "Hidden layer widths of the mlp, comma separated.")
  flags.DEFINE_enum("architecture", defaults.architecture, config.ARCHITECTURES,
                    "mlp (the paper's), or conv (a residual network).")
  flags.DEFINE_list("conv_channels", [str(c) for c in defaults.conv_channels],
                    "Widths of the conv net's stages, comma separated; each stage after the"
                    " first halves the height and width.")
  flags.DEFINE_bool("spatial_latent", defaults.spatial_latent, "For --architecture=conv: z is a"
                    " map on the conv net's coarsest grid (--latent_size a multiple of its"
                    " cells, e.g. 512 = 8x8x8 for 32x32 images and three stages).")
  flags.DEFINE_string("activation", defaults.activation, "Keras activation of hidden layers.")
  flags.DEFINE_integer("num_samples", defaults.num_samples,
                       "L, samples of z per example (K for --objective=iwae).")
  flags.DEFINE_enum("objective", defaults.objective, config.OBJECTIVES,
                    "elbo (Kingma & Welling) or iwae (Burda et al.).")
  flags.DEFINE_enum("gradient_estimator", defaults.gradient_estimator, config.GRADIENT_ESTIMATORS,
                    "For --objective=iwae: standard, or dreg (Tucker et al., 2018).")
  flags.DEFINE_float("beta", defaults.beta, "KL weight: 1 is the ELBO, 0 an auto-encoder.")
  flags.DEFINE_integer("kl_warmup_steps", defaults.kl_warmup_steps, "Raise the KL weight"
                       " linearly from 0 to --beta over this many optimizer steps, against"
                       " posterior collapse early in training; 0: none.")


def define_train_flags() -> None:
  defaults = config.TrainConfig()
  define_data_flags()
  flags.DEFINE_integer("batch_size", defaults.batch_size, "M, examples per step.")
  flags.DEFINE_integer("epochs", defaults.epochs, "Passes over the training set.")
  flags.DEFINE_enum("optimizer", defaults.optimizer, config.OPTIMIZERS, "Optimizer.")
  flags.DEFINE_float("learning_rate", defaults.learning_rate, "Learning rate (at the start).")
  flags.DEFINE_enum("lr_schedule", defaults.lr_schedule, config.LR_SCHEDULES,
                    "constant; burda (stage i runs 3^i epochs at learning_rate * 10^(-i/7));"
                    " cosine (to 0 at the last epoch); exponential (to 1% at the last epoch).")
  flags.DEFINE_float("adam_epsilon", defaults.adam_epsilon,
                     "Epsilon of adam and adamw (Burda et al.: 1e-4).")
  flags.DEFINE_integer("early_stopping_patience", defaults.early_stopping_patience,
                       "Stop after this many epochs without a better validation loss; 0: off.")
  flags.DEFINE_bool("init_output_bias", defaults.init_output_bias,
                    "Start the Bernoulli decoder's output bias at logit(mean training pixel).")
  flags.DEFINE_float("weight_decay", defaults.weight_decay, "Decoupled weight decay.")
  flags.DEFINE_integer("seed", defaults.seed, "Seeds weights, data order, binarization, noise.")
  flags.DEFINE_integer("max_examples", None, "Keep only the first N training examples.")
  flags.DEFINE_integer("eval_num_samples", defaults.eval_num_samples,
                       "K of the importance-sampled test log-likelihood at the end; 0 skips.")
  define_runtime_flags()


def define_runtime_flags() -> None:
  defaults = runtime.Runtime()
  flags.DEFINE_enum("strategy", defaults.strategy, runtime.STRATEGIES,
                    "tf.distribute strategy.")
  flags.DEFINE_bool("mixed_precision", defaults.mixed_precision,
                    "Compute in 16-bit floats; the objective stays float32.")
  flags.DEFINE_integer("steps_per_execution", defaults.steps_per_execution,
                       "At most this many optimizer steps per call into the compiled graph.")
  flags.DEFINE_integer("step_shards", defaults.step_shards,
                       "Split each batch into this many concurrent branches; 0: 2 on a"
                       " multi-core CPU, else 1.")
  flags.DEFINE_integer("intra_op_threads", defaults.intra_op_threads,
                       "Threads per TensorFlow op; 0: cores / step_shards when split.")


def define_output_flags() -> None:
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, metrics and pictures"
                      " (default: runs/<model_name>).")
  flags.DEFINE_bool("restart", False, "Start over in --workdir, removing the run there (its"
                    " checkpoints, metrics and pictures).")
  flags.DEFINE_string("export_dir", "savedmodels", "Root of the SavedModel export:"
                      " <export_dir>/<model_name>/<version>/.")
  flags.DEFINE_string("model_name", None, "Name of the exported model (default: from the"
                      " dataset: mnist_vae; a file or folder's name and a digest of its path,"
                      " e.g. faces_1a2b3c_vae; a tfds dataset's name).")


def help_text() -> str:
  """tfvae's flags by section, for a script's --help (absl's own stay in --helpfull)."""
  lines = []
  for title, names in HELP_GROUPS.items():
    defined = [FLAGS[name] for name in names if name in FLAGS]
    if not defined:
      continue
    lines.append(f"\n{title}:")
    for flag in defined:
      lines.append(flags.text_wrap(f"--{flag.name}: {flag.help}", indent="      ",
                                   firstline_indent="  "))
      lines.append(f"    (default: {flag.default_as_str})")
  lines.append("\n--flagfile=FILE reads flags from a file; --helpfull lists every flag.")
  return "\n".join(lines) + "\n"


def image_size_from_flags() -> tuple[int, int] | None:
  """--image_size=HxW as (H, W), or None; raises ConfigError."""
  if not FLAGS.image_size:
    return None
  height, x, width = FLAGS.image_size.lower().partition("x")
  if not (x and height.strip().isdigit() and width.strip().isdigit()):
    raise config.ConfigError(f"image_size={FLAGS.image_size!r} must be HxW, e.g. 32x32")
  return int(height), int(width)


def model_config_from_flags(image_shape, standardize: bool = False) -> config.ModelConfig:
  """ModelConfig from the model flags and the data's example shape; raises ConfigError.

  standardize: the data are real-valued vectors (tfvae.training.model_config_for's rule).
  """
  return config.ModelConfig(
      image_shape=image_shape, latent_size=FLAGS.latent_size,
      hidden_sizes=_integers("hidden_sizes", "500 or 512,256"), architecture=FLAGS.architecture,
      conv_channels=_integers("conv_channels", "32,64,128"), spatial_latent=FLAGS.spatial_latent,
      activation=FLAGS.activation,
      likelihood=FLAGS.likelihood, observation_scale=FLAGS.observation_scale,
      mixture_components=FLAGS.mixture_components, coupled_channels=FLAGS.coupled_channels,
      num_samples=FLAGS.num_samples, objective=FLAGS.objective, beta=FLAGS.beta,
      kl_warmup_steps=FLAGS.kl_warmup_steps,
      gradient_estimator=FLAGS.gradient_estimator,
      standardize=standardize and LIKELIHOODS[FLAGS.likelihood].data == "real")


def _integers(name: str, example: str) -> tuple[int, ...]:
  """A comma-list flag as integers; raises ConfigError."""
  try:
    return tuple(int(value) for value in FLAGS[name].value)
  except ValueError as e:
    raise config.ConfigError(f"{name}={','.join(FLAGS[name].value)} must be integers separated"
                             f" by commas, e.g. {example}") from e


def train_config_from_flags() -> config.TrainConfig:
  """TrainConfig from the training flags; raises ConfigError."""
  return config.TrainConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
      epochs=FLAGS.epochs, optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
      lr_schedule=FLAGS.lr_schedule, adam_epsilon=FLAGS.adam_epsilon,
      early_stopping_patience=FLAGS.early_stopping_patience,
      init_output_bias=FLAGS.init_output_bias,
      weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, max_examples=FLAGS.max_examples,
      eval_num_samples=FLAGS.eval_num_samples, validation_examples=FLAGS.validation_examples,
      image_size=image_size_from_flags())


def runtime_from_flags() -> runtime.Runtime:
  """Runtime from the machine flags; raises ConfigError."""
  return runtime.Runtime(
      strategy=FLAGS.strategy, mixed_precision=FLAGS.mixed_precision,
      steps_per_execution=FLAGS.steps_per_execution, step_shards=FLAGS.step_shards,
      intra_op_threads=FLAGS.intra_op_threads)


def load_vae(path: str | pathlib.Path, flag: str):
  """The tfvae.VAE in a .keras file written by bin/train; ConfigError names the flag's fix.

  Keras's own errors here mislead: a truncated file reads "File not found", and another
  model loads and fails later on a missing attribute.
  """
  path = pathlib.Path(path)
  fix = f"pass --{flag}=<workdir>/last.keras or best.keras, as bin/train writes them"
  if path.suffix != ".keras" or not path.is_file():
    raise config.ConfigError(f"{path}: not a .keras file; {fix}")
  if not zipfile.is_zipfile(path):
    raise config.ConfigError(f"{path} is not a .keras zip archive (truncated or corrupt?); {fix}")
  try:
    with zipfile.ZipFile(path) as archive:
      damaged = archive.testzip()  # reads every member against its CRC
      names = set(archive.namelist())
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
    raise config.ConfigError(f"{path} is a damaged .keras archive ({e}); {fix}") from e
  if damaged or not {"config.json", "model.weights.h5"} <= names:
    what = f"its member {damaged} fails its CRC" if damaged else "it lacks config.json or weights"
    raise config.ConfigError(f"{path} is a damaged .keras archive ({what}); {fix}")
  import keras

  from tfvae.model import VAE
  try:
    vae = keras.saving.load_model(path)
  except (KeyError, ValueError, TypeError, OSError) as e:
    raise config.ConfigError(f"{path} does not load as a Keras model ({type(e).__name__}: {e});"
                             f" {fix}") from e
  if not isinstance(vae, VAE):
    raise config.ConfigError(f"{path} holds a {type(vae).__name__}, not a tfvae.VAE; {fix}")
  return vae


def start(argv) -> None:
  """What every bin/ main does first: reject stray arguments, quiet TensorFlow's INFO lines.

  TensorFlow logs through absl at INFO, which would drown Keras's progress; --verbosity (or -v)
  on the command line keeps its say.
  """
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def interruptible(workdir):
  """Ctrl-C or SIGTERM while inside: one line saying where the run stands, and exit 130."""
  previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
  try:
    yield
  except KeyboardInterrupt:
    from tfvae import training
    done = training.resume_epoch(pathlib.Path(workdir) / "backup")
    where = f"after epoch {done}" if done else "before its first epoch ended"
    fail(f"interrupted {where}; run the same command to resume", code=130)
  finally:
    signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = 2):
  """Prints one line, `<program>: error: <message>`, and exits."""
  program = sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "tfvae"
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(code)
