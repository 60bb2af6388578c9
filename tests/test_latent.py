"""Latent diffusion end to end: a tiny KL autoencoder for 28x28x1 images through the
train step, the trainer and the sampler (split from test_autoencoder.py so that
`--dist loadfile` can put it on a worker of its own)."""
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mnist
from scoreflow_jax import data, first_stage as first_stage_lib, generate, run_config
from scoreflow_jax import model as model_lib, trainer
from scoreflow_jax import train_step as ts
from scoreflow_jax.networks import autoencoder as ae


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
