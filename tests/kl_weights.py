"""Deterministic weights for sgm/ldm state dicts, shared by PyTorch and JAX.

Each tensor comes from its own generator seeded by (seed, crc32(name)), so its
values depend only on its state-dict name and shape: the PyTorch reference
(bench/make_kl_reference.py) and a port that maps its parameters to the same
names get identical weights without shipping them.
"""
import zlib

import numpy as np


def deterministic_state_dict(names_shapes, seed=0):
  """Returns {name: float64 array} for (name, shape) pairs in torch layouts.

  Conv (O, I, kH, kW) and linear (O, I) weights: normal / sqrt(fan_in) with
  fan_in = I * kH * kW; GroupNorm weights: 1 + 0.2 * normal; biases:
  0.1 * normal.
  """
  state = {}
  for name, shape in names_shapes:
    shape = tuple(int(d) for d in shape)
    normal = np.random.default_rng(
        [seed, zlib.crc32(name.encode())]).standard_normal(shape)
    if name.endswith(".bias"):
      state[name] = 0.1 * normal
    elif "norm" in name and len(shape) == 1 and name.endswith(".weight"):
      state[name] = 1.0 + 0.2 * normal
    elif name.endswith(".weight") and len(shape) in (2, 4):
      state[name] = normal / np.sqrt(np.prod(shape[1:]))
    else:
      raise ValueError(f"no init rule for {name} {shape}")
  return state
