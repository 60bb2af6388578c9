"""Networks with sgm's signature ``(x_in, c_noise, cond) -> F``."""
from scoreflow_jax.networks.score_flow import ScoreFlowNetwork, timestep_embedding

__all__ = ["ScoreFlowNetwork", "timestep_embedding"]
