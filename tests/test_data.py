"""Tests for scoreflow_jax.data: file readers, TFDS source, batch iterator."""
import gzip
import os
import pickle
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest

from scoreflow_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_HINT = ("--config.data.source=offline"
              " --config.data.data_dir=/path/to/mnist_idx_dir")


def _write_idx(path, magic, array):
  array = np.asarray(array, np.uint8)
  raw = magic.to_bytes(4, "big")
  raw += np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(raw)


def _write_mnist(directory, split, n, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,), dtype=np.uint8)
  prefix = "train" if split == "train" else "t10k"
  ext = ".gz" if gz else ""
  _write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", 2051, images)
  _write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", 2049, labels)
  return images, labels


@pytest.mark.parametrize("split,gz", [("train", True), ("test", False)])
def test_offline_mnist_round_trips_pixels_and_labels(tmp_path, split, gz):
  images, labels = _write_mnist(tmp_path, split, 7, gz=gz)
  got_images, got_labels = data.load_split("mnist", split, "offline",
                                           str(tmp_path))
  assert got_images.shape == (7, 28, 28, 1)
  assert got_images.dtype == np.uint8
  assert got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, labels)


def test_offline_mnist_bad_magic_names_file(tmp_path):
  _write_mnist(tmp_path, "train", 3)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  _write_idx(path, 2051, np.zeros((3, 1, 1)))
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*2051"):
    data.load_split("mnist", "train", "offline", tmp_path)


def test_offline_mnist_truncated_idx_names_file(tmp_path):
  _write_mnist(tmp_path, "test", 3, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
    data.load_split("mnist", "test", "offline", tmp_path)


def test_offline_mnist_extra_bytes_and_out_of_range_labels_are_refused(tmp_path):
  _write_mnist(tmp_path, "test", 3, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes() + b"\x00\x00\x00")  # not what the header says
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated or corrupt"):
    data.load_split("mnist", "test", "offline", tmp_path)
  _write_mnist(tmp_path, "test", 3, gz=False)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, np.array([0, 10, 3], np.uint8))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got \[0, 10\]"):
    data.load_split("mnist", "test", "offline", tmp_path)


def test_held_out_images_are_pinned():
  # which training images data.holdout holds out must never change: evaluations
  # against the validation split and runs of earlier sessions depend on it
  train, validation = data.holdout_indices(50, 12)
  assert validation.tolist() == [1, 2, 3, 4, 11, 18, 20, 23, 24, 26, 34, 36]
  assert sorted(train.tolist() + validation.tolist()) == list(range(50))


def test_offline_mnist_truncated_gzip_names_file(tmp_path):
  _write_mnist(tmp_path, "train", 3)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
    data.load_split("mnist", "train", "offline", tmp_path)


def test_offline_mnist_corrupt_gzip_stream_names_file(tmp_path):
  # flipped bytes inside the deflate stream raise zlib.error, not OSError
  import gzip
  raw = (2049).to_bytes(4, "big") + (5000).to_bytes(4, "big") + bytes(
      np.random.default_rng(0).integers(0, 10, 5000, dtype=np.uint8))
  blob = bytearray(gzip.compress(raw))
  blob[20:60] = bytes(b ^ 0xFF for b in blob[20:60])
  _write_mnist(tmp_path, "train", 3)
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: cannot read.*corrupt"):
    data.load_split("mnist", "train", "offline", tmp_path)


def test_offline_mnist_count_mismatch(tmp_path):
  _write_mnist(tmp_path, "train", 3)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(4))
  with pytest.raises(ValueError, match="3 images but 4 labels"):
    data.load_split("mnist", "train", "offline", tmp_path)


def test_offline_missing_dir_says_what_to_download(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as e:
    data.load_split("mnist", "train", "offline", str(missing))
  msg = str(e.value)
  assert str(missing) in msg
  assert "t10k-labels-idx1-ubyte.gz" in msg
  assert "source=tfds" in msg


def test_offline_missing_file_names_path(tmp_path):
  _write_mnist(tmp_path, "train", 3)
  os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError) as e:
    data.load_split("mnist", "train", "offline", tmp_path)
  assert str(tmp_path / "train-labels-idx1-ubyte") in str(e.value)
  assert "Download them into" in str(e.value)


