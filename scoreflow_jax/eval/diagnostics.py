"""Where a trained model loses quality: held-out loss and FD by noise level.

* :func:`loss_at_sigmas`: the EDM-weighted denoising loss at fixed noise
  levels on any image set, with the same noise for every set of the same
  size, so the training split against the test split tells fitting from
  memorising at each sigma (the training-batch loss by sigma cannot once a
  model has thousands of directions per class).
* :func:`renoise`: real images noised to sigma_start and taken back to 0
  by the run's sampler (SDEdit-style). FD of the result against held-out
  test images, by sigma_start, says in which noise range a model's FD is
  lost: errors only at low noise keep FD near that of the images themselves
  from sigma_start = 1; wrong global shapes lose it only when started high.
  Started from test images and from training images, the gap between the
  two shows what the model knows of its training set.
"""
from typing import Sequence

import numpy as np

# JAX is imported inside the functions: evaluate.py --diagnose checks its
# run folder and output before JAX starts.

DEFAULT_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_START_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def _check_sigmas(sigmas, what):
  sigmas = tuple(float(s) for s in sigmas)
  if not sigmas or min(sigmas) <= 0 or not np.all(np.isfinite(sigmas)):
    raise ValueError(f"{what} must be a non-empty list of finite values > 0, "
                     f"got {sigmas}")
  return sigmas


def _rows(tree, sl):
  """The rows ``sl`` of every leaf of a pytree (None stays None)."""
  import jax
  return jax.tree.map(lambda a: a[sl], tree)


def per_image_noise(key, index, shape, dtype=np.float32):
  """Unit noise for image ``index`` (B,) of shape ``shape`` (per image):
  image i's noise depends only on (key, i)."""
  import jax
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape,
                                              dtype))(index)


def loss_at_sigmas(denoise_fn, params, x0, cond, sigmas: Sequence[float], key,
                   sigma_data: float = 0.5, batch_size: int = 500):
  """Mean and standard error of the EDM loss of ``denoise_fn`` at each sigma.

  ``denoise_fn(params, x_noisy, sigma (B,), cond) -> D``; ``x0`` (N, ...) in the
  denoiser's space; ``cond`` a pytree with leading axis N (or None). The
  loss is loss.diffusion_loss ("l2", EDM weighting): for data and a
  denoiser in agreement, an optimal denoiser of N(0, sigma_data^2 I) data
  scores exactly 1 at every sigma. Image i gets the same unit noise at every
  sigma and in every set (fold_in(key, i)). Returns
  ``(means (S,), standard_errors (S,))`` as numpy float64.
  """
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import loss as loss_lib
  sigmas = _check_sigmas(sigmas, "sigmas")
  n = x0.shape[0]
  if n < 2:
    raise ValueError(f"need >= 2 images for a standard error, got {n}")

  @jax.jit
  def batch_loss(params, x, c, index, sigma):
    noise = per_image_noise(key, index, x.shape[1:], x.dtype)
    s = jnp.full((x.shape[0],), sigma, x.dtype)
    return loss_lib.diffusion_loss(lambda xn, sg: denoise_fn(params, xn, sg, c),
                                   x, s, noise, "l2", sigma_data)

  means, errors = [], []
  for sigma in sigmas:
    per = []
    for start in range(0, n, batch_size):
      sl = slice(start, min(n, start + batch_size))
      per.append(np.asarray(batch_loss(params, x0[sl], _rows(cond, sl),
                                       jnp.arange(sl.start, sl.stop), sigma)))
    per = np.concatenate(per).astype(np.float64)
    means.append(per.mean())
    errors.append(per.std(ddof=1) / np.sqrt(n))
  return np.asarray(means), np.asarray(errors)


def renoise(denoise_fn, params, x0, cond, sigma_start: float, key, *,
            sampler: str = "heun_edm", num_steps: int = 18,
            sigma_min: float = 0.002, rho: float = 7.0, batch_size: int = 500):
  """x0 + sigma_start * noise, taken back to sigma 0 by ``sampler``.

  The sampler runs its own schedule of ``num_steps`` from sigma_start down
  to sigma_min (unguided: ``denoise_fn(params, x, sigma, cond)``). Image i's noise
  depends only on (key, i). Returns the images (N, ...), unclipped.
  """
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import samplers
  (sigma_start,) = _check_sigmas([sigma_start], "sigma_start")
  if sigma_start <= sigma_min:
    raise ValueError(f"sigma_start must be > sigma_min = {sigma_min}, got "
                     f"{sigma_start}")
  run_sampler = samplers.get_sampler(sampler)
  # samplers start from z * sqrt(1 + sigma_max^2) (sgm's scaling).
  start_scale = float(np.sqrt(1.0 + sigma_start**2))

  @jax.jit
  def batch(params, x, c, index, key_data):
    noise = per_image_noise(key, index, x.shape[1:], x.dtype)
    den = lambda x_, sigma: denoise_fn(params, x_, sigma, c)
    z = (x + sigma_start * noise) / start_scale
    return run_sampler(den, z, num_steps=num_steps, sigma_min=sigma_min,
                       sigma_max=sigma_start, rho=rho,
                       key=jax.random.wrap_key_data(key_data))

  # for stochastic samplers: fold_in(key, i) is image i's noise, so an index no
  # image has (until session 23 this was fold_in(key, 1), image 1's noise key)
  sampler_key = jax.random.fold_in(key, 2**32 - 1)
  out = []
  n = x0.shape[0]
  for start in range(0, n, batch_size):
    sl = slice(start, min(n, start + batch_size))
    key_data = jax.random.key_data(jax.random.fold_in(sampler_key, start))
    out.append(np.asarray(batch(params, x0[sl], _rows(cond, sl),
                                jnp.arange(sl.start, sl.stop), key_data)))
  return np.concatenate(out)


