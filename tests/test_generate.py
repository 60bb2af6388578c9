"""Every sampler, with and without CFG, on the ScoreFlowNetwork; grids; devices."""
import jax
import numpy as np
import pytest

from configs import mnist
from scoreflow_jax import data, generate, model as model_lib, samplers
from scoreflow_jax import train_step as ts
from tests.perturb import perturb


def _noisy_params(model, scale):
  """The model's initial weights plus ``scale`` * N(0, 1), so class and sigma
  matter."""
  images, labels = data.make_synthetic(8)
  params = model.init(jax.random.key(0), data.to_model_batch(images, labels))
  return perturb(params, jax.random.key(1), scale)


@pytest.fixture(scope="module")
def tiny():
  config = mnist.get_config("tiny")
  model = model_lib.build_model(config)
  return config, model, _noisy_params(model, 0.05)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_with_and_without_cfg(tiny, name):
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = name, 3
  labels = [0, 1, 2, 3]
  out = {}
  for scale in (1.0, 3.0):
    out[scale] = generate.generate_images(model, params, config.sampling, labels,
                                          jax.random.key(2), (28, 28, 1), cfg_scale=scale)
    assert out[scale].shape == (4, 28, 28, 1)
    assert np.all(np.isfinite(out[scale]))
    assert np.abs(out[scale]).max() > 0.1  # not the zero images of a broken sampler
  assert not np.allclose(out[1.0], out[3.0])  # guidance changes the samples
  again = generate.generate_images(model, params, config.sampling, labels,
                                   jax.random.key(2), (28, 28, 1), cfg_scale=3.0)
  np.testing.assert_array_equal(again, out[3.0])


def test_sharded_sampling_equals_single_device_and_batches(tiny):
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = "euler_ancestral", 3
  labels = list(range(10))
  one = generate.generate_images(model, params, config.sampling, labels, jax.random.key(3),
                                 (28, 28, 1), batch_size=12, mesh=ts.make_mesh(jax.devices()[:1]))
  four = generate.generate_images(model, params, config.sampling, labels, jax.random.key(3),
                                  (28, 28, 1), batch_size=12, mesh=ts.make_mesh())
  np.testing.assert_allclose(four, one, atol=1e-4)  # float32 reductions split differently
  # 10 labels in batches of 4 (3 batches, the last padded) keep their order
  batched = generate.generate_images(model, params, config.sampling, labels, jax.random.key(3),
                                     (28, 28, 1), batch_size=4, mesh=ts.make_mesh())
  assert batched.shape == (10, 28, 28, 1)
  # batch b is the sampler on its labels with fold_in(key, b), the last one padded
  fn = generate.make_sampler_fn(model, config.sampling, mesh=ts.make_mesh())
  for b, chunk in enumerate(([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0])):
    alone = np.clip(fn(params, np.array(chunk), jax.random.fold_in(jax.random.key(3), b),
                       (28, 28, 1)), -1, 1)
    np.testing.assert_allclose(batched[4 * b:4 * b + 4], alone[:len(batched[4 * b:])],
                               atol=1e-5)


def test_effective_batch_size_is_capped_and_calls_padded_to_the_devices():
  # what sample.py records as batch_size: the batches the noise was drawn in
  assert [generate.effective_batch_size(b, n) for b, n in (
      (256, 9), (4, 9), (3, 9), (5, 3), (1, 1))] == [9, 4, 3, 3, 1]
  assert [generate.padded_size(b, d) for b, d in (
      (9, 1), (9, 4), (3, 2), (4, 2), (1, 4))] == [9, 12, 4, 4, 4]


