"""The diffusion model as one object: first stage, conditioner, network, denoiser.

Parameters are one pytree ``{"conditioner": ..., "network": ...}``; every
method is a pure function of them, so it can be jitted, sharded and
differentiated like any JAX function.
"""
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoreflow_jax import conditioner as conditioner_lib
from scoreflow_jax import first_stage as first_stage_lib
from scoreflow_jax import loss as loss_lib
from scoreflow_jax.denoiser import denoise
from scoreflow_jax.networks import ScoreFlowNetwork, UNetModel
from scoreflow_jax.networks import gaussian_base as gaussian_lib

NETWORKS = ("score_flow", "unet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def fold_keys(keys, stream: int):
  """(B,) keys, each folded with ``stream``: one of a per-sample key's
  independent streams (per_sample_loss: 2 the posterior draw, 3 the NLL term's
  dequantisation, 4 its sigma, 5 its noise; likelihood.bits_per_dim: 1)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  network: nn.Module
  conditioner: conditioner_lib.GeneralConditioner
  first_stage: Any
  sigma_data: float
  loss_type: str = "l2"
  loss_sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2
  # weight of the exact negative log-likelihood term (bits/dim of dequantised
  # 8-bit data under q(x | nll_sigma, c)) added to each sample's loss; 0: none
  nll_weight: float = 0.0
  nll_sigma: float = 0.002
  # > nll_sigma: each sample's term is at its own sigma, log-uniform over
  # [nll_sigma, nll_sigma_max] (drawn from the sample's key); 0: nll_sigma alone
  nll_sigma_max: float = 0.0
  # score the noised data, x0 + u + sigma * eps, the points q(. | sigma, c)
  # models, instead of the clean x0 + u (False: bits_per_dim.py's bound)
  nll_noisy: bool = False
  # name of a parameter submodule that is never trained (the optimizer leaves
  # it alone: train_step.make_optimizer(frozen=...)), or None
  frozen_module: Optional[str] = None

  def init(self, key, batch):
    """Parameters for a batch like ``{"jpg": (B, H, W, C), "cls": (B,)}``."""
    k_cond, k_net = jax.random.split(key)
    cond_params = self.conditioner.init(k_cond, batch)
    cond = self.conditioner.apply(cond_params, batch)
    images = jnp.asarray(batch["jpg"])
    x = jnp.zeros(images.shape[:1] + self.first_stage.latent_shape(images.shape[1:]),
                  images.dtype)
    sigma = jnp.ones((x.shape[0],), x.dtype)
    net_params = self.network.init(k_net, x, jnp.log(sigma), cond)
    return {"conditioner": cond_params["params"], "network": net_params["params"]}

  def condition(self, params, batch, key=None, force_zero_embeddings=()):
    return self.conditioner.apply({"params": params["conditioner"]}, batch,
                                  key, force_zero_embeddings)

  def unconditional(self, params, batch, force_uc_zero_embeddings=("cls",)):
    """``(cond, uncond)`` for sampling, sgm's MNIST choice of zero embeddings."""
    return self.conditioner.apply(
        {"params": params["conditioner"]}, batch,
        force_uc_zero_embeddings=force_uc_zero_embeddings, method="unconditional")

  def denoiser(self, params):
    """``D(x, sigma, cond)`` with EDM preconditioning."""
    net = lambda x_in, c_noise, cond: self.network.apply(
        {"params": params["network"]}, x_in, c_noise, cond)
    return lambda x, sigma, cond: denoise(net, x, sigma, cond, self.sigma_data)

  def per_sample_loss(self, params, batch, keys, first_stage_params=None,
                      terms=False):
    """Training loss (B,) and sigma (B,) with one typed key per sample.

    The loss is the EDM denoising loss plus, with ``nll_weight`` > 0, that
    weight times the exact bits/dim of the dequantised batch
    (:meth:`dequantized_bits_per_dim`). ``terms=True`` also returns a dict of
    the parts, (B,) each: ``"diffusion"`` and, with the NLL term,
    ``"bits_per_dim"`` (what the train step logs) and ``"nll_sigma"``, the
    noise level of each sample's density in that term.

    Each sample's key gives its sigma, its noise, its label dropout and (with
    a KL first stage) its posterior draw, so the result for a global batch
    does not depend on how it is sharded. ``batch`` holds images (``"jpg"``)
    or, for a KL first stage, their cached posterior parameters
    (``"moments"``, ``first_stage.dataset_moments``): the same latents'
    distribution, without running the encoder. ``first_stage_params``: the first
    stage's frozen parameters (``self.first_stage.params`` when None, which
    a jitted caller would compile in as constants: the train step passes
    them as an argument).
    """
    # A third stream for the posterior draw; the identity stage draws nothing,
    # so pixel-space runs keep the keys they always had.
    draw_keys = fold_keys(keys, 2)
    if "moments" in batch:  # a KL first stage's cached posterior parameters
      if not hasattr(self.first_stage, "encode_moments"):
        raise ValueError("the batch holds 'moments' (a KL first stage's cached "
                         "posterior parameters) but this model's first stage is "
                         f"{type(self.first_stage).__name__}: give it 'jpg' images")
      x0 = self.first_stage.encode_moments(batch["moments"], draw_keys)
    else:
      if not jnp.issubdtype(jnp.asarray(batch["jpg"]).dtype, jnp.floating):
        raise ValueError(f"batch['jpg'] must be float images in [-1, 1] (data."
                         f"to_model_batch makes them from uint8), got "
                         f"{jnp.asarray(batch['jpg']).dtype}")
      if first_stage_params is None:
        first_stage_params = self.first_stage.params
      x0 = self.first_stage.encode(first_stage_params, batch["jpg"], draw_keys)
    x0 = jax.lax.stop_gradient(x0)
    sub = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    cond = self.condition(params, batch, sub[:, 0])
    sigma, noise = loss_lib.per_sample_sigma_and_noise(
        sub[:, 1], x0.shape, x0.dtype, self.p_mean, self.p_std)
    den = self.denoiser(params)
    per_sample = loss_lib.diffusion_loss(
        lambda x, s: den(x, s, cond), x0, sigma, noise, self.loss_type,
        self.loss_sigma_data)
    parts = {"diffusion": per_sample}
    if self.nll_weight:
      nll_keys = fold_keys(keys, 3)
      parts["nll_sigma"] = self.nll_sigmas(keys, x0.dtype)
      noise_keys = fold_keys(keys, 5) if self.nll_noisy else None
      parts["bits_per_dim"] = self.dequantized_bits_per_dim(
          params, x0, cond, nll_keys, parts["nll_sigma"], noise_keys)
      per_sample = per_sample + self.nll_weight * parts["bits_per_dim"]
    return (per_sample, sigma, parts) if terms else (per_sample, sigma)

  def nll_sigmas(self, keys, dtype=jnp.float32):
    """(B,) noise levels of the NLL term, one per sample key: ``nll_sigma``, or
    log-uniform over [nll_sigma, nll_sigma_max] from the key's fourth stream
    (fold_in(k, 4)) when ``nll_sigma_max`` > ``nll_sigma``."""
    if self.nll_sigma_max <= self.nll_sigma:
      return jnp.full((keys.shape[0],), self.nll_sigma, dtype)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), dtype))(fold_keys(keys, 4))
    lo, hi = math.log(self.nll_sigma), math.log(self.nll_sigma_max)
    return jnp.exp(lo + u * (hi - lo))

  def dequantized_bits_per_dim(self, params, x0, cond, keys, sigma, noise_keys=None):
    """-log2 q(x0 + u | sigma, cond) / D + log2 127.5, (B,): x0 are 8-bit images
    p / 127.5 - 1 and u is uniform over pixel p's bin, one draw per sample from
    its key: the bound bits_per_dim.py reports (likelihood.bits_per_dim calls
    this), exact in one forward pass; a parameterization='density' network only.
    ``sigma``: one noise level, or (B,), one per image. ``noise_keys`` (B,):
    score x0 + u + sigma * eps instead, eps ~ N(0, I) from these keys (the
    noisy data whose density q(. | sigma) models; the loss's ``nll_noisy``)."""
    u = jax.vmap(lambda k: jax.random.uniform(k, x0.shape[1:], x0.dtype))(keys)
    x = x0 + (u - 0.5) / 127.5
    s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    if noise_keys is not None:
      eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(noise_keys)
      x = x + s.reshape((-1,) + (1,) * (x.ndim - 1)) * eps
    log_q = self.network.apply({"params": params["network"]}, x, s, cond,
                               method="log_prob")
    return loss_lib.bits_per_dim(log_q, math.prod(x.shape[1:]))


