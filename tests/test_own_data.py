"""A user's own data: image folders, csv and npz vectors, tf.data datasets, validation splits."""

import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

import tfvae
from tfvae import data, export, training


def _write_images(folder: pathlib.Path, images: np.ndarray, suffix: str = ".png",
                  classes: int = 3) -> None:
  """Writes uint8 [N, H, W, C] images as files in class subfolders, as users keep them."""
  for i, image in enumerate(images):
    target = folder / f"class_{i % classes}"
    target.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        target / f"{i:05d}{suffix}")


def _factorized_bernoulli_elbo(x_train: np.ndarray, x_test_binary: np.ndarray) -> float:
  """Mean log-likelihood of the test bits under independent per-pixel Bernoullis fitted on
  train: the baseline a VAE must beat."""
  p = np.clip(x_train.astype(np.float64).mean(axis=0) / 255.0, 1e-3, 1 - 1e-3)
  x = x_test_binary.astype(np.float64) / 255.0
  return float(np.mean(np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=(1, 2, 3))))


def test_a_folder_of_grey_pngs_trains_and_beats_a_factorized_baseline(mnist, tmp_path):
  x_train, x_test = mnist.x_train[:3000], mnist.x_test[:200]
  _write_images(tmp_path / "digits" / "train", x_train)
  _write_images(tmp_path / "digits" / "test", x_test)
  dataset = data.load(f"folder:{tmp_path / 'digits'}", validation_examples=200)
  assert isinstance(dataset.train, data.FileSplit)
  assert (dataset.train.count, dataset.validation.count, dataset.test.count) == (2800, 200, 200)
  assert dataset.image_shape == (28, 28, 1)
  # Files are sorted by path, so test images come back as written: class folders, then names.
  order = sorted(range(len(x_test)), key=lambda i: (i % 3, i))
  np.testing.assert_array_equal(dataset.test.head(200), x_test[order])

  config = training.model_config_for(dataset, latent_size=10, hidden_sizes=(200,))
  result = training.train(config, tfvae.TrainConfig(epochs=15, batch_size=50),
                          tmp_path / "run", dataset=dataset, runtime=tfvae.Runtime(), verbose=0)
  x_test_binary = data.eval_head(dataset.test, 200, True, False)
  baseline = _factorized_bernoulli_elbo(x_train, x_test_binary)
  assert result.test_metrics["num_examples"] == 200
  assert result.test_metrics["elbo"] > baseline + 30, (result.test_metrics["elbo"], baseline)
  assert (tmp_path / "run" / "reconstructions.png").is_file()


def test_a_folder_without_splits_holds_out_a_fixed_test_fraction(tmp_path):
  rng = np.random.default_rng(0)
  _write_images(tmp_path / "faces", rng.integers(0, 256, (50, 6, 5, 3), dtype=np.uint8), ".bmp")
  first = data.load(f"folder:{tmp_path / 'faces'}", validation_examples=5)
  again = data.load(f"folder:{tmp_path / 'faces'}", validation_examples=5)
  assert (first.train.count, first.validation.count, first.test.count) == (40, 5, 5)
  assert first.test.paths == again.test.paths and first.validation.paths == again.validation.paths
  assert not set(first.test.paths) & set(first.train.paths)
  assert first.image_shape == (6, 5, 3)


def test_images_of_two_sizes_need_image_size(tmp_path):
  folder = tmp_path / "mixed"
  _write_images(folder, np.zeros((9, 8, 8, 3), np.uint8), ".jpg")  # 10 files: 1 for test
  Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(folder / "odd.jpg")
  with pytest.raises(data.DataError, match=r"is 8x8 but .*odd\.jpg is 9x7; pass --image_size"):
    data.load(f"folder:{folder}", validation_examples=0)
  resized = data.load(f"folder:{folder}", validation_examples=0, image_size=(5, 6))
  assert resized.image_shape == (5, 6, 3)
  assert resized.train.head(10).shape[1:] == (5, 6, 3)


