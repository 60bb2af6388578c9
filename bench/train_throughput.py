"""Throughput of the real MNIST train step, exact score or direct flow.

python bench/train_throughput.py --parameterization preconditioned --batch 128
  [--steps 50] [--warmup 5] [--mode exact|direct] [--devices 1] [--config mnist]
  [--set model.score_flow.gaussian_rank=256 ...]

Builds configs/<config>.py's model (mnist by default; mnist_conv, mnist_unet,
mnist_latent, ...; the parameterization is overridden for ScoreFlowNetworks)
and times train_step.make_train_step on one fixed random batch of the
config's image shape (a KL first stage: the batch's posterior moments, as
train.py caches them; with --set model.autoencoder.cache_moments=False the
step encodes the images, as sgm does). The first
call (tracing + XLA compile + one step) is timed apart from the steady state.
``--mode direct`` replaces the score grad_u phi by the flow's image features
z[:, :D] (one forward pass, no inner jax.grad); loss, AdamW, EMA and, for
"seed", the score head and x0 conversion stay as they are, so exact/direct
is what exactness costs. The last line printed is one JSON object.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("exact", "direct")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parameterization", default="preconditioned",
                 choices=("seed", "preconditioned"))
  p.add_argument("--batch", type=int, default=128, help="global batch")
  p.add_argument("--steps", type=int, default=50, help="timed steps")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after compile")
  p.add_argument("--mode", default="exact", choices=MODES)
  p.add_argument("--devices", type=int, default=1,
                 help="data-parallel devices (on CPU: virtual host devices)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--config", default="mnist",
                 help="a module of configs/ (mnist, mnist_conv, mnist_unet, ...)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override, e.g. --set model.score_flow.gaussian_rank=256")
  return p.parse_args(argv)


def apply_overrides(config, items):
  """Sets ``field.path=value`` items on an ml_collections config (typed as the
  field's current value; unknown fields are refused by the locked config)."""
  import ast
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
    *path, leaf = key.split(".")
    node = config
    for name in path:
      node = node[name]
    old = node[leaf]
    # placeholders (None: data_dir, autoencoder.weights) are strings here
    node[leaf] = (value if old is None or isinstance(old, str)
                  else type(old)(ast.literal_eval(value)))
  return config


def direct_network(network):
  """``network`` (a ScoreFlowNetwork) with grad_u phi replaced by z[:, :D]."""
  import jax.numpy as jnp
  from scoreflow_jax.networks import ScoreFlowNetwork

  class DirectFlowNetwork(ScoreFlowNetwork):
    """F from the flow output itself: no inner gradient."""

    def _phi_and_grad(self, u, context):
      z, _ = self._flow_z(self.flow, u, context)  # (B, D [+ K])
      d = math.prod(u.shape[1:])
      return -jnp.sum(z**2, axis=-1), z[:, :d].reshape(u.shape)

  fields = {f.name: getattr(network, f.name)
            for f in dataclasses.fields(network) if f.name not in ("parent", "name")}
  return DirectFlowNetwork(**fields)


def build(parameterization, mode="exact", batch_size=128, devices=1, seed=0,
          config_name="mnist", overrides=(), parts=None):
  """(step_fn, state, batch, n_params) for an MNIST config, placed on a mesh.

  ``parts``: a dict, filled with the model, optimizer (``tx``), ``config``
  and ``mesh`` the step was built from (bench/step_pieces.py times them)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  import importlib
  import jax
  import numpy as np
  from scoreflow_jax import data as data_lib, train_step as ts
  from scoreflow_jax.model import build_model

  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if jax.device_count() < devices or batch_size % devices:
    raise ValueError(f"need {devices} devices dividing batch {batch_size}; "
                     f"JAX sees {jax.device_count()} (set --devices before JAX starts)")
  config = apply_overrides(
      importlib.import_module(f"configs.{config_name}").get_config(), overrides)
  if config.model.network != "score_flow":
    if mode == "direct":
      raise ValueError("--mode direct is for ScoreFlowNetworks")
    parameterization = "-"
  else:
    config.model.score_flow.parameterization = parameterization
  model = build_model(config)
  if mode == "direct":
    model = dataclasses.replace(model, network=direct_network(model.network))
  rng = np.random.default_rng(seed)
  shape = data_lib.image_shape(config.data)
  batch = {"jpg": rng.uniform(-1, 1, (batch_size,) + shape).astype(np.float32),
           "cls": rng.integers(0, 10, (batch_size,)).astype(np.int32)}
  mesh = ts.make_mesh(jax.devices()[:devices])
  tx, schedule = ts.make_optimizer(config.optim, config.training.num_steps,
                                   frozen=model.frozen_module)
  state = ts.create_train_state(model, tx, jax.random.key(seed),
                                {k: v[:1] for k, v in batch.items()})
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  step_fn = ts.make_train_step(model, tx, schedule, mesh, config.ema.decay)
  if parts is not None:
    parts.update(model=model, tx=tx, config=config, mesh=mesh)
  fs = model.first_stage
  if fs.params is not None and config.model.autoencoder.cache_moments:
    # what train.py does by default: the batch is the posterior moments,
    # computed once; the step draws the latents and runs no encoder
    batch = {"moments": np.asarray(jax.jit(fs.moments)(fs.params, batch["jpg"])),
             "cls": batch["cls"]}
  elif fs.params is not None:  # the encoder in every step: its weights, placed once
    step_fn = functools.partial(step_fn, first_stage_params=ts.replicate(fs.params, mesh))
  return step_fn, ts.replicate(state, mesh), ts.global_batch(batch, mesh), n_params


def measure(step_fn, state, batch, steps, warmup):
  """(compile_s, per-step seconds) ; each step is blocked on before timing ends."""
  import jax
  t0 = time.perf_counter()
  state, metrics = jax.block_until_ready(step_fn(state, batch))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = jax.block_until_ready(step_fn(state, batch))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(step_fn(state, batch))
    times.append(time.perf_counter() - t0)
  if not bool(metrics["finite"]):
    raise FloatingPointError("the benchmarked step produced a non-finite loss")
  return compile_s, times


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv=None):
  args = parse_args(argv)
  if args.devices > 1 and "jax" not in sys.modules:
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  import jax
  step_fn, state, batch, n_params = build(
      args.parameterization, args.mode, args.batch, args.devices, args.seed,
      args.config, args.set)
  compile_s, times = measure(step_fn, state, batch, args.steps, args.warmup)
  median = statistics.median(times)
  dev = jax.devices()[0]
  result = {
      "images_per_s": round(args.batch / median, 1),
      "median_step_s": round(median, 5),
      "min_step_s": round(min(times), 5),
      "compile_s": round(compile_s, 3),
      "peak_rss_mb": round(peak_rss_mb(), 1),
      "params": n_params,
      "config": args.config,
      "overrides": args.set,
      "parameterization": args.parameterization,
      "mode": args.mode,
      "batch": args.batch,
      "steps": args.steps,
      "devices": args.devices,
      "device": f"{dev.platform}:{dev.device_kind}",
      "jax_version": jax.__version__,
  }
  print(f"{args.config} {args.parameterization}/{args.mode} batch {args.batch}: "
        f"{n_params:,} params | compile {compile_s:.2f} s | median step "
        f"{median * 1e3:.2f} ms | {result['images_per_s']:.0f} img/s | "
        f"peak RSS {result['peak_rss_mb']:.0f} MB")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
