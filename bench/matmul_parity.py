"""How fast one framework multiplies the train step's matrices, against the other.

The MNIST train step is a chain of small matrix products (M = batch = 128
rows; K, N between 128 and 1040: the coupling MLPs, the embeddings, the seed's
score head). This times, for each such shape, R products acc += tanh(x @ W_r)
in one compiled JAX program (lax.scan) and, if PyTorch is importable
(``--torch_python`` runs it in another interpreter), in a PyTorch eager loop
with the same number of intra-op threads. The ratio says how much of a
whole-step speed-up can come from the matrix products themselves.

  python bench/matmul_parity.py --torch_python /path/to/torch-venv/bin/python

Prints one JSON line per shape and framework: us per product, GFLOP/s.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(128, 520, 128), (128, 128, 128), (128, 128, 1040), (128, 1040, 512),
          (128, 512, 128), (128, 512, 784)]


def _time(fn, repeats):
  fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def run_jax(r, repeats):
  import jax
  import jax.numpy as jnp
  out = []
  for m, k, n in SHAPES:
    x = jnp.full((m, k), 0.01)
    ws = jnp.full((r, k, n), 0.001)

    @jax.jit
    def chain(x, ws):
      body = lambda acc, w: (acc + jnp.tanh(x @ w), None)
      return jax.lax.scan(body, jnp.zeros((m, n)), ws)[0]

    t = _time(lambda: jax.block_until_ready(chain(x, ws)), repeats) / r
    out.append(dict(framework=f"jax {jax.__version__}", shape=[m, k, n],
                    us=round(t * 1e6, 1), gflops=round(2 * m * k * n / t / 1e9, 1)))
  return out


def run_torch(r, repeats, threads):
  import torch
  torch.set_num_threads(threads)
  out = []
  for m, k, n in SHAPES:
    x = torch.full((m, k), 0.01)
    ws = torch.full((r, k, n), 0.001)

    def chain():
      acc = torch.zeros(m, n)
      for i in range(r):
        acc = acc + torch.tanh(x @ ws[i])
      return acc

    t = _time(chain, repeats) / r
    out.append(dict(framework=f"torch {torch.__version__}", shape=[m, k, n],
                    us=round(t * 1e6, 1), gflops=round(2 * m * k * n / t / 1e9, 1)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--products", type=int, default=50, help="R products per timed call")
  p.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  p.add_argument("--framework", choices=["jax", "torch"], default="jax")
  p.add_argument("--torch_python", default=None,
                 help="a Python with PyTorch: also run the PyTorch side there")
  a = p.parse_args()
  rows = (run_jax if a.framework == "jax" else
          lambda r, n: run_torch(r, n, a.threads))(a.products, a.repeats)
  for row in rows:
    print(json.dumps(row))
  if a.torch_python and a.framework == "jax":
    sys.stdout.flush()
    subprocess.run([a.torch_python, __file__, "--framework", "torch", "--products",
                    str(a.products), "--repeats", str(a.repeats), "--threads",
                    str(a.threads)], check=True)


if __name__ == "__main__":
  main()
