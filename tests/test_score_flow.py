"""ScoreFlowNetwork: the score is the exact gradient of the energy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax.denoiser import denoise
from scoreflow_jax.edm import edm_scaling
from scoreflow_jax.networks import ScoreFlowNetwork, timestep_embedding
from tests.perturb import perturb

SIGMA = np.array([0.002, 0.3, 5.0, 80.0])


def _setup(parameterization, score_head=True, dtype=jnp.float64, channels=2,
           flow_type=None, **kw):
  if flow_type is None:
    flow_type = "conditional" if parameterization == "density" else "joint"
  net = ScoreFlowNetwork(in_channels=channels, model_channels=8, n_flows=3,
                         activation="softplus", num_classes=10, sigma_data=0.5,
                         parameterization=parameterization, score_head=score_head,
                         flow_type=flow_type, conv_channels=4, conv_blocks=1, **kw)
  key = jax.random.key(0)
  hw = (2, 4) if flow_type == "conv" else (3, 3)  # the conv flow squeezes 2x2 blocks
  x = jax.random.normal(key, (4, *hw, channels), dtype)
  cond = {"vector": jax.random.normal(jax.random.key(1), (4, 6), dtype)}
  params = net.init(jax.random.key(2), x, jnp.zeros(4, dtype), cond)
  # perturb the zero-initialised coupling outputs so the flow is not trivial
  return net, perturb(params, jax.random.key(3), 0.2, dtype), x, cond


def test_timestep_embedding_matches_sgm():
  t = jnp.asarray([0.0, -1.5, 2.0])
  emb = timestep_embedding(t, 6)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  ref = np.concatenate([np.cos(np.asarray(t)[:, None] * freqs),
                        np.sin(np.asarray(t)[:, None] * freqs)], 1)
  np.testing.assert_allclose(emb, ref, rtol=1e-6)
  assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("parameterization,flow_type,kw", [
    ("seed", None, {}), ("preconditioned", None, {}), ("density", None, {}),
    ("preconditioned", "conv", {}), ("density", "conv", {}),
    ("preconditioned", None, dict(energy_scale=True, max_log_scale=3.0)),
    ("preconditioned", None, dict(energy_weights=True)),
    ("preconditioned", "conv", dict(energy_weights=True)),
    ("preconditioned", "joint_context", dict(energy_linear=True)),
    ("preconditioned", "conv", dict(energy_linear=True)),
    ("preconditioned", "conv", dict(conv_global=True)), ("density", "conv", dict(conv_global=True)),
    ("density", "conv", dict(conv_scale_shift_norm=True)),
    ("seed", None, dict(energy_linear=True)),
    ("preconditioned", "joint_context", {}), ("seed", "joint_context", {})])
def test_score_is_finite_difference_of_energy(x64, parameterization, flow_type, kw):
  net, params, x, cond = _setup(parameterization, flow_type=flow_type, **kw)
  sigma = jnp.asarray(SIGMA)
  score = net.apply(params, x, sigma, cond, method="score")
  energy = lambda xx: net.apply(params, xx, sigma, cond, method="energy")
  rng = np.random.default_rng(0)
  for _ in range(3):
    v = jnp.asarray(rng.normal(size=x.shape))
    h = 1e-5 * (1 + np.asarray(SIGMA)).reshape(-1, 1, 1, 1)  # scale to each sample
    fd = (energy(x + h * v) - energy(x - h * v)) / (2 * h.reshape(-1))
    directional = jnp.sum((score * v).reshape(4, -1), 1)
    np.testing.assert_allclose(fd, directional, rtol=1e-6, atol=1e-9)


def test_seed_without_head_denoiser_is_tweedie(x64):
  net, params, x, cond = _setup("seed", score_head=False)
  sigma = jnp.asarray(SIGMA)
  den = denoise(lambda a, b, c: net.apply(params, a, b, c), x, sigma, cond, 0.5)
  score = net.apply(params, x, sigma, cond, method="score")
  np.testing.assert_allclose(den, x + sigma[:, None, None, None] ** 2 * score,
                             rtol=1e-9, atol=1e-9)


def test_seed_head_changes_output(x64):
  net, params, x, cond = _setup("seed", score_head=True)
  sigma = jnp.asarray(SIGMA)
  den = denoise(lambda a, b, c: net.apply(params, a, b, c), x, sigma, cond, 0.5)
  score = net.apply(params, x, sigma, cond, method="score")
  assert not np.allclose(den, x + sigma[:, None, None, None] ** 2 * score)


@pytest.mark.parametrize("flow_type,kw", [("joint", {}), ("conv", {}),
                                         ("joint", dict(energy_scale=True)),
                                         ("joint", dict(energy_weights=True)),
                                         ("conv", dict(energy_linear=True)),
                                         ("conv", dict(conv_global=True)),
                                         ("conv", dict(conv_scale_shift_norm=True,
                                                       conv_global=True)),
                                         ("joint_context", dict(energy_linear=True,
                                                                energy_weights=True))])
def test_preconditioned_is_exactly_conservative(x64, flow_type, kw):
  net, params, x, cond = _setup("preconditioned", flow_type=flow_type, **kw)
  sigma = jnp.asarray(SIGMA)
  den = denoise(lambda a, b, c: net.apply(params, a, b, c), x, sigma, cond, 0.5)
  grad_e = jax.grad(lambda xx: jnp.sum(net.apply(params, xx, sigma, cond,
                                                 method="energy")))(x)
  np.testing.assert_allclose(den, x + sigma[:, None, None, None] ** 2 * grad_e,
                             rtol=1e-10, atol=1e-10)
  # and the network output is grad_u of the flow energy: D = c_skip x + c_out F
  c_skip, c_out, c_in, c_noise = edm_scaling(sigma[:, None, None, None], 0.5)
  f = net.apply(params, c_in * x, c_noise.reshape(-1), cond)
  np.testing.assert_allclose(den, c_skip * x + c_out * f, rtol=1e-12)


def test_per_sample_score_independent_of_batch(x64):
  net, params, x, cond = _setup("preconditioned")
  sigma = jnp.asarray(SIGMA)
  full = net.apply(params, x, sigma, cond, method="score")
  one = net.apply(params, x[1:2], sigma[1:2], {"vector": cond["vector"][1:2]},
                  method="score")
  np.testing.assert_allclose(full[1:2], one, rtol=1e-12)


@pytest.mark.parametrize("parameterization,flow_type,kw", [
    ("seed", None, {}), ("preconditioned", None, {}), ("density", None, {}),
    ("preconditioned", "conv", {}), ("preconditioned", None, dict(energy_scale=True)),
    ("preconditioned", None, dict(energy_weights=True)),
    ("preconditioned", "joint_context", dict(energy_linear=True)),
    ("preconditioned", "joint_context", {})])
def test_parameter_gradients_finite_and_second_order(x64, parameterization, flow_type, kw):
  net, params, x, cond = _setup(parameterization, flow_type=flow_type, **kw)
  sigma = jnp.asarray(SIGMA)

  def loss(p):
    den = denoise(lambda a, b, c: net.apply(p, a, b, c), x, sigma, cond, 0.5)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return jnp.mean(w[:, None, None, None] * den ** 2)

  g = jax.grad(loss)(params)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))
  # The directional derivative through the inner jax.grad matches finite
  # differences: the parameter gradient really is second order.
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  v = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=l.shape)) for l in leaves])
  eps = 1e-6
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, v)
  fd = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
  dd = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
  np.testing.assert_allclose(fd, dd, rtol=1e-6)
  # flow coupling weights get gradient only via the score (second order)
  first = "Conv_0" if flow_type == "conv" else "Dense_0"
  flow_g = g["params"]["flow"]["layers_0"]["net"][first]["kernel"]
  assert float(jnp.max(jnp.abs(flow_g))) > 0


def test_float32_default_and_bad_config():
  net, params, x, cond = _setup("preconditioned", dtype=jnp.float32)
  out = net.apply(params, x, jnp.zeros(4), cond)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  for bad, match in [(dict(parameterization="eps"), "parameterization"),
                     (dict(sigma_data=0.0), "sigma_data"),
                     (dict(n_flows=0), "n_flows"),
                     (dict(activation="relu7"), "activation")]:
    with pytest.raises(ValueError, match=match):
      ScoreFlowNetwork(**bad).init(jax.random.key(0), x, jnp.zeros(4), cond)
  with pytest.raises(ValueError, match="vector"):
    ScoreFlowNetwork().init(jax.random.key(0), x, jnp.zeros(4), {})


def test_bfloat16_couplings_keep_float32_params_and_score():
  net, params, x, cond = _setup("preconditioned", dtype=jnp.float32)
  bf16 = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
                          parameterization="preconditioned", dtype=jnp.bfloat16)
  # the same parameter tree, all float32
  p16 = bf16.init(jax.random.key(2), x, jnp.zeros(4), cond)
  assert jax.tree.structure(p16) == jax.tree.structure(params)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(p16))
  sigma = jnp.asarray(SIGMA, jnp.float32)
  s32 = net.apply(params, x, sigma, cond, method="score")
  s16 = bf16.apply(params, x, sigma, cond, method="score")
  assert s16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(s16 - s32) / jnp.linalg.norm(s32))
  assert 1e-6 < rel < 5e-2, rel  # the bf16 path is really taken, and is close


@pytest.mark.parametrize("flow_type", ["conditional", "conv"])
def test_density_denoiser_is_tweedie_and_starts_at_c_skip(x64, flow_type):
  net, params, x, cond = _setup("density", flow_type=flow_type)
  sigma = jnp.asarray(SIGMA)
  den = denoise(lambda a, b, c: net.apply(params, a, b, c), x, sigma, cond, 0.5)
  score = net.apply(params, x, sigma, cond, method="score")
  np.testing.assert_allclose(den, x + sigma[:, None, None, None] ** 2 * score,
                             rtol=1e-9, atol=1e-9)
  fresh = net.init(jax.random.key(5), x, jnp.zeros(4), cond)  # identity flow
  fresh = jax.tree.map(lambda p: p.astype(jnp.float64), fresh)
  den0 = denoise(lambda a, b, c: net.apply(fresh, a, b, c), x, sigma, cond, 0.5)
  c_skip = 0.25 / (sigma**2 + 0.25)
  np.testing.assert_allclose(den0, c_skip[:, None, None, None] * x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 1.0])
def test_density_is_normalised(x64, sigma):
  """log q(x | sigma, c) integrates to 1: a 2-D case on a grid."""
  net = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
                         parameterization="density", flow_type="conditional")
  cond = {"vector": jnp.ones((1, 6))}
  params = net.init(jax.random.key(0), jnp.zeros((1, 1, 1, 2)), jnp.zeros(1), cond)
  params = perturb(params, jax.random.key(1), 0.15, jnp.float64)
  scale = np.sqrt(sigma**2 + 0.25)  # q is about N(0, scale^2) before training
  g = np.linspace(-9 * scale, 9 * scale, 601)
  xx, yy = np.meshgrid(g, g, indexing="ij")
  pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1).reshape(-1, 1, 1, 2))
  n = pts.shape[0]
  logq = net.apply(params, pts, jnp.full((n,), sigma), {"vector": jnp.ones((n, 6))},
                   method="log_prob")
  total = float(jnp.sum(jnp.exp(logq))) * (g[1] - g[0]) ** 2
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  # a real transformation: not the Gaussian it starts as
  gauss = -0.5 * np.sum(np.asarray(pts).reshape(n, 2) ** 2, 1) / scale**2 - np.log(2 * np.pi * scale**2)
  assert np.max(np.abs(np.asarray(logq) - gauss)) > 0.1


def test_density_needs_conditional_flow_and_log_prob_needs_density():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="conditional' or 'conv'"):
    ScoreFlowNetwork(parameterization="density").init(jax.random.key(0), x, jnp.zeros(1),
                                                      {"vector": jnp.ones((1, 4))})
  net = ScoreFlowNetwork(model_channels=4, n_flows=1)
  p = net.init(jax.random.key(0), x, jnp.zeros(1), {"vector": jnp.ones((1, 4))})
  with pytest.raises(ValueError, match="density"):
    net.apply(p, x, jnp.ones(1), {"vector": jnp.ones((1, 4))}, method="log_prob")


def test_conv_density_is_normalised(x64):
  """The conv flow's log q(x | sigma, c) integrates to 1: a 2x2x1 image (4-D) on a grid."""
  sigma = 0.5
  net = ScoreFlowNetwork(in_channels=1, model_channels=8, n_flows=4, num_classes=10,
                         parameterization="density", flow_type="conv",
                         conv_channels=4, conv_blocks=1)
  cond = {"vector": jnp.ones((1, 6))}
  params = net.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), jnp.zeros(1), cond)
  params = perturb(params, jax.random.key(1), 0.15, jnp.float64)
  scale = np.sqrt(sigma**2 + 0.25)
  g = np.linspace(-7 * scale, 7 * scale, 21)  # Riemann sums of smooth, fast-decaying
  pts = np.stack(np.meshgrid(g, g, g, g, indexing="ij"), -1).reshape(-1, 2, 2, 1)
  n = pts.shape[0]                            # densities converge fast in the spacing
  log_prob = jax.jit(lambda p, s, c: net.apply(params, p, s, c, method="log_prob"))
  logq = log_prob(jnp.asarray(pts), jnp.full((n,), sigma), {"vector": jnp.ones((n, 6))})
  total = float(jnp.sum(jnp.exp(logq))) * (g[1] - g[0]) ** 4
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  gauss = (-0.5 * np.sum(pts.reshape(n, 4) ** 2, 1) / scale**2
           - 2 * np.log(2 * np.pi * scale**2))
  assert np.max(np.abs(np.asarray(logq) - gauss)) > 0.1  # not the Gaussian it starts as


