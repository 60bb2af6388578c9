"""EDM scalings, weighting, sigma sampling and discretization vs numpy formulas."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import edm

SIGMAS = np.array([0.002, 0.01, 0.3, 0.5, 1.0, 7.3, 80.0])


class EdmTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scaling_matches_formulas_float64(self):
    with jax.enable_x64(True):
      sigma = jnp.asarray(SIGMAS.reshape(7, 1), jnp.float64)
      c_skip, c_out, c_in, c_noise = self.variant(edm.edm_scaling)(sigma, 0.7)
      sd = 0.7
      s = SIGMAS.reshape(7, 1)
      np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-14)
      np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-14)
      np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-14)
      np.testing.assert_allclose(c_noise, 0.25 * np.log(s), rtol=1e-14)
      for c in (c_skip, c_out, c_in, c_noise):
        self.assertEqual(c.dtype, jnp.float64)
        self.assertEqual(c.shape, (7, 1))
      # The EDM identity behind the preconditioning: c_skip^2 sd^2 ... unit
      # variance target: c_out^2 + c_skip^2 sigma^2 ... ; check D(x)=x for sigma->0.
      np.testing.assert_allclose(c_skip[0], 1.0, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_weighting_is_inverse_c_out_squared(self):
    with jax.enable_x64(True):
      sigma = jnp.asarray(SIGMAS)
      w = self.variant(edm.edm_weighting)(sigma, 0.5)
      np.testing.assert_allclose(w, (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2, rtol=1e-14)
      _, c_out, _, _ = edm.edm_scaling(sigma, 0.5)
      np.testing.assert_allclose(w * c_out**2, 1.0, rtol=1e-13)
      self.assertEqual(w.dtype, jnp.float64)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sigma_sampling_given_rand(self):
    with jax.enable_x64(True):
      rand = jnp.asarray([-2.0, 0.0, 0.5, 3.0], jnp.float64)
      fn = self.variant(lambda r: edm.edm_sigma_sampling(None, 4, -1.2, 1.2, rand=r))
      sigma = fn(rand)
      np.testing.assert_allclose(sigma, np.exp(-1.2 + 1.2 * np.asarray(rand)), rtol=1e-14)
      self.assertEqual(sigma.dtype, jnp.float64)

  def test_sigma_sampling_distribution(self):
    sigma = edm.edm_sigma_sampling(jax.random.key(0), 200_000)
    log_s = np.log(np.asarray(sigma))
    self.assertAlmostEqual(log_s.mean(), -1.2, delta=0.01)
    self.assertAlmostEqual(log_s.std(), 1.2, delta=0.01)
    self.assertEqual(sigma.dtype, jnp.float32)

  def test_discretization(self):
    s = edm.edm_discretization(5, 0.002, 80.0, 7.0)
    ramp = np.linspace(0, 1, 5)
    ref = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1], ref, rtol=1e-14)
    self.assertEqual(s[-1], 0.0)
    self.assertEqual(len(s), 6)
    np.testing.assert_allclose(s[0], 80.0, rtol=1e-14)
    np.testing.assert_allclose(s[4], 0.002, rtol=1e-12)
    self.assertTrue(np.all(np.diff(s) < 0))
    s = edm.edm_discretization(18, 0.05, 5.42)  # the powers alone give 0.049999999999999996
    self.assertEqual((s[0], s[17]), (5.42, 0.05))
    self.assertEqual(list(edm.edm_discretization(1, 0.05, 5.42)), [5.42, 0.0])
    self.assertEqual(len(edm.edm_discretization(5, append_zero=False)), 5)
    with pytest.raises(ValueError, match="num_steps"):
      edm.edm_discretization(0)
    # an empty, upward or degenerate schedule (dpmpp_2m gave NaN, lms divided by 0)
    for lo, hi, rho in ((1.0, 1.0, 7.0), (5.0, 1.0, 7.0), (0.0, 80.0, 7.0),
                        (0.002, 0.0, 7.0), (0.002, 80.0, 0.0), (0.002, 80.0, -1.0)):
      with pytest.raises(ValueError, match="0 < sigma_min < sigma_max|rho must be > 0"):
        edm.edm_discretization(5, lo, hi, rho)

  def test_integer_sigma_is_taken_as_float(self):
    # in its own dtype, sigma_data 0.5 became 0: c_skip 0, weights inf
    for fn in (edm.edm_scaling, edm.edm_weighting):
      ints, floats = fn(jnp.array([1, 2])), fn(jnp.array([1.0, 2.0]))
      for a, b in zip(jax.tree.leaves(ints), jax.tree.leaves(floats)):
        self.assertEqual(a.dtype, jnp.float32)
        np.testing.assert_array_equal(a, b)


def test_sigma_sampling_and_discretization_keep_the_asked_dtype():
  for dtype in (jnp.bfloat16, jnp.float16):
    sigma = edm.edm_sigma_sampling(jax.random.key(0), 4, dtype=dtype)
    assert sigma.dtype == dtype, sigma.dtype
  with jax.enable_x64(True):
    assert edm.edm_sigma_sampling(jax.random.key(0), 4, dtype=jnp.float32).dtype == jnp.float32
  s = edm.edm_discretization(5, dtype=np.float32)
  assert s.dtype == np.float32 and s[-1] == 0.0
