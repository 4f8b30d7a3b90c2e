"""Adam and AdamW whose per-variable update is one fused TensorFlow kernel.

Keras 3's Adam updates each variable with about a dozen element-wise ops (two moment updates,
the square root, the division, three assignments), each a separate pass over the variable's
memory. On the CPU these passes took 39% of all op time of a training step of the 784-400-20
VAE (TensorFlow profiler; docs/BENCHMARKS.md). `ResourceApplyAdam` does the same update in one
pass:

  m <- m + (1 - beta_1) (g - m)
  v <- v + (1 - beta_2) (g^2 - v)
  var <- var - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)

which is exactly Keras's Adam (epsilon outside the bias correction). Sparse gradients, amsgrad
and dtypes the kernel does not take fall back to Keras's own update, so these are drop-in
replacements: same arguments, same slot variables, same checkpoints.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_FUSED_DTYPES = (tf.float32, tf.float64)


class _FusedAdamUpdate:
  """Mixin for keras.optimizers.Adam and its subclasses: update_step through ResourceApplyAdam."""

  def update_step(self, gradient, variable, learning_rate):
    dtype = tf.as_dtype(variable.dtype)
    if (isinstance(gradient, tf.IndexedSlices) or self.amsgrad or dtype not in _FUSED_DTYPES
        or keras.backend.backend() != "tensorflow"):
      return super().update_step(gradient, variable, learning_rate)
    index = self._get_variable_index(variable)
    step = tf.cast(self.iterations + 1, dtype)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    # Under tf.distribute, `variable` is this device's component and the slot variables'
    # handles resolve to this device's copies inside the strategy's update call.
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._momentums[index].value.handle,
        v=self._velocities[index].value.handle,
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
        lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
        epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))
    return None


@keras.saving.register_keras_serializable(package="tfvae")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
  """keras.optimizers.Adam with a fused update; takes the same arguments."""


@keras.saving.register_keras_serializable(package="tfvae")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
  """keras.optimizers.AdamW with a fused Adam update (the decoupled decay is Keras's own)."""
