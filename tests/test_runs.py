"""tfvae.runs and the command line off the happy path: reruns, two runs at once, interrupts,
bad inputs that must get one line."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import tfvae
from tfvae import data, runs, training
from tfvae.data import DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent
_QUICK = ["--max_examples=3000", "--hidden_sizes=32", "--latent_size=4", "--epochs=2",
          "--steps_per_execution=10"]


def _train(tmp_path, data_dir, *extra, workdir="w", timeout=300):
  command = [sys.executable, str(ROOT / "bin" / "train"), *_QUICK,
             f"--workdir={tmp_path / workdir}", f"--export_dir={tmp_path / 'models'}",
             "--model_name=m", *extra]
  env = {**os.environ, "TFVAE_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(result) -> str:
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  """A finished quick run: (its tmp folder, data_dir)."""
  tmp_path = tmp_path_factory.mktemp("finished")
  result = _train(tmp_path, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp_path, data_dir


@pytest.mark.parametrize("change, what", [
    ("--likelihood=gaussian", "likelihood 'bernoulli' -> 'gaussian'"),
    ("--activation=tanh", "activation 'relu' -> 'tanh'"),
    ("--beta=0.5", "beta 1.0 -> 0.5"),
    ("--dataset=binarized_mnist", "dataset 'mnist' -> 'binarized_mnist'"),
    ("--latent_size=6", "latent_size 4 -> 6"),  # other weight shapes: refused, not a traceback
])
def test_a_changed_configuration_never_resumes(finished, change, what):
  tmp_path, data_dir = finished
  before = (tmp_path / "w" / "last.keras").read_bytes()
  error = _one_line_error(_train(tmp_path, data_dir, change))
  assert f"{tmp_path / 'w'} holds a run of another configuration" in error and what in error
  assert "--restart" in error and "another --workdir" in error
  assert (tmp_path / "w" / "last.keras").read_bytes() == before  # nothing touched


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
  model, train = tfvae.ModelConfig(), tfvae.TrainConfig()
  run = runs.identity(model, train, "digest")
  older = json.loads(json.dumps(run))
  del older["model_config"]["coupled_channels"], older["model_config"]["spatial_latent"]
  (tmp_path / runs.RUN_FILE).write_text(json.dumps({**older, "epochs_done": 1}))
  assert runs.check(tmp_path, run, 1) == runs.Standing(1, False)
  # A new setting away from its default is another configuration.
  changed = runs.identity(tfvae.ModelConfig(image_shape=(8, 8, 3), architecture="conv",
                                            likelihood="discretized_logistic",
                                            coupled_channels=True), train, "digest")
  (tmp_path / runs.RUN_FILE).write_text(json.dumps({**older, "epochs_done": 1}))
  with pytest.raises(runs.WorkdirError, match="coupled_channels False -> True"):
    runs.check(tmp_path, changed, 1)


def test_a_finished_run_reports_done_and_a_longer_one_continues(finished, tmp_path):
  source, data_dir = finished
  # A copy, so the other tests keep the finished run of 2 epochs.
  subprocess.run(["cp", "-a", str(source / "w"), str(tmp_path / "w")], check=True)
  versions = sorted((source / "models" / "m").iterdir())
  again = _train(tmp_path, data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "holds this run, finished" in again.stdout and "nothing was trained" in again.stdout
  assert not (tmp_path / "models" / "m").exists() or not any((tmp_path / "models" / "m").iterdir())
  shorter = _one_line_error(_train(tmp_path, data_dir, "--epochs=1"))
  assert "holds a run of 2 epochs, more than --epochs=1" in shorter
  longer = _train(tmp_path, data_dir, "--epochs=3")
  assert longer.returncode == 0, longer.stderr[-3000:]
  rows = (tmp_path / "w" / "metrics.csv").read_text().splitlines()
  assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]  # continued, not redone
  assert json.loads((tmp_path / "w" / runs.RUN_FILE).read_text())["epochs_done"] == 3
  assert versions  # the first run exported


def test_restart_starts_over_in_the_workdir(finished, tmp_path):
  source, data_dir = finished
  subprocess.run(["cp", "-a", str(source / "w"), str(tmp_path / "w")], check=True)
  result = _train(tmp_path, data_dir, "--likelihood=gaussian", "--restart", "--epochs=1")
  assert result.returncode == 0, result.stderr[-3000:]
  recorded = json.loads((tmp_path / "w" / runs.RUN_FILE).read_text())
  assert recorded["model_config"]["likelihood"] == "gaussian" and recorded["epochs_done"] == 1
  assert len((tmp_path / "w" / "metrics.csv").read_text().splitlines()) == 2  # header, 1 epoch


def test_a_workdir_in_use_is_refused_with_its_holder(tmp_path):
  with runs.Lock(tmp_path):
    with pytest.raises(runs.WorkdirError, match=rf"{tmp_path} is in use by process {os.getpid()}"):
      with runs.Lock(tmp_path):
        pass
  with runs.Lock(tmp_path):  # released: taken again
    pass


def test_a_dead_holders_lock_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import pathlib, sys, time; sys.path.insert(0, sys.argv[2]);"
      "from tfvae.runs import Lock; lock = Lock(pathlib.Path(sys.argv[1])).__enter__();"
      "print('locked', flush=True); time.sleep(60)"), str(tmp_path), str(ROOT)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(runs.WorkdirError, match=f"process {holder.pid}"):
    with runs.Lock(tmp_path):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with runs.Lock(tmp_path):  # the kernel dropped the dead process's lock
    assert f"process {os.getpid()}" in (tmp_path / runs.LOCK_FILE).read_text()


def test_two_runs_in_one_workdir_one_is_refused(data_dir, tmp_path):
  command = [sys.executable, str(ROOT / "bin" / "train"), *_QUICK, "--epochs=1000",
             f"--workdir={tmp_path / 'w'}", f"--export_dir={tmp_path / 'models'}",
             "--model_name=m"]
  env = {**os.environ, "TFVAE_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
  # A terminal's Ctrl-C: SIGINT handled, even where this suite runs with it ignored (a
  # background job of a script), which the child would inherit.
  first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.time() + 120
    while time.time() < deadline and "process" not in _read(tmp_path / "w" / runs.LOCK_FILE):
      time.sleep(0.1)
    second = _one_line_error(_train(tmp_path, data_dir, "--epochs=1000"))
    assert f"is in use by process {first.pid}" in second
  finally:
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
  # Ctrl-C: one line saying where the run stands, and the same command resumes it.
  assert first.returncode == 130 and "Traceback" not in stderr
  assert "run the same command to resume" in stderr.strip().splitlines()[-1]


def _read(path: pathlib.Path) -> str:
  try:
    return path.read_text()
  except OSError:
    return ""


@pytest.mark.parametrize("args, phrase", [
    (["--activation=swishy"], "activation='swishy' is not a Keras activation"),
    (["--seed=-1"], "seed=-1 must be in [0, 2**31)"),
])
def test_bad_values_are_one_line_before_the_data_loads(tmp_path, args, phrase):
  result = _train(tmp_path, "/nonexistent", *args)  # no data there: must fail before loading
  error = _one_line_error(result)
  assert phrase in error and not (tmp_path / "w").exists()


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return path


def test_an_npz_bomb_is_refused_before_it_is_read(tmp_path):
  # A small file whose x_train inflates to 600 MB of zeros, against a budget of 256 MiB.
  path = tmp_path / "bomb.npz"
  shape, size = (600, 1000, 1000), 600_000_000
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    with archive.open("x_train.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                    "shape": shape})
      block = bytes(1 << 24)
      for start in range(0, size, len(block)):
        member.write(block[:min(len(block), size - start)])
    with archive.open("x_test.npy", "w") as member:
      np.save(member, np.zeros((2, 4, 4), np.uint8))
  assert path.stat().st_size < 2_000_000
  import resource
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  started = time.time()
  with pytest.raises(DataError, match=r"x_train declares \(600, 1000, 1000\) uint8, 0\.6 GiB,"
                                      r" more than the 0\.2 GiB"):
    data.sources.check_npz_members(str(path), budget=2**28)
  assert time.time() - started < 2
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_an_npz_member_that_holds_less_than_it_declares_is_refused(tmp_path):
  path = tmp_path / "short.npz"
  with zipfile.ZipFile(path, "w") as archive:
    with archive.open("x_train.npy", "w") as member:
      np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (1000, 28, 28)})
      member.write(bytes(1000))
    with archive.open("x_test.npy", "w") as member:
      np.save(member, np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(DataError, match=r"x_train declares \(1000, 28, 28\) uint8 \(784,000 bytes\)"
                                      r" but holds 1,000; the file is truncated or corrupt"):
    data.load(f"npz:{path}")


@pytest.mark.parametrize("make, phrase", [
    (lambda p: p.write_bytes(b""), "not an .npz archive"),
    (lambda p: p.write_text("x,y\n1,2\n"), "not an .npz archive"),
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), "not an .npz archive"),
    (lambda p: p.write_bytes(_npz(p.with_suffix(".tmp.npz"), x_train=np.zeros((4, 3, 3), np.uint8),
                                  x_test=np.zeros((2, 3, 3), np.uint8)).read_bytes()[:300]),
     "npz"),
    (lambda p: _npz(p, x_train=np.array([{"a": 1}], dtype=object), x_test=np.zeros(2)),
     "holds Python objects"),
])
def test_malformed_npz_files_get_one_line_naming_the_file(tmp_path, make, phrase):
  path = tmp_path / "bad.npz"
  make(path)
  with pytest.raises(DataError, match=phrase) as error:
    data.load(f"npz:{path}")
  assert str(path) in str(error.value) and "\n" not in str(error.value)
  assert "allow_pickle" not in str(error.value)


def test_a_damaged_keras_file_is_one_line(finished, tmp_path):
  source, data_dir = finished
  good = (source / "w" / "last.keras").read_bytes()
  bad_crc = bytearray(good)
  bad_crc[len(good) // 2] ^= 0xFF  # inside a member: its CRC no longer matches
  cases = {"crc.keras": bytes(bad_crc)}
  with zipfile.ZipFile(source / "w" / "last.keras") as archive, \
       zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as out:
    for item in archive.infolist():
      if item.filename != "config.json":
        out.writestr(item, archive.read(item))
  for name, contents in cases.items():
    (tmp_path / name).write_bytes(contents)
  for name in ("crc.keras", "noconfig.keras"):
    result = subprocess.run([sys.executable, str(ROOT / "bin" / "sample"),
                             f"--model={tmp_path / name}", f"--output={tmp_path / 's.png'}"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    error = _one_line_error(result)
    assert "damaged .keras archive" in error and str(tmp_path / name) in error


@pytest.mark.parametrize("args, phrase", [
    (["--max_examples=-3"], "--max_examples=-3 must be at least 1"),
    (["--max_examples=0"], "--max_examples=0 must be at least 1"),
    (["--output=/"], "must be a file in an existing folder"),
])
def test_evaluate_checks_its_flags_before_the_work(finished, args, phrase):
  source, data_dir = finished
  result = subprocess.run([sys.executable, str(ROOT / "bin" / "evaluate"),
                           f"--model={source / 'w' / 'last.keras'}", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TFVAE_DATA_DIR": str(data_dir),
                               "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert phrase in _one_line_error(result)


def test_train_in_python_refuses_another_configuration(tmp_path, toy_dataset):
  dataset = toy_dataset(0, 200, 20)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  training.train(config, tfvae.TrainConfig(epochs=1), tmp_path, dataset=dataset, verbose=0)
  again = training.train(config, tfvae.TrainConfig(epochs=1), tmp_path, dataset=dataset,
                         verbose=0)
  assert again.already_done and again.history == {}
  with pytest.raises(runs.WorkdirError, match="batch_size 100 -> 50"):
    training.train(config, tfvae.TrainConfig(epochs=1, batch_size=50), tmp_path,
                   dataset=dataset, verbose=0)


def test_a_disk_that_fills_mid_run_stops_cleanly_and_resumes(tmp_path, toy_dataset, monkeypatch):
  dataset = toy_dataset(0, 400, 40)
  config = training.model_config_for(dataset, latent_size=2, hidden_sizes=(8,))
  real = training.shutil.disk_usage
  epochs_checked = []

  def filling(path):  # room for epoch 1's checkpoints, none for epoch 2's
    usage = real(path)
    epochs_checked.append(path)
    return usage._replace(free=usage.free if len(epochs_checked) == 1 else 4096)

  monkeypatch.setattr(training.shutil, "disk_usage", filling)
  with pytest.raises(training.DiskFullError, match=r"0\.0 MiB free, and epoch 2's checkpoints"
                                                   r" need about .* keeping the checkpoints of"
                                                   r" epoch 1\. Free some space"):
    training.train(config, tfvae.TrainConfig(epochs=3), tmp_path, dataset=dataset, verbose=0)
  rows = (tmp_path / "metrics.csv").read_text().splitlines()
  assert [row.split(",")[0] for row in rows[1:]] == ["0"]  # metrics.csv agrees with the backup
  assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
  monkeypatch.setattr(training.shutil, "disk_usage", real)
  resumed = training.train(config, tfvae.TrainConfig(epochs=3), tmp_path, dataset=dataset,
                           verbose=0)
  # 400 images, 40 held out for validation, in batches of 100
  assert int(resumed.vae.optimizer.iterations) == 3 * 3
  assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3
