"""Normalizing-flow bijections: affine couplings with exact log-determinants.

Each layer maps (B, D) -> (B, D) (the conv flow: (B, H, W, C) images) and
exposes ``forward_and_log_det`` and ``inverse_and_log_det`` (distrax's
bijector interface); ``log_det`` is log|det dy/dx| per sample, shape (B,).
Layers act on each sample alone (no batch statistics), so per-sample scores
from a summed energy are exact.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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


def bounded_log_scale(raw, max_log_scale: float = 1.0):
  """m tanh(raw / m): a smooth bound |log_s| < m (m = 1 is the reference's tanh)."""
  return max_log_scale * jnp.tanh(raw / max_log_scale)


class CouplingNet(nn.Module):
  """MLP a[, context] -> (log_s, t): two hidden layers, zero-initialised output.

  ``dtype`` is the matmul dtype (e.g. bfloat16 for mixed precision); the
  output is cast back to the input's dtype before tanh/exp.
  """
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0

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
    return bounded_log_scale(log_s, self.max_log_scale), t


class AffineCoupling(nn.Module):
  """y = reverse([a, b * exp(log_s(a)) + t(a)]) with a, b the two halves.

  ``a`` is the first ``D // 2`` features. The reversal (a permutation, log-det
  0) lets the next layer transform the other half. log_s = m tanh(raw / m)
  bounds the per-feature scale to [e^-m, e^m] (m = ``max_log_scale``, 1 in
  the reference design). ``context`` (B, K), if given, is an
  extra input of the coupling network only, so the map stays a bijection of
  x for each context (a conditional flow).
  """
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0

  def setup(self):
    self.net = CouplingNet(self.hidden, self.activation, self.dtype, self.max_log_scale)

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


def _check_flow(n_layers: int, max_log_scale: float):
  if n_layers < 1:
    raise ValueError(f"a flow needs n_layers >= 1, got {n_layers}")
  if not (math.isfinite(max_log_scale) and max_log_scale > 0):
    raise ValueError(f"max_log_scale must be finite and > 0, got {max_log_scale}")


def _compose(layers, x, context, inverse: bool):
  """Runs ``layers`` forward (or inverse, in reverse order); log-dets add."""
  log_det = jnp.zeros(x.shape[:1], x.dtype)
  for layer in (reversed(layers) if inverse else layers):
    x, ld = (layer.inverse_and_log_det if inverse else layer.forward_and_log_det)(x, context)
    log_det = log_det + ld
  return x, log_det


class CouplingFlow(nn.Module):
  """``n_layers`` affine couplings composed; log-dets add."""
  n_layers: int
  hidden: int
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0

  def setup(self):
    _check_flow(self.n_layers, self.max_log_scale)
    self.layers = [AffineCoupling(self.hidden, self.activation, self.dtype,
                                  self.max_log_scale)
                   for _ in range(self.n_layers)]

  def forward_and_log_det(self, x, context=None):
    return _compose(self.layers, x, context, inverse=False)

  def inverse_and_log_det(self, y, context=None):
    return _compose(self.layers, y, context, inverse=True)

  def to_input_order(self, z):
    """z (B, D) with its features in x's order: each coupling reverses them, so
    an odd number of layers leaves z reversed (a permutation, log-det 0). The
    flow composed with this is the identity at initialisation, which a base
    distribution other than N(0, I) needs."""
    return z[..., ::-1] if self.n_layers % 2 else z

  def __call__(self, x, context=None):
    return self.forward_and_log_det(x, context)


def squeeze(x):
  """Space-to-depth: (B, H, W, C) -> (B, H/2, W/2, 4C), a permutation (log-det 0)."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"the conv flow squeezes 2x2 blocks: image height and width "
                     f"must be even, got {h}x{w}")
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x):
  """Inverse of :func:`squeeze`: (B, h, w, 4C) -> (B, 2h, 2w, C)."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, 2, 2, c4 // 4)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c4 // 4)


def _partitions(channels: int, count: int):
  """``count`` channel halvings: identity first, then the distinct halvings
  (as unordered pairs) that seeded random permutations give, cycled if there
  are fewer than ``count`` (4 channels have 3)."""
  out, seen = [], set()
  seed = 0
  while len(out) < count and seed < 64 * count:
    perm = np.arange(channels) if seed == 0 else np.random.default_rng(seed).permutation(channels)
    first, second = np.sort(perm[:channels // 2]), np.sort(perm[channels // 2:])
    key = frozenset([tuple(first), tuple(second)])
    if key not in seen:
      seen.add(key)
      out.append((first, second))
    seed += 1
  return [out[k % len(out)] for k in range(count)]


def channel_split(channels: int, index: int):
  """(kept, transformed) channel indices of conv coupling ``index``.

  Couplings come in pairs over one halving of the channels (the second of a
  pair transforms what the first kept); each pair uses a different halving
  (:func:`_partitions`), so every channel is soon conditioned on every other
  (after a squeeze, the 4 pixels of each 2x2 block on each other). Fixed
  numpy indices: no parameters, no state.
  """
  first, second = _partitions(channels, index // 2 + 1)[index // 2]
  return (first, second) if index % 2 == 0 else (second, first)


class ConvCouplingNet(nn.Module):
  """CNN a, context -> (log_s, t) per pixel and channel; zero-initialised output.

  conv3x3 -> ``num_blocks`` residual blocks -> act -> conv3x3. A block is
  GroupNorm, act, conv3x3, FiLM by the context, GroupNorm, act, conv3x3; with
  ``scale_shift_norm`` the FiLM comes after the second GroupNorm (sgm's
  ResBlock with ``use_scale_shift_norm``: out_norm(h) * (1 + scale) + shift).
  Before it, that GroupNorm removes the part of the FiLM common to the
  channels of a group (constant over space, it is normalised away): all of
  it where a group holds one channel (a width of 8 or less), the mean over 3
  (width 24) or 8 (width 64) channels otherwise. The parameters are the same
  either way. GroupNorm is per sample, so samples stay independent and
  per-sample scores stay exact. With ``global_context`` the FiLM of each
  block also sees the block input's spatial mean (per sample), so every
  position gets the whole image's summary, not only its receptive field.
  """
  hidden: int
  num_blocks: int = 2
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0
  global_context: bool = False
  scale_shift_norm: bool = False

  @nn.compact
  def __call__(self, a, context, out_channels: int):
    act = get_activation(self.activation)
    conv = lambda n, **kw: nn.Conv(n, (3, 3), padding="SAME", dtype=self.dtype, **kw)
    groups = math.gcd(self.hidden, 8)
    h = conv(self.hidden)(a)
    for _ in range(self.num_blocks):
      r = conv(self.hidden)(act(nn.GroupNorm(groups, dtype=self.dtype)(h)))
      parts = [] if context is None else [context]
      if self.global_context:
        parts.append(jnp.mean(h, axis=(1, 2)).astype(a.dtype))  # (B, hidden)
      film = lambda r: r
      if parts:
        scale, shift = jnp.split(nn.Dense(2 * self.hidden, dtype=self.dtype)(
            jnp.concatenate(parts, axis=-1))[:, None, None, :], 2, axis=-1)
        film = lambda r, scale=scale, shift=shift: r * (1.0 + scale) + shift
      norm = nn.GroupNorm(groups, dtype=self.dtype)
      if self.scale_shift_norm:  # sgm: out_norm(h) * (1 + scale) + shift
        r = film(norm(r))
      else:  # the norm removes the FiLM's part common to a group's channels
        r = norm(film(r))
      r = conv(self.hidden)(act(r))
      h = h + r
    raw = conv(2 * out_channels, kernel_init=nn.initializers.zeros,
               bias_init=nn.initializers.zeros)(act(h))
    raw = raw.astype(a.dtype)
    log_s, t = jnp.split(raw, 2, axis=-1)
    return bounded_log_scale(log_s, self.max_log_scale), t


class ConvAffineCoupling(nn.Module):
  """Affine coupling on a fixed channel subset of a (B, h, w, C) image.

  y[kept] = x[kept]; y[moved] = x[moved] * exp(log_s) + t, with
  (log_s, t) = CNN(x[kept], context). Channel order is unchanged, so
  layers compose without permutations in between (see :func:`channel_split`).
  """
  index: int
  hidden: int
  num_blocks: int = 2
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0
  global_context: bool = False
  scale_shift_norm: bool = False

  def setup(self):
    self.net = ConvCouplingNet(self.hidden, self.num_blocks, self.activation, self.dtype,
                               self.max_log_scale, self.global_context,
                               self.scale_shift_norm)

  def _apply(self, x, context, sign):
    x = jnp.asarray(x)  # numpy input too (model init passes the batch as is)
    kept, moved = channel_split(x.shape[-1], self.index)
    log_s, t = self.net(x[..., kept], context, len(moved))
    b = x[..., moved]
    b = b * jnp.exp(log_s) + t if sign > 0 else (b - t) * jnp.exp(-log_s)
    y = x.at[..., moved].set(b)
    return y, sign * jnp.sum(log_s, axis=(1, 2, 3))

  def forward_and_log_det(self, x, context=None):
    return self._apply(x, context, 1)

  def inverse_and_log_det(self, y, context=None):
    return self._apply(y, context, -1)

  def __call__(self, x, context=None):
    return self.forward_and_log_det(x, context)


class ConvCouplingFlow(nn.Module):
  """A conditional flow of images: squeeze, ``n_layers`` conv couplings, unsqueeze.

  Maps (B, H, W, C) -> (B, H, W, C) for each context (B, K); the coupling
  CNNs see the image as an image (the MLP flow sees a flat vector).
  """
  n_layers: int
  hidden: int
  num_blocks: int = 2
  activation: str = "softplus"
  dtype: Optional[Any] = None
  max_log_scale: float = 1.0
  global_context: bool = False
  scale_shift_norm: bool = False

  def setup(self):
    _check_flow(self.n_layers, self.max_log_scale)
    self.layers = [ConvAffineCoupling(i, self.hidden, self.num_blocks,
                                      self.activation, self.dtype, self.max_log_scale,
                                      self.global_context, self.scale_shift_norm)
                   for i in range(self.n_layers)]

  def forward_and_log_det(self, x, context=None):
    h, log_det = _compose(self.layers, squeeze(x), context, inverse=False)
    return unsqueeze(h), log_det

  def inverse_and_log_det(self, y, context=None):
    h, log_det = _compose(self.layers, squeeze(y), context, inverse=True)
    return unsqueeze(h), log_det

  def to_input_order(self, z):
    """z unchanged: the couplings keep the channel order (see CouplingFlow's)."""
    return z

  def __call__(self, x, context=None):
    return self.forward_and_log_det(x, context)
