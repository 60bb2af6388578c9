"""Train-step images/s on 1, 2, 4 (virtual) devices for the same global batch.

python bench/scaling.py --devices 1,2,4 --batch 128 --steps 30
Each device count runs in its own process (XLA_FLAGS must be set before JAX
starts). On a CPU, virtual devices share the same cores, so this shows the
data-parallel overhead, not a speed-up. Prints one JSON line per count.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(batch, steps, warmup, parameterization, dtype):
  import jax
  import numpy as np
  sys.path.insert(0, ROOT)
  from configs import mnist
  from scoreflow_jax import model as model_lib, train_step as ts
  config = mnist.get_config()
  config.model.score_flow.parameterization = parameterization
  config.model.score_flow.dtype = dtype
  model = model_lib.build_model(config)
  tx, schedule = ts.make_optimizer(config.optim, steps, frozen=model.frozen_module)
  rng = np.random.default_rng(0)
  batch_np = {"jpg": rng.uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32),
              "cls": rng.integers(0, 10, batch).astype(np.int32)}
  mesh = ts.make_mesh()
  state = ts.replicate(ts.create_train_state(model, tx, jax.random.key(0), batch_np), mesh)
  step = ts.make_train_step(model, tx, schedule, mesh, config.ema.decay)
  gb = ts.global_batch(batch_np, mesh)
  t0 = time.perf_counter()
  state, m = step(state, gb)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = step(state, gb)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, gb)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {"devices": jax.device_count(), "batch": batch, "median_step_s": med,
          "images_per_s": batch / med, "compile_s": compile_s,
          "device": jax.devices()[0].device_kind, "dtype": dtype,
          "parameterization": parameterization, "jax_version": jax.__version__}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--devices", default="1,2,4")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--parameterization", default="preconditioned")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(measure(a.batch, a.steps, a.warmup, a.parameterization, a.dtype)))
    return
  for n in [int(d) for d in a.devices.split(",")]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
      env.pop("XLA_FLAGS")  # real accelerators: use what is there
    out = subprocess.run([sys.executable, __file__, "--child", "1", "--batch", str(a.batch),
                          "--steps", str(a.steps), "--warmup", str(a.warmup),
                          "--parameterization", a.parameterization, "--dtype", a.dtype],
                         env=env, capture_output=True, text=True, check=True)
    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
