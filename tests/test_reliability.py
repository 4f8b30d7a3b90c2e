"""Faults a long run meets: kill and resume, divergence, corrupt input, unwritable outputs."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfvae
from tfvae import data, training
from tfvae.data import DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent
_QUICK = ["--max_examples=6000", "--hidden_sizes=64", "--latent_size=8", "--epochs=6",
          "--steps_per_execution=5"]


def _train_command(workdir, export_dir, *extra):
  return [sys.executable, str(ROOT / "bin" / "train"), *_QUICK, f"--workdir={workdir}",
          f"--export_dir={export_dir}", "--model_name=m", *extra]


def _env(data_dir):
  return {**os.environ, "TFVAE_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _epochs_and_val_loss(workdir):
  with open(workdir / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  return [int(r["epoch"]) for r in rows], float(rows[-1]["val_loss"])


def test_sigkill_mid_epoch_then_the_same_command_resumes(data_dir, tmp_path):
  work, models = tmp_path / "work", tmp_path / "models"
  process = subprocess.Popen(_train_command(work, models), env=_env(data_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metadata = work / "backup" / "training_metadata.json"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 2:
      break
    time.sleep(0.02)
  time.sleep(0.3)  # into the next epoch
  assert process.poll() is None, "training finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  finished = json.loads(metadata.read_text())["epoch"]
  assert 2 <= finished < 6
  assert not (models / "m").exists() or not any((models / "m").iterdir())

  resumed = subprocess.run(_train_command(work, models), env=_env(data_dir),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Epoch {finished + 1}/6" in resumed.stdout
  assert "Epoch 1/6" not in resumed.stdout  # nothing but the interrupted epoch is redone

  straight = subprocess.run(_train_command(tmp_path / "straight", tmp_path / "m2"),
                            env=_env(data_dir), capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-3000:]
  epochs, val_loss = _epochs_and_val_loss(work)
  straight_epochs, straight_val_loss = _epochs_and_val_loss(tmp_path / "straight")
  assert epochs[-1] == straight_epochs[-1] == 5 and epochs == sorted(set(epochs))
  # Same batches, same noise, same optimizer state: the runs end at the same loss.
  assert abs(val_loss - straight_val_loss) < 0.5, (val_loss, straight_val_loss)
  assert (models / "m" / "1" / "saved_model.pb").is_file()


class _Explode(keras.callbacks.Callback):
  """Sets an absurd learning rate from epoch 2 on."""

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == 1:
      self.model.optimizer.learning_rate.assign(1e30)


def test_divergence_stops_with_a_clear_message_and_keeps_the_good_checkpoint(mnist, tmp_path):
  dataset = data.Dataset("mnist", mnist.x_train[:2000], mnist.x_test[:500], False)
  model_config = training.model_config_for(dataset, latent_size=4, hidden_sizes=(32,),
                                           likelihood="gaussian")
  train_config = tfvae.TrainConfig(epochs=4, optimizer="sgd", learning_rate=1e-3)
  with pytest.raises(training.NonFiniteLossError,
                     match=r"(loss|elbo|kl|nll) became (nan|inf).*--learning_rate"):
    training.train(model_config, train_config, tmp_path, dataset=dataset, verbose=0,
                   callbacks=[_Explode()])
  good = keras.saving.load_model(tmp_path / "last.keras")
  assert all(np.all(np.isfinite(w)) for w in good.get_weights())
  assert np.all(np.isfinite(good.reconstruct(data.eval_arrays(dataset.x_test[:8], False,
                                                               False))))
  rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
  assert [r["epoch"] for r in rows] == ["0"]  # only the good epoch was recorded


@pytest.mark.parametrize("schedule", [False, True])
def test_divergence_message_names_the_learning_rate_under_a_strategy(schedule):
  # Under a distribution strategy the optimizer's variables are distributed variables, which
  # float() does not take; the message must still say the rate to lower.
  learning_rate = (keras.optimizers.schedules.ExponentialDecay(3e-4, 10, 0.5) if schedule
                   else 3e-4)  # a schedule at step 0 is at its initial rate
  with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
    vae = tfvae.VAE(tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(4,)))
    vae.compile(optimizer=keras.optimizers.Adam(learning_rate))
  callback = training.StopOnNonFinite()
  callback.set_model(vae)
  with pytest.raises(training.NonFiniteLossError,
                     match=r"^kl became inf in optimizer steps 2-3 of epoch 1;"
                           r".*--learning_rate \(now 0\.0003\)"):
    callback.on_train_batch_begin(1)
    callback.on_train_batch_end(2, {"loss": 1.0, "kl": float("inf")})


def test_absurd_learning_rate_on_the_command_line_exports_nothing(data_dir, tmp_path):
  result = subprocess.run(
      _train_command(tmp_path / "w", tmp_path / "models", "--likelihood=gaussian",
                     "--optimizer=sgd", "--learning_rate=1e30", "--epochs=2"),
      env=_env(data_dir), capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  error = result.stderr.strip().splitlines()[-1]
  assert "became" in error and "--learning_rate" in error and "nothing was exported" in error
  assert not list((tmp_path / "models" / "m").iterdir())


def test_an_unwritable_export_dir_fails_before_training(data_dir, tmp_path):
  blocker = tmp_path / "blocker"
  blocker.write_text("a file, not a folder")
  started = time.time()
  result = subprocess.run(_train_command(tmp_path / "w", blocker), env=_env(data_dir),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "pass a writable --export_dir" in result.stderr
  assert not (tmp_path / "w").exists() and time.time() - started < 60


def test_the_same_seed_gives_the_same_weights(mnist, tmp_path):
  dataset = data.Dataset("mnist", mnist.x_train[:1000], mnist.x_test[:200], False)
  config = training.model_config_for(dataset, latent_size=4, hidden_sizes=(32,))
  weights = []
  for run in ("a", "b", "c"):
    seed = 1 if run != "c" else 2
    result = training.train(config, tfvae.TrainConfig(epochs=2, seed=seed), tmp_path / run,
                            dataset=dataset, verbose=0)
    weights.append(result.vae.get_weights())
  for a, b in zip(weights[0], weights[1], strict=True):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, c) for a, c in zip(weights[0], weights[2], strict=True))


# ---- parsers never crash or hang on arbitrary bytes -------------------------------------------

# A generous deadline: a loaded CI machine must not fail it, a hang still would.
_FUZZ = settings(max_examples=150, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=4096))
def test_idx_parser_parses_or_raises_data_error(raw):
  try:
    images = data.parse_idx_images(raw, "fuzz.gz")
  except DataError:
    return
  assert images.ndim == 4 and images.dtype == np.uint8


@_FUZZ
@given(st.one_of(st.binary(max_size=4096),
                 st.lists(st.sampled_from([b"0", b"1", b"2", b" ", b"\n", b"-", b"x"]),
                          max_size=3000).map(b"".join)))
def test_amat_parser_parses_or_raises_data_error(raw):
  try:
    images = data.parse_amat(raw, "fuzz.amat")
  except DataError:
    return
  assert images.shape[1:] == (28, 28, 1) and set(np.unique(images)) <= {0, 1}


@_FUZZ
@given(st.binary(max_size=2048))
def test_mat_parser_parses_or_raises_data_error(raw):
  try:
    data.parse_frey_face(raw, "fuzz.mat")
  except DataError:
    return
  raise AssertionError("random bytes parsed as Frey Face")


@_FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_gzip_prefixed_bytes_parse_or_raise_data_error(tail):
  try:
    data.parse_idx_images(b"\x1f\x8b" + tail, "fuzz.gz")
  except DataError:
    pass
