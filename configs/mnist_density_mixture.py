"""MNIST's exact-likelihood model that also samples: the density flow on the mixture base.

configs/mnist_density.py (the MLP flow as a normalised density of the image
alone, a little of its own bits/dim in the loss) whose base distribution is
the per-class Gaussian mixture of configs/mnist_mixture.py (50 k-means
components per class, 16 principal directions each, fitted to the training
set when the run starts, frozen) noised at sigma, instead of N(0, I):
log q(x | sigma, c) = log p_sigma(f(c_in x) / c_in | c) + log|det df/du|,
still exactly normalised, and D = x + sigma^2 grad_x log q exactly. At
initialisation q is the noisy mixture and D its exact posterior mean, so
the model starts where the mixture alone is (FD 60.2 at 1k, 99.6%, 6.87
bits/dim at sigma 0.002) instead of at EDM's D = c_skip x. Measured at its
20,000 steps (39 minutes on 2 CPU cores; docs/results.md, "The density flow
on the mixture base", session 44): 4.87 bits/dim at sigma 0.002 (EMA, 2,000
test images; mnist_density.py on N(0, I): 5.38) and lower at every sigma up
to 0.3, and samples that are digits: FD 55.6 at 1k, 99.8% class accuracy
(mnist_density.py: 509.9, 52.3%). Global-norm gradient clipping at 1.0:
without it the same run spiked at step 13,700 (bits/dim term 5.3 -> 13.6),
which the EMA still carried at step 20,000 (6.84 bits/dim). A step is about
6x slower than mnist_density.py's (the base's products and their second
derivatives in the loss's gradient).
"""
from configs import default, mnist_density


def get_config(arg=None):
  config = mnist_density.get_config()
  config.run_name = "mnist-density-mixture"
  sf = config.model.score_flow
  sf.gaussian_base = True
  sf.gaussian_components = 50
  sf.gaussian_rank = 16
  config.optim.grad_clip_norm = 1.0
  config.training.num_steps = 20_000
  if default.is_tiny(arg):
    config = default.tiny(config)
  return config
