"""Training data: whole splits in memory and one deterministic batch iterator.

A source (``load_split``) returns a split as uint8 images ``(N, H, W, C)`` and
int32 labels ``(N,)``. ``BatchIterator`` turns them into model batches
``{"jpg": float32 (B, H, W, C) in [-1, 1], "cls": int32 (B,)}``; the global
batch of step t depends only on (seed, t, global_batch_size), so a resumed run
sees exactly the batches an uninterrupted one would.

TensorFlow is imported only by the "tfds" source, so the rest of this module
works where it is not installed.
"""
import gzip
import os
import pickle
import queue
import threading
import zlib

import numpy as np

DATASETS = ("mnist", "cifar10")
SPLITS = ("train", "test")
# What a run trains on or is evaluated against: "train" is the training split
# less the images held out by ``data.holdout``, "validation" those images.
RUN_SPLITS = ("train", "validation", "test")
HOLDOUT_SEED = 0  # one fixed choice of held-out images for every run
SOURCES = ("tfds", "offline")

IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
NUM_CLASSES = {"mnist": 10, "cifar10": 10}

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_HELP = (
    "source='offline' expects MNIST's four IDX files"
    " train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
    " t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same"
    " names without .gz) in {dir}. Download them into {dir} (e.g. from"
    " https://ossci-datasets.s3.amazonaws.com/mnist/), or use"
    " --config.data.source=tfds.")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_HELP = (
    "source='offline' expects the CIFAR-10 python batches data_batch_1 ..."
    " data_batch_5 and test_batch in {dir} or {dir}/" + _CIFAR_DIR + "."
    " Extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into"
    " {dir}, or use --config.data.source=tfds.")
_OFFLINE_HINT = {
    "mnist": ("--config.data.source=offline"
              " --config.data.data_dir=/path/to/mnist_idx_dir"),
    "cifar10": ("--config.data.source=offline"
                " --config.data.data_dir=/path/to/cifar-10-batches-py"),
}

# TFDS examples are read in chunks of this many and concatenated; see
# `_load_tfds` for why not `batch_size=-1`.
_TFDS_CHUNK = 10_000


def _check_choice(what, value, choices):
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; choose one of {choices}.")


def load_split(name, split, source, data_dir=None):
  """Loads a whole split into memory.

  Returns ``(images, labels)``: uint8 ``(N, H, W, C)`` and int32 ``(N,)``.
  ``source="offline"`` reads the original files from ``data_dir``;
  ``source="tfds"`` uses TensorFlow Datasets (``data_dir`` is its cache dir).
  """
  _check_choice("dataset", name, DATASETS)
  _check_choice("split", split, SPLITS)
  _check_choice("source", source, SOURCES)
  if source == "tfds":
    images, labels = _load_tfds(name, split, data_dir)
  elif name == "mnist":
    images, labels = _load_mnist_offline(_offline_dir(name, data_dir), split)
  else:
    images, labels = _load_cifar10_offline(_offline_dir(name, data_dir), split)
  return _checked(name, split, source, images, labels)


def _checked(name, split, source, images, labels):
  """Validates shapes, dtype and label range; returns labels as int32."""
  where = f"{name}/{split} from source={source!r}"
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPES[name]:
    raise ValueError(f"{where}: images must be uint8 (N, H, W, C) with"
                     f" (H, W, C) = {IMAGE_SHAPES[name]}, got {images.dtype}"
                     f" {images.shape}.")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{where}: labels must have shape ({images.shape[0]},),"
                     f" got {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES[name]):
    raise ValueError(f"{where}: labels must lie in [0, {NUM_CLASSES[name]}),"
                     f" got [{labels.min()}, {labels.max()}].")
  return images, labels.astype(np.int32)


