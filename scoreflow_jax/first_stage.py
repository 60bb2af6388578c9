"""First stages: the map between data and the space diffusion runs in.

Every first stage has sgm's ``encode``/``decode`` with its parameters passed
explicitly (``encode(params, x, keys=None)``, ``decode(params, z)``), its
frozen parameters in ``.params`` (None for the identity) and
``latent_shape(image_shape)``. The parameters are arguments of the jitted
train step and sampler rather than constants closed over: XLA would embed a
closed-over 80M-parameter VAE in the compiled program.
"""
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scoreflow_jax.data import to_model_images
from scoreflow_jax.outputs import file_sha256, replaced_when_done

FIRST_STAGES = ("identity", "kl_autoencoder")


class IdentityFirstStage:
  """sgm's IdentityFirstStage: diffusion runs on pixels (MNIST, CIFAR)."""
  params = None

  def encode(self, params, x, keys=None):
    del params, keys
    return x

  def decode(self, params, z):
    del params
    return z

  def latent_shape(self, image_shape):
    return tuple(image_shape)


class KLAutoencoderFirstStage:
  """sgm's ``AutoencoderKL`` as a frozen first stage of a ``DiffusionEngine``.

  ``encode`` is the engine's ``encode_first_stage``: ``scale_factor`` times a
  draw from the posterior N(mean, exp(logvar)) (sgm's
  ``DiagonalGaussianRegularizer(sample=True)``), one key per sample, or its
  mean when ``keys`` is None or ``sample`` is False. ``decode`` is
  ``decode_first_stage``: the decoder of ``z / scale_factor``.
  ``shift_factor`` (0 in sgm) is subtracted before the scaling and added back
  after it, as for SD3's and FLUX's VAEs: with the latents' mean there, the
  scaled latents are centred, as EDM's preconditioning assumes.
  """

  def __init__(self, module, params, scale_factor: float, sample: bool = True,
               sha256: str = "", shift_factor: float = 0.0):
    self.module, self.params = module, params
    self.scale_factor, self.sample, self.sha256 = scale_factor, sample, sha256
    self.shift_factor = shift_factor

  def moments(self, params, x):
    """The posterior's parameters for images ``x``: (B, h, w, 2 * embed_dim),
    the mean then the log-variance (clamped as sgm's), as sgm's ``moments``.

    The encoder is deterministic, so they can be computed once per image
    (``dataset_moments``) and drawn from in every step (``encode_moments``):
    the same latents' distribution as ``encode`` in every step, without the
    encoder's cost."""
    return jnp.concatenate(self.module.apply(params, x, method="moments"), axis=-1)

  def encode_moments(self, moments, keys=None):
    """``encode`` from ``moments(params, x)``: scale * (mean + std * noise - shift),
    noise from each sample's key (the mean when ``keys`` is None or
    ``sample`` is False)."""
    mean, logvar = jnp.split(jnp.asarray(moments), 2, axis=-1)
    z = mean
    if keys is not None and self.sample:
      noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
      z = mean + jnp.exp(0.5 * logvar) * noise
    return self.scale_factor * (z - self.shift_factor)

  def encode(self, params, x, keys=None):
    return self.encode_moments(self.moments(params, x), keys)

  def decode(self, params, z):
    return self.module.apply(params, z / self.scale_factor + self.shift_factor,
                             method="decode")

  def latent_shape(self, image_shape):
    return self.module.latent_shape(tuple(image_shape))