def _write_cifar(directory, names, rows):
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  all_rows, all_labels = [], []
  for name in names:
    rows_i = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
    labels_i = [int(v) for v in rng.integers(0, 10, rows)]
    with open(directory / name, "wb") as f:
      pickle.dump({b"data": rows_i, b"labels": labels_i}, f)
    all_rows.append(rows_i)
    all_labels += labels_i
  return np.concatenate(all_rows), np.array(all_labels)


def test_offline_cifar_train_converts_chw_rows_to_hwc(tmp_path):
  names = [f"data_batch_{i}" for i in range(1, 6)]
  rows, labels = _write_cifar(tmp_path / "cifar-10-batches-py", names, 2)
  images, got_labels = data.load_split("cifar10", "train", "offline", tmp_path)
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(got_labels, labels)
  # Row layout: 1024 red, then 1024 green, then 1024 blue, each row-major.
  i, h, w, c = 7, 3, 29, 2
  assert images[i, h, w, c] == rows[i, c * 1024 + h * 32 + w]
  np.testing.assert_array_equal(
      images, rows.reshape(10, 3, 32, 32).transpose(0, 2, 3, 1))


def test_offline_cifar_test_split_in_dir_itself(tmp_path):
  rows, labels = _write_cifar(tmp_path, ["test_batch"], 3)
  images, got_labels = data.load_split("cifar10", "test", "offline", tmp_path)
  np.testing.assert_array_equal(images[:, :, :, 1],
                                rows[:, 1024:2048].reshape(3, 32, 32))
  np.testing.assert_array_equal(got_labels, labels)


def test_offline_cifar_missing_and_corrupt_files(tmp_path):
  _write_cifar(tmp_path, ["data_batch_1"], 2)
  with pytest.raises(FileNotFoundError, match=r"data_batch_2.*cifar-10"):
    data.load_split("cifar10", "train", "offline", tmp_path)
  (tmp_path / "test_batch").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="test_batch"):
    data.load_split("cifar10", "test", "offline", tmp_path)


def test_unknown_choices_are_listed():
  with pytest.raises(ValueError, match="cifar10"):
    data.load_split("imagenet", "train", "offline", "/tmp")
  with pytest.raises(ValueError, match="'train', 'test'"):
    data.load_split("mnist", "validation", "offline", "/tmp")
  with pytest.raises(ValueError, match="'tfds', 'offline'"):
    data.load_split("mnist", "train", "http", "/tmp")


def test_tfds_mnist_under_mock_data(monkeypatch):
  tf = pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  hidden = []
  real_set = tf.config.set_visible_devices
  monkeypatch.setattr(
      tf.config, "set_visible_devices",
      lambda devices, kind: (hidden.append((list(devices), kind)),
                             real_set(devices, kind)))
  # A chunk smaller than the split exercises reading in pieces.
  monkeypatch.setattr(data, "_TFDS_CHUNK", 8)
  monkeypatch.setattr(data, "_download_reachable", lambda name: True)  # no internet here
  with tfds.testing.mock_data(num_examples=20):
    images, labels = data.load_split("mnist", "train", "tfds")
    ds = tfds.load("mnist", split="train", as_supervised=True)
    expected = list(tfds.as_numpy(ds))
  assert hidden == [([], "GPU")]
  assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (20,) and labels.dtype == np.int32
  np.testing.assert_array_equal(images, np.stack([x for x, _ in expected]))
  np.testing.assert_array_equal(labels, [y for _, y in expected])
  batch = data.to_model_batch(images, labels)
  assert batch["jpg"].dtype == np.float32 and batch["cls"].dtype == np.int32
  assert -1.0 <= batch["jpg"].min() and batch["jpg"].max() <= 1.0
  np.testing.assert_allclose(batch["jpg"], images / 127.5 - 1.0, atol=1e-6)


