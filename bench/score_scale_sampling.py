"""Sample a run at a lower temperature: its score scaled by KAPPA in a sigma range.

python bench/score_scale_sampling.py --workdir RUN [--step N] --kappa 1.25
  [--interval 0.2,5] [--num_per_class 100] [--seed 0] --out samples.npz

D'(x) = x + KAPPA (D(x) - x) where lo < sigma <= hi, D elsewhere: the score
sigma^-2 (D - x) times KAPPA, the noisy densities raised to that power
(KAPPA > 1 sharpens them; with an exact energy it is the energy times KAPPA,
still a gradient). The run's sampler and steps, unguided, its EMA weights;
writes images and labels for evaluate.py --samples. docs/results.md,
session 45: whether a denoiser that is surer of itself explains a better FD.
Since session 46 this is sample.py's ``--score_scale KAPPA
--score_scale_interval lo,hi`` (guiders.score_scale), which also writes a
grid and records the settings; this script now calls it (the same images as
the session-45 version up to float32 rounding: at most 0.012 of a pixel).
"""
import argparse
import os

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, default=None)
  ap.add_argument("--kappa", type=float, required=True)
  ap.add_argument("--interval", default="0.2,5", help="lo,hi: scaled where lo < sigma <= hi")
  ap.add_argument("--num_per_class", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=500)
  ap.add_argument("--out", required=True, help="an .npz that does not exist yet")
  args = ap.parse_args()
  lo, hi = (float(v) for v in args.interval.split(","))
  if not (args.kappa > 0 and 0 <= lo < hi and args.out.endswith(".npz")):
    ap.error("--kappa > 0, --interval lo,hi with 0 <= lo < hi, --out ending in .npz")
  if os.path.exists(args.out):
    ap.error(f"{args.out} exists; choose another --out")
  import jax
  from scoreflow_jax import data as data_lib, generate, run_config
  model, state, config = generate.load_run(args.workdir, args.step)
  classes = run_config.classes(config)
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  images = generate.generate_images(
      model, state.ema_params, config.sampling, labels, jax.random.key(args.seed),
      data_lib.image_shape(config.data), args.batch_size, cfg_scale=1.0,
      score_scale=(args.kappa, (lo, hi)))
  np.savez(args.out, images=images.astype(np.float32), labels=labels,
           step=np.int64(state.step), kappa=np.float64(args.kappa),
           interval=np.asarray([lo, hi]))
  print(f"step {int(state.step)}, score x {args.kappa:g} for sigma in ({lo:g}, {hi:g}]: "
        f"{len(images)} images -> {args.out}")


if __name__ == "__main__":
  main()
