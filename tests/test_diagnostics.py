"""Held-out loss by sigma and renoise FD (scoreflow_jax/eval/diagnostics.py)."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax.edm import append_dims, edm_discretization
from scoreflow_jax.eval import diagnostics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = 0.5


def gaussian_denoiser(params, x, sigma, cond):
  """Exact posterior mean for data ~ N(0, SD^2 I): x SD^2 / (SD^2 + sigma^2)."""
  del params, cond
  s2 = append_dims(sigma, x.ndim) ** 2
  return x * SD**2 / (SD**2 + s2)


def identity_denoiser(params, x, sigma, cond):
  del params, sigma, cond
  return x


def test_optimal_gaussian_denoiser_scores_one_at_every_sigma():
  # EDM weighting times the posterior variance SD^2 s^2 / (SD^2 + s^2) is 1.
  x0 = SD * jax.random.normal(jax.random.key(0), (400, 8, 8, 1))
  sigmas = (0.01, 0.3, 1.0, 10.0)
  mean, err = diagnostics.loss_at_sigmas(gaussian_denoiser, None, x0, None, sigmas,
                                         jax.random.key(1), SD, batch_size=150)
  assert mean.shape == err.shape == (4,)
  # Each image's loss is the mean of 64 pixels' chi^2(1) / 1: sd sqrt(2/64), so
  # the standard error of 400 images is sqrt(2/64)/20 = 0.0088 at every sigma.
  se = np.sqrt(2 / 64) / np.sqrt(400)
  np.testing.assert_allclose(err, se, rtol=0.2)
  assert np.all(np.abs(mean - 1.0) < 4.5 * se), (mean, err)
  # The identity denoiser leaves all the noise: (sigma^2 + SD^2) / SD^2.
  mean_id, err_id = diagnostics.loss_at_sigmas(identity_denoiser, None, x0, None,
                                               sigmas, jax.random.key(1), SD)
  expect = (np.asarray(sigmas)**2 + SD**2) / SD**2
  np.testing.assert_allclose(err_id, expect * se, rtol=0.2)
  assert np.all(np.abs(mean_id - expect) < 4.5 * se * expect), mean_id
  assert mean_id[-1] > 300 * mean[-1]


def test_same_noise_for_every_image_set_and_batching():
  # The identity denoiser's loss depends only on the noise: two different
  # image sets of one size score identically, however they are batched.
  x_a = jax.random.normal(jax.random.key(2), (50, 4, 4, 1))
  x_b = 3.0 + jax.random.normal(jax.random.key(3), (50, 4, 4, 1))
  args = (None, None, (0.2, 2.0), jax.random.key(4), SD)
  a = diagnostics.loss_at_sigmas(identity_denoiser, args[0], x_a, *args[1:], batch_size=7)
  b = diagnostics.loss_at_sigmas(identity_denoiser, args[0], x_b, *args[1:], batch_size=50)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  c = diagnostics.loss_at_sigmas(identity_denoiser, None, x_a, None, (0.2, 2.0),
                                 jax.random.key(5), SD)
  assert not np.allclose(a[0], c[0])  # another key, other noise


def test_conditioning_reaches_the_denoiser_per_image():
  x0 = jnp.zeros((6, 2, 2, 1))
  cond = {"shift": jnp.arange(6.0)}
  den = lambda p, x, s, c: jnp.zeros_like(x) + append_dims(c["shift"], x.ndim)
  mean, _ = diagnostics.loss_at_sigmas(den, None, x0, cond, (1.0,), jax.random.key(0),
                                       SD, batch_size=4)
  # weight (1 + SD^2) / SD^2 = 5 times the mean squared shift 55 / 6
  np.testing.assert_allclose(mean[0], 5.0 * 55.0 / 6.0, rtol=1e-5)


def _heun_factor(sigmas, heun=True):
  """The scalar Heun (EDM) recurrence for D(x) = x SD^2 / (SD^2 + sigma^2)."""
  x = 1.0
  d_of = lambda x, s: (x - x * SD**2 / (SD**2 + s**2)) / s
  for a, b in zip(sigmas[:-1], sigmas[1:]):
    x_euler = x + (b - a) * d_of(x, a)
    x = x + (b - a) * (d_of(x, a) + d_of(x_euler, b)) / 2 if heun and b > 0 else x_euler
  return x


def test_renoise_follows_the_exact_gaussian_flow():
  # For N(0, SD^2 I) data the probability-flow ODE scales x linearly:
  # x(0) = x(s) SD / sqrt(SD^2 + s^2). The sampler applies exactly the scalar
  # Heun recurrence of that ODE to x0 + s noise_i, noise_i drawn from (key, i),
  # and Heun 18 lands within 1.1% of the ODE's end point.
  x0 = SD * jax.random.normal(jax.random.key(0), (30, 4, 4, 1))
  key, s = jax.random.key(7), 2.0
  out = diagnostics.renoise(gaussian_denoiser, None, x0, None, s, key, batch_size=16)
  start = x0 + s * diagnostics.per_image_noise(key, jnp.arange(30), (4, 4, 1))
  sigmas = list(np.asarray(edm_discretization(18, 0.002, s, 7.0), np.float64))
  np.testing.assert_allclose(out, _heun_factor(sigmas) * start, rtol=2e-5, atol=1e-6)
  exact = SD / np.sqrt(SD**2 + s**2)
  assert abs(_heun_factor(sigmas) / exact - 1) < 0.011
  euler = diagnostics.renoise(gaussian_denoiser, None, x0, None, s, key,
                              sampler="euler_edm")
  np.testing.assert_allclose(euler, _heun_factor(sigmas, heun=False) * start,
                             rtol=2e-5, atol=1e-6)
  assert abs(_heun_factor(sigmas, heun=False) / exact - 1) > 0.05


def test_renoise_and_subset_reject_bad_input():
  x0 = jnp.zeros((2, 2, 2, 1))
  with pytest.raises(ValueError, match="sigma_start must be > sigma_min"):
    diagnostics.renoise(identity_denoiser, None, x0, None, 0.001, jax.random.key(0))
  with pytest.raises(ValueError, match="sigmas must be a non-empty list"):
    diagnostics.loss_at_sigmas(identity_denoiser, None, x0, None, (0.1, -1.0),
                               jax.random.key(0))
  with pytest.raises(ValueError, match="class 2 has 1 images"):
    diagnostics.balanced_subset(np.array([0, 0, 1, 1, 2]), 6, 3)
  idx = diagnostics.balanced_subset(np.array([1, 0, 1, 0, 0]), 4, 2)
  np.testing.assert_array_equal(idx, [1, 3, 0, 2])


def _write_idx(path, magic, array):
  array = np.asarray(array, np.uint8)
  raw = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(raw + array.tobytes())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 2-step tiny run trained (as a user would) on fake MNIST IDX files."""
  tmp = tmp_path_factory.mktemp("diagnose")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 40), ("t10k", 60)):
    _write_idx(tmp / f"{prefix}-images-idx3-ubyte.gz", 2051,
               rng.integers(0, 256, (n, 28, 28)))
    _write_idx(tmp / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
  workdir = str(tmp / "run")
  proc = _run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", workdir,
              "--config.training.num_steps=2", "--config.training.image_every=0",
              "--config.data.name=mnist", "--config.data.source=offline",
              f"--config.data.data_dir={tmp}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir, str(tmp)


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_diagnose_cli_on_a_tiny_run(tiny_run, tmp_path):
  """evaluate.py --diagnose as a user runs it (loss part: no classifier)."""
  workdir, data_dir = tiny_run
  out = str(tmp_path / "diag.json")
  proc = _run("evaluate.py", "--diagnose", "--workdir", workdir, "--data_dir",
              data_dir, "--num_images", "20", "--sigmas", "0.1,1", "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.load(open(out))
  assert res["step"] == 2 and res["num_images"] == 20 and res["sigmas"] == [0.1, 1.0]
  for split in ("train", "test"):
    assert len(res["loss"][split]) == 2 and all(np.isfinite(res["loss"][split]))
  assert res["loss"]["train"] != res["loss"]["test"]
  assert "renoise" not in res  # no classifier, no FD part
  assert "test / train" in proc.stdout
  raw = str(tmp_path / "diag_raw.json")
  # without --data_dir (and --source): the run's own data, from its saved config
  proc = _run("evaluate.py", "--diagnose", "--workdir", workdir, "--num_images", "20",
              "--sigmas", "0.1,1", "--out", raw, "--noema", "--step", "2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  res_raw = json.load(open(raw))
  assert res_raw["weights"] == "raw" and res["weights"] == "ema" and res_raw["step"] == 2
  assert res_raw["loss"]["test"] != res["loss"]["test"]  # other weights, other loss
  proc = _run("evaluate.py", "--diagnose", "--data_dir", data_dir)
  assert proc.returncode != 0 and "--diagnose needs --workdir" in proc.stderr
  proc = _run("evaluate.py", "--diagnose", "--workdir", workdir, "--data_dir",
              data_dir, "--seed", "0,1")
  assert proc.returncode != 0 and "--diagnose takes one --seed" in proc.stderr


def write_tiny_classifier(path):
  """A two-step classifier on synthetic digits, saved to ``path``: features
  for FD rows that only need to be the same function everywhere."""
  from scoreflow_jax import data as data_lib
  from scoreflow_jax.eval import classifier as classifier_lib
  images, labels = data_lib.make_synthetic(200, seed=0)
  params, _ = classifier_lib.train_classifier(
      images, labels, steps=2, log=lambda s: None, widths=(8, 16, 16), hidden=32,
      dropout=0.0, batch_size=32)
  classifier_lib.save_classifier(params, str(path))
  return params


def test_diagnose_fd_part_scores_both_starts_against_unseen_test_images(tiny_run, tmp_path):
  workdir, data_dir = tiny_run
  clf = str(tmp_path / "clf.npz")
  write_tiny_classifier(clf)
  logs = []
  res = diagnostics.diagnose_run(workdir, data_dir, classifier_path=clf, sigmas=(1.0,),
                                 start_sigmas=(0.5, 2.0), num_images=20,
                                 out=str(tmp_path / "d.json"), log=logs.append)
  r = res["renoise"]
  assert r["reference"] == "the other 40 test images"  # 60 minus the 20 starts
  assert list(r["rows"]) == ["test", "train"]
  for rows in r["rows"].values():
    assert [row["sigma_start"] for row in rows] == [0.0, 0.5, 2.0]
    assert all(np.isfinite(row["fd"]) and row["num_samples"] == 20 for row in rows)
  # the start images themselves differ between the splits, and so do their FDs
  assert r["rows"]["test"][0]["fd"] != r["rows"]["train"][0]["fd"]
  assert json.load(open(tmp_path / "d.json"))["renoise"]["rows"]["test"][2]["fd"] == \
      r["rows"]["test"][2]["fd"]
  assert any("FD by sigma_start" in line for line in logs)
  with pytest.raises(ValueError, match="renoise_from must name"):
    diagnostics.diagnose_run(workdir, data_dir, renoise_from=("val",))
  # 30 starts leave 30 test images, too few for the FD's floor (2 x 30): told
  # before the loss part, with the largest count that fits (60 / 3)
  logs = []
  with pytest.raises(ValueError, match=r"needs 2 x 30 of them: pass --num_images 20 "):
    diagnostics.diagnose_run(workdir, data_dir, classifier_path=clf, sigmas=(1.0,),
                             start_sigmas=(0.5,), num_images=30,
                             out=str(tmp_path / "d30.json"), log=logs.append)
  assert not logs and not os.path.exists(tmp_path / "d30.json")
  with pytest.raises(ValueError, match="is one of the inputs"):
    diagnostics.diagnose_run(workdir, data_dir, classifier_path=clf, out=clf,
                             overwrite=True)


def _fake_run(tmp_path):
  """A folder run_config.load reads as a run, with no checkpoint: a check that
  passes goes on to load_run and fails there ("no checkpoint")."""
  os.makedirs(tmp_path / "run" / "configs")
  (tmp_path / "run" / "configs" / "config.json").write_text('{"model": {}}')
  return str(tmp_path / "run")


def test_diagnose_checks_its_inputs_and_output_before_any_work(tmp_path):
  workdir = _fake_run(tmp_path)
  diagnose = lambda **kw: diagnostics.diagnose_run(workdir, str(tmp_path), **kw)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):  # all checks passed
    diagnose()
  with pytest.raises(ValueError, match="sigmas must be a non-empty list"):
    diagnose(sigmas=(0.1, -1.0))
  with pytest.raises(ValueError, match="start_sigmas must be a non-empty list"):
    diagnose(start_sigmas=(0.0,))
  with pytest.raises(FileNotFoundError, match=r"classifier file .*none\.npz not found"):
    diagnose(classifier_path=str(tmp_path / "none.npz"))
  with pytest.raises(FileNotFoundError, match="not a run folder made by train.py"):
    diagnostics.diagnose_run(str(tmp_path / "typo"), str(tmp_path))
  assert not (tmp_path / "typo").exists()  # no folder made for the default out
  out = tmp_path / "run" / "diagnostics.json"
  out.write_text("kept")
  with pytest.raises(FileExistsError, match="diagnostics.json exists; pass --overwrite"):
    diagnose()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    diagnose(overwrite=True)
  (tmp_path / "mine.json").write_text("kept")
  with pytest.raises(FileExistsError, match=r"--out .*mine\.json exists"):
    diagnose(out=str(tmp_path / "mine.json"))
  assert out.read_text() == (tmp_path / "mine.json").read_text() == "kept"
  # evaluate.py tells each before JAX starts
  from tests.test_cli import run_noting_jax
  proc, jax_imported = run_noting_jax("evaluate.py", "--diagnose", "--workdir", workdir,
                                      "--data_dir", tmp_path)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and not jax_imported
  assert proc.stderr.strip().endswith("pass --overwrite to replace it, or choose "
                                      "another path. Nothing was written.")
  proc, jax_imported = run_noting_jax("evaluate.py", "--diagnose", "--workdir",
                                      tmp_path / "typo", "--data_dir", tmp_path)
  assert proc.returncode != 0 and "not a run folder made by train.py" in proc.stderr
  assert not jax_imported and not (tmp_path / "typo").exists()
  proc = _run("evaluate.py", "--diagnose", "--workdir", workdir, "--data_dir",
              str(tmp_path), "--num_images", "5")
  assert proc.returncode != 0 and "--num_images must be >= 10" in proc.stderr


def test_diagnose_checks_the_runs_saved_config_before_loading_the_run(tmp_path):
  # each is told from configs/*.json; a run that passes them all fails at its
  # missing checkpoint (or the missing classifier file, loaded first)
  workdir = _fake_run(tmp_path)
  config = tmp_path / "run" / "configs" / "config.json"
  diagnose = lambda **kw: diagnostics.diagnose_run(workdir, str(tmp_path), **kw)
  clf = str(tmp_path / "none.npz")
  # the run's sampling sigma_min, 0.002 (configs/default.py): a start at or below
  # it has nothing to denoise
  with pytest.raises(ValueError, match=r"start_sigmas \[0\.001, 0\.002\] must be > the "
                                       r"run's sampling sigma_min = 0\.002"):
    diagnose(classifier_path=clf, start_sigmas=(0.001, 0.002, 0.5))
  with pytest.raises(FileNotFoundError, match="classifier file"):
    diagnose(classifier_path=clf, start_sigmas=(0.003,))
  config.write_text('{"model": {}, "data": {"name": "synthetic"}}')
  with pytest.raises(ValueError, match="--diagnose needs real data; this run's data is "
                                       "'synthetic'"):
    diagnose()
  config.write_text('{"model": {}, "data": {"name": "cifar10"}}')
  with pytest.raises(ValueError, match="the FD part needs the MNIST classifier; this run's "
                                       "data is 'cifar10'"):
    diagnose(classifier_path=clf)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):  # the loss part: any data
    diagnose()
  assert not (tmp_path / "run" / "diagnostics.json").exists()


def test_diagnose_cli_names_its_own_data_flags(tiny_run, tmp_path):
  workdir, _ = tiny_run
  proc = _run("evaluate.py", "--diagnose", "--workdir", workdir, "--data_dir",
              str(tmp_path / "missing"), "--out", str(tmp_path / "d.json"))
  message = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert message.endswith("or use --source tfds.") and "config.data" not in message


def test_diagnose_refuses_a_holdout_read_in_another_sources_order(tiny_run, tmp_path):
  # data.holdout picks training images by position, and TFDS orders MNIST
  # otherwise than the IDX files: the 'train' images would include held-out ones
  workdir, data_dir = tiny_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  for name in os.listdir(os.path.join(copy, "configs")):
    path = os.path.join(copy, "configs", name)
    config = json.load(open(path))
    config["data"].update(source="tfds", holdout=10)
    json.dump(config, open(path, "w"))
  with pytest.raises(ValueError, match=r"position in its tfds data.*--source tfds"):
    diagnostics.diagnose_run(copy, data_dir, "offline", num_images=20, sigmas=(1.0,),
                             out=str(tmp_path / "d.json"))
  assert not os.path.exists(tmp_path / "d.json")
  # the run's saved config tells it: evaluate.py refuses before JAX starts
  from tests.test_cli import run_noting_jax
  proc, jax_imported = run_noting_jax("evaluate.py", "--diagnose", "--workdir", copy,
                                      "--data_dir", data_dir, "--out", tmp_path / "d.json")
  assert proc.returncode != 0 and "position in its tfds data" in proc.stderr
  assert not jax_imported and not os.path.exists(tmp_path / "d.json")
