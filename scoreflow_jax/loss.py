"""sgm's StandardDiffusionLoss with EDMWeighting and EDMSampling."""
import math

import jax
import jax.numpy as jnp

from scoreflow_jax.edm import append_dims, edm_sigma_sampling, edm_weighting

LOSS_TYPES = ("l2", "l1")


def diffusion_loss(denoise_fn, x0, sigma, noise, loss_type="l2", sigma_data=0.5):
  """Per-sample EDM loss, shape (B,).

  x_noisy = x0 + sigma * noise; D = denoise_fn(x_noisy, sigma); the loss is the
  mean over non-batch axes of w * (D - x0)^2 ("l2") or w * |D - x0| ("l1"),
  w = edm_weighting(sigma). As in sgm, the weight multiplies the error inside
  the mean and the batch mean is left to the caller.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  sigma_b = append_dims(sigma, x0.ndim)
  x_noisy = x0 + sigma_b * noise
  denoised = denoise_fn(x_noisy, sigma)
  w = append_dims(edm_weighting(sigma, sigma_data), x0.ndim)
  err = (denoised - x0) ** 2 if loss_type == "l2" else jnp.abs(denoised - x0)
  return jnp.mean((w * err).reshape(x0.shape[0], -1), axis=1)


def per_sample_sigma_and_noise(keys, shape, dtype=jnp.float32, p_mean=-1.2,
                               p_std=1.2):
  """EDMSampling sigma (B,) and unit noise ``shape`` from one key per sample.

  Sample i's draws depend only on ``keys[i]``, so a global batch gets the same
  noise however it is split over devices.
  """
  def draw(k):
    k_sigma, k_noise = jax.random.split(k)
    rand = jax.random.normal(k_sigma, (), dtype)
    return jnp.exp(p_mean + p_std * rand), jax.random.normal(k_noise, shape[1:], dtype)

  return jax.vmap(draw)(keys)


def sample_and_loss(denoise_fn, x0, key, loss_type="l2", sigma_data=0.5,
                    p_mean=-1.2, p_std=1.2):
  """sgm's StandardDiffusionLoss call in one function, for a loop of one's own:
  draws sigma (EDMSampling) and unit noise for the whole batch from ``key``.

  Returns ``(per_sample_loss (B,), sigma (B,))``. train.py's step does not use
  it: it draws each sample's sigma and noise from a key of its own
  (``per_sample_sigma_and_noise``), so a global batch gets the same noise
  however it is split over devices.
  """
  k_sigma, k_noise = jax.random.split(key)
  sigma = edm_sigma_sampling(k_sigma, x0.shape[0], p_mean, p_std, dtype=x0.dtype)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  loss = diffusion_loss(denoise_fn, x0, sigma, noise, loss_type, sigma_data)
  return loss, sigma


def bits_per_dim(log_q, num_dims: int):
  """Bits/dim of 8-bit data from the log-density ``log_q`` of its dequantised
  values in [-1, 1] (bins of width 1 / 127.5): -(log_q - D log 127.5) / (D log 2)."""
  return -(log_q - num_dims * math.log(127.5)) / (num_dims * math.log(2.0))
