"""EMA (sgm's LitEma rule) and guiders (identity, vanilla CFG)."""
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
    x = jnp.ones((4, 2))
    sigma = jnp.asarray([0.1, 0.3, 5.0, 6.0])  # outside, inside, inside (hi), outside
    cond, uncond = {"vector": jnp.full((4, 1), 2.0)}, {"vector": jnp.full((4, 1), -1.0)}
    out = self.variant(lambda x, s: guiders.vanilla_cfg(den, 3.0, (0.2, 5.0))(
        x, s, cond, uncond))(x, sigma)
    x_c, x_u = 2.0 + np.asarray(sigma)[:, None], -1.0 + np.asarray(sigma)[:, None]
    expected = np.where(np.array([False, True, True, False])[:, None],
                        x_u + 3.0 * (x_c - x_u), x_c) * np.ones((1, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_interval"):
      guiders.vanilla_cfg(den, 3.0, (5.0, 0.2))

  def test_cfg_missing_uncond_key(self):
    den = lambda x, s, c: x
    with pytest.raises(ValueError, match="uncond"):
      guiders.vanilla_cfg(den, 2.0)(jnp.zeros((1, 1)), jnp.ones(1),
                                    {"vector": jnp.ones((1, 1))}, {})

  def test_identity_and_close_over(self):
    den = lambda x, s, c: x + c["vector"]
    g = guiders.close_over(guiders.identity_guider(den), {"vector": jnp.ones((2, 1))})
    np.testing.assert_allclose(g(jnp.zeros((2, 1)), jnp.ones(2)), 1.0)
