"""Tests for scoreflow_jax.samplers: sgm's sampling loops, as pure JAX functions.

Every test runs with 64-bit JAX switched on through ``jax.enable_x64`` in
``setUp``; the context is left at tearDown, so the flag does not leak into
other test modules.
"""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized
from scipy import integrate

from scoreflow_jax import samplers

SHAPE = (2, 4, 4, 1)  # (B, H, W, C)
DATA_STD = 0.7
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def _data_mean(xp):
  return xp.linspace(-1.0, 1.0, 16).reshape(1, 4, 4, 1)


def gaussian_denoiser(x, sigma, xp=jnp):
  """Exact denoiser E[x_0 | x] for data N(mu, s^2 I): mu + s^2/(s^2 + sigma^2) (x - mu)."""
  mu = _data_mean(xp).astype(x.dtype)
  c = DATA_STD**2 / (DATA_STD**2 + sigma**2)
  return mu + c.reshape((-1,) + (1,) * (x.ndim - 1)) * (x - mu)


def wiggly_denoiser(x, sigma, xp=jnp):
  """A nonlinear, sigma-dependent denoiser, so that references test more than linear maps."""
  sig = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  return gaussian_denoiser(x, sigma, xp) + 0.3 * xp.tanh(x) * sig / (1.0 + sig)


def checked(denoise_fn, batch, dtype):
  """Wraps ``denoise_fn`` to check, at trace time, sigma's shape (B,) and dtype."""

  def fn(x, sigma):
    assert sigma.shape == (batch,), sigma.shape
    assert sigma.dtype == dtype, sigma.dtype
    assert x.dtype == dtype, x.dtype
    return denoise_fn(x, sigma)

  return fn


# A step-by-step numpy float64 transcription of sgm's sampling.py, kept as
# plain as the original: Python loops, scalar sigmas, scipy quad for LMS.


def np_schedule(num_steps):
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho = SIGMA_MIN ** (1 / RHO)
  max_inv_rho = SIGMA_MAX ** (1 / RHO)
  sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** RHO
  return np.append(sigmas, 0.0)


def np_get_ancestral_step(sigma_from, sigma_to, eta):
  if not eta:
    return sigma_to, 0.0
  sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2)
                                  / sigma_from**2) ** 0.5)
  sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
  return sigma_down, sigma_up


