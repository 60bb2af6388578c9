"""MNIST with the convolutional ScoreFlowNetwork (the better flow design).

The flow is a conditional flow of the image: squeeze to 14x14x4, then
``n_flows`` affine couplings on channel halves whose coupling networks are
small residual CNNs with FiLM by the sigma/class embedding. The energy is
log N(f(u); 0, I) + log|det df/du| and the denoiser is still preconditioned
and the exact gradient of an energy. Everything else is configs/mnist.py.
"""
from configs import default, mnist


def get_config(arg=None):
  config = mnist.get_config()
  config.run_name = "mnist-conv"
  sf = config.model.score_flow
  sf.flow_type = "conv"
  sf.n_flows = 8
  sf.conv_channels = 64
  sf.conv_blocks = 2
  if default.is_tiny(arg):
    config = default.tiny(config)
    config.model.score_flow.conv_channels = 8
    config.model.score_flow.conv_blocks = 1
  return config