def test_grey_rgb_and_rgba_files_share_the_folder_s_channels(tmp_path):
  folder = tmp_path / "mixed"
  folder.mkdir()
  Image.fromarray(np.full((4, 4), 10, np.uint8)).save(folder / "a_grey.png")
  Image.fromarray(np.full((4, 4, 3), 20, np.uint8)).save(folder / "b_rgb.png")
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 30, 128
  Image.fromarray(rgba).save(folder / "c_rgba.png")
  Image.fromarray(np.full((4, 4), 40, np.uint8)).convert("P").save(folder / "d_palette.gif")
  for name in "efghijkl":
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(folder / f"{name}.jpg")
  dataset = data.load(f"folder:{folder}", validation_examples=0)
  assert dataset.image_shape == (4, 4, 4)
  every = np.concatenate([dataset.train.head(20), dataset.test.head(20)])
  pixels = {tuple(image[0, 0]) for image in every}
  assert (10, 10, 10, 255) in pixels and (20, 20, 20, 255) in pixels
  assert (30, 0, 0, 128) in pixels and (40, 40, 40, 255) in pixels


def test_an_rgba_folder_trains_end_to_end_with_pictures(tmp_path):
  rng = np.random.default_rng(1)
  _write_images(tmp_path / "icons", rng.integers(0, 256, (60, 8, 8, 4), dtype=np.uint8))
  dataset = data.load(f"folder:{tmp_path / 'icons'}")
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(16,),
                                     likelihood="gaussian")
  training.train(config, tfvae.TrainConfig(epochs=1, batch_size=10), tmp_path / "run",
                 dataset=dataset, verbose=0)
  for picture in ("reconstructions.png", "samples.png", "manifold.png"):
    assert Image.open(tmp_path / "run" / picture).mode == "RGBA"


def test_unreadable_files_and_empty_folders_fail_with_the_fix(tmp_path):
  with pytest.raises(data.DataError, match="no such folder"):
    data.load(f"folder:{tmp_path / 'absent'}")
  (tmp_path / "empty" / "train").mkdir(parents=True)
  (tmp_path / "empty" / "test").mkdir()
  with pytest.raises(data.DataError, match="train folder: no .* files found"):
    data.load(f"folder:{tmp_path / 'empty'}")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(data.DataError, match=r"broken\.png: not a readable image"):
    data.load(f"folder:{tmp_path / 'bad'}")


@pytest.mark.slow
def test_colour_jpegs_of_odd_size_train_a_conv_net_and_serve(tmp_path):
  rng = np.random.default_rng(2)
  base = rng.integers(0, 256, (1, 30, 30, 3), dtype=np.uint8)
  images = np.clip(base + rng.normal(0, 20, (80, 30, 30, 3)), 0, 255).astype(np.uint8)
  _write_images(tmp_path / "photos", images, ".jpg")
  dataset = data.load(f"folder:{tmp_path / 'photos'}")
  assert dataset.image_shape == (30, 30, 3)
  config = training.model_config_for(dataset, latent_size=4, conv_channels=(8, 16),
                                     architecture="conv", likelihood="gaussian")
  result = training.train(config, tfvae.TrainConfig(epochs=1, batch_size=16), tmp_path / "run",
                          dataset=dataset, verbose=0)
  path = export.export(result.vae, tmp_path / "models", "photos",
                       warmup_images=export.warmup_images(dataset, "gaussian"))
  served = tf.saved_model.load(str(path)).signatures["reconstruct"](
      x=tf.constant(images[:3] / 255.0, tf.float32))["reconstruction"]
  assert served.shape == (3, 30, 30, 3)


# ---- vectors -----------------------------------------------------------------------------------

def _tabular(seed: int, count: int, outliers: int = 0):
  """Rows [count, 8] on a 2-D curved manifold in raw units far from [0, 1], and rows off it."""
  rng = np.random.default_rng(seed)
  t = rng.normal(size=(count, 2))
  mixing = np.random.default_rng(99).normal(size=(4, 8))
  features = np.concatenate([t, np.sin(t), ], axis=1) @ mixing  # [count, 8]
  inliers = 1000.0 + 50.0 * (features + 0.05 * rng.normal(size=features.shape))
  spread = inliers.std(axis=0)
  off = 1000.0 + spread * rng.normal(size=(outliers, 8)) * 1.5
  return inliers.astype(np.float32), off.astype(np.float32)


def _auroc(inlier_scores: np.ndarray, outlier_scores: np.ndarray) -> float:
  """P(outlier score > inlier score), the Mann-Whitney statistic."""
  u = stats.mannwhitneyu(outlier_scores, inlier_scores, alternative="greater").statistic
  return float(u / (len(inlier_scores) * len(outlier_scores)))


