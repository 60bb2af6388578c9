"""sgm's ``openaimodel.UNetModel`` in Flax, NHWC, float32.

The defaults are sgm's ``configs/example_training/toy/mnist_cond.yaml``:
model_channels 32, channel_mult (1, 2, 2), 4 ResBlocks per level, no
attention in the input/output blocks, and sgm's middle block
ResBlock -> SpatialTransformer -> ResBlock (sgm always builds that
transformer unless ``disable_middle_transformer``); num_classes "sequential",
so ``cond["vector"]`` goes through label_emb and is added to the time
embedding. Weights start as torch's defaults (U(+-1/sqrt(fan_in)) for
kernels and biases), and the layers sgm wraps in ``zero_module`` start at
zero, so F == 0 at init.

Submodules are named after sgm's state-dict keys (``input_blocks_1_0`` is
``input_blocks.1.0``). Not ported: dropout (0 in sgm's config), gradient
checkpointing, use_scale_shift_norm, resblock_updown, conv_resample=False,
cross-attention context and "concat" conditioning (sgm's MNIST config uses
none of them).
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoreflow_jax.networks.score_flow import timestep_embedding

_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                      "uniform")


def _torch_bias_init(fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """torch.nn.Linear with its default init (zeros with ``zero``, sgm's zero_module)."""
  features: int
  use_bias: bool = True
  zero: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param(
        "kernel", nn.initializers.zeros if self.zero else _TORCH_KERNEL_INIT,
        (fan_in, self.features), x.dtype)
    y = x @ kernel
    if self.use_bias:
      y = y + self.param(
          "bias", nn.initializers.zeros if self.zero else _torch_bias_init(fan_in),
          (self.features,), x.dtype)
    return y


class Conv(nn.Module):
  """torch.nn.Conv2d(padding=kernel_size // 2) in NHWC, torch's default init.

  Padding is symmetric like torch's (not "SAME"), so a stride-2 conv takes the
  same pixels as sgm's Downsample.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  zero: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    fan_in = x.shape[-1] * k * k
    kernel = self.param(
        "kernel", nn.initializers.zeros if self.zero else _TORCH_KERNEL_INIT,
        (k, k, x.shape[-1], self.features), x.dtype)
    bias = self.param(
        "bias", nn.initializers.zeros if self.zero else _torch_bias_init(fan_in),
        (self.features,), x.dtype)
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def group_norm(num_groups, epsilon=1e-5, name=None):
  """sgm's ``normalization`` (GroupNorm32, torch eps 1e-5); per sample."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, name=name)


class ResBlock(nn.Module):
  """sgm's ResBlock: norm-SiLU-conv, + Linear(SiLU(emb)), norm-SiLU-zero conv, + skip.

  The skip is the identity, or a 1x1 conv when the channel count changes.
  """
  out_channels: int
  num_groups: int = 32

  @nn.compact
  def __call__(self, x, emb):
    h = nn.silu(group_norm(self.num_groups, name="in_layers_0")(x))
    h = Conv(self.out_channels, name="in_layers_2")(h)
    emb_out = Linear(self.out_channels, name="emb_layers_1")(nn.silu(emb))
    h = h + emb_out[:, None, None, :]
    h = nn.silu(group_norm(self.num_groups, name="out_layers_0")(h))
    h = Conv(self.out_channels, zero=True, name="out_layers_3")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, kernel_size=1, name="skip_connection")(x)
    return x + h


class Downsample(nn.Module):
  """sgm's Downsample with conv_resample: a 3x3 conv, stride 2, padding 1."""
  channels: int

  @nn.compact
  def __call__(self, x):
    return Conv(self.channels, stride=2, name="op")(x)


class Upsample(nn.Module):
  """sgm's Upsample with conv_resample: nearest x2, then a 3x3 conv."""
  channels: int

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.channels, name="conv")(x)


class CrossAttention(nn.Module):
  """sgm's CrossAttention without context (self-attention), softmax(q k^T / sqrt(d)) v."""
  heads: int
  dim_head: int

  @nn.compact
  def __call__(self, x):  # (B, T, C)
    inner = self.heads * self.dim_head
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
    q = split(Linear(inner, use_bias=False, name="to_q")(x))
    k = split(Linear(inner, use_bias=False, name="to_k")(x))
    v = split(Linear(inner, use_bias=False, name="to_v")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.dim_head)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return Linear(x.shape[-1], name="to_out_0")(out.reshape(x.shape[:2] + (inner,)))


class FeedForward(nn.Module):
  """sgm's FeedForward with glu=True (GEGLU, exact GELU), mult 4."""

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h, gate = jnp.split(Linear(8 * dim, name="net_0_proj")(x), 2, axis=-1)
    return Linear(dim, name="net_2")(h * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
  """sgm's BasicTransformerBlock; with no context both attentions are self-attention."""
  heads: int
  dim_head: int

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name)
    x = CrossAttention(self.heads, self.dim_head, name="attn1")(norm("norm1")(x)) + x
    x = CrossAttention(self.heads, self.dim_head, name="attn2")(norm("norm2")(x)) + x
    return FeedForward(name="ff")(norm("norm3")(x)) + x


