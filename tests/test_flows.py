"""Coupling flows: invertibility and exact log-determinants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import flows
from tests.perturb import perturb


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
  params = perturb(params, jax.random.key(3), 0.3)
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
  lp = perturb(layer.init(jax.random.key(4), x, ctx), jax.random.key(5), 0.3, jnp.float64)
  y1, _ = layer.apply(lp, x, ctx)
  np.testing.assert_array_equal(y1[:, ::-1][:, :3], x[:, :3])
  assert np.all(np.abs(y1[:, ::-1][:, 3:] - x[:, 3:]) > 1e-6)
  if ctx is not None:  # the context reaches the coupling networks
    y_other, _ = flow.apply(params, x, ctx + 1.0, method="forward_and_log_det")
    assert np.all(np.abs(y_other - y).max(axis=1) > 1e-3)


def test_layers_do_not_mix_samples(x64):
  flow = flows.CouplingFlow(n_layers=2, hidden=8)
  x = jax.random.normal(jax.random.key(0), (5, 6), jnp.float64)
  params = perturb(flow.init(jax.random.key(1), x), jax.random.key(2), 0.3, jnp.float64)
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


@pytest.mark.parametrize("context_dim,global_context,scale_shift_norm", [
    (None, False, False), (3, False, False), (None, True, False), (3, True, False),
    (3, False, True), (None, True, True)])
def test_conv_flow_inverse_and_log_det(x64, context_dim, global_context, scale_shift_norm):
  flow = flows.ConvCouplingFlow(n_layers=4, hidden=4, num_blocks=1,
                                global_context=global_context,
                                scale_shift_norm=scale_shift_norm)
  x = jax.random.normal(jax.random.key(0), (3, 4, 2, 1), jnp.float64)
  ctx = None if context_dim is None else jax.random.normal(
      jax.random.key(1), (3, context_dim), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), flow.init(jax.random.key(2), x, ctx))
  y0, ld0 = flow.apply(params, x, ctx)
  np.testing.assert_allclose(y0, x)  # zero-initialised outputs: the identity
  np.testing.assert_allclose(ld0, 0.0)
  params = perturb(params, jax.random.key(3), 0.3)
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
  params = perturb(flow.init(jax.random.key(1), x), jax.random.key(2), 300.0)
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


@pytest.mark.parametrize("hidden", [4, 24])
def test_conv_film_placement_and_what_groupnorm_leaves_of_it(x64, hidden):
  # FiLM before a GroupNorm (the legacy block) is normalised away where it is
  # common to a group's channels: all of it at 1 channel per group (hidden
  # <= 8); after the norm (scale_shift_norm, sgm's use_scale_shift_norm) the
  # context always reaches the output. Checked with FiLMs of positive gain
  # (1 + scale > 0), where the sign cannot leak through the norm.
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2), jnp.float64)
  ctx = jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)
  def outputs(scale_shift_norm, film_gain):
    net = flows.ConvCouplingNet(hidden, num_blocks=1, scale_shift_norm=scale_shift_norm)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), net.init(jax.random.key(2), x, ctx, 2))
    params = perturb(params, jax.random.key(3), 0.3)  # the output conv too
    dense = params["params"]["Dense_0"]
    dense["kernel"] = dense["kernel"] * film_gain  # small FiLMs: 1 + scale > 0
    dense["bias"] = dense["bias"] * film_gain
    both = lambda c: jnp.concatenate(net.apply(params, x, c, 2), axis=-1)
    return both(ctx), both(ctx + 0.5), both(ctx * 0.0 + 1.0)
  for ssn in (False, True):
    a, b, c = outputs(ssn, 0.05)
    moved = float(jnp.max(jnp.abs(a - b)))
    if ssn or hidden > 8:
      assert moved > 1e-3, (ssn, hidden, moved)  # the context reaches the output
    else:
      assert moved < 1e-6, moved  # 1 channel per group: erased by the norm
  # where a group holds channels, the legacy block keeps only the FiLM's
  # within-group differences: one scale and shift for every channel is lost
  net = flows.ConvCouplingNet(hidden, num_blocks=1)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), net.init(jax.random.key(2), x, ctx, 2))
  params = perturb(params, jax.random.key(3), 0.3)
  dense = params["params"]["Dense_0"]
  k = dense["kernel"]  # (3, 2 hidden): the same column for every channel
  dense["kernel"] = jnp.concatenate([jnp.tile(0.05 * k[:, :1], (1, hidden)),
                                     jnp.tile(0.3 * k[:, :1], (1, hidden))], axis=1)
  dense["bias"] = jnp.zeros_like(dense["bias"])
  for ssn in (False, True):
    net = flows.ConvCouplingNet(hidden, num_blocks=1, scale_shift_norm=ssn)
    out = lambda c: jnp.concatenate(net.apply(params, x, c, 2), axis=-1)
    moved = float(jnp.max(jnp.abs(out(ctx) - out(ctx + 0.5))))
    assert (moved > 1e-3) if ssn else (moved < 1e-6), (ssn, hidden, moved)


def test_coupling_output_is_the_bounded_scale_and_the_unbounded_shift(x64):
  """With the output layer's kernel zero, its bias is (raw log_s, t): one
  coupling is y = reverse([a, b * exp(m tanh(raw / m)) + t]) exactly, with t
  not bounded (only the scale is), and log det = sum m tanh(raw / m)."""
  m = 0.7
  layer = flows.AffineCoupling(hidden=8, max_log_scale=m)
  x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        layer.init(jax.random.key(1), x))
  params = perturb(params, jax.random.key(2), 0.3)
  raw = jnp.asarray([2.0, -0.5, 0.1])   # 3 transformed features (5 - 5 // 2)
  t = jnp.asarray([4.0, -6.0, 2.5])     # well beyond m: must pass through as is
  out = params["params"]["net"]["Dense_2"]
  out["kernel"] = jnp.zeros_like(out["kernel"])
  out["bias"] = jnp.concatenate([raw, t])
  y, log_det = layer.apply(params, x)
  log_s = m * np.tanh(np.asarray(raw) / m)
  x_np = np.asarray(x)
  expected = np.concatenate([x_np[:, :2], x_np[:, 2:] * np.exp(log_s) + np.asarray(t)], 1)
  np.testing.assert_allclose(y, expected[:, ::-1], rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(log_det, np.full(3, log_s.sum()), rtol=1e-13)


@pytest.mark.parametrize("context_dim", [3])
def test_context_reaches_every_coupling(x64, context_dim):
  """Each coupling layer's network sees the context: with every other layer
  left at its zero-initialised output (a pure reversal), perturbing layer i
  alone makes the flow depend on the context, for every i (a context passed
  to the first layer only would leave the others blind to sigma and class)."""
  n = 3
  flow = flows.CouplingFlow(n_layers=n, hidden=8)
  x = jax.random.normal(jax.random.key(0), (4, 6), jnp.float64)
  ctx = jax.random.normal(jax.random.key(1), (4, context_dim), jnp.float64)
  base = jax.tree.map(lambda p: p.astype(jnp.float64), flow.init(jax.random.key(2), x, ctx))
  for i in range(n):
    params = jax.tree.map(lambda a: a, base)
    params["params"][f"layers_{i}"] = perturb(params["params"][f"layers_{i}"],
                                              jax.random.key(10 + i), 0.3)
    y, ld = flow.apply(params, x, ctx)
    y2, ld2 = flow.apply(params, x, ctx + 1.0)
    assert np.all(np.abs(np.asarray(y2 - y)).max(axis=1) > 1e-3), i
    assert np.all(np.abs(np.asarray(ld2 - ld)) > 1e-6), i


def _conv_net(hidden, key=jax.random.key(2)):
  net = flows.ConvCouplingNet(hidden=hidden, num_blocks=2)
  a = jax.random.normal(jax.random.key(0), (2, 4, 4, 2), jnp.float64)
  ctx = jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), net.init(key, a, ctx, 2))
  return net, perturb(params, jax.random.key(5), 0.3), a, ctx


def _jit_apply(net):
  """One compiled call (eager op-by-op dispatch of the CNN is the slow part)."""
  return jax.jit(net.apply, static_argnums=3)


def test_conv_film_is_the_identity_at_zero_and_reaches_every_block(x64):
  """FiLM r -> r (1 + scale) + shift: with the FiLM layers zeroed the CNN is
  exactly the context-free one (same convolutions and norms); and each
  residual block's FiLM alone makes the output depend on the context.
  (16 channels: 2 per GroupNorm group; at <= 8 the legacy block's norm
  erases the FiLM: test_conv_film_placement_and_what_groupnorm_leaves_of_it.)"""
  net, params, a, ctx = _conv_net(16)
  apply = _jit_apply(net)
  zero = lambda d: jax.tree.map(jnp.zeros_like, d)
  p0 = jax.tree.map(lambda v: v, params)
  for name in ("Dense_0", "Dense_1"):
    p0["params"][name] = zero(p0["params"][name])
  no_ctx = {"params": {k: v for k, v in p0["params"].items() if not k.startswith("Dense")}}
  ls0, t0 = apply(p0, a, ctx, 2)
  ls_ref, t_ref = apply(no_ctx, a, None, 2)
  np.testing.assert_allclose(ls0, ls_ref, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(t0, t_ref, rtol=1e-13, atol=1e-14)
  for block in range(2):
    p = jax.tree.map(lambda v: v, params)
    p["params"][f"Dense_{1 - block}"] = zero(p["params"][f"Dense_{1 - block}"])
    ls, t = apply(p, a, ctx, 2)
    ls2, t2 = apply(p, a, ctx + 1.0, 2)
    assert float(jnp.max(jnp.abs(t2 - t))) > 1e-2, block
    assert float(jnp.max(jnp.abs(ls2 - ls))) > 1e-2, block


@pytest.mark.parametrize("conv", [False, True])
def test_bfloat16_coupling_nets_bound_and_return_in_the_input_dtype(conv):
  """dtype=bfloat16 is the matmul dtype only: the raw output is cast back to
  float32 *before* tanh / exp. With the output layer's kernel zero its bias
  (rounded to bfloat16 by the matmul) is the raw output, so log_s must be
  m tanh(raw / m) evaluated in float32 (bfloat16 tanh is ~1e-3 off)."""
  m = 2.0
  if conv:
    net = flows.ConvCouplingNet(hidden=4, num_blocks=1, dtype=jnp.bfloat16, max_log_scale=m)
    a = jax.random.normal(jax.random.key(0), (2, 2, 2, 2), jnp.float32)
    out_name = "Conv_3"
  else:
    net = flows.CouplingNet(hidden=8, dtype=jnp.bfloat16, max_log_scale=m)
    a = jax.random.normal(jax.random.key(0), (2, 3), jnp.float32)
    out_name = "Dense_2"
  params = net.init(jax.random.key(1), a, None, 3)
  bias = jnp.asarray([0.123457, -1.777771, 0.9876543, 0.31415926, -2.7182818, 5.4321],
                     jnp.float32)
  out = params["params"][out_name]
  out["kernel"] = jnp.zeros_like(out["kernel"])
  out["bias"] = bias
  log_s, t = net.apply(params, a, None, 3)
  assert log_s.dtype == jnp.float32 and t.dtype == jnp.float32
  raw = np.asarray(bias.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  expected = m * np.tanh(raw[:3] / m)
  np.testing.assert_allclose(np.asarray(log_s).reshape(-1, 3),
                             np.broadcast_to(expected, (log_s.size // 3, 3)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(t).reshape(-1, 3),
                             np.broadcast_to(raw[3:], (t.size // 3, 3)), rtol=1e-6)
