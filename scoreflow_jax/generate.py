"""Class-conditional generation with any sampler and optional CFG, plus image grids."""
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scoreflow_jax import guiders, outputs, run_config, samplers
from scoreflow_jax.train_step import AXIS


def effective_batch_size(batch_size: int, n: int) -> int:
  """The batches ``generate_images`` draws the noise of ``n`` images in:
  ``batch_size`` at most ``n``, whatever the device count (each sampler call
  is padded to a multiple of the devices; the padding's rows are dropped)."""
  return min(batch_size, n)


def padded_size(batch: int, n_devices: int) -> int:
  """``batch`` rounded up to a multiple of ``n_devices``: a sampler call's rows."""
  return -(-batch // n_devices) * n_devices


NO_SCORE_SCALE = (1.0, ())


def resolve_score_scale(sampling_config, score_scale=None):
  """The score scale to sample with, as ``(scale, (lo, hi))``, or
  ``NO_SCORE_SCALE``: ``score_scale`` when given, else the config's
  ``sampling.score_scale`` on ``sampling.score_scale_interval`` (1 in every
  config here). A scale of 1 is none, whatever its interval; otherwise the
  interval is checked (``guiders.score_scale``'s errors)."""
  if score_scale is None:
    score_scale = (sampling_config.get("score_scale", 1.0),
                   sampling_config.get("score_scale_interval", None))
  scale, interval = score_scale
  if float(scale) == 1.0:
    return NO_SCORE_SCALE
  guiders.score_scale(None, scale, interval)
  return float(scale), tuple(float(v) for v in interval)


def make_sampler_fn(model, sampling_config, cfg_scale: Optional[float] = None,
                    mesh=None, cfg_interval=None, low_noise=None, score_scale=None,
                    **sampler_options):
  """Returns jitted ``fn(params, labels (B,), key) -> images (B, H, W, C)``.

  CFG (scale != 1) makes one denoiser call on the doubled batch per step with
  zeroed class embeddings as the unconditional half (sgm's MNIST sampling);
  ``cfg_interval=(lo, hi)`` guides only where lo < sigma <= hi (elsewhere one
  call on the batch, not the doubled one).
  ``low_noise=(model_b, params_b, sigma_switch)``: model_b's denoiser (its
  own conditioning, the same guidance) at sigma <= sigma_switch, this
  model's above (``guiders.switch``); both must denoise in the same space.
  ``score_scale=(scale, (lo, hi))``: the (guided, switched) denoiser's score
  times ``scale`` where lo < sigma <= hi (``guiders.score_scale``); None: the
  config's ``sampling.score_scale`` (``resolve_score_scale``; scale 1: none).
  With a ``mesh``, the batch is split over its devices (B must divide).
  """
  sc = sampling_config
  scale = sc.cfg_scale if cfg_scale is None else cfg_scale
  sampler = samplers.get_sampler(sc.sampler)
  score_scale = resolve_score_scale(sc, score_scale)  # its errors before tracing

  def closed(m, params, batch):
    cond, uncond = m.unconditional(params, batch)
    den = m.denoiser(params)
    guided = (guiders.identity_guider(den) if scale == 1.0
              else guiders.vanilla_cfg(den, scale, cfg_interval))
    return guiders.close_over(guided, cond, uncond)

  def generate(params, first_stage_params, labels, z, key_data, low_params):
    key = jax.random.wrap_key_data(key_data)
    batch = {"cls": labels}
    den = closed(model, params, batch)
    if low_noise is not None:
      den = guiders.switch(den, closed(low_noise[0], low_params, batch), low_noise[2])
    if score_scale != NO_SCORE_SCALE:  # scale 1 adds no op: the images stay bit-exact
      den = guiders.score_scale(den, *score_scale)
    x = sampler(den, z, num_steps=sc.num_steps, sigma_min=sc.sigma_min,
                sigma_max=sc.sigma_max, rho=sc.rho, key=key, **sampler_options)
    return model.first_stage.decode(first_stage_params, x)

  if mesh is None:
    jitted = jax.jit(generate)
    place = lambda x, spec: x
  else:
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    jitted = jax.jit(generate, in_shardings=(rep, rep, shard, shard, rep, rep),
                     out_shardings=shard)

    def place(x, spec):
      # Every process holds the whole host array; each device takes its slice
      # (works with one process or several).
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                          lambda idx: x[idx])

  # The first stage's frozen weights are an argument of the sampler, placed once.
  fs_params = model.first_stage.params
  low_params = None if low_noise is None else low_noise[1]
  if mesh is not None:
    from scoreflow_jax.train_step import replicate
    if fs_params is not None:
      fs_params = replicate(fs_params, mesh)
    if low_params is not None:
      low_params = replicate(low_params, mesh)

  def fn(params, labels, key, image_shape):
    k_z, k_s = jax.random.split(key)
    shape = model.first_stage.latent_shape(image_shape)
    z = np.asarray(jax.random.normal(k_z, (len(labels),) + tuple(shape), jnp.float32))
    out = jitted(params, fs_params, place(np.asarray(labels, np.int32), P(AXIS)),
                 place(z, P(AXIS)), place(jax.random.key_data(k_s), P()), low_params)
    if not out.is_fully_addressable:
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    return out

  return fn


