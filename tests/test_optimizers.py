"""The fused Adam and AdamW against a numpy Adam and against Keras's own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae.optimizers import FusedAdam, FusedAdamW


def numpy_adam(w, gradients, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0):
  """Kingma & Ba's Adam as Keras states it (epsilon outside the bias correction)."""
  w = w.astype(np.float64)
  m, v = np.zeros_like(w), np.zeros_like(w)
  for t, g in enumerate(gradients, start=1):
    w = w - lr * weight_decay * w  # decoupled decay first, as Keras's AdamW
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g * g
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    w = w - alpha * m / (np.sqrt(v) + epsilon)
  return w


def run(optimizer, w0, gradients):
  variable = keras.Variable(w0)

  @tf.function
  def step(gradient):
    optimizer.apply([gradient], [variable])

  for gradient in gradients:
    step(tf.constant(gradient))
  return variable.numpy()


@pytest.mark.parametrize("make, keras_class, decay", [
    (lambda: FusedAdam(0.01), keras.optimizers.Adam, 0.0),
    (lambda: FusedAdamW(0.01, weight_decay=0.1), keras.optimizers.AdamW, 0.1),
])
def test_fused_update_is_adam(make, keras_class, decay):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(6, 5)).astype(np.float32)
  gradients = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(8)]
  fused = run(make(), w0, gradients)
  np.testing.assert_allclose(fused, numpy_adam(w0, gradients, 0.01, weight_decay=decay),
                             rtol=1e-5, atol=1e-6)
  kwargs = {"weight_decay": decay} if decay else {}
  np.testing.assert_allclose(fused, run(keras_class(0.01, **kwargs), w0, gradients),
                             rtol=1e-6, atol=1e-6)


def test_amsgrad_falls_back_to_keras():
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(4,)).astype(np.float32)
  gradients = [rng.normal(size=(4,)).astype(np.float32) for _ in range(5)]
  np.testing.assert_allclose(run(FusedAdam(0.01, amsgrad=True), w0, gradients),
                             run(keras.optimizers.Adam(0.01, amsgrad=True), w0, gradients),
                             rtol=1e-6)


def test_a_checkpoint_with_the_fused_optimizer_resumes(tmp_path, binary_batch):
  vae = tfvae.VAE(tfvae.ModelConfig(latent_size=2, hidden_sizes=(8,)))
  vae.compile(optimizer=FusedAdam(1e-3))
  vae.fit(binary_batch, epochs=1, batch_size=4, verbose=0)
  vae.save(tmp_path / "vae.keras")
  loaded = keras.saving.load_model(tmp_path / "vae.keras")
  assert isinstance(loaded.optimizer, FusedAdam)
  assert int(loaded.optimizer.iterations) == int(vae.optimizer.iterations) == 2
  for a, b in zip(loaded.optimizer.variables, vae.optimizer.variables, strict=True):
    np.testing.assert_array_equal(a, b)