def test_tfds_download_failure_explains_offline_source(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  cause = ConnectionError("no route to host")

  def failing_load(*args, **kwargs):
    raise cause

  monkeypatch.setattr(tfds, "load", failing_load)
  monkeypatch.setattr(data, "_download_reachable", lambda name: True)
  with pytest.raises(RuntimeError) as e:
    data.load_split("mnist", "train", "tfds")
  assert MNIST_HINT in str(e.value)
  assert e.value.__cause__ is cause


def test_tfds_without_a_way_to_download_fails_at_once(tmp_path, monkeypatch):
  # Offline, tfds.load retried the download for 3.5 minutes before failing.
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "_download_reachable", lambda name: False)
  monkeypatch.setattr(tfds, "load", lambda *a, **k: pytest.fail("tfds.load was called"))
  with pytest.raises(RuntimeError, match="cannot reach storage.googleapis.com") as e:
    data.load_split("mnist", "train", "tfds", str(tmp_path))
  assert MNIST_HINT in str(e.value)


@pytest.mark.parametrize("gz", [True, False])
def test_tfds_source_on_a_folder_of_idx_files_points_to_offline(tmp_path, monkeypatch, gz):
  # TFDS would take the folder for its cache and retry a download into it for
  # minutes; the IDX files there say the user meant source='offline'.
  _write_mnist(tmp_path, "test", 4, gz=gz)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # never reached
  with pytest.raises(ValueError, match="source='offline'") as e:
    data.load_split("mnist", "train", "tfds", str(tmp_path))
  assert MNIST_HINT in str(e.value)
  assert sorted(os.listdir(tmp_path)) == sorted(  # nothing written there
      f"t10k-{k}-idx{d}-ubyte" + (".gz" if gz else "") for k, d in (("images", 3), ("labels", 1)))


def test_tfds_without_tensorflow_explains_offline_source(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=MNIST_HINT) as e:
    data.load_split("mnist", "test", "tfds")
  assert isinstance(e.value.__cause__, ImportError)