def test_energy_scale_starts_neutral_and_scales_the_score(x64):
  net, params, x, cond = _setup("preconditioned")
  scaled = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
                            energy_scale=True)
  p2 = scaled.init(jax.random.key(0), x, jnp.zeros(4), cond)
  p2 = jax.tree.map(lambda p: p.astype(jnp.float64), p2)
  p2["params"].update({k: v for k, v in params["params"].items()})  # same flow
  sigma = jnp.asarray(SIGMA)
  # zero-initialised temperature: exactly the network without it
  np.testing.assert_allclose(scaled.apply(p2, x, jnp.log(sigma), cond),
                             net.apply(params, x, jnp.log(sigma), cond), rtol=1e-12)
  # a bias b multiplies the energy and the flow gradient F by exp(b)
  p2["params"]["temperature"]["bias"] = jnp.asarray([0.7])
  np.testing.assert_allclose(scaled.apply(p2, x, jnp.log(sigma), cond),
                             np.exp(0.7) * net.apply(params, x, jnp.log(sigma), cond),
                             rtol=1e-12)
  with pytest.raises(ValueError, match="normalisation"):
    ScoreFlowNetwork(parameterization="density", flow_type="conditional",
                     energy_scale=True).init(jax.random.key(0), x, jnp.zeros(4), cond)


