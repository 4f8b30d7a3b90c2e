"""tfvae.training.train: the run's bookkeeping."""

import numpy as np

import tfvae
from tfvae import data, training


def test_every_epoch_is_exactly_one_pass_whatever_steps_per_execution(tmp_path):
  rng = np.random.default_rng(0)
  dataset = data.Dataset("npz:toy", rng.integers(0, 256, (1700, 8, 8, 1), dtype=np.uint8),
                         rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8), False)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  # 17 steps per epoch; a block of 20 (or 5) steps would overrun each epoch.
  for requested in (20, 5):
    result = training.train(config, tfvae.TrainConfig(epochs=3, steps_per_execution=requested),
                            tmp_path / str(requested), dataset=dataset, verbose=0)
    assert int(result.vae.optimizer.iterations) == 3 * 17
    assert len(result.history["loss"]) == 3


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
