"""The training loss of the best *linear* denoiser: a reference line for loss curves.

For data with mean m and covariance S, the linear map of x = x0 + sigma n
with the least squared error is D(x) = m + S (S + sigma^2 I)^-1 (x - m) (the
posterior mean if the data were Gaussian). Its error depends only on the
first two moments, so for any data, with eigenvalues w_i of S in d dims,

    E |D(x) - x0|^2 / d = mean_i sigma^2 w_i / (w_i + sigma^2),

and EDM's weighted loss is that times lambda(sigma) = (sigma^2 + sd^2) /
(sigma sd)^2. Per class (the class known: the class's own m and S) and
without it (the whole data set), mixed as training mixes them through
label dropout (``ucg_rate``). A network that does worse than this in some
sigma range does worse there than a per-class Gaussian model of the data.

The same per-class Gaussian model can also be *sampled* (``--samples_out``):
exact samples of N(m_c, S_c), clipped to [-1, 1], in sample.py's .npz format,
so evaluate.py scores the Gaussian model of the data as it scores a network
(what a diffusion model with the best linear denoiser would draw).

python -m scoreflow_jax.eval.linear_floor --data_dir /path/to/mnist \
    [--samples_out gaussian_1k.npz --num_per_class 100]
"""
import argparse
import json

import numpy as np

SIGMA_BINS = ((0.0, 0.1), (0.1, 0.5), (0.5, 2.0), (2.0, float("inf")))


def covariance_eigenvalues(x):
  """Eigenvalues (d,) of the covariance of ``x`` (N, ...) flattened, float64, >= 0."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0.0, None)


def linear_denoiser_loss(eigenvalues, sigma, sigma_data):
  """EDM-weighted loss per dimension of the best linear denoiser, for each sigma."""
  w = np.asarray(eigenvalues, np.float64)[None, :]
  sigma = np.asarray(sigma, np.float64).reshape(-1)
  s2 = sigma[:, None] ** 2
  mse = np.mean(s2 * w / (w + s2), axis=1)
  weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # edm.edm_weighting
  return weight * mse


def linear_floor(images, labels, sigma_data=0.5, ucg_rate=0.2, p_mean=-1.2,
                 p_std=1.2, num_sigmas=20_000, seed=0):
  """Mean loss of the best linear denoisers over EDM's sigma distribution, per bin.

  Returns {"class_conditional", "unconditional", "training_mix"}, each a dict
  with "all" and one entry per sigma bin ("0-0.1", ...), as in the trainer's
  ``train/loss_sigma_*`` metrics.
  """
  images = np.asarray(images, np.float64).reshape(len(images), -1)
  labels = np.asarray(labels)
  sigma = np.exp(p_mean + p_std * np.random.default_rng(seed).standard_normal(num_sigmas))
  classes = np.unique(labels)
  weights = np.array([np.mean(labels == c) for c in classes])
  cond = sum(p * linear_denoiser_loss(covariance_eigenvalues(images[labels == c]),
                                      sigma, sigma_data)
             for p, c in zip(weights, classes))
  uncond = linear_denoiser_loss(covariance_eigenvalues(images), sigma, sigma_data)
  mix = (1.0 - ucg_rate) * cond + ucg_rate * uncond

  def by_bin(v):
    out = {"all": float(v.mean())}
    for lo, hi in SIGMA_BINS:
      sel = (sigma >= lo) & (sigma < hi)
      out[f"{lo:g}-{hi:g}"] = float(v[sel].mean())
    return out

  return {"class_conditional": by_bin(cond), "unconditional": by_bin(uncond),
          "training_mix": by_bin(mix)}


def gaussian_samples(images, labels, num_per_class, seed=0):
  """Samples of each class's Gaussian N(m_c, S_c) (the data's class means and
  covariances), clipped to [-1, 1]: (images (C n, *shape) float32, labels (C n,))."""
  shape = np.shape(images)[1:]
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  out, out_labels = [], []
  for c in np.unique(labels):
    xc = x[labels == c]
    w, v = np.linalg.eigh(np.cov(xc, rowvar=False))
    z = rng.standard_normal((num_per_class, x.shape[1]))
    out.append(xc.mean(0) + (z * np.sqrt(np.clip(w, 0.0, None))) @ v.T)
    out_labels.append(np.full(num_per_class, c, np.int32))
  samples = np.clip(np.concatenate(out), -1.0, 1.0).reshape(-1, *shape)
  return samples.astype(np.float32), np.concatenate(out_labels)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True, help="folder of MNIST's IDX files")
  p.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
  p.add_argument("--ucg_rate", type=float, default=0.2)
  p.add_argument("--sigma_data", type=float, default=0.5)
  p.add_argument("--samples_out", default=None,
                 help="also write per-class Gaussian samples here (.npz for evaluate.py)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --samples_out")
  p.add_argument("--num_per_class", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.samples_out:  # before the work: a user's file is not replaced unasked
    from scoreflow_jax.outputs import check_output
    if not args.samples_out.endswith(".npz"):
      p.error(f"--samples_out {args.samples_out}: name a .npz file (evaluate.py reads it).")
    try:
      args.samples_out = check_output(args.samples_out, args.overwrite, "--samples_out")
    except OSError as e:
      p.error(str(e))
  from scoreflow_jax import data as data_lib
  images, labels = data_lib.load_split(args.dataset, "train", "offline", args.data_dir)
  x = images.astype(np.float64) / 127.5 - 1.0  # the pipeline's [-1, 1]
  result = linear_floor(x, labels, args.sigma_data, args.ucg_rate)
  for name, row in result.items():
    print(f"{name:18s} " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()))
  print(json.dumps(result))
  if args.samples_out:
    samples, sample_labels = gaussian_samples(x, labels, args.num_per_class, args.seed)
    from scoreflow_jax.outputs import replaced_when_done
    with replaced_when_done(args.samples_out) as f:  # a file object: np.savez adds no suffix
      np.savez(f, images=samples, labels=sample_labels)
    print(f"wrote {len(samples)} per-class Gaussian samples to {args.samples_out}")
  return result


if __name__ == "__main__":
  main()
