"""The KL-autoencoder first stage: sgm's numbers, weight loading, and latent
diffusion through the train step, the trainer and the sampler."""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization

from configs import mnist
from scoreflow_jax import data, first_stage as first_stage_lib, generate, run_config
from scoreflow_jax import model as model_lib, trainer
from scoreflow_jax import train_step as ts
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


# --- latent diffusion end to end: a tiny autoencoder for 28x28x1 images -------------

def _write_weights(path, seed=0):
  module = ae.AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
  ae.save_safetensors(ae.state_dict_from_params(params), str(path))


def latent_config(weights, **training):
  config = mnist.get_config("tiny")
  config.model.first_stage = "kl_autoencoder"
  a = config.model.autoencoder
  a.weights, a.in_channels, a.ch, a.ch_mult = str(weights), 1, 32, (1, 2)
  a.num_res_blocks, a.resolution, a.scale_factor = 1, 28, 0.7
  config.model.score_flow.in_channels = 4
  config.training.image_every = 0
  for k, v in training.items():
    config.training[k] = v
  return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
  _write_weights(path)
  return path


def test_loss_is_the_pixel_loss_of_the_encoded_batch(weights):
  # sgm's shared_step: encode_first_stage, then the loss on the latents. The
  # KL model's loss equals a latent-space model's loss on the latents drawn
  # with each sample's third key stream.
  config = latent_config(weights)
  model = model_lib.build_model(config)
  images, labels = data.make_synthetic(8)
  batch = data.to_model_batch(images, labels)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  keys = jax.random.split(jax.random.key(1), 8)
  fs = model.first_stage
  latents = fs.encode(fs.params, jnp.asarray(batch["jpg"]),
                      jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
  assert latents.shape == (8, 14, 14, 4)
  pixel_space = model_lib.DiffusionModel(
      network=model.network, conditioner=model.conditioner,
      first_stage=first_stage_lib.IdentityFirstStage(), sigma_data=model.sigma_data)
  ours, sigma = jax.jit(model.per_sample_loss)(params, batch, keys, fs.params)
  theirs, sigma2 = jax.jit(pixel_space.per_sample_loss)(
      params, {"jpg": latents, "cls": batch["cls"]}, keys)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  np.testing.assert_array_equal(sigma, sigma2)
  # the posterior draw matters: the loss on its mean differs
  mean_only = jax.jit(pixel_space.per_sample_loss)(
      params, {"jpg": fs.encode(fs.params, jnp.asarray(batch["jpg"])), "cls": batch["cls"]},
      keys)[0]
  assert not np.allclose(ours, mean_only, rtol=1e-3)


def test_cached_moments_give_the_encoders_latents_and_loss(weights):
  # model.autoencoder.cache_moments: the training set's posterior moments are
  # computed once (in chunks, over the devices) and each step draws from them
  # with the key it would have encoded with: the loss is the per-step encode's.
  config = latent_config(weights)
  model = model_lib.build_model(config)
  fs = model.first_stage
  images, labels = data.make_synthetic(13)
  direct = jax.jit(fs.moments)(fs.params, data.to_model_images(images))
  lines = []
  cached = first_stage_lib.dataset_moments(fs, images, chunk=5, log=lines.append,
                                           log_every_s=0.0)
  assert cached.dtype == np.float32 and cached.shape == (13, 14, 14, 8)
  np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)  # 13 = 8 + 5 (4 padded)
  assert lines and "img/s" in lines[0] and "ETA" in lines[0]
  with pytest.raises(ValueError, match="uint8 images"):
    first_stage_lib.dataset_moments(fs, data.to_model_images(images))

  batch = data.to_model_batch(images, labels)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  keys = jax.random.split(jax.random.key(1), 13)
  loss = jax.jit(model.per_sample_loss)
  from_images, sigma = loss(params, batch, keys, fs.params)
  from_moments, sigma2 = loss(params, data.to_moments_batch(cached, labels), keys)
  np.testing.assert_allclose(from_moments, from_images, rtol=1e-5)
  np.testing.assert_array_equal(sigma, sigma2)
  pixel_space = model_lib.DiffusionModel(
      network=model.network, conditioner=model.conditioner,
      first_stage=first_stage_lib.IdentityFirstStage(), sigma_data=model.sigma_data)
  with pytest.raises(ValueError, match="holds 'moments'.*IdentityFirstStage"):
    pixel_space.per_sample_loss(params, data.to_moments_batch(cached, labels), keys)


