"""Samplers: from unit noise ``z`` to a sample, given a denoiser ``D(x, sigma)``.

Pure, jittable versions of sgm's ``EulerEDMSampler``, ``HeunEDMSampler``,
``EulerAncestralSampler``, ``DPMPP2SAncestralSampler``, ``DPMPP2MSampler`` and
``LinearMultistepSampler`` (``sgm/modules/diffusionmodules/sampling.py``).

Every sampler has the signature
``name(denoise_fn, z, *, num_steps, sigma_min, sigma_max, rho, key, noise,
**options) -> x`` with ``denoise_fn(x, sigma) -> denoised``, ``x`` shaped like
``z`` (any layout, batch first) and ``sigma`` of shape (B,) in ``z``'s dtype.
The schedule is ``edm_discretization(num_steps, ...)`` (static numpy, trailing
0) and the start is ``z * sqrt(1 + sigma_0**2)``, as sgm's
``prepare_sampling_loop``. Per-step constants are computed in numpy float64
and cast to ``z``'s dtype; the steps run in one ``jax.lax.scan``, so
``denoise_fn`` is traced a fixed number of times whatever ``num_steps``.
Under ``jax.jit`` keep ``denoise_fn``, ``num_steps`` and the options static
(``functools.partial``); ``z``, ``key`` and ``noise`` may be traced.

Randomness: a stochastic sampler consumes unit normals shaped like ``z``; with
``noise`` (shape ``(num_draws,) + z.shape``) the k-th draw is ``noise[k]``,
else it is ``jax.random.normal(jax.random.split(key, num_draws)[k], ...)``.
``num_noise_draws`` says how many a call consumes.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial

from scoreflow_jax.edm import append_dims, edm_discretization


def _sigmas(num_steps, sigma_min, sigma_max, rho):
  """The float64 schedule, length num_steps + 1, with a trailing 0 (raises on
  a schedule that is not 0 < sigma_min < sigma_max, rho > 0)."""
  return edm_discretization(num_steps, sigma_min, sigma_max, rho)


def _denoise(denoise_fn, x, sigma):
  """Calls ``denoise_fn`` with sigma broadcast to (B,) and the result in x's dtype."""
  sigma = jnp.broadcast_to(sigma, x.shape[:1])
  return jnp.asarray(denoise_fn(x, sigma)).astype(x.dtype)


def _to_d(x, sigma, denoised):
  """The PF-ODE derivative dx/dsigma = (x - denoised) / sigma (sgm's to_d)."""
  return (x - denoised) / append_dims(sigma, x.ndim)


def _noise_source(name, num_draws, z, key, noise):
  """Returns ``draw(k)``, the k-th unit normal shaped like z, or None if no draws."""
  if noise is not None:
    noise = jnp.asarray(noise).astype(z.dtype)
    if num_draws == 0 and noise.size == 0:
      return None
    expected = (num_draws,) + z.shape
    if noise.shape != expected:
      raise ValueError(f"{name} consumes {num_draws} unit normals shaped like z "
                       f"with these options: noise must have shape {expected}, "
                       f"got {noise.shape}")
    return lambda k: noise[k]
  if num_draws == 0:
    return None
  if key is None:
    raise ValueError(f"{name} draws {num_draws} unit normals with these options: "
                     "pass a PRNG `key` or a `noise` array of shape "
                     f"{(num_draws,) + z.shape}")
  keys = jax.random.split(key, num_draws)
  return lambda k: jax.random.normal(keys[k], z.shape, z.dtype)


def _scan_steps(step_fn, carry, per_step, peel_last):
  """Runs ``step_fn(carry, per_step[i], is_last)`` for every step with lax.scan.

  With ``peel_last`` the final step runs outside the scan with ``is_last=True``
  so that it can drop work statically; otherwise ``is_last`` is always False.
  """
  num_steps = len(per_step[0])
  num_scanned = num_steps - 1 if peel_last else num_steps
  if num_scanned > 0:
    scanned = tuple(a[:num_scanned] for a in per_step)
    carry, _ = jax.lax.scan(lambda c, xs: (step_fn(c, xs, False), None),
                            carry, scanned)
  if peel_last:
    carry = step_fn(carry, tuple(a[-1] for a in per_step), True)
  return carry


