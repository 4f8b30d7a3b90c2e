"""tfvae.training.train: the run's bookkeeping."""

import keras
import numpy as np
import pytest

import tfvae
from tfvae import data, training


def test_every_epoch_is_exactly_one_pass_whatever_steps_per_execution(tmp_path, toy_dataset):
  dataset = toy_dataset(0, 1800, 50)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  # 18 steps per epoch: 20 is cut to 18; calls of 5 leave a last block of 3 in each epoch.
  histories = []
  for requested in (1, 20, 5):
    result = training.train(config, tfvae.TrainConfig(epochs=3, validation_examples=0),
                            tmp_path / str(requested),
                            dataset=dataset, verbose=0,
                            runtime=tfvae.Runtime(steps_per_execution=requested))
    assert int(result.vae.optimizer.iterations) == 3 * 18
    histories.append(result.history["loss"])
  np.testing.assert_allclose(histories[1], histories[0], rtol=1e-6)
  np.testing.assert_allclose(histories[2], histories[0], rtol=1e-6)


class _CallLogs(keras.callbacks.Callback):
  def on_train_begin(self, logs=None):
    self.ends = []

  def on_train_batch_end(self, batch, logs=None):
    self.ends.append(batch)


def test_progress_counts_optimizer_steps(tmp_path, toy_dataset):
  dataset = toy_dataset(0, 2000, 50)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  calls = _CallLogs()
  training.train(config, tfvae.TrainConfig(epochs=1), tmp_path, dataset=dataset, verbose=0,
                 runtime=tfvae.Runtime(steps_per_execution=5), callbacks=[calls])
  assert calls.ends == [4, 9, 14, 19]  # Keras's step numbers: 4 calls of 5 of the 20 steps


def test_the_nan_stop_names_the_optimizer_steps(tmp_path, toy_dataset):
  dataset = toy_dataset(0, 2000, 50)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  huge = tfvae.TrainConfig(epochs=2, learning_rate=1e30)
  with pytest.raises(training.NonFiniteLossError,
                     match=r"in optimizer steps (1-5|6-10|11-15|16-20) of epoch 1;"):
    training.train(config, huge, tmp_path, dataset=dataset, verbose=0,
                   runtime=tfvae.Runtime(steps_per_execution=5))


def test_results_and_pictures_are_written(tmp_path):
  rng = np.random.default_rng(1)
  dataset = data.Dataset("npz:toy", rng.random((200, 8, 8, 1)).astype(np.float32),
                         rng.random((20, 8, 8, 1)).astype(np.float32), False)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,),
                                     likelihood="gaussian")
  result = training.train(config, tfvae.TrainConfig(epochs=1, eval_num_samples=10), tmp_path,
                          dataset=dataset, verbose=0)
  assert result.test_metrics["log_likelihood"] > result.test_metrics["elbo"]
  for name in ("results.json", "samples.png", "reconstructions.png", "manifold.png"):
    assert (tmp_path / name).is_file()