def dataset_moments(stage, images, chunk=None, log=None, log_every_s=10.0):
  """``stage.moments`` of every uint8 image, as float32 numpy (N, h, w, 2 * C).

  Runs in chunks of about ``chunk`` images split over this process's devices
  (every process encodes all of ``images``: each holds the whole data set);
  the last chunk is padded to the same shape, so there is one compilation.
  The default chunk holds about 2^20 pixels per device (at most 1,000
  images): 1,000 MNIST or CIFAR images, 16 at 256x256, so that the encoder's
  activations fit in an accelerator's memory. ``log`` gets a line with
  images/s and the ETA every ``log_every_s``.
  """
  images = np.asarray(images)
  n = len(images)
  if images.dtype != np.uint8 or images.ndim != 4 or not n:
    raise ValueError(f"dataset_moments takes uint8 images (N, H, W, C), got "
                     f"{images.dtype} {images.shape}")
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("data",))
  if chunk is None:
    chunk = len(devices) * max(1, min(1000, 2**20 // (images.shape[1] * images.shape[2])))
  chunk = math.ceil(min(chunk, n) / len(devices)) * len(devices)
  params = jax.device_put(stage.params, NamedSharding(mesh, P()))
  moments = jax.jit(stage.moments)
  sharding = NamedSharding(mesh, P("data"))
  out, t0, last_log = [], time.perf_counter(), time.perf_counter()
  for start in range(0, n, chunk):
    x = to_model_images(images[start:start + chunk])
    pad = chunk - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(moments(params, jax.device_put(x, sharding)))[:chunk - pad])
    done, now = start + chunk - pad, time.perf_counter()
    if log is not None and now - last_log >= log_every_s and done < n:
      rate = done / (now - t0)
      log(f"encoding the training set: {done:,}/{n:,} images | {rate:.0f} img/s | "
          f"ETA {(n - done) / rate:.0f} s")
      last_log = now
  return np.concatenate(out)


def _moments_signature(stage, images):
  images = np.ascontiguousarray(images)
  return {"autoencoder_sha256": stage.sha256,
          "images_sha256": hashlib.sha256(images.data).hexdigest(),
          "images_shape": list(images.shape)}


def read_stored_moments(stage, images, path, log=None):
  """The moments ``store_moments`` kept in ``path`` for these ``images`` and this
  autoencoder, or None (none there, other images or weights, unreadable).

  The sidecar ``path``.json records what they are the moments of: the
  autoencoder's sha256 and the sha256 of the images' bytes (their order and
  any holdout included); the array must have the recorded shape.
  """
  sidecar = path + ".json"
  if not os.path.exists(sidecar):
    return None
  try:
    with open(sidecar) as f:
      have = json.load(f)
    want = _moments_signature(stage, images)
    if not isinstance(have, dict) or {k: have.get(k) for k in want} != want:
      return None
    moments = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:  # unreadable or partly written files
    if log is not None:
      log(f"{path} could not be read back ({type(e).__name__}: {e}); encoding again")
    return None
  if list(moments.shape) != have.get("moments_shape") or moments.dtype != np.float32:
    return None
  return moments


def store_moments(stage, images, moments, path):
  """Keeps ``moments`` of ``images`` in ``path`` (.npy) and its sidecar .json,
  for ``read_stored_moments``. The old sidecar goes first and the new one comes
  last, each file replaced atomically: a stop in between leaves an array
  without a sidecar, which is encoded again, never one read as other images'.
  """
  sidecar = path + ".json"
  if os.path.exists(sidecar):
    os.remove(sidecar)
  with replaced_when_done(path) as f:
    np.save(f, np.asarray(moments, np.float32))
  with replaced_when_done(sidecar, "w") as f:
    json.dump(dict(_moments_signature(stage, images),
                   moments_shape=list(np.shape(moments))), f)


def build_autoencoder(a):
  """The Flax ``AutoencoderKL`` of ``config.model.autoencoder`` (no weights)."""
  from scoreflow_jax.networks.autoencoder import AutoencoderKL
  return AutoencoderKL(
      embed_dim=a.embed_dim, ch=a.ch, ch_mult=tuple(a.ch_mult),
      num_res_blocks=a.num_res_blocks, attn_resolutions=tuple(a.attn_resolutions),
      resolution=a.resolution, in_channels=a.in_channels, out_ch=a.in_channels,
      z_channels=a.z_channels, double_z=True)


def check_autoencoder_config(a):
  """Bad values of ``config.model.autoencoder``, named, before any loading."""
  if a.ch < 32 or a.ch % 32:
    raise ValueError(f"config.model.autoencoder.ch must be a multiple of 32 (sgm's "
                     f"GroupNorm has 32 groups), got {a.ch}")
  if not a.ch_mult or any(int(m) < 1 for m in a.ch_mult):
    raise ValueError("config.model.autoencoder.ch_mult must be a non-empty tuple of "
                     f"integers >= 1, got {tuple(a.ch_mult)}")
  if a.num_res_blocks < 1 or a.z_channels < 1 or a.embed_dim < 1 or a.in_channels < 1:
    raise ValueError("config.model.autoencoder.num_res_blocks, z_channels, embed_dim "
                     "and in_channels must be >= 1, got "
                     f"{a.num_res_blocks}, {a.z_channels}, {a.embed_dim}, {a.in_channels}")
  if not (math.isfinite(a.scale_factor) and a.scale_factor > 0):
    raise ValueError("config.model.autoencoder.scale_factor must be finite and > 0 "
                     "(SDXL's VAE: "
                     f"0.13025, SD 1.x/2.x: 0.18215), got {a.scale_factor}")
  if not math.isfinite(getattr(a, "shift_factor", 0.0)):
    raise ValueError("config.model.autoencoder.shift_factor must be finite (the "
                     f"latents' mean; 0: no shift, as sgm), got {a.shift_factor}")
  if not a.weights:
    raise ValueError("first_stage 'kl_autoencoder' needs its weights: set "
                     "--config.model.autoencoder.weights=/path/to/vae.safetensors (an "
                     "sgm/ldm AutoencoderKL state dict, .safetensors or .npz)")


def load_kl_autoencoder(a) -> KLAutoencoderFirstStage:
  """The KL first stage of ``config.model.autoencoder``, weights loaded and checked."""
  from scoreflow_jax.networks import autoencoder as ae
  check_autoencoder_config(a)
  path = os.path.expanduser(a.weights)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no autoencoder weights at {path} (config.model.autoencoder.weights); "
        "for a run trained with them, put the file (or a copy: the run checks its "
        "sha256, not its path) back there, or resume with train.py --workdir RUN "
        "--config.model.autoencoder.weights=NEW_PATH")
  sha256 = file_sha256(path)
  if a.sha256 and a.sha256 != sha256:
    raise ValueError(f"the autoencoder weights at {path} are not the ones this run "
                     f"was trained with: sha256 {sha256[:12]}..., the run's config "
                     f"says {a.sha256[:12]}...; point --config.model.autoencoder.weights "
                     "at the file the run used (a new run from this run's config with "
                     "other weights: also pass --config.model.autoencoder.sha256='')")
  module = build_autoencoder(a)
  try:
    params = ae.params_from_state_dict(module, ae.load_state_dict(path))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  params = jax.tree.map(jnp.asarray, params)
  return KLAutoencoderFirstStage(module, params, float(a.scale_factor),
                                 bool(a.sample_posterior), sha256,
                                 float(getattr(a, "shift_factor", 0.0)))


