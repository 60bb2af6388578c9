"""The KL-autoencoder first stage: sgm's numbers, weight loading and the first-stage
wrapper. Latent diffusion is tested in test_latent.py, the VAE trainer in
test_autoencoder_training.py."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import first_stage as first_stage_lib
from scoreflow_jax.networks import autoencoder as ae
from tests import kl_weights

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "sgm_kl_reference.npz")


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as f:
    ref = {k: f[k] for k in f.files}
  config = json.loads(str(ref["config"]))
  module = ae.AutoencoderKL(
      embed_dim=config["embed_dim"], ch=config["ch"], ch_mult=tuple(config["ch_mult"]),
      num_res_blocks=config["num_res_blocks"],
      attn_resolutions=tuple(config["attn_resolutions"]),
      resolution=config["resolution"], in_channels=config["in_channels"],
      out_ch=config["out_ch"], z_channels=config["z_channels"])
  names_shapes = list(zip(ref["names"].tolist(), json.loads(str(ref["shapes"]))))
  state_dict = kl_weights.deterministic_state_dict(names_shapes, seed=0)
  return module, state_dict, ref


nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
nhwc = lambda a: np.transpose(np.asarray(a), (0, 2, 3, 1))


def test_matches_sgm_in_float64(reference, x64):
  # bench/make_kl_reference.py ran sgm's own Encoder/Decoder/DiagonalGaussian
  # (torch, float64) on these weights and inputs.
  module, state_dict, ref = reference
  params = ae.params_from_state_dict(module, state_dict, dtype=np.float64)
  x, z = jnp.asarray(nhwc(ref["x"])), jnp.asarray(nhwc(ref["z"]))
  h = module.apply(params, x, method=lambda m, x: m.encoder(x))
  mean, logvar = module.apply(params, x, method="moments")
  decoded = module.apply(params, z, method="decode")
  assert mean.dtype == jnp.float64
  for ours, name in ((h, "h"), (mean, "mean"), (logvar, "logvar"), (decoded, "decoded")):
    np.testing.assert_allclose(nchw(ours), ref[name], rtol=1e-9, atol=1e-10, err_msg=name)
  np.testing.assert_allclose(ae.kl_divergence(mean, logvar), ref["kl"], rtol=1e-10)
  # the sgm state dict's names are exactly what the port reads and writes
  assert sorted(ae.state_dict_from_params(params)) == sorted(ref["names"].tolist())


def test_state_dict_variants_and_errors(reference, tmp_path):
  module, state_dict, ref = reference
  params = ae.params_from_state_dict(module, state_dict)
  # a whole sgm checkpoint: the first stage under first_stage_model., other parts ignored
  whole = {"first_stage_model." + k: v for k, v in state_dict.items()}
  whole["model.diffusion_model.out.0.weight"] = np.zeros(3)
  chex.assert_trees_all_equal(ae.params_from_state_dict(module, whole), params)
  # an autoencoder's own training checkpoint: its loss modules are skipped
  chex.assert_trees_all_equal(ae.params_from_state_dict(
      module, dict(state_dict, **{"loss.logvar": np.zeros(())})), params)
  # attention projections stored as Linear (O, I), as some converters write them
  linear = dict(state_dict)
  linear["encoder.mid.attn_1.q.weight"] = state_dict["encoder.mid.attn_1.q.weight"][..., 0, 0]
  chex.assert_trees_all_equal(ae.params_from_state_dict(module, linear), params)
  # ... of another width: the shape check names the fields, not numpy's reshape
  q = state_dict["encoder.mid.attn_1.q.weight"][..., 0, 0]
  linear["encoder.mid.attn_1.q.weight"] = np.concatenate([q, q])
  with pytest.raises(ValueError, match=r"wrong shape: encoder\.mid\.attn_1\.q\.weight"):
    ae.params_from_state_dict(module, linear)

  missing = dict(state_dict)
  del missing["decoder.conv_out.bias"]
  with pytest.raises(ValueError, match=r"missing: decoder\.conv_out\.bias"):
    ae.params_from_state_dict(module, missing)
  with pytest.raises(ValueError, match=r"unexpected: encoder\.extra\.weight"):
    ae.params_from_state_dict(module, dict(state_dict, **{"encoder.extra.weight": np.ones(2)}))
  # a checkpoint of another ddconfig (ch 64 instead of 32) names the fields to set
  wider = ae.AutoencoderKL(embed_dim=4, ch=64, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8,), resolution=16)
  with pytest.raises(ValueError, match=r"wrong shape: .*ch, ch_mult, num_res_blocks"):
    ae.params_from_state_dict(wider, state_dict)


def test_safetensors_files(reference, tmp_path):
  _, state_dict, _ = reference
  small = {k: v for k, v in list(state_dict.items())[:6]}
  for dtype in (np.float32, np.float16, np.float64):
    path = str(tmp_path / f"w_{np.dtype(dtype).name}.safetensors")
    ae.save_safetensors({k: v.astype(dtype) for k, v in small.items()}, path)
    back = ae.load_state_dict(path)
    assert sorted(back) == sorted(small)
    for k, v in small.items():
      assert back[k].dtype == dtype and back[k].shape == v.shape
      np.testing.assert_array_equal(back[k], v.astype(dtype))
  # bfloat16, as SDXL's fp16-fix VAEs and many trainers save: its top 16 bits of float32
  value = np.array([1.5, -2.25, 3.0e-3], np.float32)
  raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
  header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
  path = str(tmp_path / "bf16.safetensors")
  with open(path, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + raw)
  np.testing.assert_allclose(ae.load_state_dict(path)["w"], value, rtol=1e-2)
  np.savez(str(tmp_path / "w.npz"), **small)
  assert sorted(ae.load_state_dict(str(tmp_path / "w.npz"))) == sorted(small)
  with pytest.raises(ValueError, match="safetensors.torch.save_file"):
    ae.load_state_dict(str(tmp_path / "vae.ckpt"))
  whole = (tmp_path / "w_float32.safetensors").read_bytes()  # cut short: told
  (tmp_path / "cut.safetensors").write_bytes(whole[:len(whole) - 100])
  with pytest.raises(ValueError, match="cut.safetensors is truncated or corrupt"):
    ae.load_state_dict(str(tmp_path / "cut.safetensors"))
  (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{notjson")
  with pytest.raises(ValueError, match="is not a safetensors file"):
    ae.load_state_dict(str(tmp_path / "junk.safetensors"))


def test_log_variance_is_clamped_as_sgm_does(reference):
  # DiagonalGaussianDistribution clamps logvar to [-30, 20]: the draw's std
  # and the KL use the clamped value (the reference's logvar never gets there)
  module, state_dict, ref = reference
  x = jnp.asarray(nhwc(ref["x"]), jnp.float32)
  embed_dim = module.embed_dim
  for shift, bound in ((50.0, 20.0), (-80.0, -30.0)):
    shifted = dict(state_dict)
    bias = np.array(state_dict["quant_conv.bias"])
    bias[embed_dim:] += shift
    shifted["quant_conv.bias"] = bias
    params = ae.params_from_state_dict(module, shifted)
    mean, logvar = module.apply(params, x, method="moments")
    np.testing.assert_array_equal(logvar, bound)
    np.testing.assert_allclose(ae.kl_divergence(mean, logvar), 0.5 * np.sum(
        np.asarray(mean) ** 2 + np.exp(bound) - 1.0 - bound, axis=(1, 2, 3)), rtol=1e-6)
    stage = first_stage_lib.KLAutoencoderFirstStage(module, params, scale_factor=1.0)
    keys = jax.random.split(jax.random.key(0), len(x))
    noise = jnp.stack([jax.random.normal(k, mean.shape[1:]) for k in keys])
    np.testing.assert_allclose(stage.encode(params, x, keys),
                               mean + np.exp(0.5 * bound) * noise, rtol=1e-5)


def test_first_stage_encode_decode(reference):
  # DiffusionEngine: encode_first_stage = scale * (posterior draw), decode
  # divides by the scale first; one key per sample.
  module, state_dict, ref = reference
  params = ae.params_from_state_dict(module, state_dict)
  stage = first_stage_lib.KLAutoencoderFirstStage(module, params, scale_factor=0.5)
  x = jnp.asarray(nhwc(ref["x"]), jnp.float32)
  mean, logvar = module.apply(params, x, method="moments")
  keys = jax.random.split(jax.random.key(3), 2)
  noise = jnp.stack([jax.random.normal(k, mean.shape[1:]) for k in keys])
  np.testing.assert_allclose(stage.encode(params, x, keys),
                             0.5 * (mean + jnp.exp(0.5 * logvar) * noise), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stage.encode(params, x), 0.5 * mean, rtol=1e-6)
  # each sample's draw depends on its own key only
  swapped = stage.encode(params, x[::-1], keys[::-1])
  np.testing.assert_allclose(swapped[::-1], stage.encode(params, x, keys), rtol=1e-6, atol=1e-6)
  mode_only = first_stage_lib.KLAutoencoderFirstStage(module, params, 0.5, sample=False)
  np.testing.assert_allclose(mode_only.encode(params, x, keys), 0.5 * mean, rtol=1e-6)
  # cached moments: sgm's (mean, logvar) side by side, and the same draws
  moments = stage.moments(params, x)
  assert moments.shape == mean.shape[:-1] + (2 * mean.shape[-1],)
  np.testing.assert_array_equal(moments, jnp.concatenate([mean, logvar], -1))
  np.testing.assert_array_equal(stage.encode_moments(moments, keys), stage.encode(params, x, keys))
  np.testing.assert_array_equal(stage.encode_moments(moments), stage.encode(params, x))
  z = jnp.asarray(nhwc(ref["z"]), jnp.float32)
  np.testing.assert_allclose(stage.decode(params, 0.5 * z), nhwc(ref["decoded"]),
                             rtol=2e-4, atol=2e-4)
  # a shift (SD3's and FLUX's shift_factor): subtracted before the scale, added
  # back after it
  shifted = first_stage_lib.KLAutoencoderFirstStage(module, params, 0.5, shift_factor=0.3)
  np.testing.assert_allclose(shifted.encode(params, x, keys),
                             0.5 * (mean + jnp.exp(0.5 * logvar) * noise - 0.3),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(shifted.decode(params, 0.5 * (z - 0.3)), nhwc(ref["decoded"]),
                             rtol=2e-4, atol=2e-4)
  assert stage.latent_shape((16, 16, 3)) == (8, 8, 4)
  with pytest.raises(ValueError, match="sides divisible by 2"):
    stage.latent_shape((15, 16, 3))
