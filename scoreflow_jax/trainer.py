"""The training loop: data -> train step -> EMA -> checkpoints, logs and sample grids.

Run folder (the reference design's layout)::

  logs/<timestamp>-<run_name>/
    checkpoints/<step>/   orbax: train state (params, optimizer, EMA, RNG, step)
    configs/              the resolved config of every start, as JSON
    images/train/         EMA sample grids, one row per class
    events.out.tfevents.* TensorBoard scalars; metrics.jsonl; loss_curve.png
"""
import functools
import json
import os
import signal
import time

import jax
import numpy as np

from scoreflow_jax import checkpointing, data as data_lib, generate, run_config, run_logging
from scoreflow_jax import ema as ema_lib, first_stage as first_stage_lib, samplers
from scoreflow_jax import train_step as ts
from scoreflow_jax.model import build_model

# What training.time_limit_s is measured with (tests replace it, not time.perf_counter).
_time_limit_clock = time.perf_counter


class NonFiniteError(FloatingPointError):
  pass


def _process_0s(tree):
  """Process 0's ``tree`` (numpy leaves) on every process; ``tree`` itself in a
  single-process run."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def _signal_name(signalled):
  """How the stop's log line names what stopped the run: this process's first
  signal, or another process's (all stop when any is signalled)."""
  if not signalled:
    return "a stop signal to another process"
  return "Ctrl-C" if signalled[0] == signal.SIGINT else signal.Signals(signalled[0]).name


def _any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (the same answer on each): a
  signal sent to one worker stops them all."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _agreed(flag: bool) -> bool:
  """Process 0's ``flag`` on every process. A time limit read from each
  process's own clock could stop one a step before the others, which would
  then wait for it in the next step's collectives forever."""
  return bool(_process_0s(np.asarray(flag)))