def test_latent_train_step_same_on_1_and_4_devices(weights):
  config = latent_config(weights)
  model = model_lib.build_model(config)
  tx, schedule = ts.make_optimizer(config.optim, 100)
  images, labels = data.make_synthetic(16)
  batch = data.to_model_batch(images, labels)
  results = {}
  for n in (1, 4):
    mesh = ts.make_mesh(jax.devices()[:n])
    state = ts.replicate(ts.create_train_state(model, tx, jax.random.key(0), batch), mesh)
    step = ts.make_train_step(model, tx, schedule, mesh, 0.99)
    fs_params = ts.replicate(model.first_stage.params, mesh)
    with pytest.raises(ValueError, match="pass its weights"):  # not compiled in
      step(state, ts.global_batch(batch, mesh))
    losses = []
    for _ in range(2):
      state, metrics = step(state, ts.global_batch(batch, mesh), fs_params)
      losses.append(float(metrics["loss"]))
    results[n] = (jax.device_get(state.params), losses)
  # batches of cached moments: no encoder weights needed, the same step
  mesh = ts.make_mesh(jax.devices()[:4])
  state = ts.replicate(ts.create_train_state(model, tx, jax.random.key(0), batch), mesh)
  step = ts.make_train_step(model, tx, schedule, mesh, 0.99)
  moments_batch = ts.global_batch(data.to_moments_batch(
      first_stage_lib.dataset_moments(model.first_stage, images), labels), mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, moments_batch)
    losses.append(float(metrics["loss"]))
  results["moments"] = (jax.device_get(state.params), losses)
  for n in (4, "moments"):
    chex.assert_trees_all_close(results[n][0], results[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[n][1], results[1][1], rtol=1e-5)
  # the network sees latents: its flow is over 14 * 14 * 4 features
  assert model.first_stage.latent_shape((28, 28, 1)) == (14, 14, 4)


def test_latent_runs_cached_or_per_step_train_alike_resume_and_sample(weights, tmp_path):
  # train.py's default encodes the training set once; cache_moments=False
  # encodes every batch, as sgm does. Same batches, same keys, same draws:
  # the same parameters after a few steps, up to float rounding.
  states, logs, summaries = {}, {}, {}
  for cache in (True, False):
    config = latent_config(weights, num_steps=3, checkpoint_every=3, log_every=1)
    config.model.autoencoder.cache_moments = cache
    if cache:
      config.model.autoencoder.weights = os.path.relpath(str(weights))  # as typed by a user
    logs[cache] = []
    out = trainer.train_and_evaluate(config, str(tmp_path / f"run_{cache}"),
                                     log=logs[cache].append)
    assert out["step"] == 3
    states[cache] = ts.host(out["state"].params)
    summaries[cache] = out["metrics"]
  chex.assert_trees_all_close(states[True], states[False], rtol=1e-4, atol=1e-6)
  assert any("encoded the 256 training images once" in line for line in logs[True])
  assert not any("encoded the" in line for line in logs[False])
  np.testing.assert_allclose(summaries[True]["train/loss"], summaries[False]["train/loss"],
                             rtol=1e-5)
  # the moments are kept in the run folder with what they are the moments of
  workdir = str(tmp_path / "run_True")
  path = os.path.join(workdir, trainer.MOMENTS_FILE)
  kept = np.load(path)
  fresh = first_stage_lib.dataset_moments(
      first_stage_lib.get_first_stage(latent_config(weights).model),
      data.load_dataset(latent_config(weights).data)[0])
  np.testing.assert_array_equal(kept, fresh)
  assert not os.path.exists(os.path.join(str(tmp_path / "run_False"), trainer.MOMENTS_FILE))
  # a run goes on either way (and runs from before the switch, whose
  # checkpoints do not record it, still load)
  config = latent_config(weights, num_steps=4, checkpoint_every=4, log_every=1)
  config.model.autoencoder.cache_moments = False
  assert trainer.train_and_evaluate(config, workdir, log=lambda s: None)["step"] == 4
  # a resume reads them back: the same training as encoding again
  lines, again = [], {}
  for read_back in (True, False):
    if not read_back:
      os.remove(path + ".json")
    copy = str(tmp_path / f"resumed_{read_back}")
    shutil.copytree(workdir, copy)
    out = trainer.train_and_evaluate(
        latent_config(weights, num_steps=6, checkpoint_every=6, log_every=1), copy,
        log=lines.append)
    again[read_back] = ts.host(out["state"].params)
  assert sum("read the 256 training images' posterior moments back" in l for l in lines) == 1
  assert sum("encoded the 256 training images once" in l for l in lines) == 1
  chex.assert_trees_all_equal(again[True], again[False])
  # with nothing left to train, a resume says so without encoding the data set
  config.model.autoencoder.cache_moments, lines = True, []
  assert trainer.train_and_evaluate(config, workdir, log=lines.append)["step"] == 4
  assert any("nothing to train" in line for line in lines)
  assert not any("encoded the" in line for line in lines), lines
  from scoreflow_jax import checkpointing
  old = json.loads(config.model.to_json())
  del old["autoencoder"]["cache_moments"]
  assert checkpointing._signature(old) == checkpointing.model_signature(config)
  # a run saved before shift_factor existed (session 26) loads: no field is 0
  del old["autoencoder"]["shift_factor"]
  assert checkpointing._signature(old) == checkpointing.model_signature(config)
  config.model.autoencoder.shift_factor = 0.5
  assert checkpointing._signature(old) != checkpointing.model_signature(config)
  config.model.autoencoder.shift_factor = 0.0

  # the run folder names its autoencoder, and sample.py decodes to pixels
  saved = run_config.load(workdir)
  assert saved.model.first_stage == "kl_autoencoder"
  assert saved.model.autoencoder.sha256 == first_stage_lib.file_sha256(str(weights))
  assert saved.model.autoencoder.weights == str(weights)  # absolute: found from any folder
  out = str(tmp_path / "grid.png")
  generate.sample_from_run(workdir, out, num_per_class=1, classes=[0, 3], num_steps=2,
                           log=lambda s: None)
  with np.load(out[:-4] + ".npz") as f:
    images = f["images"]
  assert images.shape == (2, 28, 28, 1)  # decoded to pixels
  assert np.isfinite(images).all() and images.std() > 0

  # other weights under the run's path: refused, naming the file, and nothing written
  _write_weights(weights.parent / "other.safetensors", seed=1)
  original = str(weights) + ".orig"
  shutil.copy(weights, original)
  try:
    shutil.copy(weights.parent / "other.safetensors", weights)
    with pytest.raises(ValueError, match="not the ones this run was trained with"):
      generate.sample_from_run(workdir, str(tmp_path / "grid2.png"), num_per_class=1,
                               log=lambda s: None)
    assert not os.path.exists(tmp_path / "grid2.png")
  finally:
    shutil.copy(original, weights)


def test_stored_moments_are_read_back_only_for_their_images_and_weights(weights, tmp_path,
                                                                        monkeypatch):
  stage = first_stage_lib.get_first_stage(latent_config(weights).model)
  images = data.make_synthetic(6)[0]
  moments = np.arange(6 * 14 * 14 * 8, dtype=np.float32).reshape(6, 14, 14, 8)
  path = str(tmp_path / "m.npy")
  read = lambda imgs=images: first_stage_lib.read_stored_moments(stage, imgs, path)
  assert read() is None  # nothing stored
  first_stage_lib.store_moments(stage, images, moments, path)
  np.testing.assert_array_equal(read(), moments)
  assert read(images[::-1]) is None  # the same images in another order
  other = first_stage_lib.KLAutoencoderFirstStage(stage.module, stage.params, 0.7,
                                                  sha256="other")
  assert first_stage_lib.read_stored_moments(other, images, path) is None
  # a stop between the two files leaves no sidecar that describes other moments
  real_replace = os.replace
  def stop_at_sidecar(src, dst):
    if dst.endswith(".json"):
      raise KeyboardInterrupt
    real_replace(src, dst)
  monkeypatch.setattr(os, "replace", stop_at_sidecar)
  with pytest.raises(KeyboardInterrupt):
    first_stage_lib.store_moments(stage, images[::-1], moments[::-1], path)
  monkeypatch.setattr(os, "replace", real_replace)
  assert read() is None and read(images[::-1]) is None
  # unreadable files are encoded again, not a crash
  first_stage_lib.store_moments(stage, images, moments, path)
  open(path, "wb").close()  # empty: np.load raises EOFError
  assert read() is None
  first_stage_lib.store_moments(stage, images, moments, path)
  with open(path + ".json", "w") as f:
    f.write("[1, 2]")
  assert read() is None
  # an array of another shape (or dtype) than its sidecar records is not read
  first_stage_lib.store_moments(stage, images, moments, path)
  np.save(path, moments[:3])
  assert read() is None
  np.save(path, moments.astype(np.float64))
  assert read() is None


def test_a_published_unit_variance_scale_at_sigma_data_half_is_told(weights):
  # An sgm/ldm file records no latent std; SDXL's or SD's published factor
  # scales to unit variance, twice the std sigma_data = 0.5 assumes.
  from types import SimpleNamespace
  data_config = ml_collections.ConfigDict({"holdout": 0, "name": "mnist"})
  def told(scale, sigma_data, path=weights):
    model = SimpleNamespace(sigma_data=sigma_data, autoencoder=SimpleNamespace(
        weights=str(path), scale_factor=scale, shift_factor=0.0))
    return first_stage_lib.autoencoder_warnings(model, data_config)
  message, = told(0.13025, 0.5)
  assert "is SDXL's VAE's" in message and "sigma_data is 0.5" in message
  assert "--config.model.autoencoder.scale_factor=0.065125 " in message
  assert "Stable Diffusion 1.x/2.x" in told(0.18215, 0.5, "sd_vae.ckpt")[0]
  assert not told(0.13025, 1.0) and not told(0.065125, 0.5) and not told(0.15, 0.5)


def test_config_errors(weights, tmp_path):
  config = latent_config(weights)
  config.model.score_flow.in_channels = 1
  with pytest.raises(ValueError, match=r"must be the autoencoder's latent channels.*embed_dim=4"):
    trainer.validate_config(config)
  config = latent_config(tmp_path / "nowhere.safetensors")
  with pytest.raises(FileNotFoundError, match="no autoencoder weights at"):
    trainer.validate_config(config)
  config = latent_config(weights)
  config.model.autoencoder.weights = None
  with pytest.raises(ValueError, match="needs its weights"):
    trainer.validate_config(config)
  config = latent_config(weights)
  config.data.image_size = 27  # the autoencoder halves the sides once
  with pytest.raises(ValueError, match="sides divisible by 2"):
    trainer.validate_config(config)
  config = latent_config(weights)
  config.model.autoencoder.ch = 48
  with pytest.raises(ValueError, match="multiple of 32"):
    trainer.validate_config(config)
  config = latent_config(weights)
  config.model.first_stage = "vq"
  with pytest.raises(ValueError, match="unknown first stage 'vq'"):
    trainer.validate_config(config)


# --- train_autoencoder.py: a small VAE for MNIST ------------------------------------

def test_autoencoder_training_learns_and_reports(tmp_path):
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(64)[0], np.float32) / 127.5 - 1.0
  # one level (no resampling) keeps it quick; the network is checked against sgm above
  module = ae.AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  steps = 20
  # train's own start (it inits from fold_in(key(seed), steps)), jit: eager takes 10 s
  params = jax.jit(module.init)(jax.random.fold_in(jax.random.key(0), steps), images[:1])

  @jax.jit
  def by_hand(params, x, key):
    mean, logvar = module.apply(params, x, method="moments")
    draw = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return mean, logvar, module.apply(params, draw, method="decode"), module.apply(
        params, mean, method="decode")

  # the loss decodes a posterior draw: L1 summed over pixels, KL summed over latents
  key = jax.random.key(5)
  rec, kl = jax.jit(aet.loss_terms, static_argnums=0)(module, params, images[:4], key)
  mean, logvar, decoded, _ = by_hand(params, images[:4], key)
  np.testing.assert_allclose(rec, np.abs(images[:4] - decoded).sum(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(kl, ae.kl_divergence(mean, logvar), rtol=1e-6)

  lines, handlers = [], []
  def log(line):  # without a checkpoint a stop has nowhere to go: signals left alone
    lines.append(line)
    handlers.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
  trained, _ = aet.train(module, images, steps=steps, batch_size=8, learning_rate=2e-3,
                         log=log, log_every=10)
  assert len(lines) == 3 and "| compiled |" in lines[0]  # steps 1 (compiling), 10, 20
  assert set(handlers) == {(signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))}
  assert "steps/s" in lines[-1] and "ETA" in lines[-1]
  before, after = aet.evaluate(module, params, images), aet.evaluate(module, trained, images)
  assert after["mae"] < 0.7 * before["mae"], (before, after)
  # evaluate's numbers, recomputed
  mean, _, _, rec = by_hand(trained, images, key)
  rec = np.clip(rec, -1, 1)
  np.testing.assert_allclose(after["mae"], np.abs(rec - images).mean(), rtol=1e-4)
  np.testing.assert_allclose(after["scale_factor"], 0.5 / np.std(mean), rtol=1e-4)
  np.testing.assert_allclose(after["latent_mean"], np.mean(mean), rtol=1e-4, atol=1e-6)
  mse = (((rec - images) / 2) ** 2).reshape(64, -1).mean(1)
  np.testing.assert_allclose(after["psnr"], np.mean(-10 * np.log10(mse)), rtol=1e-4)
  with pytest.raises(ValueError, match="kl_weight must be >= 0"):
    aet.train(module, images, steps=1, kl_weight=-1.0)
  for rate in (0.0, -1e-3, float("nan")):  # trained nothing (0) or away, silently
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
      aet.train(module, images, steps=1, learning_rate=rate)


def test_autoencoder_training_stops_saves_and_resumes_exactly(tmp_path, monkeypatch,
                                                              terminal_sigint):
  # SIGTERM, then SIGINT, stops training at a step boundary, saved; the
  # resumed run's weights are bit for bit those of a run never stopped (same
  # batches: 24 images in batches of 8 cross epochs; same keys, Adam state).
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(24)[0], np.float32) / 127.5 - 1.0
  module = ae.AutoencoderKL(embed_dim=2, ch=32, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  kwargs = dict(steps=7, batch_size=8, learning_rate=2e-3, seed=3, log_every=1)
  whole, _ = aet.train(module, images, log=lambda line: None, **kwargs)
  ckpt = str(tmp_path / "vae.safetensors.ckpt")
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

  def stop_after(step, signum):
    def log(line):
      if line.startswith(f"step {step}/7"):
        os.kill(os.getpid(), signum)  # handled: recorded, acted on before the next step
    return log
  lines = []
  for step, signum in ((4, signal.SIGTERM), (5, signal.SIGINT), (7, signal.SIGTERM)):
    # (at step 7, the last: saved, and Stopped rather than scored)
    with pytest.raises(aet.Stopped, match=f"stopped at step {step} of 7") as stopped:
      log = stop_after(step, signum)
      aet.train(module, images, log=lambda line: (lines.append(line), log(line)),
                checkpoint=ckpt, checkpoint_every=0, settings={"dataset": "synthetic"},
                **kwargs)
    assert stopped.value.exit_code == 128 + signum
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    if step == 5:
      saved = open(ckpt, "rb").read()
      shutil.copy(ckpt, ckpt + ".at5")
  assert [line for line in lines if line.startswith("resuming")] == [
      f"resuming from {ckpt}: step {s} of 7" for s in (4, 5)]
  # a divergence after a resume names the checkpoint it resumed from (step 5)
  shutil.copy(ckpt + ".at5", ckpt)
  with monkeypatch.context() as m:
    m.setattr(aet.optax, "apply_updates",
              lambda params, updates: jax.tree.map(lambda p: p * jnp.nan, params))
    with pytest.raises(FloatingPointError,
                       match=f"by step 6: training stopped; {ckpt} holds step 5, the last"):
      aet.train(module, images, log=lambda line: None, checkpoint=ckpt, checkpoint_every=0,
                settings={"dataset": "synthetic"}, **kwargs)
  os.replace(ckpt + ".at5", ckpt)
  # other settings are refused and the checkpoint is kept as it was
  for change, named in (({"learning_rate": 1e-3}, "learning_rate 0.002 there, 0.001 here"),
                        ({"settings": {"dataset": "mnist"}}, "dataset 'synthetic' there"),
                        ({"settings": {"dataset": "synthetic", "images_sha256": "0"}},
                         "the training images")):
    args = {**kwargs, "settings": {"dataset": "synthetic"}, **change}
    with pytest.raises(ValueError, match=f"other settings.*{named}.*delete {ckpt}"):
      aet.train(module, images, log=lambda line: None, checkpoint=ckpt, **args)
    assert open(ckpt, "rb").read() == saved
  lines = []
  resumed, seconds = aet.train(module, images, log=lines.append, checkpoint=ckpt,
                               checkpoint_every=0, settings={"dataset": "synthetic"},
                               **kwargs)
  assert lines[0] == f"resuming from {ckpt}: step 5 of 7"
  assert lines[1].startswith("step 6/7") and "| compiled |" in lines[1], lines
  chex.assert_trees_all_equal(resumed, whole)
  # the final state is saved too: a crash while scoring loses no training;
  # the seconds are those of every call
  lines = []
  again, again_seconds = aet.train(module, images, log=lines.append, checkpoint=ckpt,
                                   settings={"dataset": "synthetic"}, **kwargs)
  assert lines == [f"resuming from {ckpt}: step 7 of 7"]
  chex.assert_trees_all_equal(again, whole)
  assert seconds < again_seconds < seconds + 5
  open(ckpt, "wb").write(saved[:len(saved) // 2])  # cut short (a failing disk)
  with pytest.raises(ValueError, match="not a readable train_autoencoder.py checkpoint"):
    aet.train(module, images, log=lambda line: None, checkpoint=ckpt,
              settings={"dataset": "synthetic"}, **kwargs)
  os.remove(ckpt)
  # a save is of finite weights only: a diverging run keeps its last good state
  with pytest.raises(FloatingPointError, match="non-finite autoencoder loss or weights "
                     rf"by step (\d).*{ckpt} holds step (\d), the last finite") as e:
    aet.train(module, images, log=lambda line: None, checkpoint=ckpt, checkpoint_every=1,
              **{**kwargs, "learning_rate": 1e12, "log_every": 100})
  bad, good = map(int, re.search(r"by step (\d).*holds step (\d)", str(e.value)).groups())
  assert good == bad - 1
  state = serialization.msgpack_restore(open(ckpt, "rb").read())
  assert state["step"] == good and all(
      np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_train_autoencoder_script_stops_on_sigterm_and_resumes(tmp_path):
  # What a preempted job sees: SIGTERM saves, exits 128 + 15 with one line
  # (no traceback); the same command resumes from the step it saved.
  import subprocess
  import sys
  from tests.test_cli import ROOT
  from tests.test_eval import _write_mnist
  _write_mnist(tmp_path, *data.make_synthetic(64, seed=1), "train")
  _write_mnist(tmp_path, *data.make_synthetic(32, seed=2), "t10k")
  out = tmp_path / "vae.safetensors"
  command = [sys.executable, "train_autoencoder.py", "--data_dir", str(tmp_path), "--out",
             str(out), "--steps", "1000000", "--batch_size", "8", "--ch_mult", "1",
             "--embed_dim", "2"]
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  for attempt in range(2):
    proc = subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = []
    for line in proc.stdout:  # wait for the first step, then stop the run
      head.append(line)
      if "| compiled |" in line:
        break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    stdout = "".join(head) + stdout
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    told = re.findall(r"SIGTERM received: stopped at step (\d+) of 1000000; saved "
                      + re.escape(f"{out}.ckpt"), stdout)
    assert len(told) == 1, stdout
    if attempt == 0:
      first = int(told[0])
    else:
      assert f"resuming from {out}.ckpt: step {first} of 1000000" in stdout
      assert int(told[0]) > first
  assert os.path.exists(f"{out}.ckpt") and not os.path.exists(out)


def test_train_autoencoder_script_then_latent_config(tmp_path):
  # The script's weights and printed flags give a first stage that loads them.
  from tests.test_cli import run
  from tests.test_eval import _write_mnist
  _write_mnist(tmp_path, *data.make_synthetic(64, seed=1), "train")
  _write_mnist(tmp_path, *data.make_synthetic(32, seed=2), "t10k")
  out = tmp_path / "vae.safetensors"
  args = ("train_autoencoder.py", "--data_dir", str(tmp_path), "--out", str(out),
          "--steps", "3", "--batch_size", "8", "--ch_mult", "1,2")
  proc = run(*args)
  assert "test reconstruction" in proc.stdout and "steps/s" in proc.stdout
  assert not os.path.exists(f"{out}.ckpt")  # the resume file goes once --out is written
  flags = shlex.split(proc.stdout.strip().splitlines()[-1])  # as a shell would
  assert flags[0] == "--config.model.first_stage=kl_autoencoder"
  workdir = tmp_path / "run"
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", str(workdir),
             "--config.training.num_steps=2", "--config.training.image_every=2",
             "--config.model.score_flow.in_channels=4", "--config.data.name=mnist",
             "--config.data.source=offline", f"--config.data.data_dir={tmp_path}", *flags)
  assert "scale_factor" not in proc.stdout + proc.stderr  # the printed one: no warning
  saved = run_config.load(str(workdir)).model.autoencoder
  header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
  results = json.loads(header["__metadata__"]["results"])
  assert results["steps"] == 3
  np.testing.assert_allclose(saved.scale_factor, results["scale_factor"], rtol=1e-4)
  np.testing.assert_allclose(saved.shift_factor, results["latent_mean"], rtol=1e-4, atol=1e-6)
  # another file's scale (e.g. a config's default for another VAE) is told, in
  # the model's sigma_data; so are held-out images the autoencoder saw
  from types import SimpleNamespace
  recorded, std = results["scale_factor"], results["latent_std"]
  latent_mean = results["latent_mean"]
  def warnings(factor, sigma_data=0.5, holdout=0, name="mnist", shift=latent_mean):
    model = SimpleNamespace(sigma_data=sigma_data, autoencoder=SimpleNamespace(
        weights=str(out), scale_factor=factor * recorded, shift_factor=shift))
    return first_stage_lib.autoencoder_warnings(
        model, ml_collections.ConfigDict({"holdout": holdout, "name": name}))
  for factor, sigma_data, n in ((1.0, 0.5, 0), (1.01, 0.5, 0), (1.2, 0.5, 1),
                                (0.5, 0.5, 1), (2.0, 1.0, 0), (1.0, 1.0, 1)):
    assert len(warnings(factor, sigma_data)) == n, (factor, sigma_data)
  message, = warnings(1.2)
  assert f"to std {1.2 * 0.5:.3g}, not model.sigma_data=0.5" in message
  assert f"--config.model.autoencoder.scale_factor={recorded:.5g}." in message
  assert f"scale_factor={2 * recorded:.5g}." in warnings(1.0, sigma_data=1.0)[0]
  np.testing.assert_allclose(recorded * std, 0.5, rtol=1e-6)
  # a shift leaving the scaled latents' mean beyond 0.2 sigma_data is told
  assert not warnings(1.0, shift=latent_mean + 0.19 * std)
  message, = warnings(1.0, shift=latent_mean + 0.21 * std)
  assert f"a mean of {-0.21 * 0.5:.3g}" in message
  assert f"--config.model.autoencoder.shift_factor={latent_mean:.5g}." in message
  message, = warnings(1.0, holdout=10)  # trained with --holdout 0 (the default)
  assert "train_autoencoder.py --holdout 10" in message
  assert "trained on mnist" in warnings(1.0, name="cifar10")[0]
  assert tuple(saved.ch_mult) == (1, 2) and saved.sha256 == first_stage_lib.file_sha256(str(out))
  assert os.path.exists(workdir / "images" / "train" / "step_0000002.png")  # decoded grid
  # an existing --out is kept; bad flags are one line
  bad = run(*args, check=False)
  assert bad.returncode != 0 and "exists; pass --overwrite" in bad.stderr
  bad = run(*args[:-1], "1,x", "--overwrite", check=False)
  assert bad.returncode != 0 and "integers separated by commas" in bad.stderr
  bad = run(*args[:-1], "1,2", "--overwrite", "--ch", "48", check=False)
  assert bad.returncode != 0 and "--ch must be a multiple of 32" in bad.stderr
  bad = run(*args, "--overwrite", "--checkpoint_every", "-1", check=False)
  assert bad.returncode != 0 and "--checkpoint_every must be >= 0" in bad.stderr
  (tmp_path / "vae.safetensors.ckpt").write_bytes(b"not a checkpoint")
  bad = run(*args, "--overwrite", check=False)  # a resume file it cannot read is kept
  assert bad.returncode == 1 and "not a readable train_autoencoder.py checkpoint" in bad.stderr
  assert (tmp_path / "vae.safetensors.ckpt").read_bytes() == b"not a checkpoint"
  os.remove(tmp_path / "vae.safetensors.ckpt")
  # errors name this script's flags, not train.py's config fields
  for extra, message in ((["--embed_dim", "0"], "--num_res_blocks, --embed_dim and every"),
                         (["--holdout", "64"], "--holdout 64 must be in [0, 64)"),
                         (["--ch_mult", "1,2,2,2"], "use fewer levels")):
    bad = run(*args, "--overwrite", *extra, check=False)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-600:]
    assert "config.model" not in bad.stderr.strip().splitlines()[-1]

  _check_latent_diagnose(str(workdir), str(tmp_path))


def _check_latent_diagnose(workdir, data_dir):
  """evaluate.py --diagnose on a latent run: its losses are in the latents and
  its sigma-0 FD row scores the start images through the autoencoder (the
  decoder's floor), as every later row's images are decoded."""
  from scoreflow_jax.eval import diagnostics, metrics
  from tests.test_diagnostics import write_tiny_classifier
  clf = os.path.join(os.path.dirname(workdir), "clf.npz")
  cparams = write_tiny_classifier(clf)
  res = diagnostics.diagnose_run(workdir, data_dir, classifier_path=clf, sigmas=(1.0,),
                                 start_sigmas=(0.5,), num_images=10,
                                 renoise_from=("test",), log=lambda s: None)
  assert all(np.isfinite(res["loss"][split][0]) for split in ("train", "test"))
  row0 = res["renoise"]["rows"]["test"][0]
  # row 0 recomputed: the 10 start images' posterior means, decoded
  model, _, _ = generate.load_run(workdir)
  fs = model.first_stage
  test_images, test_labels = data.load_run_split("mnist", "test", "offline", data_dir)
  idx = diagnostics.balanced_subset(test_labels, 10, 10)
  rest = np.ones(len(test_labels), bool)
  rest[idx] = False
  x = jnp.asarray(data.to_model_images(test_images[idx]))
  decoded = np.clip(np.asarray(fs.decode(fs.params, fs.encode(fs.params, x))), -1.0, 1.0)
  score = lambda imgs: metrics.evaluate_samples(
      cparams, imgs, test_labels[idx], test_images[rest], test_labels[rest], 10)["fd"]
  np.testing.assert_allclose(row0["fd"], score(decoded), rtol=1e-4)
  assert not np.isclose(row0["fd"], score(test_images[idx]), rtol=1e-3)  # not the raw images


def test_autoencoder_checkpoint_refuses_each_other_training_setting(tmp_path):
  # Each argument that shapes the training is part of the checkpoint's settings:
  # a resume with another seed, kl_weight, batch_size, steps or network is
  # refused (it would silently mix two runs), naming what differs.
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(16)[0], np.float32) / 127.5 - 1.0
  small = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
               resolution=28, in_channels=1, out_ch=1)
  module = ae.AutoencoderKL(embed_dim=2, **small)
  ckpt = str(tmp_path / "vae.safetensors.ckpt")
  kwargs = dict(steps=2, batch_size=8, learning_rate=2e-3, kl_weight=1e-6, seed=3,
                log=lambda line: None, checkpoint=ckpt, settings={"dataset": "synthetic"})
  aet.train(module, images, **kwargs)  # the last step is saved
  saved = open(ckpt, "rb").read()
  for change, named in (({"seed": 4}, "seed 3 there, 4 here"),
                        ({"kl_weight": 1e-3}, "kl_weight 1e-06 there, 0.001 here"),
                        ({"batch_size": 4}, "batch_size 8 there, 4 here"),
                        ({"steps": 3}, "steps 2 there, 3 here")):
    with pytest.raises(ValueError, match=f"other settings.*{named}"):
      aet.train(module, images, **{**kwargs, **change})
    assert open(ckpt, "rb").read() == saved
  with pytest.raises(ValueError, match=r"other settings \(the network \(ch, ch_mult"):
    aet.train(ae.AutoencoderKL(embed_dim=1, **small), images, **kwargs)
  assert open(ckpt, "rb").read() == saved


