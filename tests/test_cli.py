"""bin/train, bin/evaluate and bin/sample end to end on a slice of real MNIST."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args, data_dir=None, cwd=None, timeout=600, env=None):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
  if data_dir:
    env["TFVAE_DATA_DIR"] = str(data_dir)
  return subprocess.run([sys.executable, str(ROOT / "bin" / script), *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  # An explicit --intra_op_threads fails the run if bin/train let TensorFlow start before
  # train() could set its threads.
  result = _run("train", "--likelihood=bernoulli", "--max_examples=600", "--epochs=2",
                "--hidden_sizes=64", "--latent_size=2", "--eval_num_samples=20",
                "--intra_op_threads=1",
                f"--workdir={root / 'work'}", f"--export_dir={root / 'models'}",
                "--model_name=digits", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-4000:]
  return root, result


def test_train_writes_checkpoints_metrics_pictures_and_the_export(trained_run):
  root, result = trained_run
  work = root / "work"
  for name in ("last.keras", "best.keras", "metrics.csv", "results.json", "samples.png",
               "reconstructions.png", "manifold.png"):
    assert (work / name).is_file(), name
  assert any((work / "logs").rglob("events.out.tfevents.*"))
  assert not (work / "backup").exists()  # removed after a finished run
  with open(work / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and {"loss", "elbo", "val_elbo", "kl", "nll"} <= set(rows[0])
  results = json.loads((work / "results.json").read_text())["test"]
  assert results["log_likelihood"] > results["elbo"]
  assert "test ELBO: " in result.stdout and f"{results['elbo']:.2f}" in result.stdout
  assert (root / "models" / "digits" / "1" / "saved_model.pb").is_file()
  assert "Epoch 2/2" in result.stdout  # Keras progress is shown


def test_export_writes_the_next_version_with_the_same_warmup_requests(trained_run, data_dir):
  import tensorflow as tf
  from tensorflow_serving.apis import prediction_log_pb2
  root, _ = trained_run
  result = _run("export", f"--checkpoint={root / 'work' / 'last.keras'}",
                f"--export_dir={root / 'models'}", "--model_name=digits", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (root / "models" / "digits" / "2" / "saved_model.pb").is_file()
  # bin/export and bin/train send the same binarized test images as warm-up requests.
  images = []
  for version in ("1", "2"):
    path = root / "models" / "digits" / version / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))]
    images.append([tf.make_ndarray(log.predict_log.request.inputs["x"]) for log in logs
                   if log.predict_log.request.model_spec.signature_name == "serving_default"])
  assert [x.shape for x in images[0]] == [(1, 28, 28, 1), (8, 28, 28, 1)]
  assert set(np.unique(images[0][1])) == {0.0, 1.0}  # binarized, scaled to [0, 1]
  for x, y in zip(*images, strict=True):
    np.testing.assert_array_equal(x, y)


def test_evaluate_a_saved_model_and_a_keras_file_agree(trained_run, data_dir):
  root, _ = trained_run
  outputs = {}
  for model in (root / "models" / "digits" / "1", root / "work" / "last.keras"):
    out = root / f"{model.name}.json"
    result = _run("evaluate", f"--model={model}", "--num_samples=50", "--max_examples=300",
                  f"--output={out}", data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[model.suffix] = json.loads(out.read_text())
  for results in outputs.values():
    assert results["log_likelihood"] > results["elbo"]
    assert results["num_examples"] == 300 and results["split"] == "test"
  # The same model under different random draws (exact equality is tested in test_export):
  # a barely trained model has heavy-tailed importance weights, so allow 1%.
  saved, keras_file = outputs[""]["log_likelihood"], outputs[".keras"]["log_likelihood"]
  assert abs(saved - keras_file) < 0.01 * abs(keras_file)


def test_sample_writes_a_png(trained_run, tmp_path):
  root, _ = trained_run
  for extra in ([], ["--manifold"]):
    out = tmp_path / f"s{len(extra)}.png"
    result = _run("sample", f"--model={root / 'work' / 'last.keras'}", f"--output={out}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_checkpoints(good: pathlib.Path, folder: pathlib.Path) -> dict[str, pathlib.Path]:
  import keras
  truncated = folder / "truncated.keras"  # a copy cut short, as a full disk leaves one
  truncated.write_bytes(good.read_bytes()[:2000])
  other = folder / "other.keras"
  keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(other)
  return {"truncated": truncated, "other": other, "csv": good.parent / "metrics.csv"}


def test_load_vae_names_what_is_wrong_with_the_file_and_the_fix(trained_run, tmp_path):
  from tfvae import cli, config
  good = trained_run[0] / "work" / "last.keras"
  assert cli.load_vae(good, "model").model_config.latent_size == 2
  bad = _bad_checkpoints(good, tmp_path)
  for name, phrase in (("truncated", "is not a .keras zip archive (truncated or corrupt?)"),
                       ("other", "holds a Sequential, not a tfvae.VAE"),
                       ("csv", "metrics.csv: not a .keras file")):
    with pytest.raises(config.ConfigError) as error:
      cli.load_vae(bad[name], "model")
    assert phrase in str(error.value) and "pass --model=<workdir>/last.keras" in str(error.value)


@pytest.mark.parametrize("script, flag", [("evaluate", "model"), ("sample", "model"),
                                          ("export", "checkpoint")])
def test_scripts_reject_a_bad_checkpoint_with_one_line(script, flag, trained_run, tmp_path,
                                                      data_dir):
  bad = _bad_checkpoints(trained_run[0] / "work" / "last.keras", tmp_path)
  extra = {"evaluate": "--max_examples=10", "sample": f"--output={tmp_path}/out.png",
           "export": f"--export_dir={tmp_path}/models"}[script]
  for name in ("truncated", "other"):
    result = _run(script, f"--{flag}={bad[name]}", extra, data_dir=data_dir, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{script}: error: {bad[name]}" in result.stderr and f"pass --{flag}=" in result.stderr
  assert not (tmp_path / "models").exists() and not (tmp_path / "out.png").exists()


def test_flagfile(data_dir, tmp_path):
  flagfile = tmp_path / "quick.flags"
  flagfile.write_text("--max_examples=200\n--epochs=1\n--hidden_sizes=16\n--latent_size=0\n")
  result = _run("train", f"--flagfile={flagfile}", f"--workdir={tmp_path}/w",
                f"--export_dir={tmp_path}/m", data_dir=data_dir)
  assert result.returncode != 0 and "latent_size=0" in result.stderr


@pytest.mark.parametrize("args, phrase", [
    (["--likelihood=poisson"], "--likelihood"),
    (["--latent_size=0"], "latent_size=0 must be at least 1"),
    (["--likelihood=gaussian_fixed"], "needs a positive --observation_scale"),
    (["--objective=iwae", "--num_samples=1"], "K >= 2"),
    (["--dataset=cifar10"], "unknown dataset 'cifar10'; use one of mnist"),
    (["--hidden_sizes=500,abc"], "must be integers"),
    (["--dataset=npz:/nonexistent/file.npz"], "/nonexistent/file.npz"),
    (["stray"], "unexpected arguments"),
    (["--strategy=tpu"], "strategy=tpu found no TPU"),
    # TF_CONFIG that is not JSON, without a task, with a task outside the cluster:
    (["--strategy=multi_worker", "TF_CONFIG=not json"], "Expecting value"),
    (["--strategy=multi_worker", 'TF_CONFIG={"cluster": {"worker": ["127.0.0.1:1"]}}'],
     "you must also specify `task_type`"),
    (["--strategy=multi_worker", 'TF_CONFIG={"cluster": {"worker": ["127.0.0.1:1"]},'
      ' "task": {"type": "worker", "index": 3}}'], "task_id` 3 exceeds"),
])
def test_bad_flags_fail_at_start_with_one_clear_line(args, phrase, tmp_path, data_dir):
  env = dict(arg.split("=", 1) for arg in args if arg.startswith("TF_CONFIG="))
  flags = [arg for arg in args if not arg.startswith("TF_CONFIG=")]
  result = _run("train", *flags, f"--workdir={tmp_path}/w", f"--export_dir={tmp_path}/m",
                data_dir=data_dir, timeout=120, env=env)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if "rror" in line]
  assert any(phrase in line for line in errors), result.stderr[-2000:]
  if env:  # and the message says what TF_CONFIG should hold
    assert any("Set TF_CONFIG on each machine" in line for line in errors), errors
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()  # failed before any work


def test_bad_data_dir_names_the_file(tmp_path):
  bad = tmp_path / "data" / "mnist"
  bad.mkdir(parents=True)
  (bad / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b corrupt")
  result = _run("train", f"--data_dir={tmp_path / 'data'}", f"--workdir={tmp_path}/w",
                f"--export_dir={tmp_path}/m", timeout=120)
  assert result.returncode != 0
  assert "train-images-idx3-ubyte.gz: sha256" in result.stderr


def test_reproduce_writes_the_curves_and_pictures(data_dir, tmp_path):
  out = tmp_path / "out"
  result = _run("reproduce", f"--output_dir={out}", f"--workdir={tmp_path / 'runs'}",
                "--mnist_latent_sizes=2", "--frey_latent_sizes=2", "--mnist_epochs=1",
                "--frey_epochs=10", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "curves.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["dataset"], r["samples_seen"]) for r in rows] == [("mnist", "60000"),
                                                                ("frey_face", "17690")]
  assert all(float(r["train_elbo"]) != 0 for r in rows)
  for name in ("mnist_bound.png", "frey_face_bound.png", "mnist_manifold.png",
               "frey_face_manifold.png", "mnist_samples_z2.png"):
    assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def _copy_cifar(data_dir, target, per_class_train, per_class_test):
  """A few real CIFAR-10 JPEGs, in the shared copy's layout (train/ and test/, class folders)."""
  source = pathlib.Path(data_dir) / "cifar10-jpeg"
  if not source.is_dir():
    pytest.skip(f"{source} is not here")
  for split, count in (("train", per_class_train), ("test", per_class_test)):
    for folder in sorted((source / split).iterdir()):
      (target / split / folder.name).mkdir(parents=True)
      for path in sorted(folder.iterdir())[:count]:
        shutil.copy(path, target / split / folder.name / path.name)


