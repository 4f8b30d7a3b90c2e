"""SavedModel export for TensorFlow Serving: signatures, versioned folders, atomic writes.

Layout: <export_dir>/<model_name>/<version>/, version an integer one above the largest there.
The model is written to a hidden temporary folder beside it and renamed into place, so a server
polling the folder never sees half a model; exports racing for one version each get their own,
since a rename onto a taken version fails and the loser takes the next. Folders and files get
the modes the process's umask gives new ones (0755 and 0644 under umask 022), so a server
running as another user can read them.

Signatures (tensors only, any batch size; x is float32 [B, H, W, C] in [0, 1]):
  serving_default(x) -> latent_mean [B, J], latent_scale [B, J], reconstruction [B, H, W, C],
                        elbo [B] (one reparameterized sample, fixed seed: deterministic)
  encode(x)          -> latent_mean, latent_scale
  decode(z [B, J])   -> reconstruction (the mean of p(x|z))
  reconstruct(x)     -> reconstruction
  sample(count: int32 scalar, seed: int64 scalar) -> images [count, H, W, C], z [count, J]
  log_likelihood(x, num_samples: int32 scalar, seed: int64 scalar) -> log_likelihood [B]
  anomaly_score(x)   -> anomaly_score [B] (-elbo in bits - complexity_bits; higher is more
                        anomalous), elbo [B], complexity_bits [B] (the PNG length of x in bits)

elbo, log_likelihood and anomaly_score draw each image's noise from its content and the seed,
so an image's score depends only on the image and the seed, not on the rest of the batch.

assets.extra/tfvae.json records the model's config and the request limits for tools; TF
Serving ignores it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfvae import data, evaluation, objectives
from tfvae.model import _stateless_seed

# assets.extra/<this>: the model's config, for tools such as bin/evaluate; servers ignore it.
METADATA_FILE = "tfvae.json"
WARMUP_FILE = "tf_serving_warmup_requests"  # TF Serving's fixed name, under assets.extra/
# Requests asking for more than these fail at once instead of occupying the server or exhausting
# its memory. "Pixels" are the H * W * C values of one image.
MAX_SAMPLE_COUNT = 10_000
MAX_SAMPLE_PIXELS = 10_000 * 784  # count * pixels: 10000 MNIST images
MAX_NUM_SAMPLES = 100_000
MAX_LOG_LIKELIHOOD_PIXELS = 100_000 * 784  # batch * num_samples * pixels: 100 x 1000 on MNIST
SIGNATURES = ("serving_default", "encode", "decode", "reconstruct", "sample", "log_likelihood",
              "anomaly_score")
_VERSION = re.compile(r"^\d+$")
# What os.rename of a folder gives when the target is a non-empty folder, or not a folder.
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)


class ExportError(RuntimeError):
  """The export folder cannot be written; the message names it and the fix."""


def versions(model_dir: str | os.PathLike) -> list[int]:
  """The integer versions under <export_dir>/<model_name>, ascending."""
  model_dir = pathlib.Path(model_dir)
  if not model_dir.is_dir():
    return []
  return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION.match(p.name))


def next_version(model_dir: str | os.PathLike) -> int:
  return max(versions(model_dir), default=0) + 1


def check_writable(export_dir: str | os.PathLike, model_name: str) -> pathlib.Path:
  """Creates <export_dir>/<model_name> if needed and proves a file can be written there.

  Called before training so an unwritable folder fails in seconds, not after hours.

  Raises:
    ExportError: the folder cannot be created or written.
  """
  if not model_name or "/" in model_name or model_name.startswith("."):
    raise ExportError(f"model_name={model_name!r} must be a plain folder name, e.g. mnist_vae")
  model_dir = pathlib.Path(export_dir) / model_name
  try:
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise ExportError(f"{model_dir}: cannot write the export there ({e.strerror}); pass a"
                      f" writable --export_dir") from e
  return model_dir


# Shapes are compared on this many leading dimensions (the rank is padded with zeros to it).
_MAX_CHECKED_RANK = 8


def _check_shape(tensor: tf.Tensor, name: str, tail: tuple[int, ...]) -> tf.Operation:
  """An op that fails the request (InvalidArgumentError) unless `tensor` is [B, *tail].

  A loaded signature and TF Serving feed a request's tensor without holding it to the
  signature's TensorSpec, and the graph, traced for that spec, believes its rank: a check
  of tf.rank is folded away. So the runtime shape is padded with zeros to a fixed length and
  compared whole, which catches a wrong rank as well as a wrong size (dimensions past that
  length show in the element count, which must be B * prod(tail)).
  """
  expected = f"[B, {', '.join(map(str, tail))}]"
  shape = tf.shape(tensor)
  padded = tf.concat([shape, tf.zeros([_MAX_CHECKED_RANK], tf.int32)], 0)  # a scalar too
  want = list(tail) + [0] * (_MAX_CHECKED_RANK - 1 - len(tail))
  ok = (tf.reduce_all(tf.equal(padded[1:_MAX_CHECKED_RANK], want))
        & tf.equal(tf.size(tensor), padded[0] * int(np.prod(tail))))
  return tf.debugging.Assert(ok, [f"{name} must have shape {expected}; got shape", shape],
                             summarize=_MAX_CHECKED_RANK)


def _check_input(x: tf.Tensor, likelihood: str, image_shape: tuple[int, ...],
                 unit_range: bool = True) -> tf.Tensor:
  """Fails the request (InvalidArgumentError) on a shape other than [B, *image_shape], on NaN
  or Inf, or, with unit_range (images), on pixels outside [0, 1]."""
  with tf.control_dependencies([_check_shape(x, "x", image_shape)]):
    x = tf.identity(x)
  checks = [tf.debugging.assert_all_finite(x, "x holds NaN or Inf values")]
  if unit_range:
    in_range = tf.reduce_all((x >= 0.0) & (x <= 1.0))
    checks.append(tf.debugging.Assert(
        in_range, [f"x must lie in [0, 1] for the {likelihood} likelihood; got min/max",
                   tf.reduce_min(x), tf.reduce_max(x)]))
  with tf.control_dependencies(checks):
    return tf.identity(x)


def _refuse_unless(ok: tf.Tensor, template: str, values: list) -> tf.Operation:
  """An op that fails the request (InvalidArgumentError) with `template` formatted unless ok.

  template takes the runtime values with "{}", as tf.strings.format does.
  """
  return tf.debugging.Assert(ok, [tf.strings.format(template, values)])


def _after(checks: list, *tensors):
  """tensors, each made to wait for every op in checks, so a refused request does no work."""
  with tf.control_dependencies(checks):
    return tuple(tf.identity(t) for t in tensors)


def _in_parts(function, x: tf.Tensor, size: int, event_shape=()) -> tf.Tensor:
  """function(x) for x [B, ...] -> float32 [B, *event_shape], computed on consecutive parts of
  at most size examples."""
  batch = tf.shape(x)[0]
  parts = (batch + size - 1) // size

  def body(i, values):
    return i + 1, values.write(i, function(x[i * size:(i + 1) * size]))

  values = tf.TensorArray(tf.float32, size=parts, infer_shape=False,
                          element_shape=[None, *event_shape])
  _, values = tf.while_loop(lambda i, _: i < parts, body, (tf.constant(0), values))
  return values.concat()  # [B, *event_shape]


def _signatures(vae) -> dict[str, tuple]:
  """name -> (function, input signature) for every serving signature."""
  config = vae.model_config
  image_spec = tf.TensorSpec([None, *config.image_shape], tf.float32, name="x")
  scalar_seed = tf.TensorSpec([], tf.int64, name="seed")
  pixels = math.prod(config.image_shape)
  image_size = "x".join(map(str, config.image_shape))
  max_count = min(MAX_SAMPLE_COUNT, MAX_SAMPLE_PIXELS // pixels)
  max_pairs = MAX_LOG_LIKELIHOOD_PIXELS // pixels  # batch * num_samples
  max_num_samples = min(MAX_NUM_SAMPLES, max_pairs)
  # sample decodes at most at_once images at a time; log_likelihood scores a request in parts,
  # each decoding at most chunk_size * images_per_part samples at once, so neither's memory
  # grows with the request.
  at_once = evaluation.decodings_at_once(vae)
  chunk_size = min(evaluation.DEFAULT_CHUNK_SIZE, at_once)
  images_per_part = max(1, at_once // chunk_size)
  # One draw of the ELBO's noise for a whole request, the same for every request.
  elbo_seed = tf.constant([0, 0], tf.int32)

  def check(x):
    return _check_input(x, config.likelihood, config.image_shape,
                        unit_range=not config.standardize)

  def latent_outputs(posterior):
    return {"latent_mean": posterior.mean(), "latent_scale": posterior.stddev()}

  def elbo(x, posterior):
    # Noise from each image's content, so its score does not depend on the other images.
    return objectives.elbo_terms(x, posterior, vae.prior, vae.decoder, 1, elbo_seed,
                                 content_noise=True)["elbo"]

  def serving_default(x):
    x = check(x)
    posterior = vae.encoder(x)
    reconstruction = vae.decoder(posterior.mean()).mean()
    return {**latent_outputs(posterior), "reconstruction": reconstruction,
            "elbo": elbo(x, posterior)}

  def anomaly_score(x):
    x = check(x)
    score = elbo(x, vae.encoder(x))
    complexity = evaluation.complexity_bits(x)
    return {"anomaly_score": evaluation.anomaly_score(score, complexity), "elbo": score,
            "complexity_bits": complexity}

  def encode(x):
    return latent_outputs(vae.encoder(check(x)))

  def decode(z):
    with tf.control_dependencies([_check_shape(z, "z", (config.latent_size,))]):
      z = tf.debugging.assert_all_finite(z, "z holds NaN or Inf values")
    return {"reconstruction": vae.decoder(z).mean()}

  def reconstruct(x):
    return {"reconstruction": vae.reconstruct(check(x))}

  def sample(count, seed):
    count, = _after([
        _refuse_unless(count >= 0, "count must be >= 0; got {}", [count]),
        _refuse_unless(count <= max_count,
                       f"count must be <= {max_count} for {image_size} images (count <="
                       f" {MAX_SAMPLE_COUNT} and count * pixels <= {MAX_SAMPLE_PIXELS}); got"
                       f" {{}}: ask in batches of at most {max_count}", [count]),
    ], count)
    z = vae.prior.sample(count, seed=_stateless_seed(seed))  # [count, J], as vae.sample draws
    # Decoded in parts, so a large count does not hold every image's layer outputs at once.
    images = _in_parts(lambda part: vae.decoder(part).mean(), z, at_once, config.image_shape)
    return {"images": images, "z": z}

  def log_likelihood(x, num_samples, seed):
    x = check(x)
    batch = tf.size(x, out_type=tf.int64) // pixels  # from the size: a scalar x has no shape[0]
    samples = tf.cast(num_samples, tf.int64)
    samples_ok = (samples >= 1) & (samples <= max_num_samples)
    x, num_samples = _after([
        _refuse_unless(samples >= 1, "num_samples must be >= 1; got {}", [num_samples]),
        _refuse_unless(samples <= max_num_samples,
                       f"num_samples must be <= {max_num_samples} for {image_size} images;"
                       f" got {{}}: ask for fewer", [num_samples]),
        _refuse_unless(~samples_ok | (batch * samples <= max_pairs),
                       f"batch * num_samples must be <= {max_pairs} for {image_size} images (batch"
                       f" * num_samples * pixels <= {MAX_LOG_LIKELIHOOD_PIXELS}); got {{}} * {{}}:"
                       f" ask in batches of at most {{}} images at this num_samples",
                       [batch, num_samples, max_pairs // tf.maximum(samples, 1)]),
    ], x, num_samples)
    seed = _stateless_seed(seed)
    # Each image's noise comes from its content, so the parts' estimates are the whole batch's.
    return {"log_likelihood": _in_parts(
        lambda part: evaluation.importance_sampled_log_likelihood(
            vae, part, num_samples, seed, chunk_size=chunk_size, content_noise=True),
        x, images_per_part)}

  return {
      "serving_default": (serving_default, [image_spec]),
      "encode": (encode, [image_spec]),
      "decode": (decode, [tf.TensorSpec([None, config.latent_size], tf.float32, name="z")]),
      "reconstruct": (reconstruct, [image_spec]),
      "sample": (sample, [tf.TensorSpec([], tf.int32, name="count"), scalar_seed]),
      "log_likelihood": (log_likelihood, [image_spec, tf.TensorSpec([], tf.int32,
                                                                    name="num_samples"),
                                          scalar_seed]),
      "anomaly_score": (anomaly_score, [image_spec]),
  }


def warmup_requests(vae, images: np.ndarray, model_name: str) -> list:
  """TF Serving warm-up PredictionLogs: each signature once, at batch 1 and at len(images).

  Args:
    vae: the model being exported (for latent inputs of `decode`).
    images: real float32 [B, H, W, C] images in [0, 1].
    model_name: the name the server serves the model under.

  Returns:
    tensorflow_serving.apis.prediction_log_pb2.PredictionLog protos.
  """
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

  images = np.asarray(images, np.float32)
  latents = vae.encoder(images).mean().numpy()
  seed = np.int64(0)
  logs = []
  for batch in sorted({1, len(images)}):
    inputs_by_signature = {
        "serving_default": {"x": images[:batch]}, "encode": {"x": images[:batch]},
        "decode": {"z": latents[:batch]}, "reconstruct": {"x": images[:batch]},
        "sample": {"count": np.int32(batch), "seed": seed},
        "log_likelihood": {"x": images[:batch], "num_samples": np.int32(10), "seed": seed},
        "anomaly_score": {"x": images[:batch]},
    }
    for name in SIGNATURES:
      request = predict_pb2.PredictRequest()
      request.model_spec.name = model_name
      request.model_spec.signature_name = name
      for key, value in inputs_by_signature[name].items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
      logs.append(prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request)))
  return logs


def warmup_images(dataset, likelihood: str, count: int = 8) -> np.ndarray:
  """The first `count` test images of a tfvae.data.Dataset, for `export`'s warm-up requests.

  As tfvae.data.eval_arrays gives them (binarized once for Bernoulli; uint8 stays uint8), and
  computed in numpy, so a caller can take them before TensorFlow is set up.
  """
  return data.eval_head(dataset.test, count, likelihood == "bernoulli", dataset.binary)


def _write_warmup(directory: pathlib.Path, logs) -> None:
  with tf.io.TFRecordWriter(str(directory / WARMUP_FILE)) as writer:
    for log in logs:
      writer.write(log.SerializeToString())


def request_limits() -> dict[str, int]:
  """The limits the signatures are traced with, as tfvae.json records them for tools."""
  return {"max_sample_count": MAX_SAMPLE_COUNT, "max_sample_pixels": MAX_SAMPLE_PIXELS,
          "max_num_samples": MAX_NUM_SAMPLES,
          "max_log_likelihood_pixels": MAX_LOG_LIKELIHOOD_PIXELS}


def current_umask() -> int:
  """The process's umask, read from /proc where Linux shows it, else set and restored at once.

  os.umask can only be read by setting it, which for an instant applies to every thread; the
  value set meanwhile is 0o077, so a file another thread makes then is too private, never too
  open.
  """
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  umask = os.umask(0o077)
  os.umask(umask)
  return umask


def _set_modes(root: pathlib.Path, umask: int) -> None:
  """Gives root and everything under it the modes the umask gives new folders and files.

  tempfile.mkdtemp makes root 0700, which would hide the export from a server running as
  another user.
  """
  for directory, _, files in os.walk(root):
    os.chmod(directory, 0o777 & ~umask)
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.islink(path):  # a link's own mode is meaningless; its target is not ours
        os.chmod(path, 0o666 & ~umask)


def _rename_into_place(temporary: pathlib.Path, model_dir: pathlib.Path, version: int,
                       explicit: bool) -> pathlib.Path:
  """Renames temporary to model_dir/<version>, or to the next free version if that is taken.

  A rename is atomic and fails on a version another export has renamed into place meanwhile,
  so concurrent exports each land as their own version; for an explicit version, that is an
  error instead.

  Raises:
    ExportError: the explicit version was taken meanwhile.
  """
  while True:
    final = model_dir / str(version)
    try:
      if final.exists():  # rename would replace an empty folder; nothing may be replaced
        raise FileExistsError(errno.EEXIST, "exists", str(final))
      os.rename(temporary, final)
      return final
    except OSError as e:
      if e.errno not in _TAKEN:
        raise
      if explicit:
        raise ExportError(f"{final} exists; versions are never overwritten: omit the version"
                          f" to export as {next_version(model_dir)}") from e
      version = max(version + 1, next_version(model_dir))


def export(vae, export_dir: str | os.PathLike, model_name: str, version: int | None = None,
           warmup_images: np.ndarray | None = None) -> pathlib.Path:
  """Writes `vae` as the SavedModel <export_dir>/<model_name>/<version>/ and returns its path.

  Folders get mode 0o777 and files 0o666, less the process's umask (0755 and 0644 under the
  usual 022), so that a server running as another user can load the export.

  Args:
    vae: a trained tfvae.VAE.
    export_dir: the root TF Serving watches (its --model_base_path's parent).
    model_name: the model's folder name.
    version: an explicit version; by default one above the largest present when the export is
      renamed into place (exports running at once get distinct versions). An existing version
      is never overwritten.
    warmup_images: a few real images [B, H, W, C] (float32 in [0, 1], or uint8 0..255, as
      tfvae.data.eval_arrays gives them); when given, the export carries
      assets.extra/tf_serving_warmup_requests so the server traces every signature before
      its first request.

  Raises:
    ExportError: the version exists or the folder cannot be written. Nothing partial is left.
  """
  model_dir = check_writable(export_dir, model_name)
  explicit = version is not None
  version = int(version) if explicit else next_version(model_dir)
  if explicit and (model_dir / str(version)).exists():
    raise ExportError(f"{model_dir / str(version)} exists; versions are never overwritten: omit"
                      f" the version to export as {next_version(model_dir)}")
  archive = keras.export.ExportArchive()
  archive.track(vae)
  for name, (function, signature) in _signatures(vae).items():
    archive.add_endpoint(name, function, input_signature=signature)
  temporary = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
  try:
    archive.write_out(str(temporary), verbose=False)
    extra = temporary / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / METADATA_FILE).write_text(json.dumps(
        {"model_config": vae.model_config.to_dict(), "signatures": list(SIGNATURES),
         "request_limits": request_limits()}, indent=2))
    if warmup_images is not None:
      images = data.to_unit_float(warmup_images).numpy()  # the signatures take float32 [0, 1]
      _write_warmup(extra, warmup_requests(vae, images, model_name))
    _set_modes(temporary, current_umask())
    return _rename_into_place(temporary, model_dir, version, explicit)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise


def load_metadata(path: str | os.PathLike) -> dict:
  """The tfvae.json of an exported version folder (model_config, signatures, request_limits).

  Raises:
    ExportError: the folder is not a tfvae export.
  """
  metadata = pathlib.Path(path) / "assets.extra" / METADATA_FILE
  if not metadata.is_file():
    raise ExportError(f"{path}: no assets.extra/{METADATA_FILE}; pass a version folder exported"
                      f" by tfvae (savedmodels/<model_name>/<version>) or a .keras file")
  return json.loads(metadata.read_text())
