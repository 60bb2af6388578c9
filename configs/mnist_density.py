"""MNIST with the exact-likelihood ScoreFlowNetwork.

The flow is a bijection of the image alone (sigma/class embeddings are context
of the coupling networks), its log-density is normalised, and the denoiser is
D = x + sigma^2 grad_x log q(x | sigma, c). Gives bits/dim
(bits_per_dim.py, scoreflow_jax/likelihood.py).

It trains with a little of its own exact bits/dim in the loss
(loss.nll_weight=0.003, at loss.nll_sigma 0.002) and log-scales bounded to
[-3, 3] per layer (max_log_scale=3), since session 41: at its 60,000 steps
5.21 bits/dim at sigma 0.002 (10k test images), FD 449 at 1k, 60% class
accuracy. Trained by the denoising loss alone (nll_weight=0,
max_log_scale=1, the config until then) it gave 10.4-11.3 bits/dim after
20,000 steps (two seeds) and the same samples as with the term; weights of
0.03 and up trade samples for bits/dim (4.23 and FD 831 at 1k with
nll_weight=1; docs/results.md, "A little of the likelihood costs nothing").
"""
from configs import default, mnist


def get_config(arg=None):
  config = mnist.get_config()
  config.run_name = "mnist-density"
  config.model.score_flow.parameterization = "density"
  config.model.score_flow.flow_type = "conditional"
  config.model.score_flow.max_log_scale = 3.0  # the term can use wider scales
  config.loss.nll_weight = 0.003               # exact bits/dim at loss.nll_sigma
  if default.is_tiny(arg):
    config = default.tiny(config)
  return config
