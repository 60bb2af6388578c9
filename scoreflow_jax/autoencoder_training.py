"""Training a small KL autoencoder to use as a first stage (train_autoencoder.py).

The loss is sgm's ``LPIPSWithDiscriminator`` without its perceptual and GAN
terms and with its learnt log-variance fixed at 0: per image, the L1
reconstruction error summed over pixels of a decode of a *posterior draw*,
plus ``kl_weight`` times KL(q(z|x) || N(0, I)) (Stable Diffusion's VAEs:
1e-6), averaged over the batch. Enough for MNIST; a VAE for natural images
needs the perceptual and adversarial terms (or released weights: the first
stage loads any sgm/ldm AutoencoderKL state dict).
"""
import contextlib
import hashlib
import json
import os
import shlex
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from scoreflow_jax.networks import autoencoder as ae
from scoreflow_jax.outputs import replaced_when_done
from scoreflow_jax.run_logging import format_duration, recording_signals


def loss_terms(module, params, x, key):
  """``(per-image L1 sum, per-image KL)`` of one batch, the decode of a draw."""
  mean, logvar = module.apply(params, x, method="moments")
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  rec = module.apply(params, z, method="decode")
  axes = tuple(range(1, x.ndim))
  return jnp.sum(jnp.abs(x - rec), axis=axes), ae.kl_divergence(mean, logvar)


class Stopped(Exception):
  """SIGTERM or SIGINT stopped ``train``; its state was saved to resume from."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.exit_code = 128 + signum


def _save_checkpoint(path, settings, step, params, opt_state, seconds):
  blob = serialization.msgpack_serialize({
      "settings": json.dumps(settings, sort_keys=True), "step": step,
      "seconds": seconds, "params": serialization.to_state_dict(jax.device_get(params)),
      "opt_state": serialization.to_state_dict(jax.device_get(opt_state))})
  with replaced_when_done(path) as f:
    f.write(blob)


# The settings' names in a refusal: what to pass to resume.
_SETTING_NAMES = {"network": "the network (ch, ch_mult, num_res_blocks, attn_resolutions, "
                             "embed_dim)", "images_sha256": "the training images"}


def _read_checkpoint(path, settings):
  """``(step, seconds, state)`` saved in ``path`` by a run with ``settings``;
  read and checked before anything is compiled, so a refusal comes at once."""
  try:
    with open(path, "rb") as f:
      saved = serialization.msgpack_restore(f.read())
    theirs = json.loads(saved["settings"])
    step, seconds = int(saved["step"]), float(saved["seconds"])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable train_autoencoder.py checkpoint "
                     f"({type(e).__name__}: {e}); {_start_over(path)}.") from None
  ours = json.loads(json.dumps(settings, sort_keys=True))
  if theirs != ours:
    differ = "; ".join(
        _SETTING_NAMES[k] if k in _SETTING_NAMES else
        f"{k} {theirs.get(k, '<missing>')!r} there, {ours.get(k, '<missing>')!r} here"
        for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
    raise ValueError(f"{path} is the checkpoint of a run with other settings ({differ}); "
                     f"rerun with its settings to resume it, or {_start_over(path)}.")
  return step, seconds, saved


def _start_over(path):
  return f"delete {path} to start over"


def _restore(path, saved, params_shape, opt_state_shape):
  """The saved params and optimizer state, checked against the shapes and
  dtypes of this network's (``jax.eval_shape`` trees: nothing is computed)."""
  try:
    params = serialization.from_state_dict(params_shape, saved["params"])
    opt_state = serialization.from_state_dict(opt_state_shape, saved["opt_state"])
    for name, restored in (("params", params), ("opt_state", opt_state)):
      # from_state_dict drops what the network lacks: told, not dropped
      if (jax.tree.structure(serialization.to_state_dict(restored))
          != jax.tree.structure(saved[name])):
        raise ValueError(f"its {name} hold arrays this network does not have")
    for want, got in zip(*(jax.tree.leaves(t) for t in ((params_shape, opt_state_shape),
                                                         (params, opt_state))),
                         strict=True):
      if (want.shape, want.dtype) != (np.shape(got), np.asarray(got).dtype):
        raise ValueError(f"an array of {np.shape(got)} {np.asarray(got).dtype} where "
                         f"the network has {want.shape} {want.dtype}")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} does not hold this network's state ({e}); "
                     f"{_start_over(path)}.") from None
  return params, opt_state


