"""MNIST with the exact-likelihood ScoreFlowNetwork.

The flow is a bijection of the image alone (sigma/class embeddings are context
of the coupling networks), its log-density is normalised, and the denoiser is
D = x + sigma^2 grad_x log q(x | sigma, c). Gives bits/dim
(scoreflow_jax/likelihood.py).
"""
from configs import default, mnist


def get_config(arg=None):
  config = mnist.get_config()
  config.run_name = "mnist-density"
  config.model.score_flow.parameterization = "density"
  config.model.score_flow.flow_type = "conditional"
  if default.is_tiny(arg):
    config = default.tiny(config)
  return config