def _offline_dir(name, data_dir):
  help_text = _MNIST_HELP if name == "mnist" else _CIFAR_HELP
  if data_dir is None:
    raise ValueError("source='offline' needs config.data.data_dir. "
                     + help_text.format(dir="that directory"))
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"Data directory {data_dir} does not exist. "
                            + help_text.format(dir=data_dir))
  return data_dir


def _load_mnist_offline(data_dir, split):
  images_name, labels_name = _MNIST_FILES[split]
  images = _read_idx(_find_idx(data_dir, images_name), IDX_IMAGES_MAGIC)
  labels = _read_idx(_find_idx(data_dir, labels_name), IDX_LABELS_MAGIC)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
        f"MNIST {split} in {data_dir}: {images.shape[0]} images but"
        f" {labels.shape[0]} labels.")
  return images[..., None], labels


def _find_idx(data_dir, stem):
  for path in (os.path.join(data_dir, stem + ".gz"),
               os.path.join(data_dir, stem)):
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"MNIST file {os.path.join(data_dir, stem)}.gz (or without .gz) not"
      " found. " + _MNIST_HELP.format(dir=data_dir))


def _read_idx(path, magic):
  """Reads an IDX file of unsigned bytes (gzipped if ``path`` ends in .gz).

  ``magic`` is 2051 for image files (3 dims) and 2049 for label files (1 dim);
  the dims that follow it are big-endian uint32. Returns a uint8 array.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: cannot read file ({e}); it is corrupt or"
                     " truncated, download it again.") from e
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes,"
                     f" need {header}); download it again.")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: IDX magic number is {found}, expected {magic};"
                     " wrong or corrupt file.")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  size = int(np.prod(dims))
  if len(data) != header + size:
    raise ValueError(f"{path}: IDX dims {dims} need {header + size} bytes,"
                     f" file has {len(data)}; truncated or corrupt, download"
                     " it again.")
  return np.frombuffer(data, np.uint8, size, header).reshape(dims).copy()


def _load_cifar10_offline(data_dir, split):
  names = _CIFAR_FILES[split]
  root = data_dir
  nested = os.path.join(data_dir, _CIFAR_DIR)
  if not os.path.isfile(os.path.join(root, names[0])) and os.path.isdir(nested):
    root = nested
  batches = []
  for name in names:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"CIFAR-10 file {path} not found. "
                              + _CIFAR_HELP.format(dir=data_dir))
    batches.append(_read_cifar_batch(path))
  images, labels = zip(*batches)
  return np.concatenate(images), np.concatenate(labels)


def _read_cifar_batch(path):
  """Reads one pickled CIFAR-10 python batch; rows are CHW, returned HWC."""
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"])
    labels = np.asarray(
        batch[b"labels"] if b"labels" in batch else batch["labels"])
  except Exception as e:
    raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({e!r});"
                     " download it again.") from e
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got"
                     f" {data.dtype} {data.shape}.")
  if labels.shape != (data.shape[0],):
    raise ValueError(f"{path}: {data.shape[0]} images but labels of shape"
                     f" {labels.shape}.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def _holds_offline_files(name, data_dir):
  """Whether ``data_dir`` holds the files source='offline' reads."""
  if name == "mnist":
    stems = [stem for pair in _MNIST_FILES.values() for stem in pair]
    return any(os.path.isfile(os.path.join(data_dir, s + ext))
               for s in stems for ext in ("", ".gz"))
  return any(os.path.isfile(os.path.join(d, "test_batch"))
             for d in (data_dir, os.path.join(data_dir, _CIFAR_DIR)))


# Where TFDS downloads each dataset from (its mnist.py and cifar.py).
_DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu"}


def _download_reachable(name, timeout=5.0):
  """Whether TFDS could download ``name``: a TCP connection to its host (a
  proxy in the environment: assumed yes, the proxy decides)."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                     "http_proxy", "ALL_PROXY", "all_proxy")):
    return True
  import socket  # pylint: disable=g-import-not-at-top
  try:
    socket.create_connection((_DOWNLOAD_HOSTS[name], 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _load_tfds(name, split, data_dir):
  """Loads a split with TFDS, on the CPU only.

  Reads in chunks rather than with ``batch_size=-1``: the latter sizes its
  single batch from the dataset metadata, and where that lacks split sizes
  (e.g. under ``tfds.testing.mock_data``) TensorFlow aborts the process.
  """
  hint = f"To read local files instead use {_OFFLINE_HINT[name]}."
  if data_dir is not None and _holds_offline_files(name, os.path.expanduser(data_dir)):
    # TFDS would treat the folder as its cache and (re)try a download into it.
    raise ValueError(
        f"data_dir {data_dir} holds {name}'s original files, which source='tfds' "
        f"does not read (it would try to download {name} into that folder). Read "
        f"them with source='offline': {_OFFLINE_HINT[name]}.")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "source='tfds' needs tensorflow and tensorflow-datasets (pip install"
        f" 'scoreflow-jax[tfds]'). {hint}") from e
  # TF must not take GPU memory that JAX needs; this fails once TF has
  # already initialized its devices, which then stay as they were.
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = True  # let tfds.load say what is wrong
  if not prepared and not _download_reachable(name):
    # tfds.load would retry the download for minutes before failing
    raise RuntimeError(
        f"TFDS has no prepared {name} (data_dir {data_dir or 'default'}) and cannot "
        f"reach {_DOWNLOAD_HOSTS[name]} to download it. {hint}")
  try:
    ds = tfds.load(name, split=split, as_supervised=True, shuffle_files=False,
                   data_dir=data_dir)
    chunks = list(tfds.as_numpy(ds.batch(_TFDS_CHUNK)))
  except Exception as e:
    raise RuntimeError(
        f"TFDS could not load {name}/{split} (no internet to download it?):"
        f" {e!r}. {hint}") from e
  if not chunks:
    raise ValueError(f"TFDS returned no examples for {name}/{split}.")
  images, labels = zip(*chunks)
  return np.concatenate(images), np.concatenate(labels)


def to_model_images(images):
  """uint8 images -> float32 ``images / 127.5 - 1``, in [-1, 1]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}.")
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_model_batch(images, labels):
  """Returns ``{"jpg": images / 127.5 - 1 as float32, "cls": int32 labels}``."""
  return {"jpg": to_model_images(images), "cls": np.asarray(labels, np.int32)}


def to_moments_batch(moments, labels):
  """Returns ``{"moments": float32 moments, "cls": int32 labels}``: a batch of a
  KL first stage's posterior parameters (``first_stage.dataset_moments``)
  instead of images; the train step draws the latents from them."""
  return {"moments": np.asarray(moments, np.float32), "cls": np.asarray(labels, np.int32)}


class BatchIterator:
  """Endless, resumable iterator over this process's share of global batches.

  Epoch e uses the permutation ``np.random.default_rng([seed, e])
  .permutation(N)``; the global batch of step t is slice
  ``t % steps_per_epoch`` of epoch ``t // steps_per_epoch``, and process p
  gets its rows ``[p * local_batch_size, (p + 1) * local_batch_size)``.
  With ``drop_remainder=True`` the last ``N % global_batch_size`` examples of
  each permutation are skipped; with False the last batch is filled up from
  the start of the same permutation, so every example is seen each epoch.

  ``step`` is the next step ``next()`` returns; store it in the checkpoint and
  pass it back as ``start_step``. ``prefetch`` batches are prepared ahead in a
  daemon thread (0: none); ``close()`` stops it. ``make_batch(rows, labels)``
  makes a batch of the selected rows: ``to_model_batch`` for uint8 images,
  ``to_moments_batch`` for a KL first stage's cached moments.
  """

  def __init__(self, images, labels, global_batch_size, seed,
               process_index=0, process_count=1, start_step=0,
               drop_remainder=True, prefetch=2, make_batch=to_model_batch):
    images = np.asarray(images)
    labels = np.asarray(labels)
    num_examples = images.shape[0]
    if labels.shape != (num_examples,):
      raise ValueError(f"labels must have shape ({num_examples},), got"
                       f" {labels.shape}.")
    if not 0 < global_batch_size <= num_examples:
      raise ValueError(f"global_batch_size={global_batch_size} must be in"
                       f" [1, {num_examples}] (the number of examples).")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"Need 0 <= process_index={process_index} <"
                       f" process_count={process_count}.")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible"
                       f" by process_count={process_count}.")
    if start_step < 0 or prefetch < 0:
      raise ValueError(f"start_step={start_step} and prefetch={prefetch} must"
                       " be >= 0.")
    self.images = images
    self.labels = labels
    self.make_batch = make_batch
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    if drop_remainder:
      self.steps_per_epoch = num_examples // global_batch_size
    else:
      self.steps_per_epoch = -(-num_examples // global_batch_size)
    self.step = start_step
    self._prefetch = prefetch
    self._perm_cache = (None, None)
    self._lock = threading.Lock()
    self._thread = None
    self._queue = None
    self._stop = threading.Event()
    self._closed = False

  def _permutation(self, epoch):
    with self._lock:
      cached_epoch, perm = self._perm_cache
      if cached_epoch != epoch:
        perm = np.random.default_rng([self.seed, epoch]).permutation(
            self.images.shape[0])
        self._perm_cache = (epoch, perm)
      return perm

  def global_indices(self, step):
    """Returns the example indices of the global batch of ``step``."""
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = self._permutation(epoch)
    start = i * self.global_batch_size
    idx = np.arange(start, start + self.global_batch_size)
    return perm[idx % perm.shape[0]]

  def local_indices(self, step):
    """Returns this process's rows of ``global_indices(step)``."""
    start = self.process_index * self.local_batch_size
    return self.global_indices(step)[start:start + self.local_batch_size]

  def get_global_batch(self, step):
    """Returns the model batch of all processes for ``step``."""
    idx = self.global_indices(step)
    return self.make_batch(self.images[idx], self.labels[idx])

  def get_local_batch(self, step):
    """Returns this process's model batch for ``step``."""
    idx = self.local_indices(step)
    return self.make_batch(self.images[idx], self.labels[idx])

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    if not self._prefetch:
      batch = self.get_local_batch(self.step)
    else:
      if self._thread is None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(
            target=self._produce, args=(self.step,), daemon=True,
            name="BatchIterator-prefetch")
        self._thread.start()
      step, batch = self._get()
      assert step == self.step, (step, self.step)
    self.step += 1
    return batch

  def _get(self):
    while True:
      try:
        item = self._queue.get(timeout=1.0)
      except queue.Empty:
        if not self._thread.is_alive():
          raise RuntimeError("BatchIterator prefetch thread died.") from None
        continue
      if isinstance(item, BaseException):
        raise RuntimeError("BatchIterator prefetch thread failed.") from item
      return item

  def _produce(self, step):
    try:
      while not self._stop.is_set():
        self._put((step, self.get_local_batch(step)))
        step += 1
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def close(self):
    """Stops the prefetch thread; later ``next()`` raises StopIteration."""
    self._closed = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_synthetic(n, image_size=28, channels=1, num_classes=10, seed=0):
  """Returns a small synthetic data set: uint8 ``(n, S, S, C)``, int32 ``(n,)``.

  Not real data; for tests and smoke runs. Class k is a sinusoidal grating
  with orientation pi * k / num_classes and a class-dependent frequency and
  (for C > 1) colour, plus Gaussian pixel noise of std 16. The class patterns
  do not depend on ``seed``; the seed picks labels (balanced) and noise.
  """
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  k = np.arange(num_classes)[:, None, None]
  angle = np.pi * k / num_classes
  freq = 2 * np.pi * (1.5 + (k % 3)) / image_size
  yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size),
                       indexing="ij")
  grating = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
  colour = 0.5 + 0.5 * np.cos(2 * np.pi * (k[..., None] / num_classes
                                            + np.arange(channels) / channels))
  if channels == 1:
    colour = np.ones_like(colour)
  templates = (127.5 + 100.0 * grating[..., None] * colour).astype(np.float32)
  noise = 16.0 * rng.standard_normal((n, image_size, image_size, channels),
                                     np.float32)
  images = np.clip(np.rint(templates[labels] + noise), 0, 255)
  return images.astype(np.uint8), labels


