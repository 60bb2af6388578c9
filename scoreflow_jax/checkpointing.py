"""Checkpoints with orbax: the train state plus the config that made it.

Each checkpoint holds ``state`` (params, optimizer, EMA, power EMAs, RNG,
step; the data position is the step, since batches are a function of it) and
``meta`` (the model config and the power EMAs' stds), so a resume with a different model is refused with a clear
message instead of failing deep inside orbax or silently mixing runs.
"""
import contextlib
import dataclasses
import json
import logging
import os
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp

from scoreflow_jax.run_config import LEGACY_DEFAULTS, posthoc_stds


class CheckpointError(RuntimeError):
  pass


def _signature(model: dict) -> dict:
  """The model fields parameters depend on: the shared ones and the selected
  network's own section (other networks' sections do not matter)."""
  network = model.get("network", "score_flow")
  sig = {k: v for k, v in model.items() if not isinstance(v, dict) or k == "conditioner"}
  section = dict(LEGACY_DEFAULTS.get(network, {}))
  section.update(model.get(network, {}))
  sig[network] = section
  if model.get("first_stage") == "kl_autoencoder":
    # The latents depend on the weights' bytes, not on where the file lies,
    # nor on whether the steps encode each batch or draw from cached moments.
    autoencoder = dict(LEGACY_DEFAULTS["autoencoder"], **model["autoencoder"])
    sig["autoencoder"] = {k: v for k, v in autoencoder.items()
                          if k not in ("weights", "cache_moments")}
  return sig


def model_signature(config) -> dict:
  """The config fields a checkpoint's parameters depend on."""
  return _signature(json.loads(config.model.to_json()))


def _diff(a, b, prefix="model", describe=None):
  """"path: ..." for each leaf where nested dicts ``a`` and ``b`` differ;
  ``describe(va, vb)`` words the values (default: checkpoint vs config)."""
  describe = describe or (lambda va, vb: f"checkpoint {va!r} vs config {vb!r}")
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
    path = f"{prefix}.{k}" if prefix else k
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, path, describe)
    elif va != vb:
      out.append(f"{path}: {describe(va, vb)}")
  return out


def _shapes(tree) -> dict:
  """The shape of each array in ``tree`` (concrete or abstract), keyed by its
  path as orbax stores it ("params/network/.../kernel")."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True),
                               sep="/")
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _stored_shapes(path: str) -> Optional[dict]:
  """The shapes of the arrays in checkpoint ``path``'s state, from its
  metadata alone (no array is read); None where the metadata cannot be read,
  which leaves the judgement to the restore itself."""
  try:
    # the item's handler (a Checkpointer would look for a step's metadata
    # file in the item folder and warn that it is missing)
    from etils import epath  # pylint: disable=g-import-not-at-top
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(os.path.join(path, "state"))).tree
    return _shapes(tree)
  except Exception:  # pylint: disable=broad-except
    return None


def _shape_differences(stored: Optional[dict], wanted: dict, partial: bool) -> list:
  """What stops ``stored`` restoring into ``wanted``: arrays missing, extra
  (unless only some fields are read) or of another shape."""
  if stored is None:
    return []
  out = []
  for k in sorted(set(stored) | set(wanted)):
    if k not in stored:
      out.append(f"{k}: not in the checkpoint vs {wanted[k]}")
    elif k not in wanted:
      if not partial:
        out.append(f"{k}: {stored[k]} vs not in this run's state")
    elif stored[k] != wanted[k]:
      out.append(f"{k}: {stored[k]} vs {wanted[k]}")
  return out


class _DropNotice(logging.Filter):
  def __init__(self, prefix):
    super().__init__()
    self.prefix = prefix

  def filter(self, record):
    return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _without_orbax_notice(prefix):
  """Hides orbax's (absl) log lines starting with ``prefix`` meanwhile."""
  logger, notice = logging.getLogger("absl"), _DropNotice(prefix)
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


# orbax's warning that a read-only manager's folder is read only: it reads as
# if something were wrong with the run folder (sample.py printed it)
_READ_ONLY_NOTICE = "Given directory is read only"
_whole_array_handler = None  # registered by _save_replicated_arrays_whole


def _save_replicated_arrays_whole():
  """In a single process, orbax's replica-parallel save (each device writes
  1/R of a replicated array) splits nothing worth splitting -- the one process
  writes every byte either way -- but slices each array on each device, which
  compiles a program per array shape and device at the first save (60 for the
  tiny conv test model on 4 CPU devices; the UNet's first save there took
  9.2 s, 2.9 s whole: docs/benchmarks.md). Off in a
  single process (orbax's own default on GPU when JAX_PLATFORMS names it); the
  files are the same. Across processes it stays on: there it divides the
  writing between hosts."""
  import jax
  if jax.process_count() > 1:
    return
  global _whole_array_handler
  if (_whole_array_handler is not None
      and ocp.type_handlers.get_type_handler(jax.Array) is _whole_array_handler):
    return  # once per process
  _whole_array_handler = register_array_handler(use_replica_parallel=False)


