"""Denoiser preconditioning and the per-sample EDM loss."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import denoiser, edm, loss
from tests.perturb import perturb


def _np_scalings(s, sd):
  return (sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2),
          1 / np.sqrt(s**2 + sd**2), 0.25 * np.log(s))


class DenoiserLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_denoise_any_layout(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      for shape in [(3, 4, 5, 2), (3, 7), (3, 2, 3, 4, 5)]:
        x = rng.normal(size=shape)
        sigma = np.array([0.01, 0.9, 30.0])
        w = rng.normal(size=shape[1:])
        seen = {}

        def net(x_in, c_noise, cond):
          seen["c_noise_shape"] = c_noise.shape
          bshape = (-1,) + (1,) * (x_in.ndim - 1)
          return jnp.tanh(x_in * w) + c_noise.reshape(bshape) * cond["k"]

        out = self.variant(lambda x, s: denoiser.denoise(net, x, s, {"k": 2.0}, 0.6))(
            jnp.asarray(x), jnp.asarray(sigma))
        s = sigma.reshape((-1,) + (1,) * (len(shape) - 1))
        c_skip, c_out, c_in, c_noise = _np_scalings(s, 0.6)
        ref = (np.tanh(x * c_in * w) + c_noise * 2.0) * c_out + x * c_skip
        np.testing.assert_allclose(out, ref, rtol=1e-12)
        self.assertEqual(seen["c_noise_shape"], (3,))
        self.assertEqual(out.dtype, jnp.float64)

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_per_sample_l2_l1(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(1)
      x0 = rng.normal(size=(4, 3, 3, 2))
      noise = rng.normal(size=x0.shape)
      sigma = np.array([0.05, 0.5, 2.0, 20.0])
      den = lambda x, s: 0.3 * x + jnp.reshape(s, (-1, 1, 1, 1))
      for loss_type in ("l2", "l1"):
        got = self.variant(lambda a, b, c: loss.diffusion_loss(
            den, a, b, c, loss_type, 0.5))(x0, sigma, noise)
        s = sigma.reshape(-1, 1, 1, 1)
        d = 0.3 * (x0 + s * noise) + s
        w = (s**2 + 0.25) / (s * 0.5) ** 2
        err = (d - x0) ** 2 if loss_type == "l2" else np.abs(d - x0)
        ref = (w * err).reshape(4, -1).mean(1)
        self.assertEqual(got.shape, (4,))
        np.testing.assert_allclose(got, ref, rtol=1e-12)

  def test_bad_loss_type(self):
    with pytest.raises(ValueError, match="loss_type"):
      loss.diffusion_loss(lambda x, s: x, jnp.zeros((1, 2)), jnp.ones(1),
                          jnp.zeros((1, 2)), "l3")

  def test_sample_and_loss_draws_from_key(self):
    x0 = jnp.ones((8, 2, 2, 1))
    l1, s1 = loss.sample_and_loss(lambda x, s: x * 0, x0, jax.random.key(3))
    l2, s2 = loss.sample_and_loss(lambda x, s: x * 0, x0, jax.random.key(3))
    l3, _ = loss.sample_and_loss(lambda x, s: x * 0, x0, jax.random.key(4))
    chex.assert_trees_all_close((l1, s1), (l2, s2))
    self.assertFalse(np.allclose(l1, l3))
    # D = 0 gives loss w(sigma) * mean(x0^2) = w(sigma) exactly.
    np.testing.assert_allclose(l1, edm.edm_weighting(s1), rtol=1e-6)

  def test_optimal_denoiser_of_a_point_mass_has_zero_loss(self):
    # For data concentrated at x0 = c, the ideal denoiser returns c.
    x0 = jnp.full((5, 3), 0.7)
    per, _ = loss.sample_and_loss(lambda x, s: jnp.full_like(x, 0.7), x0,
                                  jax.random.key(0))
    np.testing.assert_allclose(per, 0.0, atol=1e-12)


def test_training_loss_draws_sigma_noise_and_label_dropout_per_sample():
  # DiffusionModel.per_sample_loss, what the train step differentiates: log sigma
  # ~ N(p_mean, p_std^2) from the loss config, and the class dropped (zero
  # embedding) for a fraction ucg_rate of the samples.
  from configs import mnist
  from scoreflow_jax import data, model as model_lib
  config = mnist.get_config("tiny")
  config.loss.p_mean, config.loss.p_std = 0.4, 0.7
  config.model.conditioner.ucg_rate = 0.3
  model = model_lib.build_model(config)
  n = 1024
  images, labels = data.make_synthetic(n)
  batch = data.to_model_batch(images, labels)
  params = model.init(jax.random.key(0), batch)
  params = perturb(params, jax.random.key(1), 0.05)  # the class matters
  keys = jax.random.split(jax.random.key(2), n)
  per_sample, sigma = jax.jit(model.per_sample_loss)(params, batch, keys)
  log_sigma = np.log(np.asarray(sigma))
  assert abs(log_sigma.mean() - 0.4) < 4 * 0.7 / np.sqrt(n)
  assert abs(log_sigma.std() - 0.7) < 0.06
  # The same sigma and noise (each sample's key split as documented), with the
  # class kept and with it dropped: every loss is one of the two.
  sub = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  sigma_ref, noise = loss.per_sample_sigma_and_noise(sub[:, 1], batch["jpg"].shape,
                                                     p_mean=0.4, p_std=0.7)
  np.testing.assert_allclose(sigma_ref, sigma, rtol=1e-6)
  den = model.denoiser(params)

  def loss_with(cond):
    return np.asarray(jax.jit(lambda c: loss.diffusion_loss(
        lambda x, s: den(x, s, c), batch["jpg"], sigma_ref, noise))(cond))

  kept = loss_with(model.condition(params, batch))
  dropped = loss_with(model.condition(params, batch, force_zero_embeddings=("cls",)))
  per_sample = np.asarray(per_sample)
  is_kept = np.isclose(per_sample, kept, rtol=1e-4)
  is_dropped = np.isclose(per_sample, dropped, rtol=1e-4)
  assert np.all(is_kept | is_dropped)
  apart = ~np.isclose(kept, dropped, rtol=1e-3)  # where the two tell the class apart
  assert apart.mean() > 0.9
  m = apart.sum()
  assert abs(is_dropped[apart].mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / m)
  with pytest.raises(ValueError, match=r"batch\['jpg'\] must be float images"):
    model.per_sample_loss(params, {"jpg": images, "cls": labels}, keys)  # uint8


def test_denoise_takes_one_sigma_for_the_batch_and_integer_sigma():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 1)), jnp.float32)
  net = lambda x_in, c_noise, cond: x_in * 2.0 + c_noise[:, None, None, None]
  per_sample = denoiser.denoise(net, x, jnp.full((3,), 2.0), None)
  for sigma in (2.0, 2, jnp.array(2), jnp.full((3,), 2, jnp.int32)):
    out = denoiser.denoise(net, x, sigma, None)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, per_sample)


def test_per_sample_noise_is_unit_normal_and_independent_of_sigma():
  # Checked against nothing but the draws: noise drawn with sigma's own key would
  # make every image's first pixel (log sigma - p_mean) / p_std (correlation 1),
  # which comparing the function with itself could not see.
  n, shape = 4096, (4096, 6, 6, 1)
  keys = jax.random.split(jax.random.key(11), n)
  sigma, noise = loss.per_sample_sigma_and_noise(keys, shape, p_mean=-1.2, p_std=1.2)
  z = (np.log(np.asarray(sigma)) + 1.2) / 1.2
  noise = np.asarray(noise).reshape(n, -1)
  assert abs(z.mean()) < 4 / np.sqrt(n) and abs(z.std() - 1) < 4 / np.sqrt(2 * n)
  assert np.all(np.abs(noise.mean(0)) < 5 / np.sqrt(n))
  assert np.all(np.abs(noise.std(0) - 1) < 5 / np.sqrt(2 * n))
  corr = (z - z.mean()) @ (noise - noise.mean(0)) / (n * z.std() * noise.std(0))
  assert np.all(np.abs(corr) < 5 / np.sqrt(n)), np.abs(corr).max()
  # and no two samples share noise
  assert np.abs(np.corrcoef(noise[:64])[np.triu_indices(64, 1)]).max() < 0.9


def test_loss_weight_uses_sigma_data():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x0, noise = rng.normal(size=(3, 2, 2, 1)), rng.normal(size=(3, 2, 2, 1))
    sigma = np.array([0.1, 0.7, 5.0])
    den = lambda x, s: 0.3 * x + jnp.reshape(s, (-1, 1, 1, 1))
    got = loss.diffusion_loss(den, x0, sigma, noise, "l2", sigma_data=0.7)
    s = sigma.reshape(-1, 1, 1, 1)
    w = (s**2 + 0.49) / (s * 0.7) ** 2  # EDM's lambda(sigma) for sigma_data 0.7
    ref = (w * (0.3 * (x0 + s * noise) + s - x0) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def _sample_and_loss_draws(**kwargs):
  """Calls sample_and_loss eagerly on x0 = 0 with D = 0.2 x, recording the noisy
  input: returns (loss, sigma, noise) with noise = x_noisy / sigma."""
  n = 2048
  x0 = jnp.zeros((n, 2, 2, 1))
  seen = {}

  def den(x, s):
    seen["x"] = np.asarray(x)
    return 0.2 * x

  per, sigma = loss.sample_and_loss(den, x0, jax.random.key(7), **kwargs)
  sigma = np.asarray(sigma)
  return np.asarray(per), sigma, seen["x"] / sigma[:, None, None, None]


def test_sample_and_loss_passes_its_options_through():
  per, sigma, noise = _sample_and_loss_draws(loss_type="l1", sigma_data=0.7,
                                             p_mean=0.8, p_std=0.3)
  n = sigma.shape[0]
  log_s = np.log(sigma)
  assert abs(log_s.mean() - 0.8) < 5 * 0.3 / np.sqrt(n)
  assert abs(log_s.std() - 0.3) < 5 * 0.3 / np.sqrt(2 * n)
  # l1 with sigma_data 0.7: D - x0 = 0.2 sigma noise
  w = (sigma**2 + 0.49) / (sigma * 0.7) ** 2
  ref = w * np.abs(0.2 * sigma[:, None] * noise.reshape(n, -1)).mean(1)
  np.testing.assert_allclose(per, ref, rtol=1e-5)


def test_sample_and_loss_noise_is_not_sigmas_draw():
  # noise from sigma's own key reuses its normals (the first n noise values
  # are the n standard normals behind log sigma); independent keys share none
  _, sigma, noise = _sample_and_loss_draws()
  rand = (np.log(sigma) + 1.2) / 1.2
  flat = noise.reshape(-1)
  assert abs(flat.mean()) < 5 / np.sqrt(flat.size)
  assert abs(flat.std() - 1) < 5 / np.sqrt(2 * flat.size)
  # the fraction of log-sigma normals that reappear (to float32 round-off) in the noise
  srt = np.sort(flat)
  pos = np.clip(np.searchsorted(srt, rand), 1, srt.size - 1)
  nearest = np.minimum(np.abs(srt[pos] - rand), np.abs(srt[pos - 1] - rand))
  reused = np.mean(nearest < 2e-6)
  assert reused < 0.1, reused  # ~0.01 by chance for independent draws; 1 when reused
