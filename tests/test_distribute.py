"""tf.distribute: mirrored on two logical CPUs and two multi-worker processes on 127.0.0.1
each train like a single device on the same data."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfvae
from tfvae import training

_TRAIN = r"""
import json, sys
import tensorflow as tf
mode, workdir, data_dir = sys.argv[1:4]
if mode == "mirrored":
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tfvae
from tfvae import data, training


class Calls(keras.callbacks.Callback):  # graph calls in each epoch
  def on_train_begin(self, logs=None):
    self.counts = []

  def on_epoch_begin(self, epoch, logs=None):
    self.counts.append(0)

  def on_train_batch_end(self, batch, logs=None):
    self.counts[-1] += 1


mnist = data.load("mnist", data_dir)
dataset = data.Dataset("mnist", mnist.x_train[:3000], mnist.x_test[:1000], False)
config = training.model_config_for(dataset, latent_size=8, hidden_sizes=(64,))
strategy = {"single": "default", "mirrored": "mirrored", "worker": "multi_worker"}[mode]
calls = Calls()
result = training.train(config, tfvae.TrainConfig(epochs=4, seed=3), workdir, dataset=dataset,
                        verbose=0, runtime=tfvae.Runtime(strategy=strategy), callbacks=[calls])
print(json.dumps({"test_elbo": result.test_metrics["elbo"], "chief": result.is_chief,
                  "replicas": result.vae.distribute_strategy.num_replicas_in_sync,
                  "calls_per_epoch": sorted(set(calls.counts)),
                  "train_loss": result.history["loss"][-1],
                  "val_loss": result.history["val_loss"][-1],
                  "workdir": str(result.workdir)}))
"""


def _env(**extra):
  # CPUs only, also on a machine with a GPU: the strategies here replicate over logical CPUs,
  # and two worker processes must not both claim one GPU.
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", **extra}


def _result(completed):
  assert completed.returncode == 0, completed.stderr[-4000:]
  return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  return _result(subprocess.run([sys.executable, "-c", _TRAIN, "single", str(workdir),
                                 str(data_dir)], capture_output=True, text=True, timeout=600,
                                env=_env()))


def test_mirrored_on_two_cpus_matches_one_device(single, data_dir, tmp_path):
  mirrored = _result(subprocess.run([sys.executable, "-c", _TRAIN, "mirrored", str(tmp_path),
                                     str(data_dir)], capture_output=True, text=True,
                                    timeout=600, env=_env()))
  assert mirrored["replicas"] == 2 and single["replicas"] == 1
  assert mirrored["calls_per_epoch"] == [1]  # the epoch's 30 steps in one graph call
  # Same data, batches and initial weights; only the per-replica noise draws differ. The
  # metrics are the replicas' mean, as one device's.
  for name in ("test_elbo", "train_loss", "val_loss"):
    assert abs(mirrored[name] - single[name]) < 0.02 * abs(single[name]), (name, mirrored, single)


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_workers_on_localhost_match_one_device(single, data_dir, tmp_path):
  workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
  processes = []
  for index in range(2):
    tf_config = json.dumps({"cluster": {"worker": workers},
                            "task": {"type": "worker", "index": index}})
    processes.append(subprocess.Popen(
        [sys.executable, "-c", _TRAIN, "worker", str(tmp_path), str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(TF_CONFIG=tf_config)))
  results = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=600)
    results.append(_result(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                       stderr)))
  chief, other = results
  assert chief["chief"] and not other["chief"]
  assert chief["replicas"] == other["replicas"] == 2
  assert chief["calls_per_epoch"] == other["calls_per_epoch"] == [1]  # 30 steps in one call
  assert chief["workdir"] == str(tmp_path) and "workers" in other["workdir"]
  assert (tmp_path / "last.keras").is_file()
  for name in ("test_elbo", "train_loss", "val_loss"):
    assert abs(chief[name] - single[name]) < 0.02 * abs(single[name]), (name, chief, single)


_STEPS_PER_CALL_UNDER_MIRRORED = r"""
import sys
import keras
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tfvae
from tfvae import data
out, data_dir = sys.argv[1:3]
x = data.to_unit_float(data.load("mnist", data_dir).x_train[:1000]).numpy()
batches = tf.data.Dataset.from_tensor_slices(x).batch(64)  # 16 batches, the last of 40 images


class LastBatchLogs(keras.callbacks.Callback):  # what a call returns, as callbacks see it
  def on_train_begin(self, logs=None):
    self.losses = []

  def on_train_batch_end(self, batch, logs=None):
    self.last = logs["loss"]

  def on_epoch_end(self, epoch, logs=None):
    self.losses.append(self.last)


