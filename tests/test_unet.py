"""UNetModel: sgm's MNIST UNet, as a plain network (x_in, c_noise, cond) -> F.

XLA compiles dominate on CPU, so the module makes one real initial state
(configs/mnist_unet.py:tiny, through the library's create_train_state) and
one jitted network call, shared by the tests; structure checks use
``jax.eval_shape``.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_unet
from scoreflow_jax import data, model as model_lib, trainer
from scoreflow_jax import train_step as ts
from scoreflow_jax.networks import UNetModel

SMALL = dict(model_channels=8, num_res_blocks=1, num_head_channels=8, num_groups=4)


@pytest.fixture(scope="module")
def tiny():
  """The tiny config's model, optimizer, batches and real initial train state."""
  config = mnist_unet.get_config("tiny")
  model = model_lib.build_model(config)
  tx, schedule = ts.make_optimizer(config.optim, 100)
  images, labels = data.make_synthetic(64)
  batches = [data.to_model_batch(images[i:i + 16], labels[i:i + 16])
             for i in range(0, 64, 16)]
  # on the host, so no test's donated step can delete it
  state = jax.device_get(
      ts.create_train_state(model, tx, jax.random.key(0), batches[0]))
  # the network's inputs for three samples, and one compiled network call
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  c_noise = jnp.asarray([-1.0, 0.3, 1.0])
  cond = model.condition(state.params, batches[0])
  cond = {"vector": cond["vector"][:3]}
  apply = jax.jit(lambda p, x, c, v: model.network.apply(
      {"params": p}, x, c, {"vector": v}))
  return dict(config=config, model=model, tx=tx, schedule=schedule,
              batches=batches, state=state, x=x, c_noise=c_noise,
              vector=cond["vector"], apply=apply)


def _perturbed(params, scale=0.1):
  """Every parameter moved (numpy noise, no compile), so zero convs hide nothing."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def _shapes(net, x, adm):
  cond = {"vector": jnp.zeros((x.shape[0], adm))}
  c_noise = jnp.zeros(x.shape[0])
  params = jax.eval_shape(net.init, jax.random.key(0), x, c_noise, cond)["params"]
  out = jax.eval_shape(net.apply, {"params": params}, x, c_noise, cond)
  return params, out


def test_sgm_mnist_unet_structure_and_parameter_count():
  """sgm's mnist_cond.yaml UNet: 15 input / 15 output blocks, middle transformer."""
  net = model_lib.build_model(mnist_unet.get_config()).network
  x = jnp.zeros((2, 28, 28, 1))
  params, out = _shapes(net, x, 128)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert _count(params) == 2_600_705
  assert sum(k.startswith("input_blocks_") for k in params) == 15
  assert sum(k.startswith("output_blocks_") for k in params) == 17
  # Downsample at input_blocks.5 / .10, Upsample at output_blocks.4.1 / .9.1
  assert set(params["input_blocks_5_0"]) == {"op"}
  assert set(params["output_blocks_4_1"]) == set(params["output_blocks_9_1"]) == {"conv"}
  assert params["output_blocks_4_1"]["conv"]["kernel"].shape == (3, 3, 64, 64)
  # middle: ResBlock, SpatialTransformer (2 heads of 32 on 64 channels), ResBlock
  st = params["middle_block_1"]
  assert _count(st) == 91_456
  assert st["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].shape == (64, 64)
  assert "bias" not in st["transformer_blocks_0"]["attn1"]["to_q"]
  assert st["transformer_blocks_0"]["ff"]["net_0_proj"]["kernel"].shape == (64, 512)
  assert params["label_emb_0_0"]["kernel"].shape == (128, 128)
  assert params["time_embed_0"]["kernel"].shape == (32, 128)


def test_rgb_32x32_output_shape():
  x = jnp.zeros((2, 32, 32, 3))
  params, out = _shapes(UNetModel(in_channels=3, **SMALL), x, 6)
  assert out.shape == x.shape
  assert params["out_2"]["kernel"].shape == (3, 3, 8, 3)


def test_zero_output_at_init_and_torch_init(tiny):
  params = tiny["state"].params["network"]
  out = tiny["apply"](params, tiny["x"], tiny["c_noise"], tiny["vector"])
  assert out.shape == tiny["x"].shape
  np.testing.assert_array_equal(out, 0.0)  # zero_module output conv
  np.testing.assert_array_equal(params["input_blocks_1_0"]["out_layers_3"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["middle_block_1"]["proj_out"]["kernel"], 0.0)
  # torch's default init: kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  conv = params["input_blocks_1_0"]["in_layers_2"]
  bound = 1.0 / math.sqrt(3 * 3 * 8)
  for w in (conv["kernel"], conv["bias"]):
    assert 0.5 * bound < float(jnp.max(jnp.abs(w))) <= bound


def test_conditioning_noise_level_and_per_sample_independence(tiny):
  f, x, c_noise, vector = tiny["apply"], tiny["x"], tiny["c_noise"], tiny["vector"]
  params = _perturbed(tiny["state"].params["network"])
  out = f(params, x, c_noise, vector)
  assert float(jnp.max(jnp.abs(out))) > 1e-3
  diff = lambda a: np.asarray(jnp.max(jnp.abs(a - out), axis=(1, 2, 3)))
  # another class embedding / noise level / image for sample 0 changes sample 0 only
  for d in (diff(f(params, x, c_noise, vector.at[0].set(-vector[0]))),
            diff(f(params, x, c_noise.at[0].add(1.5), vector)),
            diff(f(params, x.at[0].set(-x[0]), c_noise, vector))):
    assert d[0] > 1e-3 and d[1] == d[2] == 0.0
  # no batch statistics: the batch reordered gives the same per-sample outputs
  perm = np.array([2, 0, 1])
  np.testing.assert_allclose(f(params, x[perm], c_noise[perm], vector[perm]),
                             out[perm], rtol=1e-5, atol=1e-6)


def test_attention_options_and_bad_arguments():
  x = jnp.zeros((1, 28, 28, 1))
  net = UNetModel(in_channels=1, attention_resolutions=(2,), **SMALL)
  params, _ = _shapes(net, x, 4)
  # level 1 (ds 2): one input block and two output blocks get a SpatialTransformer
  assert {k for k, v in params.items() if "transformer_blocks_0" in v} == {
      "input_blocks_3_1", "middle_block_1", "output_blocks_2_1", "output_blocks_3_1"}
  assert set(params["output_blocks_3_2"]) == {"conv"}  # Upsample after the transformer
  params, _ = _shapes(UNetModel(disable_middle_transformer=True, **SMALL), x, 4)
  assert "middle_block_1" not in params and "middle_block_2" in params
  with pytest.raises(ValueError, match="num_groups"):
    UNetModel(model_channels=8, num_groups=3)
  with pytest.raises(ValueError, match="num_head_channels"):
    UNetModel(model_channels=8, num_groups=4, num_head_channels=32)
  with pytest.raises(ValueError, match="cond\\['vector'\\]"):
    jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(1), {})
  with pytest.raises(ValueError, match="crossattn"):
    jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(1),
                   {"vector": jnp.zeros((1, 4)), "crossattn": jnp.zeros((1, 2, 4))})