def validate_config(config):
  """Checks values a run would otherwise fail on late or silently; raises
  ValueError. Returns the model it built (a KL first stage's weights loaded)."""
  t = config.training
  n_dev = jax.device_count()
  problems = []
  if t.batch_size < 1 or t.batch_size % n_dev:
    problems.append(
        f"training.batch_size={t.batch_size} must be a positive multiple of the "
        f"device count {n_dev}; e.g. --config.training.batch_size="
        f"{max(n_dev, t.batch_size // n_dev * n_dev)}")
  if t.batch_size % jax.process_count():
    problems.append(f"training.batch_size={t.batch_size} must divide over "
                    f"{jax.process_count()} processes")
  for name in ("num_steps", "log_every", "checkpoint_every"):
    if t[name] < 1:
      problems.append(f"training.{name} must be >= 1, got {t[name]}")
  for name in ("image_every", "keep_every", "time_limit_s"):
    if t[name] < 0:
      problems.append(f"training.{name} must be >= 0, got {t[name]}")
  if t.max_to_keep < 1:
    problems.append(f"training.max_to_keep must be >= 1 (how many of the latest "
                    f"checkpoints stay; 0 would keep none), got {t.max_to_keep}")
  if t.image_every and t.images_per_class < 1:
    problems.append(f"training.images_per_class must be >= 1 for the sample grids "
                    f"(or training.image_every=0 for none), got {t.images_per_class}")
  sc = config.sampling
  if sc.num_steps < 1:
    problems.append(f"sampling.num_steps must be >= 1, got {sc.num_steps}")
  if not 0.0 < sc.sigma_min < sc.sigma_max:
    problems.append(f"sampling needs 0 < sigma_min < sigma_max, got sigma_min="
                    f"{sc.sigma_min}, sigma_max={sc.sigma_max}")
  if sc.rho <= 0:
    problems.append(f"sampling.rho must be > 0, got {sc.rho}")
  if sc.batch_size < 1:
    problems.append(f"sampling.batch_size must be >= 1, got {sc.batch_size}")
  try:  # the training grids sample with it; sample.py's default
    generate.resolve_score_scale(sc)
  except (TypeError, ValueError) as e:
    problems.append(f"sampling.score_scale / score_scale_interval: {e} (e.g. "
                    f"--config.sampling.score_scale=2 --config.sampling.score_scale_interval="
                    f"'(0.1,1)'; 1: none)")
  if not 0.0 <= config.ema.decay < 1.0:
    problems.append(f"ema.decay must be in [0, 1), got {config.ema.decay}")
  stds = config.ema.get("posthoc_stds", ())
  if any(not isinstance(x, (int, float)) or not 0.0 < x <= ema_lib.MAX_STD for x in stds):
    problems.append(f"ema.posthoc_stds must be sigma_rel values in (0, {ema_lib.MAX_STD:.4f}]"
                    f" (EDM2 uses (0.05, 0.1)), got {stds!r}")
  elif len(set(stds)) != len(stds):
    problems.append(f"ema.posthoc_stds has a repeated value: {stds!r}")
  if config.seed < 0:
    problems.append(f"seed must be >= 0 (numpy's generators take no negative seed), "
                    f"got {config.seed}")
  if config.optim.learning_rate <= 0:
    problems.append(f"optim.learning_rate must be > 0, got {config.optim.learning_rate}")
  if config.optim.warmup_steps < 0:
    problems.append(f"optim.warmup_steps must be >= 0, got {config.optim.warmup_steps}")
  if config.optim.schedule not in ts.SCHEDULES:
    problems.append(f"unknown optim.schedule {config.optim.schedule!r}; choose one of "
                    f"{ts.SCHEDULES}")
  elif config.optim.schedule == "cosine" and config.optim.warmup_steps >= t.num_steps:
    problems.append(f"optim.warmup_steps={config.optim.warmup_steps} leaves no steps to "
                    f"decay over (training.num_steps={t.num_steps})")
  if not 0.0 <= config.optim.final_lr_fraction <= 1.0:
    problems.append(f"optim.final_lr_fraction must be in [0, 1], got "
                    f"{config.optim.final_lr_fraction}")
  if config.sampling.sampler not in samplers.SAMPLERS:
    problems.append(f"unknown sampling.sampler {config.sampling.sampler!r}; choose one "
                    f"of {sorted(samplers.SAMPLERS)}")
  if config.data.source not in data_lib.SOURCES:
    problems.append(f"unknown data.source {config.data.source!r}; choose one of "
                    f"{data_lib.SOURCES}")
  if config.data.name not in data_lib.DATASETS + ("synthetic",):
    problems.append(f"unknown data.name {config.data.name!r}; choose one of "
                    f"{data_lib.DATASETS + ('synthetic',)}")
  if config.data.split not in data_lib.RUN_SPLITS:
    problems.append(f"unknown data.split {config.data.split!r}; choose one of "
                    f"{data_lib.RUN_SPLITS}")
  if config.data.get("holdout", 0) < 0:
    problems.append(f"data.holdout must be >= 0 (training images held out for "
                    f"validation), got {config.data.holdout}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
  model = build_model(config)  # raises on bad model values
  shape = data_lib.image_shape(config.data)
  model.first_stage.latent_shape(shape)  # raises on images the first stage cannot take
  _check_channels(config, shape[-1])
  return model


def _check_channels(config, data_channels):
  """The data's channels against the first stage's and the network's."""
  m = config.model
  net_channels = m[m.network].in_channels
  if m.first_stage == "kl_autoencoder":
    a = m.autoencoder
    if data_channels != a.in_channels:
      raise ValueError(f"the data has {data_channels} channels but "
                       f"model.autoencoder.in_channels={a.in_channels}")
    if net_channels != a.embed_dim:
      raise ValueError(f"model.{m.network}.in_channels={net_channels} must be the "
                       f"autoencoder's latent channels, model.autoencoder.embed_dim="
                       f"{a.embed_dim}")
  elif data_channels != net_channels:
    raise ValueError(f"the data has {data_channels} channels but "
                     f"model.{m.network}.in_channels={net_channels}")


# a latent run's training-set posterior moments (cache_moments), read back on a resume
MOMENTS_FILE = "latent_moments.npy"


def _is_run_folder(workdir):
  """A folder train.py made: configs/ holds its configs, or checkpoints/ its
  steps (or is all there is: a first start stopped before it wrote any)."""
  configs, ckpts = (os.path.join(workdir, d) for d in ("configs", "checkpoints"))
  if os.path.isdir(configs) and any(run_config.is_config_file(f) for f in os.listdir(configs)):
    return True
  if os.path.isdir(ckpts):
    return (any(f.isdigit() for f in os.listdir(ckpts))
            or (not os.listdir(ckpts) and os.listdir(workdir) == ["checkpoints"]))
  return False


def prepare_workdir(config, workdir=None, logdir="logs"):
  """Returns the run folder: ``workdir`` (resumed if it holds a run) or a new one.

  A new run never reuses a folder with other content, so nothing a user had
  is overwritten.
  """
  if workdir is None:
    if jax.process_count() > 1:  # each process would stamp its own folder
      raise ValueError("a run of several processes needs --workdir (the same folder "
                       "for all of them)")
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    base = os.path.abspath(os.path.join(logdir, f"{stamp}-{config.run_name}"))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for i in range(1000):  # runs started in the same second get -1, -2, ...
      workdir = base if i == 0 else f"{base}-{i}"
      try:
        os.mkdir(workdir)  # atomic: exactly one start gets each name
        return workdir
      except FileExistsError:
        continue
    raise FileExistsError(f"no free run folder name next to {base}")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a run folder. Choose "
                             "a new folder (or a run's folder to resume it).")
  if (os.path.isdir(workdir) and os.listdir(workdir)
      and not _is_run_folder(workdir)):
    raise FileExistsError(
        f"--workdir {workdir} exists and is not a scoreflow run folder (no "
        "configs/*-config.json or checkpoints/<step>/ written by train.py). Choose a "
        "new or empty folder; nothing was written.")
  return workdir