def _as_steps(dtype, *arrays):
  """Casts per-step numpy arrays: floats to ``dtype``, ints and bools unchanged."""
  return tuple(jnp.asarray(a, dtype if np.issubdtype(a.dtype, np.floating)
                           else a.dtype) for a in arrays)


def _start(z, sigmas):
  """Returns ``z * sqrt(1 + sigma_0**2)``, sgm's initial scaling (not z * sigma_0)."""
  return z * jnp.asarray(math.sqrt(1.0 + sigmas[0] ** 2), z.dtype)


def _edm_gammas(sigmas, s_churn, s_tmin, s_tmax):
  """Per-step churn gamma_i = min(s_churn / n, sqrt 2 - 1) inside [s_tmin, s_tmax], else 0."""
  if not s_churn >= 0:
    raise ValueError(f"s_churn must be >= 0 (0: no churn, EDM's deterministic sampler), "
                     f"got {s_churn}")
  num_steps = len(sigmas) - 1
  gamma = min(s_churn / num_steps, 2**0.5 - 1)
  inside = (s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= s_tmax)
  return np.where(inside, gamma, 0.0)


def _ancestral_step(sigma_from, sigma_to, eta):
  """Returns numpy ``(sigma_down, sigma_up)``, sgm's get_ancestral_step."""
  if not eta >= 0:  # a negative eta gives NaN samples (the root of a negative number)
    raise ValueError(f"eta must be >= 0 (0: deterministic, 1: ancestral), got {eta}")
  if not eta:
    return sigma_to, np.zeros_like(sigma_to)
  sigma_up = np.minimum(
      sigma_to, eta * np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2)
                              / sigma_from**2))
  sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
  return sigma_down, sigma_up


def _edm(denoise_fn, z, num_steps, sigma_min, sigma_max, rho, key, noise,
         s_churn, s_tmin, s_tmax, s_noise, heun, name):
  """Shared body of euler_edm and heun_edm (sgm's EDMSampler)."""
  z = jnp.asarray(z)
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  gammas = _edm_gammas(sigmas, s_churn, s_tmin, s_tmax)
  sigma_hats = sigmas[:-1] * (gammas + 1.0)
  churn_scale = np.sqrt(sigma_hats**2 - sigmas[:-1] ** 2)
  has_draw = gammas > 0
  draw_index = np.maximum(np.cumsum(has_draw) - 1, 0).astype(np.int32)
  draw = _noise_source(name, int(has_draw.sum()), z, key, noise)

  def step(x, per_step, is_last):
    sigma_hat, next_sigma, scale, churn, k = per_step
    if draw is not None:
      x = jnp.where(churn, x + draw(k) * s_noise * scale, x)
    d = _to_d(x, sigma_hat, _denoise(denoise_fn, x, sigma_hat))
    dt = next_sigma - sigma_hat
    x_euler = x + dt * d
    if not heun or is_last:
      return x_euler
    d_new = _to_d(x_euler, next_sigma, _denoise(denoise_fn, x_euler, next_sigma))
    return x + (d + d_new) / 2.0 * dt

  per_step = _as_steps(z.dtype, sigma_hats, sigmas[1:], churn_scale, has_draw,
                       draw_index)
  return _scan_steps(step, _start(z, sigmas), per_step, peel_last=heun)


def euler_edm(denoise_fn, z, *, num_steps, sigma_min=0.002, sigma_max=80.0,
              rho=7.0, key=None, noise=None, s_churn=0.0, s_tmin=0.0,
              s_tmax=float("inf"), s_noise=1.0):
  """Returns a sample from sgm's EulerEDMSampler (EDM Algorithm 2 without Heun).

  Step i raises sigma_i to sigma_hat = sigma_i (1 + gamma_i) with fresh noise
  when gamma_i > 0 (gamma_i = min(s_churn / num_steps, sqrt 2 - 1) if
  s_tmin <= sigma_i <= s_tmax), then takes an Euler step to sigma_{i+1}.
  Consumes one draw per step with gamma_i > 0 (none when s_churn = 0); makes
  num_steps denoiser evaluations.
  """
  return _edm(denoise_fn, z, num_steps, sigma_min, sigma_max, rho, key, noise,
              s_churn, s_tmin, s_tmax, s_noise, heun=False, name="euler_edm")


