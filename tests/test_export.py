"""SavedModel export: signatures, versions, atomic writes, fresh-process reload."""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import evaluation, export, objectives

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
                     ("log_likelihood", {"x": x, "num_samples": tf.constant(300), "seed": seed}),
                     ("anomaly_score", {"x": x})]:
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


def test_in_parts_hands_the_function_parts_of_at_most_size():
  x = tf.ones([10, 2])
  sizes = export._in_parts(lambda part: tf.fill(tf.shape(part), tf.cast(tf.shape(part)[0],
                                                                        tf.float32)), x, 4, (2,))
  assert sizes.shape == (10, 2) and sizes[:, 0].numpy().tolist() == [4] * 8 + [2] * 2


def test_sample_decodes_in_parts_and_gives_vae_sample_images(trained, tmp_path, monkeypatch):
  vae = trained[0]
  per_decoding = max(tfvae.networks.activation_floats(vae.decoder.network), 2 * 784)
  monkeypatch.setattr(evaluation, "DECODE_BYTES", 4 * per_decoding * 3)  # 3 at once
  sample = tf.saved_model.load(str(export.export(vae, tmp_path, "digits"))).signatures["sample"]
  for count in (0, 1, 7):
    out = sample(count=tf.constant(count), seed=tf.constant(5, tf.int64))
    assert out["images"].shape == (count, 28, 28, 1) and out["z"].shape == (count, 3)
    np.testing.assert_allclose(out["images"], vae.sample(count, seed=5), rtol=1e-5, atol=1e-6)


def test_layout_is_model_name_then_integer_version(trained):
  _, _, root, path = trained
  assert path == root / "digits" / "1"
  assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
  assert [p.name for p in (root / "digits").iterdir()] == ["1"]  # no temporary left over
  config = json.loads((path / "assets.extra" / "tfvae.json").read_text())
  assert config["model_config"]["latent_size"] == 3
  assert config["request_limits"]["max_sample_count"] == export.MAX_SAMPLE_COUNT


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
  # The estimates Keras computes with the same noise: from each image's content and the seed.
  posterior = vae.encoder(x)
  np.testing.assert_allclose(elbo, objectives.elbo_terms(
      x, posterior, vae.prior, vae.decoder, 1, tf.constant([0, 0]), content_noise=True)["elbo"],
                             rtol=1e-5)
  np.testing.assert_allclose(log_likelihood, evaluation.importance_sampled_log_likelihood(
      vae, x, 300, tf.constant([0, 11]), content_noise=True), rtol=1e-5)
  # The complexity-corrected score: -elbo in bits less the PNG length (57 bytes of it headers).
  complexity = np.array(out["anomaly_score"]["complexity_bits"])
  assert np.all(complexity % 8 == 0) and np.all(complexity > 57 * 8)
  np.testing.assert_allclose(out["anomaly_score"]["elbo"], elbo, rtol=1e-6)
  np.testing.assert_allclose(out["anomaly_score"]["anomaly_score"],
                             -elbo / np.log(2.0) - complexity, rtol=1e-5)
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


# One of two exporters run at once: both pick their version, then wait for each other at the
# rename, so both try the same version and one must take the next.
_EXPORT_AT_ONCE = r"""
import json, os, pathlib, sys, time
import tensorflow as tf
import tfvae
from tfvae import evaluation, export, objectives
root, barrier, seed = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
tf.keras.utils.set_random_seed(seed)
vae = tfvae.VAE(tfvae.ModelConfig(latent_size=3, hidden_sizes=(16,)))
rename, next_version, picked = os.rename, export.next_version, []

def recording_next_version(model_dir):
  picked.append(next_version(model_dir))
  return picked[-1]

def rename_when_both_are_ready(source, target):
  if pathlib.Path(target).parent == root / "digits":
    (barrier / str(seed)).touch()
    deadline = time.monotonic() + 240
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
      time.sleep(0.01)
  rename(source, target)

export.next_version, os.rename = recording_next_version, rename_when_both_are_ready
path = export.export(vae, root, "digits")
print(json.dumps({"path": str(path), "picked": picked}))
"""


