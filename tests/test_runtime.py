"""tfvae.runtime: what it changes about training (nothing but the speed) and its defaults."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import data, export, runtime, training
from tfvae.model import METRIC_NAMES


def _fit(x, config, rt, epochs=2, batch_size=50, decoder_network=None, validation=None):
  """Trains a fresh VAE (seed 0) on x under rt as train() does; returns (vae, history).

  decoder_network, if given, makes the user's decoder network (after the seed is set).
  """
  keras.utils.set_random_seed(0)
  steps = data.steps_per_epoch(len(x), batch_size)
  batches, steps_per_call = rt.training_stream(x, batch_size, seed=1, dynamic_binarization=True,
                                               strategy=tf.distribute.get_strategy())
  vae = tfvae.VAE(config, decoder_network=decoder_network and decoder_network())
  vae.compile(optimizer=keras.optimizers.Adam(2e-3))
  with rt.attach(vae, steps_per_call):
    history = vae.fit(batches, epochs=epochs, steps_per_epoch=steps, shuffle=False, verbose=0,
                      validation_data=validation)
  return vae, history.history


def _assert_same_training(a, b, history_a, history_b, rtol=1e-6, atol=1e-7):
  assert int(a.optimizer.iterations) == int(b.optimizer.iterations)
  for wa, wb in zip(a.weights, b.weights, strict=True):
    np.testing.assert_allclose(wb.numpy(), wa.numpy(), rtol=rtol, atol=atol, err_msg=wa.path)
  for name in history_a:
    np.testing.assert_allclose(history_b[name], history_a[name], rtol=rtol, err_msg=name)


@pytest.mark.parametrize("steps_per_execution, kl_warmup_steps", [(4, 0), (5, 10)])
def test_blocks_of_steps_train_exactly_like_one_step_per_call(mnist_slice, steps_per_execution,
                                                              kl_warmup_steps):
  # 12 steps an epoch: blocks of 4, 4, 4, or of 5, 5 and a last block of 2 (no divisor needed);
  # a KL warm-up inside a block weighs each of its steps by that step's own weight.
  x_train, x_test = mnist_slice
  config = tfvae.ModelConfig(latent_size=4, hidden_sizes=(32,), kl_warmup_steps=kl_warmup_steps)
  test = data.eval_pipeline(data.eval_arrays(x_test, bernoulli=True, binary=False), 30)
  plain, plain_history = _fit(x_train[:600], config, tfvae.Runtime.plain(), validation=test)
  fast, fast_history = _fit(x_train[:600], config, tfvae.Runtime(
      step_shards=1, steps_per_execution=steps_per_execution, fused_adam=False),
      validation=test)
  assert int(fast.optimizer.iterations) == 2 * 12
  _assert_same_training(plain, fast, plain_history, fast_history)
  assert plain_history["loss"][1] < plain_history["loss"][0]  # it did train


def test_batch_shards_give_the_whole_batch_gradient(mnist_slice):
  # A decoder that ignores z (its input scaled by 0) makes the loss free of noise, so the
  # shards, which draw their own noise, must train as whole batches (to summation order).
  config = tfvae.ModelConfig(latent_size=3, hidden_sizes=(16,))

  def decoder():
    return keras.Sequential([keras.Input((3,)), keras.layers.Rescaling(0.0),
                             keras.layers.Dense(784), keras.layers.Reshape((28, 28, 1))])

  x = mnist_slice[0][:300]
  plain, plain_history = _fit(x, config, tfvae.Runtime.plain(), decoder_network=decoder)
  for shards in (2, 3):
    sharded, sharded_history = _fit(x, config, tfvae.Runtime(
        step_shards=shards, steps_per_execution=3, fused_adam=False), decoder_network=decoder)
    _assert_same_training(plain, sharded, plain_history, sharded_history, rtol=1e-4,
                          atol=1e-6)


def test_sharded_evaluation_keeps_each_example_in_its_place(binary_batch, small_config):
  # All weight on one example: the weighted KL (free of noise) is that example's only if the
  # shards' terms come back in the batch's order.
  vae = tfvae.VAE(small_config)
  vae.compile(optimizer="adam")
  weights = np.zeros(8, np.float32)
  weights[5] = 1.0
  weighted = tf.data.Dataset.from_tensor_slices(
      (binary_batch, np.zeros(8, np.float32), weights)).batch(8)
  alone = vae.evaluate(binary_batch[5:6], verbose=0, return_dict=True)["kl"]
  with tfvae.Runtime(step_shards=3).attach(vae):
    sharded = vae.evaluate(weighted, verbose=0, return_dict=True)["kl"]
  np.testing.assert_allclose(sharded, alone, rtol=1e-5)


def test_attach_leaves_a_plain_model(mnist_slice, tmp_path):
  config = tfvae.ModelConfig(latent_size=4, hidden_sizes=(32,))
  vae, _ = _fit(mnist_slice[0][:200], config, tfvae.Runtime(step_shards=2, steps_per_execution=2))
  assert "update_step" not in vae.optimizer.__dict__ and vae.steps_per_execution == 1
  assert "per_example_terms" not in vae.__dict__
  vae.save(tmp_path / "vae.keras")
  saved = (tmp_path / "vae.keras").read_bytes()
  for knob in (b"shard", b"steps_per_execution\": 2", b"intra_op", b"block", b"fused"):
    assert knob not in saved


def test_steps_per_call_is_capped_by_a_steps_work(monkeypatch):
  monkeypatch.setattr(runtime, "_has_accelerator", lambda: False)  # a CPU's budget
  flops_per_call = tfvae.runtime.FLOPS_PER_CALL
  assert tfvae.Runtime().steps_per_call(469, step_flops=flops_per_call / 3.5) == 3
  assert tfvae.Runtime().steps_per_call(469, step_flops=10 * flops_per_call) == 1
  assert tfvae.Runtime().steps_per_call(469, step_flops=flops_per_call / 1000) == 100
  # The paper's MLP at batch 100 keeps 100 steps a call; the CIFAR conv net gets 1.
  def steps(config, batch_size):
    flops = tfvae.networks.training_flops(config, tfvae.networks.build_encoder_network(config),
                                          tfvae.networks.build_decoder_network(config),
                                          batch_size)
    return tfvae.Runtime().steps_per_call(500, step_flops=flops)
  assert steps(tfvae.ModelConfig(), 100) == 100
  assert steps(tfvae.ModelConfig(image_shape=(32, 32, 3), architecture="conv",
                                 likelihood="discretized_logistic"), 100) == 1


def test_multiply_adds_count_dense_and_convolution_layers():
  network = keras.Sequential([keras.Input((8, 6, 3)),
                              keras.layers.Conv2D(4, 3, padding="same"),  # 8*6 * 3*3*3*4
                              keras.layers.Conv2D(5, 3, strides=2, padding="same"),  # 4*3 * 9*4*5
                              keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same"),
                              keras.layers.Flatten(), keras.layers.Dense(7)])
  expected = 48 * 108 + 12 * 180 + 12 * 9 * 5 * 2 + (8 * 6 * 2) * 7
  assert tfvae.networks.multiply_adds(network) == expected
  nested = keras.Sequential([keras.Input((8, 6, 3)), network, keras.layers.Dense(3)])
  assert tfvae.networks.multiply_adds(nested) == expected + 7 * 3


def test_multiply_adds_of_tfvae_conv_networks_at_an_odd_size():
  config = tfvae.ModelConfig(image_shape=(5, 3, 1), latent_size=3, architecture="conv",
                             conv_channels=(2, 4))
  # stem 1->2 on 5x3, block (two 3x3 2->2) on 5x3, stride-2 2->4 to 3x2, block 4->4 on 3x2,
  # Dense 24 -> 6.
  encoder = 15 * 9 * 2 + 2 * 15 * 9 * 4 + 6 * 9 * 8 + 2 * 6 * 9 * 16 + 24 * 6
  # Dense 3 -> 3x2x4, block on 3x2, transposed 4->2 over its 3x2 input, block on 6x4, crop to
  # 5x3, 3x3 2->1 to the Bernoulli logits.
  decoder = 3 * 24 + 2 * 6 * 9 * 16 + 6 * 9 * 8 + 2 * 24 * 9 * 4 + 15 * 9 * 2
  assert tfvae.networks.multiply_adds(tfvae.networks.build_encoder_network(config)) == encoder
  decoder_network = tfvae.networks.build_decoder_network(config)
  assert tfvae.networks.multiply_adds(decoder_network) == decoder
  # On the 3x2 grid four groups of one channel would hold 6 values each: fewer, larger groups.
  assert decoder_network.get_layer("decoder_block_0_norm").groups == 1


def test_steps_per_call(caplog):
  assert tfvae.Runtime().steps_per_call(469) == 100  # the epoch's last block holds 69
  assert tfvae.Runtime().steps_per_call(17) == 17
  # Under mirrored and multi_worker a call must end with the epoch: a divisor, 469 = 7 x 67.
  assert tfvae.Runtime(strategy="mirrored").steps_per_call(469) == 67
  assert tfvae.Runtime(strategy="multi_worker").steps_per_call(600) == 100
  assert "no divisor" not in caplog.text
  assert tfvae.Runtime(strategy="mirrored").steps_per_call(8571) == 3  # 3 x 2857, a prime
  assert ("Under strategy=mirrored an epoch of 8571 steps has no divisor between 50 and 100, so"
          " each graph call runs 3 steps") in caplog.text
  assert tfvae.Runtime(strategy="tpu").steps_per_call(600) == 1  # Keras's own, one a call


def test_threads_and_shards_defaults_for_this_machine(monkeypatch):
  no_accelerator = not tf.config.list_physical_devices("GPU")
  monkeypatch.setattr(runtime, "available_cores", lambda: 1)
  assert tfvae.Runtime().shards == 1  # one core: nothing to run concurrently
  monkeypatch.setattr(runtime, "available_cores", lambda: 8)
  assert tfvae.Runtime().shards == (2 if no_accelerator else 1)
  assert tfvae.Runtime(step_shards=3).shards == 3 and tfvae.Runtime.plain().shards == 1
  # TensorFlow already runs in this process: an explicit setting fails with the fix, the
  # automatic one is skipped.
  with pytest.raises(tfvae.ConfigError, match="intra_op_threads=3 cannot be applied"):
    tfvae.Runtime(intra_op_threads=3).configure_threads()
  tfvae.Runtime().configure_threads()


@pytest.mark.parametrize("field, value", [("strategy", "horovod"), ("step_shards", -1),
                                          ("intra_op_threads", -2), ("steps_per_execution", 0)])
def test_bad_runtime_values_fail_with_one_line(field, value):
  with pytest.raises(tfvae.ConfigError, match=f"{field}={value!r}"):
    tfvae.Runtime(**{field: value})


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.Adam(2e-3),
    lambda: keras.optimizers.AdamW(2e-3, weight_decay=0.1),
    lambda: keras.optimizers.Adam(2e-3, amsgrad=True),  # not fused: Keras's own update
])
def test_the_fused_adam_update_is_keras_adam(mnist_slice, make):
  x = data.eval_arrays(mnist_slice[0][:400], bernoulli=True, binary=False)
  config = tfvae.ModelConfig(latent_size=3, hidden_sizes=(16,))
  runs = []
  for fused in (False, True):
    keras.utils.set_random_seed(0)
    vae = tfvae.VAE(config)
    vae.compile(optimizer=make())
    with tfvae.Runtime(step_shards=1, steps_per_execution=1, fused_adam=fused).attach(vae):
      history = vae.fit(x, batch_size=50, epochs=2, verbose=0, shuffle=False).history
    assert "update_step" not in vae.optimizer.__dict__  # Keras's own again
    runs.append((vae, history))
  (keras_adam, keras_history), (fused_adam, fused_history) = runs
  # A different kernel rounds differently: weights agree to about 1e-6 after 16 steps of 2e-3.
  _assert_same_training(keras_adam, fused_adam, keras_history, fused_history, rtol=1e-4,
                        atol=3e-6)


@pytest.mark.parametrize("shape, groups, dtype", [((4, 5, 3, 16), 8, "float32"),
                                                  ((6, 10), 2, "float32"),
                                                  ((3, 4, 4, 8), 4, "bfloat16")])
def test_the_fused_group_norm_is_keras_group_norm(shape, groups, dtype):
  rng = np.random.default_rng(0)
  layer = keras.layers.GroupNormalization(groups, dtype=keras.DTypePolicy(
      "float32" if dtype == "float32" else "mixed_bfloat16"))
  layer.build(shape)
  layer.gamma.assign(rng.normal(size=shape[-1]))
  layer.beta.assign(rng.normal(size=shape[-1]))
  x = tf.constant(rng.normal(size=shape) * 3 + 1, dtype)
  weights = tf.constant(rng.normal(size=shape), tf.float32)
  results = []
  for norm in (layer, functools.partial(runtime._fused_group_norm, layer)):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = norm(x)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
    results.append([y, *tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])])
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for keras_value, fused_value in zip(*results, strict=True):
    assert fused_value.dtype == keras_value.dtype
    np.testing.assert_allclose(tf.cast(fused_value, tf.float32), tf.cast(keras_value, tf.float32),
                               rtol=tolerance, atol=tolerance)


def test_the_fused_group_norm_trains_a_conv_net_like_keras_and_exports_without_xla(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (96, 6, 5, 3), dtype=np.uint8)
  config = tfvae.ModelConfig(image_shape=(6, 5, 3), latent_size=3, architecture="conv",
                             conv_channels=(8, 16), likelihood="discretized_logistic")
  keras_norm, keras_history = _fit(x, config, tfvae.Runtime(fused_group_norm=False),
                                   batch_size=16)
  fused, fused_history = _fit(x, config, tfvae.Runtime(), batch_size=16)
  norms = runtime._group_norms(fused)
  assert len(norms) == 4 and not any("call" in norm.__dict__ for norm in norms)  # Keras's again
  with tfvae.Runtime().attach(fused):
    assert all(norm.call.func is runtime._fused_group_norm for norm in norms)
  _assert_same_training(keras_norm, fused, keras_history, fused_history, rtol=1e-4, atol=1e-5)
  exported = export.export(fused, tmp_path, "conv")
  assert b"XlaMustCompile" not in (exported / "saved_model.pb").read_bytes()


def test_fit_on_its_own_takes_keras_steps_per_execution(binary_batch, small_config):
  # No runtime: Keras's own multi-step function, the same updates as one step per call.
  runs = []
  for steps in (1, 3):
    keras.utils.set_random_seed(0)
    vae = tfvae.VAE(small_config)
    vae.compile(optimizer="adam", steps_per_execution=steps)
    history = vae.fit(np.concatenate([binary_batch] * 4), batch_size=4, epochs=2, verbose=0,
                      shuffle=False)
    runs.append((vae, history.history))
  (one, one_history), (three, three_history) = runs
  _assert_same_training(one, three, one_history, three_history)
  assert set(METRIC_NAMES) <= set(one_history)


def test_mixed_precision_computes_in_16_bits_and_keeps_the_objective_float32(tmp_path,
                                                                             toy_dataset):
  dataset = toy_dataset(2, 300, 30)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,))
  result = training.train(config, tfvae.TrainConfig(epochs=2), tmp_path, dataset=dataset,
                          verbose=0, runtime=tfvae.Runtime(mixed_precision=True))
  # float16 with a GPU (the GPU branch has its own test below, which runs on any machine).
  half = "float16" if tf.config.list_logical_devices("GPU") else "bfloat16"
  dense = result.vae.encoder.network.layers[1]
  assert dense.dtype_policy.name == f"mixed_{half}"
  assert dense.compute_dtype == half and dense.variable_dtype == "float32"
  terms = result.vae.per_example_terms(data.eval_arrays(dataset.x_test, True, False),
                                       np.array([1, 2], np.int32))
  assert all(t.dtype == "float32" and np.all(np.isfinite(t)) for t in terms.values())
  assert result.history["loss"][-1] < result.history["loss"][0]
  assert keras.mixed_precision.global_policy().name == "float32"  # restored


def test_mixed_float16_as_on_a_gpu_scales_the_loss_through_the_optimizer(tmp_path, monkeypatch,
                                                                        toy_dataset):
  # The GPU branch of --mixed_precision, run on the CPU (TensorFlow has float16 CPU kernels).
  monkeypatch.setattr(runtime, "mixed_precision_policy", lambda: "mixed_float16")
  dataset = toy_dataset(3, 320, 32)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,))
  train_config = tfvae.TrainConfig(epochs=3, batch_size=32, eval_num_samples=0,
                                   validation_examples=0)
  half = training.train(config, train_config, tmp_path / "half", dataset=dataset, verbose=0,
                        runtime=tfvae.Runtime(mixed_precision=True))
  full = training.train(config, train_config, tmp_path / "full", dataset=dataset, verbose=0,
                        runtime=tfvae.Runtime())

  vae = half.vae
  assert vae.encoder.network.layers[1].compute_dtype == "float16"
  optimizer = vae.optimizer
  assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  assert isinstance(optimizer.inner_optimizer, keras.optimizers.Adam)
  assert int(optimizer.iterations) == 3 * 10  # no step was skipped for overflow
  # The same data, seed and noise in float32 train to nearly the same loss.
  np.testing.assert_allclose(half.history["loss"], full.history["loss"], rtol=1e-4)
  terms = vae.per_example_terms(data.eval_arrays(dataset.x_test, True, False),
                                np.array([1, 2], np.int32))
  assert all(t.dtype == "float32" and np.all(np.isfinite(t)) for t in terms.values())

  # The step multiplies the loss by the dynamic scale before the float16 backward pass: at
  # 2**60 the float16 gradients overflow, so the optimizer skips the update and halves the
  # scale. (Without the scaling the gradients would be finite and the weights would move.)
  weights = [w.numpy() for w in vae.trainable_variables]
  optimizer.dynamic_scale.assign(2.0**60)
  vae.train_on_batch(dataset.x_train[:32])
  assert float(optimizer.dynamic_scale) == 2.0**59
  assert int(optimizer.iterations) == 3 * 10
  for before, after in zip(weights, vae.trainable_variables, strict=True):
    np.testing.assert_array_equal(before, after.numpy())
  optimizer.dynamic_scale.assign(2.0**10)  # a finite step at a sane scale moves them
  vae.train_on_batch(dataset.x_train[:32])
  assert int(optimizer.iterations) == 3 * 10 + 1
  assert not np.array_equal(weights[0], vae.trainable_variables[0].numpy())

  # The checkpoint reloads with its loss-scaled optimizer, and the export serves float32.
  reloaded = keras.models.load_model(half.workdir / "last.keras")
  assert isinstance(reloaded.optimizer.inner_optimizer, keras.optimizers.Adam)
  path = export.export(vae, tmp_path / "export", "toy")
  outputs = tf.saved_model.load(str(path)).signatures["serving_default"](
      x=data.to_unit_float(data.eval_arrays(dataset.x_test[:4], True, False)))
  assert outputs["elbo"].dtype == tf.float32 and np.all(np.isfinite(outputs["elbo"]))


@pytest.mark.parametrize("flags_line, lacks", [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni", True),  # Ice Lake: no bfloat16
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", False),  # Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm", False),  # Arm Neoverse V1
    ("processor\t: 0", False),  # no flags listed: nothing known, no warning
])
def test_cpu_lacks_bfloat16_reads_the_cpu_flags(tmp_path, monkeypatch, flags_line, lacks):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\n{flags_line}\n\nprocessor\t: 1\n{flags_line}\n")
  monkeypatch.setattr(runtime, "_CPUINFO", cpuinfo)
  assert runtime.cpu_lacks_bfloat16() is lacks


def test_mixed_precision_warns_on_a_cpu_without_bfloat16(tmp_path, monkeypatch, caplog):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
  monkeypatch.setattr(runtime, "_CPUINFO", cpuinfo)
  with runtime.dtype_policy(False):
    pass
  assert "bfloat16" not in caplog.text  # float32: nothing to warn about
  with runtime.dtype_policy(True):
    policy = keras.mixed_precision.global_policy().name
  if tf.config.list_logical_devices("GPU"):
    assert policy == "mixed_float16" and "bfloat16" not in caplog.text
  else:
    assert policy == "mixed_bfloat16"
    assert "no bfloat16 instructions" in caplog.text and "(--mixed_precision) off" in caplog.text
  missing = tmp_path / "missing"
  monkeypatch.setattr(runtime, "_CPUINFO", missing)
  assert not runtime.cpu_lacks_bfloat16()  # unknown CPU: no warning
