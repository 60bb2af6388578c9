"""A run folder's saved config, read without JAX.

train.py writes the resolved config of each start to ``<run>/configs/<stamp>-config.json``;
``load`` returns the newest as a ConfigDict. This module imports neither JAX
nor orbax, so the scripts can tell a folder that is not a run, or a flag that
does not fit the run, before JAX starts (seconds sooner).
"""
import json
import os
import re

# Fields added after runs were first written, with the value that reproduces
# the older behaviour: a run or checkpoint without them has that value
# (``load``; checkpointing's model signature).
LEGACY_DEFAULTS = {"score_flow": {"flow_type": "joint", "conv_channels": 64,
                                  "conv_blocks": 2, "conv_global": False,
                                  "conv_scale_shift_norm": False,
                                  "max_log_scale": 1.0,
                                  "energy_scale": False, "energy_weights": False,
                                  "energy_linear": False, "gaussian_base": False,
                                  "gaussian_rank": 64, "gaussian_components": 1,
                                  "gaussian_covariance_prior": 0.0},
                   "autoencoder": {"shift_factor": 0.0}}


def load(workdir: str):
  """The newest resolved config in ``workdir/configs`` as a ConfigDict."""
  import ml_collections
  cdir = os.path.join(workdir, "configs")
  files = [f for f in os.listdir(cdir) if f.endswith(".json")] if os.path.isdir(cdir) else []
  if not files:
    what = ("does not exist" if not os.path.exists(workdir) else
            "is a file" if not os.path.isdir(workdir) else "has no configs/*.json")
    raise FileNotFoundError(
        f"{workdir} {what}: it is not a run folder made by train.py (pass the "
        "folder printed as 'new run ...' when training started)")
  path = os.path.join(cdir, max(files, key=start_order))
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(
        f"{path}, the run's newest saved config, is not valid JSON ({e}). It was "
        f"left as it is; move it out of {cdir} to use the start before it, or "
        "repair it.") from e
  if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
    raise ValueError(f"{path} is not a config saved by train.py (no 'model' "
                     f"section); move it out of {cdir}.")
  # Fields the run's config predates: the values that reproduce the older
  # behaviour (LEGACY_DEFAULTS), also where configs/ is not importable; then
  # the current defaults for any other missing field.
  base = _merge(_defaults(), {"model": LEGACY_DEFAULTS})
  return ml_collections.ConfigDict(_merge(base, saved))


def classes(config, requested=None) -> list:
  """The class labels to sample from a run of ``config``: ``requested`` (None:
  all of them), each checked to be one of the run's classes."""
  n_classes = config.model.conditioner.n_classes
  out = list(range(n_classes)) if requested is None else list(requested)
  if not out:
    raise ValueError("classes is empty: name at least one class (sample.py --classes 0,3), "
                     "or leave it out for all of them")
  bad = [c for c in out if not 0 <= c < n_classes]
  if bad:
    raise ValueError(f"classes {bad} are outside 0..{n_classes - 1}")
  return out


_CONFIG_NAME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d)(?:-(\d+))?-config\.json")


def data_flags(config, source, data_dir, given: bool):
  """The ``(source, data_dir)`` a script reads a run's data set with: its
  --source/--data_dir when ``given`` (either flag on the command line), else
  the run's own ``data.source`` and ``data.data_dir`` (kept absolute by
  train.py; a run on synthetic data has none: the flags' defaults)."""
  if given or config.data.name == "synthetic":
    return source, data_dir
  return config.data.source, config.data.get("data_dir")


def posthoc_stds(config) -> tuple:
  """``ema.posthoc_stds`` as a tuple of floats (absent in older configs: ())."""
  return tuple(float(s) for s in config.ema.get("posthoc_stds", ()))


def check_posthoc(config):
  """Refuses a post-hoc EMA of a run that tracked no power-function EMAs."""
  if not posthoc_stds(config):
    raise ValueError("this run tracked no power-function EMAs (its ema.posthoc_stds is "
                     "empty), so it has nothing to reconstruct a post-hoc EMA from; "
                     "train with e.g. --config.ema.posthoc_stds='(0.05,0.1)' "
                     "--config.training.keep_every=K")


def check_low_noise_run(config, low_config, switch_sigma, low_workdir="the other run"):
  """Raises ValueError unless ``low_config``'s run can denoise below ``switch_sigma``
  in a sampler run of ``config``'s: the same image shape and classes, both in
  pixel space (two latent runs' autoencoders would have to agree too; not
  checked, so refused), and 0 < switch_sigma."""
  from scoreflow_jax import data as data_lib
  if not switch_sigma > 0:
    raise ValueError(f"switch_sigma must be > 0 (the other run at sigma <= it), got "
                     f"{switch_sigma}")
  shape, low_shape = data_lib.image_shape(config.data), data_lib.image_shape(low_config.data)
  if tuple(shape) != tuple(low_shape):
    raise ValueError(f"{low_workdir} makes images of shape {tuple(low_shape)}, this run "
                     f"{tuple(shape)}: a sampler can only pass one run's images to the other's")
  n, low_n = config.model.conditioner.n_classes, low_config.model.conditioner.n_classes
  if n != low_n:
    raise ValueError(f"{low_workdir} has {low_n} classes, this run {n}: their labels differ")
  latent = [w for w, c in (("this run", config), (low_workdir, low_config))
            if c.model.first_stage != "identity"]
  if latent:
    raise ValueError(f"{' and '.join(latent)} sample(s) in an autoencoder's latents; a "
                     "low-noise run is joined in pixel space only (two latent runs "
                     "would need the same autoencoder)")


def is_config_file(name: str) -> bool:
  """Whether ``name`` is a configs/ file train.py writes."""
  return _CONFIG_NAME.fullmatch(name) is not None


def start_order(name: str):
  """Sort key of configs/ file names in the order of the starts that wrote
  them: ``<stamp>-config.json``, then ``<stamp>-1-config.json``, ... for
  starts within the same second, or after a start whose stamp is later than
  the clock (plain name order puts ``-1-`` first)."""
  m = _CONFIG_NAME.fullmatch(name)
  return (m.group(1), int(m.group(2) or 0)) if m else (name, 0)


def _defaults() -> dict:
  """configs/default.py as a dict: fields added after a run was made get their
  defaults (which reproduce the older behaviour). Empty outside a checkout."""
  try:
    from configs import default
  except ImportError:
    return {}
  return json.loads(default.get_config().to_json())


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out