def test_images_do_not_depend_on_the_device_count_when_batches_are_padded(tiny):
  # A batch of 4 on 3 devices is padded to 6 rows: the batches (and so each
  # image's noise, fold_in(key, b)) must stay those of 1 device. Until session 26
  # the batch itself was rounded up to 6, and images 4-8 changed by up to 2.
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = "euler_ancestral", 3
  gen = lambda n: generate.generate_images(
      model, params, config.sampling, list(range(9)), jax.random.key(5), (28, 28, 1),
      batch_size=4, mesh=ts.make_mesh(jax.devices()[:n]))
  np.testing.assert_allclose(gen(3), gen(1), atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_each_sample_follows_its_own_label(tiny, scale):
  # A deterministic sampler and the same noise: changing one label changes that
  # image only. At scale 1 this fails if the unconditional half were sampled
  # (cond and uncond swapped), which no label changes.
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = "heun_edm", 3
  gen = lambda labels: generate.generate_images(
      model, params, config.sampling, labels, jax.random.key(4), (28, 28, 1),
      cfg_scale=scale)
  a, b = gen([0, 1, 2, 3]), gen([0, 1, 2, 7])
  np.testing.assert_allclose(a[:3], b[:3], atol=1e-6)
  assert np.abs(a[3] - b[3]).max() > 1e-2


def test_image_grid_layout():
  images = np.stack([np.full((2, 3, 1), v) for v in (-1.0, 0.0, 1.0, 0.5)])
  grid = generate.image_grid(images, rows=2)
  assert grid.shape == (2 * 4, 2 * 5, 1) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 128 and grid[5, 1, 0] == 255
  assert grid[0, 0, 0] == 255  # white gaps


def test_cfg_interval_reaches_the_guider_and_progress_counts_batches(tiny):
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = "heun_edm", 3
  calls = []
  gen = lambda params, **kw: generate.generate_images(
      model, params, config.sampling, [0, 1, 2, 3, 4], jax.random.key(6), (28, 28, 1),
      batch_size=2, **kw)
  gen(params, cfg_scale=1.0, progress=lambda b, n: calls.append((b, n)))
  assert calls == [(1, 3), (2, 3), (3, 3)]
  # The fixture's weights (init + 0.05 noise) make a chaotic sampler: the same
  # samples computed by two differently compiled programs (a lax.cond around
  # the conditional call, the doubled batch) part by up to 2. Init + 0.005 noise
  # keeps that at about 1e-4 while guidance still moves the samples by ~0.8.
  mild = _noisy_params(model, 0.005)
  plain, guided = gen(mild, cfg_scale=1.0), gen(mild, cfg_scale=3.0)
  assert np.abs(guided - plain).max() > 0.1
  # an interval above sigma_max (80) guides no step: the unguided samples
  np.testing.assert_allclose(gen(mild, cfg_scale=3.0, cfg_interval=(1e3, 2e3)), plain,
                             atol=1e-3)
  # ... and one holding every sigma guides all of them
  np.testing.assert_allclose(gen(mild, cfg_scale=3.0, cfg_interval=(0.0, 1e3)), guided,
                             atol=1e-3)


def test_scale_1_makes_no_unconditional_call(tiny, monkeypatch):
  config, model, params = tiny
  config.sampling.sampler, config.sampling.num_steps = "euler_edm", 2
  monkeypatch.setattr(generate.guiders, "vanilla_cfg",
                      lambda *a, **k: pytest.fail("scale 1 doubled the batch for CFG"))
  generate.generate_images(model, params, config.sampling, [0, 1], jax.random.key(0),
                           (28, 28, 1), cfg_scale=1.0)


def test_image_grid_rows_are_classes_and_columns_samples():
  # 3 classes x 2 samples (the existing layout test is square: rows == columns)
  images = np.stack([np.full((2, 2, 1), v) for v in (-1.0, 1.0, -1.0, 1.0, -1.0, 1.0)])
  grid = generate.image_grid(images, rows=3)
  assert grid.shape == (3 * 4, 2 * 4, 1)
  assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 255 and grid[5, 1, 0] == 0
  assert grid[9, 1, 0] == 0 and grid[9, 5, 0] == 255
