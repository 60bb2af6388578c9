"""Every config file users can pass to train.py is valid, full size and :tiny."""
import importlib
import pathlib

import numpy as np
import pytest

from scoreflow_jax import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# run.py is a run folder's saved config (tests/test_cli.py), not a config of its own
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
               if p.stem not in ("__init__", "default", "run"))


def test_config_files_are_found():
  assert {"mnist", "mnist_seed", "mnist_gauss", "mnist_mixture", "mnist_conv",
          "mnist_conv_gauss", "mnist_conv_mixture", "mnist_latent", "mnist_latent_conv",
          "mnist_unet", "cifar10"} <= set(NAMES)


@pytest.mark.parametrize("arg", [None, "tiny"])
@pytest.mark.parametrize("name", NAMES)
def test_config_is_valid(name, arg, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  if config.model.first_stage == "kl_autoencoder":
    # the autoencoder's weights are the user's (train_autoencoder.py): asked for,
    # then any of the config's ddconfig accepted
    with pytest.raises(ValueError, match="needs its weights"):
      trainer.validate_config(config)
    import jax
    from scoreflow_jax import first_stage
    from scoreflow_jax.networks import autoencoder as ae
    module = first_stage.build_autoencoder(config.model.autoencoder)
    params = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    config.model.autoencoder.weights = str(tmp_path / "vae.safetensors")
    ae.save_safetensors(ae.state_dict_from_params(params), config.model.autoencoder.weights)
  trainer.validate_config(config)  # builds the model too; raises on bad values
  assert config.run_name.endswith("-tiny") == (arg == "tiny")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_is_refused(name):
  # configs/mnist.py:tyni used to start the full-size run
  with pytest.raises(ValueError, match="unknown config variant 'tyni'"):
    importlib.import_module(f"configs.{name}").get_config("tyni")


def test_conv_gauss_is_the_conv_flow_on_the_gaussian_base():
  from configs import mnist_conv, mnist_conv_gauss
  config, conv = mnist_conv_gauss.get_config(), mnist_conv.get_config()
  sf = config.model.score_flow
  assert sf.flow_type == "conv" and sf.gaussian_base and sf.parameterization == "preconditioned"
  assert config.optim.learning_rate == 3e-4 and config.optim.warmup_steps == 200
  # nothing else differs from configs/mnist_conv.py
  conv.model.score_flow.gaussian_base = True
  conv.optim.learning_rate, conv.optim.warmup_steps, conv.run_name = 3e-4, 200, config.run_name
  assert config.to_dict() == conv.to_dict()


def test_mixture_is_the_gauss_config_with_50_components_of_rank_16():
  from configs import mnist_gauss, mnist_mixture
  config, gauss = mnist_mixture.get_config(), mnist_gauss.get_config()
  assert config.model.score_flow.gaussian_components == 50
  gauss.model.score_flow.gaussian_components, gauss.model.score_flow.gaussian_rank = 50, 16
  gauss.run_name = config.run_name
  assert config.to_dict() == gauss.to_dict()


def test_conv_mixture_is_a_small_conv_flow_on_the_mixture_base():
  from configs import mnist_conv_gauss, mnist_conv_mixture, mnist_mixture
  config, conv = mnist_conv_mixture.get_config(), mnist_conv_gauss.get_config()
  sf, mix = config.model.score_flow, mnist_mixture.get_config().model.score_flow
  assert (sf.gaussian_components, sf.gaussian_rank) == (mix.gaussian_components, mix.gaussian_rank)
  assert (sf.n_flows, sf.conv_channels, sf.conv_blocks) == (4, 24, 1)
  assert (config.optim.learning_rate, config.optim.warmup_steps) == (2e-3, 200)
  # nothing else differs from configs/mnist_conv_gauss.py
  assert sf.conv_scale_shift_norm and not conv.model.score_flow.conv_scale_shift_norm
  for field in ("gaussian_components", "gaussian_rank", "n_flows", "conv_channels", "conv_blocks",
                "conv_scale_shift_norm"):
    conv.model.score_flow[field] = sf[field]
  conv.optim.learning_rate = config.optim.learning_rate
  conv.run_name = config.run_name
  assert config.to_dict() == conv.to_dict()
  tiny = mnist_conv_mixture.get_config("tiny").model.score_flow
  assert tiny.gaussian_components == 50 and tiny.conv_channels == 8
  assert tiny.conv_scale_shift_norm


def test_latent_configs_are_their_pixel_networks_on_a_kl_first_stage():
  # mnist_latent.py: mnist_mixture.py in 7x7x4 latents; mnist_latent_conv.py:
  # mnist_conv_mixture.py in 14x14x1 latents (the conv flow's squeeze needs
  # even sides). Only the first stage and the network's channels differ.
  from configs import mnist_conv_mixture, mnist_latent, mnist_latent_conv, mnist_mixture
  for latent, pixel, ch_mult, channels in ((mnist_latent, mnist_mixture, (1, 2, 2), 4),
                                           (mnist_latent_conv, mnist_conv_mixture, (1, 2), 1)):
    for arg in (None, "tiny"):
      config, base = latent.get_config(arg), pixel.get_config(arg)
      a = config.model.autoencoder
      assert config.model.first_stage == "kl_autoencoder" and a.weights is None
      assert tuple(a.ch_mult) == ch_mult and a.embed_dim == a.z_channels == channels
      assert config.model.score_flow.in_channels == channels
      assert "latent" in config.run_name
      base.model.first_stage, base.model.autoencoder = "kl_autoencoder", a
      base.model.score_flow.in_channels, base.run_name = channels, config.run_name
      if latent is mnist_latent_conv:  # FiLM after the GroupNorm (session 36)
        assert config.model.score_flow.conv_scale_shift_norm
        assert (a.scale_factor, a.shift_factor) == (0.15969, 0.98408)
      assert config.to_dict() == base.to_dict()


@pytest.mark.parametrize("field,value", [("gaussian_components", 0), ("gaussian_rank", 0)])
def test_bad_gaussian_base_values_are_named(field, value):
  from configs import mnist_mixture
  config = mnist_mixture.get_config("tiny")
  config.model.score_flow[field] = value
  with pytest.raises(ValueError, match=r"gaussian_rank >= 1 and gaussian_components >= 1"):
    trainer.validate_config(config)


@pytest.mark.parametrize("field,value,match", [
    ("model.score_flow.max_log_scale", float("inf"), "max_log_scale must be finite"),
    ("model.score_flow.max_log_scale", float("nan"), "max_log_scale must be finite"),
    ("model.sigma_data", float("nan"), "sigma_data must be finite and > 0"),
    ("loss.p_std", float("inf"), "p_std must be finite and > 0"),
    ("loss.p_mean", float("nan"), "p_mean finite"),
    ("model.score_flow.gaussian_covariance_prior", float("nan"), "must be finite and >= 0"),
    # settings that would do nothing
    ("model.score_flow.gaussian_covariance_prior", 30.0, "does nothing without"),
    ("model.score_flow.conv_global", True, "conv_global is an option of flow_type 'conv'"),
    ("model.score_flow.conv_scale_shift_norm", True,
     "conv_scale_shift_norm is an option of flow_type 'conv'"),
])
def test_bad_or_idle_model_values_are_named(field, value, match):
  # NaN passed the old "<= 0" checks and inf gave max_log_scale * tanh(raw / inf)
  # = NaN: every output NaN, no error; the idle settings were dropped silently
  from configs import mnist_gauss
  config = mnist_gauss.get_config("tiny")  # MLP flow, one Gaussian per class
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=match):
    trainer.validate_config(config)