def test_build_model_unet_and_unknown_network():
  config = mnist_unet.get_config()
  m = model_lib.build_model(config)
  assert isinstance(m.network, UNetModel)
  assert (m.network.model_channels, m.network.num_res_blocks,
          m.network.channel_mult, m.network.num_groups) == (32, 4, (1, 2, 2), 32)
  assert config.model.conditioner.embed_dim == 128
  assert config.model.sigma_data == config.loss.sigma_data == 0.5
  config.model.unet.num_groups = 5
  with pytest.raises(ValueError, match="num_groups"):
    model_lib.build_model(config)
  config.model.network = "dit"
  with pytest.raises(ValueError, match="unknown network 'dit'"):
    model_lib.build_model(config)


def test_trainer_checks_channels_of_the_selected_network(tmp_path):
  config = mnist_unet.get_config("tiny")
  config.model.unet.in_channels = 3
  with pytest.raises(ValueError, match="model.unet.in_channels=3"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)


def test_train_steps_with_tiny_config(tiny):
  """The library's train step on synthetic data: finite loss, moving params, learning.

  The loss is probed with the step itself: a state at step 0 draws the same
  noise whatever its parameters, so its loss on the four batches compares
  parameters without compiling another program.
  """
  mesh = ts.make_mesh(jax.devices()[:1])
  step = ts.make_train_step(tiny["model"], tiny["tx"], tiny["schedule"], mesh, 0.99)
  state0 = tiny["state"]
  batches = [ts.global_batch(b, mesh) for b in tiny["batches"]]
  probe = lambda params: np.mean([float(step(
      ts.replicate(state0.replace(params=params), mesh), b)[1]["loss"]) for b in batches])
  state, metrics = step(ts.replicate(state0, mesh), batches[0])
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
  # at F == 0 only the output conv has a gradient; the rest follows on later steps
  assert float(np.max(np.abs(jax.device_get(state.params)["network"]["out_2"]["kernel"]))) > 0
  for i in range(1, 30):
    state, metrics = step(state, batches[i % 4])
  assert int(jax.device_get(state.step)) == 30 and bool(metrics["finite"])
  params30 = jax.device_get(state.params)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state0.params, params30)
  assert all(jax.tree.leaves(moved))
  loss0, loss30 = probe(state0.params), probe(params30)
  assert loss30 < 0.9 * loss0, (loss0, loss30)  # 1.11 -> 0.96 here


