"""Bits/dim of the exact-likelihood model, and bits_per_dim.py."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import mnist, mnist_density
from scoreflow_jax import data, likelihood, model as model_lib
from tests.perturb import perturb


@pytest.mark.parametrize("sigma", [0.002, 0.5])
def test_bits_per_dim_of_the_initial_gaussian(sigma):
  """At init the flow is the identity: q(x | sigma) = N(0, (sigma^2 + sd^2) I)."""
  config = mnist_density.get_config("tiny")
  model = model_lib.build_model(config)
  images, labels = data.make_synthetic(20, seed=1)
  params = model.init(jax.random.key(0), data.to_model_batch(images[:2], labels[:2]))
  key = jax.random.key(7)
  mean, per_image = likelihood.bits_per_dim(model, params, images, labels, key,
                                            sigma=sigma, batch_size=8)
  d = 28 * 28
  s2 = sigma**2 + 0.25  # at 0.5 a wrong sigma (e.g. sigma^2) is 20% off in s2
  expected = []
  for i in range(20):  # image i's dequantisation noise: fold_in(key, i)
    pix = images[i].astype(np.float64)
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), pix.shape))
    x = (pix + u - 0.5) / 127.5 - 1.0  # pixel p's bin is centred on p / 127.5 - 1
    logq = -0.5 * np.sum(x**2) / s2 - 0.5 * d * np.log(2 * np.pi * s2)
    expected.append(-(logq - d * np.log(127.5)) / (d * np.log(2.0)))
  np.testing.assert_allclose(per_image, expected, rtol=1e-4)
  assert abs(mean - per_image.mean()) < 1e-9


def _perturbed_density_model(nll_weight=0.0, n=9):
  """The tiny density model (``loss.nll_weight``), init + 0.05 noise (a
  trained-looking flow), and n synthetic images and labels."""
  config = mnist_density.get_config("tiny")
  config.loss.nll_weight = nll_weight
  model = model_lib.build_model(config)
  images, labels = data.make_synthetic(n, seed=1)
  params = model.init(jax.random.key(0), data.to_model_batch(images[:2], labels[:2]))
  return model, perturb(params, jax.random.key(1), 0.05), images, labels


def _loss_cond(model, params, batch, keys):
  """per_sample_loss's conditioning, rebuilt by hand: each sample's label
  dropout draws from the first of split(k)."""
  sub = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  return model.condition(params, batch, sub[:, 0])


def test_bits_per_dim_per_image_label_and_batch_size():
  # A trained-looking flow (perturbed parameters): each image's value depends on
  # its own label only, and not on how the images are batched.
  model, params, images, labels = _perturbed_density_model()
  bpd = lambda labels, batch_size=4: likelihood.bits_per_dim(
      model, params, images, labels, jax.random.key(7), sigma=0.1,
      batch_size=batch_size)[1]
  base = bpd(labels)
  np.testing.assert_allclose(bpd(labels, batch_size=5), base, rtol=1e-6)
  other = labels.copy()
  other[4] = (labels[4] + 1) % 10
  changed = bpd(other)
  np.testing.assert_allclose(np.delete(changed, 4), np.delete(base, 4), rtol=1e-6)
  assert abs(changed[4] - base[4]) > 1e-4
  # each image its own dequantisation noise: a copy of image 0 at position 8
  # scores otherwise (by about the noise's share of the value); noise cycling
  # with the batch position (fold_in(key, i % 8)) would score them alike
  twin_images, twin_labels = images.copy(), labels.copy()
  twin_images[8], twin_labels[8] = images[0], labels[0]
  twins = likelihood.bits_per_dim(model, params, twin_images, twin_labels,
                                  jax.random.key(7), sigma=0.1)[1]
  assert twins[8] != twins[0] and abs(twins[8] - twins[0]) < 0.05 * abs(twins[0])
  with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
    bpd(np.where(np.arange(9) == 2, 10, labels))
  with pytest.raises(ValueError, match="images must be uint8"):
    likelihood.bits_per_dim(model, params, images / 127.5 - 1.0, labels, jax.random.key(7))


def test_bits_per_dim_needs_the_density_model():
  model = model_lib.build_model(mnist.get_config("tiny"))
  with pytest.raises(ValueError, match="density"):
    likelihood.bits_per_dim(model, {}, np.zeros((1, 28, 28, 1), np.uint8),
                            np.zeros(1, np.int32), jax.random.key(0))


def test_density_config_check_agrees_with_the_model_check():
  # a UNet run keeps a score_flow section, here one that says density: the
  # network it builds has no density all the same
  for network, first_stage, message in (
      ("score_flow", "identity", None),
      ("unet", "identity", "needs a network with parameterization='density'"),
      ("score_flow", "kl_autoencoder", "needs a model that diffuses pixels")):
    config = mnist_density.get_config("tiny")
    config.model.update(network=network, first_stage=first_stage)
    if message is None:
      likelihood.check_density_config(config.model)
    else:
      config.loss.nll_weight = 0.0  # (else the config's bits/dim term is refused first)
      with pytest.raises(ValueError, match=re.escape(message)):
        likelihood.check_density_config(config.model)
    if first_stage == "identity":  # (a latent model needs its autoencoder's file)
      model = model_lib.build_model(config)
      if message is None:
        likelihood.check_density_model(model)
      else:
        with pytest.raises(ValueError, match=re.escape(message)):
          likelihood.check_density_model(model)


def test_density_config_validation():
  config = mnist_density.get_config("tiny")
  config.model.score_flow.flow_type = "joint"
  with pytest.raises(ValueError, match="flow_type=conditional"):
    model_lib.build_model(config)


def test_bits_per_dim_needs_sigma_above_0_and_images():
  config = mnist_density.get_config("tiny")
  model = model_lib.build_model(config)
  images, labels = data.make_synthetic(2, seed=1)
  params = model.init(jax.random.key(0), data.to_model_batch(images, labels))
  for sigma in (0.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0.*log\(sigma\)"):
      likelihood.bits_per_dim(model, params, images, labels, jax.random.key(0),
                              sigma=sigma)
  with pytest.raises(ValueError, match="need N >= 1 images"):
    likelihood.bits_per_dim(model, params, images[:0], labels[:0], jax.random.key(0))
  # images of other channels or without a channel axis are refused, naming the
  # shape (they were a shape error from inside the flow)
  assert images.shape == (2, 28, 28, 1)
  for bad in (np.repeat(images, 3, axis=-1), images[..., 0], images[..., None],
              images[:, None]):  # (2, 28, 28, 3), (2, 28, 28), 5 axes ending in 1
    with pytest.raises(ValueError, match=re.escape(
        f"(N, H, W, 1) for this network (in_channels=1), got shape {bad.shape}")):
      likelihood.bits_per_dim(model, params, bad, labels, jax.random.key(0))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _error(proc):
  """The message the script failed with: ``error: MESSAGE``, no --help above."""
  assert "\nflags:\n" not in proc.stderr and "error: " in proc.stderr, proc.stderr[-2000:]
  return proc.stderr.strip().splitlines()[-1].removeprefix("error: ")


def test_bits_per_dim_cli_checks_its_flags_before_loading_the_run(tmp_path):
  # the run folder does not exist: each flag's error comes before it is read,
  # and every error, the missing run's too, before JAX starts
  from tests.test_cli import run_noting_jax
  def run_flags(*args):
    proc, jax_imported = run_noting_jax("bits_per_dim.py", "--workdir", tmp_path / "none",
                                        *args)
    assert not jax_imported, (args, proc.stderr[-1000:])
    return proc
  for n in (-5, 0):
    proc = run_flags("--data_dir", tmp_path, "--num_images", n)
    assert proc.returncode != 0 and _error(proc) == f"--num_images must be >= 1, got {n}."
  proc = run_flags("--data_dir", tmp_path, "--sigma", 0)
  assert proc.returncode != 0 and _error(proc).startswith("--sigma must be finite and > 0")
  assert "log(sigma)" in _error(proc)
  for args in ((), ("--data_dir", tmp_path)):  # without: the run's data, so the run first
    proc = run_flags(*args)
    assert proc.returncode != 0 and _error(proc).startswith(
        f"{tmp_path / 'none'} does not exist: it is not a run folder made by train.py")
    assert "Traceback" not in proc.stderr and not (tmp_path / "none").exists()


def _bits_per_dim_of_a_saved_config(folder, config):
  """bits_per_dim.py on ``folder`` made a run folder holding only ``config``
  (no checkpoint): (the process, whether JAX was imported)."""
  from tests.test_cli import run_noting_jax
  (folder / "configs").mkdir()
  (folder / "configs" / "2026-01-01T00-00-00-config.json").write_text(config.to_json())
  return run_noting_jax("bits_per_dim.py", "--workdir", folder, "--data_dir", folder)


@pytest.mark.parametrize("overrides, message", [
    ({}, "needs a network with parameterization='density'"),
    ({"network": "unet"}, "needs a network with parameterization='density'"),
    ({"first_stage": "kl_autoencoder"}, "needs a model that diffuses pixels")])
def test_bits_per_dim_cli_refuses_a_run_without_a_density_before_jax(tmp_path, overrides,
                                                                      message):
  # the run's saved config is enough to refuse it: no JAX start-up, no checkpoint read
  config = (mnist_density.get_config("tiny") if overrides.get("first_stage")
            else mnist.get_config("tiny"))
  config.model.update(overrides)
  proc, jax_imported = _bits_per_dim_of_a_saved_config(tmp_path, config)
  assert proc.returncode != 0 and message in _error(proc) and not jax_imported
  assert "Traceback" not in proc.stderr and not (tmp_path / "bits_per_dim.json").exists()


def test_bits_per_dim_cli_refuses_a_run_of_other_images_before_jax(tmp_path):
  config = mnist_density.get_config("tiny")  # synthetic data: scored on MNIST
  config.data.update(image_size=32, channels=3)
  proc, jax_imported = _bits_per_dim_of_a_saved_config(tmp_path, config)
  assert proc.returncode != 0 and not jax_imported and "Traceback" not in proc.stderr
  assert _error(proc) == ("the run was trained on images of shape (32, 32, 3) (synthetic "
                          "data) and bits/dim scores the mnist test set (28, 28, 1): score "
                          "a run trained on mnist.")
  assert not (tmp_path / "bits_per_dim.json").exists()


@pytest.fixture(scope="module")
def density_run(tmp_path_factory):
  """A 2-step tiny density run trained on fake MNIST IDX files."""
  tmp = tmp_path_factory.mktemp("density")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 40), ("t10k", 30)):
    for kind, magic, array in (("images-idx3", 2051, rng.integers(0, 256, (n, 28, 28))),
                               ("labels-idx1", 2049, np.arange(n) % 10)):
      array = np.asarray(array, np.uint8)
      raw = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
      (tmp / f"{prefix}-{kind}-ubyte").write_bytes(raw + array.tobytes())
  workdir = tmp / "run"
  proc = _run("train.py", "--config", "configs/mnist_density.py:tiny", "--workdir",
              workdir, "--config.training.num_steps=2", "--config.training.image_every=0",
              "--config.data.name=mnist", "--config.data.source=offline",
              f"--config.data.data_dir={tmp}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir, tmp


def test_bits_per_dim_cli_replaces_no_result_unasked(density_run, tmp_path):
  workdir, data_dir = density_run
  run = lambda *args: _run("bits_per_dim.py", "--workdir", workdir, "--data_dir",
                           data_dir, "--num_images", 7, *args)
  out = tmp_path / "bpd.json"
  proc = run("--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  first = json.loads(out.read_text())
  assert first["num_images"] == 7 and np.isfinite(first["bits_per_dim"])
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == first
  proc = run("--out", out, "--sigma", 0.1)  # another sigma, the same file
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert _error(proc).endswith("exists; pass --overwrite to replace it, or choose "
                               "another path. Nothing was written.")
  assert json.loads(out.read_text()) == first
  proc = run("--out", out, "--sigma", 0.1, "--overwrite")
  assert proc.returncode == 0, proc.stderr[-2000:]
  second = json.loads(out.read_text())
  assert second["sigma"] == 0.1 and second["bits_per_dim"] != first["bits_per_dim"]
  assert not first["noisy"] and not second["noisy"]
  proc = run("--out", tmp_path / "noisy.json", "--sigma", 0.1, "--noisy")
  assert proc.returncode == 0, proc.stderr[-2000:]
  noisy = json.loads((tmp_path / "noisy.json").read_text())
  assert noisy["noisy"] and noisy["sigma"] == 0.1
  assert np.isfinite(noisy["bits_per_dim"]) and noisy["bits_per_dim"] != second["bits_per_dim"]
  # without --source and --data_dir: the run's own data (from its saved config)
  proc = _run("bits_per_dim.py", "--workdir", workdir, "--num_images", 7, "--out",
              tmp_path / "own.json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / "own.json").read_text()) == first
  # --source alone is the user's choice: offline then needs --data_dir
  from tests.test_cli import run_noting_jax
  proc, jax_imported = run_noting_jax("bits_per_dim.py", "--workdir", workdir,
                                      "--source", "offline")
  assert proc.returncode != 0 and not jax_imported
  assert _error(proc).startswith("--source offline needs --data_dir")
  # the default out, <workdir>/bits_per_dim.json
  default = workdir / "bits_per_dim.json"
  default.write_text("kept")
  # told before JAX starts
  proc, jax_imported = run_noting_jax("bits_per_dim.py", "--workdir", workdir,
                                      "--data_dir", data_dir)
  assert proc.returncode != 0 and f"--out {default} exists" in _error(proc)
  assert not jax_imported
  assert default.read_text() == "kept"
  default.unlink()
  # the result is printed before the write, so a write that fails loses nothing
  (tmp_path / "a_file").write_text("")  # no folder can be made where a file is
  os.symlink(tmp_path / "a_file" / "r.json", tmp_path / "dangling.json")
  proc = run("--out", tmp_path / "dangling.json")
  assert proc.returncode != 0 and "the result above was not written" in _error(proc)
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == first
  # data.py's hint in this script's flags
  proc = run("--out", tmp_path / "x.json", "--data_dir", tmp_path / "missing")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert _error(proc).endswith("or use --source tfds.") and "config.data" not in _error(proc)


def test_bits_per_dim_cli_scores_the_runs_own_data_set(tmp_path):
  # a CIFAR-10 density run is scored on CIFAR-10's test batch (it was MNIST's:
  # a shape traceback)
  from tests.test_data import _write_cifar
  folder = tmp_path / "cifar-10-batches-py"
  _write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], 8)
  _, test_labels = _write_cifar(folder, ["test_batch"], 6)
  workdir = tmp_path / "run"
  proc = _run("train.py", "--config", "configs/cifar10.py:tiny", "--workdir", workdir,
              "--config.training.num_steps=1", "--config.training.image_every=0",
              "--config.training.batch_size=8", "--config.data.name=cifar10",
              "--config.model.score_flow.parameterization=density",
              "--config.model.score_flow.flow_type=conditional",
              "--config.data.source=offline", f"--config.data.data_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = tmp_path / "bpd.json"
  proc = _run("bits_per_dim.py", "--workdir", workdir, "--data_dir", tmp_path, "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["dataset"] == "cifar10" and result["num_images"] == len(test_labels) == 6
  assert np.isfinite(result["bits_per_dim"])
  # a synthetic run (scored on MNIST) of other shapes is told, not a Flax traceback
  synthetic = tmp_path / "synthetic"
  proc = _run("train.py", "--config", "configs/cifar10.py:tiny", "--workdir", synthetic,
              "--config.training.num_steps=1", "--config.training.image_every=0",
              "--config.training.batch_size=8", "--config.data.name=synthetic",
              "--config.model.score_flow.parameterization=density",
              "--config.model.score_flow.flow_type=conditional")
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = _run("bits_per_dim.py", "--workdir", synthetic, "--data_dir", tmp_path,
              "--out", tmp_path / "s.json")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "images of shape (32, 32, 3) (synthetic data)" in proc.stderr
  assert not (tmp_path / "s.json").exists()


def test_bits_per_dim_cli_scores_the_ema_or_raw_weights_asked_for(density_run, tmp_path):
  # The default (--ema) scores the EMA weights, --noema the raw ones, and the
  # result says which: recomputed here from the run's state.
  from scoreflow_jax import generate
  workdir, data_dir = density_run
  model, state, _ = generate.load_run(str(workdir), log=lambda *a: None)
  images, labels = data.load_split("mnist", "test", "offline", str(data_dir))
  by_hand = {name: likelihood.bits_per_dim(model, params, images[:5], labels[:5],
                                           jax.random.key(0))[0]
             for name, params in (("ema", state.ema_params), ("raw", state.params))}
  assert by_hand["ema"] != by_hand["raw"]
  for extra, weights in (([], "ema"), (["--noema"], "raw")):
    out = tmp_path / f"{weights}.json"
    proc = _run("bits_per_dim.py", "--workdir", workdir, "--data_dir", data_dir,
                "--num_images", 5, "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["weights"] == weights and result["num_images"] == 5
    other = by_hand["raw" if weights == "ema" else "ema"]
    # after 2 steps the two differ little: nearer its own than the other by far
    assert abs(result["bits_per_dim"] - by_hand[weights]) < 0.01 * abs(
        result["bits_per_dim"] - other), (result, by_hand)


def test_training_bits_per_dim_is_the_evaluated_one():
  # The loss's NLL term and bits_per_dim.py score the same bound (one method):
  # given uint8 pixels and the same keys (fold_in(key, i)), the loss's float
  # images dequantise alike and agree per image.
  model, params, images, labels = _perturbed_density_model()
  key = jax.random.key(7)
  _, expected = likelihood.bits_per_dim(model, params, images, labels, key, sigma=0.01)
  x0 = data.to_model_batch(images, labels)["jpg"]
  cond = model.condition(params, {"cls": labels})
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(len(images)))
  got = model.dequantized_bits_per_dim(params, x0, cond, keys, 0.01)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # noisy=True: the same images plus 0.1 * eps, eps from fold_in(fold_in(key, i), 1)
  _, noisy = likelihood.bits_per_dim(model, params, images, labels, key, sigma=0.1,
                                     noisy=True)
  noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  got = model.dequantized_bits_per_dim(params, x0, cond, keys, 0.1, noise_keys)
  np.testing.assert_allclose(got, noisy, rtol=1e-5)
  clean = model.dequantized_bits_per_dim(params, x0, cond, keys, 0.1)
  assert np.all(np.abs(noisy - clean) > 1e-3), (noisy, clean)


def test_nll_weight_adds_the_exact_bits_per_dim_to_each_sample():
  model, params, images, labels = _perturbed_density_model()
  weighted, _, _, _ = _perturbed_density_model(nll_weight=0.3)
  batch = data.to_model_batch(images, labels)
  keys = jax.random.split(jax.random.key(3), len(images))
  plain, sigma = model.per_sample_loss(params, batch, keys)
  both, sigma_w = weighted.per_sample_loss(params, batch, keys)
  np.testing.assert_array_equal(sigma_w, sigma)  # the DSM draws are unchanged
  # the term's own keys (fold_in(k, 3)) and the conditioner's label dropout
  # (the first of split(k)): rebuilt here by hand
  cond = _loss_cond(model, params, batch, keys)
  bpd = model.dequantized_bits_per_dim(
      params, batch["jpg"], cond, jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys), 0.002)
  assert np.all(bpd > 1.0)  # a real bits/dim, not a zero term
  np.testing.assert_allclose(both, plain + 0.3 * bpd, rtol=1e-5)


def test_nll_sigma_max_puts_each_samples_term_at_its_own_sigma():
  # loss.nll_sigma_max: each sample's term is the exact bits/dim at its own
  # sigma, log-uniform over [nll_sigma, nll_sigma_max]; the DSM draws and the
  # term's dequantisation noise are those of the single-sigma term.
  config = mnist_density.get_config("tiny")
  config.loss.nll_sigma, config.loss.nll_sigma_max = 0.002, 0.3
  ranged = model_lib.build_model(config)
  single, params, images, labels = _perturbed_density_model(nll_weight=0.003)
  batch = data.to_model_batch(images, labels)
  keys = jax.random.split(jax.random.key(3), len(images))
  _, sigma_1, parts_1 = single.per_sample_loss(params, batch, keys, terms=True)
  both, sigma_r, parts = ranged.per_sample_loss(params, batch, keys, terms=True)
  np.testing.assert_array_equal(sigma_r, sigma_1)
  np.testing.assert_allclose(parts_1["nll_sigma"], 0.002, rtol=1e-6)
  s = np.asarray(parts["nll_sigma"])
  assert np.all((s >= 0.002) & (s <= 0.3)) and np.ptp(np.log(s)) > 1.0, s
  cond = _loss_cond(ranged, params, batch, keys)
  nll_keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys)
  for i in range(3):  # each image alone, at its own sigma (a scalar)
    one = ranged.dequantized_bits_per_dim(
        params, batch["jpg"][i:i + 1], jax.tree.map(lambda c: c[i:i + 1], cond),
        nll_keys[i:i + 1], float(s[i]))
    np.testing.assert_allclose(parts["bits_per_dim"][i], one[0], rtol=1e-5)
  # the term moved with the sigmas (this flow's density depends little on
  # sigma: 0.0005-0.09 bits/dim apart, float32 resolves 1e-6)
  moved = np.abs(parts["bits_per_dim"] - parts_1["bits_per_dim"])[s > 0.004]
  assert moved.size and np.all(moved > 1e-4), (moved, s)
  np.testing.assert_allclose(both, parts["diffusion"] + 0.003 * parts["bits_per_dim"],
                             rtol=1e-6)
  # log-uniform: the logs of many draws are uniform over [log 0.002, log 0.3]
  many = np.log(np.asarray(ranged.nll_sigmas(jax.random.split(jax.random.key(5), 4000))))
  lo, hi = np.log(0.002), np.log(0.3)
  assert lo <= many.min() and many.max() <= hi
  hist = np.histogram(many, bins=5, range=(lo, hi))[0]
  assert np.all(np.abs(hist - 800) < 100), hist  # +-3.5 binomial std of 800


def test_nll_noisy_scores_the_noised_data_by_hand():
  # loss.nll_noisy: the term is -log2 q(x0 + u + sigma * eps | sigma, c) / D +
  # log2 127.5, eps from fold_in(k, 5), u the single-sigma term's own draw;
  # rebuilt here from the network's log_prob.
  config = mnist_density.get_config("tiny")
  config.loss.nll_sigma, config.loss.nll_noisy = 0.1, True
  noisy = model_lib.build_model(config)
  config.loss.nll_noisy = False
  clean = model_lib.build_model(config)
  _, params, images, labels = _perturbed_density_model()
  batch = data.to_model_batch(images, labels)
  keys = jax.random.split(jax.random.key(3), len(images))
  _, sigma_c, parts_c = clean.per_sample_loss(params, batch, keys, terms=True)
  both, sigma_n, parts = noisy.per_sample_loss(params, batch, keys, terms=True)
  np.testing.assert_array_equal(sigma_n, sigma_c)  # the DSM draws are unchanged
  np.testing.assert_array_equal(parts["diffusion"], parts_c["diffusion"])
  cond = _loss_cond(noisy, params, batch, keys)
  x0 = np.asarray(batch["jpg"])
  u = np.stack([jax.random.uniform(jax.random.fold_in(k, 3), x0.shape[1:]) for k in keys])
  eps = np.stack([jax.random.normal(jax.random.fold_in(k, 5), x0.shape[1:]) for k in keys])
  x = x0 + (u - 0.5) / 127.5 + 0.1 * eps
  log_q = noisy.network.apply({"params": params["network"]}, x,
                              np.full(len(x), 0.1, np.float32), cond, method="log_prob")
  dims = x0[0].size
  expected = -np.asarray(log_q) / (dims * np.log(2.0)) + np.log2(127.5)
  np.testing.assert_allclose(parts["bits_per_dim"], expected, rtol=1e-5)
  # and not the clean images' value (0.1 of noise per pixel moves it)
  assert np.all(np.abs(parts["bits_per_dim"] - parts_c["bits_per_dim"]) > 1e-3), (
      parts["bits_per_dim"], parts_c["bits_per_dim"])
  np.testing.assert_allclose(both, parts["diffusion"] + 0.003 * parts["bits_per_dim"],
                             rtol=1e-6)


def test_nll_term_trains_the_bits_per_dim_down():
  # A few Adam steps with the NLL term weighted up lower the evaluated bits/dim
  # at sigma 0.002 well below where the denoising loss alone takes it from the
  # same start: the term's gradient reaches the flow with the right sign.
  import optax
  model, params, images, labels = _perturbed_density_model(nll_weight=10.0, n=16)
  plain, _, _, _ = _perturbed_density_model(n=16)
  batch = data.to_model_batch(images, labels)
  evaluate = lambda p: likelihood.bits_per_dim(model, p, images, labels,
                                               jax.random.key(7))[0]

  def train(m, p, steps=30):
    tx = optax.adam(1e-2)
    opt = tx.init(p)

    @jax.jit
    def step(p, opt, k):
      keys = jax.random.split(k, len(images))
      g = jax.grad(lambda p: m.per_sample_loss(p, batch, keys)[0].mean())(p)
      updates, opt = tx.update(g, opt, p)
      return optax.apply_updates(p, updates), opt

    for i in range(steps):
      p, opt = step(p, opt, jax.random.key(i))
    return p

  start = evaluate(params)
  with_nll, without = evaluate(train(model, params)), evaluate(train(plain, params))
  # measured: 8.45 at the start, 7.60 with the term, 8.23 without
  assert with_nll < start - 0.3 and with_nll < without - 0.3, (start, with_nll, without)


@pytest.mark.parametrize("config_name,field,value,match", [
    ("mnist_density", "loss.nll_weight", -1.0, "nll_weight must be finite and >= 0"),
    ("mnist_density", "loss.nll_weight", float("nan"), "nll_weight must be finite and >= 0"),
    ("mnist_density", "loss.nll_sigma", 0.0, "nll_sigma finite and > 0"),
    ("mnist_density", "loss.nll_sigma_max", 0.001, "nll_sigma_max must be 0"),
    ("mnist_density", "loss.nll_sigma_max", -1.0, "nll_sigma_max must be 0"),
    ("mnist_density", "loss.nll_sigma_max", float("inf"), "nll_sigma_max must be 0"),
    ("mnist", "loss.nll_weight", 1.0, "needs a normalised density of pixels"),
    # mnist_density.py's own term, on a network without a density
    ("mnist_density", "model.network", "unet", "needs a normalised density of pixels"),
])
def test_nll_weight_values_are_checked(config_name, field, value, match):
  from configs import mnist as plain_config
  config = (mnist_density if config_name == "mnist_density" else plain_config).get_config("tiny")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match):
    model_lib.build_model(config)
