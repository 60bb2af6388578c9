"""Is a run's denoiser as sure of itself as it is right? Second-order Tweedie.

python bench/tweedie_calibration.py --data_dir /path/to/mnist RUN[:STEP] [RUN[:STEP] ...]
  [--num_images 200] [--probes 2] [--sigmas 0.05,0.1,0.3,0.5,1,2,5] [--kappa 1]
  [--out results.json]

For the exact posterior mean D(x) = E[x0 | x] at noise sigma, Cov[x0 | x] =
sigma^2 dD/dx, so the mean squared error per pixel equals sigma^2
E[tr(dD/dx)] / d. For each run (its EMA weights) and sigma this prints, on
the first test images (num_images / 10 per class, true class, one noise per
image): the error per pixel, sigma^2 tr(dD/dx) / d (Hutchinson's estimate
with Rademacher probes, jax.jvp through the whole denoiser) and their ratio:
1 for a calibrated denoiser, below 1 for one whose D moves less with x than
its errors warrant (it contracts noise more than its own posterior would).
--kappa K measures the sharpened denoiser x + K (D(x) - x) instead (the
score times K, as sample.py --score_scale samples it): its implied variance
(1 - K) sigma^2 + K sigma^2 tr(dD/dx) / d turns negative once K is large
enough, so the ratio stops being a calibration (no posterior mean has it). MNIST (IDX
files, the offline source) only. docs/results.md, sessions 45 and 46.
"""
import argparse
import json

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("runs", nargs="+", help="train.py run folders, RUN or RUN:STEP")
  ap.add_argument("--data_dir", required=True, help="folder of MNIST's IDX .gz files")
  ap.add_argument("--num_images", type=int, default=200)
  ap.add_argument("--probes", type=int, default=2)
  ap.add_argument("--sigmas", default="0.05,0.1,0.3,0.5,1,2,5")
  ap.add_argument("--kappa", type=float, default=1.0,
                  help="measure x + K (D(x) - x), the score times K")
  ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
  args = ap.parse_args()
  sigmas = [float(s) for s in args.sigmas.split(",")]
  if args.num_images < 10 or args.probes < 1 or min(sigmas) <= 0 or not args.kappa > 0:
    ap.error("--num_images >= 10, --probes >= 1, sigmas > 0 and --kappa > 0")
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import data as data_lib, generate
  from scoreflow_jax.eval.diagnostics import balanced_subset, per_image_noise

  images, labels = data_lib.load_run_split("mnist", "test", "offline", args.data_dir, 0)
  idx = balanced_subset(labels, args.num_images, 10)
  batch = data_lib.to_model_batch(images[idx], labels[idx])
  x0 = jnp.asarray(batch["jpg"])
  n, d = x0.shape[0], int(np.prod(x0.shape[1:]))
  noise = per_image_noise(jax.random.key(0), jnp.arange(n), x0.shape[1:], x0.dtype)
  probes = [jax.random.rademacher(jax.random.key(1 + p), x0.shape, x0.dtype)
            for p in range(args.probes)]
  results = {"sigmas": sigmas, "num_images": n, "probes": args.probes,
             "kappa": args.kappa, "runs": {}}
  kappa = args.kappa
  for spec in args.runs:
    workdir, _, step = spec.partition(":")
    model, state, _ = generate.load_run(workdir, int(step) if step else None, log=lambda s: None)
    params = state.ema_params
    cond = model.condition(params, batch)

    @jax.jit
    def denoise_and_vjv(x, sigma, v):
      f = lambda y: y + kappa * (model.denoiser(params)(y, jnp.full((n,), sigma), cond) - y)
      out, jv = jax.jvp(f, (x,), (v,))  # per sample: the denoiser mixes no samples
      return out, jnp.sum(v * jv)

    name = f"{workdir.rstrip('/')} step {int(state.step)}"
    if kappa != 1:
      name += f", score x {kappa:g}"
    print(f"\n{name}\n  sigma    error/pixel  sigma^2 tr(dD/dx)/d  ratio")
    rows = {}
    for sigma in sigmas:
      x = x0 + sigma * noise
      traces = [denoise_and_vjv(x, sigma, v) for v in probes]
      err = float(jnp.mean((traces[0][0] - x0) ** 2))
      implied = float(np.mean([t[1] for t in traces])) / (n * d) * sigma**2
      rows[str(sigma)] = {"error": err, "implied": implied, "ratio": implied / err}
      print(f"  {sigma:<7g}  {err:.5f}      {implied:.5f}              {implied / err:.3f}",
            flush=True)
    results["runs"][name] = rows
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