# Published scale factors (1 / the latents' std over their training images).
_UNIT_VARIANCE_SCALES = {0.13025: "SDXL's VAE", 0.18215: "Stable Diffusion 1.x/2.x's VAE"}


def autoencoder_warnings(model_config, data_config) -> list:
  """What a new latent run should be told about its autoencoder's file, from
  what train_autoencoder.py recorded in its header, and for a file that
  records nothing (e.g. an sgm state dict) from its published scale:

  * for a file that records no std: SDXL's or Stable Diffusion's published
    ``scale_factor`` (unit-variance latents) with model.sigma_data != 1;
  * ``model.autoencoder.scale_factor`` more than 2% off model.sigma_data / the
    latents' std measured there (the scaled latents would not have the std
    EDM's preconditioning assumes);
  * ``shift_factor`` leaving the scaled latents a mean beyond 0.2 sigma_data
    (measured since session 26);
  * an autoencoder trained on images this run holds out (``data.holdout`` >
    the file's ``holdout``) or on another data set.
  """
  from scoreflow_jax.networks import autoencoder as ae
  a = model_config.autoencoder
  path = os.path.expanduser(a.weights)
  recorded = {}
  if path.endswith(".safetensors"):
    try:
      recorded = json.loads(ae.safetensors_metadata(path).get("results", "{}"))
    except (OSError, ValueError):
      pass
  out = []
  std = recorded.get("latent_std")
  known = _UNIT_VARIANCE_SCALES.get(round(a.scale_factor, 5))
  if std is None and known and not math.isclose(model_config.sigma_data, 1.0):
    # an sgm/ldm file records no std: its published factor gives unit variance
    out.append(
        f"warning: model.autoencoder.scale_factor={a.scale_factor:.5g} is {known}'s, "
        "which scales its latents to unit variance, for model.sigma_data=1; this "
        f"model's sigma_data is {model_config.sigma_data:g}. Unless that is meant, "
        "pass --config.model.autoencoder.scale_factor="
        f"{a.scale_factor * model_config.sigma_data:.5g} (or --config.model.sigma_data=1 "
        "--config.loss.sigma_data=1).")
  if std and not math.isclose(a.scale_factor * std, model_config.sigma_data, rel_tol=0.02):
    want = model_config.sigma_data / std
    out.append(
        f"warning: model.autoencoder.scale_factor={a.scale_factor:.5g} scales the "
        f"latents of {path} (std {std:.4g}, measured when train_autoencoder.py wrote "
        f"it) to std {a.scale_factor * std:.3g}, not model.sigma_data="
        f"{model_config.sigma_data:g}, which EDM's preconditioning assumes. Unless "
        f"that is meant, pass --config.model.autoencoder.scale_factor={want:.5g}.")
  mean, shift = recorded.get("latent_mean"), getattr(a, "shift_factor", 0.0)
  if mean is not None and (abs(a.scale_factor * (mean - shift))
                           > 0.2 * model_config.sigma_data):
    out.append(
        f"warning: model.autoencoder.shift_factor={shift:.5g} leaves the scaled latents "
        f"of {path} (mean {mean:.4g}, measured when train_autoencoder.py wrote it) a "
        f"mean of {a.scale_factor * (mean - shift):.3g}, where EDM's preconditioning "
        "assumes centred data of std model.sigma_data="
        f"{model_config.sigma_data:g}. Unless that is meant, pass "
        f"--config.model.autoencoder.shift_factor={mean:.5g}.")
  holdout, trained_without = data_config.get("holdout", 0), recorded.get("holdout")
  if holdout and trained_without is not None and trained_without < holdout:
    out.append(
        f"warning: this run holds out data.holdout={holdout} training images to "
        f"validate on, but {path} was trained with holdout={trained_without}: it saw "
        "them, so validation scores through it are optimistic. Train the autoencoder "
        f"with train_autoencoder.py --holdout {holdout} for honest ones.")
  dataset = recorded.get("dataset")
  if dataset and dataset != data_config.name:
    out.append(f"warning: {path} was trained on {dataset}; this run's data is "
               f"{data_config.name}.")
  return out


def get_first_stage(model_config):
  """The first stage of ``config.model`` (``first_stage`` and ``autoencoder``)."""
  name = model_config.first_stage
  if name not in FIRST_STAGES:
    raise ValueError(f"unknown first stage {name!r}; choose one of {FIRST_STAGES} "
                     "(config.model.first_stage)")
  if name == "identity":
    return IdentityFirstStage()
  return load_kl_autoencoder(model_config.autoencoder)
