"""MNIST with the MLP ScoreFlowNetwork on a per-class Gaussian-mixture base.

configs/mnist_gauss.py with ``gaussian_components = 50`` and ``gaussian_rank
= 16``: each class is split into 50 k-means clusters of the training set, each
a Gaussian with 16 principal directions (fitted when the run starts, 15-20 s
for MNIST on 2 idle cores, up to 70 s on busy ones, and 166 s on 50,000
images on a CPU shared with other jobs (session 26); a progress line
every 10 s; frozen), and the denoiser is the mixture's exact posterior
mean plus c_out times the gradient of the flow's residual energy, so
D = x + sigma^2 grad_x E still holds exactly (E = log of the noisy mixture
density + the flow's residual energy). Measured on a 2-core CPU
(docs/results.md, "A Gaussian mixture per class as the base"): 20,000 steps
(31 minutes) give FD 33.1 and 99.7% class accuracy unguided (10k samples),
against 45.1 / 99.6% for 20 components of rank 32 (this config until
session 6) and 142.6 / 95.4% for configs/mnist_gauss.py after 60,000 steps.
The step is about 3x slower than mnist_gauss.py's on that CPU (the base's
products over all 500 components).
"""
from configs import mnist_gauss


def get_config(arg=None):
  config = mnist_gauss.get_config(arg)
  config.run_name = config.run_name.replace("mnist-gauss", "mnist-mixture", 1)
  config.model.score_flow.gaussian_components = 50
  config.model.score_flow.gaussian_rank = 16
  return config
