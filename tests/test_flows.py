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
    # the reversal between couplings: after 3 layers every output feature
    # depends on other features too (without it the first half passes through)
    assert np.all(np.sum(np.abs(np.asarray(jac)) > 1e-12, axis=1) >= 2), jac
  # one coupling keeps its first half and moves the rest, then reverses
  layer = flows.AffineCoupling(hidden=8)
  lp = _randomize(jax.tree.map(lambda p: p.astype(jnp.float64),
                               layer.init(jax.random.key(4), x, ctx)), jax.random.key(5))
  y1, _ = layer.apply(lp, x, ctx)
  np.testing.assert_array_equal(y1[:, ::-1][:, :3], x[:, :3])
  assert np.all(np.abs(y1[:, ::-1][:, 3:] - x[:, 3:]) > 1e-6)
  if ctx is not None:  # the context reaches the coupling networks
    y_other, _ = flow.apply(params, x, ctx + 1.0, method="forward_and_log_det")
    assert np.all(np.abs(y_other - y).max(axis=1) > 1e-3)


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


def test_squeeze_is_a_permutation_and_unsqueeze_inverts_it():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = flows.squeeze(x)
  assert y.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(np.sort(np.asarray(y).ravel()), np.asarray(x).ravel())
  # output pixel (i, j) holds the 2x2 block at (2i, 2j) of the input
  np.testing.assert_array_equal(y[1, 1, 2].reshape(2, 2, 3), x[1, 2:4, 4:6])
  np.testing.assert_array_equal(flows.unsqueeze(y), x)
  with pytest.raises(ValueError, match="even"):
    flows.squeeze(jnp.zeros((1, 3, 4, 1)))


@pytest.mark.parametrize("channels", [4, 12])
def test_channel_splits_partition_and_alternate(channels):
  seen = set()
  for i in range(8):
    kept, moved = flows.channel_split(channels, i)
    assert sorted(np.concatenate([kept, moved])) == list(range(channels))
    assert len(kept) == channels // 2
    k2, m2 = flows.channel_split(channels, i ^ 1)  # the pair partner swaps roles
    np.testing.assert_array_equal(kept, m2)
    seen.add(tuple(kept))
  assert len(seen) > 2  # later pairs use other partitions


@pytest.mark.parametrize("context_dim,global_context", [(None, False), (3, False),
                                                        (None, True), (3, True)])
def test_conv_flow_inverse_and_log_det(x64, context_dim, global_context):
  flow = flows.ConvCouplingFlow(n_layers=4, hidden=4, num_blocks=1,
                                global_context=global_context)
  x = jax.random.normal(jax.random.key(0), (3, 4, 2, 1), jnp.float64)
  ctx = None if context_dim is None else jax.random.normal(
      jax.random.key(1), (3, context_dim), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), flow.init(jax.random.key(2), x, ctx))
  y0, ld0 = flow.apply(params, x, ctx)
  np.testing.assert_allclose(y0, x)  # zero-initialised outputs: the identity
  np.testing.assert_allclose(ld0, 0.0)
  params = _randomize(params, jax.random.key(3))
  y, log_det = flow.apply(params, x, ctx, method="forward_and_log_det")
  x_back, inv_log_det = flow.apply(params, y, ctx, method="inverse_and_log_det")
  np.testing.assert_allclose(x_back, x, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(inv_log_det, -log_det, rtol=1e-10)
  assert np.all(np.abs(log_det) > 1e-3)
  for i in range(3):
    ci = None if ctx is None else ctx[i:i + 1]
    f = lambda v: flow.apply(params, v.reshape(1, 4, 2, 1), ci)[0].ravel()
    sign, logabs = jnp.linalg.slogdet(jax.jacobian(f)(x[i].ravel()))
    assert sign != 0
    np.testing.assert_allclose(log_det[i], logabs, rtol=1e-10, atol=1e-10)
  if ctx is not None:  # the context reaches every sample's couplings (FiLM)
    y_other, _ = flow.apply(params, x, ctx + 1.0)
    assert np.all(np.abs(y_other - y).reshape(3, -1).max(axis=1) > 1e-3)
  # numpy input gives the same result (model init passes numpy batches)
  y_np, ld_np = flow.apply(params, np.asarray(x), None if ctx is None else np.asarray(ctx))
  np.testing.assert_allclose(y_np, y, rtol=1e-13)
  np.testing.assert_allclose(ld_np, log_det, rtol=1e-13)
  # samples stay independent (GroupNorm is per sample)
  y_one, _ = flow.apply(params, x[1:2], None if ctx is None else ctx[1:2])
  np.testing.assert_allclose(y[1:2], y_one, rtol=1e-12)


@pytest.mark.parametrize("max_log_scale", [1.0, 3.0])
def test_log_scale_bound(max_log_scale):
  """Huge coupling outputs saturate at |log_s| = m per transformed feature."""
  flow = flows.CouplingFlow(n_layers=2, hidden=8, max_log_scale=max_log_scale)
  x = jax.random.normal(jax.random.key(0), (3, 6))
  params = _randomize(flow.init(jax.random.key(1), x), jax.random.key(2), scale=300.0)
  _, log_det = flow.apply(params, x)
  bound = max_log_scale * 2 * 3  # 2 layers x 3 transformed features
  assert np.all(np.abs(log_det) <= bound + 1e-4)
  assert np.max(np.abs(log_det)) > 0.5 * bound  # saturates near the bound
  raw = jnp.linspace(-20.0, 20.0, 41)
  np.testing.assert_allclose(flows.bounded_log_scale(raw, max_log_scale),
                             max_log_scale * np.tanh(np.asarray(raw) / max_log_scale),
                             rtol=1e-6)
  # slope 1 at 0 whatever the bound: small outputs are log-scales as they are
  np.testing.assert_allclose(jax.grad(flows.bounded_log_scale)(0.0, max_log_scale), 1.0)
  with pytest.raises(ValueError, match="max_log_scale"):
    flows.CouplingFlow(n_layers=1, hidden=4, max_log_scale=0.0).init(jax.random.key(0), x)