def test_energy_weights_start_at_the_reference_energy_and_can_change_sign(x64):
  net, params, x, cond = _setup("preconditioned")
  weighted = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
                              energy_weights=True)
  p2 = jax.tree.map(lambda p: p.astype(jnp.float64),
                    weighted.init(jax.random.key(0), x, jnp.zeros(4), cond))
  p2["params"].update(params["params"])
  sigma = jnp.asarray(SIGMA)
  energy = lambda n, p, xx: n.apply(p, xx, sigma, cond, method="energy")
  np.testing.assert_allclose(energy(weighted, p2, x), energy(net, params, x), rtol=1e-12)
  # bias -2: a = -1 for every feature, so phi flips sign: -|z|^2 -> +|z|^2
  bias = p2["params"]["weight_net"]["Dense_0"]["bias"]
  p2["params"]["weight_net"]["Dense_0"]["bias"] = jnp.full_like(bias, -2.0)
  assert bias.shape == (3 * 3 * 2 + 16,)  # image features + context (2 x 8) of the joint z
  f_ref = net.apply(params, x, jnp.log(sigma), cond)
  f_flip = weighted.apply(p2, x, jnp.log(sigma), cond)
  np.testing.assert_allclose(f_flip, -f_ref, rtol=1e-12)
  with pytest.raises(ValueError, match="normalisation"):
    ScoreFlowNetwork(parameterization="density", flow_type="conditional",
                     energy_weights=True).init(jax.random.key(0), x, jnp.zeros(4), cond)