def image_shape(config_data):
  """(H, W, C) of the data set named by ``config.data``."""
  if config_data.name == "synthetic":
    return (config_data.image_size, config_data.image_size, config_data.channels)
  _check_choice("dataset", config_data.name, DATASETS + ("synthetic",))
  return IMAGE_SHAPES[config_data.name]


def holdout_indices(num_images, holdout):
  """Indices ``(train, validation)`` of a training split of ``num_images``.

  The validation part is ``holdout`` images picked by a permutation with the
  fixed seed ``HOLDOUT_SEED``, so every run (and every evaluation) with the same
  ``holdout`` holds out the same images; both index arrays are sorted.
  """
  holdout = int(holdout)
  if not 0 <= holdout < num_images:
    raise ValueError(f"data.holdout={holdout} must be in [0, {num_images}) for a "
                     f"training split of {num_images} images (e.g. 10000 for "
                     "MNIST: train on 50,000, validate on 10,000).")
  perm = np.random.default_rng(HOLDOUT_SEED).permutation(num_images)
  return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def load_run_split(name, split, source, data_dir=None, holdout=0):
  """Loads a split as a run sees it (``RUN_SPLITS``).

  "test" is the test split; "train" the training split less ``holdout`` images
  (all of it when ``holdout`` is 0); "validation" the ``holdout`` images held
  out (``holdout_indices``), which needs ``holdout`` > 0.
  """
  _check_run_split(split, holdout)
  images, labels = load_split(name, "test" if split == "test" else "train",
                              source, data_dir)
  return _held_out(images, labels, split, holdout)


