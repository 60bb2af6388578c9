"""The Gaussian base of the flow energy: exact posterior means, exact energies,
statistics fitted once and never trained."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist, mnist_density
from scoreflow_jax import conditioner as conditioner_lib
from scoreflow_jax import data, likelihood, trainer
from scoreflow_jax import model as model_lib
from scoreflow_jax.denoiser import denoise
from scoreflow_jax.networks import ScoreFlowNetwork
from scoreflow_jax.networks import gaussian_base as gaussian_lib
from tests.perturb import perturb

SIGMA = np.array([0.002, 0.3, 5.0, 80.0])


def _data(n=3000, d=6, classes=2, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  mix = rng.normal(size=(classes, d, d)) * 0.3
  x = np.einsum("nij,nj->ni", mix[labels], rng.normal(size=(n, d))) + labels[:, None]
  return x, labels


def _apply_base(stats, x, sigma, index):
  base = gaussian_lib.GaussianBase(slots=stats["mean"].shape[0],
                                   rank=stats["basis"].shape[-1])
  params = {"params": {k: jnp.asarray(v, x.dtype) for k, v in stats.items()}}
  return base.apply(params, x, sigma, index)


@pytest.mark.parametrize("max_slots", [64, 0], ids=["products", "gather"])
@pytest.mark.parametrize("rank", [6, 3])
def test_base_denoiser_is_the_gaussian_posterior_mean(x64, rank, max_slots, monkeypatch):
  monkeypatch.setattr(gaussian_lib, "MAX_SLOTS_FOR_PRODUCTS", max_slots)
  x0, labels = _data()
  stats = gaussian_lib.fit(x0, labels, 2, rank)
  assert stats["basis"].shape == (3, 6, rank)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 6)) * 2)
  index = jnp.asarray([0, 1, 2, 1])  # slot 2: all data (the dropped label)
  den, _ = _apply_base(stats, x, jnp.asarray(SIGMA), index)
  for i, slot in enumerate(np.asarray(index)):
    sel = labels == slot if slot < 2 else np.ones_like(labels, bool)
    m, cov = x0[sel].mean(0), np.cov(x0[sel], rowvar=False)
    if rank < 6:  # the model's covariance: top directions + their mean variance
      w, v = np.linalg.eigh(cov)
      w, v = w[::-1], v[:, ::-1]
      top = v[:, :rank]
      cov = top @ np.diag(w[:rank]) @ top.T + w[rank:].mean() * (np.eye(6) - top @ top.T)
    s2 = SIGMA[i] ** 2
    expected = m + cov @ np.linalg.solve(cov + s2 * np.eye(6), np.asarray(x[i]) - m)
    np.testing.assert_allclose(den[i], expected, rtol=2e-5, atol=2e-5)


def test_base_log_density_is_the_normalised_gaussian_log_density(x64):
  x0, labels = _data(seed=9)
  stats = gaussian_lib.fit(x0, labels, 2, 2)
  x = jnp.asarray(np.random.default_rng(10).normal(size=(4, 6)) * 2)
  sigma, index = jnp.asarray(SIGMA), jnp.asarray([0, 1, 2, 1])
  _, log_density = _apply_base(stats, x, sigma, index)
  for i, slot in enumerate(np.asarray(index)):
    v = stats["basis"][slot].astype(np.float64)
    v, _ = np.linalg.qr(v)  # the fitted float32 basis, orthonormal in float64
    cov = (v @ np.diag(stats["variances"][slot]) @ v.T
           + stats["residual"][slot] * (np.eye(6) - v @ v.T) + SIGMA[i] ** 2 * np.eye(6))
    d = np.asarray(x[i]) - stats["mean"][slot]
    expected = -0.5 * (d @ np.linalg.solve(cov, d) + np.linalg.slogdet(cov)[1]
                       + 6 * np.log(2 * np.pi))
    np.testing.assert_allclose(log_density[i], expected, rtol=1e-5)


def test_base_denoiser_is_tweedie_of_its_log_density(x64):
  x0, labels = _data(seed=2)
  stats = gaussian_lib.fit(x0, labels, 2, 3)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)))
  sigma, index = jnp.asarray(SIGMA), jnp.asarray([0, 1, 2, 0])
  den, _ = _apply_base(stats, x, sigma, index)
  grad = jax.grad(lambda xx: jnp.sum(_apply_base(stats, xx, sigma, index)[1]))(x)
  np.testing.assert_allclose(den, x + sigma[:, None] ** 2 * grad, rtol=1e-9, atol=1e-11)  # float64: exact to rounding


def _network(flow_type="joint", components=1, **kw):
  net = ScoreFlowNetwork(in_channels=1, model_channels=8, n_flows=3, num_classes=3,
                         flow_type=flow_type, conv_channels=4, conv_blocks=1,
                         gaussian_base=True, gaussian_rank=5,
                         gaussian_components=components, **kw)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 4, 2, 1)))
  cond = {"vector": jnp.asarray(rng.normal(size=(4, 6))), "class_index": jnp.asarray([0, 2, 3, 1])}
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        net.init(jax.random.key(0), x, jnp.zeros(4), cond))
  x0, labels = _data(n=4000, d=8, classes=3, seed=5)
  stats = (gaussian_lib.fit(x0, labels, 3, 5) if components == 1 else
           gaussian_lib.fit_mixture(x0, labels, 3, components, 5))
  params["params"][gaussian_lib.MODULE_NAME] = {k: jnp.asarray(v, jnp.float64)
                                               for k, v in stats.items()}
  return net, params, x, cond


@pytest.mark.parametrize("flow_type,components", [("joint", 1), ("conv", 1), ("joint", 2),
                                                  ("conv", 2)])
def test_network_starts_at_the_gaussian_denoiser_and_stays_an_energy_gradient(
    x64, flow_type, components):
  net, params, x, cond = _network(flow_type, components)
  sigma = jnp.asarray(SIGMA)
  den = lambda p: denoise(lambda a, b, c: net.apply(p, a, b, c), x, sigma, cond, 0.5)
  stats = {k: np.asarray(v) for k, v in params["params"][gaussian_lib.MODULE_NAME].items()}
  apply = _apply_base if components == 1 else _apply_mixture
  base, _ = apply(stats, x.reshape(4, -1), sigma, cond["class_index"])
  # zero-initialised couplings: the residual flow energy has zero gradient
  np.testing.assert_allclose(den(params), base.reshape(x.shape), rtol=1e-9, atol=1e-9)
  # perturbed flow: D = x + sigma^2 grad_x E still holds exactly, and moves away
  p2 = jax.tree.map(lambda a: a, params)
  p2["params"]["flow"] = perturb(p2["params"]["flow"], jax.random.key(6), 0.2)
  grad_e = jax.grad(lambda xx: jnp.sum(net.apply(p2, xx, sigma, cond, method="energy")))(x)
  np.testing.assert_allclose(den(p2), x + sigma[:, None, None, None] ** 2 * grad_e,
                             rtol=1e-9, atol=1e-9)
  score = net.apply(p2, x, sigma, cond, method="score")
  np.testing.assert_allclose(score, grad_e, rtol=1e-9, atol=1e-9)
  assert not np.allclose(den(p2), den(params))


@pytest.mark.parametrize("flow_type,components", [("conditional", 1), ("conv", 1),
                                                  ("conditional", 2), ("conv", 2)])
def test_density_flow_starts_at_its_base_and_stays_tweedie_of_its_log_prob(
    x64, flow_type, components):
  net, params, x, cond = _network(flow_type, components, parameterization="density")
  sigma = jnp.asarray(SIGMA)
  den = lambda p: denoise(lambda a, b, c: net.apply(p, a, b, c), x, sigma, cond, 0.5)
  log_prob = lambda p, xx: net.apply(p, xx, sigma, cond, method="log_prob")
  stats = {k: np.asarray(v) for k, v in params["params"][gaussian_lib.MODULE_NAME].items()}
  apply = _apply_base if components == 1 else _apply_mixture
  base, base_log_density = apply(stats, x.reshape(4, -1), sigma, cond["class_index"])
  # identity flow: q is the base's noisy density and D its posterior mean
  np.testing.assert_allclose(den(params), base.reshape(x.shape), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(log_prob(params, x), base_log_density, rtol=1e-12)
  p2 = jax.tree.map(lambda a: a, params)
  p2["params"]["flow"] = perturb(p2["params"]["flow"], jax.random.key(6), 0.2)
  grad = jax.grad(lambda xx: jnp.sum(log_prob(p2, xx)))(x)
  np.testing.assert_allclose(den(p2), x + sigma[:, None, None, None] ** 2 * grad,
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(net.apply(p2, x, sigma, cond, method="score"), grad,
                             rtol=1e-9, atol=1e-9)
  assert np.max(np.abs(np.asarray(log_prob(p2, x) - base_log_density))) > 0.1


@pytest.mark.parametrize("sigma", [0.05, 1.0])
@pytest.mark.parametrize("components", [1, 2])
def test_density_flow_on_the_base_is_normalised(x64, sigma, components):
  """log q(x | sigma, c) of a perturbed flow on a fitted base integrates to 1 per
  class and without one: a 2-D case on a grid."""
  rng = np.random.default_rng(11)
  labels = rng.integers(0, 2, 4000)
  centres = np.array([[[-1.0, 0.0], [0.0, 1.0]], [[1.0, -0.5], [1.5, 0.5]]])
  x0 = (centres[labels, rng.integers(0, 2, 4000)]
        + rng.normal(size=(4000, 2)) * [0.3, 0.2])
  stats = (gaussian_lib.fit(x0, labels, 2, 1) if components == 1 else
           gaussian_lib.fit_mixture(x0, labels, 2, components, 1))
  net = ScoreFlowNetwork(in_channels=2, model_channels=8, n_flows=3, num_classes=2,
                         parameterization="density", flow_type="conditional",
                         gaussian_base=True, gaussian_rank=1,
                         gaussian_components=components)
  one = {"vector": jnp.ones((1, 6)), "class_index": jnp.zeros(1, jnp.int32)}
  params = net.init(jax.random.key(0), jnp.zeros((1, 1, 1, 2)), jnp.zeros(1), one)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  params["params"]["flow"] = perturb(params["params"]["flow"], jax.random.key(1), 0.15)
  params["params"][gaussian_lib.MODULE_NAME] = {k: jnp.asarray(v, jnp.float64)
                                               for k, v in stats.items()}
  g = np.linspace(-10, 10, 801)  # (the perturbed flow carries mass past +-5)
  pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 1, 2)
  n = len(pts)
  log_prob = jax.jit(lambda c: net.apply(params, jnp.asarray(pts), jnp.full((n,), sigma),
                                         c, method="log_prob"))
  base_apply = _apply_base if components == 1 else _apply_mixture
  for index in (0, 1, 2):  # 2: no label
    vector = np.zeros((n, 6)) if index == 2 else np.full((n, 6), index + 0.5)
    cond = {"vector": jnp.asarray(vector), "class_index": jnp.full((n,), index)}
    logq = log_prob(cond)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(logq))) * (g[1] - g[0]) ** 2, 1.0,
                               atol=1e-6)
    _, base = base_apply(stats, jnp.asarray(pts.reshape(n, 2)), jnp.full((n,), sigma),
                         cond["class_index"])
    assert np.max(np.abs(np.asarray(logq - base))) > 0.1  # the flow moved it


def test_network_needs_the_class_index_and_preconditioned(x64):
  net, params, x, cond = _network()
  with pytest.raises(ValueError, match="class_index"):
    net.apply(params, x, jnp.zeros(4), {"vector": cond["vector"]})
  net, params, x, cond = _network("conditional", parameterization="density")
  with pytest.raises(ValueError, match="class_index"):
    net.apply(params, x, jnp.ones(4), {"vector": cond["vector"]}, method="log_prob")
  with pytest.raises(ValueError, match="preconditioned' or 'density"):
    ScoreFlowNetwork(parameterization="seed", gaussian_base=True).init(
        jax.random.key(0), x, jnp.zeros(4), cond)


def test_conditioner_class_index_marks_dropped_labels():
  cond = conditioner_lib.class_conditioner(4, 10, 0.5, class_index=True)
  batch = {"cls": jnp.arange(64) % 10}
  params = cond.init(jax.random.key(0), batch)
  out = cond.apply(params, batch, jax.random.key(1))
  dropped = np.all(np.asarray(out["vector"]) == 0, axis=1)
  assert 10 < dropped.sum() < 54
  np.testing.assert_array_equal(out["class_index"],
                                np.where(dropped, 10, np.arange(64) % 10))
  c, uc = cond.apply(params, batch, force_uc_zero_embeddings=("cls",), method="unconditional")
  np.testing.assert_array_equal(c["class_index"], np.arange(64) % 10)
  np.testing.assert_array_equal(uc["class_index"], np.full(64, 10))
  assert "class_index" not in conditioner_lib.class_conditioner(4, 10, 0.5).apply(
      params, batch, jax.random.key(1))


@pytest.mark.parametrize("components,density", [(1, False), (3, False), (3, True)])
def test_trainer_fits_the_base_and_never_trains_it(tmp_path, components, density):
  # density: the flow's base, trained through its bits/dim term too
  config = (mnist_density if density else mnist).get_config("tiny")
  config.training.image_every = 0
  config.training.num_steps = 4
  config.model.score_flow.gaussian_base = True
  config.model.score_flow.gaussian_rank = 4
  config.model.score_flow.gaussian_components = components
  trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  from scoreflow_jax import generate
  _, state, _ = generate.load_run(str(tmp_path / "run"))
  images, labels = data.load_dataset(config.data)
  x = data.to_model_batch(images, labels)["jpg"]
  expected = (gaussian_lib.fit(x, labels, 10, 4) if components == 1 else
              gaussian_lib.fit_mixture(x, labels, 10, components, 4, seed=config.seed))
  for params in (state.params, state.ema_params):
    got = params["network"][gaussian_lib.MODULE_NAME]
    for k, v in expected.items():  # unchanged by 4 AdamW steps with weight decay
      np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6)
  if density:
    model = model_lib.build_model(config)
    bpd, per_image = likelihood.bits_per_dim(model, state.ema_params, images[:8],
                                             labels[:8], jax.random.key(0))
    assert per_image.shape == (8,) and np.all(np.isfinite(per_image)), per_image


# The mixture base (gaussian_components > 1).

def _apply_mixture(stats, x, sigma, index):
  classes, features = len(stats["class_log_prior"]), stats["mean"].shape[1]
  base = gaussian_lib.MixtureBase(classes, stats["mean"].shape[0] // classes,
                                  stats["basis"].shape[-1])
  params = {"params": {k: jnp.asarray(v, x.dtype) for k, v in stats.items()}}
  assert features == x.shape[-1]
  return base.apply(params, x, sigma, index)


def _mixture_by_hand(stats, x, s2, slot, components):
  """(posterior mean, log density) of the noisy mixture at x from its full
  covariances, with numpy's solve and slogdet."""
  classes = len(stats["class_log_prior"])
  stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  d = x.shape[0]
  logs, means = [], []
  for j in range(classes * components):
    c = j // components
    if slot < classes and c != slot:
      continue
    v, w, r, m = stats["basis"][j], stats["variances"][j], stats["residual"][j], stats["mean"][j]
    cov = v @ np.diag(w) @ v.T + r * (np.eye(d) - v @ v.T) + s2 * np.eye(d)
    diff = x - m
    _, logdet = np.linalg.slogdet(cov)
    log_w = stats["log_weight"][j] + (stats["class_log_prior"][c] if slot == classes else 0.0)
    logs.append(log_w - 0.5 * (diff @ np.linalg.solve(cov, diff) + logdet + d * np.log(2 * np.pi)))
    means.append(x - s2 * np.linalg.solve(cov, diff))  # m + S (S + s2 I)^-1 (x - m)
  logs = np.array(logs)
  top = logs.max()
  gamma = np.exp(logs - top)
  return (gamma[:, None] * np.array(means)).sum(0) / gamma.sum(), top + np.log(gamma.sum())