class SpatialTransformer(nn.Module):
  """sgm's SpatialTransformer (use_linear=False): norm, 1x1 conv, blocks, zero 1x1 conv, + x.

  Its GroupNorm uses sgm's ``Normalize`` eps 1e-6; heads = channels //
  num_head_channels, as UNetModel computes them.
  """
  num_head_channels: int
  depth: int = 1
  num_groups: int = 32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    b, hgt, wid, c = x.shape
    heads = c // self.num_head_channels
    inner = heads * self.num_head_channels
    h = group_norm(self.num_groups, epsilon=1e-6, name="norm")(x)
    h = Conv(inner, kernel_size=1, name="proj_in")(h).reshape(b, hgt * wid, inner)
    for d in range(self.depth):
      h = BasicTransformerBlock(heads, self.num_head_channels,
                                name=f"transformer_blocks_{d}")(h)
    h = Conv(c, kernel_size=1, zero=True, name="proj_out")(
        h.reshape(b, hgt, wid, inner))
    return h + x


class UNetModel(nn.Module):
  """sgm's UNetModel as a network ``(x_in, c_noise, cond) -> F``.

  Attributes:
    in_channels: image channels.
    model_channels: base width; the time embedding is 4x this.
    out_channels: output channels (None: in_channels, as the Denoiser needs).
    num_res_blocks: ResBlocks per level (the output path has one more).
    channel_mult: width multiplier per level; each level but the last
      halves the resolution.
    attention_resolutions: downsample rates (1, 2, 4, ...) with a
      SpatialTransformer after each ResBlock.
    num_head_channels: channels per attention head.
    transformer_depth: BasicTransformerBlocks per SpatialTransformer.
    disable_middle_transformer: drop the middle block's SpatialTransformer.
    num_classes: "sequential" (embed ``cond["vector"]``) or None.
    num_groups: GroupNorm groups (sgm fixes 32); must divide model_channels.
  """
  in_channels: int = 1
  model_channels: int = 32
  out_channels: Optional[int] = None
  num_res_blocks: int = 4
  channel_mult: Sequence[int] = (1, 2, 2)
  attention_resolutions: Sequence[int] = ()
  num_head_channels: int = 32
  transformer_depth: int = 1
  disable_middle_transformer: bool = False
  num_classes: Optional[str] = "sequential"
  num_groups: int = 32

  def __post_init__(self):
    """Checks the attributes when the module is built, not when first called."""
    mc = self.model_channels
    if mc < 1 or self.num_groups < 1 or mc % self.num_groups:
      raise ValueError(f"num_groups={self.num_groups} must divide "
                       f"model_channels={mc} (every width is a multiple of it)")
    if not self.channel_mult or min(self.channel_mult) < 1:
      raise ValueError(f"channel_mult must be non-empty and positive, got "
                       f"{tuple(self.channel_mult)}")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
    if self.num_classes not in (None, "sequential"):
      raise ValueError(f"num_classes must be 'sequential' or None, got "
                       f"{self.num_classes!r}")
    widths = [mc * m for m in self.channel_mult]
    attn_widths = [w for lvl, w in enumerate(widths)
                   if 2**lvl in self.attention_resolutions]
    if not self.disable_middle_transformer:
      attn_widths.append(widths[-1])
    if attn_widths and (self.num_head_channels < 1
                        or min(attn_widths) < self.num_head_channels):
      raise ValueError(f"num_head_channels={self.num_head_channels} must be in "
                       f"[1, {min(attn_widths)}] (the narrowest attention width)")
    super().__post_init__()

  def _transformer(self, name):
    return SpatialTransformer(self.num_head_channels, self.transformer_depth,
                              self.num_groups, name=name)

  @nn.compact
  def __call__(self, x_in, c_noise, cond):
    """x_in (B, H, W, C), c_noise (B,), cond["vector"] (B, adm) -> F (B, H, W, out)."""
    if cond is not None and ("crossattn" in cond or "concat" in cond):
      raise ValueError("UNetModel uses only cond['vector']; crossattn/concat "
                       "conditioning is not ported")
    mc, ted = self.model_channels, 4 * self.model_channels
    emb = timestep_embedding(c_noise.astype(x_in.dtype), mc)
    emb = Linear(ted, name="time_embed_2")(
        nn.silu(Linear(ted, name="time_embed_0")(emb)))
    if self.num_classes == "sequential":
      if cond is None or "vector" not in cond:
        raise ValueError("UNetModel(num_classes='sequential') needs "
                         "cond['vector'] from the conditioner")
      y = Linear(ted, name="label_emb_0_0")(cond["vector"])
      emb = emb + Linear(ted, name="label_emb_0_2")(nn.silu(y))

    h = Conv(mc, name="input_blocks_0_0")(x_in)
    hs = [h]
    ds, i = 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(mult * mc, self.num_groups, name=f"input_blocks_{i}_0")(h, emb)
        if ds in self.attention_resolutions:
          h = self._transformer(f"input_blocks_{i}_1")(h)
        hs.append(h)
        i += 1
      if level != len(self.channel_mult) - 1:
        h = Downsample(mult * mc, name=f"input_blocks_{i}_0")(h)
        hs.append(h)
        ds, i = ds * 2, i + 1

    ch = h.shape[-1]
    h = ResBlock(ch, self.num_groups, name="middle_block_0")(h, emb)
    if not self.disable_middle_transformer:
      h = self._transformer("middle_block_1")(h)
    h = ResBlock(ch, self.num_groups, name="middle_block_2")(h, emb)

    i = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = ResBlock(mult * mc, self.num_groups, name=f"output_blocks_{i}_0")(h, emb)
        k = 1
        if ds in self.attention_resolutions:
          h = self._transformer(f"output_blocks_{i}_1")(h)
          k = 2
        if level and j == self.num_res_blocks:
          h = Upsample(mult * mc, name=f"output_blocks_{i}_{k}")(h)
          ds //= 2
        i += 1

    h = nn.silu(group_norm(self.num_groups, name="out_0")(h))
    out_channels = self.out_channels or self.in_channels
    return Conv(out_channels, zero=True, name="out_2")(h)