def _write_config(config, workdir):
  cdir = os.path.join(workdir, "configs")
  os.makedirs(cdir, exist_ok=True)
  stamp, i = time.strftime("%Y-%m-%dT%H-%M-%S"), 0
  earlier = [f for f in os.listdir(cdir) if run_config.is_config_file(f)]
  if earlier:
    # after the newest start's name whatever the clock says (a time zone or
    # daylight-saving change, another node's clock): names order the starts
    newest = max(map(run_config.start_order, earlier))
    if (stamp, 0) <= newest:
      stamp, i = newest[0], newest[1] + 1
  name = lambda i: f"{stamp}-config.json" if i == 0 else f"{stamp}-{i}-config.json"
  while os.path.exists(os.path.join(cdir, name(i))):  # never overwrite a config
    i += 1
  path = os.path.join(cdir, name(i))
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return path


def _last_start_config(workdir):
  """The run's config before this start writes its own (None: a run folder
  without configs/, from before train.py saved them)."""
  try:
    return run_config.load(workdir)
  except FileNotFoundError:
    return None


def _warn_if_rate_changed(config, before, step, schedule, log):
  """Warns when the learning rate from the resume step on is not what the
  run's last start (config ``before``) would have used: another ``optim`` or,
  for a cosine schedule (it spans training.num_steps), another ``num_steps``."""
  try:
    old = ts.make_schedule(before.optim, before.training.num_steps)
  except (ValueError, AttributeError, KeyError):
    return
  new_rate, old_rate = float(schedule(step)), float(old(step))
  if not np.isclose(new_rate, old_rate, rtol=1e-6, atol=0.0):
    log(f"warning: the learning rate at step {step} is {new_rate:.3g} where the "
        f"last start's schedule gave {old_rate:.3g} (optim.schedule "
        f"{before.optim.get('schedule', 'constant')} -> {config.optim.schedule}, "
        f"training.num_steps {before.training.num_steps} -> "
        f"{config.training.num_steps})")


# data fields a resumed run must keep: another value trains on other images
# (holdout: on images its validation split held out).
_RUN_DATA_FIELDS = ("name", "split", "holdout")


def changed_settings(config, before) -> list:
  """"field: old -> new" for each config field this start changes against
  the run's last start (``before``): a resume that takes another config file
  or --config.* flags keeps its checkpoint and changes these."""
  as_json = lambda c: json.loads(c.to_json_best_effort())  # both sides: lists
  return checkpointing._diff(as_json(before), as_json(config), prefix="",  # pylint: disable=protected-access
                             describe=lambda old, new: f"{old!r} -> {new!r}")


