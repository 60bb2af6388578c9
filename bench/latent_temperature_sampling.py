"""Sample a density run with its base term and log-det weighted apart (Glow's temperature).

python bench/latent_temperature_sampling.py --workdir RUN [--step N] --base_scale A
  [--logdet_scale B] [--interval 0.1,1] [--num_per_class 100] [--seed 0] --out s.npz

A parameterization='density' run's log q(x | sigma, c) = log p(f(u)) +
log|det df/du|, u = c_in x, p the flow's base (N(0, I) or, with
gaussian_base, the noisy mixture). Where lo < sigma <= hi the sampler uses
D'(x) = x + sigma^2 grad_x [A log p(f(u)) + B log|det df/du|] instead: A = 1 / T^2
is Glow's sampling temperature T (the base drawn at T, pushed through the
inverse flow: still a normalised density of x for B = 1), B = 0 drops the
log-det. A = B = 1 is the run's own denoiser (tests/test_bench_probes.py);
A = B = kappa is bench/score_scale_sampling.py's score times kappa. The
run's sampler and steps, unguided, its EMA weights; writes images and
labels for evaluate.py --samples. docs/results.md, session 46.
"""
import argparse
import os

import numpy as np


class TemperedDensity:
  """The run's model whose ``denoiser`` is D' in the interval; the rest its own."""

  def __init__(self, model, base_scale, logdet_scale, lo, hi):
    network = getattr(model, "network", None)
    if getattr(network, "parameterization", None) != "density":
      raise ValueError("latent_temperature_sampling needs a run with "
                       "model.score_flow.parameterization='density' (a flow "
                       "density with a base term and a log-det)")
    self._model, self._a, self._b = model, base_scale, logdet_scale
    self._lo, self._hi = lo, hi

  def __getattr__(self, name):
    return getattr(self._model, name)

  def tempered_denoiser(self, params):
    """D'(x, sigma, cond) at every sigma (no interval)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from scoreflow_jax.edm import append_dims
    a, b = self._a, self._b

    def method(m, x, sigma, cond):
      _, _, c_in, c_noise = m._scalings(x, sigma)
      context = m._context(c_noise.reshape(sigma.shape), cond)
      base = m._density_base(sigma, cond, c_in)

      def summed(flow, u):
        z, log_det = m._flow_z(flow, u, context)
        if base is None:  # N(0, I)
          log_base = -0.5 * jnp.sum(z**2, axis=-1)
        else:
          log_base = base(flow.to_input_order(z))
        return jnp.sum(a * log_base + b * log_det)

      _, grad = nn.value_and_grad(summed, m.flow, c_in * x)
      return x + append_dims(sigma, x.ndim) ** 2 * c_in * grad[0]

    network = self._model.network
    return lambda x, sigma, cond: network.apply(
        {"params": params["network"]}, x, sigma, cond, method=method)

  def denoiser(self, params):
    import jax.numpy as jnp
    own, tempered = self._model.denoiser(params), self.tempered_denoiser(params)

    def denoise(x, sigma, cond):
      s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
      inside = (s > self._lo) & (s <= self._hi)
      return jnp.where(inside, tempered(x, sigma, cond), own(x, sigma, cond))
    return denoise


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, default=None)
  ap.add_argument("--base_scale", type=float, required=True, help="A = 1 / T^2")
  ap.add_argument("--logdet_scale", type=float, default=1.0, help="B (1: normalised)")
  ap.add_argument("--interval", default="0.1,1", help="lo,hi: D' where lo < sigma <= hi")
  ap.add_argument("--num_per_class", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=500)
  ap.add_argument("--out", required=True, help="an .npz that does not exist yet")
  args = ap.parse_args()
  lo, hi = (float(v) for v in args.interval.split(","))
  if not (args.base_scale > 0 and args.logdet_scale >= 0 and 0 <= lo < hi
          and args.out.endswith(".npz")):
    ap.error("--base_scale > 0, --logdet_scale >= 0, --interval lo,hi with "
             "0 <= lo < hi, --out ending in .npz")
  if os.path.exists(args.out):
    ap.error(f"{args.out} exists; choose another --out")
  import jax
  from scoreflow_jax import data as data_lib, generate, run_config
  model, state, config = generate.load_run(args.workdir, args.step)
  try:
    tempered = TemperedDensity(model, args.base_scale, args.logdet_scale, lo, hi)
  except ValueError as e:
    ap.error(str(e))
  classes = run_config.classes(config)
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  images = generate.generate_images(
      tempered, state.ema_params, config.sampling, labels, jax.random.key(args.seed),
      data_lib.image_shape(config.data), args.batch_size, cfg_scale=1.0,
      score_scale=generate.NO_SCORE_SCALE)  # its own tempering only, not the run's
  np.savez(args.out, images=images.astype(np.float32), labels=labels,
           step=np.int64(state.step), base_scale=np.float64(args.base_scale),
           logdet_scale=np.float64(args.logdet_scale), interval=np.asarray([lo, hi]))
  print(f"step {int(state.step)}, base x {args.base_scale:g}, log-det x "
        f"{args.logdet_scale:g} for sigma in ({lo:g}, {hi:g}]: {len(images)} images "
        f"-> {args.out}")


if __name__ == "__main__":
  main()
