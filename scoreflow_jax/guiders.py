"""Guiders: how a conditional denoiser is combined with its unconditional twin."""
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
  Kynkaanniemi et al. 2024); None guides at every sigma, as sgm does.
  """
  if sigma_interval is not None:
    lo, hi = (float(v) for v in sigma_interval)
    if not 0.0 <= lo < hi:
      raise ValueError(f"sigma_interval must be (lo, hi) with 0 <= lo < hi, got "
                       f"{tuple(sigma_interval)}")

  def guided(x, sigma, cond, uncond):
    if uncond is None:
      raise ValueError("classifier-free guidance needs the unconditional "
                       "conditioning: close_over(guided, cond, uncond) with (cond, "
                       "uncond) = model.unconditional(params, batch)")
    missing = set(cond) - set(uncond)
    if missing:
      raise ValueError(f"uncond lacks the conditioning keys {sorted(missing)}; "
                       "build it with GeneralConditioner.unconditional(...)")
    x_in = jnp.concatenate([x, x], axis=0)
    s_in = jnp.concatenate([sigma, sigma], axis=0)
    c_in = {k: jnp.concatenate([uncond[k], cond[k]], axis=0) for k in cond}
    out = denoise_fn(x_in, s_in, c_in)
    x_u, x_c = jnp.split(out, 2, axis=0)
    s = scale
    if sigma_interval is not None:  # per sample: scale inside, 1 (x_c) outside
      s = jnp.where((sigma > lo) & (sigma <= hi), scale, 1.0).astype(out.dtype)
      s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return x_u + s * (x_c - x_u)

  return guided


def close_over(guided, cond, uncond=None):
  """Binds conditioning: returns ``denoise_fn(x, sigma)`` for the samplers."""
  return lambda x, sigma: guided(x, sigma, cond, uncond)
