"""sgm's KL autoencoder (``AutoencoderKL``: ``Encoder``, ``Decoder``,
``quant_conv``, ``post_quant_conv``) in Flax, NHWC.

The layers are those of ``sgm/modules/diffusionmodules/model.py`` with
``attn_type="vanilla"`` (the Stable Diffusion VAEs): ResnetBlocks without a
time embedding, GroupNorm(32, eps=1e-6) everywhere, swish, single-head
self-attention through 1x1 convolutions with scale C^-1/2, a Downsample that
pads one zero row and column at the bottom/right before a stride-2 3x3
convolution, and a nearest-neighbour Upsample followed by a 3x3 convolution.
As in sgm, attention blocks sit at the levels whose nominal resolution
(``resolution`` halved per level, not the input's actual size) is in
``attn_resolutions``, and the middle always has one.

Submodules are named after sgm's state-dict keys (``down.0.block.1`` is
``encoder.down.0.block.1``), so a checkpoint converts by renaming
``weight`` -> ``kernel``/``scale`` and transposing convolutions from OIHW to
HWIO (:func:`params_from_state_dict`). xformers attention
("vanilla-xformers") has vanilla's weights and math, so its checkpoints load.
Not ported: dropout (0 in every released VAE), ``tanh_out``/``give_pre_end``,
linear attention, the GAN/LPIPS training losses.
"""
import json
from typing import Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STATE_DICT_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _norm(name):
  # torch.nn.GroupNorm's two-pass variance, not E[x^2] - E[x]^2.
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


def _conv(features, kernel, name):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), name=name)


