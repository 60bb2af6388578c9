"""Where the train step's time goes: its pieces timed apart, and XLA's FLOPs.

python bench/step_pieces.py [--config mnist] [--parameterization preconditioned]
  [--batch 128] [--calls 40] [--set FIELD=VALUE ...] [--trace DIR]

Builds the step of bench/train_throughput.py (same model, batch and mesh of
one device) and times, each jitted alone and blocked on, the median of
--calls calls after two untimed ones:
  loss forward           the mean per-sample loss (score = jax.grad inside)
  loss + param gradient  jax.value_and_grad of it (the second-order backward)
  optimizer + EMA        AdamW's update and sgm's EMA on fixed gradients
  full step              train_step.make_train_step (all of it, one jit)
and prints XLA's cost analysis (FLOPs) of the first two and of the step.
--trace DIR also writes a jax.profiler trace of 20 full steps (TensorBoard's
profile plugin or Perfetto read it). The last line printed is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # pylint: disable=wrong-import-position


def timed(fn, args, calls):
  """Median seconds of ``calls`` blocked calls of ``fn(*args)``, after two."""
  import jax
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def flops(fn, args):
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: a list
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="mnist")
  p.add_argument("--parameterization", default="preconditioned",
                 choices=("seed", "preconditioned"))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--calls", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  p.add_argument("--trace", default=None, help="folder for a jax.profiler trace")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import optax
  from scoreflow_jax import ema as ema_lib

  parts = {}
  step_fn, state, batch, n_params = train_throughput.build(
      args.parameterization, batch_size=args.batch, seed=args.seed,
      config_name=args.config, overrides=args.set, parts=parts)
  model, tx, config = parts["model"], parts["tx"], parts["config"]
  params = state.params
  local = jax.device_get(batch)  # one device: the whole batch
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(
      jnp.arange(args.batch))

  def loss(params, batch, keys):
    return jnp.mean(model.per_sample_loss(params, batch, keys)[0])

  loss_fwd = jax.jit(loss)
  loss_grad = jax.jit(jax.value_and_grad(loss))
  grads = loss_grad(params, local, keys)[1]

  @jax.jit
  def optimizer(grads, opt_state, params, ema_params, n):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, ema_lib.ema_update(ema_params, params, n, config.ema.decay)

  opt_args = (grads, state.opt_state, params, state.ema_params, state.ema_num_updates)
  results = {"config": args.config, "parameterization": args.parameterization,
             "batch": args.batch, "n_params": n_params, "backend": jax.default_backend(),
             "loss_forward_ms": 1e3 * timed(loss_fwd, (params, local, keys), args.calls),
             "loss_and_grad_ms": 1e3 * timed(loss_grad, (params, local, keys), args.calls),
             "optimizer_ema_ms": 1e3 * timed(optimizer, opt_args, args.calls)}
  # the full step donates its state: each call feeds the next
  holder = [state]
  def full(batch):
    holder[0], metrics = step_fn(holder[0], batch)
    return metrics
  results["full_step_ms"] = 1e3 * timed(full, (batch,), args.calls)
  results["gflop_loss_forward"] = flops(loss_fwd, (params, local, keys)) / 1e9
  results["gflop_loss_and_grad"] = flops(loss_grad, (params, local, keys)) / 1e9
  if args.trace:
    with jax.profiler.trace(args.trace):
      for _ in range(20):
        jax.block_until_ready(full(batch))
    results["trace"] = os.path.abspath(args.trace)
  for k, v in results.items():
    print(f"{k:22s} {v:.2f}" if isinstance(v, float) else f"{k:22s} {v}")
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
