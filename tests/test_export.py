"""SavedModel export: signatures, versions, atomic writes, fresh-process reload."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import export

# Runs in a fresh interpreter that imports only tensorflow and numpy.
_RELOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, inputs = sys.argv[1], np.load(sys.argv[2])
model = tf.saved_model.load(path)
x = tf.constant(inputs["x"])
seed = tf.constant(11, tf.int64)
out = {"signatures": sorted(model.signatures)}
for name, kwargs in [("serving_default", {"x": x}), ("encode", {"x": x}),
                     ("decode", {"z": tf.constant(inputs["z"])}), ("reconstruct", {"x": x}),
                     ("sample", {"count": tf.constant(3), "seed": seed}),
                     ("log_likelihood", {"x": x, "num_samples": tf.constant(300), "seed": seed})]:
  out[name] = {k: v.numpy().tolist() for k, v in model.signatures[name](**kwargs).items()}
try:
  model.signatures["reconstruct"](x=x * 3.0)
  out["bad_range"] = "accepted"
except tf.errors.InvalidArgumentError as e:
  out["bad_range"] = e.message
try:
  model.signatures["encode"](x=x + float("nan"))
  out["nan"] = "accepted"
except tf.errors.InvalidArgumentError as e:
  out["nan"] = e.message
out["modules"] = sorted(m for m in ("tfvae", "tensorflow_probability") if m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tf.keras.utils.set_random_seed(1)
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=3, hidden_sizes=(32,)))
  x = (np.random.default_rng(0).random((6, 28, 28, 1)) < 0.4).astype(np.float32)
  vae.compile(optimizer="adam")
  vae.fit(x, epochs=1, batch_size=3, verbose=0)
  root = tmp_path_factory.mktemp("export")
  return vae, x, root, export.export(vae, root, "digits")


def test_layout_is_model_name_then_integer_version(trained):
  _, _, root, path = trained
  assert path == root / "digits" / "1"
  assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
  assert [p.name for p in (root / "digits").iterdir()] == ["1"]  # no temporary left over
  config = json.loads((path / "assets.extra" / "tfvae.json").read_text())
  assert config["model_config"]["latent_size"] == 3


def test_fresh_process_with_only_tensorflow_gets_the_keras_numbers(trained, tmp_path):
  vae, x, _, path = trained
  z = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
  np.savez(tmp_path / "inputs.npz", x=x, z=z)
  result = subprocess.run([sys.executable, "-c", _RELOAD, str(path), str(tmp_path / "inputs.npz")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["signatures"] == sorted(export.SIGNATURES)
  assert out["modules"] == []
  expected = vae(x)
  for key in ("latent_mean", "latent_scale", "reconstruction"):
    np.testing.assert_allclose(out["serving_default"][key], expected[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["encode"]["latent_mean"], expected["latent_mean"], rtol=1e-5)
  np.testing.assert_allclose(out["decode"]["reconstruction"], vae.decoder(z).mean(), rtol=1e-5)
  np.testing.assert_allclose(out["reconstruct"]["reconstruction"], expected["reconstruction"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["sample"]["images"], vae.sample(3, seed=11), rtol=1e-5,
                             atol=1e-6)
  elbo = np.array(out["serving_default"]["elbo"])
  log_likelihood = np.array(out["log_likelihood"]["log_likelihood"])
  assert elbo.shape == log_likelihood.shape == (6,)
  assert np.all(np.isfinite(log_likelihood)) and np.mean(log_likelihood) > np.mean(elbo)
  assert "x must lie in [0, 1]" in out["bad_range"]
  assert "NaN or Inf" in out["nan"]


def test_saved_model_cli_lists_every_signature(trained):
  _, _, _, path = trained
  cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
  command = [str(cli)] if cli.exists() else [sys.executable, "-m",
                                             "tensorflow.python.tools.saved_model_cli"]
  result = subprocess.run([*command, "show", "--all", "--dir", str(path)], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  for name in export.SIGNATURES:
    assert f"signature_def['{name}']" in result.stdout
  assert "inputs['num_samples']" in result.stdout and "outputs['log_likelihood']" in result.stdout


def test_versions_grow_and_are_never_overwritten(trained):
  vae, _, root, _ = trained
  second = export.export(vae, root, "digits")
  assert second.name == "2" and export.versions(root / "digits") == [1, 2]
  with pytest.raises(export.ExportError, match="never overwritten"):
    export.export(vae, root, "digits", version=1)


def test_a_failed_export_leaves_no_partial_folder(trained, monkeypatch):
  vae, _, root, _ = trained
  before = sorted(p.name for p in (root / "digits").iterdir())

  def broken(*args, **kwargs):
    raise OSError("disk full")

  # Fails after the SavedModel is written to its temporary folder, before the rename.
  monkeypatch.setattr(export.os, "rename", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export(vae, root, "digits")
  assert sorted(p.name for p in (root / "digits").iterdir()) == before


def test_an_unwritable_export_dir_fails_early(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(export.ExportError, match="pass a writable --export_dir"):
    export.check_writable(blocker, "m")
  with pytest.raises(export.ExportError, match="plain folder name"):
    export.check_writable(tmp_path, "../escape")