def np_linear_multistep_coeff(order, t, i, j):
  def fn(tau):
    prod = 1.0
    for k in range(order):
      if j == k:
        continue
      prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
    return prod

  return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def np_sample(name, denoiser, z, num_steps, noise=(), **options):
  """sgm's ``sampler(denoiser, z, ...)`` in numpy; ``noise`` supplies randn_like."""
  z = np.asarray(z, np.float64)
  draws = iter(np.asarray(noise, np.float64))
  den = lambda x, sigma: np.asarray(denoiser(x, np.full(z.shape[:1], sigma), np))
  sigmas = np_schedule(num_steps)
  x = z * np.sqrt(1.0 + sigmas[0] ** 2.0)
  s_noise = options.get("s_noise", 1.0)
  eta = options.get("eta", 1.0)
  old_denoised, ds = None, []
  for i in range(num_steps):
    sigma, next_sigma = sigmas[i], sigmas[i + 1]
    if name in ("euler_edm", "heun_edm"):
      s_churn = options.get("s_churn", 0.0)
      s_tmin = options.get("s_tmin", 0.0)
      s_tmax = options.get("s_tmax", float("inf"))
      gamma = (min(s_churn / num_steps, 2**0.5 - 1)
               if s_tmin <= sigma <= s_tmax else 0.0)
      sigma_hat = sigma * (gamma + 1.0)
      if gamma > 0:
        eps = next(draws) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
      denoised = den(x, sigma_hat)
      d = (x - denoised) / sigma_hat
      dt = next_sigma - sigma_hat
      euler_step = x + dt * d
      if name == "euler_edm" or next_sigma < 1e-14:
        x = euler_step
      else:
        d_new = (euler_step - den(euler_step, next_sigma)) / next_sigma
        x = x + (d + d_new) / 2.0 * dt
    elif name in ("euler_ancestral", "dpmpp_2s_ancestral"):
      sigma_down, sigma_up = np_get_ancestral_step(sigma, next_sigma, eta)
      denoised = den(x, sigma)
      x_euler = x + (sigma_down - sigma) * (x - denoised) / sigma
      if name == "euler_ancestral" or sigma_down < 1e-14:
        x = x_euler
      else:
        t, t_next = -np.log(sigma), -np.log(sigma_down)
        h = t_next - t
        s = t + 0.5 * h
        mult1, mult2 = np.exp(-s) / np.exp(-t), np.expm1(-0.5 * h)
        mult3, mult4 = np.exp(-t_next) / np.exp(-t), np.expm1(-h)
        x2 = mult1 * x - mult2 * denoised
        x = mult3 * x - mult4 * den(x2, np.exp(-s))
      eps = next(draws)
      if next_sigma > 0:
        x = x + eps * s_noise * sigma_up
    elif name == "dpmpp_2m":
      denoised = den(x, sigma)
      with np.errstate(divide="ignore"):  # sgm's t_next = -log(0) = inf at the end
        t, t_next = -np.log(sigma), -np.log(next_sigma)
      h = t_next - t
      mult1, mult2 = np.exp(-t_next) / np.exp(-t), np.expm1(-h)
      if old_denoised is None or next_sigma < 1e-14:
        x = mult1 * x - mult2 * denoised
      else:
        r = (t - (-np.log(sigmas[i - 1]))) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
        x = mult1 * x - mult2 * denoised_d
      old_denoised = denoised
    elif name == "lms":
      order = options.get("order", 4)
      ds.append((x - den(x, sigma)) / sigma)
      if len(ds) > order:
        ds.pop(0)
      cur_order = min(i + 1, order)
      coeffs = [np_linear_multistep_coeff(cur_order, sigmas, i, j)
                for j in range(cur_order)]
      x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
  assert next(draws, None) is None, "noise left unused"
  return x


def pf_ode_endpoints(z):
  """Exact PF-ODE solution for Gaussian data, started at sgm's x_T = z sqrt(1 + sigma_max^2).

  x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).
  Returns ``(x(0), D(x(sigma_min), sigma_min))``: the first is the ODE's end;
  the second is what an exact integration to sigma_min followed by sgm's final
  Euler jump to 0 (which returns D) gives. They differ by ~1e-5 relative
  (the final jump has the fixed size sigma_min whatever num_steps is).
  """
  z = np.asarray(z, np.float64)
  mu = _data_mean(np)
  x_t = z * np.sqrt(1.0 + SIGMA_MAX**2)
  scale = (x_t - mu) / np.sqrt(DATA_STD**2 + SIGMA_MAX**2)
  x_0 = mu + scale * DATA_STD
  x_min = mu + scale * np.sqrt(DATA_STD**2 + SIGMA_MIN**2)
  return x_0, gaussian_denoiser(x_min, np.full(z.shape[:1], SIGMA_MIN), np)


def unit_noise(num_draws, seed=0):
  return np.random.default_rng(seed).standard_normal((num_draws,) + SHAPE)


class X64TestCase(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))
    self.z = jax.random.normal(jax.random.PRNGKey(0), SHAPE, jnp.float64)

  def run_sampler(self, name, denoiser, z, num_steps, noise=None, key=None,
                  **options):
    """Runs sampler ``name`` through ``self.variant`` (jit or not)."""
    fn = functools.partial(samplers.get_sampler(name),
                           checked(denoiser, z.shape[0], z.dtype),
                           num_steps=num_steps, **options)
    return self.variant(fn)(z, noise=noise, key=key)