@pytest.mark.parametrize("rank", [6, 2])
def test_mixture_denoiser_and_density_are_the_mixture_posterior_mean_and_density(x64, rank):
  x0, labels = _data(n=2000, seed=7)
  stats = gaussian_lib.fit_mixture(x0, labels, 2, 3, rank)
  # float64 and exactly orthonormal bases (the nearest to the fitted float32
  # ones): both formulas then describe the same covariances to 1e-15, which a
  # full-rank basis at sigma = 0.002 needs (the residual variance's 1 / 1e-4
  # amplifies float32's 1e-7 departures from orthonormality)
  stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  u, _, vt = np.linalg.svd(stats["basis"], full_matrices=False)
  stats["basis"] = u @ vt
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(8, 6)) * 1.5 + 0.5)
  sigma = jnp.asarray(np.concatenate([SIGMA, SIGMA]))
  index = jnp.asarray([0, 1, 2, 1, 2, 0, 1, 2])  # 2: no label (the mixture of both classes)
  den, log_density = _apply_mixture(stats, x, sigma, index)
  for i in range(8):
    mean, log_p = _mixture_by_hand(stats, np.asarray(x[i]), float(sigma[i]) ** 2,
                                   int(index[i]), 3)
    np.testing.assert_allclose(den[i], mean, rtol=1e-6, atol=1e-6)
    # normalised: the density flow's base needs every constant
    np.testing.assert_allclose(log_density[i], log_p, rtol=1e-8)
  # Tweedie: D = x + sigma^2 grad_x log p_sigma(x), from the module's own density
  grad = jax.grad(lambda xx: jnp.sum(_apply_mixture(stats, xx, sigma, index)[1]))(x)
  np.testing.assert_allclose(den, x + sigma[:, None] ** 2 * grad, rtol=1e-9, atol=1e-11)