def test_concurrent_exports_of_one_name_land_as_distinct_versions(tmp_path):
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
         "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parent.parent),
                                        os.environ.get("PYTHONPATH", "")])}
  processes = [subprocess.Popen([sys.executable, "-c", _EXPORT_AT_ONCE, str(tmp_path),
                                 str(barrier), str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
  outs = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  # Both picked version 1 and renamed at once; the one that lost picked again and took 2.
  assert sorted(out["picked"] for out in outs) == [[1], [1, 2]]
  assert sorted(pathlib.Path(out["path"]).name for out in outs) == ["1", "2"]
  assert [p.name for p in sorted((tmp_path / "digits").iterdir())] == ["1", "2"]  # no temporary
  x = tf.fill([1, 28, 28, 1], 0.5)
  means = [tf.saved_model.load(out["path"]).signatures["encode"](x=x)["latent_mean"].numpy()
           for out in outs]
  assert not np.allclose(means[0], means[1])  # two models: neither export replaced the other


def test_an_explicit_version_taken_while_writing_is_never_overwritten(trained, tmp_path,
                                                                      monkeypatch):
  vae, _, _, path = trained
  rename = os.rename

  def another_export_lands_first(source, target):
    shutil.copytree(path, target)
    rename(source, target)

  monkeypatch.setattr(export.os, "rename", another_export_lands_first)
  with pytest.raises(export.ExportError, match="never overwritten: omit the version to export"
                                               " as 4"):
    export.export(vae, tmp_path, "digits", version=3)
  assert [p.name for p in (tmp_path / "digits").iterdir()] == ["3"]  # the other export, intact
  assert (tmp_path / "digits" / "3" / "saved_model.pb").read_bytes() == (
      path / "saved_model.pb").read_bytes()


# Loads two exports after giving up root for uid 65534: the interpreter lives under /root (mode
# 0700), so it starts as root, loads once to import what loading needs, then drops privileges.
_LOAD_AS_NOBODY = r"""
import json, os, sys
import tensorflow as tf
readable, private = sys.argv[1], sys.argv[2]
tf.saved_model.load(readable)
os.setgid(65534)
os.setuid(65534)
out = {"uid": os.getuid()}
x = tf.zeros([1, 28, 28, 1])
out["readable"] = tf.saved_model.load(readable).signatures["encode"](x=x)["latent_mean"].numpy(
    ).tolist()
try:
  tf.saved_model.load(private)
  out["private"] = "loaded"
except Exception as e:
  out["private"] = type(e).__name__
print(json.dumps(out))
"""


def _modes(path: pathlib.Path) -> tuple[set[int], set[int]]:
  """(modes of path and the folders under it, modes of the files under it)."""
  entries = [path, *path.rglob("*")]
  return ({stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_dir()},
          {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_file()})


def test_exports_get_the_modes_of_the_umask_and_another_user_can_load_them(trained):
  vae, _, _, _ = trained
  # Not under pytest's tmp_path, whose root is 0700: uid 65534 must reach the export.
  root = pathlib.Path(tempfile.mkdtemp(prefix="tfvae-modes-"))
  try:
    root.chmod(0o755)
    exported = {}
    for umask in (0o022, 0o077):
      old = os.umask(umask)
      try:
        exported[umask] = export.export(vae, root, f"umask{umask:03o}")
      finally:
        os.umask(old)
    assert _modes(exported[0o022]) == ({0o755}, {0o644})
    assert _modes(exported[0o077]) == ({0o700}, {0o600})
    if os.geteuid() != 0:
      pytest.skip("loading as another user needs root")
    result = subprocess.run([sys.executable, "-c", _LOAD_AS_NOBODY, str(exported[0o022]),
                             str(exported[0o077])], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["uid"] == 65534
    expected = vae.encoder(np.zeros([1, 28, 28, 1], np.float32)).mean().numpy()
    np.testing.assert_allclose(out["readable"], expected, rtol=1e-5, atol=1e-6)
    assert out["private"] != "loaded"  # the umask said private: uid 65534 is refused
  finally:
    shutil.rmtree(root, ignore_errors=True)


def test_exported_discretized_logistic_gives_probabilities_of_the_256_levels(tmp_path):
  # A one-pixel model: the served log_likelihood of every 8-bit value estimates its probability,
  # unbiased in p, so the 256 estimates sum to 1 within Monte Carlo error.
  tf.keras.utils.set_random_seed(3)
  vae = tfvae.VAE(tfvae.ModelConfig(image_shape=(1, 1, 1), latent_size=2, hidden_sizes=(8,),
                                    likelihood="discretized_logistic", mixture_components=2))
  x = np.random.default_rng(1).integers(90, 170, (200, 1, 1, 1)).astype(np.uint8)
  vae.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
  vae.fit(x, epochs=30, batch_size=20, verbose=0)
  path = export.export(vae, tmp_path, "pixel")
  served = tf.saved_model.load(str(path)).signatures["log_likelihood"]
  levels = (np.arange(256, dtype=np.float32) / 255).reshape(256, 1, 1, 1)
  log_p = served(x=tf.constant(levels), num_samples=tf.constant(2000),
                 seed=tf.constant(5, tf.int64))["log_likelihood"].numpy()
  assert np.all(log_p <= 0)  # log-probabilities of discrete values, not densities
  np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, atol=0.02)
  assert np.exp(log_p[90:170]).sum() > 0.5  # and the mass sits where the data were
