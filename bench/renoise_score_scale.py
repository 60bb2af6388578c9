"""FD of test images noised to a start sigma and sampled back, with and without a score scale.

python bench/renoise_score_scale.py --data_dir /path/to/mnist --classifier classifier.npz
  RUN [RUN ...] [--starts 0.3,0.5,1] [--kappa 2] [--interval 0.1,1] [--num_images 1000]

As evaluate.py --diagnose's FD by start sigma (the first num_images / 10
test images per class, true class, each noised once to the start sigma and
taken back to 0 by the run's sampler and steps from there, EMA weights;
scored against the other test images), once with the run's denoiser and
once with its score times KAPPA where lo < sigma <= hi (guiders.score_scale,
as sample.py --score_scale). Whether the scale helps only against what the
sampler brings down from high noise, or also from images that are exactly
the data noised. MNIST (IDX files, the offline source). docs/results.md,
session 46.
"""
import argparse


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("runs", nargs="+", help="train.py run folders")
  ap.add_argument("--data_dir", required=True, help="folder of MNIST's IDX .gz files")
  ap.add_argument("--classifier", required=True, help="train_classifier.py's .npz")
  ap.add_argument("--starts", default="0.3,0.5,1")
  ap.add_argument("--kappa", type=float, default=2.0)
  ap.add_argument("--interval", default="0.1,1", help="lo,hi: scaled where lo < sigma <= hi")
  ap.add_argument("--num_images", type=int, default=1000)
  args = ap.parse_args()
  starts = [float(s) for s in args.starts.split(",")]
  lo, hi = (float(v) for v in args.interval.split(","))
  if not (args.kappa > 0 and 0 <= lo < hi and args.num_images >= 20 and min(starts) > 0):
    ap.error("--kappa > 0, --interval lo,hi with 0 <= lo < hi, --num_images >= 20, starts > 0")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from scoreflow_jax import data as data_lib, generate, guiders
  from scoreflow_jax.eval import classifier as classifier_lib, diagnostics, metrics

  images, labels = data_lib.load_run_split("mnist", "test", "offline", args.data_dir, 0)
  idx = diagnostics.balanced_subset(labels, args.num_images, 10)
  rest = np.setdiff1d(np.arange(len(labels)), idx)
  classifier = classifier_lib.load_classifier(args.classifier)[0]
  cache = metrics.ClassifierCache(classifier)
  batch = data_lib.to_model_batch(images[idx], labels[idx])
  x0 = jnp.asarray(batch["jpg"])
  ref, ref_labels = images[rest], labels[rest]
  start = metrics.evaluate_samples(classifier, images[idx], labels[idx], ref, ref_labels,
                                   n=len(idx), cache=cache)
  print(f"the {len(idx)} unnoised test images: FD {start['fd']:.2f} against the other "
        f"test images (floor {start['fd_floor']:.2f})")
  for workdir in args.runs:
    model, state, config = generate.load_run(workdir, log=lambda s: None)
    params = state.ema_params
    cond = model.condition(params, batch)
    plain = lambda p, x, s, c: model.denoiser(p)(x, s, c)

    def scaled(p, x, s, c):
      own = lambda xx, ss: model.denoiser(p)(xx, ss, c)
      return guiders.score_scale(own, args.kappa, (lo, hi))(x, s)

    sc = config.sampling
    print(f"\n{workdir} step {int(state.step)}: FD (roughness), unscaled | score x "
          f"{args.kappa:g} on ({lo:g}, {hi:g}]")
    for s0 in starts:
      cells = []
      for den in (plain, scaled):
        out = diagnostics.renoise(den, params, x0, cond, s0, jax.random.key(0),
                                  sampler=sc.sampler, num_steps=sc.num_steps,
                                  sigma_min=sc.sigma_min, rho=sc.rho)
        r = metrics.evaluate_samples(classifier, np.clip(out, -1, 1), labels[idx], ref,
                                     ref_labels, n=len(idx), cache=cache)
        cells.append(f"{r['fd']:.2f} ({r['roughness']:.3f})")
      print(f"  from sigma {s0:g}: {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
  main()
