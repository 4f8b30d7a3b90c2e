"""SavedModel export for TensorFlow Serving: signatures, versioned folders, atomic writes.

Layout: <export_dir>/<model_name>/<version>/, version an integer one above the largest there.
The model is written to a hidden temporary folder beside it and renamed into place, so a server
polling the folder never sees half a model.

Signatures (tensors only, any batch size; x is float32 [B, H, W, C] in [0, 1]):
  serving_default(x) -> latent_mean [B, J], latent_scale [B, J], reconstruction [B, H, W, C],
                        elbo [B] (one reparameterized sample, fixed seed: deterministic)
  encode(x)          -> latent_mean, latent_scale
  decode(z [B, J])   -> reconstruction (the mean of p(x|z))
  reconstruct(x)     -> reconstruction
  sample(count: int32 scalar, seed: int64 scalar) -> images [count, H, W, C], z [count, J]
  log_likelihood(x, num_samples: int32 scalar, seed: int64 scalar) -> log_likelihood [B]

assets.extra/tfvae.json records the model's config for tools; TF Serving ignores it.
"""

from __future__ import annotations

import json
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
# Requests asking for more than these fail instead of exhausting the server's memory.
MAX_SAMPLE_COUNT = 10_000
MAX_NUM_SAMPLES = 100_000
SIGNATURES = ("serving_default", "encode", "decode", "reconstruct", "sample", "log_likelihood")
_VERSION = re.compile(r"^\d+$")


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


def _check_input(x: tf.Tensor, likelihood: str, image_shape: tuple[int, ...]) -> tf.Tensor:
  """Fails the request (InvalidArgumentError) on a shape other than [B, *image_shape], on NaN
  or Inf, or on pixels outside [0, 1]."""
  with tf.control_dependencies([_check_shape(x, "x", image_shape)]):
    x = tf.identity(x)
  checks = [tf.debugging.assert_all_finite(x, "x holds NaN or Inf values")]
  in_range = tf.reduce_all((x >= 0.0) & (x <= 1.0))
  checks.append(tf.debugging.Assert(
      in_range, [f"x must lie in [0, 1] for the {likelihood} likelihood; got min/max",
                 tf.reduce_min(x), tf.reduce_max(x)]))
  with tf.control_dependencies(checks):
    return tf.identity(x)


def _signatures(vae) -> dict[str, tuple]:
  """name -> (function, input signature) for every serving signature."""
  config = vae.model_config
  image_spec = tf.TensorSpec([None, *config.image_shape], tf.float32, name="x")
  scalar_seed = tf.TensorSpec([], tf.int64, name="seed")

  def check(x):
    return _check_input(x, config.likelihood, config.image_shape)

  def latent_outputs(posterior):
    return {"latent_mean": posterior.mean(), "latent_scale": posterior.stddev()}

  def serving_default(x):
    x = check(x)
    posterior = vae.encoder(x)
    terms = objectives.elbo_terms(x, posterior, vae.prior, vae.decoder, 1,
                                  tf.constant([0, 0], tf.int32))
    reconstruction = vae.decoder(posterior.mean()).mean()
    return {**latent_outputs(posterior), "reconstruction": reconstruction, "elbo": terms["elbo"]}

  def encode(x):
    return latent_outputs(vae.encoder(check(x)))

  def decode(z):
    with tf.control_dependencies([_check_shape(z, "z", (config.latent_size,))]):
      z = tf.debugging.assert_all_finite(z, "z holds NaN or Inf values")
    return {"reconstruction": vae.decoder(z).mean()}

  def reconstruct(x):
    return {"reconstruction": vae.reconstruct(check(x))}

  def sample(count, seed):
    tf.debugging.assert_non_negative(count, "count must be >= 0")
    tf.debugging.assert_less_equal(count, MAX_SAMPLE_COUNT,
                                   f"count must be <= {MAX_SAMPLE_COUNT}; ask in batches")
    images, z = vae.sample(count, seed=seed, return_latents=True)
    return {"images": images, "z": z}

  def log_likelihood(x, num_samples, seed):
    tf.debugging.assert_positive(num_samples, "num_samples must be >= 1")
    tf.debugging.assert_less_equal(num_samples, MAX_NUM_SAMPLES,
                                   f"num_samples must be <= {MAX_NUM_SAMPLES}")
    return {"log_likelihood": evaluation.importance_sampled_log_likelihood(
        vae, check(x), num_samples, _stateless_seed(seed))}

  return {
      "serving_default": (serving_default, [image_spec]),
      "encode": (encode, [image_spec]),
      "decode": (decode, [tf.TensorSpec([None, config.latent_size], tf.float32, name="z")]),
      "reconstruct": (reconstruct, [image_spec]),
      "sample": (sample, [tf.TensorSpec([], tf.int32, name="count"), scalar_seed]),
      "log_likelihood": (log_likelihood, [image_spec, tf.TensorSpec([], tf.int32,
                                                                    name="num_samples"),
                                          scalar_seed]),
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
  return data.eval_arrays(dataset.x_test[:count], likelihood == "bernoulli", dataset.binary)


def _write_warmup(directory: pathlib.Path, logs) -> None:
  with tf.io.TFRecordWriter(str(directory / WARMUP_FILE)) as writer:
    for log in logs:
      writer.write(log.SerializeToString())


def export(vae, export_dir: str | os.PathLike, model_name: str, version: int | None = None,
           warmup_images: np.ndarray | None = None) -> pathlib.Path:
  """Writes `vae` as the SavedModel <export_dir>/<model_name>/<version>/ and returns its path.

  Args:
    vae: a trained tfvae.VAE.
    export_dir: the root TF Serving watches (its --model_base_path's parent).
    model_name: the model's folder name.
    version: an explicit version; by default one above the largest present. An existing
      version is never overwritten.
    warmup_images: a few real images [B, H, W, C] (float32 in [0, 1], or uint8 0..255, as
      tfvae.data.eval_arrays gives them); when given, the export carries
      assets.extra/tf_serving_warmup_requests so the server traces every signature before
      its first request.

  Raises:
    ExportError: the version exists or the folder cannot be written. Nothing partial is left.
  """
  model_dir = check_writable(export_dir, model_name)
  version = next_version(model_dir) if version is None else int(version)
  final = model_dir / str(version)
  if final.exists():
    raise ExportError(f"{final} exists; versions are never overwritten: omit the version to"
                      f" export as {next_version(model_dir)}")
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
        {"model_config": vae.model_config.to_dict(), "signatures": list(SIGNATURES)}, indent=2))
    if warmup_images is not None:
      images = data.to_unit_float(warmup_images).numpy()  # the signatures take float32 [0, 1]
      _write_warmup(extra, warmup_requests(vae, images, model_name))
    os.rename(temporary, final)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  return final


def load_metadata(path: str | os.PathLike) -> dict:
  """The tfvae.json of an exported version folder (model_config, signatures).

  Raises:
    ExportError: the folder is not a tfvae export.
  """
  metadata = pathlib.Path(path) / "assets.extra" / METADATA_FILE
  if not metadata.is_file():
    raise ExportError(f"{path}: no assets.extra/{METADATA_FILE}; pass a version folder exported"
                      f" by tfvae (savedmodels/<model_name>/<version>) or a .keras file")
  return json.loads(metadata.read_text())