def heun_edm(denoise_fn, z, *, num_steps, sigma_min=0.002, sigma_max=80.0,
             rho=7.0, key=None, noise=None, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0):
  """Returns a sample from sgm's HeunEDMSampler (EDM Algorithm 2).

  As ``euler_edm`` plus Heun's correction on every step but the last, which
  ends at sigma = 0 and stays an Euler step (sgm skips the evaluation when
  next_sigma sums to < 1e-14): 2 num_steps - 1 denoiser evaluations. Consumes
  one draw per step with gamma_i > 0.
  """
  return _edm(denoise_fn, z, num_steps, sigma_min, sigma_max, rho, key, noise,
              s_churn, s_tmin, s_tmax, s_noise, heun=True, name="heun_edm")


def _ancestral_noise(x, draw, k, s_noise, sigma_up, add):
  """sgm's ancestral_step: ``x + eps s_noise sigma_up`` where next sigma > 0."""
  return jnp.where(add, x + draw(k) * s_noise * sigma_up, x)


def euler_ancestral(denoise_fn, z, *, num_steps, sigma_min=0.002,
                    sigma_max=80.0, rho=7.0, key=None, noise=None, eta=1.0,
                    s_noise=1.0):
  """Returns a sample from sgm's EulerAncestralSampler.

  Each step is an Euler step to sigma_down, then noise of scale sigma_up is
  added where the next sigma is > 0 (sgm's get_ancestral_step / ancestral_step).
  sgm draws the noise inside ``torch.where`` on every step, so this consumes
  num_steps draws (the last one unused); num_steps denoiser evaluations.
  """
  z = jnp.asarray(z)
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  sigma_down, sigma_up = _ancestral_step(sigmas[:-1], sigmas[1:], eta)
  draw = _noise_source("euler_ancestral", num_steps, z, key, noise)

  def step(x, per_step, is_last):
    del is_last
    sigma, down, up, add, k = per_step
    d = _to_d(x, sigma, _denoise(denoise_fn, x, sigma))
    x = x + (down - sigma) * d
    return _ancestral_noise(x, draw, k, s_noise, up, add)

  per_step = _as_steps(z.dtype, sigmas[:-1], sigma_down, sigma_up,
                       sigmas[1:] > 0, np.arange(num_steps, dtype=np.int32))
  return _scan_steps(step, _start(z, sigmas), per_step, peel_last=False)