def _check_resume(config, before, workdir, steps):
  """Refuses a resume (config ``before``: the run's last start) that would
  train on other data, or delete checkpoints kept for good (``steps``: those
  in the run) because ``training.keep_every`` no longer keeps them."""
  if config.seed != before.seed:
    raise ValueError(
        f"{workdir} was trained with seed={before.seed}; resuming with {config.seed} "
        "would reshuffle the data order from the resume step while the noise "
        f"continues from the checkpoint. Resume with --config.seed={before.seed}, or "
        "start a new --workdir. Nothing was changed.")
  for name in _RUN_DATA_FIELDS:
    old, new = before.data.get(name, 0), config.data.get(name, 0)
    if old != new:
      raise ValueError(
          f"{workdir} was trained with data.{name}={old!r}; resuming with {new!r} "
          "would train on other data" + (" (and on images its validation split held"
          " out)" if name == "holdout" else "") + f". Resume with --config.data."
          f"{name}={old}, or start a new --workdir. Nothing was changed.")
  holdout = config.data.get("holdout", 0)
  if holdout and before.data.get("source") not in (None, config.data.source):
    raise ValueError(
        f"{workdir} was trained with data.source={before.data.source!r} and holds out "
        f"{holdout:,} training images by their position, which another source orders "
        f"differently: resuming with {config.data.source!r} would train on images its "
        f"validation split held out. Resume with --config.data.source="
        f"{before.data.source}, or start a new --workdir. Nothing was changed.")
  old_clip = before.optim.get("grad_clip_norm", 0.0)
  new_clip = config.optim.get("grad_clip_norm", 0.0)
  if bool(old_clip) != bool(new_clip):
    raise ValueError(
        f"{workdir} was trained with optim.grad_clip_norm={old_clip}; resuming with "
        f"{new_clip} would change the optimizer state's layout, which its checkpoints "
        "cannot be restored into. Resume with --config.optim.grad_clip_norm="
        f"{old_clip} (a non-zero norm can change to another non-zero one), or start a "
        "new --workdir with it. Nothing was changed.")
  old_shape, new_shape = data_lib.image_shape(before.data), data_lib.image_shape(config.data)
  if old_shape != new_shape:
    raise ValueError(
        f"{workdir} was trained on images of shape {old_shape}; the config gives "
        f"{new_shape} (data.image_size / data.channels). Resume with the run's own "
        f"values, or start a new --workdir. Nothing was changed.")
  old_every, new_every = before.training.keep_every, config.training.keep_every
  lost = [s for s in steps if old_every and s % old_every == 0
          and not (new_every and s % new_every == 0)]
  if lost:
    raise ValueError(
        f"{workdir} keeps a checkpoint every {old_every} steps for good (steps "
        f"{lost}); resuming with training.keep_every={new_every} would delete them "
        f"as newer checkpoints are saved. Resume with --config.training.keep_every="
        f"{old_every} (or a divisor of it), or copy them elsewhere first. Nothing "
        "was changed.")


def _summarize(metrics_list):
  """Host-side means over a log interval of per-step device metrics."""
  m = ts.host(metrics_list)
  out = {
      "train/loss": float(np.mean([x["loss"] for x in m])),
      "train/grad_norm": float(np.mean([x["grad_norm"] for x in m])),
      "train/learning_rate": float(m[-1]["learning_rate"]),
  }
  if "bits_per_dim" in m[0]:  # loss.nll_weight > 0: the NLL term, apart from the loss
    out["train/bits_per_dim"] = float(np.mean([x["bits_per_dim"] for x in m]))
  sums = np.sum([x["loss_bin_sum"] for x in m], 0)
  counts = np.sum([x["loss_bin_count"] for x in m], 0)
  lo = 0.0
  for hi, s, c in zip(ts.SIGMA_BINS, sums, counts):
    if c > 0:
      out[f"train/loss_sigma_{lo:g}-{hi:g}"] = float(s / c)
    lo = hi
  finite = all(bool(x["finite"]) for x in m)
  return out, finite


def sample_grid(model, params, config, mesh, key, step_images_path=None, sampler_fn=None):
  """An EMA sample grid, one row per class; returns uint8 grid. ``sampler_fn``:
  ``generate.make_sampler_fn(model, config.sampling, mesh=mesh)``, made once
  per run so that the sampler compiles once."""
  n_classes = config.model.conditioner.n_classes
  per = config.training.images_per_class
  labels = np.repeat(np.arange(n_classes), per)
  shape = data_lib.image_shape(config.data)
  images = generate.generate_images(model, params, config.sampling, labels, key,
                                    shape, config.sampling.batch_size, mesh=mesh,
                                    sampler_fn=sampler_fn)
  grid = generate.image_grid(images, rows=n_classes)
  if step_images_path:
    generate.save_png(grid, step_images_path)
  return grid


