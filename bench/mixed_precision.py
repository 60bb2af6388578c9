"""How much bfloat16 matmuls in the coupling networks change the loss and the score.

python bench/mixed_precision.py [--workdir logs/<run>] [--data_dir /path/to/mnist]
Same float32 parameters, same batch and noise; the network is evaluated with
dtype float32 and bfloat16 (parameters, energy and score stay float32).
With --workdir, the run's EMA parameters are used (a trained network);
otherwise a freshly initialised one. Prints one JSON line.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", default=None)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--data_dir", default=None,
                 help="MNIST IDX folder: evaluate on test images (default: synthetic data)")
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  from configs import mnist
  from scoreflow_jax import data, model as model_lib
  config = mnist.get_config()
  if a.data_dir:
    images, labels = data.load_split("mnist", "test", "offline", a.data_dir)
    images, labels = images[:a.batch], labels[:a.batch]
  else:
    images, labels = data.make_synthetic(a.batch, seed=3)
  batch = data.to_model_batch(images, labels)
  if a.workdir:
    from scoreflow_jax import generate
    f32, state, config = generate.load_run(a.workdir)
    params = state.ema_params
  else:
    f32 = model_lib.build_model(config)
    params = f32.init(jax.random.key(0), batch)
  config.model.score_flow.dtype = "bfloat16"
  bf16 = model_lib.build_model(config)
  keys = jax.random.split(jax.random.key(1), a.batch)
  out = {"params": a.workdir or "init", "data": "mnist test" if a.data_dir else "synthetic",
         "device": jax.devices()[0].device_kind}
  l32, sig = jax.jit(f32.per_sample_loss)(params, batch, keys)
  l16, _ = jax.jit(bf16.per_sample_loss)(params, batch, keys)
  out["loss_f32"] = float(jnp.mean(l32))
  out["loss_bf16"] = float(jnp.mean(l16))
  out["loss_rel_diff"] = abs(out["loss_bf16"] - out["loss_f32"]) / out["loss_f32"]
  cond = f32.condition(params, batch)
  x = batch["jpg"]
  for s in (0.01, 0.1, 1.0, 10.0):
    sigma = jnp.full((a.batch,), s)
    xn = x + s * jax.random.normal(jax.random.key(2), x.shape)
    sc = lambda m: jax.jit(lambda p: m.network.apply({"params": p["network"]}, xn, sigma, cond,
                                                     method="score"))(params)
    s32, s16 = sc(f32), sc(bf16)
    out[f"score_rel_err_sigma_{s:g}"] = float(jnp.linalg.norm(s16 - s32) / jnp.linalg.norm(s32))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
