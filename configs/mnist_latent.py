"""MNIST diffused in the latents of a small KL autoencoder (latent diffusion).

The first stage is sgm's AutoencoderKL as train_autoencoder.py trains it by
default (ch 32, ch_mult (1, 2, 2), one ResnetBlock per level, 4 latent
channels): 28x28x1 images become 7x7x4 latents (196 numbers instead of 784),
and samples are decoded back to pixels. The network is configs/mnist_mixture.py's
MLP flow on a per-class Gaussian-mixture base, here fitted to the latents.
Train the autoencoder first, then pass its weights:

  python train_autoencoder.py --data_dir /path/to/mnist --out vae.safetensors
  python train.py --config configs/mnist_latent.py \\
    --config.data.source=offline --config.data.data_dir=/path/to/mnist \\
    --config.model.autoencoder.weights=vae.safetensors \\
    --config.model.autoencoder.scale_factor=S --config.model.autoencoder.shift_factor=M

with S and M what train_autoencoder.py printed: 0.5 / the latents' std and
their mean, so that they are centred with the std sigma_data = 0.5 the
denoiser assumes (the shift since session 26: docs/results.md, "Centred
latents"; this config's results were measured without it). The
training set is encoded once at the start (model.autoencoder.cache_moments:
about a minute on a 2-core CPU) and each step draws its latents from the
stored posterior moments.
"""
from configs import mnist_mixture


def get_config(arg=None):
  config = mnist_mixture.get_config(arg)
  config.run_name = config.run_name.replace("mnist-mixture", "mnist-latent", 1)
  # What train_autoencoder.py printed for its defaults (seed 0, 2,000 steps,
  # session 20: latent std 3.283); other weights: set the value it prints.
  return with_mnist_autoencoder(config, ch_mult=(1, 2, 2), embed_dim=4, scale_factor=0.1523)


def with_mnist_autoencoder(config, ch_mult, embed_dim, scale_factor, shift_factor=0.0):
  """``config``'s network diffused in the latents of a VAE as
  train_autoencoder.py trains it for MNIST (ch 32, one ResnetBlock per level,
  no attention) with ``--ch_mult`` and ``--embed_dim``; the weights are the
  user's (model.autoencoder.weights)."""
  config.model.first_stage = "kl_autoencoder"
  a = config.model.autoencoder
  a.in_channels, a.resolution = 1, 28
  a.ch, a.ch_mult, a.num_res_blocks, a.attn_resolutions = 32, ch_mult, 1, ()
  a.embed_dim = a.z_channels = embed_dim
  a.scale_factor, a.shift_factor = scale_factor, shift_factor
  config.model.score_flow.in_channels = embed_dim
  return config
