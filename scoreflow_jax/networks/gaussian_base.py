"""A per-class Gaussian model of the data as the base of a flow energy.

For data with class mean m_c and covariance S_c ~ V diag(w) V^T + r (I - V V^T)
(the top ``rank`` principal directions V, their variances w, the mean variance
r of the others), the noisy data at noise level sigma is N(m_c, S_c + sigma^2 I)
and its exact posterior-mean denoiser is

    D_G(x) = m_c + V diag(w / (w + sigma^2)) V^T d + r / (r + sigma^2) (d - V V^T d),

d = x - m_c; D_G(x) = x + sigma^2 grad_x log N(x; m_c, S_c + sigma^2 I) exactly,
so it is the gradient of an energy. Slot ``n_classes`` holds the unconditional
model (all data), used where the class embedding was dropped.

The statistics are parameters of the module (so checkpoints and EMA carry them)
but never trained: they are read through ``stop_gradient`` and the optimizer
leaves them alone (train_step.make_optimizer(frozen=...)). They start as zeros
(D_G = 0) and are filled from the training set by :func:`fit` (the trainer does
this at the start of a new run).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODULE_NAME = "gaussian_stats"


class GaussianBase(nn.Module):
  """Per-slot Gaussian statistics: mean (S, D), basis (S, D, K), variances (S, K),
  residual (S,); S = n_classes + 1 slots, D features, K = rank."""
  slots: int
  rank: int

  def _stats(self, features: int):
    zeros = nn.initializers.zeros
    k = min(self.rank, features)
    get = lambda name, shape: jax.lax.stop_gradient(self.param(name, zeros, shape))
    return (get("mean", (self.slots, features)), get("basis", (self.slots, features, k)),
            get("variances", (self.slots, k)), get("residual", (self.slots,)))

  @nn.compact
  def __call__(self, x_flat, sigma, index):
    """(D_G(x) (B, D), log N(x; m, S + sigma^2 I) up to a constant in x (B,)).

    x_flat (B, D), sigma (B,), index (B,) int slot per sample."""
    mean, basis, variances, residual = self._stats(x_flat.shape[-1])
    m, w, r = mean[index], variances[index], residual[index]
    s2 = (sigma**2)[:, None]
    span, coords = _projections(basis, index, x_flat.dtype)  # V a, V^T a per sample
    d = x_flat - m
    proj = coords(d)
    rest = d - span(proj)                               # (I - V V^T) d
    r2 = r[:, None] + s2
    log_density = -0.5 * (jnp.sum(proj**2 / (w + s2), axis=-1)
                          + jnp.sum(rest**2, axis=-1) / r2[:, 0])
    # x + sigma^2 grad_x log_density, written out; for orthonormal V it is the
    # formula in the module doc, and it stays the exact gradient when V is
    # orthonormal only to float32 precision.
    grad = -(span(proj / (w + s2) - coords(rest) / r2) + rest / r2)
    return x_flat + s2 * grad, log_density


def fit(x, labels, n_classes: int, rank: int):
  """Statistics for :class:`GaussianBase` from data x (N, ...) and labels (N,).

  Returns {"mean", "basis", "variances", "residual"} as float32 numpy arrays
  with n_classes + 1 slots (the last: all data). A class without examples
  gets the all-data statistics.
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  labels = np.asarray(labels)
  d = x.shape[1]
  k = min(rank, d)
  out = {"mean": [], "basis": [], "variances": [], "residual": []}

  def add(xs):
    mean = xs.mean(0)
    w, v = np.linalg.eigh(np.cov(xs, rowvar=False).reshape(d, d))
    w, v = np.clip(w[::-1], 0.0, None), v[:, ::-1]  # largest first
    out["mean"].append(mean)
    out["basis"].append(v[:, :k])
    out["variances"].append(w[:k])
    out["residual"].append(w[k:].mean() if k < d else 0.0)

  for c in range(n_classes):
    add(x[labels == c] if np.sum(labels == c) > 1 else x)
  add(x)
  return {name: np.asarray(a, np.float32) for name, a in out.items()}


# Up to this many slots, every sample is projected on every slot's basis by one
# matrix product and its own slot is picked after; beyond it, each sample's basis
# is gathered. For MNIST's 11 slots the products are about 2x faster on a CPU
# (the gather reads B x D x K floats per product); both give the same numbers.
MAX_SLOTS_FOR_PRODUCTS = 64


def _projections(basis, index, dtype):
  """(span, coords): a -> V_b a (B, K) -> (B, D) and a -> V_b^T a (B, D) -> (B, K),
  with V_b = basis[index[b]]."""
  slots = basis.shape[0]
  if slots > MAX_SLOTS_FOR_PRODUCTS:
    v = basis[index]
    return (lambda a: jnp.einsum("bdk,bk->bd", v, a),
            lambda a: jnp.einsum("bdk,bd->bk", v, a))
  onehot = jax.nn.one_hot(index, slots, dtype=dtype)  # (B, S)
  return (lambda a: jnp.einsum("sdk,bsk->bd", basis, onehot[:, :, None] * a[:, None, :]),
          lambda a: jnp.einsum("bsk,bs->bk", jnp.einsum("sdk,bd->bsk", basis, a), onehot))