def balanced_subset(labels, n: int, num_classes: int):
  """Indices of the first n // num_classes images of each class (sorted by class)."""
  per = n // num_classes
  if per < 1:
    raise ValueError(f"n = {n} is below one image per class ({num_classes} classes)")
  idx = []
  for c in range(num_classes):
    where = np.flatnonzero(np.asarray(labels) == c)[:per]
    if len(where) < per:
      raise ValueError(f"class {c} has {len(where)} images, fewer than the {per} asked")
    idx.append(where)
  return np.concatenate(idx)


def diagnose_run(workdir: str, data_dir, source: str = "offline",
                 classifier_path=None, sigmas=DEFAULT_SIGMAS,
                 start_sigmas=DEFAULT_START_SIGMAS, num_images: int = 1000,
                 renoise_from=("test", "train"), step=None, use_ema: bool = True,
                 seed: int = 0, out=None, log=print, overwrite: bool = False):
  """Held-out loss by sigma (train vs test split) and, with a classifier,
  FD by sigma_start (:func:`renoise`), for a run.

  ``num_images`` per split, the first num_images / 10 of each class; the
  conditioning is the true class (no label dropout), the weights the EMA
  ones unless ``use_ema`` is False. The FD part starts from those images of
  each split in ``renoise_from`` and scores against the rest of the test
  set (never the start images), so the two starts are comparable and their
  gap shows what the model knows of its training images. Writes
  ``<workdir>/diagnostics.json`` (or ``out``; an existing file only with
  ``overwrite``, checked before any work) and returns the results.
  """
  import os
  import time
  from scoreflow_jax import data as data_lib, run_config
  from scoreflow_jax.outputs import check_not_an_input, results_path, write_json
  t0 = time.perf_counter()
  bad = [s for s in renoise_from if s not in ("train", "test")]
  if bad:
    raise ValueError(f"renoise_from must name 'train' and/or 'test', got {bad}")
  sigmas = _check_sigmas(sigmas, "sigmas")
  if start_sigmas:
    start_sigmas = _check_sigmas(start_sigmas, "start_sigmas")
  # what the run's saved config decides, and the output: before JAX starts
  config = run_config.load(workdir)  # a run folder, before out is made in it
  if start_sigmas and classifier_path is not None:
    too_low = [s for s in start_sigmas if s <= config.sampling.sigma_min]
    if too_low:
      raise ValueError(f"start_sigmas {too_low} must be > the run's sampling"
                       f" sigma_min = {config.sampling.sigma_min}")
  if config.data.name not in data_lib.DATASETS:
    raise ValueError(f"--diagnose needs real data; this run's data is "
                     f"{config.data.name!r} (choose from {data_lib.DATASETS})")
  if config.data.name != "mnist" and classifier_path is not None:
    raise ValueError("the FD part needs the MNIST classifier; this run's data is "
                     f"{config.data.name!r} (leave out the classifier)")
  if config.data.get("holdout", 0) and config.data.source != source:
    raise ValueError(
        f"the run held out data.holdout={config.data.holdout} training images by "
        f"their position in its {config.data.source} data, and --source {source} "
        "orders MNIST otherwise: its 'train' images would include held-out ones. "
        f"Diagnose it with --source {config.data.source} and that source's --data_dir.")
  check_not_an_input(out, [classifier_path] if classifier_path else [])
  out = results_path(out, os.path.join(workdir, "diagnostics.json"), overwrite)
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import generate
  from scoreflow_jax.eval import classifier as classifier_lib, metrics
  cparams = (None if classifier_path is None  # a wrong path: found before the loss part
             else classifier_lib.load_classifier(classifier_path)[0])
  model, state, config = generate.load_run(workdir, step)
  params = state.ema_params if use_ema else state.params
  n_classes = config.model.conditioner.n_classes
  den = lambda p, x, sigma, cond: model.denoiser(p)(x, sigma, cond)
  splits, rest = {}, None
  for split in ("train", "test"):
    images, labels = data_lib.load_run_split(  # "train": what the run trained on
        config.data.name, split, source, data_dir, config.data.get("holdout", 0))
    idx = balanced_subset(labels, num_images, n_classes)
    splits[split] = (images[idx], labels[idx])
    if split == "test":
      keep = np.ones(len(labels), bool)
      keep[idx] = False
      rest = (images[keep], labels[keep])
  fd_part = classifier_path is not None and bool(start_sigmas) and bool(renoise_from)
  if fd_part and len(rest[0]) < 2 * len(idx):
    # the FD's floor needs two disjoint sets of the other test images
    raise ValueError(
        f"the FD part scores {len(idx)} images against the other {len(rest[0])} "
        f"test images, and its real-vs-real floor needs 2 x {len(idx)} of them: "
        f"pass --num_images {(len(idx) + len(rest[0])) // 3} "
        "or fewer, or leave out --classifier for the loss part alone.")
  key = jax.random.key(seed)
  results = {"workdir": os.path.abspath(workdir), "step": int(state.step),
             "weights": "ema" if use_ema else "raw", "num_images": len(idx),
             "sigmas": list(sigmas), "loss": {}, "loss_stderr": {}}

  encoded = {}  # split -> (x0 in the denoiser's space, conditioning), for both parts
  for split, (images, labels) in splits.items():
    batch = data_lib.to_model_batch(images, labels)
    encoded[split] = (model.first_stage.encode(model.first_stage.params,  # the mean
                                               jnp.asarray(batch["jpg"])),
                      model.condition(params, batch))

  for split in splits:
    x0, cond = encoded[split]
    mean, err = loss_at_sigmas(den, params, x0, cond, sigmas, key,
                               config.loss.sigma_data)
    results["loss"][split], results["loss_stderr"][split] = mean.tolist(), err.tolist()
  log(f"loss by sigma, {len(idx)} images per split, step {int(state.step)} "
      f"({results['weights']} weights):")
  log(format_loss_table(results))
  if fd_part:
    sc = config.sampling
    score = lambda images, labels: metrics.evaluate_samples(
        cparams, images, labels, rest[0], rest[1], len(images), seed=seed)
    results["renoise"] = {"sampler": sc.sampler, "num_steps": sc.num_steps,
                          "reference": f"the other {len(rest[0])} test images",
                          "classifier": os.path.abspath(classifier_path),
                          "classifier_sha256": classifier_lib.file_sha256(classifier_path),
                          "rows": {}}
    for split in renoise_from:
      images, labels = splits[split]
      x0, cond = encoded[split]
      start = images
      if model.first_stage.params is not None:
        # a latent run's images pass the decoder: its floor is the row-0 baseline
        start = np.clip(np.asarray(model.first_stage.decode(model.first_stage.params, x0)),
                        -1.0, 1.0)
      rows = [{"sigma_start": 0.0, **score(start, labels)}]
      for s in start_sigmas:
        out_images = renoise(den, params, x0, cond, s, key, sampler=sc.sampler,
                             num_steps=sc.num_steps, sigma_min=sc.sigma_min,
                             rho=sc.rho)
        out_images = np.clip(np.asarray(model.first_stage.decode(
            model.first_stage.params, jnp.asarray(out_images))), -1.0, 1.0)
        rows.append({"sigma_start": float(s), **score(out_images, labels)})
        log(f"  {split} images from sigma {s:g}: FD {rows[-1]['fd']:.2f} "
            f"({time.perf_counter() - t0:.0f} s)")
      results["renoise"]["rows"][split] = rows
    log(format_renoise_table(results))
  write_json(out, results)  # after the tables: a failing write loses no number
  log(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
  return results


def format_loss_table(results) -> str:
  loss, err = results["loss"], results["loss_stderr"]
  lines = ["  sigma     train            test             test / train"]
  for i, s in enumerate(results["sigmas"]):
    tr, te = loss["train"][i], loss["test"][i]
    lines.append(f"  {s:<8g}  {tr:.4f} +- {err['train'][i]:.4f}  "
                 f"{te:.4f} +- {err['test'][i]:.4f}  {te / tr:.3f}")
  return "\n".join(lines)


def format_renoise_table(results) -> str:
  r = results["renoise"]
  splits = list(r["rows"])
  lines = [f"FD by sigma_start ({r['sampler']}, {r['num_steps']} steps from sigma_start; "
           f"FD against {r['reference']}; start images from: {', '.join(splits)}):",
           "  sigma_start  " + "  ".join(f"FD {s:<6} acc. {s:<6}" for s in splits)
           + "  floor"]
  for i, row in enumerate(r["rows"][splits[0]]):
    label = "0 (images)" if row["sigma_start"] == 0 else f"{row['sigma_start']:g}"
    cells = "  ".join(f"{r['rows'][s][i]['fd']:<9.2f} {r['rows'][s][i]['class_accuracy']:<11.4f}"
                      for s in splits)
    lines.append(f"  {label:<11}  {cells}  {row['fd_floor']:.2f}")
  return "\n".join(lines)