def register_array_handler(use_replica_parallel: bool):
  """Registers orbax's jax.Array handler as orbax builds its default one, with
  ``use_replica_parallel`` as given; returns it (None, registering nothing, on
  an orbax whose handler is built otherwise). bench/startup.py puts orbax's
  default back with it."""
  import jax
  try:  # orbax's default handler keeps array metadata in this store
    from orbax.checkpoint._src.metadata.array_metadata_store import Store
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=use_replica_parallel,
                                             array_metadata_store=Store())
  except (ImportError, TypeError):  # another orbax: its default, only slower
    return None
  # (orbax warns of every override, a line in each run's log that says nothing)
  with _without_orbax_notice("Type handler registry type"):
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  return handler


class Checkpointer:
  """Latest checkpoints (``max_to_keep``) plus every ``keep_every`` steps for good."""

  def __init__(self, directory: str, max_to_keep: int = 2, keep_every: int = 0,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only  # a reader (sampling, evaluation): hints differ
    _save_replicated_arrays_whole()
    if read_only:  # the values orbax would set itself, warning about each one
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, save_interval_steps=0, create=False, read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, keep_period=keep_every or None, create=True)
    with _without_orbax_notice(_READ_ONLY_NOTICE):
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self):
    return list(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state, config):
    step = int(np.asarray(state.step.addressable_data(0)))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"model": model_signature(config), "step": step,
                                "posthoc_stds": list(posthoc_stds(config))})))

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, abstract_state, config, step: Optional[int] = None, fields=None):
    """Restores ``step`` (default latest) into the structure of ``abstract_state``.

    With ``fields`` (train-state field names, e.g. ``("params",)``) only those
    are read, into a dict ``{name: value}``: the cheap way to read the weights
    of many checkpoints (a fifth of a full restore's time for params alone).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    path = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). It was "
          "left as it is. "
          + (f"Read another step (steps there: {self.steps()})." if self.read_only else
             "To resume from an earlier checkpoint, move this step's folder out of "
             f"{self.directory} (steps there: {self.steps()}), or start a new run "
             "with another --workdir.")) from e
    diffs = _diff(_signature(meta.get("model", {})), model_signature(config))
    if diffs:
      run = os.path.dirname(self.directory)
      raise CheckpointError(
          f"the checkpoint in {path} was made with a different model config:\n  "
          + "\n  ".join(diffs) + "\n"
          + (f"The run's own saved config ({run}/configs/) does not fit its "
             "checkpoints: were configs/ or checkpoints/ copied in from another "
             "run? Give the folder of the run that made them." if self.read_only else
             f"Resume the run with its own config: python train.py --workdir {run} "
             "(with --config.* flags to change other fields), or use a new "
             "--workdir for this config.")
          + " Nothing was changed.")
    saved_stds = tuple(meta.get("posthoc_stds", ()))
    if saved_stds != posthoc_stds(config):
      raise CheckpointError(
          f"the checkpoint in {path} tracks power-function EMAs at ema.posthoc_stds="
          f"{saved_stds} but the config asks for {posthoc_stds(config)}: a post-hoc EMA "
          "profile is tracked from step 0 and cannot be added, dropped or changed "
          "on resume. Resume with --config.ema.posthoc_stds="
          f"'{saved_stds}', or start a new --workdir. Nothing was changed.")
    target = abstract_state if fields is None else {
        f: getattr(abstract_state, f) for f in fields}
    differences = _shape_differences(_stored_shapes(path), _shapes(target),
                                     partial=fields is not None)
    if differences:
      # Told before orbax reads anything: its failed reads leave coroutines
      # behind, and its message names one array where this names them all.
      shown = differences[:8] + ([f"... and {len(differences) - 8} more"]
                                 if len(differences) > 8 else [])
      raise CheckpointError(
          f"checkpoint {path} holds a train state of other shapes than this "
          f"run's ({len(differences)} arrays differ; stored vs now):\n  "
          + "\n  ".join(shown) + "\nIts model config matches, so the code or "
          "the optimizer settings (optim.*) differ from those that wrote it. "
          "Resume with those, or start a new --workdir. It was left as it is.")
    try:
      if fields is not None:
        return self._restore_fields(path, target)
      try:
        return self._restore_state(step, abstract_state)
      except ValueError as first:
        if saved_stds:
          raise
        # Written before the train state had power EMAs: restore the other
        # fields and put back the empty tuple. If that fails too, either
        # error may be the cause (other shapes in a new checkpoint, or in an
        # old one, whose first error is its missing power EMAs): both are told.
        fields = {f.name for f in dataclasses.fields(abstract_state)} - {"phema_params"}
        try:
          restored = self._restore_state(step, {k: getattr(abstract_state, k)
                                                for k in fields})
        except Exception as second:  # pylint: disable=broad-except
          raise ValueError(
              f"{str(first)[:400]}; and as a checkpoint from before power EMAs "
              f"(without phema_params): {str(second)[:400]}") from None
        return abstract_state.replace(phema_params=(), **restored)
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {path} could not be restored into this model's train state "
          f"({type(e).__name__}: {str(e)[:900]}). It was left as it is; if it is "
          f"corrupt, move it out of {self.directory} to resume from an earlier "
          f"step (steps there: {self.steps()}).") from e

  def _restore_state(self, step, target):
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]

  @staticmethod
  def _restore_fields(path, target: dict) -> dict:
    # The state item is a plain orbax pytree: read the named subtrees only.
    reader = ocp.PyTreeCheckpointer()
    try:
      return reader.restore(
          os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    finally:
      reader.close()

  def close(self):
    self.manager.close()