def dpmpp_2s_ancestral(denoise_fn, z, *, num_steps, sigma_min=0.002,
                       sigma_max=80.0, rho=7.0, key=None, noise=None, eta=1.0,
                       s_noise=1.0):
  """Returns a sample from sgm's DPMPP2SAncestralSampler (DPM-Solver++(2S) + noise).

  Each step goes to sigma_down by a second-order singlestep update through the
  midpoint sigma_s = sqrt(sigma sigma_down), or by an Euler step where
  sigma_down = 0 (always the last step; also earlier ones when eta > 1), then
  adds ancestral noise as ``euler_ancestral``. Consumes num_steps draws (the
  last one unused); 2 num_steps - 1 denoiser evaluations when eta <= 1.
  """
  z = jnp.asarray(z)
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  sigma, next_sigma = sigmas[:-1], sigmas[1:]
  sigma_down, sigma_up = _ancestral_step(sigma, next_sigma, eta)
  two_stage = sigma_down > 0
  # Where sigma_down = 0 the update is unused; a finite stand-in keeps it NaN-free.
  safe_down = np.where(two_stage, sigma_down, sigma)
  t, t_next = -np.log(sigma), -np.log(safe_down)
  h = t_next - t
  s = t + 0.5 * h
  sigma_s = np.exp(-s)
  mult1 = np.exp(-s) / np.exp(-t)
  mult2 = np.expm1(-0.5 * h)
  mult3 = np.exp(-t_next) / np.exp(-t)
  mult4 = np.expm1(-h)
  draw = _noise_source("dpmpp_2s_ancestral", num_steps, z, key, noise)
  cond_needed = not two_stage[:-1].all()

  def step(x, per_step, is_last):
    (sig, down, up, add, k, use_2s, sig_s, m1, m2, m3, m4) = per_step
    denoised = _denoise(denoise_fn, x, sig)
    x_euler = x + (down - sig) * _to_d(x, sig, denoised)

    def dpmpp_2s():
      x2 = m1 * x - m2 * denoised
      return m3 * x - m4 * _denoise(denoise_fn, x2, sig_s)

    if is_last:
      return x_euler
    if cond_needed:
      x = jax.lax.cond(use_2s, dpmpp_2s, lambda: x_euler)
    else:
      x = dpmpp_2s()
    return _ancestral_noise(x, draw, k, s_noise, up, add)

  per_step = _as_steps(z.dtype, sigma, sigma_down, sigma_up, next_sigma > 0,
                       np.arange(num_steps, dtype=np.int32), two_stage,
                       sigma_s, mult1, mult2, mult3, mult4)
  return _scan_steps(step, _start(z, sigmas), per_step, peel_last=True)


def dpmpp_2m(denoise_fn, z, *, num_steps, sigma_min=0.002, sigma_max=80.0,
             rho=7.0, key=None, noise=None):
  """Returns a sample from sgm's DPMPP2MSampler (DPM-Solver++(2M), deterministic).

  x <- (sigma_{i+1}/sigma_i) x - expm1(-h) D', with D' = (1 + 1/2r) D_i -
  (1/2r) D_{i-1}, r = h_{i-1}/h_i in log sigma; the first step and the last
  (to sigma = 0, where it returns D exactly) use D' = D_i, as sgm does. The
  coefficients are static, so log(0) never reaches the program. num_steps
  evaluations, no draws (``key`` is ignored; ``noise``, if given, must be empty).
  """
  del key
  z = jnp.asarray(z)
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  _noise_source("dpmpp_2m", 0, z, None, noise)
  sigma, next_sigma = sigmas[:-1], sigmas[1:]
  last = next_sigma == 0
  safe_next = np.where(last, 1.0, next_sigma)
  h = np.where(last, np.inf, np.log(sigma) - np.log(safe_next))
  mult1 = next_sigma / sigma
  mult2 = np.expm1(-h)
  multistep = (np.arange(num_steps) > 0) & ~last
  r = np.ones(num_steps)
  h_last = np.log(sigmas[:-2]) - np.log(sigmas[1:-1])  # h_{i-1}, i = 1..n-1
  r[multistep] = h_last[multistep[1:]] / h[multistep]
  half_over_r = np.where(multistep, 1.0 / (2.0 * r), 0.0)
  mult3 = 1.0 + half_over_r
  mult4 = half_over_r

  def step(carry, per_step, is_last):
    del is_last
    x, old_denoised = carry
    sig, m1, m2, m3, m4 = per_step
    denoised = _denoise(denoise_fn, x, sig)
    denoised_d = m3 * denoised - m4 * old_denoised
    return m1 * x - m2 * denoised_d, denoised

  per_step = _as_steps(z.dtype, sigma, mult1, mult2, mult3, mult4)
  x = _start(z, sigmas)
  x, _ = _scan_steps(step, (x, jnp.zeros_like(x)), per_step, peel_last=False)
  return x


