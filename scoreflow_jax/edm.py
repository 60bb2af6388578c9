"""EDM preconditioning, loss weighting, sigma sampling and discretization.

Pure functions with the semantics of sgm's ``EDMScaling``, ``EDMWeighting``,
``EDMSampling`` and ``EDMDiscretization`` (Karras et al. 2022). Every function
is elementwise in ``sigma`` and keeps its floating dtype (float64 in, float64
out when x64 is enabled); an integer ``sigma`` is taken as float32.
"""
import jax
import jax.numpy as jnp
import numpy as np


def as_float(sigma):
  """``sigma`` as a floating array (integers as float32: in their own dtype,
  sigma_data 0.5 would become 0)."""
  sigma = jnp.asarray(sigma)
  return sigma if jnp.issubdtype(sigma.dtype, jnp.floating) else sigma.astype(jnp.float32)


def edm_scaling(sigma, sigma_data=0.5):
  """Returns ``(c_skip, c_out, c_in, c_noise)`` for noise level ``sigma``.

  c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = 0.25 log(sigma) (sgm's EDMScaling;
  the EDM paper's c_noise is the same 1/4 ln sigma).
  """
  sigma = as_float(sigma)
  sd = jnp.asarray(sigma_data, sigma.dtype)
  total = sigma**2 + sd**2
  c_skip = sd**2 / total
  c_out = sigma * sd / jnp.sqrt(total)
  c_in = 1.0 / jnp.sqrt(total)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def edm_weighting(sigma, sigma_data=0.5):
  """Loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""
  sigma = as_float(sigma)
  sd = jnp.asarray(sigma_data, sigma.dtype)
  return (sigma**2 + sd**2) / (sigma * sd) ** 2


def edm_sigma_sampling(key, n: int, p_mean=-1.2, p_std=1.2, rand=None,
                       dtype=jnp.float32):
  """Draws ``n`` training noise levels, log sigma ~ N(p_mean, p_std^2).

  ``rand`` (standard normal, shape (n,)) replaces the draw from ``key`` when
  given, which makes the function testable; its dtype is kept.
  """
  if rand is None:
    rand = jax.random.normal(key, (n,), dtype)
  rand = jnp.asarray(rand)
  return jnp.exp(p_mean + p_std * rand)


def edm_discretization(num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                       append_zero=True, dtype=np.float64) -> np.ndarray:
  """The EDM sampling schedule, descending, as a numpy array.

  sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
  for i = 0..n-1, then a trailing 0 when ``append_zero`` (length n + 1), as
  sgm's ``EDMDiscretization``. Numpy (not jnp) because the schedule is static:
  samplers bake it into the compiled program.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"the schedule needs 0 < sigma_min < sigma_max, got sigma_min="
                     f"{sigma_min}, sigma_max={sigma_max}")
  if not rho > 0:
    raise ValueError(f"rho must be > 0, got {rho}")
  ramp = np.linspace(0.0, 1.0, num_steps, dtype=np.float64)
  min_inv_rho = sigma_min ** (1.0 / rho)
  max_inv_rho = sigma_max ** (1.0 / rho)
  sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
  # the ends exactly (the powers miss them by an ulp: 0.05 -> 0.049999999999999996),
  # so that s_tmin = sigma_min, s_tmax = sigma_max or a guidance interval ending
  # at sigma_max include them
  sigmas[0], sigmas[-1] = sigma_max, (sigma_min if num_steps > 1 else sigma_max)
  if append_zero:
    sigmas = np.append(sigmas, 0.0)
  return sigmas.astype(dtype)


def append_dims(v, ndim: int):
  """Appends trailing unit axes to ``v`` until it has ``ndim`` axes (sgm's append_dims)."""
  v = jnp.asarray(v)
  if v.ndim > ndim:
    raise ValueError(f"cannot broadcast an array with {v.ndim} axes to {ndim} axes")
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))
