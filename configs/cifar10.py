"""The reference design's CIFAR-10 values: 3 channels, model_channels 256, 4 flows."""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.run_name = "cifar10"
  config.data.name = "cifar10"
  sf = config.model.score_flow
  sf.in_channels = 3
  sf.model_channels = 256
  sf.n_flows = 4
  config.model.conditioner.embed_dim = 512
  if default.is_tiny(arg):
    config = default.tiny(config)
    config.data.image_size = 32  # synthetic data shaped like CIFAR
    config.data.channels = 3
  return config