@pytest.mark.parametrize("scale,interval,match", [
    (0.0, (0.1, 1.0), "score scale must be a finite number > 0"),
    (float("nan"), (0.1, 1.0), "score scale must be a finite number > 0"),
    (2.0, (1.0, 0.1), r"0 <= lo < hi, got \(1.0, 0.1\)"),
    (2.0, (0.1,), r"needs its sigma_interval \(lo, hi\)"),
])
def test_bad_score_scale_values_are_named(scale, interval, match):
  from configs import mnist_gauss
  config = mnist_gauss.get_config("tiny")
  config.sampling.score_scale, config.sampling.score_scale_interval = scale, interval
  with pytest.raises(ValueError, match=r"sampling.score_scale / score_scale_interval: .*"
                                       + match):
    trainer.validate_config(config)
  config.sampling.score_scale = 1.0  # none: its interval is not used
  trainer.validate_config(config)
  config.sampling.score_scale, config.sampling.score_scale_interval = 2.0, (0.1, 1.0)
  trainer.validate_config(config)


def test_bench_overrides_are_typed_and_locked():
  import sys
  sys.path.insert(0, str(CONFIG_DIR.parent / "bench"))
  import train_throughput
  from configs import mnist
  config = train_throughput.apply_overrides(
      mnist.get_config(), ["model.score_flow.gaussian_rank=256",
                           "model.score_flow.gaussian_base=True", "optim.learning_rate=3e-4"])
  sf = config.model.score_flow
  assert (sf.gaussian_rank, sf.gaussian_base, config.optim.learning_rate) == (256, True, 3e-4)
  with pytest.raises(KeyError):
    train_throughput.apply_overrides(mnist.get_config(), ["model.score_flow.gaussian_rnak=2"])
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    train_throughput.apply_overrides(mnist.get_config(), ["optim.learning_rate"])