def test_mixture_fit_clusters_each_class():
  x0, labels = _data(n=1500, seed=9)
  # class 2 has 5 examples: fewer than 2 per component of 4, so 2 components
  # (5 // 2) and clusters with fewer points than the rank (6)
  extra = np.random.default_rng(10).normal(size=(5, 6)) + 5.0
  x0, labels = np.concatenate([x0, extra]), np.concatenate([labels, np.full(5, 2)])
  stats = gaussian_lib.fit_mixture(x0, labels, 3, 4, 6)
  assert stats["mean"].shape == (12, 6) and stats["basis"].shape == (12, 6, 6)
  counts = np.bincount(labels, minlength=3)
  np.testing.assert_allclose(stats["class_log_prior"], np.log(counts / counts.sum()), rtol=1e-6)
  weights = np.exp(stats["log_weight"].astype(np.float64)).reshape(3, 4)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
  assert np.all(weights[:2] > 0) and np.count_nonzero(weights[2]) == 2
  for j in range(12):
    if weights.reshape(-1)[j] == 0:
      continue
    v = stats["basis"][j]
    used = np.abs(v).sum(0) > 0
    np.testing.assert_allclose(v[:, used].T @ v[:, used], np.eye(used.sum()), atol=1e-5)
    assert np.all(stats["variances"][j][~used] == stats["residual"][j])  # padded directions
    assert stats["residual"][j] >= 1e-4
  # the class means are the weighted means of their components
  for c in range(3):
    means = stats["mean"][4 * c:4 * c + 4]
    np.testing.assert_allclose(weights[c] @ means, x0[labels == c].mean(0), rtol=1e-4, atol=1e-4)
  again = gaussian_lib.fit_mixture(x0, labels, 3, 4, 6)
  for k in stats:
    np.testing.assert_array_equal(stats[k], again[k])
  with pytest.raises(ValueError, match=r"classes \[3\] have no examples"):
    gaussian_lib.fit_mixture(x0, labels, 4, 2, 3)