def lms_coefficients(sigmas, order):
  """Returns the (num_steps, order) table of sgm's linear_multistep_coeff.

  Entry (i, j) integrates, from sigma_i to sigma_{i+1}, the Lagrange basis
  polynomial of node sigma_{i-j} over the nodes sigma_i .. sigma_{i-c+1},
  c = min(i + 1, order); entries j >= c are 0. Exact polynomial integration in
  float64 (sgm uses scipy's quad with epsrel 1e-4), in the shifted variable
  tau - sigma_i for conditioning.
  """
  sigmas = np.asarray(sigmas, np.float64)
  num_steps = len(sigmas) - 1
  table = np.zeros((num_steps, order))
  for i in range(num_steps):
    cur_order = min(i + 1, order)
    nodes = sigmas[i - np.arange(cur_order)] - sigmas[i]
    width = sigmas[i + 1] - sigmas[i]
    for j in range(cur_order):
      basis = Polynomial([1.0])
      for k in range(cur_order):
        if k != j:
          basis = basis * Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
      table[i, j] = basis.integ()(width)
  return table


def lms(denoise_fn, z, *, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        key=None, noise=None, order=4):
  """Returns a sample from sgm's LinearMultistepSampler (order ``order`` LMS).

  x <- x + sum_j c_ij d_{i-j} over the last min(i + 1, order) derivatives
  d = (x - D)/sigma, with c from ``lms_coefficients``. num_steps evaluations,
  no draws (``key`` is ignored; ``noise``, if given, must be empty).
  """
  del key
  if order < 1:
    raise ValueError(f"order must be >= 1, got {order}")
  z = jnp.asarray(z)
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  _noise_source("lms", 0, z, None, noise)
  coeffs = lms_coefficients(sigmas, order)

  def step(carry, per_step, is_last):
    del is_last
    x, history = carry  # history: (order,) + x.shape, newest first
    sig, c = per_step
    d = _to_d(x, sig, _denoise(denoise_fn, x, sig))
    history = jnp.concatenate([d[None], history[:-1]])
    update = c[0] * history[0]
    for j in range(1, order):
      update = update + c[j] * history[j]
    return x + update, history

  per_step = _as_steps(z.dtype, sigmas[:-1], coeffs)
  x = _start(z, sigmas)
  history = jnp.zeros((order,) + x.shape, x.dtype)
  x, _ = _scan_steps(step, (x, history), per_step, peel_last=False)
  return x


SAMPLERS = {
    "euler_edm": euler_edm,
    "heun_edm": heun_edm,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "lms": lms,
}


def get_sampler(name: str) -> Callable:
  """Returns the sampler called ``name``; ValueError naming the choices otherwise."""
  try:
    return SAMPLERS[name]
  except KeyError:
    raise ValueError(f"unknown sampler {name!r}; choose one of "
                     f"{sorted(SAMPLERS)}") from None


def _edm_draws(num_steps, sigma_min, sigma_max, rho, s_churn=0.0, s_tmin=0.0,
               s_tmax=float("inf"), s_noise=1.0):
  del s_noise
  sigmas = _sigmas(num_steps, sigma_min, sigma_max, rho)
  return int((_edm_gammas(sigmas, s_churn, s_tmin, s_tmax) > 0).sum())


def _ancestral_draws(num_steps, sigma_min, sigma_max, rho, eta=1.0,
                     s_noise=1.0):
  del sigma_min, sigma_max, rho, eta, s_noise
  return num_steps


def _no_draws(num_steps, sigma_min, sigma_max, rho):
  del num_steps, sigma_min, sigma_max, rho
  return 0


def _lms_draws(num_steps, sigma_min, sigma_max, rho, order=4):
  del order
  return _no_draws(num_steps, sigma_min, sigma_max, rho)


_NUM_DRAWS = {
    "euler_edm": _edm_draws,
    "heun_edm": _edm_draws,
    "euler_ancestral": _ancestral_draws,
    "dpmpp_2s_ancestral": _ancestral_draws,
    "dpmpp_2m": _no_draws,
    "lms": _lms_draws,
}


def num_noise_draws(name: str, num_steps: int, *, sigma_min=0.002,
                    sigma_max=80.0, rho=7.0, **sampler_options) -> int:
  """Returns how many unit-normal arrays sampler ``name`` consumes (``noise.shape[0]``)."""
  get_sampler(name)
  return _NUM_DRAWS[name](num_steps, sigma_min, sigma_max, rho,
                          **sampler_options)