def generate_images(model, params, sampling_config, labels: Sequence[int], key,
                    image_shape, batch_size: int = 256, cfg_scale=None, mesh=None,
                    progress=None, cfg_interval=None, sampler_fn=None, low_noise=None,
                    score_scale=None, **sampler_options):
  """Generates one image per label in batches; returns numpy (N, H, W, C) in [-1, 1].

  Batches of ``min(batch_size, N)`` labels, batch b with fold_in(key, b),
  each padded to a fixed size (a multiple of the device count) so that the
  sampler compiles once: the images do not depend on the device count (the
  padding adds rows after a batch's own, whose noise is unchanged by them
  under JAX's default ``jax_threefry_partitionable``). ``sampler_fn``: what
  ``make_sampler_fn`` returned for these settings and ``mesh``, kept by a
  caller that samples again (the trainer's grids), so that it compiles once
  per run instead of once per call. ``low_noise``: another model below a
  sigma; ``score_scale``: (scale, (lo, hi)), None the config's (both
  ``make_sampler_fn``).
  """
  batch_size = effective_batch_size(batch_size, len(labels))
  rows = padded_size(batch_size, 1 if mesh is None else mesh.size)
  fn = sampler_fn or make_sampler_fn(model, sampling_config, cfg_scale, mesh, cfg_interval,
                                     low_noise, score_scale, **sampler_options)
  labels = np.asarray(labels, np.int32)
  out = []
  num_batches = math.ceil(len(labels) / batch_size)
  for b in range(num_batches):
    chunk = labels[b * batch_size:(b + 1) * batch_size]
    padded = np.concatenate([chunk, np.zeros(rows - len(chunk), np.int32)])
    images = fn(params, padded, jax.random.fold_in(key, b), image_shape)
    out.append(np.asarray(jax.device_get(images))[:len(chunk)])
    if progress is not None:
      progress(b + 1, num_batches)
  return np.clip(np.concatenate(out), -1.0, 1.0)


