"""Guiders: how a conditional denoiser is combined with its unconditional twin."""
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
    lo, hi = (float(v) for v in sigma_interval)
    if not 0.0 <= lo < hi:
      raise ValueError(f"sigma_interval must be (lo, hi) with 0 <= lo < hi, got "
                       f"{tuple(sigma_interval)}")

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


def close_over(guided, cond, uncond=None):
  """Binds conditioning: returns ``denoise_fn(x, sigma)`` for the samplers."""
  return lambda x, sigma: guided(x, sigma, cond, uncond)


def switch(high, low, sigma_switch: float):
  """Two closed-over denoisers as one: ``high(x, sigma)`` where sigma >
  ``sigma_switch``, ``low(x, sigma)`` at or below it (sample.py
  ``--low_noise_workdir``: which noise range of a model its samples are made
  or lost in). For the samplers, which call with one sigma broadcast to (B,):
  one branch runs per call (``jax.lax.cond`` on ``sigma[0]``)."""
  import jax

  def denoise(x, sigma):
    return jax.lax.cond(sigma[0] > sigma_switch, high, low, x, sigma)

  return denoise
