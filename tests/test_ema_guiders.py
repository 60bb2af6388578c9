"""EMA (sgm's LitEma rule; EDM2's power-function EMA and its post-hoc
reconstruction) and guiders (identity, vanilla CFG)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import ema, guiders


class EmaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_litema_rule(self):
    with jax.enable_x64(True):
      shadow = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(3.0)}}
      ref = {"a": np.array([1.0, 2.0]), "b": {"c": 3.0}}
      n = 0
      upd = self.variant(lambda s, p, n: ema.ema_update(s, p, n, 0.9))
      for step in range(30):
        params = {"a": jnp.asarray([0.5 * step, -step]), "b": {"c": jnp.asarray(step ** 0.5)}}
        shadow, n = upd(shadow, params, n)
        k = step + 1  # the counter is incremented before use
        d = min(0.9, (1 + k) / (10 + k))
        ref = jax.tree.map(lambda s, p: s - (1 - d) * (s - np.asarray(p)), ref, params)
        self.assertEqual(int(n), k)
      chex.assert_trees_all_close(shadow, ref, rtol=1e-12)
      self.assertEqual(shadow["a"].dtype, jnp.float64)

  def test_first_update_weight(self):
    s, n = ema.ema_update(jnp.zeros(()), jnp.ones(()), 0)
    np.testing.assert_allclose(s, 1 - 2 / 11, rtol=1e-6)
    self.assertEqual(int(n), 1)


class GuiderTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_doubled_batch_uncond_first(self):
    calls = []

    def den(x, sigma, cond):
      calls.append((x.shape, sigma.shape, cond["vector"].shape))
      return x * cond["vector"][:, :1, None] + sigma[:, None, None]

    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    sigma = jnp.asarray([0.5, 2.0])
    cond = {"vector": jnp.asarray([[2.0, 0.0], [3.0, 0.0]])}
    uncond = {"vector": jnp.asarray([[-1.0, 0.0], [0.5, 0.0]])}
    out = self.variant(lambda x, s: guiders.vanilla_cfg(den, 4.0)(x, s, cond, uncond))(x, sigma)
    self.assertEqual(calls[0], ((4, 3, 2), (4,), (4, 2)))
    x_u = np.asarray(x) * np.array([-1.0, 0.5])[:, None, None] + np.array([0.5, 2.0])[:, None, None]
    x_c = np.asarray(x) * np.array([2.0, 3.0])[:, None, None] + np.array([0.5, 2.0])[:, None, None]
    np.testing.assert_allclose(out, x_u + 4.0 * (x_c - x_u), rtol=1e-6)

  def test_cfg_order_is_observable(self):
    # A denoiser that returns its conditioning: the first half must be uncond.
    den = lambda x, s, c: jnp.broadcast_to(c["vector"][:, :1], x.shape)
    x = jnp.zeros((1, 1))
    out = guiders.vanilla_cfg(den, 1.0)(x, jnp.ones(1), {"vector": jnp.ones((1, 1)) * 7},
                                        {"vector": jnp.ones((1, 1)) * -5})
    np.testing.assert_allclose(out, 7.0)  # scale 1: x_u + (x_c - x_u) = x_c
    out0 = guiders.vanilla_cfg(den, 0.0)(x, jnp.ones(1), {"vector": jnp.ones((1, 1)) * 7},
                                         {"vector": jnp.ones((1, 1)) * -5})
    np.testing.assert_allclose(out0, -5.0)  # scale 0: the unconditional half

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_interval_guides_only_inside(self):
    den = lambda x, s, c: x * c["vector"][:, :1] + s[:, None]
    x = jnp.ones((5, 2))
    # outside, outside (lo: the interval is lo < sigma <= hi), inside, inside (hi), outside
    sigma = jnp.asarray([0.1, 0.2, 0.3, 5.0, 6.0])
    cond, uncond = {"vector": jnp.full((5, 1), 2.0)}, {"vector": jnp.full((5, 1), -1.0)}
    out = self.variant(lambda x, s: guiders.vanilla_cfg(den, 3.0, (0.2, 5.0))(
        x, s, cond, uncond))(x, sigma)
    x_c, x_u = 2.0 + np.asarray(sigma)[:, None], -1.0 + np.asarray(sigma)[:, None]
    expected = np.where(np.array([False, False, True, True, False])[:, None],
                        x_u + 3.0 * (x_c - x_u), x_c) * np.ones((1, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_interval"):
      guiders.vanilla_cfg(den, 3.0, (5.0, 0.2))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_interval_skips_the_unconditional_half_outside(self):
    # what runs (not what is traced: lax.cond traces both branches) is recorded
    # by a callback: outside the interval one conditional call on B samples,
    # inside one call on the doubled batch
    ran = []

    def den(x, s, c):
      jax.debug.callback(lambda: ran.append(x.shape[0]))
      return x * c["vector"][:, :1] + s[:, None]

    x = jnp.ones((3, 2))
    cond, uncond = {"vector": jnp.full((3, 1), 2.0)}, {"vector": jnp.full((3, 1), -1.0)}
    fn = self.variant(lambda x, s: guiders.vanilla_cfg(den, 3.0, (0.2, 5.0))(
        x, s, cond, uncond))
    for sigma, expected_batch, guided in ((0.1, 3, False), (5.0, 6, True), (6.0, 3, False)):
      ran.clear()
      out = jax.block_until_ready(fn(x, jnp.full((3,), sigma)))
      jax.effects_barrier()
      self.assertEqual(ran, [expected_batch])
      x_c, x_u = 2.0 + sigma, -1.0 + sigma
      np.testing.assert_allclose(out, x_u + 3.0 * (x_c - x_u) if guided else x_c, rtol=1e-6)

  def test_cfg_missing_uncond_key(self):
    den = lambda x, s, c: x
    with pytest.raises(ValueError, match="uncond"):
      guiders.vanilla_cfg(den, 2.0)(jnp.zeros((1, 1)), jnp.ones(1),
                                    {"vector": jnp.ones((1, 1))}, {})
    guided = guiders.close_over(guiders.vanilla_cfg(den, 2.0), {"vector": jnp.ones((1, 1))})
    with pytest.raises(ValueError, match="needs the unconditional conditioning"):
      guided(jnp.zeros((1, 1)), jnp.ones(1))  # close_over without uncond

  def test_identity_and_close_over(self):
    den = lambda x, s, c: x + c["vector"]
    g = guiders.close_over(guiders.identity_guider(den), {"vector": jnp.ones((2, 1))})
    np.testing.assert_allclose(g(jnp.zeros((2, 1)), jnp.ones(2)), 1.0)

  def test_switch_takes_the_low_denoiser_at_and_below_its_sigma(self):
    high = lambda x, s: x + 1.0
    low = lambda x, s: x - 1.0
    den = jax.jit(guiders.switch(high, low, 0.3))
    x = jnp.zeros((2, 1))
    for sigma, want in ((80.0, 1.0), (0.31, 1.0), (0.3, -1.0), (0.002, -1.0)):
      np.testing.assert_allclose(den(x, jnp.full((2,), sigma)), want, err_msg=str(sigma))


def _impulse_responses(update, num_steps, snapshot_every):
  """Weights of each step's raw parameters in the shadows: params at step tau
  are the unit vector e_tau, so the shadows' entries are the weights."""
  eye = np.eye(num_steps)
  shadows, snaps = None, {}
  for t in range(1, num_steps + 1):
    shadows = update(shadows, jnp.asarray(eye[t - 1]), t)
    if t % snapshot_every == 0:
      snaps[t] = [np.asarray(s) for s in shadows]
  return snaps