def test_mixture_fit_floors_degenerate_clusters():
  # class 1: three copies of one point and one far point -> two clusters, one of
  # identical points and one of a single point: variance 0 in every direction
  x0, labels = _data(n=400, seed=11)
  point = np.arange(6.0)
  extra = np.stack([point, point, point, point + 50.0])
  x0 = np.concatenate([x0[labels == 0], extra])
  labels = np.concatenate([np.zeros(np.sum(labels == 0), int), np.ones(4, int)])
  stats = gaussian_lib.fit_mixture(x0, labels, 2, 2, 3, min_residual=1e-3)
  np.testing.assert_allclose(np.sort(stats["mean"][2:, 0]), [0.0, 50.0], atol=1e-5)
  assert np.all(stats["variances"] >= 1e-3) and np.all(stats["residual"] >= 1e-3)
  # so the density is proper: finite at sigma = 0 and its mean at a copy is the copy
  den, log_density = _apply_mixture(stats, jnp.asarray(point[None], jnp.float32),
                                    jnp.asarray([0.0]), jnp.asarray([1]))
  assert np.all(np.isfinite(np.asarray(log_density)))
  np.testing.assert_allclose(den[0], point, atol=1e-4)


def test_mixture_fits_a_class_with_fewer_distinct_points_than_components():
  # k-means++ ran out of distinct points to seed from: 0 / 0 probabilities
  x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]]), 3, axis=0)
  x = np.concatenate([x, np.random.default_rng(0).normal(size=(12, 2))])
  labels = np.array([0] * 6 + [1] * 12)
  stats = gaussian_lib.fit_mixture(x, labels, 2, 3, 1)
  used = stats["log_weight"][:3] > gaussian_lib.EMPTY_LOG_WEIGHT
  assert used.any() and all(np.all(np.isfinite(stats[k][:3][used]))
                            for k in ("mean", "variances", "residual"))
  # its used components' means are its points
  assert {tuple(m) for m in stats["mean"][:3][used].round(6)} <= {(0.0, 0.0), (1.0, 1.0)}