def _fit_gaussian_base(state, model, config, images, labels, log, moments=None):
  """Fills the Gaussian base's statistics (params and EMA) from the training set
  (``moments``: a KL first stage's cached posterior parameters of ``images``)."""
  from scoreflow_jax.networks import gaussian_base as gaussian_lib
  t0 = time.perf_counter()
  # Fitted to the first stage's posterior means (its latents without the draw).
  if model.first_stage.params is None:  # the identity: the images themselves
    x = data_lib.to_model_images(images)
  else:
    if moments is None:  # cache_moments=False: encoded here for the fit only
      moments = first_stage_lib.dataset_moments(model.first_stage, images)
    x = np.asarray(model.first_stage.encode_moments(moments))
  sf, n_classes = config.model.score_flow, config.model.conditioner.n_classes
  log(f"fitting the Gaussian base to {len(x):,} training images ({n_classes} classes x "
      f"{sf.gaussian_components} component(s), rank {sf.gaussian_rank})")
  if sf.gaussian_components == 1:
    stats = gaussian_lib.fit(x, labels, n_classes, sf.gaussian_rank)
  else:
    stats = gaussian_lib.fit_mixture(x, labels, n_classes, sf.gaussian_components,
                                     sf.gaussian_rank, seed=config.seed,
                                     covariance_prior=sf.gaussian_covariance_prior,
                                     log=log)
  # Process 0's fit on every process: each fits on its own devices' numerics
  # (GPU encodes and BLAS need not agree bit for bit), and the state is
  # replicated from every process's own copy.
  stats = _process_0s(stats)

  def fill(params):
    params = jax.tree.map(lambda a: a, params)  # a copy of the containers
    net = dict(params["network"])
    net[model.frozen_module] = {k: jax.numpy.asarray(v) for k, v in stats.items()}
    params["network"] = net
    return params

  log(f"Gaussian base fitted to {len(x):,} training images "
      f"({sf.gaussian_components} component(s) per class, rank "
      f"{stats['basis'].shape[-1]}, {time.perf_counter() - t0:.1f} s)")
  return state.replace(params=fill(state.params), ema_params=fill(state.ema_params),
                       phema_params=tuple(fill(p) for p in state.phema_params))


def _load_training_data(config):
  """The run's training images and labels, checked against its config."""
  t = config.training
  images, labels = data_lib.load_dataset(config.data)
  if images.shape[1:] != data_lib.image_shape(config.data):
    raise ValueError(f"data images are {images.shape[1:]}, expected "
                     f"{data_lib.image_shape(config.data)} for data.name={config.data.name!r}")
  _check_channels(config, images.shape[-1])
  if len(images) < t.batch_size:
    holdout = int(config.data.get("holdout", 0))
    raise ValueError(
        f"training.batch_size={t.batch_size} is more than the {len(images):,} training "
        f"images" + (f" left by data.holdout={holdout:,}" if holdout else "") + "; lower "
        "training.batch_size" + (" or data.holdout" if holdout else ""))
  if int(labels.max()) >= config.model.conditioner.n_classes:
    raise ValueError(f"labels go up to {int(labels.max())} but "
                     f"model.conditioner.n_classes={config.model.conditioner.n_classes}")
  return images, labels


def train_and_evaluate(config, workdir=None, logdir="logs", log=print, model=None):
  """Trains ``config`` in ``workdir`` (resuming it if it holds checkpoints).

  ``model``: what ``validate_config(config)`` returned, when the caller has
  checked the config already (a KL first stage's weights are not read and
  hashed again); None: checked here. Returns a summary dict (workdir, final
  step, last logged metrics, final state).
  """
  if model is None:
    model = validate_config(config)
  # The time limit counts from here: data loading, encoding the training set
  # (cached moments), the Gaussian base's fit and compilation are part of what
  # a run costs (equal-wall-clock comparisons).
  started = _time_limit_clock()
  fresh = workdir is None or not os.path.exists(workdir)
  workdir = prepare_workdir(config, workdir, logdir)
  try:
    return _train(config, workdir, log, model, started)
  except BaseException:
    if fresh:  # a start that failed (missing data, Ctrl-C) leaves no empty run
      try:
        os.rmdir(workdir)  # only if empty
      except OSError:
        pass
    raise


