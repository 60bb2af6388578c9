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
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODULE_NAME = "gaussian_stats"
_LOG_2PI = math.log(2 * math.pi)


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
    """(D_G(x) (B, D), log N(x; m, S + sigma^2 I) (B,), normalised).

    x_flat (B, D), sigma (B,), index (B,) int slot per sample."""
    mean, basis, variances, residual = self._stats(x_flat.shape[-1])
    features, rank = x_flat.shape[-1], basis.shape[-1]
    m, w, r = mean[index], variances[index], residual[index]
    s2 = (sigma**2)[:, None]
    span, coords = _projections(basis, index, x_flat.dtype)  # V a, V^T a per sample
    d = x_flat - m
    proj = coords(d)
    rest = d - span(proj)                               # (I - V V^T) d
    r2 = r[:, None] + s2
    log_density = -0.5 * (jnp.sum(proj**2 / (w + s2), axis=-1)
                          + jnp.sum(rest**2, axis=-1) / r2[:, 0]
                          + jnp.sum(jnp.log(w + s2), axis=-1)
                          + (features - rank) * jnp.log(r2[:, 0])
                          + features * _LOG_2PI)
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

# The base's products in full float32 everywhere: by default GPUs multiply
# float32 in TF32 and TPUs in bfloat16, and the mixture's log-densities are
# differences of large terms (|x - m|^2 / r by products, r small), whose
# rounding at TF32's 10 mantissa bits would move the responsibilities at small
# sigma. No change on CPUs, which multiply float32 in float32 anyway.
_EXACT = jax.lax.Precision.HIGHEST
_einsum = functools.partial(jnp.einsum, precision=_EXACT)
_matmul = functools.partial(jnp.matmul, precision=_EXACT)


def _projections(basis, index, dtype):
  """(span, coords): a -> V_b a (B, K) -> (B, D) and a -> V_b^T a (B, D) -> (B, K),
  with V_b = basis[index[b]]."""
  slots = basis.shape[0]
  if slots > MAX_SLOTS_FOR_PRODUCTS:
    v = basis[index]
    return (lambda a: _einsum("bdk,bk->bd", v, a),
            lambda a: _einsum("bdk,bd->bk", v, a))
  onehot = jax.nn.one_hot(index, slots, dtype=dtype)  # (B, S)
  return (lambda a: _einsum("sdk,bsk->bd", basis, onehot[:, :, None] * a[:, None, :]),
          lambda a: _einsum("bsk,bs->bk", _einsum("sdk,bd->bsk", basis, a), onehot))


