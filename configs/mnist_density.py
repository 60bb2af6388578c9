"""MNIST with the exact-likelihood ScoreFlowNetwork.

The flow is a bijection of the image alone (sigma/class embeddings are context
of the coupling networks), its log-density is normalised, and the denoiser is
D = x + sigma^2 grad_x log q(x | sigma, c). Gives bits/dim
(scoreflow_jax/likelihood.py).

Trained by the denoising loss alone its likelihood is poor: 11.26 bits/dim
at sigma 0.002 after 20,000 steps (7.38 at 0.1), and 21.70 with
model.score_flow.max_log_scale=3. With the bits/dim as a training term,
--config.loss.nll_weight=1, it gets 5.98, and 4.23 with max_log_scale=3,
at the cost of its samples (FD 723 / 831 against 553 at 1k); nll_weight=0.1
with max_log_scale=3 gives 4.50 and FD 641 (session 40, docs/results.md
"Training the likelihood itself").
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
