"""bench/latent_temperature_sampling.py: what it changes in the denoiser, and only
there; bench/score_scale_sweep.py: its settings and a sweep as a user runs it;
bench/pixel_histogram.py on known images."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist, mnist_density
from scoreflow_jax import data, guiders, model as model_lib
from scoreflow_jax.networks import gaussian_base as gaussian_lib
from tests.perturb import perturb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import latent_temperature_sampling as latent  # noqa: E402
import score_scale_sweep as sweep  # noqa: E402


def _density_model(gaussian_base=False):
  """The tiny density model (N(0, I) base, or a 2-component mixture base fitted
  to synthetic images), its flow perturbed, and 4 noisy images at 4 sigmas."""
  config = mnist_density.get_config("tiny")
  images, labels = data.make_synthetic(40, seed=1)
  if gaussian_base:
    sf = config.model.score_flow
    sf.gaussian_base, sf.gaussian_components, sf.gaussian_rank = True, 2, 3
  model = model_lib.build_model(config)
  batch = data.to_model_batch(images[:4], labels[:4])
  params = model.init(jax.random.key(0), batch)
  if gaussian_base:
    x0 = data.to_model_images(images)
    stats = gaussian_lib.fit_mixture(x0, labels, 10, 2, 3, seed=0)
    params["network"][model.frozen_module] = jax.tree.map(jnp.asarray, stats)
  params["network"]["flow"] = perturb(params["network"]["flow"], jax.random.key(1), 0.05)
  sigma = jnp.asarray([0.05, 0.3, 0.9, 5.0])
  x = batch["jpg"] + sigma[:, None, None, None] * jax.random.normal(
      jax.random.key(2), batch["jpg"].shape)
  cond = model.condition(params, batch)
  return model, params, x, sigma, cond


@pytest.mark.parametrize("gaussian_base", [False, True], ids=["normal_base", "mixture_base"])
def test_latent_temperature_weights_the_base_term_and_the_log_det_apart(gaussian_base):
  model, params, x, sigma, cond = _density_model(gaussian_base)
  own = model.denoiser(params)(x, sigma, cond)
  d = lambda a, b, lo=0.0, hi=100.0: latent.TemperedDensity(model, a, b, lo, hi).denoiser(
      params)(x, sigma, cond)
  # A = B = 1 is the run's own denoiser; A = B = kappa the score times kappa
  np.testing.assert_allclose(d(1.0, 1.0), own, rtol=1e-5, atol=1e-5)
  scaled = guiders.score_scale(lambda xx, ss: model.denoiser(params)(xx, ss, cond), 1.5,
                               (0.0, 100.0))(x, sigma)
  np.testing.assert_allclose(d(1.5, 1.5), scaled, rtol=1e-5, atol=1e-5)
  # the score is A times the base term's plus B times the log-det's
  base, log_det = d(1.0, 0.0) - x, d(0.0, 1.0) - x
  np.testing.assert_allclose(base + log_det, own - x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d(2.0, 0.5) - x, 2.0 * base + 0.5 * log_det,
                             rtol=1e-4, atol=1e-5)
  # the log-det's share is not nothing (the flow is not the identity)
  assert np.max(np.abs(np.asarray(log_det))) > 1e-3
  # only inside (lo, hi]: sigma 0.3 and 0.9 of the four
  mixed = d(2.0, 1.0, 0.1, 1.0)
  inside = np.asarray([False, True, True, False])
  np.testing.assert_allclose(mixed[inside], d(2.0, 1.0)[inside], rtol=1e-6)
  np.testing.assert_allclose(mixed[~inside], own[~inside], rtol=1e-6)
  assert not np.allclose(mixed[inside], own[inside], atol=1e-4)


def test_latent_temperature_refuses_a_model_without_a_density():
  config = mnist.get_config("tiny")
  model = model_lib.build_model(config)
  with pytest.raises(ValueError, match="parameterization='density'"):
    latent.TemperedDensity(model, 2.0, 1.0, 0.1, 1.0)
  with pytest.raises(ValueError, match="parameterization='density'"):
    latent.TemperedDensity(types.SimpleNamespace(), 2.0, 1.0, 0.1, 1.0)


def test_latent_temperature_gaussian_base_matches_a_sharper_base_at_the_identity_flow():
  # identity flow (zero couplings): log q = the base's noisy log-density, so A
  # times it is the score of that density raised to A: D' - x = A (D - x)
  model, params, x, sigma, cond = _density_model(gaussian_base=True)
  params = dict(params)
  params["network"] = dict(params["network"])
  params["network"]["flow"] = jax.tree.map(jnp.zeros_like, params["network"]["flow"])
  own = model.denoiser(params)(x, sigma, cond)
  tempered = latent.TemperedDensity(model, 3.0, 1.0, 0.0, 100.0).denoiser(params)(x, sigma, cond)
  np.testing.assert_allclose(tempered - x, 3.0 * (own - x), rtol=1e-4, atol=1e-5)


def test_score_scale_sweep_settings_draw_scale_1_once():
  assert sweep.parse_intervals("0.1:1,0.03:1") == [(0.1, 1.0), (0.03, 1.0)]
  for bad, message in (("0.1-1", "lo:hi"), ("1:0.1", "0 <= lo < hi"),
                       ("0.1:1,0.1:1", "repeated")):
    with pytest.raises(ValueError, match=message):
      sweep.parse_intervals(bad)
  assert sweep.settings([1.0, 2.0, 1.5], [(0.1, 1.0), (0.0, 3.0)]) == [
      (1.0, None), (2.0, (0.1, 1.0)), (2.0, (0.0, 3.0)), (1.5, (0.1, 1.0)), (1.5, (0.0, 3.0))]
  assert sweep.settings([2.0], [(0.1, 1.0)]) == [(2.0, (0.1, 1.0))]


def test_score_scale_sweep_scores_each_setting_from_the_same_noise(tmp_path):
  # a tiny run, a tiny classifier and MNIST-format files, as a user has them
  from scoreflow_jax.eval import classifier as classifier_lib
  from tests.test_eval import _write_mnist
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=600)
  workdir = str(tmp_path / "run")
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", workdir,
             "--config.training.num_steps=4", "--config.training.image_every=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  test_images, test_labels = data.make_synthetic(60, seed=1)
  _write_mnist(tmp_path, test_images, test_labels, "t10k")
  _write_mnist(tmp_path, *data.make_synthetic(50, seed=4), "train")
  params, _ = classifier_lib.train_classifier(
      *data.make_synthetic(100, seed=0), steps=2, seed=0, log=lambda s: None,
      widths=(8, 16, 16), hidden=32, dropout=0.0, batch_size=32)
  classifier_lib.save_classifier(params, str(tmp_path / "clf.npz"))
  out = str(tmp_path / "sweep.json")
  args = ("bench/score_scale_sweep.py", "--workdir", workdir, "--data_dir", str(tmp_path),
          "--classifier", str(tmp_path / "clf.npz"),
          "--scales", "1,3", "--intervals", "0.1:1,1:100", "--num_per_class", "2",
          "--out", out)
  proc = run(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    summary = json.load(f)
  rows = summary["results"]
  assert [(r["scale"], r["interval"]) for r in rows] == [
      (1.0, None), (3.0, [0.1, 1.0]), (3.0, [1.0, 100.0])]
  assert all(r["num_samples"] == 20 and np.isfinite(r["fd"]) for r in rows)
  # one reference set for all: the floor is the same number; the scales move the FD
  assert len({r["fd_floor"] for r in rows}) == 1
  assert len({round(r["fd"], 6) for r in rows}) == 3
  assert summary["best"] == min(rows, key=lambda r: r["fd"])
  assert os.path.exists(str(tmp_path / "sweep.png"))
  assert "lowest FD" in proc.stdout and "[3/3]" in proc.stdout
  assert summary["reference"] == "test" and "against 60 test images" in proc.stdout
  # nothing is replaced
  again = run(*args)
  assert again.returncode != 0 and "exists; choose another --out" in again.stderr
  # against the run's training images (here all 50 of the files' train split):
  # another floor, the same settings
  proc = run(*args[:-1], str(tmp_path / "train.json"), "--reference", "train",
             "--scales", "1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "train.json") as f:
    train = json.load(f)
  assert train["reference"] == "train" and "against 50 train images" in proc.stdout
  assert [r["fd"] for r in train["results"]] != [rows[0]["fd"]]
  # validation needs a run that held images out
  proc = run(*args[:-1], str(tmp_path / "val.json"), "--reference", "validation")
  assert proc.returncode != 0 and "holdout is 0" in proc.stderr


def test_pixel_histogram_bins_grey_and_haze_on_known_images():
  import pixel_histogram as ph
  x = -np.ones((2, 28, 28, 1), np.float32)
  np.testing.assert_array_equal(ph.histogram(x), [1, 0, 0, 0, 0, 0, 0])
  x[0, 10:18, 13:15] = 1.0  # a stroke: 16 pixels, saturated (1.0 in the closed last bin)
  x[0, 10:18, 15] = 0.2  # its soft edge: 8 grey pixels (> 0: stroke for the haze)
  x[1, 0, 0] = -0.95  # near-black, not haze (not above -0.9)
  x[1, 27, 27] = -0.7  # haze: far from any stroke (image 1 has none)
  s = ph.summary(x, ph.histogram(-np.ones_like(x)))
  n = x.size
  np.testing.assert_allclose(s["histogram"], np.array([n - 26, 1, 1, 0, 8, 0, 16]) / n)
  assert s["grey"] == pytest.approx(9 / n) and s["saturated"] == pytest.approx(16 / n)
  # far pixels: all of image 1 (784), and image 0's beyond 3 px of its stroke
  from scipy import ndimage
  far0 = (ndimage.distance_transform_edt(~(x[0, ..., 0] > 0)) >= 3).sum()
  assert s["haze"] == pytest.approx(1 / (784 + far0))
  assert s["tv_to_real"] == pytest.approx(26 / n)
  assert np.isnan(ph.haze(np.ones((1, 4, 4))))  # no background at all
  # by distance from the strokes: the stroke and its edge, then -1 but for
  # image 1's two pixels above -1, whose 784 pixels are all in the last ring
  d0 = ndimage.distance_transform_edt(~(x[0, ..., 0] > 0))
  last = 784 + (d0 >= 5).sum()
  np.testing.assert_allclose(ph.rings(x), [(16 + 8 * 0.2) / 24, -1, -1, -1,
                                           (-(last - 2) - 0.95 - 0.7) / last], rtol=1e-7)
  assert np.isnan(ph.rings(-np.ones((1, 4, 4)))[0])  # no strokes: an empty first ring