for name, steps, jit_compile in (("1", 1, "auto"), ("3", 3, "auto"), ("7", 7, "auto"),
                                 ("3_jit_compile", 3, True)):
  keras.utils.set_random_seed(0)
  runtime = tfvae.Runtime(strategy="mirrored")
  with runtime.scope(runtime.make_strategy()):
    vae = tfvae.VAE(tfvae.ModelConfig(latent_size=4, hidden_sizes=(32,)), seed=1)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
  last_batch = LastBatchLogs()
  with runtime.attach(vae, steps):
    history = vae.fit(batches, epochs=2, validation_data=batches, verbose=0,
                      callbacks=[last_batch]).history
    test = vae.evaluate(batches, verbose=0, return_dict=True)
  np.savez(f"{out}/{name}.npz", *vae.get_weights(), loss=history["loss"],
           val_loss=history["val_loss"], test_loss=test["loss"],
           last_call_loss=last_batch.losses,
           iterations=int(vae.optimizer.iterations.numpy()))
"""


@pytest.fixture(scope="module")
def mirrored_steps(data_dir, tmp_path_factory):
  """Runs _STEPS_PER_CALL_UNDER_MIRRORED: (its output folder, its stderr)."""
  out = tmp_path_factory.mktemp("mirrored_steps")
  completed = subprocess.run([sys.executable, "-c", _STEPS_PER_CALL_UNDER_MIRRORED, str(out),
                              str(data_dir)], capture_output=True, text=True, timeout=600,
                             env=_env())
  assert completed.returncode == 0, completed.stderr[-4000:]
  return out, completed.stderr


def _assert_same_training(npz, reference, label):
  assert sorted(npz.files) == sorted(reference.files)
  for name in reference.files:  # every weight, the optimizer's step and the metrics, bit for bit
    np.testing.assert_array_equal(npz[name], reference[name], err_msg=f"{label}: {name}")


def test_steps_per_call_under_mirrored_train_as_one_step_per_call(mirrored_steps):
  # Keras 3.15 cannot run more than one step per call under MirroredStrategy; the VAE runs
  # its own loop there. 3 and 7 steps per call leave a shorter last call in each epoch of 16.
  out, _ = mirrored_steps
  one = np.load(out / "1.npz")
  assert int(one["iterations"]) == 2 * 16
  # The last call's outputs are the epoch's metrics: the mean over the replicas (of equal
  # shares here) of their means is the mean of the epoch, which Keras reads from the metrics.
  np.testing.assert_allclose(one["last_call_loss"], one["loss"], rtol=1e-6)
  for steps in (3, 7):
    _assert_same_training(np.load(out / f"{steps}.npz"), one, f"{steps} steps per call")


def test_jit_compile_under_mirrored_is_ignored_with_a_warning(mirrored_steps):
  # XLA could not compile a replica's step on two devices (Keras's own function fails with
  # jit_compile=True under MirroredStrategy too); the VAE's loop trains without XLA, says so,
  # and trains exactly as with jit_compile="auto".
  out, stderr = mirrored_steps
  _assert_same_training(np.load(out / "3_jit_compile.npz"), np.load(out / "3.npz"),
                        "jit_compile=True")
  assert stderr.count("compile(jit_compile=True) is ignored under MirroredStrategy") == 2, (
      stderr[-4000:])  # once for fit's function, once for evaluate's


class _Calls(keras.callbacks.Callback):
  def on_train_begin(self, logs=None):
    self.ends = []

  def on_train_batch_end(self, batch, logs=None):
    self.ends.append(batch)


@pytest.mark.parametrize("strategy", ["mirrored", "multi_worker"])
def test_a_strategy_with_one_replica_trains_as_without_one(strategy, tmp_path, toy_dataset):
  # mirrored on a machine with one device, multi_worker without TF_CONFIG. Under a strategy
  # the runtime feeds batches and loops over the 10 steps of an epoch in one call; the training
  # is the same as with blocks of batches without one.
  dataset = toy_dataset(5, 352, 32)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,))
  results, calls = {}, {}
  for name in ("default", strategy):  # 320 train and 32 validation examples
    train_config = tfvae.TrainConfig(epochs=2, batch_size=32, eval_num_samples=0,
                                     validation_examples=32)
    calls[name] = _Calls()
    results[name] = training.train(config, train_config, tmp_path / name, dataset=dataset,
                                   verbose=0, runtime=tfvae.Runtime(strategy=name),
                                   callbacks=[calls[name]])
  distributed = results[strategy].vae
  assert distributed.distribute_strategy.num_replicas_in_sync == 1
  assert int(distributed.optimizer.iterations.numpy()) == 2 * 10
  assert calls[strategy].ends == [9, 9]  # one call of 10 steps an epoch (numbered per epoch)
  for metric in ("loss", "val_loss", "val_kl"):
    np.testing.assert_allclose(results[strategy].history[metric],
                               results["default"].history[metric], rtol=1e-5)
  assert (tmp_path / strategy / "last.keras").is_file()