@pytest.mark.parametrize("flow_type", ["joint_context", "conv"])
def test_energy_linear_starts_at_the_reference_energy_and_adds_its_coefficients(
    x64, flow_type):
  net, params, x, cond = _setup("preconditioned", flow_type=flow_type)
  kw = dict(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
            flow_type=flow_type, conv_channels=4, conv_blocks=1)
  linear = ScoreFlowNetwork(energy_linear=True, **kw)
  p2 = jax.tree.map(lambda p: p.astype(jnp.float64),
                    linear.init(jax.random.key(0), x, jnp.zeros(4), cond))
  p2["params"].update(params["params"])
  sigma = jnp.asarray(SIGMA)
  c_noise = jnp.log(sigma) / 4
  f_ref = net.apply(params, x, c_noise, cond)
  np.testing.assert_allclose(linear.apply(p2, x, c_noise, cond), f_ref, rtol=1e-12)
  # b = bias (no kernel): F = grad_u phi moves by exactly b, for every sample
  bias = p2["params"]["linear_net"]["Dense_0"]["bias"]
  assert bias.shape == (x[0].size,)
  b = jnp.linspace(-1.0, 1.0, bias.size)
  p2["params"]["linear_net"]["Dense_0"]["bias"] = b
  np.testing.assert_allclose(linear.apply(p2, x, c_noise, cond),
                             f_ref + b.reshape(x.shape[1:]), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="normalisation"):
    ScoreFlowNetwork(parameterization="density", flow_type="conditional",
                     energy_linear=True).init(jax.random.key(0), x, jnp.zeros(4), cond)