def _train(config, workdir, log, model, started):
  """train_and_evaluate's work in the run folder ``workdir``."""
  is_writer = jax.process_index() == 0
  t = config.training
  mesh = ts.make_mesh()

  if config.model.first_stage == "kl_autoencoder":
    # The run's config records the weights it trains with (checked on every
    # load), and where they are: an absolute path, so that sample.py and
    # evaluate.py find them from any folder.
    config.model.autoencoder.sha256 = model.first_stage.sha256
    config.model.autoencoder.weights = os.path.abspath(
        os.path.expanduser(config.model.autoencoder.weights))
  if config.data.data_dir and "://" not in config.data.data_dir:
    # likewise the data's folder: bits_per_dim.py and evaluate.py --diagnose
    # read the run's data from there when not told (a bucket URL is kept)
    config.data.data_dir = os.path.abspath(os.path.expanduser(config.data.data_dir))
  tx, schedule = ts.make_optimizer(config.optim, t.num_steps, frozen=model.frozen_module)
  # init reads the batch's shapes only
  sample = data_lib.to_model_batch(
      np.zeros((1,) + data_lib.image_shape(config.data), np.uint8), np.zeros(1, np.int32))
  stds = run_config.posthoc_stds(config)
  init_state = lambda: ts.create_train_state(model, tx, jax.random.key(config.seed), sample,
                                             stds)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  open_checkpoints = lambda: checkpointing.Checkpointer(
      ckpt_dir, max_to_keep=t.max_to_keep, keep_every=t.keep_every)
  # (opening makes the folder: for a new run, only once the data are checked)
  ckpt = open_checkpoints() if os.path.isdir(ckpt_dir) else None
  resuming = ckpt is not None and ckpt.latest_step() is not None
  before = _last_start_config(workdir) if resuming else None
  if before is not None:
    _check_resume(config, before, workdir, ckpt.steps())

  def restore():
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init_state))
    state = ckpt.restore(abstract, config)
    log(f"resumed {workdir} at step {int(state.step)}")
    return state

  if resuming and ckpt.latest_step() >= t.num_steps:
    # before the data and any write: a finished run's folder stays as it was
    state = restore()
    ckpt.close()
    log(f"nothing to train: the run is at step {int(state.step)} and "
        f"training.num_steps={t.num_steps}; to train on, raise it (e.g. python "
        f"train.py --workdir {workdir} --config.training.num_steps="
        f"{2 * int(state.step)})")
    return {"workdir": workdir, "step": int(state.step), "metrics": {}, "state": state}

  try:
    images, labels = _load_training_data(config)
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    raise
  ckpt = ckpt or open_checkpoints()

  def encode_once():
    if (config.model.first_stage != "kl_autoencoder"
        or not config.model.autoencoder.get("cache_moments", True)):
      return None, False
    t0 = time.perf_counter()
    moments = first_stage_lib.read_stored_moments(model.first_stage, images,
                                                  moments_path, log)
    if moments is not None:
      log(f"read the {len(images):,} training images' posterior moments back from "
          f"{moments_path} ({time.perf_counter() - t0:.1f} s)")
      return moments, False
    moments = first_stage_lib.dataset_moments(model.first_stage, images, log=log)
    log(f"encoded the {len(images):,} training images once: their posterior moments "
        f"{moments.shape[1:]} ({moments.nbytes / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.1f} s) give each step's latents without the encoder "
        "(model.autoencoder.cache_moments=False: encode every batch)"
        + (f"; kept in {moments_path} for a resume" if is_writer else ""))
    return moments, True

  moments_path, to_store = os.path.join(workdir, MOMENTS_FILE), False
  moments = None
  if resuming:
    state = restore()
    if before is not None:
      changes = changed_settings(config, before)
      if changes:
        log(f"changed since the last start ({len(changes)}): " + "; ".join(changes[:12])
            + (f"; ... and {len(changes) - 12} more (configs/ has both)"
               if len(changes) > 12 else ""))
      _warn_if_rate_changed(config, before, int(state.step), schedule, log)
    moments, to_store = encode_once()
  else:
    log(f"new run {workdir}")  # before the encoding and the base's fit (minutes)
    if config.model.first_stage == "kl_autoencoder":
      for warning in first_stage_lib.autoencoder_warnings(config.model, config.data):
        log(warning)
    moments, to_store = encode_once()
    state = init_state()
    if model.frozen_module is not None:
      state = _fit_gaussian_base(state, model, config, images, labels, log, moments)
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    if to_store:  # after configs/: a folder holding them is a run's
      first_stage_lib.store_moments(model.first_stage, images, moments, moments_path)
  state = ts.replicate(state, mesh)
  start_step = int(ts.host(state.step))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  log(f"{n_params:,} parameters | {jax.device_count()} devices "
      f"({jax.devices()[0].platform}) | {jax.process_count()} processes | global batch "
      f"{t.batch_size}")
  holdout = int(config.data.get("holdout", 0))
  log(f"data: {len(images):,} images of {config.data.name}/{config.data.split}"
      + (f" ({holdout:,} training images held out as the validation split)"
         if holdout else ""))

  if stds:
    log(f"power-function EMAs at sigma_rel {stds} (post-hoc EMA: sample.py --posthoc_ema);"
        f" snapshots are the checkpoints kept every {t.keep_every} steps"
        + ("" if t.keep_every else " -- none with training.keep_every=0: only the latest "
           "checkpoints will be there to reconstruct from"))
  # Batches of cached moments need no encoder; images need the KL stage's weights.
  step_fn = functools.partial(
      ts.make_train_step(model, tx, schedule, mesh, config.ema.decay, stds),
      first_stage_params=(None if model.first_stage.params is None or moments is not None
                          else ts.replicate(model.first_stage.params, mesh)))
  batches = data_lib.BatchIterator(
      images if moments is None else moments, labels, t.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=start_step, prefetch=config.data.prefetch,
      make_batch=data_lib.to_model_batch if moments is None else data_lib.to_moments_batch)
  # TensorBoard hides events past the start's step that earlier processes wrote
  # (a resume's lost steps, or a restart in a folder without a checkpoint)
  earlier = is_writer and any(n.startswith("events.out.tfevents")
                              for n in os.listdir(workdir))
  writer = (run_logging.MetricWriter(workdir, purge_step=start_step + 1 if start_step
                                     or earlier else None) if is_writer else None)
  # train/wall_s: seconds of training so far, earlier processes of a resumed run included
  wall_before = (run_logging.last_wall_s(workdir, start_step) if is_writer and start_step
                 else 0.0)
  time_left = ((lambda: t.time_limit_s - (_time_limit_clock() - started))
               if t.time_limit_s else None)
  progress = run_logging.Progress(start_step, t.num_steps, t.batch_size, time_left)
  image_dir = os.path.join(workdir, "images", "train")
  pending, last = [], {}
  # The grids' sampler, made once: every grid reuses its compilation.
  grid_sampler = (generate.make_sampler_fn(model, config.sampling, mesh=mesh)
                  if t.image_every else None)
  step = grid_step = start_step  # grid_step: of the last grid (none at the start)
  # SIGTERM (a cluster's preemption or time-out notice, `kill`) and Ctrl-C
  # (SIGINT) stop the run like the time limit: the steps since the last log
  # are logged, checked and saved, and the run resumes from there. A second
  # Ctrl-C interrupts at once, unsaved.
  signalled = []
  try:
    with run_logging.recording_signals(signalled):
      while step < t.num_steps:
        # every process decides alike: process 0's clock for the time limit, a
        # SIGTERM to any process for the signal (checked every step under a
        # time limit, otherwise at log steps: no collective per step)
        out_of_time = preempted = False  # preempted: by a signal (agreed too)
        if t.time_limit_s or jax.process_count() == 1 or step % t.log_every == 0:
          preempted = _any_process(bool(signalled))
          out_of_time = preempted or (bool(t.time_limit_s) and _agreed(
              _time_limit_clock() - started > t.time_limit_s))
        # Out of time, the steps since the last log are summarised and checked
        # like at a log step, then saved like at a checkpoint step.
        if not out_of_time:
          if step == start_step:
            t0 = time.perf_counter()
            state, metrics = step_fn(state, ts.global_batch(next(batches), mesh))
            jax.block_until_ready(metrics)
            log(f"first step (compilation) {time.perf_counter() - t0:.1f} s")
            progress.restart(step + 1)
          else:
            state, metrics = step_fn(state, ts.global_batch(next(batches), mesh))
            if pending:
              # Asynchronous dispatch would let the host queue up to log_every
              # steps ahead, all of which run before a stop can save: a time
              # limit overran, and a SIGTERM's save waited for them (93 steps,
              # over 3 minutes, on a busy CPU in session 40; a preemption's
              # grace is often 30 s). Waiting for the previous step keeps one
              # step in flight (the device stays busy) and the delay to one step.
              jax.block_until_ready(pending[-1])
          pending.append(metrics)
          step += 1
        at_log = out_of_time or step % t.log_every == 0 or step == t.num_steps
        at_ckpt = (out_of_time or step % t.checkpoint_every == 0 or step == t.num_steps
                   or bool(t.keep_every) and step % t.keep_every == 0)  # kept for good
        if (at_log or at_ckpt) and pending:
          scalars, finite = _summarize(pending)
          first = step - len(pending)
          pending = []
          if not finite:
            good = ckpt.latest_step()
            clip = "" if config.optim.get("grad_clip_norm", 0.0) else (
                ", or --config.optim.grad_clip_norm=1.0" + (
                    " in a new --workdir (a resume cannot switch clipping on)"
                    if good is not None else ""))
            raise NonFiniteError(
                f"non-finite loss or gradient between steps {first} and "
                f"{step} (last mean loss {scalars['train/loss']}). Training stopped; "
                + (f"the last good checkpoint in {ckpt.directory} (step {good}) is "
                   f"intact. Resume from it (python train.py --workdir {workdir}) with "
                   if good is not None else
                   "no checkpoint was written yet: start again (the same --workdir "
                   "will do) with ")
                + "a lower --config.optim.learning_rate" + clip + ".")
          text, steps_per_s = progress.line(step, scalars["train/loss"],
                                            scalars.get("train/bits_per_dim"))
          scalars["train/steps_per_s"] = steps_per_s
          scalars["train/images_per_s"] = steps_per_s * t.batch_size
          scalars["train/wall_s"] = wall_before + time.perf_counter() - started
          last = scalars
          log(text)
          if writer:
            writer.write(step, scalars)
        if out_of_time:
          note = ""
          if config.optim.schedule == "cosine":  # it spans num_steps, not the time limit
            note = (f" (the cosine schedule was at {float(schedule(step)):.3g} of "
                    f"{config.optim.learning_rate:g}: it decays over training.num_steps="
                    f"{t.num_steps})")
          log((f"{_signal_name(signalled)} received: stopping at step {step}; saving"
               if preempted else
               f"time limit {t.time_limit_s:g} s reached at step {step}; saving")
              + note + (f" (resume: python train.py --workdir {workdir})" if preempted
                        else "")
              + ("; Ctrl-C again stops at once, unsaved"
                 if signal.SIGINT in signalled else ""))
        if at_ckpt:
          t0 = time.perf_counter()
          ckpt.save(state, config)
          if writer and os.path.exists(writer.jsonl_path):
            run_logging.plot_loss_curve(writer.jsonl_path,
                                        os.path.join(workdir, "loss_curve.png"),
                                        config.run_name)
          progress.exclude(time.perf_counter() - t0)
        # a time-limited run ends with a grid, like a finished one (its last
        # step is rarely a multiple of image_every), unless it has this step's;
        # a preempted one saves only
        if t.image_every and step != grid_step and (
            out_of_time and not preempted or step % t.image_every == 0
            or step == t.num_steps):
          grid_step = step
          t0 = time.perf_counter()
          path = os.path.join(image_dir, f"step_{step:07d}.png") if is_writer else None
          sample_grid(model, state.ema_params, config, mesh,
                      jax.random.fold_in(jax.random.key(config.seed + 1), step), path,
                      sampler_fn=grid_sampler)
          log(f"sample grid {path} ({time.perf_counter() - t0:.1f} s)")
          progress.exclude(time.perf_counter() - t0)
        if out_of_time:
          break
  finally:
    batches.close()
    ckpt.wait()
    ckpt.close()
    if writer:
      writer.close()
  return {"workdir": workdir, "step": step, "metrics": last, "state": state}
