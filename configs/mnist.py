"""The reference design's MNIST setup with the preconditioned energy (default).

python train.py --config configs/mnist.py
Offline: --config.data.source=offline --config.data.data_dir=/path/to/mnist_idx
Tiny smoke run: --config configs/mnist.py:tiny
"""
from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.run_name = "mnist"
  config.data.name = "mnist"
  sf = config.model.score_flow
  sf.in_channels = 1
  sf.model_channels = 128
  sf.n_flows = 3
  sf.activation = "softplus"
  sf.parameterization = "preconditioned"
  config.model.sigma_data = 0.5
  config.loss.sigma_data = 0.5
  config.model.conditioner.embed_dim = 512
  config.model.conditioner.n_classes = 10
  config.model.conditioner.ucg_rate = 0.2
  config.training.num_steps = 60_000     # about 40 minutes on a 2-core CPU
  config.training.image_every = 1000
  if default.is_tiny(arg):
    config = default.tiny(config)
  return config
