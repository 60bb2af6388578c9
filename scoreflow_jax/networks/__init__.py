"""Networks with sgm's signature ``(x_in, c_noise, cond) -> F``."""
from scoreflow_jax.networks.score_flow import ScoreFlowNetwork, timestep_embedding
from scoreflow_jax.networks.unet import UNetModel

__all__ = ["ScoreFlowNetwork", "UNetModel", "timestep_embedding"]
