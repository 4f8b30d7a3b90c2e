"""What TF Serving sees: warm-up requests, bad requests, saved_model_cli, documented requests."""

import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import data, export

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A fresh interpreter with only tensorflow and the serving protos: replays the warm-up file and
# sends bad requests.
_SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
path = sys.argv[1]
model = tf.saved_model.load(path)
out = {"warmup": []}
for record in tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"):
  log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
  request = log.predict_log.request
  inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
  outputs = model.signatures[request.model_spec.signature_name](**inputs)
  finite = all(bool(np.all(np.isfinite(v.numpy()))) for v in outputs.values())
  out["warmup"].append([request.model_spec.name, request.model_spec.signature_name,
                        int(next(iter(outputs.values())).shape[0]), finite])
x = tf.zeros([2, 28, 28, 1])
bad = {
  "shape": lambda: model.signatures["encode"](x=tf.zeros([2, 28, 27, 1])),
  "no_channel": lambda: model.signatures["serving_default"](x=tf.zeros([2, 28, 28])),
  "flat": lambda: model.signatures["reconstruct"](x=tf.zeros([2, 784])),
  "rank_5": lambda: model.signatures["log_likelihood"](
      x=tf.zeros([2, 28, 28, 1, 1]), num_samples=tf.constant(5), seed=tf.constant(0, tf.int64)),
  "z_size": lambda: model.signatures["decode"](z=tf.zeros([2, 4])),
  "z_rank": lambda: model.signatures["decode"](z=tf.zeros([3])),
  "scalar": lambda: model.signatures["encode"](x=tf.constant(0.5)),
  "dtype": lambda: model.signatures["encode"](x=tf.zeros([2, 28, 28, 1], tf.int32)),
  "inf": lambda: model.signatures["serving_default"](x=x + float("inf")),
  "negative": lambda: model.signatures["log_likelihood"](
      x=x - 0.5, num_samples=tf.constant(5), seed=tf.constant(0, tf.int64)),
  "count": lambda: model.signatures["sample"](count=tf.constant(10**6),
                                              seed=tf.constant(0, tf.int64)),
  "num_samples": lambda: model.signatures["log_likelihood"](
      x=x, num_samples=tf.constant(0), seed=tf.constant(0, tf.int64)),
  "z": lambda: model.signatures["decode"](z=tf.fill([1, 3], float("nan"))),
  "anomaly_nan": lambda: model.signatures["anomaly_score"](x=x + float("nan")),
}
out["bad"] = {}
for name, call in bad.items():
  try:
    call()
    out["bad"][name] = "accepted"
  except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
    out["bad"][name] = type(e).__name__ + ": " + str(getattr(e, "message", e))[:300]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def served(mnist, tmp_path_factory):
  tf.keras.utils.set_random_seed(0)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=3, hidden_sizes=(32,)))
  images = data.eval_arrays(mnist.x_test[:8], bernoulli=True, binary=False)
  root = tmp_path_factory.mktemp("serving")
  return vae, root, export.export(vae, root, "digits", warmup_images=images)