# Numpy references of the UNet's blocks (sgm's torch semantics), on small
# random inputs and every parameter moved off its (sometimes zero) init.

def _np_conv(x, p, stride=1):
  """torch Conv2d(padding=k // 2) in NHWC with an HWIO kernel."""
  k = p["kernel"]
  pad = k.shape[0] // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h_out = (x.shape[1] + 2 * pad - k.shape[0]) // stride + 1
  w_out = (x.shape[2] + 2 * pad - k.shape[1]) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, k.shape[3]))
  for i in range(h_out):
    for j in range(w_out):
      patch = xp[:, i * stride:i * stride + k.shape[0], j * stride:j * stride + k.shape[1]]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, k)
  return out + p["bias"]


def _np_group_norm(x, p, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_linear(x, p):
  return x @ p["kernel"] + p.get("bias", 0.0)


def _init(module, *args):
  params = module.init(jax.random.key(0), *args)["params"]
  return jax.tree.map(np.asarray, _perturbed(params, scale=0.3))


def test_attention_and_geglu_against_numpy():
  import scipy.special
  from scoreflow_jax.networks import unet
  x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  attn = unet.CrossAttention(heads=2, dim_head=3)
  p = _init(attn, x)
  split = lambda t: t.reshape(2, 5, 2, 3)
  q, k, v = (split(x @ p[n]["kernel"]) for n in ("to_q", "to_k", "to_v"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(3)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)  # over the keys, per query
  ref = _np_linear(np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 6), p["to_out_0"])
  np.testing.assert_allclose(attn.apply({"params": p}, x), ref, rtol=1e-4, atol=1e-5)
  ff = unet.FeedForward()
  p = _init(ff, x)
  h, gate = np.split(_np_linear(x, p["net_0_proj"]), 2, axis=-1)
  gelu = 0.5 * gate * (1.0 + scipy.special.erf(gate / np.sqrt(2.0)))  # exact GELU
  np.testing.assert_allclose(ff.apply({"params": p}, x), _np_linear(h * gelu, p["net_2"]),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_channels", [8, 12])  # identity skip, 1x1 conv skip
def test_res_block_and_resampling_against_numpy(out_channels):
  from scoreflow_jax.networks import unet
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 6, 8)).astype(np.float32)
  emb = rng.normal(size=(2, 10)).astype(np.float32)
  block = unet.ResBlock(out_channels, num_groups=4)
  p = _init(block, x, emb)
  h = _np_conv(_np_silu(_np_group_norm(x, p["in_layers_0"], 4, 1e-5)), p["in_layers_2"])
  h = h + _np_linear(_np_silu(emb), p["emb_layers_1"])[:, None, None, :]
  h = _np_conv(_np_silu(_np_group_norm(h, p["out_layers_0"], 4, 1e-5)), p["out_layers_3"])
  skip = x if out_channels == 8 else _np_conv(x, p["skip_connection"])
  np.testing.assert_allclose(block.apply({"params": p}, x, emb), skip + h,
                             rtol=1e-4, atol=1e-4)
  down = unet.Downsample(8)
  p = _init(down, x)
  out = np.asarray(down.apply({"params": p}, x))
  assert out.shape == (2, 3, 3, 8)
  np.testing.assert_allclose(out, _np_conv(x, p["op"], stride=2), rtol=1e-4, atol=1e-4)
  up = unet.Upsample(8)
  p = _init(up, x)
  nearest = x.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_allclose(up.apply({"params": p}, x), _np_conv(nearest, p["conv"]),
                             rtol=1e-4, atol=1e-4)


def _np_layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _np_res_block(x, emb, p, groups):
  """sgm's ResBlock, as the block test checks it."""
  h = _np_conv(_np_silu(_np_group_norm(x, p["in_layers_0"], groups, 1e-5)), p["in_layers_2"])
  h = h + _np_linear(_np_silu(emb), p["emb_layers_1"])[:, None, None, :]
  h = _np_conv(_np_silu(_np_group_norm(h, p["out_layers_0"], groups, 1e-5)), p["out_layers_3"])
  return (_np_conv(x, p["skip_connection"]) if "skip_connection" in p else x) + h