@pytest.mark.slow
def test_train_a_colour_folder_with_the_conv_net_at_an_odd_size(data_dir, tmp_path):
  _copy_cifar(data_dir, tmp_path / "cifar small", 40, 6)
  # Three stages stride by 4, which 30 is not a multiple of; z is an 8x8 map.
  result = _run("train", f"--dataset=folder:{tmp_path / 'cifar small'}", "--image_size=30x30",
                "--architecture=conv", "--conv_channels=8,16,16",
                "--likelihood=discretized_logistic", "--mixture_components=2",
                "--coupled_channels", "--spatial_latent", "--latent_size=64", "--epochs=2",
                "--batch_size=50", f"--export_dir={tmp_path / 'models'}", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  names = [p.name for p in (tmp_path / "models").iterdir()]
  assert len(names) == 1 and names[0].startswith("cifar_small_") and names[0].endswith("_vae")
  assert (tmp_path / "runs" / names[0] / "reconstructions.png").is_file()
  import tensorflow as tf
  from PIL import Image
  served = tf.saved_model.load(str(tmp_path / "models" / names[0] / "1")).signatures
  x = tf.random.stateless_uniform([2, 30, 30, 3], seed=[0, 1])
  assert served["reconstruct"](x=x)["reconstruction"].shape == (2, 30, 30, 3)
  # The export's log_likelihood of test JPEGs decoded here: nats of the 8-bit values.
  paths = sorted((tmp_path / "cifar small" / "test").glob("*/*.jpg"))[:8]
  pixels = np.stack([np.asarray(Image.open(path).convert("RGB").resize((30, 30),
                                                                       Image.BILINEAR))
                     for path in paths]) / 255.0
  log_p = served["log_likelihood"](x=tf.constant(pixels, tf.float32),
                                   num_samples=tf.constant(5), seed=tf.constant(0, tf.int64))
  bits_per_dim = -log_p["log_likelihood"].numpy() / (30 * 30 * 3 * np.log(2))
  # Probabilities of discrete values: positive bits; 2 epochs of 400 images are near 8.
  assert np.all((bits_per_dim > 0) & (bits_per_dim < 12)), bits_per_dim
  scored = _run("evaluate", f"--model={tmp_path / 'models' / names[0] / '1'}",
                f"--dataset=folder:{tmp_path / 'cifar small'}", "--image_size=30x30",
                "--num_samples=5")
  assert scored.returncode == 0, scored.stderr[-3000:]
  report = json.loads(scored.stdout)
  assert report["num_examples"] == 60 and report["bits_per_dim_of"].endswith("discrete")
  assert 0 < report["bits_per_dim"] < 12


def test_train_vectors_from_an_npz_and_serve_raw_rows(tmp_path):
  rng = np.random.default_rng(0)
  rows = (500.0 + 20.0 * rng.normal(size=(400, 5))).astype(np.float32)
  np.savez(tmp_path / "rows.npz", x_train=rows[:350], x_test=rows[350:])
  result = _run("train", f"--dataset=npz:{tmp_path / 'rows.npz'}", "--likelihood=gaussian",
                "--hidden_sizes=16", "--latent_size=2", "--epochs=2", "--batch_size=50",
                f"--export_dir={tmp_path / 'models'}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  version = next((tmp_path / "models").glob("rows_*_vae/1"))
  import tensorflow as tf
  served = tf.saved_model.load(str(version)).signatures
  elbo = served["serving_default"](x=tf.constant(rows[:4]))["elbo"].numpy()
  assert elbo.shape == (4,) and np.all(np.isfinite(elbo))
  # Raw units: log p of rows 20 wide is about -5 * log(20 sqrt(2 pi e)), far below 0.
  assert np.all(elbo < -10)


def test_channels_first_npz_fails_before_training(tmp_path):
  np.savez(tmp_path / "chw.npz", x_train=np.zeros((20, 3, 8, 8), np.uint8) + 7,
           x_test=np.zeros((5, 3, 8, 8), np.uint8) + 7)
  result = _run("train", f"--dataset=npz:{tmp_path / 'chw.npz'}", f"--workdir={tmp_path / 'r'}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert "transpose(0, 2, 3, 1)" in lines[-1] and not (tmp_path / "r").exists()


def test_a_colour_folder_with_the_default_bernoulli_fails_before_training(tmp_path):
  rng = np.random.default_rng(0)
  from PIL import Image
  for split, count in (("train", 20), ("test", 4)):
    (tmp_path / "photos" / split).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          tmp_path / "photos" / split / f"{i}.png")
  result = _run("train", f"--dataset=folder:{tmp_path / 'photos'}",
                f"--workdir={tmp_path / 'r'}", f"--export_dir={tmp_path / 'm'}", timeout=120)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert "would binarize channel by channel" in lines[-1] and "Traceback" not in result.stderr
  assert "--likelihood=discretized_logistic" in lines[-1]
  assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


def test_every_flagfile_in_configs_gives_valid_configs():
  script = """
import pathlib, sys
from absl import flags
from tfvae import cli
cli.define_model_flags(); cli.define_train_flags(); cli.define_output_flags()
for path in sorted(pathlib.Path("configs").glob("*.flags")):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train", f"--flagfile={path}"])
  train = cli.train_config_from_flags()
  shapes = {"frey": (28, 20, 1), "cifar": (32, 32, 3)}
  model = cli.model_config_from_flags(next(
      (shape for name, shape in shapes.items() if name in path.name), (28, 28, 1)))
  print(path.name, train.epochs, train.lr_schedule, model.objective, model.num_samples)
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
  assert lines["burda_vae.flags"] == "3280 burda elbo 1"
  assert lines["burda_iwae_k50.flags"] == "3280 burda iwae 50"
  assert lines["burda_vae_30min.flags"] == "500 cosine elbo 1"
  assert lines["burda_vae_2h.flags"] == "2300 cosine elbo 1"
