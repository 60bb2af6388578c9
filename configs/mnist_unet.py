"""configs/mnist.py with sgm's toy MNIST UNet (mnist_cond.yaml) as the network.

The UNet and the ClassEmbedder width (embed_dim = adm_in_channels = 128) are
sgm's; everything else is configs/mnist.py's. In particular sigma_data stays
0.5 for EDMScaling and EDMWeighting, where sgm's toy config uses 1.0, so that
the UNet and the flow networks differ only in the network.

python train.py --config configs/mnist_unet.py
Tiny smoke run: --config configs/mnist_unet.py:tiny
"""
from configs import default, mnist


def get_config(arg=None):
  config = mnist.get_config()
  config.run_name = "mnist_unet"
  config.model.network = "unet"
  unet = config.model.unet
  unet.in_channels = 1
  unet.model_channels = 32
  unet.num_res_blocks = 4
  unet.channel_mult = (1, 2, 2)
  unet.attention_resolutions = ()
  unet.num_head_channels = 32
  unet.num_groups = 32
  config.model.conditioner.embed_dim = 128
  if default.is_tiny(arg):
    config = default.tiny(config)
    unet = config.model.unet
    unet.model_channels = 8
    unet.num_res_blocks = 1
    unet.num_head_channels = 8
    unet.num_groups = 4
  return config
