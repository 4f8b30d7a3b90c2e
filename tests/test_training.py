"""tfvae.training.train: the run's bookkeeping."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfvae
from tfvae import data, export, training


def test_every_epoch_is_exactly_one_pass_whatever_steps_per_execution(tmp_path, toy_dataset):
  dataset = toy_dataset(0, 1700, 50)
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


def test_mixed_precision_computes_in_16_bits_and_keeps_the_objective_float32(tmp_path,
                                                                             toy_dataset):
  dataset = toy_dataset(2, 300, 30)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,))
  result = training.train(config, tfvae.TrainConfig(epochs=2, mixed_precision=True), tmp_path,
                          dataset=dataset, verbose=0)
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
  monkeypatch.setattr(training, "mixed_precision_policy", lambda: "mixed_float16")
  dataset = toy_dataset(3, 320, 32)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,))
  train_config = tfvae.TrainConfig(epochs=3, batch_size=32, eval_num_samples=0)
  half = training.train(config, dataclasses.replace(train_config, mixed_precision=True),
                        tmp_path / "half", dataset=dataset, verbose=0)
  full = training.train(config, train_config, tmp_path / "full", dataset=dataset, verbose=0)

  vae = half.vae
  assert vae.encoder.network.layers[1].compute_dtype == "float16"
  optimizer = vae.optimizer
  assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  assert isinstance(optimizer.inner_optimizer, tfvae.optimizers.FusedAdam)
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
  assert isinstance(reloaded.optimizer.inner_optimizer, tfvae.optimizers.FusedAdam)
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
  monkeypatch.setattr(training, "_CPUINFO", cpuinfo)
  assert training.cpu_lacks_bfloat16() is lacks


def test_mixed_precision_warns_on_a_cpu_without_bfloat16(tmp_path, monkeypatch, caplog):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
  monkeypatch.setattr(training, "_CPUINFO", cpuinfo)
  with training.dtype_policy(False):
    pass
  assert "bfloat16" not in caplog.text  # float32: nothing to warn about
  with training.dtype_policy(True):
    policy = keras.mixed_precision.global_policy().name
  if tf.config.list_logical_devices("GPU"):
    assert policy == "mixed_float16" and "bfloat16" not in caplog.text
  else:
    assert policy == "mixed_bfloat16"
    assert "no bfloat16 instructions" in caplog.text and "(--mixed_precision) off" in caplog.text
  missing = tmp_path / "missing"
  monkeypatch.setattr(training, "_CPUINFO", missing)
  assert not training.cpu_lacks_bfloat16()  # unknown CPU: no warning


def test_threads_and_shards_defaults_for_this_machine(monkeypatch):
  monkeypatch.setattr(data, "available_cores", lambda: 1)
  assert training.default_step_shards() == 1  # one core: nothing to run concurrently
  monkeypatch.setattr(data, "available_cores", lambda: 8)
  no_accelerator = not tf.config.list_physical_devices("GPU")
  assert training.default_step_shards() == (2 if no_accelerator else 1)
  # TensorFlow already ran ops in this test process: an explicit setting says so and how to
  # fix it; the automatic one leaves TensorFlow's threads alone.
  tf.constant(1.0) + 1.0
  with pytest.raises(tfvae.ConfigError, match="intra_op_threads=3 cannot be applied"):
    training.configure_threads(tfvae.TrainConfig(intra_op_threads=3), 2)
  training.configure_threads(tfvae.TrainConfig(), 2)


def test_steps_per_execution_divides_the_epoch():
  assert training.choose_steps_per_execution(469, 100) == 67  # 469 = 7 x 67
  assert training.choose_steps_per_execution(600, 100) == 100
  assert training.choose_steps_per_execution(17, 100) == 17
  assert training.choose_steps_per_execution(600, 100, loops_supported=False) == 1
