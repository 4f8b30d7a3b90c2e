"""tfvae.training.train: the run's bookkeeping."""

import json

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


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 500, 1e-3),
    ("burda", 0, 1e-3), ("burda", 9, 1e-3), ("burda", 10, 1e-3 * 10 ** (-1 / 7)),
    ("burda", 39, 1e-3 * 10 ** (-1 / 7)), ("burda", 40, 1e-3 * 10 ** (-2 / 7)),
    ("burda", 10 * 3279, 1e-4),
    ("cosine", 0, 1e-3), ("cosine", 250, 0.5e-3 * (1 + np.cos(np.pi / 4))), ("cosine", 1000, 0),
    ("exponential", 500, 1e-3 * 0.1), ("exponential", 1000, 1e-5),
])
def test_learning_rate_schedules_follow_their_formulas(schedule, step, expected):
  # 10 steps an epoch, 100 epochs: Burda's stage i covers epochs [(3^i - 1) / 2, (3^(i+1) - 1) / 2).
  config = tfvae.TrainConfig(epochs=100, lr_schedule=schedule)
  rate = training.learning_rate_schedule(config, steps_per_epoch=10)
  value = rate if isinstance(rate, float) else float(rate(step))
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-12)


def test_adam_epsilon_reaches_the_optimizer():
  optimizer = training.make_optimizer(tfvae.TrainConfig(adam_epsilon=1e-4), 10)
  assert optimizer.epsilon == 1e-4


class _StopAfter(keras.callbacks.Callback):
  """Interrupts training at the end of an epoch, after the checkpoint callbacks ran."""

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch + 1 == self.epoch:
      raise KeyboardInterrupt


@pytest.mark.parametrize("schedule, kl_warmup_steps", [("burda", 0), ("cosine", 12)])
def test_a_resumed_run_continues_its_schedule_exactly(schedule, kl_warmup_steps, tmp_path,
                                                      toy_dataset):
  # Interrupted after 8 of 20 steps: the learning rate and the KL warm-up go on from step 8.
  dataset = toy_dataset(0, 220, 20)
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,),
                             likelihood="gaussian", kl_warmup_steps=kl_warmup_steps)
  train_config = tfvae.TrainConfig(epochs=5, batch_size=50, lr_schedule=schedule,
                                   validation_examples=20)
  straight = training.train(config, train_config, tmp_path / "straight", dataset=dataset,
                            verbose=0)
  with pytest.raises(KeyboardInterrupt):
    training.train(config, train_config, tmp_path / "resumed", dataset=dataset, verbose=0,
                   callbacks=[_StopAfter(2)])
  resumed = training.train(config, train_config, tmp_path / "resumed", dataset=dataset,
                           verbose=0)
  assert int(resumed.vae.optimizer.iterations) == int(straight.vae.optimizer.iterations) == 20
  for a, b in zip(straight.vae.weights, resumed.vae.weights, strict=True):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_a_finished_run_continued_resizes_its_cosine_schedule(tmp_path, toy_dataset):
  import dataclasses
  dataset = toy_dataset(0, 220, 20)
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,),
                             likelihood="gaussian")
  short = tfvae.TrainConfig(epochs=2, batch_size=50, lr_schedule="cosine",
                            validation_examples=20)
  training.train(config, short, tmp_path, dataset=dataset, verbose=0)
  longer = dataclasses.replace(short, epochs=4)
  result = training.train(config, longer, tmp_path, dataset=dataset, verbose=0)
  optimizer = result.vae.optimizer
  assert int(optimizer.iterations) == 16  # 4 steps an epoch
  # 1e-3 * (1 + cos(pi * 16 / 16)) / 2 = 0 at the new end, and halfway at step 8.
  np.testing.assert_allclose(float(optimizer.learning_rate), 0.0, atol=1e-9)
  schedule = optimizer._learning_rate
  np.testing.assert_allclose(float(schedule(8)), 0.5e-3, rtol=1e-6)


def test_early_stopping_watches_the_validation_loss(tmp_path, toy_dataset):
  # With a learning rate of 1e-30 nothing is learned: the validation loss only moves with its
  # noise, so it fails to improve within a few epochs (30 improvements in a row: 1 in 30!).
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,),
                             likelihood="gaussian")
  train_config = tfvae.TrainConfig(epochs=30, batch_size=50, learning_rate=1e-30,
                                   early_stopping_patience=1, validation_examples=50)
  result = training.train(config, train_config, tmp_path, dataset=toy_dataset(0, 150, 20),
                          verbose=0)
  losses = result.history["val_loss"]
  assert len(losses) < 30 and losses[-1] >= min(losses[:-1])
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["stopped_early"] and results["epochs_trained"] == len(losses)
  with pytest.raises(tfvae.ConfigError, match="early stopping watches the validation loss"):
    tfvae.TrainConfig(early_stopping_patience=3, validation_examples=0)


def test_init_output_bias_is_the_logit_of_the_mean_pixel(toy_dataset):
  dataset = toy_dataset(0, 100, 10)
  vae = tfvae.VAE(tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,)))
  training.init_output_bias(vae, dataset.train)
  mean = np.clip(dataset.x_train.astype(np.float64).mean(axis=0) / 255, 0.001, 0.999)
  bias = vae.decoder.network.get_layer("likelihood_params").bias.numpy()
  np.testing.assert_allclose(bias, np.log(mean / (1 - mean)).ravel(), rtol=1e-5, atol=1e-6)
  gaussian = tfvae.VAE(tfvae.ModelConfig(image_shape=(8, 8, 1), likelihood="gaussian"))
  with pytest.raises(tfvae.ConfigError, match="for the Bernoulli likelihood"):
    training.init_output_bias(gaussian, dataset.train)