def test_standardized_gaussian_is_the_density_of_the_raw_values():
  mean, std = np.array([1000.0, -3.0], np.float32), np.array([50.0, 0.01], np.float32)
  params = np.array([[0.3, -1.2, 0.5, -0.4]], np.float32)  # loc [2], raw scale [2]
  x = np.array([[1020.0, -3.005]], np.float32)
  distribution = tfvae.distributions.make_likelihood(
      "gaussian", tf.constant(params), event_ndims=1, standardization=(mean, std))
  scale = tfvae.distributions.positive_scale(params[:, 2:]).numpy()
  expected = stats.norm.logpdf(x, loc=mean + std * params[:, :2], scale=std * scale).sum()
  np.testing.assert_allclose(distribution.log_prob(x).numpy(), [expected], rtol=1e-5)
  np.testing.assert_allclose(distribution.mean().numpy(), mean + std * params[:, :2], rtol=1e-6)


def test_adapt_stores_the_training_statistics_and_they_round_trip(tmp_path):
  x, _ = _tabular(0, 500)
  x[:, 3] = 7.0  # a constant feature gets a unit scale
  config = tfvae.ModelConfig(image_shape=(8,), latent_size=2, hidden_sizes=(16,),
                             likelihood="gaussian", standardize=True)
  vae = tfvae.VAE(config)
  vae.adapt(x)
  expected_std = x.astype(np.float64).std(axis=0)
  expected_std[3] = 1.0
  np.testing.assert_allclose(vae.encoder.feature_mean.numpy(), x.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(vae.decoder.feature_std.numpy(), expected_std, rtol=1e-4)
  vae.compile(optimizer="adam")
  vae.save(tmp_path / "v.keras")
  loaded = keras.saving.load_model(tmp_path / "v.keras")
  np.testing.assert_array_equal(loaded.encoder.feature_std.numpy(),
                                vae.encoder.feature_std.numpy())


def test_tabular_npz_trains_exports_and_its_served_score_finds_outliers(tmp_path):
  inliers, _ = _tabular(0, 3000)
  test_inliers, outliers = _tabular(1, 400, outliers=100)
  path = tmp_path / "sensors.npz"
  np.savez(path, x_train=inliers, x_test=test_inliers)
  dataset = data.load(f"npz:{path}")
  assert dataset.vectors and dataset.image_shape == (8,) and dataset.validation.count == 300
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(64, 64),
                                     likelihood="gaussian")
  assert config.standardize
  result = training.train(config, tfvae.TrainConfig(epochs=30, batch_size=100),
                          tmp_path / "run", dataset=dataset, verbose=0)
  assert np.isfinite(result.test_metrics["elbo"])
  assert not (tmp_path / "run" / "samples.png").exists()  # vectors are no pictures
  exported = export.export(result.vae, tmp_path / "models", "sensors",
                           warmup_images=export.warmup_images(dataset, "gaussian"))
  served = tf.saved_model.load(str(exported)).signatures

  def scores(x):
    return served["anomaly_score"](x=tf.constant(x))["anomaly_score"].numpy()

  auroc = _auroc(scores(test_inliers), scores(outliers))
  assert auroc >= 0.95, auroc
  reconstruction = served["reconstruct"](x=tf.constant(test_inliers[:5]))["reconstruction"]
  assert reconstruction.shape == (5, 8)
  assert abs(float(np.mean(reconstruction)) - 1000.0) < 200  # raw units, not squashed
  with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
    served["serving_default"](x=tf.constant([[np.nan] * 8], tf.float32))


def test_vectors_with_a_gaussian_need_standardization(tmp_path):
  x, _ = _tabular(0, 100)
  dataset = data.Dataset("npz:v", x[:80], x[80:], binary=False)
  config = tfvae.ModelConfig(image_shape=(8,), likelihood="gaussian", hidden_sizes=(8,))
  with pytest.raises(tfvae.ConfigError, match="standardize=True"):
    training.train(config, tfvae.TrainConfig(epochs=1), tmp_path, dataset=dataset, verbose=0)


def test_csv_with_and_without_a_header(tmp_path):
  rows = np.random.default_rng(0).normal(size=(30, 3)) * 100
  plain = tmp_path / "plain.csv"
  np.savetxt(plain, rows, delimiter=",")
  headed = tmp_path / "headed.csv"
  np.savetxt(headed, rows, delimiter=",", header="a,b,c", comments="")
  first = data.load(f"csv:{plain}", validation_examples=0)
  second = data.load(f"csv:{headed}", validation_examples=0)
  assert first.image_shape == (3,) and (first.train.count, first.test.count) == (27, 3)
  np.testing.assert_allclose(np.sort(np.concatenate([first.x_train, first.x_test]), axis=0),
                             np.sort(rows.astype(np.float32), axis=0), rtol=1e-6)
  np.testing.assert_array_equal(first.x_test, second.x_test)