def test_build_model_applies_each_loss_and_network_field():
  # A field set in a config reaches the model: not silently left at a default
  # that happens to equal it in every shipped config.
  from configs import mnist_conv, mnist_unet
  from scoreflow_jax import model as model_lib
  config = mnist_conv.get_config("tiny")
  config.loss.sigma_data, config.loss.p_mean, config.loss.p_std = 0.7, -0.4, 0.9
  config.loss.type = "l1"
  config.model.sigma_data = 0.6
  sf = config.model.score_flow
  sf.max_log_scale, sf.conv_global, sf.conv_channels, sf.conv_blocks = 2.5, True, 12, 0
  sf.conv_scale_shift_norm = True
  m = model_lib.build_model(config)
  assert (m.loss_sigma_data, m.p_mean, m.p_std, m.loss_type, m.sigma_data) == (
      0.7, -0.4, 0.9, "l1", 0.6)
  net = m.network
  assert (net.max_log_scale, net.conv_global, net.conv_channels, net.conv_blocks,
          net.sigma_data, net.conv_scale_shift_norm) == (2.5, True, 12, 0, 0.6, True)
  config = mnist_unet.get_config("tiny")
  u = config.model.unet
  u.transformer_depth, u.disable_middle_transformer = 2, True
  u.attention_resolutions = (2,)
  net = model_lib.build_model(config).network
  assert (net.transformer_depth, net.disable_middle_transformer,
          tuple(net.attention_resolutions)) == (2, True, (2,))


def test_documented_config_values():
  # Values the configs' docstrings and docs quote (a change here is a change
  # of the documented design, made on purpose).
  from configs import (cifar10, mnist, mnist_density, mnist_density_conv,
                       mnist_density_mixture, mnist_latent, mnist_latent_conv, mnist_unet)
  assert mnist.get_config().training.num_steps == 60_000
  for arg in (None, "tiny"):  # a flow of the image alone, sigma and class as context
    config = mnist_density.get_config(arg)
    sf = config.model.score_flow
    assert (sf.parameterization, sf.flow_type) == ("density", "conditional")
    # a little of the likelihood itself in the loss (session 41)
    assert (config.loss.nll_weight, config.loss.nll_sigma, sf.max_log_scale) == (0.003, 0.002, 3.0)
  # the conv density that trains (session 43): clipping, the term at full weight
  config = mnist_density_conv.get_config()
  sf = config.model.score_flow
  assert (sf.parameterization, sf.flow_type, sf.n_flows, sf.conv_channels, sf.conv_blocks,
          sf.conv_scale_shift_norm, sf.max_log_scale) == ("density", "conv", 4, 24, 1, True, 3.0)
  assert (config.loss.nll_weight, config.optim.grad_clip_norm, config.optim.learning_rate,
          config.optim.warmup_steps, config.training.num_steps) == (1.0, 1.0, 1e-3, 200, 4_500)
  # the density flow on the mixture base, clipped (session 44)
  config = mnist_density_mixture.get_config()
  sf = config.model.score_flow
  assert (sf.parameterization, sf.flow_type, sf.gaussian_base, sf.gaussian_components,
          sf.gaussian_rank) == ("density", "conditional", True, 50, 16)
  assert (config.loss.nll_weight, config.optim.grad_clip_norm,
          config.training.num_steps) == (0.003, 1.0, 20_000)
  sf = cifar10.get_config().model.score_flow
  assert (sf.in_channels, sf.model_channels, sf.n_flows) == (3, 256, 4)
  u = mnist_unet.get_config().model.unet  # sgm's mnist_cond.yaml
  assert (u.model_channels, u.num_res_blocks, tuple(u.channel_mult)) == (32, 4, (1, 2, 2))
  # what train_autoencoder.py printed for the default VAEs: 0.5 / latent std
  assert mnist_latent.get_config().model.autoencoder.scale_factor == pytest.approx(
      0.5 / 3.283, rel=1e-3)
  assert mnist_latent_conv.get_config().model.autoencoder.scale_factor == pytest.approx(
      0.5 / 3.131, rel=1e-3)
