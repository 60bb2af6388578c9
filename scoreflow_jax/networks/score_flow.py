"""ScoreFlowNetwork: a denoiser that is the exact gradient of a flow energy.

A coupling flow maps h = [u_flat, sigma_emb, class_emb] to z and defines the
energy phi(u) = -||z||^2, u = c_in * x_noisy. Scores are ``jax.grad`` of the
summed energy (per-sample exact, since no layer mixes samples). Two ways to
turn the score into the network output F (the Denoiser then returns
D = c_skip x + c_out F):

* ``"seed"`` (the reference design): score = d phi / d x_noisy = c_in grad_u phi,
  optionally refined by a score head MLP(score, sigma_emb, class_emb);
  x0 = x_noisy + sigma^2 score and F = (x0 - c_skip x_noisy) / c_out, so the
  Denoiser gives back x0. This multiplies the network by sigma^2 / c_out and
  undoes EDM's preconditioning; it trains poorly.
* ``"preconditioned"`` (default): F = grad_u phi(u), so
  D = c_skip x + c_out grad_u phi(c_in x). D is still x + sigma^2 grad_x E for
  the energy E(x) = -(1 - c_skip)|x|^2 / (2 sigma^2)
  + c_out / (sigma^2 c_in) phi(c_in x), which :meth:`energy` returns.
* ``"density"`` (exact likelihood, needs ``flow_type="conditional"`` or
  ``"conv"``): the
  flow is a bijection of u alone, its coupling networks take [sigma_emb,
  class_emb] as context, and phi(u) = log N(f(u); 0, I) + log|det df/du| is a
  normalised log-density. The energy is log q(x | sigma, c) = phi(c_in x) +
  D log c_in (normalised in x) and D = x + sigma^2 grad_x log q exactly
  (Tweedie). With the identity flow at initialisation, q = N(0, (sigma^2 +
  sd^2) I) and D = c_skip x: EDM's denoiser for data N(0, sd^2 I).
  With ``gaussian_base`` the flow's base is the fitted Gaussian (mixture) of
  the data noised at sigma instead of N(0, I): log q(x | sigma, c) =
  log p_sigma(f(c_in x) / c_in | c) + log|det df/du|, still normalised, and at
  initialisation q is that noisy Gaussian (mixture) and D its exact posterior
  mean.

Flow types: ``"joint"`` (the reference design: an MLP coupling flow over
[u_flat, context]), ``"joint_context"`` (the same flow and energy, the
context also fed to every coupling network), ``"conditional"`` (the MLP flow over u_flat, context fed
to the coupling networks) and ``"conv"`` (a conditional flow of the image
whose coupling networks are CNNs with FiLM context, flows.ConvCouplingFlow).
The conditional flows use phi = log N(f(u); 0, I) + log|det df/du|.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from scoreflow_jax.edm import append_dims, edm_scaling
from scoreflow_jax.flows import ConvCouplingFlow, CouplingFlow, get_activation
from scoreflow_jax.networks import gaussian_base as gaussian_lib

PARAMETERIZATIONS = ("preconditioned", "seed", "density")
FLOW_TYPES = ("joint", "joint_context", "conditional", "conv")
# the parameterizations a gaussian_base can serve (see ScoreFlowNetwork.gaussian_base)
BASE_PARAMETERIZATIONS = ("preconditioned", "density")
JOINT = ("joint", "joint_context")


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """sgm's sinusoidal embedding: [cos(t f), sin(t f)], f_k = max_period^(-k/half).

  t: (B,) -> (B, dim); an odd ``dim`` gets one zero column, as in sgm.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  args = t[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class EmbedMLP(nn.Module):
  """Dense(hidden) -> act -> Dense(out): sgm's time_embed / label_emb blocks."""
  hidden: int
  out: int
  activation: str = "silu"

  @nn.compact
  def __call__(self, x):
    h = get_activation(self.activation)(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(h)


class ScoreHead(nn.Module):
  """The reference design's score_enhanced MLP: [score, context] -> score."""
  hidden: int
  activation: str = "softplus"

  @nn.compact
  def __call__(self, h, out_features: int):
    h = get_activation(self.activation)(nn.Dense(self.hidden)(h))
    return nn.Dense(out_features)(h)


class EnergyWeights(nn.Module):
  """a = 1 + Dense(context): per-feature weights of |z|^2, all 1 at initialisation."""

  @nn.compact
  def __call__(self, context, features: int):
    return 1.0 + nn.Dense(features, kernel_init=nn.initializers.zeros,
                          bias_init=nn.initializers.zeros)(context)


class EnergyLinear(nn.Module):
  """b = Dense(context), zero at initialisation: the coefficients of <b, u>."""

  @nn.compact
  def __call__(self, context, features: int):
    return nn.Dense(features, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros)(context)


class ScoreFlowNetwork(nn.Module):
  """The reference design's ScoreFlowNetwork, in sgm's network signature.

  Attributes:
    in_channels: image channels (1 for MNIST, 3 for CIFAR, 4 for SD latents).
    model_channels: width of the embeddings and coupling MLPs.
    n_flows: number of affine coupling layers.
    activation: smooth activation of the coupling MLPs and the score head.
    num_classes: if not None, ``cond["vector"]`` is embedded (label_emb).
    sigma_data: EDM's sigma_data, used to recover the scalings from c_noise.
    parameterization: "preconditioned" (default) or "seed" (see module doc).
    score_head: "seed" only: refine the score with an MLP (reference design);
      it makes D non-conservative, so :meth:`score` ignores it.
    dtype: matmul dtype of the coupling networks (bfloat16 for mixed
      precision); parameters and the energy stay in the input's dtype.
    flow_type: "joint" (the reference design: the flow runs over [u, context]),
      "joint_context" (the same, the context also an input of every coupling
      network: in "joint" the first coupling never sees it),
      "conditional" (over u only, context fed to the coupling networks) or
      "conv" (over the image u, CNN coupling networks with FiLM context).
    conv_channels: "conv" only: width of the coupling CNNs.
    conv_blocks: "conv" only: residual blocks per coupling CNN.
    conv_global: "conv" only: each residual block's FiLM also sees the
      spatial mean of its input (a global summary of the image per sample).
    conv_scale_shift_norm: "conv" only: FiLM after the block's second
      GroupNorm, as sgm's use_scale_shift_norm (False: before it, where the
      norm removes the FiLM's part common to a group's channels; see
      ``flows.ConvCouplingNet``).
    max_log_scale: bound m of each coupling's log-scale, m tanh(raw / m)
      (1: the reference design's tanh, scales in [1/e, e] per layer).
    energy_scale: multiply phi by exp(tau(sigma, class)), tau a learnt linear
      function of the context (zero at initialisation): a per-noise-level
      temperature. Constant in x, so the score stays exact; not with
      "density" (it would break the normalisation).
    energy_weights: signed per-feature weights of the energy: -sum_k a_k z_k^2
      (joint) or -sum_k a_k z_k^2 / 2 + log|det| (conditional, conv), with
      a = 1 + W context (zero-initialised, so the reference energy at the
      start, and any sign): lets the energy curve upwards along some
      directions, which -|z|^2 of a near-linear flow cannot (see
      docs/results.md). Constant in x: the score stays exact. Not with
      "density".
    energy_linear: add a learnt linear term <b(sigma, class), u> to phi
      (b a zero-initialised linear function of the context, one entry per
      pixel). At high noise the ideal F is nearly constant in u (about the
      class mean / sigma_data), which -|f(u)|^2 reaches only through huge
      translations inside the flow; with this term the energy has it
      directly. Its gradient b is constant in x: the score stays exact. Not
      with "density".
    gaussian_base: "preconditioned" or "density". "preconditioned": the denoiser is the exact
      posterior mean D_G of a per-class Gaussian model of the data
      (networks/gaussian_base.py; statistics fitted to the training set,
      never trained) plus c_out times the gradient of a *residual* flow
      energy phi(u) - phi_identity(u), which is zero at initialisation: the
      model starts at the best linear denoiser per class and the flow learns
      the correction. D = x + sigma^2 grad_x E still holds exactly, with
      E = log N(x; m_c, S_c + sigma^2 I) + c_out / (sigma^2 c_in) phi_res.
      Needs ``cond["class_index"]`` (the conditioner's ``class_index=True``).
      Classifier-free guidance at every sigma degrades its samples badly above
      scale 2; guide only at sigma > 2 (sample.py --cfg_interval 2,80), as
      measured in docs/results.md.
    gaussian_rank: principal directions per class in the Gaussian base (per
      component with ``gaussian_components`` > 1).
    gaussian_components: with ``gaussian_base``, a mixture of this many
      low-rank Gaussians per class (networks/gaussian_base.MixtureBase: k-means
      clusters of each class, fitted when a run starts, never trained); D_G
      is then the mixture's exact posterior mean and E's base term the log of
      its noisy density. 1: one Gaussian per class (GaussianBase).
      "density": the normalised noisy density of that model is the flow's
      base distribution (see the module doc), so the flow starts at the
      model's exact posterior mean and log q stays exactly normalised.
  """
  in_channels: int = 1
  model_channels: int = 128
  n_flows: int = 3
  activation: str = "softplus"
  num_classes: Optional[int] = 10
  sigma_data: float = 0.5
  parameterization: str = "preconditioned"
  score_head: bool = True
  dtype: Optional[Any] = None
  flow_type: str = "joint"
  conv_channels: int = 64
  conv_blocks: int = 2
  conv_global: bool = False
  conv_scale_shift_norm: bool = False
  max_log_scale: float = 1.0
  energy_scale: bool = False
  energy_weights: bool = False
  energy_linear: bool = False
  gaussian_base: bool = False
  gaussian_rank: int = 64
  gaussian_components: int = 1

  def setup(self):
    if self.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {self.parameterization!r}; "
                       f"choose one of {PARAMETERIZATIONS}")
    if self.flow_type not in FLOW_TYPES:
      raise ValueError(f"unknown flow_type {self.flow_type!r}; choose one of "
                       f"{FLOW_TYPES}")
    if self.parameterization == "density" and self.flow_type in JOINT:
      raise ValueError("parameterization='density' needs flow_type='conditional' "
                       "or 'conv' (a joint flow over [x, embeddings] has no "
                       "normalised density of x)")
    if self.parameterization == "density" and (
        self.energy_scale or self.energy_weights or self.energy_linear):
      raise ValueError("energy_scale / energy_weights / energy_linear are not allowed with "
                       "parameterization='density': they break the normalisation")
    if self.gaussian_base and self.parameterization not in BASE_PARAMETERIZATIONS:
      raise ValueError("gaussian_base needs parameterization='preconditioned' or "
                       f"'density', got {self.parameterization!r}")
    if self.gaussian_base and (self.num_classes is None or self.gaussian_rank < 1
                               or self.gaussian_components < 1):
      raise ValueError("gaussian_base needs num_classes, gaussian_rank >= 1 and "
                       "gaussian_components >= 1")
    if self.sigma_data <= 0:
      raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
    if self.n_flows < 1:
      raise ValueError(f"n_flows must be >= 1, got {self.n_flows}")
    get_activation(self.activation)
    mc = self.model_channels
    self.time_embed = EmbedMLP(4 * mc, mc, "silu")
    if self.num_classes is not None:
      self.label_emb = EmbedMLP(4 * mc, mc, "silu")
    if self.flow_type == "conv":
      self.flow = ConvCouplingFlow(self.n_flows, self.conv_channels, self.conv_blocks,
                                   self.activation, self.dtype, self.max_log_scale,
                                   self.conv_global, self.conv_scale_shift_norm)
    else:
      self.flow = CouplingFlow(self.n_flows, mc, self.activation, self.dtype,
                               self.max_log_scale)
    if self.energy_scale:
      self.temperature = nn.Dense(1, kernel_init=nn.initializers.zeros,
                                  bias_init=nn.initializers.zeros)
    if self.energy_weights:
      self.weight_net = EnergyWeights()
    if self.energy_linear:
      self.linear_net = EnergyLinear()
    if self.parameterization == "seed" and self.score_head:
      self.head = ScoreHead(4 * mc, self.activation)
    if self.gaussian_base:
      base = (gaussian_lib.GaussianBase(self.num_classes + 1, self.gaussian_rank)
              if self.gaussian_components == 1 else
              gaussian_lib.MixtureBase(self.num_classes, self.gaussian_components,
                                       self.gaussian_rank))
      setattr(self, gaussian_lib.MODULE_NAME, base)

  def _context(self, c_noise, cond):
    """[sigma_emb, class_emb], (B, 2 mc) (or (B, mc) without classes)."""
    embs = [self.time_embed(timestep_embedding(c_noise, self.model_channels))]
    if self.num_classes is not None:
      if cond is None or "vector" not in cond:
        raise ValueError("ScoreFlowNetwork(num_classes != None) needs "
                         "cond['vector'] from the conditioner")
      embs.append(self.label_emb(cond["vector"]))
    return jnp.concatenate(embs, axis=-1)

  def _flow_z(self, flow, u, context):
    """The flow's output z, flattened (B, features), and log|det dz/du| (B,).

    "joint*": z of [u_flat, context] (the log-det is not part of its energy);
    "conditional": z of u_flat; "conv": z of the image u."""
    u_flat = u.reshape(u.shape[0], -1)
    if self.flow_type in JOINT:
      z, log_det = flow.forward_and_log_det(
          jnp.concatenate([u_flat, context], -1),
          context if self.flow_type == "joint_context" else None)
    else:
      z, log_det = flow.forward_and_log_det(u if self.flow_type == "conv" else u_flat,
                                            context)
    return z.reshape(z.shape[0], -1), log_det

  def _phi(self, flow, u, context, weights=None, linear=None, base=None):
    """The flow energy per sample (B,) of u (B, H, W, C).

    ``weights`` (B, features of z) replaces the unit weights of |z|^2;
    ``linear`` (B, H W C) adds <linear, u>; ``base`` (a function z_flat ->
    log-density (B,), :meth:`_density_base`) replaces N(0, I) as the
    flow's base distribution."""
    z, log_det = self._flow_z(flow, u, context)
    if base is not None:  # (the order in which the identity flow is the identity)
      phi = base(flow.to_input_order(z)) + log_det
    else:
      sq = jnp.sum((1.0 if weights is None else weights) * z**2, axis=-1)
      phi = (-sq if self.flow_type in JOINT else
             -0.5 * sq - 0.5 * z.shape[-1] * math.log(2 * math.pi) + log_det)
    if linear is not None:
      phi = phi + jnp.sum(linear * u.reshape(u.shape[0], -1), axis=-1)
    if self.gaussian_base and self.parameterization == "preconditioned":
      # the residual energy: minus the identity flow's
      sq_u = jnp.sum(u.reshape(u.shape[0], -1) ** 2, axis=-1)
      phi = phi + (sq_u if self.flow_type in JOINT else 0.5 * sq_u)
    return phi

  def _gaussian(self, x_noisy, sigma, cond):
    """The Gaussian base's (D_G (x's shape), log-density (B,)) at x_noisy."""
    if cond is None or "class_index" not in cond:
      raise ValueError("gaussian_base needs cond['class_index'] (build the "
                       "conditioner with class_index=True)")
    flat = x_noisy.reshape(x_noisy.shape[0], -1)
    den, log_density = getattr(self, gaussian_lib.MODULE_NAME)(
        flat, sigma, cond["class_index"])
    return den.reshape(x_noisy.shape), log_density

  def _density_base(self, sigma, cond, c_in):
    """"density" with ``gaussian_base``: the flow's base log-density in u's units,
    z_flat (B, D) -> log p_sigma(z / c_in | c) - D log c_in (B,), normalised;
    None otherwise (the base is N(0, I)). c_in: EDM's c_in, any shape with B first."""
    if not (self.gaussian_base and self.parameterization == "density"):
      return None
    if cond is None or "class_index" not in cond:
      raise ValueError("gaussian_base needs cond['class_index'] (build the "
                       "conditioner with class_index=True)")
    module, index = getattr(self, gaussian_lib.MODULE_NAME), cond["class_index"]
    c_in = c_in.reshape(c_in.shape[0], -1)[:, :1]  # (B, 1)

    def log_density(z_flat):
      return (module(z_flat / c_in, sigma, index)[1]
              - z_flat.shape[-1] * jnp.log(c_in[:, 0]))
    return log_density

  def _energy_weights(self, u, context):
    """1 + W context (B, features of z), or None without ``energy_weights``."""
    if not self.energy_weights:
      return None
    features = math.prod(u.shape[1:])
    if self.flow_type in JOINT:  # z also has the context's features
      features += context.shape[-1]
    return self.weight_net(context, features)

  def _energy_linear(self, u, context):
    """b(context) (B, H W C) of the linear term, or None without ``energy_linear``."""
    if not self.energy_linear:
      return None
    return self.linear_net(context, math.prod(u.shape[1:]))

  def _energy_scale(self, context):
    """exp(tau(context)) (B,), or None without ``energy_scale``."""
    if not self.energy_scale:
      return None
    return jnp.exp(self.temperature(context)[:, 0])

  def _phi_and_grad(self, u, context, base=None):
    """phi(u) (B,) and grad_u phi (u's shape), the gradient by jax.grad."""
    weights = self._energy_weights(u, context)
    linear = self._energy_linear(u, context)

    def summed_phi(flow, u):
      phi = self._phi(flow, u, context, weights, linear, base)
      return jnp.sum(phi), phi

    (_, phi), grad = nn.value_and_grad(summed_phi, self.flow, u, has_aux=True)
    grad = grad[0]
    scale = self._energy_scale(context)
    if scale is not None:  # constant in u: grad(scale phi) = scale grad(phi)
      phi, grad = scale * phi, append_dims(scale, u.ndim) * grad
    return phi, grad

  def __call__(self, x_in, c_noise, cond):
    """sgm network call: x_in = c_in x_noisy (B, ...), c_noise (B,) -> F."""
    context = self._context(c_noise, cond)
    sigma = jnp.exp(c_noise / 0.25)
    c_skip, c_out, c_in, _ = edm_scaling(append_dims(sigma, x_in.ndim), self.sigma_data)
    _, grad_u = self._phi_and_grad(x_in, context, self._density_base(sigma, cond, c_in))
    if self.parameterization == "preconditioned" and self.gaussian_base:
      # F = (D_G - c_skip x) / c_out + grad_u phi_res
      x_noisy = x_in / c_in
      den, _ = self._gaussian(x_noisy, sigma, cond)
      return (den - c_skip * x_noisy) / c_out + grad_u
    if self.parameterization == "preconditioned":
      return grad_u
    # "seed" and "density": x0 = x_noisy + sigma^2 score, returned as F.
    score = c_in * grad_u
    if self.parameterization == "seed" and self.score_head:
      flat = score.reshape(score.shape[0], -1)
      flat = self.head(jnp.concatenate([flat, context], -1), flat.shape[-1])
      score = flat.reshape(score.shape)
    x_noisy = x_in / c_in
    x0 = x_noisy + append_dims(sigma, x_in.ndim) ** 2 * score
    return (x0 - x_noisy * c_skip) / c_out

  def _scalings(self, x_noisy, sigma):
    return edm_scaling(append_dims(sigma, x_noisy.ndim), self.sigma_data)

  def energy(self, x_noisy, sigma, cond):
    """The energy whose x-gradient is :meth:`score`, per sample (B,).

    "seed": phi(c_in x). "preconditioned": -(1 - c_skip)|x|^2 / (2 sigma^2)
    + c_out / (sigma^2 c_in) phi(c_in x), so that the denoiser is exactly
    x + sigma^2 grad_x E. "density": log q(x | sigma, c), normalised.
    """
    c_skip, c_out, c_in, c_noise = self._scalings(x_noisy, sigma)
    context = self._context(c_noise.reshape(sigma.shape), cond)
    u = c_in * x_noisy
    phi = self._phi(self.flow, u, context, self._energy_weights(u, context),
                    self._energy_linear(u, context), self._density_base(sigma, cond, c_in))
    scale = self._energy_scale(context)
    if scale is not None:
      phi = scale * phi
    flat = lambda a: a.reshape(a.shape[0], -1)[:, 0]
    if self.parameterization == "seed":
      return phi
    if self.parameterization == "density":
      d = math.prod(x_noisy.shape[1:])
      return phi + d * jnp.log(flat(c_in))
    if self.gaussian_base:
      base = self._gaussian(x_noisy, sigma, cond)[1]
    else:
      sq = jnp.sum(x_noisy.reshape(x_noisy.shape[0], -1) ** 2, axis=-1)
      base = -(1.0 - flat(c_skip)) * sq / (2.0 * sigma**2)
    return base + flat(c_out) / (sigma**2 * flat(c_in)) * phi

  def log_prob(self, x, sigma, cond):
    """log q(x | sigma, c), (B,): exact, one forward pass ("density" only)."""
    if self.parameterization != "density":
      raise ValueError("log_prob needs parameterization='density' (a normalised "
                       f"flow density); this network is {self.parameterization!r}")
    return self.energy(x, sigma, cond)

  def score(self, x_noisy, sigma, cond):
    """grad_x energy(x, sigma, cond), exact (jax.grad, no score head)."""
    c_skip, c_out, c_in, c_noise = self._scalings(x_noisy, sigma)
    context = self._context(c_noise.reshape(sigma.shape), cond)
    _, grad_u = self._phi_and_grad(c_in * x_noisy, context,
                                   self._density_base(sigma, cond, c_in))
    if self.parameterization in ("seed", "density"):
      return c_in * grad_u
    sigma_b = append_dims(sigma, x_noisy.ndim)
    base = (self._gaussian(x_noisy, sigma, cond)[0] if self.gaussian_base
            else c_skip * x_noisy)
    return (base + c_out * grad_u - x_noisy) / sigma_b**2
