"""FD of one run's samples over score scales and sigma bands: which scale, and where.

python bench/score_scale_sweep.py --workdir RUN --data_dir /path/to/mnist \
  --classifier classifier.npz [--scales 1,1.5,2,2.5] [--intervals 0.1:1,0.03:1,0.1:2] \
  [--num_per_class 100] [--seed 0] [--sampler heun_edm --num_steps 18] \
  [--reference test|train|validation] --out sweep.json

For every scale k and band (lo, hi]: the run's samples with its score times k
where lo < sigma <= hi (guiders.score_scale, as sample.py --score_scale),
the run's sampler and steps (or --sampler, --num_steps), its EMA weights,
every setting from the same noise (--seed); scale 1 (none) is drawn once. Each is scored against the
same real images (evaluate.py's FD at the sample count, seed-0 reference;
--reference: the test split, or the run's training or validation images;
its help says how they can disagree),
with the real-vs-real floor, class accuracy and feature spread. Prints a
table, writes the JSON (--out) and a plot beside it (FD against k, a line
per band). One draw against one reference set: at 1k samples MNIST FDs
move by about 1-2 between draws (docs/results.md, session 9), so confirm a
choice with sample.py and evaluate.py --seed 0,1,2 on two draws. The MNIST
sweeps of session 46 are what this script automates (docs/results.md, "A
lower temperature at sigma 0.1-1"); docs/results.md, session 47.
"""
import argparse
import json
import os
import time

import numpy as np


def parse_intervals(text):
  """'0.1:1,0.03:1' -> [(0.1, 1.0), (0.03, 1.0)]; ValueError unless each is 0 <= lo < hi."""
  out = []
  for part in text.split(","):
    bounds = part.split(":")
    if len(bounds) != 2:
      raise ValueError(f"an interval is lo:hi, got {part!r}")
    lo, hi = (float(b) for b in bounds)
    if not 0 <= lo < hi:
      raise ValueError(f"an interval needs 0 <= lo < hi, got {part!r}")
    out.append((lo, hi))
  if len(set(out)) != len(out):
    raise ValueError(f"an interval is repeated in {text!r}")
  return out


def settings(scales, intervals):
  """(scale, interval or None) to draw: scale 1 once (no interval), the others
  once per interval, in the order given."""
  out = [(1.0, None)] if 1.0 in scales else []
  out += [(k, iv) for k in scales if k != 1.0 for iv in intervals]
  return out


