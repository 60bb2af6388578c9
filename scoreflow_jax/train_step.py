"""Train state, optimizer and the data-parallel train step.

The step is one jitted program over a 1-D device mesh (axis "data"): a
per-device function under ``jax.shard_map`` computes its part of the global
batch's loss, ``pmean``s the gradient over every device (of every process),
and applies AdamW and the EMA. The score inside the loss is ``jax.grad`` of
the energy, so parameter gradients are second order.
"""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scoreflow_jax.ema import ema_update, power_ema_update

AXIS = "data"
# Upper edges of the sigma bins the loss is split by in the metrics.
SIGMA_BINS = (0.1, 0.5, 2.0, np.inf)


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 (), steps taken
  params: Any
  opt_state: Any
  ema_params: Any
  ema_num_updates: jax.Array  # int32 (), LitEma's counter
  rng: jax.Array             # uint32 (2,): raw key data, checkpointable
  # One power-function EMA of params per ema.posthoc_stds entry (EDM2's
  # post-hoc EMA); () when off. Last, with a default: checkpoints written
  # before it existed restore without it (checkpointing.Checkpointer.restore).
  phema_params: Any = ()


SCHEDULES = ("constant", "cosine")  # optim.schedule


def make_schedule(optim_config, num_steps: int):
  """The learning rate at each step: linear warm-up from 0 over ``warmup_steps``,
  then constant (``schedule="constant"``) or a cosine decay that reaches
  ``final_lr_fraction * learning_rate`` at step ``num_steps`` and stays there
  (``schedule="cosine"``)."""
  lr = optim_config.learning_rate
  warmup = optim_config.warmup_steps
  # .get: a config saved before these fields existed loads without them
  kind = optim_config.get("schedule", "constant")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=lr * optim_config.get("final_lr_fraction", 0.0))
  if kind != "constant":
    raise ValueError(f"unknown optim.schedule {kind!r}; choose one of {SCHEDULES}")
  if warmup > 0:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def make_optimizer(optim_config, num_steps: int, frozen: Optional[str] = None):
  """AdamW (torch defaults as sgm) on ``make_schedule``'s rate, with optional
  global-norm clipping.

  ``frozen``: parameters under a submodule of that name get no updates (no
  weight decay either); without it the optimizer state is plain AdamW's."""
  schedule = make_schedule(optim_config, num_steps)
  tx = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                   eps=optim_config.eps, weight_decay=optim_config.weight_decay)
  if optim_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  if frozen is not None:
    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: "frozen" if any(getattr(k, "key", None) == frozen
                                          for k in path) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def create_train_state(model, tx, key, sample_batch, posthoc_stds=()) -> TrainState:
  """``posthoc_stds``: the sigma_rel of each power-function EMA to track
  (``ema.posthoc_stds``; none by default).

  Jitted: one compilation instead of an op-by-op init (4x faster for the conv
  flow on the CPU, the same values bit for bit)."""
  def init(key, sample_batch):
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init, sample_batch)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_num_updates=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(k_train),
        phema_params=tuple(jax.tree.map(jnp.copy, params) for _ in posthoc_stds))
  return jax.jit(init)(key, sample_batch)


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def _sigma_bin_stats(per_sample, sigma):
  """Per-bin (loss sum, count), shape (len(SIGMA_BINS),) each."""
  edges = jnp.asarray((0.0,) + SIGMA_BINS, per_sample.dtype)
  in_bin = (sigma[:, None] >= edges[None, :-1]) & (sigma[:, None] < edges[None, 1:])
  return (jnp.sum(in_bin * per_sample[:, None], 0),
          jnp.sum(in_bin, 0).astype(per_sample.dtype))


