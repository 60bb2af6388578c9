"""Bits/dim of the exact-likelihood model."""
import jax
import numpy as np
import pytest

from configs import mnist, mnist_density
from scoreflow_jax import data, likelihood, model as model_lib


def test_bits_per_dim_of_the_initial_gaussian():
  """At init the flow is the identity: q(x | sigma) = N(0, (sigma^2 + sd^2) I)."""
  config = mnist_density.get_config("tiny")
  model = model_lib.build_model(config)
  images, labels = data.make_synthetic(20, seed=1)
  params = model.init(jax.random.key(0), data.to_model_batch(images[:2], labels[:2]))
  key = jax.random.key(7)
  mean, per_image = likelihood.bits_per_dim(model, params, images, labels, key,
                                            sigma=0.002, batch_size=8)
  d = 28 * 28
  s2 = 0.002**2 + 0.25
  expected = []
  for i in range(0, 20, 8):
    pix = images[i:i + 8].astype(np.float64)
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), pix.shape))
    x = (pix + u) / 128.0 - 1.0
    logq = (-0.5 * np.sum(x.reshape(len(x), -1) ** 2, 1) / s2
            - 0.5 * d * np.log(2 * np.pi * s2))
    expected.append(-(logq - d * np.log(128.0)) / (d * np.log(2.0)))
  np.testing.assert_allclose(per_image, np.concatenate(expected), rtol=1e-4)
  assert abs(mean - per_image.mean()) < 1e-9


def test_bits_per_dim_needs_the_density_model():
  model = model_lib.build_model(mnist.get_config("tiny"))
  with pytest.raises(ValueError, match="density"):
    likelihood.bits_per_dim(model, {}, np.zeros((1, 28, 28, 1), np.uint8),
                            np.zeros(1, np.int32), jax.random.key(0))


def test_density_config_validation():
  config = mnist_density.get_config("tiny")
  config.model.score_flow.flow_type = "joint"
  with pytest.raises(ValueError, match="flow_type=conditional"):
    model_lib.build_model(config)