def test_autoencoder_checkpoint_is_checked_before_init_and_against_the_network(
    tmp_path, monkeypatch):
  # A checkpoint is read and its settings checked before the network is
  # initialised (a refusal comes at once, not after a compile), and a resume
  # restores it into the network's shapes without initialising the weights
  # it replaces; an array of another shape or a missing one is refused.
  import copy
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(16)[0], np.float32) / 127.5 - 1.0
  module = ae.AutoencoderKL(embed_dim=2, ch=32, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  ckpt = str(tmp_path / "vae.safetensors.ckpt")
  kwargs = dict(steps=2, batch_size=8, learning_rate=2e-3, seed=3, log=lambda line: None,
                checkpoint=ckpt, settings={"dataset": "synthetic"})
  trained, _ = aet.train(module, images, **kwargs)
  saved = open(ckpt, "rb").read()
  real_jit, compiled = jax.jit, []
  monkeypatch.setattr(aet.jax, "jit", lambda f, *a, **k: (compiled.append(f), real_jit(
      f, *a, **k))[1])
  with pytest.raises(ValueError, match="other settings.*seed 3 there, 4 here"):
    aet.train(module, images, **{**kwargs, "seed": 4})
  assert not compiled  # refused before anything was traced or compiled
  # step 2 of 2: nothing to train; init only traced (eval_shape), never run
  init, concrete = ae.AutoencoderKL.init, []
  def spy(self, *args, **kw):
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
      concrete.append(args)
    return init(self, *args, **kw)
  monkeypatch.setattr(ae.AutoencoderKL, "init", spy)
  again, _ = aet.train(module, images, **kwargs)
  assert not [f for f in compiled if getattr(f, "__name__", "") == "init"]  # not initialised
  assert not concrete, "the resume computed initial weights it then replaced"
  chex.assert_trees_all_equal(again, trained)
  monkeypatch.undo()
  state = serialization.msgpack_restore(saved)
  def conv_in(tree):
    return tree["params"]["encoder"]["conv_in"]
  kernel = np.asarray(conv_in(state["params"])["kernel"])
  for where, change, named in (
      ("params", "shape", r"\(3, 3, 1, 31\) float32 where the network has "
                          r"\(3, 3, 1, 32\) float32"),
      ("params", "dtype", r"\(3, 3, 1, 32\) float16 where the network has "
                          r"\(3, 3, 1, 32\) float32"),
      ("params", "missing", "kernel"),
      ("params", "extra", "its params hold arrays this network does not have"),
      ("opt_state", "shape", r"\(3, 3, 1, 31\) float32 where the network has"),
      ("opt_state", "dtype", r"\(3, 3, 1, 32\) float16 where the network has")):
    bad = copy.deepcopy(state)
    conv = conv_in(bad["params"] if where == "params" else bad["opt_state"]["0"]["mu"])
    if change == "missing":
      del conv["kernel"]
    elif change == "extra":
      conv["kernel_2"] = kernel
    else:
      conv["kernel"] = kernel.astype(np.float16) if change == "dtype" else kernel[..., :31]
    blob = serialization.msgpack_serialize(bad)
    open(ckpt, "wb").write(blob)
    with pytest.raises(ValueError, match=f"does not hold this network's state.*{named}"):
      aet.train(module, images, **kwargs)
    assert open(ckpt, "rb").read() == blob  # refused, kept


def test_train_autoencoder_flags_are_checked_before_jax_is_imported(tmp_path):
  # A mistyped flag is told at once: no JAX start-up before the one-line error.
  from tests.test_cli import run_noting_jax
  for bad, message in ((["--ch_mult", "1,x"], "integers separated by commas"),
                       (["--steps", "0"], "--steps and --batch_size must be >= 1"),
                       (["--checkpoint_every", "-1"], "--checkpoint_every must be >= 0"),
                       (["--embed_dim", "0"], "--num_res_blocks, --embed_dim")):
    proc, jax_imported = run_noting_jax("train_autoencoder.py", "--data_dir", tmp_path,
                                        "--out", tmp_path / "vae.safetensors", *bad)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1000:]
    assert not jax_imported, (bad, proc.stderr[-1000:])