def test_mixture_covariance_prior_is_the_conjugate_shrinkage():
  x0, labels = _data(n=600, d=8, seed=12)
  kappa, comps, rank = 7.0, 3, 2
  plain = gaussian_lib.fit_mixture(x0, labels, 2, comps, rank)
  stats = gaussian_lib.fit_mixture(x0, labels, 2, comps, rank, covariance_prior=kappa)
  # the same clusters (same seed): the same means and weights
  for k in ("mean", "log_weight", "class_log_prior"):
    np.testing.assert_array_equal(stats[k], plain[k])
  for c in range(2):
    xc = x0[labels == c]
    # members of each component: nearest mean (k-means' final assignment)
    means = stats["mean"][c * comps:(c + 1) * comps].astype(np.float64)
    assign = np.argmin(((xc[:, None] - means[None]) ** 2).sum(-1), 1)
    scatter = [(xc[assign == j] - xc[assign == j].mean(0)).T @
               (xc[assign == j] - xc[assign == j].mean(0)) for j in range(comps)]
    pooled = sum(scatter) / (len(xc) - comps)
    for j in range(comps):
      n = np.sum(assign == j)
      cov = (scatter[j] + kappa * pooled) / (n - 1 + kappa)
      ev, vecs = np.linalg.eigh(cov)
      slot = c * comps + j
      np.testing.assert_allclose(stats["variances"][slot], ev[::-1][:rank], rtol=1e-4)
      np.testing.assert_allclose(stats["residual"][slot],
                                 (np.trace(cov) - ev[::-1][:rank].sum()) / (8 - rank),
                                 rtol=1e-4)
      v = stats["basis"][slot].astype(np.float64)  # the same subspace
      top = vecs[:, ::-1][:, :rank]
      np.testing.assert_allclose(v @ v.T, top @ top.T, atol=1e-4)
  with pytest.raises(ValueError, match="covariance_prior must be >= 0"):
    gaussian_lib.fit_mixture(x0, labels, 2, comps, rank, covariance_prior=-1.0)


