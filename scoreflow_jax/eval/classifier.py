"""A small MNIST CNN classifier: class accuracy of samples and features for FD.

conv(32) - pool - conv(64) - pool - conv(128) - dense(256) - dense(10), ReLU,
no batch norm (so evaluation has no state). Inputs are ``(B, H, W, C)`` in
[-1, 1], like the diffusion data; ``features`` is the 256-d penultimate layer.

A classifier file is one .npz: the parameters under ``params/<path>`` and a
JSON ``header`` (format, architecture version, test accuracy, ...). The
architecture's widths are read back from the parameter shapes.
"""
import functools
import json
import os
import time
import zipfile
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from scoreflow_jax.run_logging import format_duration

FORMAT = "scoreflow-jax classifier"
ARCH_VERSION = 1
MAKE_HINT = ("Make one with: python train_classifier.py"
             " --data_dir /path/to/mnist_idx --out {path}")


class Classifier(nn.Module):
  """conv(w0) - pool - conv(w1) - pool - conv(w2) - dense(hidden) - dense(classes).

  Pooling early keeps a step cheap on a CPU: about 9M multiply-adds per
  28x28 image, a third of what pooling after the second conv costs.
  """
  widths: Sequence[int] = (32, 64, 128)
  hidden: int = 256
  num_classes: int = 10
  dropout: float = 0.0

  def setup(self):
    self.conv0 = nn.Conv(self.widths[0], (3, 3))
    self.conv1 = nn.Conv(self.widths[1], (3, 3))
    self.conv2 = nn.Conv(self.widths[2], (3, 3))
    self.dense = nn.Dense(self.hidden)
    self.drop = nn.Dropout(self.dropout)
    self.logits = nn.Dense(self.num_classes)

  def features(self, x):
    """(B, H, W, C) in [-1, 1] -> (B, hidden) penultimate ReLU features."""
    x = nn.max_pool(nn.relu(self.conv0(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nn.relu(self.conv2(x))
    return nn.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, x, train: bool = False):
    """Returns logits (B, num_classes); dropout on the features when training."""
    return self.logits(self.drop(self.features(x), deterministic=not train))


def classifier_from_params(params, dropout: float = 0.0) -> Classifier:
  """The ``Classifier`` whose parameters have these shapes."""
  try:
    widths = tuple(int(params[f"conv{i}"]["kernel"].shape[-1]) for i in range(3))
    hidden = int(params["dense"]["kernel"].shape[-1])
    num_classes = int(params["logits"]["kernel"].shape[-1])
  except (KeyError, TypeError, IndexError, AttributeError) as e:
    raise ValueError(f"not Classifier parameters (missing {e}); expected keys"
                     " conv0, conv1, conv2, dense, logits.") from e
  return Classifier(widths, hidden, num_classes, dropout)


def check_input_shape(params, image_shape):
  """Raises ValueError unless images of ``(H, W, C)`` fit these parameters."""
  if len(image_shape) != 3:
    raise ValueError(f"images must be (N, H, W, C), got per-image shape"
                     f" {tuple(image_shape)}.")
  h, w, c = image_shape
  c_in = params["conv0"]["kernel"].shape[-2]
  flat = params["dense"]["kernel"].shape[0]
  width = params["conv2"]["kernel"].shape[-1]
  if c != c_in or (h // 4) * (w // 4) * width != flat:
    raise ValueError(f"images of shape {tuple(image_shape)} do not fit this"
                     f" classifier ({c_in} channels, {flat // width} pooled"
                     " pixels); it was trained on other data.")


@functools.lru_cache(maxsize=None)
def _apply_fns(model):
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
  features = jax.jit(
      lambda p, x: model.apply({"params": p}, x, method=Classifier.features))
  return logits, features


def to_inputs(images):
  """uint8 images -> float32 in [-1, 1]; float images are passed through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images.astype(np.float32)


def _batched(fn, params, images, batch_size):
  """Applies ``fn`` in fixed-size batches (last one padded: one compile)."""
  images = to_inputs(images)
  n = images.shape[0]
  batch_size = min(batch_size, n)
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                              chunk.dtype)])
    out.append(np.asarray(fn(params, chunk))[:batch_size - pad])
  return np.concatenate(out)


def predict_logits(params, images, batch_size=1000):
  """Returns float32 logits ``(N, num_classes)`` for uint8 or [-1, 1] images."""
  check_input_shape(params, np.shape(images)[1:])
  return _batched(_apply_fns(classifier_from_params(params))[0], params,
                  images, batch_size)


def extract_features(params, images, batch_size=1000):
  """Returns float32 penultimate features ``(N, hidden)``."""
  check_input_shape(params, np.shape(images)[1:])
  return _batched(_apply_fns(classifier_from_params(params))[1], params,
                  images, batch_size)


def accuracy(params, images, labels):
  """Fraction of ``images`` classified as ``labels``."""
  preds = predict_logits(params, images).argmax(-1)
  return float(np.mean(preds == np.asarray(labels)))


def random_shift(key, x, max_shift):
  """Shifts each image by up to ``max_shift`` pixels, filling with -1 (black)."""
  b, h, w, _ = x.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(x, pad, constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(
      img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(images, labels, test_images=None, test_labels=None,
                     steps=3000, batch_size=128, seed=0, log=print,
                     learning_rate=1e-3, widths=(32, 64, 128), hidden=256,
                     dropout=0.25, max_shift=2, log_every=500):
  """Trains a ``Classifier`` with Adam (cosine-decayed learning rate).

  ``images`` are uint8 or [-1, 1] ``(N, H, W, C)``; batches are drawn from a
  fresh permutation each epoch of ``np.random.default_rng(seed)``; each batch
  is shifted by up to ``max_shift`` pixels (0: no augmentation).
  The output has max(10, labels.max() + 1) classes. Returns
  ``(params, test_accuracy)`` (accuracy None without a test set).
  """
  images = to_inputs(images)
  labels = np.asarray(labels, np.int32)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"labels must have shape ({images.shape[0]},), got"
                     f" {labels.shape}.")
  if steps < 1 or not 0 < batch_size <= images.shape[0]:
    raise ValueError(f"need steps >= 1 (got {steps}) and 0 < batch_size <="
                     f" {images.shape[0]} (got {batch_size}).")
  num_classes = max(10, int(labels.max()) + 1)
  model = Classifier(tuple(widths), hidden, num_classes, dropout)
  key = jax.random.key(seed)
  params = jax.jit(model.init)(jax.random.fold_in(key, 0), images[:1])["params"]
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, 0.01))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y, step):
    k_shift, k_drop = jax.random.split(jax.random.fold_in(key, step))
    if max_shift:
      x = random_shift(k_shift, x, max_shift)

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True,
                           rngs={"dropout": k_drop})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  perm, pos = rng.permutation(images.shape[0]), 0
  t0, losses, first = time.perf_counter(), [], None  # first: when step 1 ended
  for step in range(steps):
    if pos + batch_size > perm.shape[0]:
      perm, pos = rng.permutation(images.shape[0]), 0
    idx = perm[pos:pos + batch_size]
    pos += batch_size
    params, opt_state, loss = train_step(params, opt_state, images[idx],
                                         labels[idx], step)
    losses.append(loss)
    if step == 0 or (step + 1) % log_every == 0 or step + 1 == steps:
      loss = float(np.mean(losses))  # waits for the step
      now = time.perf_counter()
      if first is None:  # the first line comes at once: the steps have begun
        first, speed = now, "compiled"
      else:  # the rate after the first (compiling) step
        rate = step / max(now - first, 1e-9)
        speed = (f"{rate:.1f} steps/s | ETA "
                 f"{format_duration((steps - step - 1) / rate)}")
      log(f"step {step + 1}/{steps}: loss {loss:.4f} | {speed} | {now - t0:.0f} s")
      losses = []
  params = jax.device_get(params)
  test_accuracy = None
  if test_images is not None:
    test_accuracy = accuracy(params, test_images, test_labels)
    log(f"test accuracy {test_accuracy:.4f} on {len(test_labels)} images")
  return params, test_accuracy


def save_classifier(params, path, **info):
  """Writes ``params`` and a header (format, version, ``info``) to one .npz.

  ``info`` holds JSON-serializable extras, e.g. ``test_accuracy=0.99``.
  """
  model = classifier_from_params(params)
  header = {"format": FORMAT, "arch_version": ARCH_VERSION,
            "widths": list(model.widths), "hidden": model.hidden,
            "num_classes": model.num_classes, **info}
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
  from scoreflow_jax.outputs import replaced_when_done  # pylint: disable=g-import-not-at-top
  with replaced_when_done(path) as f:  # a file object: np.savez adds no suffix
    np.savez(f, header=np.array(json.dumps(header)), **arrays)


def file_sha256(path, digits=16):
  """The first ``digits`` hex digits of the sha256 of the file's bytes: which
  classifier scored a result, whatever its path."""
  from scoreflow_jax.outputs import file_sha256 as sha256  # pylint: disable=g-import-not-at-top
  return sha256(path)[:digits]


def load_classifier(path):
  """Returns ``(params, header)`` from a file written by ``save_classifier``."""
  path = os.fspath(path)
  # another kind of file is there: a classifier goes to a file of its own
  hint = MAKE_HINT.format(path="classifier.npz")
  if os.path.isdir(path):
    raise IsADirectoryError(f"classifier file {path} is a folder: give the .npz file"
                            f" train_classifier.py wrote. {hint}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"classifier file {path} not found. "
                            + MAKE_HINT.format(path=path))
  if not zipfile.is_zipfile(path):  # else np.load takes it for a pickle
    raise ValueError(f"{path} is not a classifier file (not an .npz archive). {hint}")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays.pop("header")))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a classifier file ({e!r}). {hint}") from e
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise ValueError(f"{path} is not a classifier file (header {header!r}"
                     f" lacks format {FORMAT!r}). {hint}")
  if header.get("arch_version") != ARCH_VERSION:
    raise ValueError(f"{path} holds classifier architecture version"
                     f" {header.get('arch_version')}, this code reads version"
                     f" {ARCH_VERSION}. Retrain it: {hint}")
  flat = {k[len("params/"):]: v for k, v in arrays.items()
          if k.startswith("params/")}
  params = traverse_util.unflatten_dict(flat, sep="/")
  try:
    model = classifier_from_params(params)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0),
        jnp.zeros((1, 28, 28, params["conv0"]["kernel"].shape[-2])))
    expected = jax.tree.map(lambda s: s.shape, shapes["params"])
    del expected["dense"]["kernel"]  # its size depends on the image size
    for name, leaves in expected.items():
      for leaf, shape in leaves.items():
        if params[name][leaf].shape != shape:
          raise ValueError(f"{name}/{leaf} has shape"
                           f" {params[name][leaf].shape}, expected {shape}")
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path}: parameters do not match the classifier"
                     f" architecture ({e}). {hint}") from e
  return params, header


def train_and_save(data_dir, out, source="offline", steps=3000, batch_size=128,
                   seed=0, log=print, holdout=0, overwrite=False):
  """Trains on MNIST train, tests on MNIST test, writes ``out``; returns accuracy.

  ``source="offline"`` reads the IDX files in ``data_dir`` (no network).
  ``holdout`` > 0 leaves out the training images runs with that
  ``data.holdout`` hold out (``data.holdout_indices``), so that their
  validation split is new to the classifier as well; it is kept in the header.
  An existing ``out`` is replaced only with ``overwrite`` (checked before the
  training).
  """
  from scoreflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from scoreflow_jax.outputs import check_output  # pylint: disable=g-import-not-at-top
  out = check_output(out, overwrite, "--out")
  images, labels = data_lib.load_run_split("mnist", "train", source, data_dir,
                                           holdout)
  test_images, test_labels = data_lib.load_split("mnist", "test", source,
                                                 data_dir)
  log(f"MNIST: {len(labels)} train, {len(test_labels)} test images;"
      f" {steps} steps of {batch_size}")
  t0 = time.perf_counter()
  params, test_accuracy = train_classifier(
      images, labels, test_images, test_labels, steps=steps,
      batch_size=batch_size, seed=seed, log=log)
  seconds = time.perf_counter() - t0
  save_classifier(params, out, test_accuracy=test_accuracy, dataset="mnist",
                  image_shape=list(images.shape[1:]), steps=steps,
                  batch_size=batch_size, seed=seed, train_seconds=seconds,
                  holdout=int(holdout))
  log(f"wrote {out} (test accuracy {test_accuracy:.4f}, {seconds:.0f} s)")
  return test_accuracy
