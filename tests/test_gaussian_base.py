"""The Gaussian base of the flow energy: exact posterior means, exact energies,
statistics fitted once and never trained."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist
from scoreflow_jax import conditioner as conditioner_lib
from scoreflow_jax import data, trainer
from scoreflow_jax.denoiser import denoise
from scoreflow_jax.networks import ScoreFlowNetwork
from scoreflow_jax.networks import gaussian_base as gaussian_lib

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


def test_base_denoiser_is_tweedie_of_its_log_density(x64):
  x0, labels = _data(seed=2)
  stats = gaussian_lib.fit(x0, labels, 2, 3)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)))
  sigma, index = jnp.asarray(SIGMA), jnp.asarray([0, 1, 2, 0])
  den, _ = _apply_base(stats, x, sigma, index)
  grad = jax.grad(lambda xx: jnp.sum(_apply_base(stats, xx, sigma, index)[1]))(x)
  np.testing.assert_allclose(den, x + sigma[:, None] ** 2 * grad, rtol=1e-5, atol=1e-6)


def _network(flow_type="joint", **kw):
  net = ScoreFlowNetwork(in_channels=1, model_channels=8, n_flows=3, num_classes=3,
                         flow_type=flow_type, conv_channels=4, conv_blocks=1,
                         gaussian_base=True, gaussian_rank=5, **kw)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 4, 2, 1)))
  cond = {"vector": jnp.asarray(rng.normal(size=(4, 6))), "class_index": jnp.asarray([0, 2, 3, 1])}
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        net.init(jax.random.key(0), x, jnp.zeros(4), cond))
  x0, labels = _data(n=4000, d=8, classes=3, seed=5)
  stats = gaussian_lib.fit(x0, labels, 3, 5)
  params["params"][gaussian_lib.MODULE_NAME] = {k: jnp.asarray(v, jnp.float64)
                                               for k, v in stats.items()}
  return net, params, x, cond


@pytest.mark.parametrize("flow_type", ["joint", "conv"])
def test_network_starts_at_the_gaussian_denoiser_and_stays_an_energy_gradient(x64, flow_type):
  net, params, x, cond = _network(flow_type)
  sigma = jnp.asarray(SIGMA)
  den = lambda p: denoise(lambda a, b, c: net.apply(p, a, b, c), x, sigma, cond, 0.5)
  base, _ = _apply_base({k: np.asarray(v) for k, v in
                         params["params"][gaussian_lib.MODULE_NAME].items()},
                        x.reshape(4, -1), sigma, cond["class_index"])
  # zero-initialised couplings: the residual flow energy has zero gradient
  np.testing.assert_allclose(den(params), base.reshape(x.shape), rtol=1e-9, atol=1e-9)
  # perturbed flow: D = x + sigma^2 grad_x E still holds exactly, and moves away
  p2 = jax.tree.map(lambda a: a, params)
  leaves, tree = jax.tree.flatten(p2["params"]["flow"])
  keys = jax.random.split(jax.random.key(6), len(leaves))
  p2["params"]["flow"] = jax.tree.unflatten(
      tree, [l + 0.2 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])
  grad_e = jax.grad(lambda xx: jnp.sum(net.apply(p2, xx, sigma, cond, method="energy")))(x)
  np.testing.assert_allclose(den(p2), x + sigma[:, None, None, None] ** 2 * grad_e,
                             rtol=1e-9, atol=1e-9)
  score = net.apply(p2, x, sigma, cond, method="score")
  np.testing.assert_allclose(score, grad_e, rtol=1e-9, atol=1e-9)
  assert not np.allclose(den(p2), den(params))


def test_network_needs_the_class_index_and_preconditioned(x64):
  net, params, x, cond = _network()
  with pytest.raises(ValueError, match="class_index"):
    net.apply(params, x, jnp.zeros(4), {"vector": cond["vector"]})
  with pytest.raises(ValueError, match="preconditioned"):
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


def test_trainer_fits_the_base_and_never_trains_it(tmp_path):
  config = mnist.get_config("tiny")
  config.training.image_every = 0
  config.training.num_steps = 4
  config.model.score_flow.gaussian_base = True
  config.model.score_flow.gaussian_rank = 4
  trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  from scoreflow_jax import generate
  _, state, _ = generate.load_run(str(tmp_path / "run"))
  images, labels = data.load_dataset(config.data)
  x = data.to_model_batch(images, labels)["jpg"]
  expected = gaussian_lib.fit(x, labels, 10, 4)
  for params in (state.params, state.ema_params):
    got = params["network"][gaussian_lib.MODULE_NAME]
    for k, v in expected.items():  # unchanged by 4 AdamW steps with weight decay
      np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6)
