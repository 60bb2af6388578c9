"""UNetModel: sgm's MNIST UNet, as a plain network (x_in, c_noise, cond) -> F."""
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
def small_rgb():
  """A small UNet on (3, 32, 32, 3) and its real initial parameters (one compile)."""
  net = UNetModel(in_channels=3, **SMALL)
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  c_noise = jnp.linspace(-1.0, 1.0, 3)
  cond = {"vector": jax.random.normal(jax.random.key(1), (3, 6))}
  params = jax.jit(net.init)(jax.random.key(2), x, c_noise, cond)
  return net, params, x, c_noise, cond


def _perturbed(params, scale=0.1):
  """Every parameter moved (numpy noise, no compile), so zero convs hide nothing."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def test_sgm_mnist_unet_structure_and_parameter_count():
  """sgm's mnist_cond.yaml UNet: 15 input / 15 output blocks, middle transformer."""
  net = model_lib.build_model(mnist_unet.get_config()).network
  x = jnp.zeros((2, 28, 28, 1))
  cond = {"vector": jnp.zeros((2, 128))}
  params = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(2), cond)["params"]
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
  out = jax.eval_shape(net.apply, {"params": params}, x, jnp.zeros(2), cond)
  assert out.shape == x.shape


def test_output_shape_and_zero_at_init(small_rgb):
  net, params, x, c_noise, cond = small_rgb
  out = jax.jit(net.apply)(params, x, c_noise, cond)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero_module output conv
  p = params["params"]
  np.testing.assert_array_equal(p["input_blocks_1_0"]["out_layers_3"]["kernel"], 0.0)
  np.testing.assert_array_equal(p["middle_block_1"]["proj_out"]["kernel"], 0.0)
  # torch's default init: kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  conv = p["input_blocks_1_0"]["in_layers_2"]
  bound = 1.0 / math.sqrt(3 * 3 * 8)
  for w in (conv["kernel"], conv["bias"]):
    assert 0.5 * bound < float(jnp.max(jnp.abs(w))) <= bound


def test_conditioning_noise_level_and_per_sample_independence(small_rgb):
  net, params, x, c_noise, cond = small_rgb
  params = _perturbed(params)
  f = jax.jit(net.apply)
  out = f(params, x, c_noise, cond)
  assert float(jnp.max(jnp.abs(out))) > 1e-3
  diff = lambda a, b: np.asarray(jnp.max(jnp.abs(a - b), axis=(1, 2, 3)))
  # another class embedding / noise level / image for sample 0 changes sample 0 only
  vector = cond["vector"].at[0].set(-cond["vector"][0])
  d = diff(f(params, x, c_noise, {"vector": vector}), out)
  assert d[0] > 1e-3 and d[1] == d[2] == 0.0
  d = diff(f(params, x, c_noise.at[0].add(1.5), cond), out)
  assert d[0] > 1e-3 and d[1] == d[2] == 0.0
  d = diff(f(params, x.at[0].set(-x[0]), c_noise, cond), out)
  assert d[0] > 1e-3 and d[1] == d[2] == 0.0
  # no batch statistics: the batch reordered gives the same per-sample outputs
  perm = np.array([2, 0, 1])
  shuffled = f(params, x[perm], c_noise[perm], {"vector": cond["vector"][perm]})
  np.testing.assert_allclose(shuffled, out[perm], rtol=1e-5, atol=1e-6)


def test_attention_options_and_bad_arguments():
  net = UNetModel(in_channels=1, attention_resolutions=(2,), **SMALL)
  x = jnp.zeros((1, 28, 28, 1))
  cond = {"vector": jnp.zeros((1, 4))}
  params = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(1), cond)["params"]
  # level 1 (ds 2): one input block and two output blocks get a SpatialTransformer
  assert {k for k, v in params.items() if "transformer_blocks_0" in v} == {
      "input_blocks_3_1", "middle_block_1", "output_blocks_2_1", "output_blocks_3_1"}
  assert set(params["output_blocks_3_2"]) == {"conv"}  # Upsample after the transformer
  no_mid = UNetModel(in_channels=1, disable_middle_transformer=True, **SMALL)
  params = jax.eval_shape(no_mid.init, jax.random.key(0), x, jnp.zeros(1), cond)["params"]
  assert "middle_block_1" not in params and "middle_block_2" in params
  with pytest.raises(ValueError, match="num_groups"):
    UNetModel(model_channels=8, num_groups=3)
  with pytest.raises(ValueError, match="num_head_channels"):
    UNetModel(model_channels=8, num_groups=4, num_head_channels=32)
  with pytest.raises(ValueError, match="cond\\['vector'\\]"):
    net.init(jax.random.key(0), x, jnp.zeros(1), {})
  with pytest.raises(ValueError, match="crossattn"):
    net.init(jax.random.key(0), x, jnp.zeros(1),
             dict(cond, crossattn=jnp.zeros((1, 2, 4))))


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


def test_train_steps_with_tiny_config():
  """The library's train step on synthetic data: finite loss, moving params, learning."""
  config = mnist_unet.get_config("tiny")
  model = model_lib.build_model(config)
  tx, schedule = ts.make_optimizer(config.optim, 100)
  images, labels = data.make_synthetic(64)
  batches = [data.to_model_batch(images[i:i + 16], labels[i:i + 16])
             for i in range(0, 64, 16)]
  state = ts.create_train_state(model, tx, jax.random.key(0), batches[0])
  mesh = ts.make_mesh(jax.devices()[:1])
  step = ts.make_train_step(model, tx, schedule, mesh, 0.99)
  eval_batch = data.to_model_batch(images, labels)
  eval_keys = jax.random.split(jax.random.key(1), 64)
  eval_loss = jax.jit(
      lambda p: jnp.mean(model.per_sample_loss(p, eval_batch, eval_keys)[0]))
  params0 = jax.device_get(state.params)
  loss0 = float(eval_loss(params0))
  state = ts.replicate(state, mesh)
  state, metrics = step(state, ts.global_batch(batches[0], mesh))
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
  # only the zero output conv has a gradient at F == 0; the rest follows
  assert float(np.max(np.abs(jax.device_get(state.params)["network"]["out_2"]["kernel"]))) > 0
  for i in range(1, 30):
    state, metrics = step(state, ts.global_batch(batches[i % 4], mesh))
  assert int(jax.device_get(state.step)) == 30 and bool(metrics["finite"])
  params30 = jax.device_get(state.params)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), params0, params30)
  assert all(jax.tree.leaves(moved))
  loss30 = float(eval_loss(params30))
  assert loss30 < 0.8 * loss0, (loss0, loss30)