def train(module, images, steps: int, batch_size: int = 64, learning_rate: float = 1e-3,
          kl_weight: float = 1e-6, seed: int = 0, log=print, log_every: int = 100,
          checkpoint: str | None = None, checkpoint_every: int = 0,
          settings: dict | None = None):
  """Trains ``module`` on ``images`` (float NHWC in [-1, 1]); returns
  ``(params, seconds)``, seconds of training over every call that resumed it.

  Adam with a cosine decay to 1% of ``learning_rate``; batches are drawn from
  a fresh permutation each epoch of ``np.random.default_rng(seed)``. ``log``
  gets a line after the first (compiling) step and every ``log_every`` steps:
  steps/s from the second step on, seconds since the call (compilation
  included).

  With ``checkpoint`` (a file), the state is saved there every
  ``checkpoint_every`` steps (0: only at the end), after the last step, and
  when SIGTERM (a preemption, ``kill``) or SIGINT (Ctrl-C) stops training,
  which then raises ``Stopped``; every save is of finite losses and weights.
  A call that finds the file resumes from it: the same batches, keys and
  updates as a run never stopped. A file from a run with other settings (the
  arguments here, the network, the images and the caller's ``settings``) is
  refused, not replaced.
  """
  t0 = time.perf_counter()
  if steps < 1 or not 0 < batch_size <= len(images):
    raise ValueError(f"need steps >= 1 (got {steps}) and 0 < batch_size <= "
                     f"{len(images)} (got {batch_size})")
  if kl_weight < 0:
    raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
  if not (np.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate}")
  if checkpoint_every < 0:
    raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
  key = jax.random.key(seed)
  # init draws from fold_in(key, steps); step s from fold_in(key, s)
  init_args = (jax.random.fold_in(key, steps), images[:1])
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, 0.01))
  settings = dict(settings or {}, network=metadata(module, {})["ddconfig"], steps=steps,
                  batch_size=batch_size, learning_rate=learning_rate,
                  kl_weight=kl_weight, seed=seed, num_images=len(images),
                  image_shape=list(images.shape[1:]))
  start = saved = 0  # saved: the step of the last save
  before = 0.0  # seconds of the calls this one resumes
  if checkpoint and os.path.exists(checkpoint):
    # a resume replaces the initial weights: only their shapes are needed
    start, before, state = _read_checkpoint(checkpoint, settings)
    shapes = jax.eval_shape(module.init, *init_args)
    params, opt_state = _restore(checkpoint, state, shapes, jax.eval_shape(tx.init, shapes))
    saved = start
    log(f"resuming from {checkpoint}: step {start} of {steps}")
  else:
    params = jax.jit(module.init)(*init_args)
    opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, x, step):
    def loss_fn(p):
      rec, kl = loss_terms(module, p, x, jax.random.fold_in(key, step))
      return jnp.mean(rec + kl_weight * kl), (jnp.mean(rec), jnp.mean(kl))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # whether the new weights are finite, checked with the losses (per-leaf
    # checks outside the step compiled two small programs per leaf shape)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    return params, opt_state, (loss,) + aux, finite

  def check_finite(done):
    finite = all(np.isfinite(t[0]) for t in window) and bool(params_finite)
    if not finite:
      kept = (f"; {checkpoint} holds step {saved}, the last finite one, saved with this "
              "--learning_rate (delete it to start again with another)"
              if checkpoint and saved else "")
      raise FloatingPointError(f"non-finite autoencoder loss or weights by step {done}: "
                               f"training stopped{kept}; try a lower --learning_rate")

  def save(done):
    nonlocal saved
    check_finite(done)
    _save_checkpoint(checkpoint, settings, done, params, opt_state,
                     before + time.perf_counter() - t0)
    saved = done

  def stop(done):
    save(done)
    name = signal.Signals(received[0]).name
    log(f"{name} received: stopped at step {done} of {steps}; saved {checkpoint} "
        "(the same command resumes from it)")
    raise Stopped(f"{name}: training stopped at step {done} of {steps} and saved "
                  f"in {checkpoint}; run the same command to resume.", received[0])

  # epoch e (steps e * per_epoch ...) takes the e-th permutation of rng
  rng, epoch, per_epoch = np.random.default_rng(seed), -1, len(images) // batch_size
  window, first = [], None  # first: when the first (compiling) step ended
  params_finite = True  # of the weights now: those restored were saved finite
  received = []
  with recording_signals(received) if checkpoint else contextlib.nullcontext():
    for step in range(start, steps):
      if received:
        stop(step)
      while epoch < step // per_epoch:
        perm, epoch = rng.permutation(len(images)), epoch + 1
      pos = (step % per_epoch) * batch_size
      idx = np.sort(perm[pos:pos + batch_size])
      params, opt_state, terms, params_finite = step_fn(params, opt_state, images[idx],
                                                        step)
      if window:  # one step in flight: a stop is acted on within a step or two
        jax.block_until_ready(window[-1])
      window.append(terms)
      done = step + 1
      if step == start or done % log_every == 0 or done == steps:
        check_finite(done)
        loss, rec, kl = (float(np.mean([t[i] for t in window])) for i in range(3))
        now = time.perf_counter()
        if first is None:
          first, speed = now, "compiled"
        else:
          rate = (step - start) / max(now - first, 1e-9)
          speed = f"{rate:.2f} steps/s, ETA {format_duration((steps - done) / rate)}"
        log(f"step {done}/{steps}: loss {loss:.2f} (L1 sum {rec:.2f}, KL {kl:.1f} "
            f"per image) | {speed} | {now - t0:.0f} s")
        window = []
      if checkpoint and (done == steps or checkpoint_every and done % checkpoint_every == 0):
        save(done)
    if received:  # during the last step: saved above; the caller scores nothing
      stop(steps)
  return jax.device_get(params), before + time.perf_counter() - t0