def test_import_does_not_import_tensorflow():
  code = ("import sys, scoreflow_jax.data; "
          "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=60)
  assert out.stdout.strip() == "[]"


def test_to_model_batch_maps_0_and_255_to_minus_one_and_one():
  batch = data.to_model_batch(np.array([[0, 51, 255]], np.uint8), [3])
  np.testing.assert_allclose(batch["jpg"], [[-1.0, -0.6, 1.0]], atol=1e-7)
  assert batch["jpg"].dtype == np.float32
  np.testing.assert_array_equal(batch["cls"], np.array([3], np.int32))


def _index_data(n=50):
  """Images whose label is their index, so a batch's "cls" names its rows."""
  images = (np.arange(n) % 256).astype(np.uint8).reshape(n, 1, 1, 1)
  images = np.broadcast_to(images, (n, 2, 2, 1)).copy()
  return images, np.arange(n)


def test_epoch_is_permutation_given_by_seed_and_epoch():
  images, labels = _index_data(50)
  it = data.BatchIterator(images, labels, 8, seed=3, prefetch=0)
  assert it.steps_per_epoch == 6
  for epoch in (0, 2):
    ids = np.concatenate([it.get_global_batch(epoch * 6 + i)["cls"]
                          for i in range(6)])
    assert len(set(ids.tolist())) == 48
    perm = np.random.default_rng([3, epoch]).permutation(50)
    np.testing.assert_array_equal(ids, perm[:48])
  batch = it.get_global_batch(5)
  np.testing.assert_allclose(batch["jpg"][:, 0, 0, 0],
                             (batch["cls"] % 256) / 127.5 - 1.0, atol=1e-6)


def test_without_drop_remainder_last_batch_wraps_within_epoch():
  images, labels = _index_data(50)
  it = data.BatchIterator(images, labels, 8, seed=0, drop_remainder=False,
                          prefetch=0)
  assert it.steps_per_epoch == 7
  ids = np.concatenate([it.global_indices(i) for i in range(7)])
  assert set(ids.tolist()) == set(range(50))
  perm = np.random.default_rng([0, 0]).permutation(50)
  np.testing.assert_array_equal(it.global_indices(6), np.r_[perm[48:],
                                                            perm[:6]])
  next_epoch = np.random.default_rng([0, 1]).permutation(50)
  np.testing.assert_array_equal(it.global_indices(7), next_epoch[:8])


def test_epochs_and_seeds_give_different_orders():
  images, labels = _index_data(50)
  it = data.BatchIterator(images, labels, 10, seed=0, prefetch=0)
  other = data.BatchIterator(images, labels, 10, seed=1, prefetch=0)
  epoch0 = np.concatenate([it.global_indices(i) for i in range(5)])
  epoch1 = np.concatenate([it.global_indices(i) for i in range(5, 10)])
  assert sorted(epoch0) == sorted(epoch1) == list(range(50))
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(it.global_indices(0), other.global_indices(0))


def test_process_shards_concatenate_to_single_process_batch():
  images, labels = _index_data(50)
  single = data.BatchIterator(images, labels, 12, seed=5, prefetch=0)
  shards = [data.BatchIterator(images, labels, 12, seed=5, process_index=p,
                               process_count=2) for p in range(2)]
  for step in range(10):  # Crosses into epochs 1, 2 (4 steps per epoch).
    local = [next(s) for s in shards]
    assert local[0]["cls"].shape == (6,)
    full = single.get_global_batch(step)
    for key in ("jpg", "cls"):
      np.testing.assert_array_equal(
          np.concatenate([b[key] for b in local]), full[key])
  for s in shards:
    s.close()


def test_resume_from_step_matches_uninterrupted_run():
  images, labels = _index_data(50)
  with data.BatchIterator(images, labels, 8, seed=9) as full:
    uninterrupted = [next(full)["cls"] for _ in range(20)]
    assert full.step == 20
  with data.BatchIterator(images, labels, 8, seed=9, start_step=7) as resumed:
    assert resumed.step == 7
    again = [next(resumed)["cls"] for _ in range(13)]
    assert resumed.step == 20
  np.testing.assert_array_equal(np.stack(again), np.stack(uninterrupted[7:]))
  unprefetched = data.BatchIterator(images, labels, 8, seed=9, prefetch=0)
  np.testing.assert_array_equal(
      np.stack([next(unprefetched)["cls"] for _ in range(20)]),
      np.stack(uninterrupted))


def test_divisibility_and_size_errors_name_the_numbers():
  images, labels = _index_data(50)
  with pytest.raises(ValueError,
                     match=r"global_batch_size=10.*process_count=4"):
    data.BatchIterator(images, labels, 10, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r"global_batch_size=64.*50"):
    data.BatchIterator(images, labels, 64, seed=0)
  with pytest.raises(ValueError, match="process_index=2"):
    data.BatchIterator(images, labels, 10, seed=0, process_index=2,
                       process_count=2)


def _prefetch_threads():
  return [t for t in threading.enumerate()
          if t.name == "BatchIterator-prefetch"]


def test_close_stops_prefetch_thread():
  images, labels = _index_data(50)
  before = len(_prefetch_threads())
  it = data.BatchIterator(images, labels, 8, seed=0, prefetch=2)
  next(it)
  assert len(_prefetch_threads()) == before + 1
  assert _prefetch_threads()[-1].daemon
  it.close()
  assert len(_prefetch_threads()) == before
  with pytest.raises(StopIteration):
    next(it)


def test_unclosed_prefetch_thread_does_not_block_exit():
  code = ("import numpy as np; from scoreflow_jax import data; "
          "it = data.BatchIterator(np.zeros((20, 2, 2, 1), np.uint8), "
          "np.zeros(20), 4, seed=0); next(it); print(it.step)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=60)
  assert out.stdout.strip() == "1"


def test_synthetic_is_deterministic_balanced_and_learnable():
  images, labels = data.make_synthetic(200, seed=0)
  again, _ = data.make_synthetic(200, seed=0)
  other, _ = data.make_synthetic(200, seed=1)
  assert images.shape == (200, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)
  np.testing.assert_array_equal(np.bincount(labels), [20] * 10)
  # Nearest class mean, fit on seed 0, classifies seed 1 almost perfectly.
  means = np.stack([images[labels == k].mean(0) for k in range(10)])
  test_images, test_labels = data.make_synthetic(100, seed=1)
  dists = ((test_images[:, None].astype(np.float32) - means) ** 2).sum(
      axis=(2, 3, 4))
  assert (dists.argmin(1) == test_labels).mean() > 0.95
  rgb, _ = data.make_synthetic(10, image_size=8, channels=3)
  assert rgb.shape == (10, 8, 8, 3)


def test_load_dataset_dispatches_on_config(tmp_path):
  config = ml_collections.ConfigDict(dict(
      name="synthetic", source="offline", data_dir=None, split="train",
      num_examples=30))
  images, labels = data.load_dataset(config)
  assert images.shape == (30, 28, 28, 1) and labels.shape == (30,)
  expected, _ = _write_mnist(tmp_path, "train", 4)
  config.name = "mnist"
  config.data_dir = str(tmp_path)
  images, _ = data.load_dataset(config)
  np.testing.assert_array_equal(images[..., 0], expected)
  config.name = "svhn"
  with pytest.raises(ValueError, match="synthetic"):
    data.load_dataset(config)


def test_holdout_is_a_fixed_disjoint_cover_of_the_training_split():
  train, val = data.holdout_indices(50, 12)
  assert len(val) == 12 and len(train) == 38
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
  again = data.holdout_indices(50, 12)  # the same images every time
  np.testing.assert_array_equal(again[1], val)
  assert not np.array_equal(val, np.arange(12))  # a permutation, not the first images
  for bad in (-1, 50):
    with pytest.raises(ValueError, match="data.holdout"):
      data.holdout_indices(50, bad)


def test_run_splits_hold_out_validation_images(tmp_path):
  images, labels = _write_mnist(tmp_path, "train", 40)
  test_images, _ = _write_mnist(tmp_path, "test", 9, seed=1)
  config = ml_collections.ConfigDict(dict(
      name="mnist", source="offline", data_dir=str(tmp_path), split="train",
      holdout=10))
  train, val = data.holdout_indices(40, 10)
  got, got_labels = data.load_dataset(config)
  np.testing.assert_array_equal(got[..., 0], images[train])
  np.testing.assert_array_equal(got_labels, labels[train])
  got, got_labels = data.load_dataset(config, "validation")
  np.testing.assert_array_equal(got[..., 0], images[val])
  np.testing.assert_array_equal(got_labels, labels[val])
  got, _ = data.load_dataset(config, "test")  # the test split is never cut
  np.testing.assert_array_equal(got[..., 0], test_images)
  del config.holdout  # a config from before data.holdout: the whole split
  np.testing.assert_array_equal(data.load_dataset(config)[0][..., 0], images)
  with pytest.raises(ValueError, match="--config.data.holdout=10000"):
    data.load_dataset(config, "validation")
  with pytest.raises(ValueError, match="split 'valid'"):
    data.load_run_split("mnist", "valid", "offline", str(tmp_path), 10)
  synthetic = ml_collections.ConfigDict(dict(name="synthetic", split="validation",
                                             num_examples=30, holdout=5))
  val_images, _ = data.load_dataset(synthetic)
  full, _ = data.make_synthetic(30, seed=0)
  np.testing.assert_array_equal(val_images, full[data.holdout_indices(30, 5)[1]])


def test_download_reachable_probes_the_host_unless_a_proxy_decides(monkeypatch):
  import socket
  for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
              "all_proxy"):
    monkeypatch.delenv(var, raising=False)
  hosts = []

  def refuse(address, timeout):
    hosts.append(address)
    raise OSError("unreachable")

  monkeypatch.setattr(socket, "create_connection", refuse)
  assert not data._download_reachable("cifar10")
  assert hosts == [("www.cs.toronto.edu", 443)]
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
  assert data._download_reachable("mnist") and len(hosts) == 1
