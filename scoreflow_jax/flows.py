"""Normalizing-flow bijections: affine couplings with exact log-determinants.

Each layer maps (B, D) -> (B, D) and exposes ``forward_and_log_det`` and
``inverse_and_log_det`` (distrax's bijector interface); ``log_det`` is
log|det dy/dx| per sample, shape (B,). Layers act on each sample alone (no
batch statistics), so per-sample scores from a summed energy are exact.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {
    "softplus": nn.softplus,
    "silu": nn.silu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "elu": nn.elu,
}


def get_activation(name: str):
  """Smooth activations only: the score's parameter gradient is second order."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of "
                     f"{sorted(ACTIVATIONS)} (smooth, so second derivatives exist)")
  return ACTIVATIONS[name]


class CouplingNet(nn.Module):
  """MLP a[, context] -> (log_s, t): two hidden layers, zero-initialised output.

  ``dtype`` is the matmul dtype (e.g. bfloat16 for mixed precision); the
  output is cast back to the input's dtype before tanh/exp.
  """
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, a, context, out_features: int):
    act = get_activation(self.activation)
    h = a if context is None else jnp.concatenate([a, context], axis=-1)
    h = act(nn.Dense(self.hidden, dtype=self.dtype)(h))
    h = act(nn.Dense(self.hidden, dtype=self.dtype)(h))
    raw = nn.Dense(2 * out_features, dtype=self.dtype,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros)(h)
    raw = raw.astype(a.dtype)
    log_s, t = jnp.split(raw, 2, axis=-1)
    return jnp.tanh(log_s), t


class AffineCoupling(nn.Module):
  """y = reverse([a, b * exp(log_s(a)) + t(a)]) with a, b the two halves.

  ``a`` is the first ``D // 2`` features. The reversal (a permutation, log-det
  0) lets the next layer transform the other half. log_s = tanh(raw) bounds
  the per-feature scale to [1/e, e]. ``context`` (B, K), if given, is an
  extra input of the coupling network only, so the map stays a bijection of
  x for each context (a conditional flow).
  """
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None

  def setup(self):
    self.net = CouplingNet(self.hidden, self.activation, self.dtype)

  def forward_and_log_det(self, x, context=None):
    na = x.shape[-1] // 2
    a, b = x[..., :na], x[..., na:]
    log_s, t = self.net(a, context, b.shape[-1])
    y = jnp.concatenate([a, b * jnp.exp(log_s) + t], axis=-1)
    return y[..., ::-1], jnp.sum(log_s, axis=-1)

  def inverse_and_log_det(self, y, context=None):
    y = y[..., ::-1]
    na = y.shape[-1] // 2
    a, y_b = y[..., :na], y[..., na:]
    log_s, t = self.net(a, context, y_b.shape[-1])
    x = jnp.concatenate([a, (y_b - t) * jnp.exp(-log_s)], axis=-1)
    return x, -jnp.sum(log_s, axis=-1)

  def __call__(self, x, context=None):
    return self.forward_and_log_det(x, context)


class CouplingFlow(nn.Module):
  """``n_layers`` affine couplings composed; log-dets add."""
  n_layers: int
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None

  def setup(self):
    if self.n_layers < 1:
      raise ValueError(f"a flow needs n_layers >= 1, got {self.n_layers}")
    self.layers = [AffineCoupling(self.hidden, self.activation, self.dtype)
                   for _ in range(self.n_layers)]

  def forward_and_log_det(self, x, context=None):
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for layer in self.layers:
      x, ld = layer.forward_and_log_det(x, context)
      log_det = log_det + ld
    return x, log_det

  def inverse_and_log_det(self, y, context=None):
    log_det = jnp.zeros(y.shape[:-1], y.dtype)
    for layer in reversed(self.layers):
      y, ld = layer.inverse_and_log_det(y, context)
      log_det = log_det + ld
    return y, log_det

  def __call__(self, x, context=None):
    return self.forward_and_log_det(x, context)