def test_mixture_covariance_prior_lowers_the_held_out_loss():
  # Clusters of 12 points in 40 dimensions sharing one rank-4 covariance: the
  # per-cluster principal directions fit each cluster's own points, the
  # pooled prior recovers the shared ones, so held-out points are denoised
  # better with it (and training points slightly worse).
  rng = np.random.default_rng(13)
  d, comps, per = 40, 6, 12
  shared = np.linalg.qr(rng.normal(size=(d, 4)))[0] * 2.0
  centres = rng.normal(size=(comps, d)) * 6.0
  draw = lambda n: (np.repeat(centres, n, 0) + rng.normal(size=(comps * n, 4)) @ shared.T
                    + 0.1 * rng.normal(size=(comps * n, d)))
  train, test = draw(per), draw(200)
  noise = {"train": 0.5 * rng.normal(size=train.shape), "test": 0.5 * rng.normal(size=test.shape)}
  loss = {}
  for kappa in (0.0, 30.0):
    stats = gaussian_lib.fit_mixture(train, np.zeros(len(train), int), 1, comps, 4,
                                     covariance_prior=kappa)
    for name, x in (("train", train), ("test", test)):
      noisy = x + noise[name]
      den, _ = _apply_mixture(stats, jnp.asarray(noisy, jnp.float32),
                              jnp.full((len(x),), 0.5), jnp.zeros(len(x), jnp.int32))
      loss[kappa, name] = float(np.mean((np.asarray(den) - x) ** 2))
  assert loss[30.0, "test"] < 0.85 * loss[0.0, "test"], loss  # measured: 0.83
  assert loss[0.0, "train"] < loss[0.0, "test"], loss


