"""What a run pays before its first step and what reading checkpoints costs.

python bench/startup.py [--config mnist_conv_mixture] [--workdir logs/<run>]
                        [--saves N [--orbax_replica_parallel]]
Times the initial train state built op by op (``model.init`` outside jit, as
before session 18) and jitted (``train_step.create_train_state``), and checks
the two are equal bit for bit. With --workdir (a run with kept checkpoints),
also times one checkpoint's full restore against reading its ``params`` only
(``Checkpointer.restore(fields=...)``, what --average_from and --posthoc_ema
do per checkpoint), over up to --n checkpoints. With --saves N, times N
checkpoint saves (each waited for) of the state replicated on every device,
the first apart: with --orbax_replica_parallel, orbax's replica-parallel
save (each device writes a slice of every array), which checkpointing turns
off in a single process. Prints one JSON line.
"""
import argparse
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default="mnist_conv_mixture", help="a module in configs/")
  p.add_argument("--workdir", default=None)
  p.add_argument("--n", type=int, default=10, help="checkpoints to read")
  p.add_argument("--saves", type=int, default=0, help="checkpoint saves to time")
  p.add_argument("--orbax_replica_parallel", action="store_true")
  a = p.parse_args()
  import jax
  import numpy as np
  from scoreflow_jax import checkpointing, data, generate, model as model_lib, run_config
  from scoreflow_jax import train_step as ts
  config = importlib.import_module(f"configs.{a.config}").get_config()
  model = model_lib.build_model(config)
  tx, _ = ts.make_optimizer(config.optim, 100, frozen=model.frozen_module)
  shape = data.image_shape(config.data)
  sample = {"jpg": np.zeros((1,) + shape, np.float32), "cls": np.zeros((1,), np.int32)}
  key = jax.random.split(jax.random.key(0))[0]
  out = {"config": a.config, "device": str(jax.devices()[0])}

  # jitted first, so it pays the process's first-compile costs (conservative)
  t = time.perf_counter()
  state = jax.block_until_ready(ts.create_train_state(model, tx, jax.random.key(0), sample))
  out["init_jitted_s"] = round(time.perf_counter() - t, 2)
  t = time.perf_counter()
  eager = jax.block_until_ready(model.init(key, sample))
  out["init_op_by_op_s"] = round(time.perf_counter() - t, 2)
  out["bit_for_bit"] = all(np.array_equal(x, y) for x, y in
                           zip(jax.tree.leaves(eager), jax.tree.leaves(state.params)))

  if a.saves:
    import tempfile
    mesh = ts.make_mesh()
    times = []
    with tempfile.TemporaryDirectory() as d:
      ckpt = checkpointing.Checkpointer(d, max_to_keep=2)
      if a.orbax_replica_parallel:  # orbax's own default handler, back
        checkpointing.register_array_handler(use_replica_parallel=True)
      for i in range(a.saves):
        replicated = ts.replicate(state.replace(step=np.int32(i + 1)), mesh)
        t = time.perf_counter()
        ckpt.save(replicated, config)
        ckpt.wait()
        times.append(time.perf_counter() - t)
      ckpt.close()
    out.update(devices=mesh.size, replica_parallel=a.orbax_replica_parallel,
               first_save_s=round(times[0], 2),
               later_save_s=round(float(np.median(times[1:])), 3) if a.saves > 1 else None)

  if a.workdir:
    config = run_config.load(a.workdir)
    abstract = generate.abstract_train_state(model_lib.build_model(config), config)
    ckpt = checkpointing.Checkpointer(os.path.join(a.workdir, "checkpoints"), read_only=True)
    steps = ckpt.steps()[-a.n:]
    ckpt.restore(abstract, config, steps[0])  # warm the file cache and orbax
    full, part = [], []
    for s in steps:
      t = time.perf_counter()
      whole = ckpt.restore(abstract, config, s)
      full.append(time.perf_counter() - t)
      t = time.perf_counter()
      params = ckpt.restore(abstract, config, s, fields=("params",))["params"]
      part.append(time.perf_counter() - t)
      assert all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(whole.params), jax.tree.leaves(params)))
    ckpt.close()
    out.update(checkpoints=len(steps), restore_full_s=round(float(np.median(full)), 3),
               restore_params_only_s=round(float(np.median(part)), 3))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