def _net(flow_type, parameterization="preconditioned", **kw):
  net = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=10,
                         parameterization=parameterization, flow_type=flow_type, **kw)
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2), jnp.float64)
  cond = {"vector": jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)}
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        net.init(jax.random.key(2), x, jnp.zeros(4), cond))
  return net, params, x, cond


def _flow_z(net, params, u, context):
  return net.apply(params, u, context, method=lambda m, u, c: m._flow_z(m.flow, u, c))


@pytest.mark.parametrize("flow_type,first_sees_context", [
    ("joint", False), ("joint_context", True), ("conditional", True)])
def test_which_couplings_see_the_context(x64, flow_type, first_sees_context):
  """With only layer i perturbed (the others zero-initialised: reversals),
  "joint_context" and "conditional" feed the context to every coupling
  network, so the log-det moves with it for every i; in "joint" the layers
  that see u's first half (the even ones, 18 + 16 features) never see it."""
  net, params, x, _ = _net(flow_type)
  u = x * 0.7
  ctx = jax.random.normal(jax.random.key(4), (4, 16), jnp.float64)
  for i in range(3):
    p = jax.tree.map(lambda a: a, params)
    p["params"]["flow"][f"layers_{i}"] = perturb(p["params"]["flow"][f"layers_{i}"],
                                                jax.random.key(10 + i), 0.2)
    _, ld = _flow_z(net, p, u, ctx)
    _, ld2 = _flow_z(net, p, u, ctx + 1.0)
    moved = np.abs(np.asarray(ld2 - ld))
    if i % 2 == 0 and not first_sees_context:
      np.testing.assert_allclose(moved, 0.0, atol=1e-13)
    else:
      assert np.all(moved > 1e-4), (flow_type, i, moved)


def test_seed_score_head_sees_the_context(x64):
  """The reference design's head is MLP([score, sigma_emb, class_emb]): its
  first layer takes the D score features and the 2 x 8 context features, and
  the context rows change the network's output."""
  net, params, x, cond = _net("joint", "seed", score_head=True)
  params = perturb(params, jax.random.key(3), 0.2)
  kernel = params["params"]["head"]["Dense_0"]["kernel"]
  assert kernel.shape[0] == x[0].size + 16, kernel.shape
  c_noise = jnp.log(jnp.asarray([0.3, 1.0, 2.0, 5.0])) / 4
  f = net.apply(params, x * 0.5, c_noise, cond)
  p2 = jax.tree.map(lambda a: a, params)
  p2["params"]["head"]["Dense_0"]["kernel"] = kernel.at[x[0].size:].add(0.5)
  f2 = net.apply(p2, x * 0.5, c_noise, cond)
  assert float(jnp.max(jnp.abs(f2 - f))) > 1e-3