class ConvergenceTest(X64TestCase):
  """Deterministic samplers converge to the exact PF-ODE solution for Gaussian data."""

  STEPS = (25, 50, 100, 200)

  def errors(self, name):
    x_0, x_0_by_jump = pf_ode_endpoints(self.z)
    # Euler, Heun and DPM++(2M) all end with the jump sigma_min -> 0 that
    # returns D; LMS extrapolates over it, so it converges to x(0) itself.
    reference = x_0 if name == "lms" else x_0_by_jump
    return np.array([
        np.abs(self.run_sampler(name, gaussian_denoiser, self.z, n) - reference).max()
        for n in self.STEPS])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      # name, max error at 200 steps, convergence order range
      ("euler_edm", 0.03, (0.9, 1.1)),
      ("heun_edm", 7e-4, (1.9, 2.2)),
      ("dpmpp_2m", 7e-4, (1.9, 2.3)),
      ("lms", 2e-5, (3.0, 6.0)),
  )
  def test_converges_to_exact_solution(self, name, max_error, order_range):
    errors = self.errors(name)
    self.assertLess(errors[-1], max_error)
    self.assertTrue(np.all(np.diff(errors) < 0), errors)
    # Empirical order log2(err(n) / err(2n)), past the coarsest pair.
    orders = np.log2(errors[:-1] / errors[1:])[1:]
    self.assertTrue(np.all((orders > order_range[0]) & (orders < order_range[1])), orders)

  @chex.variants(with_jit=True)
  def test_heun_beats_euler_at_equal_steps(self):
    euler, heun = self.errors("euler_edm"), self.errors("heun_edm")
    ratios = euler / heun  # ~4.4, 9.7, 20, 41: second order pulls away
    self.assertTrue(np.all(ratios > 4) and np.all(np.diff(ratios) > 0), ratios)
    self.assertGreater(ratios[-1], 30)


class ScoreScaleTest(X64TestCase):
  """guiders.score_scale on Gaussian data: the PF-ODE with the score times k
  where lo < sigma <= hi has dx/dsigma = k sigma (x - mu) / (s^2 + sigma^2)
  there, so |x - mu| shrinks by ((s^2 + lo^2) / (s^2 + hi^2))^(k / 2) across
  the band instead of the power 1 / 2: the sample against the unscaled one's,
  on the same noise, is mu + that ratio^(k - 1) (x - mu)."""

  @chex.variants(with_jit=True)
  @parameterized.parameters((2.0, 0.1, 1.0), (1.5, 0.3, 5.0), (0.5, 0.05, 2.0))
  def test_sample_moves_by_the_band_s_exact_factor(self, scale, lo, hi):
    from scoreflow_jax import guiders
    scaled = guiders.score_scale(gaussian_denoiser, scale, (lo, hi))
    errors = []
    for steps in (100, 400):
      plain = self.run_sampler("heun_edm", gaussian_denoiser, self.z, steps)
      got = self.run_sampler("heun_edm", scaled, self.z, steps)
      mu = _data_mean(np)
      s2 = DATA_STD**2
      factor = ((s2 + lo**2) / (s2 + hi**2)) ** ((scale - 1.0) / 2)
      errors.append(np.abs((np.asarray(got) - mu) / (np.asarray(plain) - mu) / factor - 1).max())
    # the band's edges fall between the schedule's sigmas: first order in the step
    self.assertLess(errors[1], 0.01, errors)
    self.assertLess(errors[1], errors[0] / 2.5, errors)

  def test_scale_is_exact_energy_gradient_only_inside_and_checks_its_arguments(self):
    from scoreflow_jax import guiders
    x = jnp.asarray(self.z)
    den = guiders.score_scale(wiggly_denoiser, 3.0, (0.1, 1.0))
    sigma = jnp.asarray([0.1, 0.5])  # 0.1 is outside (lo < sigma), 0.5 inside
    out, own = den(x, sigma), wiggly_denoiser(x, sigma)
    np.testing.assert_allclose(out[0], own[0], rtol=1e-12)
    np.testing.assert_allclose(out[1], x[1] + 3.0 * (own[1] - x[1]), rtol=1e-12)
    for scale, interval, message in ((0.0, (0.1, 1.0), "finite number > 0"),
                                     (float("nan"), (0.1, 1.0), "finite number > 0"),
                                     (2.0, (1.0, 0.1), "0 <= lo < hi"),
                                     (2.0, None, "needs its sigma_interval")):
      with self.assertRaisesRegex(ValueError, message):
        guiders.score_scale(wiggly_denoiser, scale, interval)


