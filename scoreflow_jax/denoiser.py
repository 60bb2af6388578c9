"""The EDM denoiser: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)."""
import jax.numpy as jnp

from scoreflow_jax.edm import append_dims, as_float, edm_scaling


def denoise(network_fn, x, sigma, cond, sigma_data=0.5):
  """sgm's ``Denoiser`` with ``EDMScaling``.

  Args:
    network_fn: ``(x_in, c_noise, cond) -> F`` with ``F`` shaped like ``x``.
    x: noisy input, (B, ...) in any layout.
    sigma: noise levels > 0 (c_noise is 0.25 log sigma), (B,), or one for the
      whole batch (a scalar); broadcast over ``x``'s other axes. Integers are
      taken as float32.
    cond: conditioning dict passed to the network unchanged.
  Returns ``network_fn(x * c_in, c_noise, cond) * c_out + x * c_skip``; the
  network receives ``c_noise`` with shape (B,), as sgm reshapes it back to
  sigma's shape.
  """
  sigma = as_float(sigma)
  if sigma.ndim == 0:
    sigma = jnp.full(x.shape[:1], sigma)
  sigma_b = append_dims(sigma, x.ndim)
  c_skip, c_out, c_in, c_noise = edm_scaling(sigma_b, sigma_data)
  c_noise = c_noise.reshape(sigma.shape)
  return network_fn(x * c_in, c_noise, cond) * c_out + x * c_skip