def test_train_autoencoder_script_passes_each_flag_on(tmp_path):
  # Every training flag reaches the training (and is recorded in --out's
  # results): a flag dropped or passed in another's place trains another model.
  import subprocess
  import sys
  from tests.test_cli import ROOT
  from tests.test_eval import _write_mnist
  _write_mnist(tmp_path, *data.make_synthetic(32, seed=1), "train")
  _write_mnist(tmp_path, *data.make_synthetic(16, seed=2), "t10k")
  out = tmp_path / "vae.safetensors"
  spy = ("import json, sys\n"
         "from absl import app\n"
         "import train_autoencoder as script\n"
         "from scoreflow_jax import autoencoder_training as aet\n"
         "train = aet.train\n"
         "def spy(module, images, steps, batch_size, learning_rate, kl_weight, seed, log,"
         " **kw):\n"
         "  print('SPY ' + json.dumps(dict(steps=steps, batch_size=batch_size,"
         " learning_rate=learning_rate, kl_weight=kl_weight, seed=seed,"
         " checkpoint_every=kw['checkpoint_every'])), flush=True)\n"
         "  return train(module, images, steps, batch_size, learning_rate, kl_weight, seed,"
         " log, **kw)\n"
         "aet.train = spy\n"
         "sys.argv[0] = 'train_autoencoder.py'\n"
         "app.run(script.main)\n")
  flags = dict(steps=2, batch_size=4, learning_rate=0.003, kl_weight=0.25, seed=5,
               checkpoint_every=7)
  proc = subprocess.run(
      [sys.executable, "-c", spy, "--data_dir", str(tmp_path), "--out", str(out),
       "--ch_mult", "1", "--embed_dim", "2", "--holdout", "8",
       *[f"--{k}={v}" for k, v in flags.items()]],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  spied, = [json.loads(line[4:]) for line in proc.stdout.splitlines()
            if line.startswith("SPY ")]
  assert spied == flags
  header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
  results = json.loads(header["__metadata__"]["results"])
  assert {k: results[k] for k in ("steps", "batch_size", "learning_rate", "kl_weight",
                                  "seed", "holdout")} == dict(
      {k: v for k, v in flags.items() if k != "checkpoint_every"}, holdout=8)


def test_config_flags_give_tuples_train_py_parses(tmp_path):
  # The printed flags set each tuple field to a tuple (ml_collections parses
  # '(7)' as the int 7: train.py would refuse the command it was told to run),
  # and each number as given. No weights needed: only the module's fields.
  import ast
  from scoreflow_jax import autoencoder_training as aet
  for ch_mult, attn in (((1,), ()), ((1, 2), (7,)), ((1, 2, 2), (7, 14))):
    module = ae.AutoencoderKL(embed_dim=3, z_channels=3, ch=64, ch_mult=ch_mult,
                              num_res_blocks=2, attn_resolutions=attn, resolution=28,
                              in_channels=1, out_ch=1)
    path = str(tmp_path / "my vae.safetensors")  # a space: quoted for the shell
    flags = shlex.split(aet.config_flags(module, 0.15, path, shift_factor=-0.25))
    assert flags[0] == "--config.model.first_stage=kl_autoencoder"
    fields = dict(f.removeprefix("--config.model.autoencoder.").split("=", 1)
                  for f in flags[1:])
    assert fields.pop("weights") == path
    parsed = {k: ast.literal_eval(v) for k, v in fields.items()}
    assert parsed == dict(scale_factor=0.15, shift_factor=-0.25, in_channels=1,
                          embed_dim=3, z_channels=3, ch=64, ch_mult=ch_mult,
                          num_res_blocks=2, attn_resolutions=attn, resolution=28)


def _every_weight_nan(params):
  return jax.tree.map(lambda p: p * jnp.nan, params)


def _last_weight_nan(params):
  leaves, tree = jax.tree.flatten(params)
  leaves[-1] = leaves[-1].reshape(-1).at[-1].set(jnp.nan).reshape(leaves[-1].shape)
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("make_nan", [_every_weight_nan, _last_weight_nan])
def test_autoencoder_checkpoint_is_never_saved_with_non_finite_weights(tmp_path,
                                                                        monkeypatch,
                                                                        make_nan):
  # An update that makes the weights NaN (every one, or one element of the last
  # leaf: every leaf and element is checked) while the step's loss (of the
  # weights before it) is still finite: the save after that step refuses, so no
  # checkpoint of NaN weights is left to resume from.
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(16)[0], np.float32) / 127.5 - 1.0
  module = ae.AutoencoderKL(embed_dim=2, ch=32, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  apply_updates = aet.optax.apply_updates
  monkeypatch.setattr(aet.optax, "apply_updates",
                      lambda params, updates: make_nan(apply_updates(params, updates)))
  ckpt = str(tmp_path / "vae.safetensors.ckpt")
  with pytest.raises(FloatingPointError, match="by step 1: training stopped; try a lower"):
    aet.train(module, images, steps=3, batch_size=8, checkpoint=ckpt, checkpoint_every=1,
              log_every=100, log=lambda line: None)
  assert not os.path.exists(ckpt)


def test_autoencoder_stop_before_the_first_step_of_a_resume_saves(tmp_path, monkeypatch):
  from scoreflow_jax import autoencoder_training as aet
  images = np.asarray(data.make_synthetic(16)[0], np.float32) / 127.5 - 1.0
  module = ae.AutoencoderKL(embed_dim=2, ch=32, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  ckpt = str(tmp_path / "vae.safetensors.ckpt")
  kwargs = dict(steps=2, batch_size=8, log=lambda line: None, checkpoint=ckpt)
  aet.train(module, images, **kwargs)  # saved at step 2 of 2
  real = aet.recording_signals

  @contextlib.contextmanager
  def signalled_at_once(received, *signals):  # a SIGTERM before any step is run
    with real(received, *signals):
      received.append(signal.SIGTERM)
      yield
  monkeypatch.setattr(aet, "recording_signals", signalled_at_once)
  # nothing left to train: the restored weights (saved finite) are saved again
  with pytest.raises(aet.Stopped, match="stopped at step 2 of 2"):
    aet.train(module, images, **kwargs)
  assert serialization.msgpack_restore(open(ckpt, "rb").read())["step"] == 2
