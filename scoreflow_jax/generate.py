"""Class-conditional generation with any sampler and optional CFG, plus image grids."""
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scoreflow_jax import guiders, samplers
from scoreflow_jax.train_step import AXIS


def make_sampler_fn(model, sampling_config, cfg_scale: Optional[float] = None,
                    mesh=None, **sampler_options):
  """Returns jitted ``fn(params, labels (B,), key) -> images (B, H, W, C)``.

  CFG (scale != 1) makes one denoiser call on the doubled batch per step with
  zeroed class embeddings as the unconditional half (sgm's MNIST sampling).
  With a ``mesh``, the batch is split over its devices (B must divide).
  """
  sc = sampling_config
  scale = sc.cfg_scale if cfg_scale is None else cfg_scale
  sampler = samplers.get_sampler(sc.sampler)

  def generate(params, labels, z, key):
    batch = {"cls": labels}
    cond, uncond = model.unconditional(params, batch)
    den = model.denoiser(params)
    guided = (guiders.identity_guider(den) if scale == 1.0
              else guiders.vanilla_cfg(den, scale))
    x = sampler(guiders.close_over(guided, cond, uncond), z,
                num_steps=sc.num_steps, sigma_min=sc.sigma_min,
                sigma_max=sc.sigma_max, rho=sc.rho, key=key, **sampler_options)
    return model.first_stage.decode(x)

  if mesh is None:
    jitted = jax.jit(generate)
  else:
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    jitted = jax.jit(generate, in_shardings=(rep, shard, shard, rep),
                     out_shardings=shard)

  def fn(params, labels, key, image_shape):
    k_z, k_s = jax.random.split(key)
    z = jax.random.normal(k_z, (len(labels),) + tuple(image_shape), jnp.float32)
    return jitted(params, jnp.asarray(labels, jnp.int32), z, k_s)

  return fn


def generate_images(model, params, sampling_config, labels: Sequence[int], key,
                    image_shape, batch_size: int = 256, cfg_scale=None, mesh=None,
                    progress=None, **sampler_options):
  """Generates one image per label in batches; returns numpy (N, H, W, C) in [-1, 1].

  Batches are padded to a fixed size (a multiple of the device count) so the
  sampler compiles once; batch b uses fold_in(key, b).
  """
  n_dev = 1 if mesh is None else mesh.size
  batch_size = max(n_dev, (min(batch_size, len(labels)) + n_dev - 1) // n_dev * n_dev)
  fn = make_sampler_fn(model, sampling_config, cfg_scale, mesh, **sampler_options)
  labels = np.asarray(labels, np.int32)
  out = []
  num_batches = math.ceil(len(labels) / batch_size)
  for b in range(num_batches):
    chunk = labels[b * batch_size:(b + 1) * batch_size]
    padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)])
    images = fn(params, padded, jax.random.fold_in(key, b), image_shape)
    out.append(np.asarray(jax.device_get(images))[:len(chunk)])
    if progress is not None:
      progress(b + 1, num_batches)
  return np.clip(np.concatenate(out), -1.0, 1.0)


def image_grid(images, rows: int) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> uint8 grid (rows*(H+2), cols*(W+2), C), 2px gaps."""
  n, h, w, c = images.shape
  cols = math.ceil(n / rows)
  grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
  pix = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = pix[i]
  return grid


def save_png(grid: np.ndarray, path: str):
  from PIL import Image
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = grid[..., 0] if grid.shape[-1] == 1 else grid
  Image.fromarray(img).save(path)