class ReferenceTest(X64TestCase):
  """Each sampler matches a numpy float64 transcription of sgm, step by step."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("euler_churn", "euler_edm", 10, dict(s_churn=6.0, s_tmin=0.05, s_tmax=20.0,
                                            s_noise=1.007)),
      ("euler_churn_last_step", "euler_edm", 6, dict(s_churn=1.0, s_noise=0.9)),
      ("heun_churn", "heun_edm", 10, dict(s_churn=6.0, s_tmin=0.05, s_tmax=20.0,
                                          s_noise=1.007)),
      ("heun_churn_last_step", "heun_edm", 6, dict(s_churn=40.0)),
      ("heun_no_churn", "heun_edm", 7, dict()),
      ("euler_ancestral", "euler_ancestral", 9, dict()),
      ("euler_ancestral_eta", "euler_ancestral", 9, dict(eta=0.6, s_noise=0.9)),
      ("euler_ancestral_eta0", "euler_ancestral", 5, dict(eta=0.0)),
      ("dpmpp_2s", "dpmpp_2s_ancestral", 9, dict()),
      ("dpmpp_2s_eta", "dpmpp_2s_ancestral", 9, dict(eta=0.5, s_noise=1.1)),
      # eta > 1: sigma_down = 0 (an Euler step) on steps 4..8, on all with 1.5.
      ("dpmpp_2s_eta_above_1", "dpmpp_2s_ancestral", 9, dict(eta=1.05)),
      ("dpmpp_2s_eta_1.5", "dpmpp_2s_ancestral", 9, dict(eta=1.5)),
      ("dpmpp_2s_one_step", "dpmpp_2s_ancestral", 1, dict()),
      ("dpmpp_2m", "dpmpp_2m", 9, dict()),
      ("dpmpp_2m_one_step", "dpmpp_2m", 1, dict()),
      ("dpmpp_2m_two_steps", "dpmpp_2m", 2, dict()),
      ("lms", "lms", 9, dict()),
      ("lms_order2", "lms", 9, dict(order=2)),
      ("lms_order1", "lms", 9, dict(order=1)),
  )
  def test_matches_numpy_reference(self, name, num_steps, options):
    num_draws = samplers.num_noise_draws(name, num_steps, **options)
    noise = unit_noise(num_draws)
    expected = np_sample(name, wiggly_denoiser, self.z, num_steps, noise, **options)
    got = self.run_sampler(name, wiggly_denoiser, self.z, num_steps,
                           noise=jnp.asarray(noise), **options)
    self.assertEqual(got.dtype, jnp.float64)
    # LMS: sgm's quad coefficients are exact for these low-degree polynomials
    # too, so 1e-10 holds for all.
    chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-10)

  def test_lms_order1_equals_euler(self):
    lms = samplers.lms(gaussian_denoiser, self.z, num_steps=9, order=1)
    euler = samplers.euler_edm(gaussian_denoiser, self.z, num_steps=9)
    chex.assert_trees_all_close(lms, euler, rtol=1e-12, atol=1e-12)

  def test_key_gives_the_documented_draws(self):
    # Draws only on the steps with churn: the k-th draw comes from the k-th split.
    name, options = "euler_edm", dict(s_churn=6.0, s_tmin=0.05, s_tmax=20.0)
    key = jax.random.PRNGKey(3)
    num_draws = samplers.num_noise_draws(name, 10, **options)
    noise = jax.vmap(lambda k: jax.random.normal(k, SHAPE, jnp.float64))(
        jax.random.split(key, num_draws))
    sampler = functools.partial(samplers.get_sampler(name), wiggly_denoiser,
                                num_steps=10, **options)
    chex.assert_trees_all_close(sampler(self.z, key=key), sampler(self.z, noise=noise),
                                rtol=1e-14, atol=1e-14)


class LmsCoefficientsTest(parameterized.TestCase):

  def test_matches_quad_and_integrates_constants(self):
    sigmas = np_schedule(12)
    table = samplers.lms_coefficients(sigmas, 4)
    self.assertEqual(table.shape, (12, 4))
    for i in range(12):
      cur_order = min(i + 1, 4)
      for j in range(4):
        expected = (np_linear_multistep_coeff(cur_order, sigmas, i, j)
                    if j < cur_order else 0.0)
        np.testing.assert_allclose(table[i, j], expected, rtol=1e-12, atol=1e-15)
    # The Lagrange basis sums to 1, so each row integrates to sigma_{i+1} - sigma_i.
    np.testing.assert_allclose(table.sum(1), np.diff(sigmas), rtol=1e-12)


class EvaluationCountTest(X64TestCase):
  """denoise_fn is evaluated exactly as often as sgm evaluates it, and traced O(1) times."""

  def count(self, name, num_steps, **options):
    executed, traced = [0], [0]

    def counted(x, sigma):
      traced[0] += 1
      jax.debug.callback(lambda: executed.__setitem__(0, executed[0] + 1),
                         ordered=True)
      return gaussian_denoiser(x, sigma)

    fn = functools.partial(samplers.get_sampler(name), counted,
                           num_steps=num_steps, **options)
    noise = unit_noise(samplers.num_noise_draws(name, num_steps, **options))
    jax.block_until_ready(self.variant(fn)(self.z, noise=noise))
    jax.effects_barrier()
    return executed[0], traced[0]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(  # named: stable test ids (pytest -n shards by id)
      ("euler_edm", "euler_edm", dict(), lambda n: n, 1),
      ("euler_edm_churn", "euler_edm", dict(s_churn=5.0), lambda n: n, 1),
      ("heun_edm", "heun_edm", dict(), lambda n: 2 * n - 1, 3),
      ("heun_edm_churn", "heun_edm", dict(s_churn=5.0), lambda n: 2 * n - 1, 3),
      ("euler_ancestral", "euler_ancestral", dict(), lambda n: n, 1),
      ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", dict(), lambda n: 2 * n - 1, 3),
      ("dpmpp_2m", "dpmpp_2m", dict(), lambda n: n, 1),
      ("lms", "lms", dict(), lambda n: n, 1),
  )
  def test_counts(self, name, options, expected, num_traces):
    # num_traces: scan body plus a peeled last step, whatever num_steps.
    for num_steps in (1, 3, 12):
      executed, traced = self.count(name, num_steps, **options)
      self.assertEqual(executed, expected(num_steps))
      if num_steps > 1:
        self.assertEqual(traced, num_traces)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dpmpp_2s_skips_the_second_evaluation_where_sigma_down_is_zero(self):
    sigmas = np_schedule(12)
    sigma_down = np.array([np_get_ancestral_step(sigmas[i], sigmas[i + 1], 1.1)[0]
                           for i in range(12)])
    self.assertEqual(int((sigma_down > 0).sum()), 6)  # steps 0..5
    executed, _ = self.count("dpmpp_2s_ancestral", 12, eta=1.1)
    self.assertEqual(executed, 12 + 6)


def euler_ancestral_moments(num_steps):
  """Exact mean and std of euler_ancestral's output for the Gaussian denoiser.

  With D - mu = k (x - mu), k = s^2/(s^2 + sigma^2), every step maps x - mu to
  (1 + (sigma_down - sigma)(1 - k)/sigma)(x - mu) and adds noise of variance
  sigma_up^2; x starts with mean 0 and variance 1 + sigma_0^2.
  """
  sigmas = np_schedule(num_steps)
  gain, var = 1.0, 1.0 + sigmas[0] ** 2
  for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
    sigma_down, sigma_up = np_get_ancestral_step(sigma, next_sigma, 1.0)
    k = DATA_STD**2 / (DATA_STD**2 + sigma**2)
    a = 1.0 + (sigma_down - sigma) * (1.0 - k) / sigma
    gain, var = gain * a, var * a**2 + sigma_up**2
  return lambda mu: mu - gain * mu, math.sqrt(var)


class PosteriorTest(chex.TestCase):
  """Ancestral samplers draw from the data distribution N(mu, s^2)."""

  NUM_SAMPLES = 16384

  def sample(self, name, num_steps):
    mu = _data_mean(jnp)[:, :2, :2]  # (1, 2, 2, 1)

    def denoiser(x, sigma):
      c = DATA_STD**2 / (DATA_STD**2 + sigma**2)
      return mu + c[:, None, None, None] * (x - mu)

    z = jax.random.normal(jax.random.PRNGKey(5), (self.NUM_SAMPLES, 2, 2, 1))
    sampler = jax.jit(functools.partial(samplers.get_sampler(name), denoiser,
                                        num_steps=num_steps))
    return np.asarray(mu[0]), sampler(z, key=jax.random.PRNGKey(6))

  def assert_moments(self, x, mean, std):
    # 5 standard errors: s/sqrt(N) ~ 0.0055 for the mean, s/sqrt(2N) ~ 0.0039 for the std.
    np.testing.assert_allclose(x.mean(0), mean, atol=5 * DATA_STD / math.sqrt(self.NUM_SAMPLES))
    np.testing.assert_allclose(x.std(0), std,
                               atol=5 * DATA_STD / math.sqrt(2 * self.NUM_SAMPLES))

  def test_dpmpp_2s_ancestral(self):
    mu, x = self.sample("dpmpp_2s_ancestral", 100)
    self.assert_moments(x, mu, DATA_STD)

  def test_euler_ancestral(self):
    # Euler ancestral is first order in distribution too: at 100 steps its
    # exact output std is ~0.66, not 0.7 (sgm's sampler has the same bias).
    mean_fn, std = euler_ancestral_moments(100)
    self.assertBetween(std, 0.64, 0.68)
    self.assertBetween(euler_ancestral_moments(1000)[1], 0.695, 0.7)
    mu, x = self.sample("euler_ancestral", 100)
    self.assert_moments(x, mean_fn(mu), std)
    np.testing.assert_allclose(mean_fn(mu), mu, atol=1e-3)


class ApiTest(X64TestCase):

  def test_get_sampler(self):
    self.assertIs(samplers.get_sampler("heun_edm"), samplers.heun_edm)
    self.assertEqual(set(samplers.SAMPLERS), {"euler_edm", "heun_edm", "euler_ancestral",
                                              "dpmpp_2s_ancestral", "dpmpp_2m", "lms"})
    with self.assertRaisesRegex(ValueError, "unknown sampler 'euler'.*dpmpp_2m.*heun_edm"):
      samplers.get_sampler("euler")

  @parameterized.parameters(("euler_ancestral", dict()), ("dpmpp_2s_ancestral", dict()),
                            ("euler_edm", dict(s_churn=1.0)), ("heun_edm", dict(s_churn=1.0)))
  def test_stochastic_sampler_without_key_or_noise_raises(self, name, options):
    with self.assertRaisesRegex(ValueError, "key.*noise"):
      samplers.get_sampler(name)(gaussian_denoiser, self.z, num_steps=4, **options)

  def test_deterministic_samplers_need_no_key(self):
    for name in ("euler_edm", "heun_edm", "dpmpp_2m", "lms"):
      x = samplers.get_sampler(name)(gaussian_denoiser, self.z, num_steps=3)
      self.assertTrue(np.all(np.isfinite(x)))
      self.assertEqual(samplers.num_noise_draws(name, 3), 0)

  def test_num_noise_draws(self):
    sigmas = np_schedule(20)[:-1]
    inside = int(((sigmas >= 0.05) & (sigmas <= 20.0)).sum())
    self.assertBetween(inside, 1, 19)
    self.assertEqual(samplers.num_noise_draws("euler_edm", 20, s_churn=3.0, s_tmin=0.05,
                                              s_tmax=20.0), inside)
    self.assertEqual(samplers.num_noise_draws("heun_edm", 20, s_churn=3.0), 20)
    self.assertEqual(samplers.num_noise_draws("euler_ancestral", 20, eta=0.5), 20)
    self.assertEqual(samplers.num_noise_draws("dpmpp_2s_ancestral", 20), 20)
    self.assertEqual(samplers.num_noise_draws("lms", 20, order=3), 0)
    with self.assertRaises(TypeError):
      samplers.num_noise_draws("dpmpp_2m", 20, eta=0.5)

  def test_negative_churn_or_eta_is_refused(self):
    # s_churn < 0 shrank sigma_hat below sigma without noise; eta < 0 gave NaN samples
    key = jax.random.key(0)
    for name in ("euler_edm", "heun_edm"):
      with self.assertRaisesRegex(ValueError, "s_churn must be >= 0"):
        samplers.get_sampler(name)(gaussian_denoiser, self.z, num_steps=4, key=key,
                                   s_churn=-1.0)
    for name in ("euler_ancestral", "dpmpp_2s_ancestral"):
      with self.assertRaisesRegex(ValueError, "eta must be >= 0"):
        samplers.get_sampler(name)(gaussian_denoiser, self.z, num_steps=4, key=key,
                                   eta=-2.0)

  def test_churn_window_at_the_schedule_ends_includes_them(self):
    # s_tmin = sigma_min and s_tmax = sigma_max churn every step (the schedule's
    # ends are exact; 5.42 came out 5.420000000000001 before)
    self.assertEqual(samplers.num_noise_draws("euler_edm", 6, sigma_min=0.05, sigma_max=5.42,
                                              s_churn=1.0, s_tmin=0.05, s_tmax=5.42), 6)

  def test_wrong_noise_shape_raises(self):
    with self.assertRaisesRegex(ValueError, r"noise must have shape \(4, 2, 4, 4, 1\)"):
      samplers.euler_ancestral(gaussian_denoiser, self.z, num_steps=4,
                               noise=unit_noise(3))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(name=tuple(samplers.SAMPLERS), dtype=(jnp.float32, jnp.float64))
  def test_dtype_is_preserved(self, name, dtype):
    options = dict(s_churn=1.0) if name.endswith("_edm") else {}
    num_draws = samplers.num_noise_draws(name, 4, **options)
    noise = unit_noise(num_draws).astype(dtype)
    z = self.z.astype(dtype)
    x = self.run_sampler(name, wiggly_denoiser, z, 4, noise=noise, **options)
    self.assertEqual(x.dtype, dtype)
    self.assertEqual(x.shape, SHAPE)
    # The value is right too: float32 agrees with the float64 reference.
    expected = np_sample(name, wiggly_denoiser, z, 4, noise, **options)
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    chex.assert_trees_all_close(np.asarray(x, np.float64), expected, rtol=tol, atol=tol)

if __name__ == "__main__":
  absltest.main()


_SHAPE = (2, 3, 3, 1)
_SCHEDULE = dict(sigma_min=0.01, sigma_max=10.0, rho=3.0)


def _np_edm_sigmas(n, sigma_min, sigma_max, rho):
  i = np.arange(n)
  s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho)
                                                - sigma_max ** (1 / rho))) ** rho
  return np.append(s, 0.0)


def _record(name, num_steps, z, **options):
  """Runs sampler ``name`` (jitted) and returns the (sigma, x[0, 0, 0, 0]) of
  every denoiser call, in order."""
  calls = []

  def den(x, sigma):
    jax.debug.callback(lambda s, v: calls.append((float(s[0]), float(v))),
                       sigma, x[0, 0, 0, 0], ordered=True)
    return 0.5 * x / (1.0 + sigma[:, None, None, None] ** 2)

  draws = samplers.num_noise_draws(name, num_steps, **_SCHEDULE, **options)
  noise = np.random.default_rng(1).standard_normal((draws,) + _SHAPE)
  fn = functools.partial(samplers.get_sampler(name), den, num_steps=num_steps,
                         **_SCHEDULE, **options)
  out = jax.jit(fn)(z, noise=noise)
  jax.block_until_ready(out)
  jax.effects_barrier()
  return calls


# samplers that call the denoiser once per step, at the schedule's sigmas
_ONE_CALL_PER_STEP = [("euler_edm", {}), ("euler_ancestral", {}), ("dpmpp_2m", {}),
                      ("lms", {})]


@pytest.mark.parametrize("name,options", _ONE_CALL_PER_STEP + [
    ("heun_edm", {}), ("dpmpp_2s_ancestral", {})])
def test_schedule_options_reach_the_sampler(name, options):
  with jax.enable_x64(True):
    n = 5
    z = jnp.asarray(np.random.default_rng(0).standard_normal(_SHAPE))
    calls = _record(name, n, z, **options)
    want = _np_edm_sigmas(n, **_SCHEDULE)
    got = np.array([s for s, _ in calls])
    if (name, options) in _ONE_CALL_PER_STEP:
      np.testing.assert_allclose(got, want[:-1], rtol=1e-12)
    elif name == "heun_edm":  # sigma_0, then sigma_i twice: step i-1's corrector, step i
      np.testing.assert_allclose(got, np.repeat(want[:-1], 2)[1:], rtol=1e-12)
    else:  # dpmpp_2s: sigma_i and the midpoint sqrt(sigma_i sigma_down_i), then sigma_{n-1}
      np.testing.assert_allclose(got[0::2], want[:-1], rtol=1e-12)
      up = np.minimum(want[1:-1], np.sqrt(want[1:-1] ** 2 * (want[:-2] ** 2 - want[1:-1] ** 2)
                                          / want[:-2] ** 2))
      down = np.sqrt(want[1:-1] ** 2 - up ** 2)
      np.testing.assert_allclose(got[1::2], np.sqrt(want[:-2] * down), rtol=1e-12)
    # sgm's prepare_sampling_loop: x_T = z sqrt(1 + sigma_max^2)
    np.testing.assert_allclose(calls[0][1], float(z[0, 0, 0, 0]) * math.sqrt(1 + 10.0 ** 2),
                               rtol=1e-12)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_denoiser_answering_in_another_dtype(name):
  # A float32 network fed bfloat16 x returns float32 (flax promotes to its
  # params' dtype); the samplers cast D to x's dtype (samplers._denoise),
  # so the scan carry keeps z's dtype. Checked for values with a float64 D on
  # float32 z, which must give the float32 run's result.
  def den(x, sigma, dtype):
    return (0.5 * x / (1.0 + sigma[:, None, None, None] ** 2)).astype(dtype)

  z = np.random.default_rng(0).standard_normal(_SHAPE)
  noise = np.random.default_rng(1).standard_normal(
      (samplers.num_noise_draws(name, 3),) + _SHAPE)
  fn = functools.partial(samplers.get_sampler(name), num_steps=3)
  out = fn(functools.partial(den, dtype=jnp.float32), jnp.asarray(z, jnp.bfloat16),
           noise=noise.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  with jax.enable_x64(True):
    z32, noise32 = jnp.asarray(z, jnp.float32), jnp.asarray(noise, jnp.float32)
    out = fn(functools.partial(den, dtype=jnp.float64), z32, noise=noise32)
    ref = fn(functools.partial(den, dtype=jnp.float32), z32, noise=noise32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