def _build_unet(u) -> UNetModel:
  """sgm's UNetModel from ``config.model.unet``; out_channels = in_channels."""
  return UNetModel(
      in_channels=u.in_channels, model_channels=u.model_channels,
      num_res_blocks=u.num_res_blocks, channel_mult=tuple(u.channel_mult),
      attention_resolutions=tuple(u.attention_resolutions),
      num_head_channels=u.num_head_channels,
      transformer_depth=u.transformer_depth,
      disable_middle_transformer=u.disable_middle_transformer,
      num_classes="sequential", num_groups=u.num_groups)


def _positive(value) -> bool:
  """Finite and > 0 (a NaN or inf setting would turn every output NaN)."""
  return math.isfinite(value) and value > 0


def build_model(config) -> DiffusionModel:
  """Builds the model of ``config.model`` (and the loss settings of ``config.loss``)."""
  m = config.model
  if m.network not in NETWORKS:
    raise ValueError(f"unknown network {m.network!r}; choose one of {NETWORKS} "
                     "(config.model.network)")
  if not (_positive(m.sigma_data) and _positive(config.loss.sigma_data)):
    raise ValueError("config.model.sigma_data and config.loss.sigma_data must be "
                     f"finite and > 0, got {m.sigma_data} and {config.loss.sigma_data}")
  if config.loss.type not in loss_lib.LOSS_TYPES:
    raise ValueError(f"config.loss.type must be one of {loss_lib.LOSS_TYPES}, "
                     f"got {config.loss.type!r}")
  if not _positive(config.loss.p_std) or not math.isfinite(config.loss.p_mean):
    raise ValueError("config.loss.p_std must be finite and > 0 and p_mean finite, got "
                     f"{config.loss.p_std} and {config.loss.p_mean}")
  nll_weight, nll_sigma = config.loss.get("nll_weight", 0.0), config.loss.get("nll_sigma", 0.002)
  if not (math.isfinite(nll_weight) and nll_weight >= 0) or not _positive(nll_sigma):
    raise ValueError("config.loss.nll_weight must be finite and >= 0 and nll_sigma "
                     f"finite and > 0, got {nll_weight} and {nll_sigma}")
  nll_sigma_max = config.loss.get("nll_sigma_max", 0.0)
  if not (nll_sigma_max == 0 or (_positive(nll_sigma_max) and nll_sigma_max >= nll_sigma)):
    raise ValueError("config.loss.nll_sigma_max must be 0 (the term at nll_sigma alone) "
                     f"or a finite value >= nll_sigma ({nll_sigma}), got {nll_sigma_max}")
  if nll_weight and (m.network != "score_flow"
                     or m.score_flow.parameterization != "density"
                     or m.first_stage != "identity"):
    raise ValueError("config.loss.nll_weight > 0 trains the exact bits/dim of 8-bit "
                     "images, which needs a normalised density of pixels: "
                     "network 'score_flow' with parameterization 'density' and "
                     "first_stage 'identity' (configs/mnist_density.py); or set it to 0")
  c = m.conditioner
  gaussian = m.network == "score_flow" and m.score_flow.gaussian_base
  cond = conditioner_lib.class_conditioner(c.embed_dim, c.n_classes, c.ucg_rate,
                                           class_index=gaussian)
  if m.network == "score_flow":
    sf = m.score_flow
    from scoreflow_jax.networks.score_flow import BASE_PARAMETERIZATIONS
    if sf.gaussian_base and (sf.parameterization not in BASE_PARAMETERIZATIONS
                             or sf.gaussian_rank < 1 or sf.gaussian_components < 1):
      raise ValueError("config.model.score_flow.gaussian_base needs parameterization "
                       "'preconditioned' or 'density', gaussian_rank >= 1 and "
                       f"gaussian_components >= 1, got {sf.parameterization!r}, "
                       f"{sf.gaussian_rank} and {sf.gaussian_components}")
    if not (math.isfinite(sf.gaussian_covariance_prior)
            and sf.gaussian_covariance_prior >= 0):
      raise ValueError("config.model.score_flow.gaussian_covariance_prior must be finite"
                       f" and >= 0 (pseudo-observations), got {sf.gaussian_covariance_prior}")
    if sf.gaussian_covariance_prior > 0 and not (sf.gaussian_base
                                                 and sf.gaussian_components > 1):
      raise ValueError("config.model.score_flow.gaussian_covariance_prior shrinks the "
                       "components of a Gaussian-mixture base; it does nothing without "
                       "gaussian_base=True and gaussian_components > 1: set it to 0")
    if sf.dtype not in DTYPES:
      raise ValueError(f"config.model.score_flow.dtype must be one of "
                       f"{sorted(DTYPES)}, got {sf.dtype!r}")
    if sf.n_flows < 1 or sf.model_channels < 1:
      raise ValueError("config.model.score_flow.n_flows and model_channels must be "
                       f">= 1, got {sf.n_flows} and {sf.model_channels}")
    network = ScoreFlowNetwork(
        in_channels=sf.in_channels, model_channels=sf.model_channels,
        n_flows=sf.n_flows, activation=sf.activation, num_classes=c.n_classes,
        sigma_data=m.sigma_data, parameterization=sf.parameterization,
        score_head=sf.score_head, flow_type=sf.flow_type,
        conv_channels=sf.conv_channels, conv_blocks=sf.conv_blocks,
        conv_global=sf.conv_global, conv_scale_shift_norm=sf.conv_scale_shift_norm,
        max_log_scale=sf.max_log_scale, energy_scale=sf.energy_scale,
        energy_weights=sf.energy_weights, energy_linear=sf.energy_linear,
        gaussian_base=sf.gaussian_base, gaussian_rank=sf.gaussian_rank,
        gaussian_components=sf.gaussian_components,
        dtype=None if sf.dtype == "float32" else DTYPES[sf.dtype])
    # Fail fast on names the modules would only check when first called.
    from scoreflow_jax.flows import get_activation
    from scoreflow_jax.networks.score_flow import FLOW_TYPES, PARAMETERIZATIONS
    get_activation(sf.activation)
    if sf.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {sf.parameterization!r}; choose "
                       f"one of {PARAMETERIZATIONS}")
    if sf.flow_type not in FLOW_TYPES:
      raise ValueError(f"unknown flow_type {sf.flow_type!r}; choose one of {FLOW_TYPES}")
    if sf.parameterization == "density" and sf.flow_type in ("joint", "joint_context"):
      raise ValueError("parameterization 'density' needs "
                       "--config.model.score_flow.flow_type=conditional (or conv)")
    if not _positive(sf.max_log_scale):
      raise ValueError("config.model.score_flow.max_log_scale must be finite and > 0 "
                       "(it bounds each coupling's log-scale), got "
                       f"{sf.max_log_scale}")
    if ((sf.energy_scale or sf.energy_weights or sf.energy_linear)
        and sf.parameterization == "density"):
      raise ValueError("config.model.score_flow.energy_scale / energy_weights / "
                       "energy_linear break the normalisation of parameterization "
                       "'density'; set them False")
    for name, what in (("conv_global", "its FiLM sees the image's spatial mean"),
                       ("conv_scale_shift_norm", "where its FiLM comes")):
      if sf[name] and sf.flow_type != "conv":
        raise ValueError(f"config.model.score_flow.{name} is an option of flow_type "
                         f"'conv' ({what}); with {sf.flow_type!r} set it False")
    if sf.flow_type == "conv" and (sf.conv_channels < 1 or sf.conv_blocks < 0):
      raise ValueError("config.model.score_flow.conv_channels must be >= 1 and "
                       f"conv_blocks >= 0, got {sf.conv_channels} and {sf.conv_blocks}")
  else:
    network = _build_unet(m.unet)
  return DiffusionModel(
      network=network, conditioner=cond,
      first_stage=first_stage_lib.get_first_stage(m),
      sigma_data=m.sigma_data, loss_type=config.loss.type,
      loss_sigma_data=config.loss.sigma_data, p_mean=config.loss.p_mean,
      p_std=config.loss.p_std, nll_weight=float(nll_weight), nll_sigma=float(nll_sigma),
      nll_sigma_max=float(nll_sigma_max), nll_noisy=bool(config.loss.get("nll_noisy", False)),
      frozen_module=gaussian_lib.MODULE_NAME if gaussian else None)