class ResnetBlock(nn.Module):
  out_channels: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, "conv1")(nn.swish(_norm("norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.swish(_norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all pixels (sgm's vanilla AttnBlock)."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    hn = _norm("norm")(x)
    q, k, v = (_conv(c, 1, n)(hn).reshape(b, h * w, c) for n in ("q", "k", "v"))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * c ** -0.5, axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + _conv(c, 1, "proj_out")(out)


class Downsample(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", name="conv")(x)


class Upsample(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv")(x)


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  double_z: bool = True

  @nn.compact
  def __call__(self, x):
    h = _conv(self.ch, 3, "conv_in")(x)
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, name=f"down.{i}.block.{j}")(h)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"down.{i}.attn.{j}")(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(name=f"down.{i}.downsample")(h)
        res //= 2
    h = ResnetBlock(h.shape[-1], name="mid.block_1")(h)
    h = AttnBlock(name="mid.attn_1")(h)
    h = ResnetBlock(h.shape[-1], name="mid.block_2")(h)
    h = nn.swish(_norm("norm_out")(h))
    return _conv(2 * self.z_channels if self.double_z else self.z_channels, 3,
                 "conv_out")(h)


class Decoder(nn.Module):
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int

  @nn.compact
  def __call__(self, z):
    levels = len(self.ch_mult)
    res = self.resolution // 2 ** (levels - 1)
    h = _conv(self.ch * self.ch_mult[-1], 3, "conv_in")(z)
    h = ResnetBlock(h.shape[-1], name="mid.block_1")(h)
    h = AttnBlock(name="mid.attn_1")(h)
    h = ResnetBlock(h.shape[-1], name="mid.block_2")(h)
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[i], name=f"up.{i}.block.{j}")(h)
        if res in self.attn_resolutions:
          h = AttnBlock(name=f"up.{i}.attn.{j}")(h)
      if i != 0:
        h = Upsample(name=f"up.{i}.upsample")(h)
        res *= 2
    h = nn.swish(_norm("norm_out")(h))
    return _conv(self.out_ch, 3, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """sgm's ``AutoencoderKL`` (``AutoencodingEngineLegacy``) with its ddconfig.

  ``moments(x)`` is ``quant_conv(encoder(x))`` split into the posterior's
  mean and log-variance (clamped to [-30, 20], as sgm's
  ``DiagonalGaussianDistribution``); ``decode(z)`` is
  ``decoder(post_quant_conv(z))``. Images are NHWC in [-1, 1]; latents are
  NHWC with ``embed_dim`` channels at 1 / 2^(len(ch_mult) - 1) of the size.
  """
  embed_dim: int = 4
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 4
  double_z: bool = True

  def setup(self):
    self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks,
                           tuple(self.attn_resolutions), self.resolution,
                           self.z_channels, self.double_z)
    self.decoder = Decoder(self.ch, self.out_ch, tuple(self.ch_mult), self.num_res_blocks,
                           tuple(self.attn_resolutions), self.resolution)
    factor = 2 if self.double_z else 1
    self.quant_conv = nn.Conv(factor * self.embed_dim, (1, 1))
    self.post_quant_conv = nn.Conv(self.z_channels, (1, 1))

  def moments(self, x):
    if not self.double_z:
      raise ValueError("a KL posterior needs double_z=True (mean and log-variance)")
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    """Reconstruction from the posterior mean (used to create parameters)."""
    return self.decode(self.moments(x)[0])

  def latent_shape(self, image_shape):
    """(H, W, C) of images -> (h, w, embed_dim) of their latents."""
    h, w, c = image_shape
    f = 2 ** (len(self.ch_mult) - 1)
    if c != self.in_channels or h % f or w % f:
      raise ValueError(f"the autoencoder takes images with {self.in_channels} channels "
                       f"and sides divisible by {f}, got {tuple(image_shape)}")
    return (h // f, w // f, self.embed_dim)


def kl_divergence(mean, logvar):
  """sgm's ``DiagonalGaussianDistribution.kl()``: KL(q || N(0, I)) per sample."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def _state_dict_key(path):
  *modules, leaf = path
  return ".".join(modules) + "." + {"kernel": "weight", "scale": "weight",
                                    "bias": "bias"}[leaf]


def _from_torch(array, target_shape):
  array = np.asarray(array)
  if array.ndim == 4:                       # conv OIHW -> HWIO
    array = array.transpose(2, 3, 1, 0)
  elif (array.ndim == 2 and len(target_shape) == 4  # a 1x1 conv stored as Linear
        and array.size == int(np.prod(target_shape))):  # (else: the shape check tells)
    array = array.T.reshape(target_shape)
  return array


def params_from_state_dict(module: AutoencoderKL, state_dict: Dict[str, np.ndarray],
                           dtype=np.float32):
  """Flax parameters of ``module`` from an sgm/ldm state dict.

  Accepts the autoencoder's own keys (``encoder.*``, ``decoder.*``,
  ``quant_conv.*``, ``post_quant_conv.*``) or a whole sgm/ldm checkpoint whose
  first stage is under ``first_stage_model.``; the training losses'
  ``loss.*`` entries are ignored. Any other missing, unexpected or
  wrongly-shaped entry is an error that names it.
  """
  prefix = "first_stage_model."
  if any(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, module.resolution, module.resolution,
                                     module.in_channels)))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  params, missing, wrong = {}, [], []
  for path, leaf in flat:
    names = tuple(p.key for p in path)
    key = _state_dict_key(names)
    if key not in state_dict:
      missing.append(key)
      continue
    value = _from_torch(state_dict[key], leaf.shape)
    if value.shape != leaf.shape:
      wrong.append(f"{key}: {tuple(np.shape(state_dict[key]))} for {leaf.shape}")
      continue
    node = params
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = value.astype(dtype)
  expected = {_state_dict_key(tuple(p.key for p in path)) for path, _ in flat}
  unexpected = sorted(set(state_dict) - expected)
  if missing or wrong or unexpected:
    def some(items):
      return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    problems = [f"{name}: {some(items)}" for name, items in
                (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected))
                if items]
    raise ValueError("the autoencoder weights do not match config.model.autoencoder ("
                     + "; ".join(problems) + "); set its ch, ch_mult, num_res_blocks, "
                     "attn_resolutions, z_channels and embed_dim to the checkpoint's "
                     "ddconfig")
  return {"params": params}


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A ``.safetensors`` or ``.npz`` file of named arrays, as numpy (bfloat16 -> float32).

  ``.safetensors`` is read directly (an 8-byte header length, a JSON header,
  raw little-endian bytes), without the safetensors package. Torch pickles
  (``.ckpt``, ``.pt``) are refused with how to convert them.
  """
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if not path.endswith(".safetensors"):
    raise ValueError(f"autoencoder weights must be .safetensors or .npz, got {path!r}; "
                     "convert a torch checkpoint with safetensors.torch.save_file("
                     "torch.load(path)['state_dict'], 'vae.safetensors')")
  with open(path, "rb") as f:
    header = _read_header(f, path)
    body = memoryview(f.read())
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not "
                       f"supported ({sorted(_SAFETENSORS_DTYPES)})")
    start, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    if not 0 <= start <= end <= len(body) or (
        end - start != int(np.prod(info["shape"])) * dtype.itemsize):
      raise ValueError(
          f"{path} is truncated or corrupt: tensor {name} {tuple(info['shape'])} "
          f"{info['dtype']} should lie at bytes {start}..{end} of a {len(body):,}-byte "
          "body. Copy or download the file again.")
    array = np.frombuffer(body[start:end], dtype)
    if info["dtype"] == "BF16":
      array = (array.astype(np.uint32) << 16).view(np.float32)
    out[name] = array.reshape(info["shape"])
  return out


def _read_header(f, path: str) -> dict:
  """The JSON header of the .safetensors file open as ``f`` (an 8-byte length,
  at most 100 MB as the format allows, then the JSON), leaving ``f`` at the
  tensors' bytes."""
  head = f.read(8)
  try:
    n = int.from_bytes(head, "little")
    if len(head) < 8 or n > 100_000_000:
      raise ValueError("no safetensors header")
    return json.loads(f.read(n))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a safetensors file ({e})") from None


def safetensors_metadata(path: str) -> Dict[str, str]:
  """The ``__metadata__`` of a ``.safetensors`` file's header ({} if none),
  read without its tensors."""
  with open(path, "rb") as f:
    return _read_header(f, path).get("__metadata__", {})


def state_dict_from_params(params) -> Dict[str, np.ndarray]:
  """The inverse of :func:`params_from_state_dict`: sgm's names, torch layouts."""
  params = params.get("params", params)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    out[_state_dict_key(tuple(p.key for p in path))] = (
        leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf)
  return out


def save_safetensors(state_dict: Dict[str, np.ndarray], path: str, metadata=None):
  """Writes named float arrays as a ``.safetensors`` file (readable by torch),
  with ``metadata`` (str -> str) in its header."""
  names = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
           np.dtype(np.float16): "F16"}
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name in sorted(state_dict):
    array = np.ascontiguousarray(state_dict[name])
    if array.dtype not in names:
      raise ValueError(f"{name}: dtype {array.dtype} is not supported")
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  from scoreflow_jax.outputs import replaced_when_done  # pylint: disable=g-import-not-at-top
  with replaced_when_done(path) as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for raw in chunks:
      f.write(raw)