def test_mixture_fit_reports_progress_and_the_same_fit():
  # the fit takes minutes on MNIST (silent until session 26): a line per interval
  x0, labels = _data(n=600, seed=3)
  lines = []
  logged = gaussian_lib.fit_mixture(x0, labels, 2, 3, 4, log=lines.append, log_every_s=0.0)
  assert lines == ["fitting the Gaussian base: 1/2 classes | ETA " + lines[0].split("ETA ")[1]]
  assert lines[0].endswith(" s")
  for name, value in gaussian_lib.fit_mixture(x0, labels, 2, 3, 4).items():
    np.testing.assert_array_equal(logged[name], value)


def test_mixture_fit_with_one_component_is_the_class_sample_covariance():
  """One component per class: its statistics are the class's mean, the top
  eigenpairs of its unbiased sample covariance (np.cov, ddof 1) and the mean
  of the other eigenvalues, and weight 1."""
  x0, labels = _data(n=400, d=6, seed=14)
  rank = 2
  stats = gaussian_lib.fit_mixture(x0, labels, 2, 1, rank)
  for c in range(2):
    xc = x0[labels == c]
    ev, vecs = np.linalg.eigh(np.cov(xc, rowvar=False))
    ev, vecs = ev[::-1], vecs[:, ::-1]
    np.testing.assert_allclose(stats["mean"][c], xc.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["variances"][c], ev[:rank], rtol=1e-5)
    np.testing.assert_allclose(stats["residual"][c], ev[rank:].mean(), rtol=1e-5)
    v = stats["basis"][c].astype(np.float64)
    np.testing.assert_allclose(v @ v.T, vecs[:, :rank] @ vecs[:, :rank].T, atol=1e-5)
  np.testing.assert_allclose(stats["log_weight"], 0.0, atol=1e-7)


def _dot_precisions(jaxpr):
  """The precision of every dot_general in a closed jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += _dot_precisions(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          out += _dot_precisions(sub)
  return out


@pytest.mark.parametrize("components", [1, 3])
def test_base_products_are_in_full_precision(components):
  """Every product of the base asks for Precision.HIGHEST: a GPU's default
  TF32 (a TPU's bfloat16) would move the mixture's responsibilities at small
  sigma. On a CPU this is invisible in the numbers, so the jaxpr is checked."""
  x0, labels = _data(n=300, d=6, seed=15)
  if components == 1:
    stats = gaussian_lib.fit(x0, labels, 2, 3)
    module = gaussian_lib.GaussianBase(slots=3, rank=3)
  else:
    stats = gaussian_lib.fit_mixture(x0, labels, 2, components, 3)
    module = gaussian_lib.MixtureBase(2, components, 3)
  params = {"params": {k: jnp.asarray(v) for k, v in stats.items()}}
  x = jnp.ones((4, 6), jnp.float32)
  sigma, index = jnp.full((4,), 0.3), jnp.asarray([0, 1, 2, 0])
  for fn in (lambda xx: module.apply(params, xx, sigma, index),
             jax.grad(lambda xx: jnp.sum(module.apply(params, xx, sigma, index)[1]))):
    precisions = _dot_precisions(jax.make_jaxpr(fn)(x).jaxpr)
    assert precisions, "no products found"
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(p == highest for p in precisions), precisions


def test_fit_gives_a_class_with_fewer_than_two_examples_the_all_data_statistics():
  """np.cov of one example is NaN: such a class (and an empty one) gets the
  statistics of all the data, as fit's docstring says."""
  x0, labels = _data(n=300, d=6, seed=16)
  labels = np.where(labels == 1, 0, labels)
  labels[7] = 1                                   # class 1: one example; class 2: none
  stats = gaussian_lib.fit(x0, labels, 3, 3)
  for name, value in stats.items():
    assert np.all(np.isfinite(value)), name
    for c in (1, 2):
      np.testing.assert_array_equal(value[c], value[3], err_msg=f"{name} slot {c}")