def _np_spatial_transformer(x, p, groups, dim_head):
  """sgm's SpatialTransformer (use_linear=False, depth 1, no context)."""
  b, hgt, wid, c = x.shape
  h = _np_conv(_np_group_norm(x, p["norm"], groups, 1e-6), p["proj_in"]).reshape(b, -1, c)
  blk = p["transformer_blocks_0"]

  def attn(t, q_p):
    split = lambda u: u.reshape(b, -1, c // dim_head, dim_head)
    q, k, v = (split(t @ q_p[n]["kernel"]) for n in ("to_q", "to_k", "to_v"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim_head)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return _np_linear(np.einsum("bhqk,bkhd->bqhd", w, v).reshape(t.shape), q_p["to_out_0"])

  import scipy.special
  h = attn(_np_layer_norm(h, blk["norm1"]), blk["attn1"]) + h
  h = attn(_np_layer_norm(h, blk["norm2"]), blk["attn2"]) + h
  a, gate = np.split(_np_linear(_np_layer_norm(h, blk["norm3"]), blk["ff"]["net_0_proj"]), 2, -1)
  h = _np_linear(a * 0.5 * gate * (1.0 + scipy.special.erf(gate / np.sqrt(2.0))),
                 blk["ff"]["net_2"]) + h
  return _np_conv(h.reshape(b, hgt, wid, c), p["proj_out"]) + x


def test_whole_unet_forward_against_numpy(x64):
  """The full network (embeddings, skips, resampling, middle transformer) in float64.

  The numpy side spells out sgm's block list for channel_mult (1, 2) with one
  ResBlock per level instead of looping like the module, so wiring mistakes
  (a missing SiLU in an embedding MLP, skips dropped or concatenated as
  [skip, h]) show up as a mismatch.
  """
  net = UNetModel(in_channels=1, model_channels=8, num_res_blocks=1, channel_mult=(1, 2),
                  num_head_channels=8, num_groups=4)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 8, 1))
  c_noise = np.array([-0.6, 2.3])
  vector = rng.normal(size=(2, 6))
  # random parameters of the module's shapes (no zero convs): compiling the
  # float64 init alone takes ~10 s on CPU, eval_shape none
  shapes = jax.eval_shape(net.init, jax.random.key(0), x, c_noise, {"vector": vector})
  fan_in = lambda s: np.prod(s[:-1]) if len(s) > 1 else 1.0
  p = jax.tree.map(lambda s: rng.normal(size=s.shape) / np.sqrt(fan_in(s.shape)),
                   shapes["params"])
  out = np.asarray(jax.jit(net.apply)({"params": p}, x, c_noise, {"vector": vector}))

  # sgm's timestep_embedding (as score_flow.timestep_embedding): [cos, sin], max_period 1e4
  freqs = 10000.0 ** (-np.arange(4) / 4.0)
  emb = np.concatenate([np.cos(c_noise[:, None] * freqs), np.sin(c_noise[:, None] * freqs)], -1)
  emb = _np_linear(_np_silu(_np_linear(emb, p["time_embed_0"])), p["time_embed_2"])
  emb = emb + _np_linear(_np_silu(_np_linear(vector, p["label_emb_0_0"])), p["label_emb_0_2"])
  res = lambda name, h: _np_res_block(h, emb, p[name], 4)
  cat = lambda h, skip: np.concatenate([h, skip], axis=-1)  # torch.cat([h, hs.pop()], 1)
  h0 = _np_conv(x, p["input_blocks_0_0"])  # 8 ch, 8x8
  h1 = res("input_blocks_1_0", h0)  # 8 ch
  h2 = _np_conv(h1, p["input_blocks_2_0"]["op"], stride=2)  # Downsample, 4x4
  h3 = res("input_blocks_3_0", h2)  # 16 ch
  h = res("middle_block_0", h3)
  h = _np_spatial_transformer(h, p["middle_block_1"], 4, 8)
  h = res("middle_block_2", h)
  h = res("output_blocks_0_0", cat(h, h3))
  h = res("output_blocks_1_0", cat(h, h2))
  h = h.repeat(2, axis=1).repeat(2, axis=2)  # Upsample: nearest x2, then conv
  h = _np_conv(h, p["output_blocks_1_1"]["conv"])
  h = res("output_blocks_2_0", cat(h, h1))
  h = res("output_blocks_3_0", cat(h, h0))
  ref = _np_conv(_np_silu(_np_group_norm(h, p["out_0"], 4, 1e-5)), p["out_2"])
  # every parameter block is used above
  assert set(p) == {"time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2",
                    "input_blocks_0_0", "input_blocks_1_0", "input_blocks_2_0",
                    "input_blocks_3_0", "middle_block_0", "middle_block_1", "middle_block_2",
                    "output_blocks_0_0", "output_blocks_1_0", "output_blocks_1_1",
                    "output_blocks_2_0", "output_blocks_3_0", "out_0", "out_2"}
  assert out.dtype == np.float64 and out.shape == x.shape
  assert np.max(np.abs(ref)) > 0.1
  np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)