@pytest.mark.parametrize("text, phrase", [
    ("1,2\n3\n", "row 2 has 1 columns"),
    ("1,2\n3,x\n", "not a number"),
    ("1,2\n3,nan\n", "NaN or Inf"),
    ("a,b\n", "no rows of numbers"),
])
def test_bad_csv_fails_with_the_row_and_the_fix(tmp_path, text, phrase):
  path = tmp_path / "bad.csv"
  path.write_text(text)
  with pytest.raises(data.DataError, match=phrase):
    data.load(f"csv:{path}")


# ---- tf.data from Python, validation, names ----------------------------------------------------

@pytest.mark.parametrize("form", ["images", "pairs", "dicts", "batched"])
def test_train_takes_a_tf_data_dataset(form, tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 120)
  dataset = {
      "images": tf.data.Dataset.from_tensor_slices(images),
      "pairs": tf.data.Dataset.from_tensor_slices((images, labels)),
      "dicts": tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}),
      "batched": tf.data.Dataset.from_tensor_slices(images).batch(7),
  }[form]
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,))
  result = training.train(config, tfvae.TrainConfig(epochs=1, batch_size=20), tmp_path,
                          dataset=dataset, verbose=0)
  # 12 test examples held out first, then 11 for validation: 97 train, 4 full batches.
  assert int(result.vae.optimizer.iterations) == 4
  assert result.test_metrics["num_examples"] == 12


def test_fit_takes_batches_of_dicts_and_pairs():
  images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  vae = tfvae.VAE(tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,)))
  vae.compile(optimizer="adam")
  dicts = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(40)}).batch(10)
  pairs = tf.data.Dataset.from_tensor_slices((images, np.arange(40))).batch(10)
  history = vae.fit(dicts, validation_data=pairs, epochs=1, verbose=0)
  assert np.isfinite(history.history["val_loss"][0])


def test_best_keras_does_not_depend_on_the_test_set(toy_dataset, tmp_path):
  base = toy_dataset(0, 300, 50)
  other_test = toy_dataset(1, 300, 50).x_test
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,),
                             likelihood="gaussian")
  weights = []
  for name, x_test in (("a", base.x_test), ("b", other_test)):
    dataset = data.Dataset("npz:toy", base.x_train, x_test, binary=False)
    training.train(config, tfvae.TrainConfig(epochs=3, batch_size=50), tmp_path / name,
                   dataset=dataset, verbose=0)
    best = keras.saving.load_model(tmp_path / name / "best.keras")
    weights.append([w.numpy() for w in best.weights])
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    assert "val_loss" in rows[0]
  for a, b in zip(*weights, strict=True):
    np.testing.assert_array_equal(a, b)


def test_validation_defaults_per_source(mnist, data_dir):
  assert (mnist.train.count, mnist.validation.count) == (50_000, 10_000)
  binarized = data.load("binarized_mnist", data_dir)
  assert (binarized.train.count, binarized.validation.count) == (50_000, 10_000)
  none = data.load("mnist", data_dir, validation_examples=0)
  assert none.validation is None and none.train.count == 60_000
  with pytest.raises(data.DataError, match="would leave none of its"):
    data.load("frey_face", data_dir, validation_examples=5000)


def test_default_names_derive_from_the_source(tmp_path):
  assert data.default_model_name("mnist") == "mnist_vae"
  assert data.default_model_name("tfds:cifar10:1.0") == "cifar10_1.0_vae"
  a = data.default_model_name(f"npz:{tmp_path / 'a' / 'faces.npz'}")
  b = data.default_model_name(f"npz:{tmp_path / 'b' / 'faces.npz'}")
  assert a.startswith("faces_") and b.startswith("faces_") and a != b
  assert data.default_model_name(f"folder:{tmp_path / 'my photos'}").startswith("my_photos_")


def test_an_npz_that_declares_too_much_is_refused_before_reading(tmp_path, monkeypatch):
  path = tmp_path / "big.npz"
  np.savez(path, x_train=np.zeros((1000, 8), np.float32), x_test=np.zeros((10, 8), np.float32))
  monkeypatch.setattr(data.sources, "memory_budget", lambda: 1000)
  with pytest.raises(data.DataError, match=r"x_train declares \(1000, 8\) float32"):
    data.load(f"npz:{path}")


