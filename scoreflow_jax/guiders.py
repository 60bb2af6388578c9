"""Guiders: how a conditional denoiser is combined with its unconditional twin,
and what a sampler may do to the combined denoiser (a score scale, a switch)."""
import math

import jax
import jax.numpy as jnp


def identity_guider(denoise_fn):
  """sgm's IdentityGuider: ``guided(x, sigma, cond, uncond) = denoise_fn(x, sigma, cond)``."""

  def guided(x, sigma, cond, uncond=None):
    del uncond
    return denoise_fn(x, sigma, cond)

  return guided


def vanilla_cfg(denoise_fn, scale, sigma_interval=None):
  """sgm's VanillaCFG: one denoiser call on the doubled batch.

  The batch is ``[x, x]`` with conditioning ``[uncond, cond]`` (the
  unconditional half first, as sgm's ``prepare_inputs`` concatenates
  ``(uc[k], c[k])``); the result is ``x_u + scale * (x_c - x_u)``.
  Every entry of ``cond`` must have a matching entry in ``uncond``.

  ``sigma_interval=(lo, hi)`` guides only where lo < sigma <= hi and returns
  the conditional output x_c elsewhere (guidance in a limited interval,
  Kynkaanniemi et al. 2024); None guides at every sigma, as sgm does. When
  no sample of the batch is inside (the samplers give every sample the same
  sigma), one ``lax.cond`` makes a single conditional call on the batch
  instead of the doubled one: the unconditional half is not evaluated where
  it would be discarded.
  """
  if sigma_interval is not None:
    lo, hi = _interval(sigma_interval, "")

  def doubled(x, sigma, cond, uncond):
    x_in = jnp.concatenate([x, x], axis=0)
    s_in = jnp.concatenate([sigma, sigma], axis=0)
    c_in = {k: jnp.concatenate([uncond[k], cond[k]], axis=0) for k in cond}
    return jnp.split(denoise_fn(x_in, s_in, c_in), 2, axis=0)

  def guided(x, sigma, cond, uncond):
    if uncond is None:
      raise ValueError("classifier-free guidance needs the unconditional "
                       "conditioning: close_over(guided, cond, uncond) with (cond, "
                       "uncond) = model.unconditional(params, batch)")
    missing = set(cond) - set(uncond)
    if missing:
      raise ValueError(f"uncond lacks the conditioning keys {sorted(missing)}; "
                       "build it with GeneralConditioner.unconditional(...)")
    if sigma_interval is None:
      x_u, x_c = doubled(x, sigma, cond, uncond)
      return x_u + scale * (x_c - x_u)
    inside = (sigma > lo) & (sigma <= hi)

    def guide_inside():  # per sample: guided inside, x_c outside
      x_u, x_c = doubled(x, sigma, cond, uncond)
      where = inside.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(where, x_u + scale * (x_c - x_u), x_c)

    return jax.lax.cond(jnp.any(inside), guide_inside, lambda: denoise_fn(x, sigma, cond))

  return guided


def _interval(sigma_interval, owner):
  """(lo, hi) as floats; ValueError unless 0 <= lo < hi (``owner`` prefixes the
  message, e.g. "score scale's ")."""
  lo, hi = (float(v) for v in sigma_interval)
  if not 0.0 <= lo < hi:
    raise ValueError(f"{owner}sigma_interval must be (lo, hi) with 0 <= lo < hi, got "
                     f"{tuple(sigma_interval)}")
  return lo, hi


def score_scale(denoise, scale: float, sigma_interval):
  """A closed-over denoiser ``denoise(x, sigma)`` whose score is ``scale``
  times its own where lo < sigma <= hi: x + scale (D(x) - x) there, D
  elsewhere (per sample).

  D = x + sigma^2 grad E gives x + sigma^2 grad(scale E): still the exact
  gradient of an energy, the noisy density raised to the power ``scale`` (a
  temperature 1 / scale), no extra network call. ``sigma_interval`` is
  required: on MNIST (docs/results.md, sessions 46-47) scale 1.5-2 in
  (0.1, 1] lowers the pixel flows' FD by a quarter to a third and 1.5 the
  latent conv flow's (where 2 raises it), while at every sigma a scale
  ruins the samples (FD 41 -> 194). The best scale is the model's.
  """
  scale = float(scale)
  if sigma_interval is None or len(sigma_interval) != 2:
    raise ValueError("a score scale needs its sigma_interval (lo, hi): where to scale; "
                     f"got {sigma_interval!r}")
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"score scale must be a finite number > 0, got {scale}")
  lo, hi = _interval(sigma_interval, "score scale's ")

  def scaled(x, sigma):
    d = denoise(x, sigma)
    inside = ((sigma > lo) & (sigma <= hi)).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(inside, x + scale * (d - x), d)

  return scaled


def close_over(guided, cond, uncond=None):
  """Binds conditioning: returns ``denoise_fn(x, sigma)`` for the samplers."""
  return lambda x, sigma: guided(x, sigma, cond, uncond)


def switch(high, low, sigma_switch: float):
  """Two closed-over denoisers as one: ``high(x, sigma)`` where sigma >
  ``sigma_switch``, ``low(x, sigma)`` at or below it (sample.py
  ``--low_noise_workdir``: which noise range of a model its samples are made
  or lost in). For the samplers, which call with one sigma broadcast to (B,):
  one branch runs per call (``jax.lax.cond`` on ``sigma[0]``)."""

  def denoise(x, sigma):
    return jax.lax.cond(sigma[0] > sigma_switch, high, low, x, sigma)

  return denoise