def image_grid(images, rows: int) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> uint8 grid (rows*(H+2), cols*(W+2), C), 2px gaps;
  NaN pixels (a diverged sample) are black."""
  n, h, w, c = images.shape
  cols = math.ceil(n / rows)
  grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
  images = np.nan_to_num(images, nan=-1.0, posinf=1.0, neginf=-1.0)
  pix = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = pix[i]
  return grid


def save_png(grid: np.ndarray, path: str):
  from PIL import Image
  img = grid[..., 0] if grid.shape[-1] == 1 else grid
  with outputs.replaced_when_done(path) as f:
    Image.fromarray(img).save(f, format="PNG")


def load_run(workdir: str, step=None, sampler=None, num_steps=None, average_from=None,
             log=print, posthoc_ema=None):
  """A run's model, restored train state (at ``step``, default latest) and config.

  ``sampler``/``num_steps`` override the run's sampling config. With
  ``average_from`` the state's ``params`` are the uniform average of the raw
  weights of every checkpoint kept at steps ``average_from`` .. ``step``
  (``average_checkpoints``); with ``posthoc_ema`` (a sigma_rel) they are the
  power-function EMA of that width at ``step``, reconstructed from the run's
  snapshots (``posthoc_ema_params``). Its ``ema_params`` are ``step``'s.
  """
  if average_from is not None and posthoc_ema is not None:
    raise ValueError("average_from and posthoc_ema each replace the weights; pass one")
  from scoreflow_jax import checkpointing
  from scoreflow_jax.model import build_model
  config = run_config.load(workdir)
  if sampler is not None:
    samplers.get_sampler(sampler)
    config.sampling.sampler = sampler
  if num_steps is not None:
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config.sampling.num_steps = num_steps
  model = build_model(config)
  abstract = abstract_train_state(model, config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  if step is not None and step not in ckpt.steps():
    raise ValueError(f"no checkpoint at step {step}; steps there: {ckpt.steps()}")
  state = ckpt.restore(abstract, config, step)
  if average_from is not None:
    state = state.replace(params=average_checkpoints(
        ckpt, abstract, config, average_from, int(state.step), log))
  if posthoc_ema is not None:
    state = state.replace(params=posthoc_ema_params(
        ckpt, abstract, config, posthoc_ema, int(state.step), log))
  ckpt.close()
  return model, state, config


def abstract_train_state(model, config):
  """The shapes and dtypes of ``config``'s train state (what checkpoints are
  restored into), without computing it."""
  from scoreflow_jax import train_step as ts
  from scoreflow_jax import data as data_lib
  tx, _ = ts.make_optimizer(config.optim, config.training.num_steps,
                            frozen=model.frozen_module)
  shape = data_lib.image_shape(config.data)
  sample = {"jpg": np.zeros((1,) + shape, np.float32), "cls": np.zeros((1,), np.int32)}
  return jax.eval_shape(
      lambda: ts.create_train_state(model, tx, jax.random.key(0), sample,
                                    run_config.posthoc_stds(config)))


def average_checkpoints(ckpt, abstract_state, config, first: int, last: int, log=print):
  """The uniform average of the raw weights (``params``) of every checkpoint
  ``ckpt`` holds at steps ``first`` <= s <= ``last``.

  A post-hoc weight average (SWA-like; a box-shaped counterpart of the EMA,
  whose length is chosen after training): with checkpoints kept every K steps
  (``training.checkpoint_every = keep_every = K``), the average over the last
  L steps is an EMA-like smoothing of width L that any run can be scored at.
  Frozen leaves (identical in every checkpoint) come back bit for bit.
  """
  steps = [s for s in ckpt.steps() if first <= s <= last]
  if not steps:
    raise ValueError(f"no checkpoint at steps {first}..{last} to average; steps there: "
                     f"{ckpt.steps()} (keep more with --config.training.checkpoint_every"
                     "=K --config.training.keep_every=K)")
  params = (ckpt.restore(abstract_state, config, s, fields=("params",))["params"]
            for s in steps)
  mean = _weighted_sum(params, [1.0 / len(steps)] * len(steps))
  log(f"raw weights averaged over {len(steps)} checkpoint(s) at steps {steps}")
  return mean


def _weighted_sum(trees, weights):
  """sum_i weights[i] * trees[i], accumulated in float64 (``trees`` may be
  a generator: one tree is held at a time), in the dtypes of the trees."""
  total = tree = None
  for w, tree in zip(weights, trees, strict=True):
    part = jax.tree.map(lambda a: w * np.asarray(a, np.float64), tree)
    total = part if total is None else jax.tree.map(np.add, total, part)
  return jax.tree.map(lambda t, a: jnp.asarray(t, a.dtype), total, tree)


def posthoc_ema_params(ckpt, abstract_state, config, std: float, last: int, log=print):
  """The power-function EMA of relative width ``std`` at step ``last``,
  reconstructed from the power EMAs (``ema.posthoc_stds``) of every checkpoint
  ``ckpt`` holds at steps <= ``last`` (EDM2's post-hoc EMA).

  The weights solve a least-squares fit of the target profile by the
  snapshots' profiles (``ema.posthoc_coefficients``); its relative error is
  logged: a few percent or less means the snapshots span the target well
  (keep checkpoints more often, ``training.keep_every``, to lower it).
  """
  from scoreflow_jax import ema as ema_lib
  run_config.check_posthoc(config)
  stds = run_config.posthoc_stds(config)
  steps = [s for s in ckpt.steps() if 0 < s <= last]
  in_t = np.repeat(np.asarray(steps, np.float64), len(stds))
  in_std = np.tile(np.asarray(stds, np.float64), len(steps))
  # raises on a sigma_rel out of range, before any checkpoint is read
  coef, err = ema_lib.posthoc_coefficients(in_t, in_std, float(last), std)
  shadows = (shadow for s in steps
             for shadow in ckpt.restore(abstract_state, config, s,
                                        fields=("phema_params",))["phema_params"])
  params = _weighted_sum(shadows, coef)
  hint = ("" if err < 0.05 else " -- the snapshots span this profile poorly: keep "
          "checkpoints more often (training.keep_every) or choose a sigma_rel nearer "
          f"{stds}")
  log(f"post-hoc EMA sigma_rel {std:g} at step {last} from {len(steps)} checkpoint(s) x "
      f"{len(stds)} power EMAs {stds} (steps {steps}); profile fit error {err:.1%}{hint}")
  return params


# Columns (images per class) of sample_from_run's PNG grid at most.
GRID_COLUMNS = 32


def sample_from_run(workdir: str, out: str, step=None, sampler=None, num_steps=None,
                    cfg_scale=None, classes=None, num_per_class=10, seed=0,
                    use_ema=True, batch_size=256, log=print, cfg_interval=None,
                    average_from=None, posthoc_ema=None, overwrite=False,
                    low_noise_workdir=None, low_noise_step=None, switch_sigma=None,
                    score_scale=None, **sampler_options):
  """Loads a run's checkpoint and writes a PNG grid (a row per class, at most
  ``GRID_COLUMNS`` images each) and an .npz of every image.

  ``out`` names either; the other goes beside it (``outputs.paired_outputs``).
  The .npz holds ``images`` (N, H, W, C) float32 in [-1, 1], ``labels`` (N,),
  and the run's ``step`` and ``holdout`` (``data.holdout``: which training images
  it held out, for ``evaluate.py --reference validation``) and ``data_source``
  (whose order of the training split those positions refer to).
  ``sampler``, ``num_steps`` and ``cfg_scale`` default to the run's
  ``config.sampling``. ``average_from``: sample the average of the raw weights kept at steps
  ``average_from`` .. ``step`` (``average_checkpoints``) instead of the EMA or
  raw weights; ``posthoc_ema``: sample the power-function EMA of that sigma_rel
  (``posthoc_ema_params``); ``use_ema`` must then be False.
  ``low_noise_workdir`` (with ``switch_sigma``): that run's denoiser, its EMA
  weights at ``low_noise_step`` (default latest), at sigma <= switch_sigma,
  this run's above (``run_config.check_low_noise_run`` says which runs can
  be joined); the .npz records both. ``score_scale=(scale, (lo, hi))``: the
  score times ``scale`` where lo < sigma <= hi (``guiders.score_scale``; a
  lower temperature in a noise band), None the run's ``sampling.score_scale``
  (``resolve_score_scale``), recorded in the .npz. Returns the images.
  """
  if average_from is not None and use_ema:
    raise ValueError("average_from averages the raw weights of several checkpoints; "
                     "it replaces the EMA weights, so pass use_ema=False (sample.py: "
                     "drop --ema)")
  if posthoc_ema is not None and use_ema:
    raise ValueError("posthoc_ema replaces the EMA weights, so pass use_ema=False "
                     "(sample.py: drop --ema)")
  if num_per_class < 1:
    raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  png, npz = outputs.paired_outputs(out, overwrite)
  run = run_config.load(workdir)
  # its errors before loading a checkpoint; the run's own when none is passed
  score_scale = resolve_score_scale(run.sampling, score_scale)
  classes = run_config.classes(run, classes)
  if (low_noise_workdir is None) != (switch_sigma is None):
    raise ValueError("low_noise_workdir and switch_sigma go together: the other run's "
                     "denoiser at sigma <= switch_sigma")
  if low_noise_step is not None and low_noise_workdir is None:
    raise ValueError("low_noise_step is a step of low_noise_workdir; pass that run too")
  if low_noise_workdir is not None:
    low_run = run_config.load(low_noise_workdir)
    run_config.check_low_noise_run(run, low_run, switch_sigma, low_noise_workdir)
    run_config.classes(low_run, classes)
  model, state, config = load_run(workdir, step, sampler, num_steps, average_from, log,
                                  posthoc_ema)
  low_noise = None
  if low_noise_workdir is not None:
    low_model, low_state, _ = load_run(low_noise_workdir, low_noise_step, log=log)
    low_noise = (low_model, low_state.ema_params, float(switch_sigma))
  if cfg_scale is None:  # like sampler and num_steps: the run's own
    cfg_scale = float(config.sampling.cfg_scale)
  if cfg_interval is not None and cfg_scale == 1.0:
    raise ValueError(f"cfg_interval {tuple(cfg_interval)} limits guidance, but the "
                     "scale is 1 (no guidance; the run's sampling.cfg_scale unless "
                     "--cfg_scale is given): pass --cfg_scale S with S != 1, or drop "
                     "--cfg_interval.")
  from scoreflow_jax import data as data_lib, train_step as ts
  shape = data_lib.image_shape(config.data)
  params = state.ema_params if use_ema else state.params
  labels = np.repeat(np.asarray(classes, np.int32), num_per_class)
  mesh = ts.make_mesh()
  t0 = time.perf_counter()
  images = generate_images(
      model, params, config.sampling, labels, jax.random.key(seed), shape,
      batch_size, cfg_scale=cfg_scale, mesh=mesh, cfg_interval=cfg_interval,
      low_noise=low_noise, score_scale=score_scale,
      progress=lambda b, n: log(f"batch {b}/{n} ({time.perf_counter() - t0:.1f} s)"),
      **sampler_options)
  diverged = np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1))
  if diverged.size:  # kept as they are: the file says what the sampler gave
    log(f"warning: {diverged.size} of {len(images)} samples have NaN or infinite "
        f"pixels (the sampler diverged on them): indices "
        f"{diverged[:10].tolist()}{' ...' if diverged.size > 10 else ''}, classes "
        f"{sorted(set(labels[diverged].tolist()))}. They are black in the grid and "
        "kept in the .npz; evaluate.py refuses such a file.")
  # the grid shows at most GRID_COLUMNS per class (10k samples would make a
  # 30,000-pixel-wide PNG); the .npz holds them all
  shown = min(num_per_class, GRID_COLUMNS)
  per_class = images.reshape((len(classes), num_per_class) + images.shape[1:])
  save_png(image_grid(per_class[:, :shown].reshape((-1,) + images.shape[1:]),
                      rows=len(classes)), png)
  weights = ("EMA weights" if use_ema
             else f"raw weights averaged from step {average_from}" if average_from is not None
             else f"post-hoc EMA, sigma_rel {posthoc_ema:g}" if posthoc_ema is not None
             else "raw weights")
  # how the samples were made, beside them (evaluate.py pairs draws by seed)
  with outputs.replaced_when_done(npz) as f:  # a file object: np.savez adds no suffix
    np.savez(f, images=images.astype(np.float32), labels=labels,
             step=np.int64(state.step), holdout=np.int64(config.data.get("holdout", 0)),
             data_source=np.str_(config.data.source),
             seed=np.int64(seed), weights=np.str_(weights),
             sampler=np.str_(config.sampling.sampler),
             num_steps=np.int64(config.sampling.num_steps), cfg_scale=np.float64(cfg_scale),
             cfg_interval=np.asarray(cfg_interval if cfg_interval is not None else (),
                                     np.float64),
             # the batches the noise was drawn in (batch b: fold_in(key, b)): the
             # request capped at the sample count (until session 26 rounded up to
             # a multiple of the devices, which made the images depend on them)
             batch_size=np.int64(effective_batch_size(batch_size, len(labels))),
             num_devices=np.int64(mesh.size),
             # the score times score_scale where lo < sigma <= hi (sample.py --score_scale)
             score_scale=np.float64(score_scale[0]),
             score_scale_interval=np.asarray(score_scale[1], np.float64),
             # another run's denoiser at sigma <= switch_sigma (sample.py --low_noise_workdir)
             **({} if low_noise is None else dict(
                 low_noise_workdir=np.str_(os.path.abspath(low_noise_workdir)),
                 low_noise_step=np.int64(low_state.step),
                 switch_sigma=np.float64(switch_sigma))))
  log(f"step {int(state.step)} ({weights}), "
      f"{config.sampling.sampler} {config.sampling.num_steps} steps, cfg {cfg_scale}"
      f"{'' if cfg_interval is None else f' for sigma in {tuple(cfg_interval)}'}"
      f"{'' if score_scale == NO_SCORE_SCALE else f', score x {score_scale[0]:g} for sigma in {score_scale[1]}'}"
      f"{'' if low_noise is None else f', at sigma <= {switch_sigma:g}: {low_noise_workdir} step {int(low_state.step)} (EMA weights)'}: "
      f"{len(images)} images in {time.perf_counter() - t0:.1f} s -> {png}"
      f"{f' (the first {shown} per class)' if shown < num_per_class else ''}, {npz}")
  return images