def test_results_name_the_split_they_come_from(toy_dataset, tmp_path):
  config = tfvae.ModelConfig(image_shape=(8, 8, 1), latent_size=2, hidden_sizes=(8,),
                             likelihood="gaussian")
  training.train(config, tfvae.TrainConfig(epochs=1, batch_size=50, validation_examples=30),
                 tmp_path, dataset=toy_dataset(0, 200, 40), verbose=0)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["test"]["split"] == "test" and results["test"]["num_examples"] == 40
  assert results["train_config"]["validation_examples"] == 30


def test_from_tf_data_tells_batches_and_checks_the_range():
  images = np.random.default_rng(0).integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
  fixed = data.from_tf_data(tf.data.Dataset.from_tensor_slices(images).batch(
      10, drop_remainder=True))
  assert fixed.image_shape == (8, 8, 1) and fixed.train.count + fixed.test.count == 120
  grey = data.from_tf_data(tf.data.Dataset.from_tensor_slices(images[..., 0]).batch(
      10, drop_remainder=True))
  assert grey.image_shape == (8, 8, 1)
  vectors = np.ones((40, 5), np.float32)
  batched = data.from_tf_data(tf.data.Dataset.from_tensor_slices(vectors).batch(
      8, drop_remainder=True), batched=True)
  assert batched.image_shape == (5,)
  with pytest.raises(data.DataError, match=r"values in \[0, 255\]; expected uint8 0..255 or"):
    data.from_tf_data(tf.data.Dataset.from_tensor_slices(images.astype(np.float32)))


def test_bernoulli_on_real_vectors_is_refused(tmp_path):
  x, _ = _tabular(0, 100)
  dataset = data.Dataset("npz:v", x[:80], x[80:], binary=False)
  config = tfvae.ModelConfig(image_shape=(8,), hidden_sizes=(8,))
  with pytest.raises(tfvae.ConfigError, match="pass --likelihood=gaussian"):
    training.train(config, tfvae.TrainConfig(epochs=1), tmp_path, dataset=dataset, verbose=0)


def test_bernoulli_on_8_bit_colour_images_is_refused_with_the_likelihoods_that_fit(tmp_path):
  rng = np.random.default_rng(0)
  photos = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
  colour = data.Dataset("npz:photos", photos[:50], photos[50:], binary=False)
  config = tfvae.ModelConfig(image_shape=(8, 8, 3), hidden_sizes=(8,))  # bernoulli
  with pytest.raises(tfvae.ConfigError, match=r"npz:photos holds images of 3 channels,"
                     r" which likelihood=bernoulli would binarize channel by channel; .* Pass"
                     r" --likelihood=discretized_logistic \(8-bit pixels\) or gaussian"):
    training.train(config, tfvae.TrainConfig(epochs=1), tmp_path / "run", dataset=colour,
                   verbose=0)
  assert not (tmp_path / "run" / "run.json").exists()  # refused before the run began
  # Black-and-white colour images are binary data, and grey levels are binarized as MNIST is.
  masks = data.Dataset("npz:masks", (photos[:50] > 127) * np.uint8(255),
                       (photos[50:] > 127) * np.uint8(255), binary=True)
  training.check_model_fits(config, masks)
  grey = data.Dataset("npz:grey", photos[:50, ..., :1], photos[50:, ..., :1], binary=False)
  training.check_model_fits(tfvae.ModelConfig(image_shape=(8, 8, 1)), grey)


def test_palette_bmps_are_refused_before_training(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("P").save(tmp_path / "a.bmp")
  with pytest.raises(data.DataError, match=r"a\.bmp: a palette BMP, .* convert it to PNG"):
    data.load(f"folder:{tmp_path}")


def test_adding_files_leaves_the_others_in_their_split(tmp_path):
  rng = np.random.default_rng(3)
  _write_images(tmp_path / "f", rng.integers(0, 256, (100, 4, 4, 1), dtype=np.uint8), classes=1)
  before = data.load(f"folder:{tmp_path / 'f'}", validation_examples=0)
  _write_images(tmp_path / "more", rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8),
                classes=1)
  for path in (tmp_path / "more" / "class_0").iterdir():
    path.rename(tmp_path / "f" / "class_0" / f"new_{path.name}")
  after = data.load(f"folder:{tmp_path / 'f'}", validation_examples=0)
  moved = set(before.test.paths) - set(after.test.paths)
  assert after.test.count == 12 and len(moved) <= 2  # at most the new files' share changes
