"""Coupling flows: invertibility and exact log-determinants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import flows


def _randomize(params, key, scale=0.3):
  """Non-zero output layers, so the test flow is not the identity."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [
      l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("context_dim", [None, 3])
def test_inverse_and_log_det(x64, context_dim):
  flow = flows.CouplingFlow(n_layers=3, hidden=8, activation="softplus")
  x = jax.random.normal(jax.random.key(0), (4, 7), jnp.float64)
  ctx = None if context_dim is None else jax.random.normal(
      jax.random.key(1), (4, context_dim), jnp.float64)
  params = flow.init(jax.random.key(2), x, ctx)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  # Zero-initialised output layers: the flow starts as a permutation, log det 0.
  y0, ld0 = flow.apply(params, x, ctx, method="forward_and_log_det")
  np.testing.assert_allclose(ld0, 0.0)
  np.testing.assert_allclose(np.sort(y0, 1), np.sort(x, 1))
  params = _randomize(params, jax.random.key(3))
  y, log_det = flow.apply(params, x, ctx, method="forward_and_log_det")
  x_back, inv_log_det = flow.apply(params, y, ctx, method="inverse_and_log_det")
  np.testing.assert_allclose(x_back, x, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(inv_log_det, -log_det, rtol=1e-12)
  assert np.all(np.abs(log_det) > 1e-3)  # a real transformation
  for i in range(4):
    ci = None if ctx is None else ctx[i:i + 1]
    f = lambda v: flow.apply(params, v[None], ci, method="forward_and_log_det")[0][0]
    jac = jax.jacobian(f)(x[i])
    sign, logabs = jnp.linalg.slogdet(jac)
    assert sign != 0
    np.testing.assert_allclose(log_det[i], logabs, rtol=1e-10, atol=1e-10)


def test_layers_do_not_mix_samples(x64):
  flow = flows.CouplingFlow(n_layers=2, hidden=8)
  x = jax.random.normal(jax.random.key(0), (5, 6), jnp.float64)
  params = _randomize(jax.tree.map(lambda p: p.astype(jnp.float64),
                                   flow.init(jax.random.key(1), x)), jax.random.key(2))
  y_all, _ = flow.apply(params, x)
  y_one, _ = flow.apply(params, x[2:3])
  np.testing.assert_allclose(y_all[2:3], y_one, rtol=1e-13)


def test_bad_activation_and_depth():
  with pytest.raises(ValueError, match="activation"):
    flows.get_activation("relu6")
  with pytest.raises(ValueError, match="n_layers"):
    flows.CouplingFlow(n_layers=0, hidden=4).init(jax.random.key(0), jnp.zeros((1, 4)))
