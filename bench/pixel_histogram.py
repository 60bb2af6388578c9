"""Pixel-value histograms of sample files next to real MNIST test images.

python bench/pixel_histogram.py --data_dir /path/to/mnist a.npz [b.npz ...] [--num_real 2000]

For each file of images in [-1, 1] (sample.py's .npz) and for the first
--num_real test images: the fraction of pixels in each of the bins
[-1, -0.98), [-0.98, -0.9), [-0.9, -0.5), [-0.5, 0), [0, 0.5), [0.5, 0.9),
[0.9, 1] (real MNIST is nearly two-valued: 82% of its pixels in the first,
7% in the last), the grey fraction (-0.9 to 0.9: soft stroke edges), and
the haze: the fraction of background pixels at least 3 pixels from any
stroke pixel (> 0) that are above -0.9 (0 in real MNIST), with the total
variation distance of the histogram from the real one; then the mean pixel
value by distance from the nearest stroke pixel (the strokes, their edge,
a halo). What FD's features see as a blur, counted in pixels. docs/results.md, session 47.
"""
import argparse
import os
import sys

import numpy as np

BINS = (-1.0, -0.98, -0.9, -0.5, 0.0, 0.5, 0.9, 1.0)


def histogram(images):
  """Fraction of pixels per bin of ``BINS`` (the last bin closed)."""
  x = np.asarray(images, np.float64).ravel()
  counts, _ = np.histogram(np.clip(x, -1.0, 1.0), BINS)
  return counts / x.size


def haze(images, distance=3, distances=None):
  """Of the pixels at least ``distance`` from any pixel > 0 in their image,
  the fraction above -0.9; NaN if there are none. ``distances``: ``_distances``
  of these images, when the caller has them."""
  x = _squeeze(images)
  far = (_distances(x) if distances is None else distances) >= distance
  return float(np.mean(x[far] > -0.9)) if far.any() else float("nan")


RINGS = ((0, 1), (1, 2), (2, 3), (3, 5), (5, np.inf))  # px from the nearest stroke pixel


def _distances(x):
  """Per pixel, the distance to its image's nearest stroke pixel (> 0); an image
  without one is all background (inf: scipy's edt would measure from a corner)."""
  from scipy import ndimage
  return np.stack([ndimage.distance_transform_edt(~(im > 0)) if (im > 0).any()
                   else np.full(im.shape, np.inf) for im in x])


def _squeeze(images):
  x = np.asarray(images, np.float64)
  return x.reshape(x.shape[:3]) if x.ndim == 4 else x


def rings(images, distances=None):
  """Mean pixel value by distance from the nearest stroke pixel, one per ``RINGS``
  ring (0: the strokes; NaN for an empty ring): how sharp the edges are, and
  whether a faint halo lies around the strokes (real MNIST: -1 from 2 px on).
  ``distances`` as for ``haze``."""
  x = _squeeze(images)
  d = _distances(x) if distances is None else distances
  out = []
  for lo, hi in RINGS:
    ring = (d >= lo) & ((d < hi) | np.isinf(hi))  # the last ring: images without strokes too
    out.append(float(x[ring].mean()) if ring.any() else float("nan"))
  return out


def summary(images, real_hist=None):
  h = histogram(images)
  d = _distances(_squeeze(images))  # one distance transform per image, for both
  out = {"histogram": h.tolist(), "grey": float(h[2:6].sum()), "saturated": float(h[6]),
         "haze": haze(images, distances=d), "rings": rings(images, distances=d)}
  if real_hist is not None:
    out["tv_to_real"] = float(0.5 * np.abs(h - real_hist).sum())
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("files", nargs="+", help=".npz files with 'images' in [-1, 1]")
  ap.add_argument("--data_dir", required=True, help="folder of MNIST's IDX .gz files")
  ap.add_argument("--num_real", type=int, default=2000)
  args = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from scoreflow_jax import data as data_lib
  images, _ = data_lib.load_split("mnist", "test", "offline", args.data_dir)
  real = data_lib.to_model_images(images[:args.num_real])
  ref = summary(real)
  header = " ".join(f"[{a:g},{b:g})" for a, b in zip(BINS[:-1], BINS[1:]))
  print(f"{'':>24} {header} | grey  sat.  haze   TV")
  rows = [(f"real test ({len(real)})", ref)]
  for path in args.files:
    with np.load(path) as f:
      rows.append((os.path.basename(path), summary(f["images"], np.asarray(ref["histogram"]))))
  for name, r in rows:
    cells = " ".join(f"{v:.3f}" for v in r["histogram"])
    tv = r.get("tv_to_real")
    print(f"{name[-24:]:>24} {cells} | {r['grey']:.3f} {r['saturated']:.3f} "
          f"{r['haze']:.4f} {'' if tv is None else f'{tv:.3f}'}")
  print("\nmean pixel value by distance (px) from the nearest stroke pixel (> 0):")
  print(f"{'':>24} " + " ".join(f"{f'[{lo:g},{hi:g})':>8}" for lo, hi in RINGS))
  for name, r in rows:
    print(f"{name[-24:]:>24} " + " ".join(f"{v:8.4f}" for v in r["rings"]))


if __name__ == "__main__":
  main()