def make_train_step(model, tx, schedule, mesh: Mesh, ema_decay: float,
                    posthoc_stds=()):
  """Returns ``step(state, batch, first_stage_params=None) -> (state, metrics)``,
  jitted, state donated; ``first_stage_params`` (replicated) are the first
  stage's frozen weights, None for the identity or for batches of cached
  posterior ``"moments"`` (which need no encoder).

  The step updates sgm's EMA (``ema_decay``) and, with ``posthoc_stds``, one
  power-function EMA per entry (``state.phema_params``, created with the same
  stds by ``create_train_state``).

  ``batch`` is a global array sharded over ``mesh`` along its first axis.
  Sample i of the global batch draws its noise from
  fold_in(fold_in(rng, step), i), so the step's result is the same on any
  number of devices.
  """

  def per_device(state, batch, first_stage_params):
    local_b = batch["cls"].shape[0]  # "jpg" images or cached "moments": both per sample
    first = jax.lax.axis_index(AXIS) * local_b
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
        first + jnp.arange(local_b))

    def loss_fn(params):
      per_sample, sigma, parts = model.per_sample_loss(
          params, batch, keys, first_stage_params, terms=True)
      return jnp.mean(per_sample), (sigma, parts)

    (objective, (sigma, parts)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    objective = jax.lax.pmean(objective, AXIS)
    # "loss" is the denoising loss, comparable across runs; with an NLL term
    # (model.nll_weight) the objective adds its weight times "bits_per_dim"
    per_sample = parts["diffusion"]
    loss = jax.lax.pmean(jnp.mean(per_sample), AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_n = ema_update(state.ema_params, params,
                                   state.ema_num_updates, ema_decay)
    phema_params = power_ema_update(state.phema_params, params, state.step + 1,
                                    posthoc_stds)
    grad_norm = optax.tree.norm(grads)
    bin_sum, bin_count = _sigma_bin_stats(per_sample, sigma)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "finite": jnp.isfinite(objective) & jnp.isfinite(grad_norm),
        "loss_bin_sum": jax.lax.psum(bin_sum, AXIS),
        "loss_bin_count": jax.lax.psum(bin_count, AXIS),
    }
    if "bits_per_dim" in parts:
      metrics["bits_per_dim"] = jax.lax.pmean(jnp.mean(parts["bits_per_dim"]), AXIS)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, ema_params=ema_params,
                              ema_num_updates=ema_n, phema_params=phema_params)
    return new_state, metrics

  # check_vma=False gives pmap's semantics: gradients of the replicated
  # parameters are per-device until the explicit pmean (with vma checking,
  # JAX would psum them implicitly and the pmean would double count).
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)
  jitted = jax.jit(sharded, donate_argnums=(0,))

  def step(state, batch, first_stage_params=None):
    # The first stage's frozen weights are an argument, not a constant of the
    # compiled step (``replicate`` them once; None for the identity).
    if (first_stage_params is None and model.first_stage.params is not None
        and "moments" not in batch):
      raise ValueError("this model has a KL first stage: pass its weights, step(state, "
                       "batch, first_stage_params=replicate(model.first_stage.params, "
                       "mesh)), or they would be compiled into the step (or give "
                       "batches of cached 'moments': data.to_moments_batch)")
    return jitted(state, batch, first_stage_params)

  return step


def replicate(tree, mesh: Mesh):
  """Places a pytree, identical on every process, on every device of ``mesh``."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda idx, x=np.asarray(x): x[idx]),
      jax.device_get(tree))


def host(tree):
  """Replicated (possibly multi-process) arrays -> numpy, from this process's copy."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def global_batch(local_batch, mesh: Mesh):
  """A process's rows -> one global array sharded over the mesh's data axis.

  The rows must split evenly over this process's devices in the mesh.
  """
  local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
  sizes = {len(x) for x in jax.tree.leaves(local_batch)}
  bad = [n for n in sizes if n % local]
  if bad:
    raise ValueError(f"a batch of {bad[0]} rows does not split over {local} devices; "
                     f"use a multiple of {local} (training.batch_size is checked "
                     "for this)")
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
