"""What TF Serving sees: warm-up requests, bad requests, saved_model_cli, documented requests."""

import json
import os
import pathlib
import re
import subprocess
import sys

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
  assert "NaN or Inf" in bad["inf"] and "NaN or Inf" in bad["z"]
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