class PowerEmaTest(chex.TestCase):

  def test_exp_std_round_trip_and_range(self):
    for gamma in (0.0, 1.0, 6.94, 16.97, 100.0):
      np.testing.assert_allclose(ema.std_to_exp(ema.exp_to_std(gamma)), gamma, atol=1e-9)
    np.testing.assert_allclose(ema.exp_to_std(6.94), 0.1, atol=1e-4)  # EDM2's pairs
    np.testing.assert_allclose(ema.exp_to_std(16.97), 0.05, atol=1e-5)
    for bad in (0.0, -0.1, 0.3):
      with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\]"):
        ema.std_to_exp(bad)
    with pytest.raises(ValueError, match="made for other ema.posthoc_stds"):
      ema.power_ema_update((jnp.zeros(2),), jnp.ones(2), 1, (0.05, 0.1))

  def test_tracked_profile_has_the_asked_width(self):
    # The weights a tracked power EMA gives each step's parameters sum to 1
    # and have standard deviation sigma_rel * t.
    num_steps, stds = 600, (0.05, 0.1, 0.2)
    with jax.enable_x64(True):
      snaps = _impulse_responses(
          lambda s, p, t: ema.power_ema_update(
              tuple(jnp.zeros_like(p) for _ in stds) if s is None else s, p, t, stds),
          num_steps, num_steps)
    tau = np.arange(1, num_steps + 1)
    for std, w in zip(stds, snaps[num_steps]):
      mean = np.sum(w * tau)
      np.testing.assert_allclose(np.sum(w), 1.0, atol=1e-12)
      np.testing.assert_allclose(np.sqrt(np.sum(w * tau ** 2) - mean ** 2) / num_steps,
                                 std, rtol=2e-3)

  def test_inner_product_matches_quadrature(self):
    tau = np.linspace(0, 1000, 2_000_001)[1:]
    def profile(t, std):
      g = ema.std_to_exp(std)
      return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)
    for a, b in [((1000, 0.05), (1000, 0.1)), ((600, 0.1), (1000, 0.05)),
                 ((1000, 0.2), (300, 0.02)), ((700, 0.05), (700, 0.05))]:
      numeric = np.trapezoid(profile(*a) * profile(*b), tau)
      np.testing.assert_allclose(ema.power_profile_inner(*a, *b), numeric, rtol=1e-3)
      np.testing.assert_allclose(ema.power_profile_inner(*b, *a), numeric, rtol=1e-3)

  def test_posthoc_reconstruction_matches_a_tracked_ema(self):
    # Track sigma_rel 0.05 and 0.1 with snapshots every 50 steps of 600 and
    # reconstruct other widths at the last step: the result equals the EMA
    # of that width tracked directly, to within the fit error the solve
    # predicts; a tracked width comes back exactly.
    num_steps, stds = 600, (0.05, 0.1)
    targets = (0.03, 0.05, 0.0905, 0.15)
    with jax.enable_x64(True):
      init = lambda s, p, k: tuple(jnp.zeros_like(p) for _ in range(k)) if s is None else s
      snaps = _impulse_responses(
          lambda s, p, t: ema.power_ema_update(init(s, p, 2), p, t, stds), num_steps, 50)
      direct = _impulse_responses(
          lambda s, p, t: ema.power_ema_update(init(s, p, 4), p, t, targets),
          num_steps, num_steps)[num_steps]
    in_t = np.repeat(sorted(snaps), len(stds))
    in_std = np.tile(stds, len(snaps))
    shadows = [w for t in sorted(snaps) for w in snaps[t]]
    errs = {}
    for target, want in zip(targets, direct):
      coef, err = ema.posthoc_coefficients(in_t, in_std, num_steps, target)
      np.testing.assert_allclose(np.sum(coef), 1.0, atol=1e-12)
      got = sum(c * w for c, w in zip(coef, shadows))
      actual = np.linalg.norm(got - want) / np.linalg.norm(want)
      # the discrete weights differ from the continuous profile by O(1/t)
      np.testing.assert_allclose(actual, err, atol=2e-3)
      errs[target] = err
    assert errs[0.05] < 1e-9
    assert errs[0.0905] < 0.01 and errs[0.15] < 0.03
    assert errs[0.03] > 0.03  # narrower than both tracked: a visible misfit

  def test_litema_is_the_gamma_8_power_profile(self):
    # sgm's LitEma (decay (1+n)/(10+n) below its cap) weighs the parameters
    # of step tau by about tau^8: sigma_rel 0.0905 = exp_to_std(8).
    num_steps = 2000
    tau = np.arange(1, num_steps + 1)
    d = np.minimum(0.9999, (1.0 + tau) / (10.0 + tau))
    later = np.concatenate([np.cumsum(np.log(d)[::-1])[::-1][1:], [0.0]])
    w = (1.0 - d) * np.exp(later)
    mean = np.sum(w * tau)
    np.testing.assert_allclose(np.sum(w), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(np.sum(w * tau ** 2) - mean ** 2) / num_steps,
                               ema.exp_to_std(8.0), rtol=5e-3)
    # and that closed form is the rule ema_update applies
    with jax.enable_x64(True):
      shadow, n = jnp.zeros(num_steps), 0
      eye = np.eye(num_steps)
      for t in range(num_steps):
        shadow, n = ema.ema_update(shadow, jnp.asarray(eye[t]), n)
    np.testing.assert_allclose(np.asarray(shadow), w, atol=1e-12)


def test_power_ema_weight_is_precise_at_millions_of_steps():
  # 1 - beta = 1 - (1 - 1/t)^(gamma + 1) ~ (gamma + 1)/t: through log(1 - 1/t)
  # in float32 it is ~3% off at t ~ 1.2e6 (the rounding of 1 - 1/t), and 1 - beta
  # rounded in float32 0.1% (2.4% at 1e7); expm1 of log1p keeps it to float32's
  # relative precision. The shadow starts at 0 and the parameters are 1, so the
  # new shadow is 1 - beta.
  for t in (1_234_567, 10_000_019):
    out = ema.power_ema_update((jnp.zeros(()), jnp.zeros(())), jnp.ones(()), t, (0.05, 0.1))
    for shadow, std in zip(out, (0.05, 0.1)):
      g = float(ema.std_to_exp(std))
      want = -np.expm1((g + 1) * np.log1p(-1.0 / t))
      np.testing.assert_allclose(float(shadow), want, rtol=1e-5)