def _reconstructions(module, params, images, batch_size):
  """Yields (x, posterior mean, decode of the mean clipped to [-1, 1]) per batch."""
  @jax.jit
  def run(x):
    mean, _ = module.apply(params, x, method="moments")
    return mean, jnp.clip(module.apply(params, mean, method="decode"), -1.0, 1.0)
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    yield (x, *(np.asarray(a) for a in run(x)))


def reconstruct(module, params, images, batch_size: int = 500):
  """Decodes of the posterior means of ``images`` ([-1, 1]), clipped to [-1, 1]."""
  return np.concatenate([rec for _, _, rec in
                         _reconstructions(module, params, images, batch_size)])


def load_trained(path: str):
  """``(module, params, results)`` of a file written by train_autoencoder.py,
  its architecture read from the ddconfig in the file's header."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no autoencoder weights at {path}; train_autoencoder.py "
                            "--out FILE.safetensors writes them.")
  meta = ae.safetensors_metadata(path) if path.endswith(".safetensors") else {}
  if "ddconfig" not in meta:
    raise ValueError(f"{path} has no ddconfig in its header (train_autoencoder.py "
                     "writes one), so its architecture is unknown; use a file written "
                     "by train_autoencoder.py.")
  ddconfig = {k: tuple(v) if isinstance(v, list) else v
              for k, v in json.loads(meta["ddconfig"]).items()}
  module = ae.AutoencoderKL(out_ch=ddconfig["in_channels"], **ddconfig)
  try:
    params = ae.params_from_state_dict(module, ae.load_state_dict(path))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return module, jax.tree.map(jnp.asarray, params), json.loads(meta.get("results", "{}"))


def evaluate(module, params, images, batch_size: int = 500, sigma_data: float = 0.5):
  """Reconstruction of the posterior means and the latents' statistics.

  Returns ``mae`` (mean absolute error per pixel, images in [-1, 1]),
  ``psnr`` (dB, of images mapped to [0, 1]), ``latent_mean`` and
  ``latent_std`` (of the means), and ``scale_factor`` = sigma_data /
  latent_std: latents shifted by ``latent_mean`` (``shift_factor``) and
  scaled have mean 0 and the std the denoiser's EDM preconditioning assumes
  (``model.sigma_data``, 0.5 in every config here), as EDM2 normalises
  Stable Diffusion's latents. (Stable Diffusion's own 0.18215 = 1 / std,
  unshifted, gives unit variance, for its eps-loss.)
  """
  means, abs_err, sq_err = [], 0.0, []
  for x, mean, rec in _reconstructions(module, params, images, batch_size):
    means.append(mean)
    abs_err += float(np.abs(rec - x).sum())
    sq_err.append(((rec - x) / 2.0) ** 2)
  means = np.concatenate(means)
  mse = np.concatenate(sq_err).reshape(len(images), -1).mean(axis=1)
  std = float(means.std())
  return {"mae": abs_err / images.size,
          "psnr": float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
          "latent_mean": float(means.mean()), "latent_std": std,
          "scale_factor": sigma_data / std}


def config_flags(module, scale_factor: float, path: str, shift_factor: float = 0.0) -> str:
  """The train.py flags that use the saved weights as the first stage."""
  fields = {"weights": shlex.quote(path), "scale_factor": f"{scale_factor:.5g}",
            "shift_factor": f"{shift_factor:.5g}",
            "in_channels": module.in_channels, "embed_dim": module.embed_dim,
            "z_channels": module.z_channels, "ch": module.ch,
            "ch_mult": "'(" + ",".join(str(m) for m in module.ch_mult) + ",)'",
            "num_res_blocks": module.num_res_blocks,
            "attn_resolutions": "'(" + "".join(f"{r}," for r in module.attn_resolutions) + ")'",
            "resolution": module.resolution}
  return " ".join(["--config.model.first_stage=kl_autoencoder"] + [
      f"--config.model.autoencoder.{k}={v}" for k, v in fields.items()])


def metadata(module, results: dict) -> dict:
  """The ddconfig and measured numbers, stored in the .safetensors header."""
  ddconfig = {"embed_dim": module.embed_dim, "ch": module.ch,
              "ch_mult": list(module.ch_mult), "num_res_blocks": module.num_res_blocks,
              "attn_resolutions": list(module.attn_resolutions),
              "resolution": module.resolution, "in_channels": module.in_channels,
              "z_channels": module.z_channels, "double_z": module.double_z}
  return {"ddconfig": json.dumps(ddconfig), "results": json.dumps(results)}


def train_and_save(module, data_dir, out, source="offline", dataset="mnist", steps=2000,
                   batch_size=64, learning_rate=1e-3, kl_weight=1e-6, seed=0,
                   holdout=0, overwrite=False, log=print, checkpoint_every=250):
  """Trains ``module`` on a data set's training split, scores it on the test
  split, writes ``out`` (.safetensors, sgm's names) and returns the results.

  An existing ``out`` is replaced only with ``overwrite`` (checked first).
  ``holdout`` leaves out the training images that runs with that
  ``data.holdout`` hold out, as train_classifier.py does. Training is saved
  to ``out + ".ckpt"`` every ``checkpoint_every`` steps (0: only at its end)
  and when SIGTERM or SIGINT stops it (``Stopped``); the same call resumes
  from that file, which is deleted once ``out`` is written.
  """
  from scoreflow_jax import data as data_lib
  from scoreflow_jax.outputs import check_output
  if not out.endswith(".safetensors"):
    raise ValueError(f"--out must be a .safetensors file, got {out}")
  out = check_output(out, overwrite, "--out")
  checkpoint = out + ".ckpt"
  if os.path.isdir(checkpoint):
    raise IsADirectoryError(f"{checkpoint} (where training is saved to resume) is a "
                            "folder; move it or choose another --out.")
  images, _ = data_lib.load_run_split(dataset, "train", source, data_dir, holdout)
  images_sha256 = hashlib.sha256(np.ascontiguousarray(images)).hexdigest()
  test_images, _ = data_lib.load_split(dataset, "test", source, data_dir)
  try:
    module.latent_shape(images.shape[1:])  # raises on images it cannot take
  except ValueError as e:
    raise ValueError(f"{e}: each of the {len(module.ch_mult)} levels of ch_mult but "
                     "the last halves the sides; use fewer levels.") from None
  to_float = lambda u8: u8.astype(np.float32) / 127.5 - 1.0
  images, test_images = to_float(images), to_float(test_images)
  log(f"{dataset}: {len(images):,} train, {len(test_images):,} test images; {steps} "
      f"steps of {batch_size}; latents {module.latent_shape(images.shape[1:])}")
  params, seconds = train(
      module, images, steps, batch_size, learning_rate, kl_weight, seed, log,
      checkpoint=checkpoint, checkpoint_every=checkpoint_every,
      settings={"dataset": dataset, "holdout": int(holdout),
                "images_sha256": images_sha256})
  log(f"scoring the reconstructions of the {len(test_images):,} test images")
  results = evaluate(module, params, test_images)
  results.update(dataset=dataset, steps=steps, batch_size=batch_size,
                 learning_rate=learning_rate, kl_weight=kl_weight, seed=seed,
                 holdout=int(holdout), train_seconds=round(seconds, 1))
  log(f"test reconstruction (posterior means): MAE {results['mae']:.4f}, PSNR "
      f"{results['psnr']:.2f} dB; latent std {results['latent_std']:.4f}")
  ae.save_safetensors(ae.state_dict_from_params(params), out, metadata(module, results))
  os.remove(checkpoint)
  log(f"wrote {out} ({seconds:.0f} s of training). Train on its latents with:\n  "
      + config_flags(module, results["scale_factor"], out, results["latent_mean"]))
  return results