def plot(results, path, title=""):
  """FD against the scale, a line per band; the unscaled FD dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  plain = [r for r in results if r["interval"] is None]
  bands = sorted({tuple(r["interval"]) for r in results if r["interval"] is not None})
  for band in bands:
    rows = sorted((r for r in results if r["interval"] is not None
                   and tuple(r["interval"]) == band), key=lambda r: r["scale"])
    xs = ([1.0] if plain else []) + [r["scale"] for r in rows]
    ys = ([plain[0]["fd"]] if plain else []) + [r["fd"] for r in rows]
    ax.plot(xs, ys, "o-", label=f"score x k on ({band[0]:g}, {band[1]:g}]")
  if plain:
    ax.axhline(plain[0]["fd"], ls="--", c="gray", lw=1, label="unscaled")
  ax.axhline(results[0]["fd_floor"], ls=":", c="k", lw=1, label="real-vs-real floor")
  ax.set_xlabel("score scale k")
  ax.set_ylabel(f"FD ({results[0]['num_samples']} samples)")
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a train.py run folder")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--data_dir", required=True, help="folder of the data set's files "
                  "(the offline source: MNIST's IDX .gz files)")
  ap.add_argument("--classifier", required=True, help="train_classifier.py's .npz")
  ap.add_argument("--reference", default="test", choices=("test", "train", "validation"),
                  help="the real images to score against: the test split (default), "
                  "the run's training images, or its held-out validation split "
                  "(data.holdout). The model and the classifier saw the training "
                  "images; on MNIST the latent conv flow's gain from 1.5 is -1.8 "
                  "against test and -0.8 against train (2k, 6 evaluations), and one "
                  "1k draw against train ranked 1 first (docs/results.md, session "
                  "47): confirm a choice on two 2k draws. Validation is unseen by "
                  "the classifier only if it was trained with the same holdout")
  ap.add_argument("--dataset", default="mnist", help="whose test split to score against "
                  "(offline files in --data_dir; the classifier's data set, as evaluate.py)")
  ap.add_argument("--scales", default="1,1.5,2,2.5", help="comma-separated, each > 0")
  ap.add_argument("--intervals", default="0.1:1", help="lo:hi,...: the bands to scale in")
  ap.add_argument("--num_per_class", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0, help="sampling seed (one noise for all)")
  ap.add_argument("--sampler", default=None, help="default: the run's sampling.sampler")
  ap.add_argument("--num_steps", type=int, default=None,
                  help="sampler steps (default: the run's sampling.num_steps)")
  ap.add_argument("--cfg_scale", type=float, default=1.0, help="guidance (1: none)")
  ap.add_argument("--batch_size", type=int, default=500)
  ap.add_argument("--out", required=True, help="a .json that does not exist yet; the plot "
                  "goes beside it (.png)")
  args = ap.parse_args()
  try:
    scales = [float(k) for k in args.scales.split(",")]
    intervals = parse_intervals(args.intervals)
  except ValueError as e:
    ap.error(f"--scales / --intervals: {e}")
  if not all(np.isfinite(k) and k > 0 for k in scales) or len(set(scales)) != len(scales):
    ap.error(f"--scales must be distinct finite numbers > 0, got {args.scales}")
  if min(args.num_per_class, args.batch_size, args.num_steps or 1) < 1:
    ap.error("--num_per_class, --batch_size and --num_steps must be >= 1")
  if not args.out.endswith(".json"):
    ap.error(f"--out must end in .json, got {args.out}")
  png = args.out[:-len(".json")] + ".png"
  for path in (args.out, png):
    if os.path.exists(path):
      ap.error(f"{path} exists; choose another --out (nothing was replaced)")
  import jax
  from scoreflow_jax import data as data_lib, generate, run_config
  from scoreflow_jax.eval import classifier as classifier_lib, metrics

  model, state, config = generate.load_run(args.workdir, args.step, args.sampler,
                                           args.num_steps, log=lambda s: None)
  classes = run_config.classes(config)
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  ref, ref_labels = data_lib.load_run_split(args.dataset, args.reference, "offline",
                                            args.data_dir, config.data.get("holdout", 0))
  classifier = classifier_lib.load_classifier(args.classifier)[0]
  cache = metrics.ClassifierCache(classifier)
  shape = data_lib.image_shape(config.data)
  todo = settings(scales, intervals)
  print(f"{args.workdir} step {int(state.step)}: {len(todo)} settings x {len(labels)} "
        f"samples ({config.sampling.sampler} {config.sampling.num_steps}, cfg "
        f"{args.cfg_scale:g}, seed {args.seed}) against {len(ref)} {args.reference} images",
        flush=True)
  results = []
  for i, (k, iv) in enumerate(todo):
    t0 = time.perf_counter()
    images = generate.generate_images(
        model, state.ema_params, config.sampling, labels, jax.random.key(args.seed), shape,
        args.batch_size, cfg_scale=args.cfg_scale,
        score_scale=generate.NO_SCORE_SCALE if iv is None else (k, iv))
    seconds = time.perf_counter() - t0
    if not np.isfinite(images).all():
      r = {"fd": float("nan"), "fd_floor": float("nan"), "class_accuracy": None,
           "feature_spread": float("nan"), "num_samples": len(images), "diverged": True}
    else:
      r = metrics.evaluate_samples(classifier, images, labels, ref, ref_labels,
                                   n=len(images), seed=0, cache=cache)
    row = {"scale": k, "interval": None if iv is None else list(iv), "seconds": seconds,
           **{key: r[key] for key in ("fd", "fd_floor", "class_accuracy", "feature_spread",
                                      "num_samples")},
           "diverged": bool(r.get("diverged", False))}
    results.append(row)
    where = "none" if iv is None else f"x {k:g} on ({iv[0]:g}, {iv[1]:g}]"
    acc = "-" if row["class_accuracy"] is None else f"{100 * row['class_accuracy']:.2f}%"
    print(f"[{i + 1}/{len(todo)}] {where:>22}: FD {row['fd']:7.2f} (floor "
          f"{row['fd_floor']:.2f}), acc {acc}, spread {row['feature_spread']:.3f}, "
          f"{seconds:.0f} s{'  DIVERGED' if row['diverged'] else ''}", flush=True)
  best = min((r for r in results if np.isfinite(r["fd"])), key=lambda r: r["fd"], default=None)
  summary = {"workdir": os.path.abspath(args.workdir), "step": int(state.step),
             "sampler": config.sampling.sampler, "num_steps": int(config.sampling.num_steps),
             "cfg_scale": args.cfg_scale, "seed": args.seed, "reference": args.reference,
             "results": results,
             "best": best}
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=1, allow_nan=True)
  finite = [r for r in results if np.isfinite(r["fd"])]
  if finite:
    plot(finite, png, f"{os.path.basename(os.path.abspath(args.workdir))} step "
                      f"{int(state.step)}, {len(labels)} samples, seed {args.seed}, "
                      f"against {args.reference}")
  if best is not None:
    where = ("unscaled" if best["interval"] is None else
             f"--score_scale {best['scale']:g} --score_scale_interval "
             f"{best['interval'][0]:g},{best['interval'][1]:g}")
    print(f"lowest FD {best['fd']:.2f}: {where} (one draw: confirm on two draws and "
          f"three references) -> {args.out}{', ' + png if finite else ''}")


if __name__ == "__main__":
  main()