def test_warmup_file_parses_and_every_request_runs_in_a_fresh_process(served):
  _, _, path = served
  result = subprocess.run([sys.executable, "-c", _SERVE, str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  warmup = out["warmup"]
  assert len(warmup) == 2 * len(export.SIGNATURES)
  assert {(name, signature) for name, signature, _, _ in warmup} == {
      ("digits", s) for s in export.SIGNATURES}
  assert sorted({batch for *_, batch, _ in warmup}) == [1, 8]
  assert all(finite for *_, finite in warmup)
  bad = out["bad"]
  assert "accepted" not in bad.values(), bad
  assert "NaN or Inf" in bad["inf"] and "NaN or Inf" in bad["z"] and "NaN" in bad["anomaly_nan"]
  assert "x must lie in [0, 1]" in bad["negative"]
  assert "count must be <= 10000" in bad["count"]
  assert "num_samples must be >= 1" in bad["num_samples"]
  # A request of the wrong shape is named as such, with the shape it should have had.
  for name, got in [("shape", "2 28 27 1"), ("no_channel", "2 28 28"), ("flat", "2 784"),
                    ("rank_5", "2 28 28 1 1")]:
    assert bad[name].startswith("InvalidArgumentError"), bad[name]
    assert f"x must have shape [B, 28, 28, 1]; got shape] [{got}]" in bad[name], bad[name]
  assert "z must have shape [B, 3]; got shape] [2 4]" in bad["z_size"], bad["z_size"]
  assert "z must have shape [B, 3]; got shape] [3]" in bad["z_rank"], bad["z_rank"]
  assert "x must have shape [B, 28, 28, 1]; got shape] []" in bad["scalar"], bad["scalar"]


def test_saved_model_cli_runs_a_signature(served, tmp_path):
  _, _, path = served
  np.save(tmp_path / "x.npy", np.zeros((2, 28, 28, 1), np.float32))
  cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
  command = [str(cli)] if cli.exists() else [sys.executable, "-m",
                                             "tensorflow.python.tools.saved_model_cli"]
  outputs = tmp_path / "out"
  for signature, inputs in (("encode", ["--inputs", f"x={tmp_path / 'x.npy'}"]),
                            ("sample", ["--input_exprs", "count=2;seed=7"])):
    result = subprocess.run([*command, "run", "--dir", str(path), "--tag_set", "serve",
                             "--signature_def", signature, *inputs, "--outdir", str(outputs),
                             "--overwrite"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  assert np.load(outputs / "latent_mean.npy").shape == (2, 3)
  assert np.load(outputs / "images.npy").shape == (2, 28, 28, 1)


def _documented_examples():
  text = (ROOT / "docs" / "SERVING.md").read_text()
  requests = re.findall(r"Request:\n\n```json\n(.*?)\n```", text, re.S)
  responses = re.findall(r"Response[^\n]*:\n\n```json\n(.*?)\n```", text, re.S)
  return [json.loads(r) for r in requests], [json.loads(r) for r in responses]


def test_documented_requests_are_valid_for_an_export(tmp_path):
  requests, responses = _documented_examples()
  assert len(requests) == len(responses) >= 4
  vae = tfvae.VAE(tfvae.ModelConfig())  # the documented model's shapes: 28x28x1, J = 20
  model = tf.saved_model.load(str(export.export(vae, tmp_path, "mnist_vae")))
  covered = set()
  for request, response in zip(requests, responses, strict=True):
    signature = model.signatures[request["signature_name"]]
    specs = signature.structured_input_signature[1]
    assert set(request["inputs"]) == set(specs)
    inputs = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in request["inputs"].items()}
    outputs = signature(**inputs)
    assert set(outputs) == set(response["outputs"])
    covered.add(request["signature_name"])
  assert covered >= {"serving_default", "decode", "sample", "log_likelihood"}


def test_bin_export_writes_the_next_version_with_warmup(served, data_dir, tmp_path):
  vae, root, _ = served
  checkpoint = tmp_path / "model.keras"
  vae.save(checkpoint)
  env = {**os.environ, "TFVAE_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run([sys.executable, str(ROOT / "bin" / "export"),
                           f"--checkpoint={checkpoint}", f"--export_dir={root}",
                           "--model_name=digits"], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("digits/2")
  assert (root / "digits" / "2" / "assets.extra" / export.WARMUP_FILE).is_file()
  wrong = subprocess.run([sys.executable, str(ROOT / "bin" / "export"),
                          f"--checkpoint={checkpoint}", f"--export_dir={root}",
                          "--dataset=frey_face"], capture_output=True, text=True, env=env,
                         timeout=300)
  assert wrong.returncode != 0 and "pass the --dataset it was trained on" in wrong.stderr


# A fresh interpreter with only tensorflow: requests over the limits, timed, with the peak
# resident memory before and after (getrusage's ru_maxrss, KiB on Linux).
_OVER_THE_LIMITS = r"""
import json, resource, sys, time
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
sample, log_likelihood = model.signatures["sample"], model.signatures["log_likelihood"]
seed = tf.constant(0, tf.int64)
x = tf.zeros([200, 28, 28, 1])
sample(count=tf.constant(2), seed=seed)  # traced and optimized before anything is measured
log_likelihood(x=x[:1], num_samples=tf.constant(2), seed=seed)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for name, call in [
    ("count_1e6", lambda: sample(count=tf.constant(10**6), seed=seed)),
    ("count_1e7", lambda: sample(count=tf.constant(10**7), seed=seed)),
    ("batch_x_num_samples", lambda: log_likelihood(x=x, num_samples=tf.constant(100_000),
                                                   seed=seed)),
    ("num_samples", lambda: log_likelihood(x=x[:1], num_samples=tf.constant(10**6),
                                           seed=seed))]:
  start = time.perf_counter()
  try:
    call()
    message = "accepted"
  except tf.errors.InvalidArgumentError as e:
    message = e.message
  out[name] = {"seconds": time.perf_counter() - start, "message": message[:400]}
out["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def test_requests_over_the_limits_are_refused_at_once_without_memory(served):
  _, _, path = served
  result = subprocess.run([sys.executable, "-c", _OVER_THE_LIMITS, str(path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ("count_1e6", "count_1e7", "batch_x_num_samples", "num_samples"):
    assert out[name]["seconds"] < 1.0, out
  assert out["rss_growth_mib"] < 100, out
  for name, count in (("count_1e6", 10**6), ("count_1e7", 10**7)):
    assert "count must be <= 10000 for 28x28x1 images" in out[name]["message"], out[name]
    assert f"got {count}: ask in batches of at most 10000" in out[name]["message"], out[name]
  assert ("batch * num_samples must be <= 100000 for 28x28x1 images" in
          out["batch_x_num_samples"]["message"]), out
  assert ("got 200 * 100000: ask in batches of at most 1 images" in
          out["batch_x_num_samples"]["message"]), out
  assert "num_samples must be <= 100000" in out["num_samples"]["message"], out


@pytest.fixture(scope="module")
def digits(mnist, tmp_path_factory):
  """(a small VAE trained 5 epochs on 10000 real MNIST digits, exported and loaded; the first
  1000 test digits, binarized, float32)."""
  tf.keras.utils.set_random_seed(0)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=8, hidden_sizes=(128,)))
  vae.compile(optimizer=keras.optimizers.Adam(2e-3))
  vae.fit(data.eval_arrays(mnist.x_train[:10000], bernoulli=True, binary=False), epochs=5,
          batch_size=50, verbose=0)
  path = export.export(vae, tmp_path_factory.mktemp("digits"), "digits")
  x = data.eval_arrays(mnist.x_test[:1000], bernoulli=True, binary=False)
  return tf.saved_model.load(str(path)), data.to_unit_float(x).numpy()


def _scores(model, x, num_samples=50, seed=3):
  x = tf.constant(x)
  log_likelihood = model.signatures["log_likelihood"](
      x=x, num_samples=tf.constant(num_samples), seed=tf.constant(seed, tf.int64))
  return {"elbo": model.signatures["serving_default"](x=x)["elbo"].numpy(),
          "anomaly_score": model.signatures["anomaly_score"](x=x)["anomaly_score"].numpy(),
          "log_likelihood": log_likelihood["log_likelihood"].numpy()}


def test_an_images_scores_do_not_depend_on_the_rest_of_the_request(digits):
  model, x = digits
  image, others = x[:1], x[1:9]
  alone = _scores(model, image)
  requests = {"repeated 5 times": (np.repeat(image, 5, axis=0), [0, 1, 2, 3, 4]),
              "4th of 9": (np.concatenate([others[:3], image, others[3:]]), [3]),
              "last of 9": (np.concatenate([others, image]), [8]),
              # log_likelihood scores 100 images at a time: in the second part.
              "121st of 150": (np.concatenate([x[10:130], image, x[130:159]]), [120])}
  for request, (batch, positions) in requests.items():
    scores = _scores(model, batch)
    for name, values in scores.items():
      np.testing.assert_allclose(values[positions], np.repeat(alone[name], len(positions)),
                                 rtol=2e-6, atol=1e-4, err_msg=f"{name}, {request}")
  # The scores still tell images apart, and another seed draws other noise.
  assert np.ptp(_scores(model, others)["elbo"]) > 5
  assert abs(_scores(model, image, seed=4)["log_likelihood"][0] - alone["log_likelihood"][0]) > 0


def _simple_images() -> np.ndarray:
  """A blank image and single straight strokes where MNIST draws its ones: [7, 28, 28, 1]."""
  images = np.zeros((7, 28, 28), np.float32)
  images[1, 5:23, 14:16] = 1  # vertical, 2 pixels wide
  images[2, 5:23, 14] = 1  # vertical, 1 pixel wide
  for image, (top, bottom) in zip(images[3:], ((18, 10), (17, 11), (19, 9), (16, 12)),
                                  strict=True):
    for row in range(5, 23):  # slanted, 2 pixels wide, from column top to column bottom
      column = round(top + (bottom - top) * (row - 5) / 17)
      image[row, column:column + 2] = 1
  return images[..., None]


def test_simple_images_look_most_normal_to_the_elbo_but_not_to_the_corrected_score(digits):
  model, x = digits
  simple = _simple_images()
  digit_scores, simple_scores = _scores(model, x), _scores(model, simple)
  # The blind spot (Nalisnick et al., 2019): by -elbo, the blank image and every stroke are
  # more normal than 90% of real test digits.
  assert np.all(-simple_scores["elbo"] < np.quantile(-digit_scores["elbo"], 0.1)), (
      -simple_scores["elbo"], np.quantile(-digit_scores["elbo"], [0.1, 0.5]))
  # Corrected for their complexity (Serra et al., 2020), each is more anomalous than 90% of them.
  assert np.all(simple_scores["anomaly_score"] > np.quantile(digit_scores["anomaly_score"],
                                                             0.9)), (
      simple_scores["anomaly_score"], np.quantile(digit_scores["anomaly_score"], [0.5, 0.9]))