def _check_run_split(split, holdout):
  _check_choice("split", split, RUN_SPLITS)
  if split == "validation" and not holdout:
    raise ValueError(
        "split 'validation' is the part of the training split a run holds out"
        " (data.holdout), but holdout is 0: train with --config.data.holdout=10000"
        " (MNIST: train on 50,000 images, validate on the other 10,000).")


def _held_out(images, labels, split, holdout):
  """The run's ``split`` of a whole training (or test) split's arrays."""
  if split == "test" or not holdout:
    return images, labels
  train_idx, val_idx = holdout_indices(len(images), holdout)
  idx = val_idx if split == "validation" else train_idx
  return images[idx], labels[idx]


def load_dataset(config_data, split=None):
  """Loads the split named by ``config.data`` (or ``split``, one of ``RUN_SPLITS``).

  Reads ``name`` ("mnist" | "cifar10" | "synthetic"), ``split``, ``holdout``
  (training images held out for validation; absent in older configs: 0), and
  ``source`` and ``data_dir`` for real data or ``num_examples`` for synthetic
  data (``image_size`` x ``image_size`` x ``channels`` when the config has
  them, else 28x28x1; 10 classes; the test split uses another seed).
  """
  name = config_data.name
  split = config_data.split if split is None else split
  holdout = int(config_data.get("holdout", 0))
  _check_choice("dataset", name, DATASETS + ("synthetic",))
  if name != "synthetic":
    return load_run_split(name, split, config_data.source, config_data.data_dir,
                          holdout)
  _check_run_split(split, holdout)
  images, labels = make_synthetic(config_data.num_examples,
                                  image_size=config_data.get("image_size", 28),
                                  channels=config_data.get("channels", 1),
                                  seed=1 if split == "test" else 0)
  return _held_out(images, labels, split, holdout)