class MixtureBase(nn.Module):
  """A mixture of ``components`` low-rank Gaussians per class as the base.

  Component j belongs to class j // components and is N(m_j, S_j) with
  S_j = V_j diag(w_j) V_j^T + r_j (I - V_j V_j^T) (``rank`` principal
  directions). Given the class c, the data is the mixture of c's components
  with weights pi_j = exp(log_weight_j); without it (slot ``n_classes``) the
  mixture of all components with weights p(c) pi_j, i.e. exactly the marginal
  of the class-conditional model. The posterior mean at noise level sigma is

      D_M(x) = sum_j gamma_j(x) D_j(x),
      gamma_j = softmax_j(log pi_j + log N(x; m_j, S_j + sigma^2 I)),

  D_j each component's Gaussian posterior mean: D_M = x + sigma^2 grad_x log p_sigma(x)
  exactly, with p_sigma the noisy mixture density. It is written out below as
  x + sigma^2 times the gradient of the log-density *as computed*, so it stays
  the exact gradient when V_j is orthonormal only to float32 precision.

  With one component per class this is the per-class Gaussian of
  :class:`GaussianBase` except for the unconditional slot (here the mixture of
  the classes, there one Gaussian of all data). Statistics as in GaussianBase:
  parameters, read through stop_gradient, frozen, filled by :func:`fit_mixture`.
  """
  n_classes: int
  components: int
  rank: int

  def _stats(self, features: int):
    zeros = nn.initializers.zeros
    m, k = self.n_classes * self.components, min(self.rank, features)
    get = lambda name, shape: jax.lax.stop_gradient(self.param(name, zeros, shape))
    return (get("mean", (m, features)), get("basis", (m, features, k)),
            get("variances", (m, k)), get("residual", (m,)),
            get("log_weight", (m,)), get("class_log_prior", (self.n_classes,)))

  @nn.compact
  def __call__(self, x_flat, sigma, index):
    """(D_M(x) (B, D), log p_sigma(x) (B,), normalised).

    x_flat (B, D), sigma (B,), index (B,) int: the class, n_classes = none."""
    mean, basis, variances, residual, log_weight, class_log_prior = self._stats(
        x_flat.shape[-1])
    features, rank = x_flat.shape[-1], basis.shape[-1]
    owner = np.arange(mean.shape[0]) // self.components       # class of each component
    s2 = (sigma**2)[:, None]                                  # (B, 1)
    # p_j = V_j^T (x - m_j) (B, M, K); |x - m_j|^2 (B, M) by products.
    proj = (_einsum("bd,mdk->bmk", x_flat, basis)
            - _einsum("md,mdk->mk", mean, basis)[None])
    dist2 = (jnp.sum(x_flat**2, -1, keepdims=True) - 2.0 * _matmul(x_flat, mean.T)
             + jnp.sum(mean**2, -1)[None])
    w2 = variances[None] + s2[:, :, None]                     # (B, M, K)
    r2 = residual[None] + s2                                  # (B, M)
    log_normal = -0.5 * (jnp.sum(proj**2 * (1.0 / w2 - 1.0 / r2[..., None]), -1)
                         + dist2 / r2 + jnp.sum(jnp.log(w2), -1)
                         + (features - rank) * jnp.log(r2) + features * _LOG_2PI)
    unconditional = (index == self.n_classes)[:, None]
    allowed = unconditional | (jnp.asarray(owner)[None] == index[:, None])
    prior = log_weight[None] + jnp.where(unconditional, class_log_prior[owner][None], 0.0)
    logits = jnp.where(allowed, prior + log_normal, -jnp.inf)
    log_density = jax.nn.logsumexp(logits, axis=-1)
    gamma = jnp.exp(logits - log_density[:, None])            # (B, M)
    # sigma^2 grad_x log_density = -sum_j gamma_j [V_j (a_j * p_j) + b_j (x - m_j)],
    # a_j = sigma^2 (1 / (w_j + sigma^2) - 1 / (r_j + sigma^2)), b_j = sigma^2 / (r_j + sigma^2).
    a = s2[:, :, None] * (1.0 / w2 - 1.0 / r2[..., None])
    b = gamma * s2 / r2
    step = (_einsum("bmk,mdk->bd", gamma[..., None] * a * proj, basis)
            + jnp.sum(b, -1, keepdims=True) * x_flat - _matmul(b, mean))
    return x_flat - step, log_density


# log-weight of an unused component: finite (EMA's shadow - param would be
# inf - inf with -inf) and far below any log-density difference.
EMPTY_LOG_WEIGHT = -1e30


def _kmeans(x, k, rng, iters=25):
  """Lloyd's k-means with k-means++ seeding; an emptied cluster is re-seeded at
  the point farthest from its centre. Returns assignments (N,)."""
  n = len(x)
  sq = np.sum(x**2, 1)
  centres = [x[rng.integers(n)]]
  nearest = np.sum((x - centres[0])**2, 1)
  for _ in range(k - 1):
    total = nearest.sum()  # 0 once every distinct point is a centre: any point
    centres.append(x[rng.choice(n, p=nearest / total if total > 0 else None)])
    nearest = np.minimum(nearest, np.sum((x - centres[-1])**2, 1))
  centres = np.array(centres)
  for _ in range(iters):
    dist = sq[:, None] - 2.0 * x @ centres.T + np.sum(centres**2, 1)[None]
    assign = dist.argmin(1)
    for j in range(k):
      members = assign == j
      if members.any():
        centres[j] = x[members].mean(0)
      else:
        far = int(dist[np.arange(n), assign].argmax())
        centres[j], assign[far] = x[far], j
  return assign


