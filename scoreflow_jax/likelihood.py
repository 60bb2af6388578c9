"""Exact bits/dim of 8-bit images under the "density" ScoreFlowNetwork.

Pixels p in {0..255} are dequantised uniformly, y = p + u, u ~ U[0, 1)^D, and
mapped to x = (y - 1/2) / 127.5 - 1: pixel p's bin is centred on p / 127.5 - 1,
the value the model was trained on (until session 23 the bins were
[p / 128 - 1, (p + 1) / 128 - 1), with the training values of p = 0 and 255 on
their edges, which cost bits at small sigma). Then -log P(p) <= E_u[-log q_y(y)]
with log q_y(y) = log q(x | sigma, c) - D log 127.5, so the reported bits/dim,
E[-log q_y(y)] / (D log 2), is an upper bound on the model's discrete NLL.
q(x | sigma, c) is the flow's normalised conditional density at a small
sigma (default sigma_min = 0.002), evaluated in one forward pass per image.
"""
import math

import numpy as np

# JAX is imported by the functions that use it: bits_per_dim.py checks its
# --sigma (check_sigma) before JAX starts.

SIGMA_HINT = ("q(x | sigma) is the model's density of the training images plus"
              " Gaussian noise of std sigma, and the network takes log(sigma) as"
              " its noise input, so it is defined only for sigma > 0 (at 0 the"
              " result is NaN); the default, 0.002, is the sampler's sigma_min.")


_PIXELS_NEEDED = ("bits/dim is of images, so it needs a model that diffuses pixels "
                  "(config.model.first_stage='identity'); this run diffuses "
                  "autoencoder latents")
_DENSITY_NEEDED = ("bits/dim needs a network with parameterization='density' "
                   "(flow_type 'conditional' or 'conv'); see configs/mnist_density.py")


def check_density_model(model):
  """Raises ValueError unless ``model``'s network has a normalised density."""
  from scoreflow_jax import first_stage as first_stage_lib
  if not isinstance(model.first_stage, first_stage_lib.IdentityFirstStage):
    raise ValueError(_PIXELS_NEEDED)
  if getattr(model.network, "parameterization", None) != "density":
    raise ValueError(_DENSITY_NEEDED)


def check_density_config(model_config):
  """``check_density_model`` for the model ``config.model`` builds, without
  JAX (bits_per_dim.py refuses a run before loading it)."""
  if model_config.first_stage != "identity":
    raise ValueError(_PIXELS_NEEDED)
  if (model_config.network != "score_flow"
      or model_config.score_flow.parameterization != "density"):
    raise ValueError(_DENSITY_NEEDED)


def check_sigma(sigma):
  """Raises ValueError unless ``sigma`` is finite and > 0 (``SIGMA_HINT``)."""
  if not (math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be finite and > 0, got {sigma}: {SIGMA_HINT}")


def bits_per_dim(model, params, images_uint8, labels, key, sigma=0.002,
                 batch_size=500, noisy=False):
  """Mean bits/dim (class-conditional) and per-image values, numpy.

  ``images_uint8``: (N, H, W, C) uint8 pixels; ``labels``: (N,) in [0,
  n_classes). Image i's dequantisation noise comes from ``fold_in(key, i)``, so
  the values do not depend on ``batch_size``. ``noisy``: score x + u + sigma *
  eps instead (eps from ``fold_in(fold_in(key, i), 1)``), the noised test set
  whose density q(. | sigma) models: its cross-entropy in the same units, not
  the data's bits/dim (the loss's ``nll_noisy`` term).
  """
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import model as model_lib
  network = model.network
  check_density_model(model)
  check_sigma(sigma)
  images_uint8, labels = np.asarray(images_uint8), np.asarray(labels)
  if not len(images_uint8) or labels.shape != (len(images_uint8),):
    raise ValueError(f"need N >= 1 images and N labels, got {len(images_uint8)}"
                     f" and {labels.shape}.")
  if images_uint8.dtype != np.uint8:
    raise ValueError(f"images must be uint8 pixels 0..255 (8-bit data, dequantised "
                     f"here), got {images_uint8.dtype}; from [-1, 1] images: "
                     "np.rint((x + 1) * 127.5).astype(np.uint8)")
  channels = getattr(network, "in_channels", None)
  if images_uint8.ndim != 4 or (channels is not None and images_uint8.shape[-1] != channels):
    raise ValueError(f"images must be (N, H, W, {channels}) for this network "
                     f"(in_channels={channels}), got shape {images_uint8.shape}; score "
                     "the data set the run was trained on (a conv flow takes any H and "
                     "W, so their size is not checked here: bits_per_dim.py checks it "
                     "against the run's config)")
  n_classes = getattr(model.conditioner.embedders[0], "n_classes", None)
  if n_classes is not None and (labels.min() < 0 or labels.max() >= n_classes):
    raise ValueError(f"labels must be in [0, {n_classes}), got [{labels.min()}, "
                     f"{labels.max()}]")

  @jax.jit
  def log_prob(params, pix, labels, key, index):
    # the training values p / 127.5 - 1, each dequantised over its centred bin
    # by the model (the same bound its loss.nll_weight term trains)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    noise_keys = model_lib.fold_keys(keys, 1) if noisy else None
    x0 = pix.astype(jnp.float32) / 127.5 - 1.0
    cond = model.condition(params, {"cls": labels})
    return model.dequantized_bits_per_dim(params, x0, cond, keys, sigma, noise_keys)

  out = []
  for i in range(0, len(images_uint8), batch_size):
    j = slice(i, i + batch_size)
    out.append(np.asarray(log_prob(params, jnp.asarray(images_uint8[j]),
                                   jnp.asarray(labels[j]), key,
                                   jnp.arange(len(images_uint8))[j])))
  bpd = np.concatenate(out)
  return float(bpd.mean()), bpd
