"""MNIST with the reference design's own parameterization (x0 = x + sigma^2 score + score head)."""
from configs import default, mnist


def get_config(arg=None):
  config = mnist.get_config()
  config.run_name = "mnist-seed"
  config.model.score_flow.parameterization = "seed"
  config.model.score_flow.score_head = True
  if default.is_tiny(arg):
    config = default.tiny(config)
  return config