def fit_mixture(x, labels, n_classes: int, components: int, rank: int,
                min_residual: float = 1e-4, seed: int = 0,
                covariance_prior: float = 0.0, log=None, log_every_s: float = 10.0):
  """Statistics for :class:`MixtureBase` from data x (N, ...) and labels (N,).

  Each class is split into ``components`` clusters by k-means; each cluster
  gets its mean, its top ``rank`` principal directions and their variances,
  the mean variance of the other directions (every variance at least
  ``min_residual``) and the weight n_cluster / n_class. A class with fewer than 2 examples per
  component gets fewer components (the others get log-weight
  EMPTY_LOG_WEIGHT, i.e. weight 0); a class without examples is an error.
  Deterministic for a given ``seed``.

  ``covariance_prior`` = kappa > 0 shrinks each cluster's covariance towards
  its class's pooled within-cluster covariance P_c, as a conjugate prior worth
  kappa pseudo-observations: S_j = (X_j^T X_j + kappa P_c) / (n_j - 1 + kappa)
  (X_j the centred members), whose top ``rank`` eigenvectors and eigenvalues
  are then kept. With ~100 images per cluster in 784 dimensions the sample
  principal directions fit the training images' own deviations; the prior
  steadies them and lowers the held-out denoising loss, yet on MNIST it
  raised the samples' FD (docs/results.md), so 0 (off) is the default.
  Needs a d x d eigendecomposition per component (fine for MNIST's d = 784).
  ``log`` (optional) gets a line with the classes done and the ETA every
  ``log_every_s`` seconds (a fit takes 15-170 s on a 2-core CPU).
  """
  if covariance_prior < 0:
    raise ValueError(f"covariance_prior must be >= 0, got {covariance_prior}")
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  labels = np.asarray(labels)
  d = x.shape[1]
  k = min(rank, d)
  rng = np.random.default_rng(seed)
  counts = np.array([np.sum(labels == c) for c in range(n_classes)])
  if np.any(counts == 0):
    raise ValueError(f"fit_mixture: classes {np.flatnonzero(counts == 0).tolist()} "
                     "have no examples; every class needs at least one")
  m = n_classes * components
  out = {"mean": np.zeros((m, d)), "basis": np.zeros((m, d, k)),
         "variances": np.zeros((m, k)), "residual": np.full((m,), min_residual),
         "log_weight": np.full((m,), EMPTY_LOG_WEIGHT),
         "class_log_prior": np.log(counts / counts.sum())}
  t0 = last_log = time.perf_counter()
  for c in range(n_classes):
    now = time.perf_counter()
    if log is not None and c and now - last_log >= log_every_s:
      log(f"fitting the Gaussian base: {c}/{n_classes} classes | "
          f"ETA {(now - t0) / c * (n_classes - c):.0f} s")
      last_log = now
    xc = x[labels == c]
    used = max(1, min(components, len(xc) // 2))
    assign = _kmeans(xc, used, rng) if used > 1 else np.zeros(len(xc), int)
    if covariance_prior > 0:
      pooled = np.zeros((d, d))
      for j in range(used):
        centred = xc[assign == j] - xc[assign == j].mean(0)
        pooled += centred.T @ centred
      pooled /= max(len(xc) - used, 1)      # sum over clusters of (n_j - 1)
    for j in range(used):
      xs, slot = xc[assign == j], c * components + j
      centred = xs - xs.mean(0)
      if covariance_prior > 0:
        cov = ((centred.T @ centred + covariance_prior * pooled)
               / (len(xs) - 1 + covariance_prior))
        var, vecs = np.linalg.eigh(cov)
        var, vt = np.maximum(var[::-1], 0.0), vecs[:, ::-1].T
        total = np.trace(cov)
      else:
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        var = sv**2 / max(len(xs) - 1, 1)                    # nonzero eigenvalues
        total = np.sum(centred**2) / max(len(xs) - 1, 1)
      n_dirs = min(k, len(var))
      residual = (max((total - var[:n_dirs].sum()) / (d - n_dirs), min_residual)
                  if d > n_dirs else min_residual)
      # Fewer directions than ``rank`` (a small cluster): the missing ones get a
      # zero basis vector and the residual variance, which leaves the density
      # (quadratic form and normaliser) that of the n_dirs-direction model.
      top = np.full(k, residual)
      # floored like the residual: a cluster of one point, or of copies of one
      # point, has variance 0, and a component must stay a proper density
      top[:n_dirs] = np.maximum(var[:n_dirs], min_residual)
      basis = np.zeros((d, k))
      basis[:, :n_dirs] = vt[:n_dirs].T
      out["mean"][slot] = xs.mean(0)
      out["basis"][slot] = basis
      out["variances"][slot] = top
      out["residual"][slot] = residual
      out["log_weight"][slot] = np.log(len(xs) / len(xc))
  return {name: np.asarray(a, np.float32) for name, a in out.items()}
