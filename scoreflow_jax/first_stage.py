"""First stages: the map between data and the space diffusion runs in."""


class IdentityFirstStage:
  """sgm's IdentityFirstStage: diffusion runs on pixels (MNIST, CIFAR)."""

  def encode(self, x):
    return x

  def decode(self, z):
    return z


FIRST_STAGES = {"identity": IdentityFirstStage}


def get_first_stage(name: str):
  if name not in FIRST_STAGES:
    raise ValueError(f"unknown first stage {name!r}; choose one of "
                     f"{sorted(FIRST_STAGES)} (a KL autoencoder for latents is "
                     "not implemented yet)")
  return FIRST_STAGES[name]()
