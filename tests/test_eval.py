"""Tests for scoreflow_jax.eval: Frechet distance, class accuracy, classifier."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from scoreflow_jax import data
from scoreflow_jax.eval import classifier as classifier_lib
from scoreflow_jax.eval import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(widths=(8, 16, 16), hidden=32, dropout=0.0, batch_size=32)


def _with_moments(rng, n, mean, cov):
  """n samples whose sample mean and (unbiased) covariance are exactly given."""
  z = rng.standard_normal((n, len(mean)))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_identical_sets_is_zero():
  feats = np.random.default_rng(0).standard_normal((500, 16))
  assert abs(metrics.frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((400, 8))
  b = 0.5 * rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) + 1.0
  fd = metrics.frechet_distance(a, b)
  assert fd > 1.0
  np.testing.assert_allclose(metrics.frechet_distance(b, a), fd, rtol=1e-9)


def _diagonal_pair(rng, d):
  """Feature sets of diagonal covariance (300 and 200 rows) and their FD,
  |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2."""
  mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
  var_a, var_b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  a = _with_moments(rng, 300, mu_a, np.diag(var_a))
  b = _with_moments(rng, 200, mu_b, np.diag(var_b))
  return a, b, np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)


def test_frechet_distance_diagonal_gaussians_closed_form():
  a, b, expected = _diagonal_pair(np.random.default_rng(2), 5)
  np.testing.assert_allclose(metrics.frechet_distance(a, b), expected,
                             rtol=1e-9)


def test_frechet_distance_general_gaussians_closed_form():
  """Tr sqrtm(Sa Sb) = Tr sqrtm(Sa^1/2 Sb Sa^1/2), computed another way."""
  rng = np.random.default_rng(3)
  m_a, m_b = rng.standard_normal((2, 6, 6))
  cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(6), m_b @ m_b.T + 0.1 * np.eye(6)
  mu_a, mu_b = rng.standard_normal(6), rng.standard_normal(6)
  a = _with_moments(rng, 250, mu_a, cov_a)
  b = _with_moments(rng, 250, mu_b, cov_b)
  root_a = scipy.linalg.sqrtm(cov_a).real
  cross = np.sum(np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a)))
  expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * cross)
  np.testing.assert_allclose(metrics.frechet_distance(a, b), expected,
                             rtol=1e-8)


def test_frechet_distance_grows_with_mean_shift():
  feats = np.random.default_rng(4).standard_normal((300, 4))
  shifts = [0.1, 0.5, 2.0]
  fds = [metrics.frechet_distance(feats, feats + s) for s in shifts]
  np.testing.assert_allclose(fds, [4 * s ** 2 for s in shifts], rtol=1e-6)


def test_frechet_distance_ignores_features_constant_in_both_sets():
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((200, 4)), rng.standard_normal((150, 4)) + 0.5
  fd = metrics.frechet_distance(a, b)
  pad = lambda x, v: np.concatenate([x, np.full((len(x), 3), v)], 1)
  np.testing.assert_allclose(metrics.frechet_distance(pad(a, 0.0), pad(b, 0.0)),
                             fd, rtol=1e-12)
  np.testing.assert_allclose(metrics.frechet_distance(pad(a, 0.0), pad(b, 2.0)),
                             fd + 3 * 4.0, rtol=1e-12)


def test_frechet_distance_keeps_a_feature_dead_in_one_set_only():
  # a feature constant in a but spread in b (a collapsed sample set) counts in
  # full: its mean gap plus b's variance, the diagonal closed form with var_a = 0
  rng = np.random.default_rng(6)
  a, b, expected = _diagonal_pair(rng, 4)
  b_dead = rng.standard_normal(200)
  b_dead = 0.5 + np.sqrt(0.7) * (b_dead - b_dead.mean()) / b_dead.std(ddof=1)
  a, b = np.c_[a, np.zeros(300)], np.c_[b, b_dead]
  expected += 0.5 ** 2 + 0.7
  np.testing.assert_allclose(metrics.frechet_distance(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(metrics.frechet_distance(b, a), expected, rtol=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same D"):
    metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_class_accuracy_known_inputs():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
  preds = np.array([0, 0, 1, 0, 1, 0, 2, 2, 2, 2])
  acc, per_class = metrics.class_accuracy(preds, labels, num_classes=4)
  assert acc == pytest.approx(0.8)
  np.testing.assert_array_equal(per_class[:3], [0.75, 0.5, 1.0])
  assert np.isnan(per_class[3])  # no items of class 3
  logits = np.eye(4)[preds] * 3.0 - 1.0
  acc_l, per_class_l = metrics.class_accuracy(logits, labels, num_classes=4)
  assert acc_l == acc
  np.testing.assert_array_equal(per_class_l, per_class)
  # per true class (recall), not per predicted class (precision: [1.0, 0.667])
  _, per_class = metrics.class_accuracy(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2)
  np.testing.assert_array_equal(per_class, [0.5, 1.0])


@pytest.fixture(scope="module")
def trained():
  """A tiny classifier trained on synthetic gratings; its held-out data."""
  images, labels = data.make_synthetic(600, seed=0)
  test_images, test_labels = data.make_synthetic(400, seed=1)
  logs = []
  params, acc = classifier_lib.train_classifier(
      images, labels, test_images, test_labels, steps=40, seed=0,
      log=logs.append, max_shift=2, learning_rate=3e-3, **TINY)
  return params, acc, test_images, test_labels, logs


def test_classifier_learns_synthetic_classes(trained):
  params, acc, test_images, test_labels, logs = trained
  assert acc >= 0.95
  assert acc == classifier_lib.accuracy(params, test_images, test_labels)
  assert "test accuracy" in logs[-1]
  feats = classifier_lib.extract_features(params, test_images[:5])
  assert feats.shape == (5, TINY["hidden"])
  assert feats.min() >= 0.0  # post-ReLU


def test_classifier_accepts_uint8_or_minus1_1(trained):
  params, _, test_images, _, _ = trained
  np.testing.assert_array_equal(
      classifier_lib.predict_logits(params, test_images[:7]),
      classifier_lib.predict_logits(
          params, data.to_model_batch(test_images[:7], np.zeros(7))["jpg"]))


def test_save_load_round_trip(trained, tmp_path):
  params, acc, test_images, _, _ = trained
  path = tmp_path / "clf.npz"
  classifier_lib.save_classifier(params, path, test_accuracy=acc)
  loaded, header = classifier_lib.load_classifier(path)
  assert header["test_accuracy"] == acc
  assert header["arch_version"] == classifier_lib.ARCH_VERSION
  assert header["widths"] == list(TINY["widths"])
  np.testing.assert_array_equal(
      classifier_lib.predict_logits(loaded, test_images[:50]),
      classifier_lib.predict_logits(params, test_images[:50]))


def test_load_garbage_names_path_and_fix(tmp_path):
  path = tmp_path / "garbage.npz"
  path.write_bytes(b"not a classifier" * 10)
  # the hint names a file of its own, not the one that is something else
  with pytest.raises(ValueError, match=r"garbage\.npz is not a classifier file \(not an"
                     r" \.npz archive\)\. Make one with: python train_classifier\.py"
                     r" --data_dir .* --out classifier\.npz$"):
    classifier_lib.load_classifier(path)
  # a folder: said so (not "not found"), and not proposed as --out
  with pytest.raises(IsADirectoryError, match=r"is a folder: give the \.npz file"
                     r" train_classifier\.py wrote\..* --out classifier\.npz$"):
    classifier_lib.load_classifier(tmp_path)
  other = tmp_path / "other.npz"
  np.savez(other, images=np.zeros((2, 28, 28, 1)))
  with pytest.raises(ValueError, match=r"other\.npz.*train_classifier\.py"):
    classifier_lib.load_classifier(other)
  with pytest.raises(FileNotFoundError, match=r"missing\.npz.*--out"):
    classifier_lib.load_classifier(tmp_path / "missing.npz")


def test_wrong_image_shape_is_refused(trained):
  params = trained[0]
  with pytest.raises(ValueError, match="do not fit this classifier"):
    classifier_lib.extract_features(params, np.zeros((2, 32, 32, 3), np.uint8))


def test_real_samples_score_near_floor_and_noise_far(trained):
  params, _, test_images, test_labels, _ = trained
  held_out, held_labels = data.make_synthetic(200, seed=2)
  real = metrics.evaluate_samples(params, held_out, held_labels, test_images,
                                  test_labels, n=200)
  assert real["floor_source"] == "reference"  # 400 >= 2 * 200
  assert real["num_samples"] == 200
  assert real["fd"] < 2.0 * real["fd_floor"]
  assert real["class_accuracy"] >= 0.95
  assert len(real["per_class_accuracy"]) == 10
  noise = np.random.default_rng(0).uniform(-1, 1, (200, 28, 28, 1))
  bad = metrics.evaluate_samples(params, noise, held_labels, test_images,
                                 test_labels, n=200)
  assert bad["fd"] > 20.0 * bad["fd_floor"]
  assert bad["fd_floor"] == real["fd_floor"]  # same seed, same real subsets
  assert bad["class_accuracy"] < 0.5
  # grain: uniform noise is rough, real images far less, and R is the same set
  assert bad["roughness"] > 3 * real["roughness"] > 0
  assert bad["reference_roughness"] == real["reference_roughness"] > 0
  # diversity: real images spread as R does, the floor's set too; one image
  # copied 200 times not at all
  assert 0.7 < real["feature_spread"] < 1.4 and 0.7 < real["floor_feature_spread"] < 1.4
  copies = metrics.evaluate_samples(params, np.repeat(held_out[:1], 200, axis=0), None,
                                    test_images, n=200)
  assert copies["feature_spread"] == pytest.approx(0.0, abs=1e-9)
  assert copies["floor_feature_spread"] == real["floor_feature_spread"]
  assert "feature spread" in metrics.format_results(real)
  # a file of another size, scored at the same n: the same reference and floor
  # images (they drew others before session 23, and compare could not pair them)
  more = metrics.evaluate_samples(params, np.concatenate([noise, noise[:37]]),
                                  np.concatenate([held_labels, held_labels[:37]]),
                                  test_images, test_labels, n=200)
  assert more["fd_floor"] == real["fd_floor"]
  # ... and the images every earlier version drew for a file of n images: R the
  # first n of a permutation drawn after one of n, the floor's set the next n
  rng = np.random.default_rng(0)
  rng.permutation(200)
  perm, cache = rng.permutation(len(test_images)), metrics.ClassifierCache(params)
  floor = metrics.frechet_distance(cache.get("features", test_images, perm[200:400]),
                                   cache.get("features", test_images, perm[:200]))
  assert real["fd_floor"] == pytest.approx(floor, rel=1e-6)


def test_floor_uses_second_set_when_reference_is_small(trained):
  params, _, test_images, _, _ = trained
  samples, _ = data.make_synthetic(300, seed=3)
  with pytest.raises(ValueError, match="floor_images"):
    metrics.evaluate_samples(params, samples, None, test_images, n=300)
  train_images, _ = data.make_synthetic(300, seed=0)
  res = metrics.evaluate_samples(params, samples, None, test_images, n=300,
                                 floor_images=train_images)
  assert res["floor_source"] == "floor_images"
  assert res["class_accuracy"] is None
  assert 0 < res["fd"] < 3.0 * res["fd_floor"]


def test_cache_computes_each_row_once_and_changes_no_result(trained):
  params, _, test_images, test_labels, _ = trained
  draws = [data.make_synthetic(120, seed=s) for s in (5, 6)]
  cache = metrics.ClassifierCache(params)
  cached = [metrics.evaluate_samples(params, x, y, test_images, test_labels,
                                     n=100, seed=s, cache=cache)
            for x, y in draws for s in (0, 1, 2)]
  fresh = [metrics.evaluate_samples(params, x, y, test_images, test_labels,
                                    n=100, seed=s)
           for x, y in draws for s in (0, 1, 2)]
  for c, f in zip(cached, fresh):
    for key in ("fd", "fd_floor", "class_accuracy", "reference_class_accuracy"):
      assert c[key] == pytest.approx(f[key], rel=1e-6, abs=1e-9), key
  # at most every sample row (features + logits) and every test row (features,
  # plus logits of the reference rows); the uncached calls computed 6 x 500
  assert cache.rows_computed <= 2 * 2 * 120 + 2 * len(test_images)
  before = cache.rows_computed
  again = metrics.evaluate_samples(params, *draws[0], test_images, test_labels,
                                   n=100, seed=1, cache=cache)
  assert cache.rows_computed == before and again["fd"] == cached[1]["fd"]
  with pytest.raises(ValueError, match="another classifier"):
    metrics.evaluate_samples(dict(params), *draws[0], test_images, n=100,
                             cache=cache)


def _write_mnist(directory, images, labels, prefix):
  for kind, magic, array in (("images-idx3", 2051, images[..., 0]),
                             ("labels-idx1", 2049, labels)):
    raw = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    (directory / f"{prefix}-{kind}-ubyte").write_bytes(
        raw + np.asarray(array, np.uint8).tobytes())


def _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels):
  """IDX files (the test images as MNIST test) and the classifier in tmp_path."""
  _write_mnist(tmp_path, test_images, test_labels, "t10k")
  _write_mnist(tmp_path, *data.make_synthetic(100, seed=4), "train")
  clf = tmp_path / "clf.npz"
  classifier_lib.save_classifier(params, clf, test_accuracy=acc)
  return clf


def test_evaluate_cli_writes_json(trained, tmp_path):
  params, acc, test_images, test_labels, _ = trained
  clf = _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels)
  images, labels = data.make_synthetic(300, seed=5)
  samples = tmp_path / "grid.npz"
  np.savez(samples, images=data.to_model_batch(images, labels)["jpg"],
           labels=labels)
  cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--samples",
         str(samples), "--classifier", str(clf), "--data_dir", str(tmp_path),
         "--num_samples", "150", "--memorisation"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "FD" in proc.stdout and "floor" in proc.stdout
  with open(tmp_path / "grid_eval.json") as f:
    results = json.load(f)
  assert results["num_samples"] == 150
  assert results["floor_source"] == "mnist test vs disjoint test"
  assert results["classifier_test_accuracy"] == acc
  assert results["class_accuracy"] >= 0.95
  assert results["fd"] < 2.0 * results["fd_floor"]
  assert results["memorisation"]["num"] == 300 and "nearest training image" in proc.stdout
  # two draws (here the same images in two files) against two reference sets
  shutil.copy(samples, tmp_path / "copy.npz")
  proc = subprocess.run(cmd[:3] + [f"{samples},{tmp_path / 'copy.npz'}"] + cmd[4:-1]
                        + ["--seed", "0,1", "--out", str(tmp_path / "two.json")],
                        capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "mean FD" in proc.stdout and "4 evaluations" in proc.stdout
  with open(tmp_path / "two.json") as f:
    two = json.load(f)
  assert two["num_evaluations"] == 4 and two["seed"] == [0, 1]
  assert two["fd_runs"][0]["fd"] == pytest.approx(results["fd"])  # file 0, seed 0


def test_combine_evaluations_known_numbers():
  def ev(fd, acc, per_class, seed):
    return dict(fd=fd, fd_floor=fd / 10, num_samples=50, floor_source="reference",
                class_accuracy=acc, per_class_accuracy=per_class,
                reference_class_accuracy=0.99, draw=0, seed=seed)
  res = metrics.combine_evaluations([
      ev(1.0, 0.9, [1.0, None], 0), ev(2.0, 0.8, [0.5, None], 1),
      ev(3.0, 0.7, [None, None], 2), ev(6.0, 0.6, [0.0, None], 3)])
  assert res["fd"] == 3.0 and res["fd_floor"] == pytest.approx(0.3)
  assert res["fd_sd"] == pytest.approx(np.sqrt((4 + 1 + 0 + 9) / 3))
  assert (res["fd_min"], res["fd_max"], res["num_evaluations"]) == (1.0, 6.0, 4)
  assert res["class_accuracy"] == pytest.approx(0.75)
  assert res["per_class_accuracy"] == [pytest.approx(0.5), None]
  assert [r["seed"] for r in res["fd_runs"]] == [0, 1, 2, 3]
  assert [r["fd"] for r in res["fd_runs"]] == [1.0, 2.0, 3.0, 6.0]
  both = metrics.combine_evaluations([
      dict(ev(1.0, 0.9, None, 0), reference_class_accuracy=0.9, roughness=0.4),
      dict(ev(2.0, 0.8, None, 1), reference_class_accuracy=1.0, roughness=0.6)])
  assert both["reference_class_accuracy"] == pytest.approx(0.95)
  assert both["roughness"] == pytest.approx(0.5)
  spread = metrics.combine_evaluations([
      dict(ev(1.0, 0.9, None, 0), feature_spread=0.8, floor_feature_spread=1.0),
      dict(ev(2.0, 0.8, None, 1), feature_spread=0.9, floor_feature_spread=1.1)])
  assert spread["feature_spread"] == pytest.approx(0.85)
  assert spread["floor_feature_spread"] == pytest.approx(1.05)
  one = metrics.combine_evaluations([ev(4.0, 0.5, None, 0)])
  assert (one["fd"], one["fd_sd"], one["per_class_accuracy"]) == (4.0, 0.0, None)
  with pytest.raises(ValueError, match="same num_samples"):
    metrics.combine_evaluations([ev(1.0, 0.9, None, 0), dict(ev(1.0, 0.9, None, 1),
                                                             num_samples=60)])
  with pytest.raises(ValueError, match="at least one"):
    metrics.combine_evaluations([])


def _combined(fds, num_samples=2000, acc=0.99):
  """A combined results dict with FD fds[(draw, seed)]."""
  return metrics.combine_evaluations([
      dict(fd=fd, fd_floor=7.0 + seed, num_samples=num_samples, floor_source="reference",
           class_accuracy=acc, per_class_accuracy=None, draw=draw, seed=seed)
      for (draw, seed), fd in fds.items()])


def test_compare_evaluations_pairs_by_file_and_seed():
  base = _combined({(0, 0): 20.0, (0, 1): 19.0, (1, 0): 21.0, (1, 1): 18.0})
  better = _combined({(0, 0): 18.0, (0, 1): 18.5, (1, 0): 17.0, (1, 1): 18.5}, acc=0.995)
  # seed 2 only in this one: paired on (0, 0) alone
  other = _combined({(0, 0): 25.0, (0, 2): 1.0})
  # (same classifier, same real images: the floor of seed 1, 8.0)
  single = dict(fd=19.0, fd_floor=8.0, num_samples=2000, class_accuracy=None, seed=1)
  rows = metrics.compare_evaluations(
      {"base": base, "better": better, "other": other, "single": single})
  assert [r["name"] for r in rows] == ["base", "better", "other", "single"]
  assert "paired" not in rows[0] and rows[0]["fd"] == pytest.approx(19.5)
  # differences -2, -0.5, -4, +0.5
  assert rows[1]["paired"] == {"pairs": 4, "mean": pytest.approx(-1.5), "min": -4.0,
                               "max": 0.5, "lower": 3}
  assert rows[1]["fd_sd"] == pytest.approx(np.std([18, 18.5, 17, 18.5], ddof=1))
  assert rows[2]["paired"] == {"pairs": 1, "mean": 5.0, "min": 5.0, "max": 5.0, "lower": 0}
  assert rows[2]["fd"] == 13.0  # its own mean keeps every evaluation
  assert rows[3]["paired"]["pairs"] == 1 and rows[3]["paired"]["mean"] == 0.0  # (0, 1): 19 vs 19
  assert rows[3]["paired"]["lower"] == 0  # a tie is not lower
  text = metrics.format_comparison(rows)
  assert "-1.500 (-4.000 to +0.500), lower in 3 of 4" in text and "99.50%" in text
  single_line = text.splitlines()[4]
  assert single_line.split()[:4] == ["single", "19.000", "-", "1"]  # no sd of one FD
  assert text.splitlines()[2].split()[2] == f"{rows[1]['fd_sd']:.3f}"
  none = metrics.compare_evaluations({"base": base, "x": _combined({(0, 5): 1.0, (0, 6): 2.0})})
  assert none[1]["paired"] is None
  assert "no (file, seed) pair in common" in metrics.format_comparison(none)
  with pytest.raises(ValueError, match="different sample counts.*--num_samples"):
    metrics.compare_evaluations({"a": base, "b": _combined({(0, 0): 1.0}, num_samples=1000)})
  with pytest.raises(ValueError, match="at least two"):
    metrics.compare_evaluations({"a": base})


def test_evaluate_cli_compares_results_files(tmp_path):
  for name, fds in (("a", {(0, 0): 20.0, (0, 1): 19.0}), ("b", {(0, 0): 18.0, (0, 1): 18.0})):
    with open(tmp_path / f"{name}.json", "w") as f:
      json.dump(_combined(fds), f)
  from tests.test_cli import run_noting_jax
  cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--compare"]
  # results files only: no JAX (started in a second, not after JAX's imports)
  proc, jax_imported = run_noting_jax(
      "evaluate.py", "--compare", f"base={tmp_path / 'a.json'},{tmp_path / 'b.json'}",
      "--out", tmp_path / "cmp.json")
  assert proc.returncode == 0 and not jax_imported, proc.stderr
  assert "paired with base" in proc.stdout and "-1.500 (-2.000 to -1.000), lower in 2 of 2" in proc.stdout
  with open(tmp_path / "cmp.json") as f:
    assert [r["name"] for r in json.load(f)] == ["base", "b"]  # unnamed: the file's stem
  bad = subprocess.run(cmd + [f"{tmp_path / 'a.json'},{tmp_path / 'missing.json'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert bad.returncode != 0 and "missing.json is not a results file" in bad.stderr


def test_several_draws_and_reference_sets_are_each_scored_and_averaged(trained, tmp_path):
  params, acc, test_images, test_labels, _ = trained
  clf = _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels)
  draws = []
  for k, seed in enumerate((5, 6)):
    images, labels = data.make_synthetic(120, seed=seed)
    draws.append((images, labels))
    np.savez(tmp_path / f"grid_s{k}.npz", images=images, labels=labels)
  paths = [str(tmp_path / "grid_s0.npz"), str(tmp_path / "grid_s1.npz")]
  with pytest.raises(ValueError, match="--out"):
    metrics.evaluate_sample_file(paths, clf, str(tmp_path), num_samples=100, seed=[0, 1])
  assert not (tmp_path / "grid_s0_eval.json").exists()
  # a file or seed twice would count as two evaluations; the results are no input
  for files, seeds in (([paths[0], paths[0]], [0]), (paths, [0, 0])):
    with pytest.raises(ValueError, match="given twice"):
      metrics.evaluate_sample_file(files, clf, str(tmp_path), num_samples=100, seed=seeds,
                                   out=str(tmp_path / "x.json"))
  with pytest.raises(ValueError, match="is one of the inputs"):
    metrics.evaluate_sample_file(paths, clf, str(tmp_path), num_samples=100, seed=[0],
                                 out=paths[1], overwrite=True)
  out = tmp_path / "both.json"
  res = metrics.evaluate_sample_file(paths, clf, str(tmp_path), num_samples=100,
                                     out=str(out), seed=[0, 1, 2], log=lambda _: None)
  # each (file, seed) is exactly the single evaluation with that seed
  ref = test_images, test_labels
  direct = [metrics.evaluate_samples(params, x, y, *ref, n=100, seed=s)
            for x, y in draws for s in (0, 1, 2)]
  assert [(r["draw"], r["seed"]) for r in res["fd_runs"]] == [
      (d, s) for d in (0, 1) for s in (0, 1, 2)]
  # float32 features of rows batched differently (the shared cache) agree to ~1e-7
  np.testing.assert_allclose([r["fd"] for r in res["fd_runs"]], [d["fd"] for d in direct],
                             rtol=1e-5)
  assert len({round(d["fd"], 9) for d in direct}) == 6  # the seeds pick other images
  assert res["fd"] == pytest.approx(np.mean([d["fd"] for d in direct]))
  assert res["fd_floor"] == pytest.approx(np.mean([d["fd_floor"] for d in direct]))
  assert res["class_accuracy"] == pytest.approx(np.mean([d["class_accuracy"] for d in direct]))
  assert res["seed"] == [0, 1, 2] and len(res["samples"]) == 2
  with open(out) as f:
    assert json.load(f)["fd_sd"] == pytest.approx(res["fd_sd"])
  text = metrics.format_results(res)
  assert "mean FD" in text and "6 evaluations (2 sample file(s) x 3 reference set(s))" in text


def test_validation_reference_is_the_runs_held_out_training_images(trained, tmp_path):
  params, acc, test_images, test_labels, _ = trained
  clf = tmp_path / "clf.npz"
  classifier_lib.save_classifier(params, clf, test_accuracy=acc)
  _write_mnist(tmp_path, test_images, test_labels, "t10k")
  train_images, train_labels = data.make_synthetic(300, seed=4)
  _write_mnist(tmp_path, train_images, train_labels, "train")
  kept, held = data.holdout_indices(300, 120)
  val = train_images[held], train_labels[held]
  samples, sample_labels = data.make_synthetic(100, seed=5)
  def write(name, **extra):
    np.savez(tmp_path / name, images=samples, labels=sample_labels, **extra)
    return str(tmp_path / name)
  good = write("ho.npz", holdout=120, step=7)
  score = lambda paths, n, **kw: metrics.evaluate_sample_file(
      paths, clf, str(tmp_path), num_samples=n, out=str(tmp_path / "r.json"),
      log=lambda _: None, reference="validation", overwrite=True, **kw)
  res = score(good, 50)  # 120 validation images: the floor is a disjoint 50 of them
  res0 = res["fd"]
  direct = metrics.evaluate_samples(params, samples, sample_labels, *val, n=50, seed=0)
  assert res["fd"] == pytest.approx(direct["fd"], rel=1e-5)
  assert res["fd_floor"] == pytest.approx(direct["fd_floor"], rel=1e-5)
  assert (res["reference"], res["holdout"]) == ("validation", 120)
  assert res["floor_source"] == "mnist validation vs disjoint validation"
  on_test = metrics.evaluate_samples(params, samples, sample_labels, test_images,
                                     test_labels, n=50, seed=0)
  assert abs(res["fd"] - on_test["fd"]) > 1e-3  # other reference images
  text = metrics.format_results(res)
  assert "validation split (120 held-out" in text and "--holdout 120" in text
  assert "--holdout" not in metrics.format_results(dict(res, classifier_holdout=120))
  res = score(good, 100)  # 120 < 2n: the floor's real images come from the test set
  assert res["floor_source"] == "mnist test vs validation" and res["num_samples"] == 100
  # against the test set, memorisation looks for copies among the images trained on:
  # samples that are held-out images are no copies
  copies = np.concatenate([train_images[held][:60], train_images[kept][:40]])
  np.savez(tmp_path / "copies.npz", images=copies, holdout=120)
  res = metrics.evaluate_sample_file(str(tmp_path / "copies.npz"), clf, str(tmp_path),
                                     num_samples=100, log=lambda _: None,
                                     check_memorisation=True)
  assert res["reference"] == "test" and res["holdout"] == 120
  d = metrics.nearest_distances(classifier_lib.to_inputs(copies),
                                train_images[kept])
  assert np.all(d[60:] < 0.1) and np.all(d[:60] > 1.0)  # (float rounding: not 0)
  # float32 distances from a matmul over other batches: rounding differs at ~1e-6
  assert res["memorisation"]["samples_median"] == pytest.approx(float(np.median(d)), rel=1e-5)
  for extra, match in (({}, "does not record which training images"),
                       ({"holdout": 0}, "trained on the whole training split")):
    with pytest.raises(ValueError, match=match):
      score(write("bad.npz", **extra), 50)
  with pytest.raises(ValueError, match="different data.holdout"):
    score([good, write("other.npz", holdout=60)], 50)
  # held out by position in TFDS's order: other images in the IDX files' order
  assert score(write("offline.npz", holdout=120, data_source="offline"), 50)["fd"] == res0
  tfds_run = write("tfds.npz", holdout=120, data_source="tfds")
  with pytest.raises(ValueError, match=r"position in its tfds data.*--source tfds"):
    score(tfds_run, 50)
  with pytest.raises(ValueError, match="--source tfds"):
    metrics.evaluate_sample_file(tfds_run, clf, str(tmp_path), num_samples=50,
                                 out=str(tmp_path / "m.json"), log=lambda _: None,
                                 check_memorisation=True)
  # against the test set, without the memorisation check, the order does not matter
  assert metrics.evaluate_sample_file(tfds_run, clf, str(tmp_path), num_samples=50,
                                      out=str(tmp_path / "t.json"),
                                      log=lambda _: None)["reference"] == "test"
  with pytest.raises(ValueError, match="unknown reference"):
    metrics.evaluate_sample_file(good, clf, str(tmp_path), reference="train")
  # against the test set at n > half of it, the floor's second set comes from the
  # whole training split, whatever the run held out: the same floor for every run
  many, many_labels = data.make_synthetic(300, seed=6)
  def score_test(h):
    np.savez(tmp_path / f"n{h}.npz", images=many, labels=many_labels, holdout=h)
    return metrics.evaluate_sample_file(
        str(tmp_path / f"n{h}.npz"), clf, str(tmp_path), num_samples=300,
        out=str(tmp_path / f"n{h}.json"), log=lambda _: None)
  floors = {h: score_test(h) for h in (0, 120)}
  assert len(test_images) < 2 * 300 and floors[0]["num_samples"] == 300
  assert floors[0]["floor_source"] == "mnist train vs test"
  assert floors[0]["fd_floor"] == floors[120]["fd_floor"]
  direct = metrics.evaluate_samples(params, many, many_labels, test_images,
                                    test_labels, n=300, floor_images=train_images, seed=0)
  assert floors[120]["fd_floor"] == pytest.approx(direct["fd_floor"], rel=1e-5)
  assert len(metrics.compare_evaluations(
      {"a": floors[0], "b": floors[120]}, log=pytest.fail)) == 2


def test_classifier_can_leave_out_the_held_out_images(tmp_path):
  _write_mnist(tmp_path, *data.make_synthetic(40, seed=1), "t10k")
  _write_mnist(tmp_path, *data.make_synthetic(300, seed=4), "train")
  msgs, out = [], str(tmp_path / "clf.npz")
  classifier_lib.train_and_save(str(tmp_path), out, steps=2, batch_size=8,
                                log=msgs.append, holdout=120)
  assert msgs[0].startswith("MNIST: 180 train, 40 test images")
  # a line at the first step (none came for 500 steps, minutes on a CPU), then
  # the rate after it
  assert re.fullmatch(r"step 1/2: loss \S+ \| compiled \| \d+ s", msgs[1]), msgs
  assert re.fullmatch(r"step 2/2: loss \S+ \| [\d.]+ steps/s \| ETA 0:00:00 \| \d+ s",
                      msgs[2]), msgs
  assert classifier_lib.load_classifier(out)[1]["holdout"] == 120
  logged = len(msgs)
  with pytest.raises(FileExistsError, match="clf.npz exists; pass --overwrite"):
    classifier_lib.train_and_save(str(tmp_path), out, steps=2, batch_size=8,
                                  log=msgs.append)
  assert len(msgs) == logged  # refused before the data were read
  classifier_lib.train_and_save(str(tmp_path), out, steps=2, batch_size=8,
                                log=msgs.append, overwrite=True)
  assert classifier_lib.load_classifier(out)[1]["holdout"] == 0


def test_results_against_other_references_do_not_compare():
  a, b = _combined({(0, 0): 20.0}), dict(_combined({(0, 0): 18.0}), reference="validation")
  with pytest.raises(ValueError, match="different reference images"):
    metrics.compare_evaluations({"a": a, "b": b})
  assert len(metrics.compare_evaluations({"a": dict(a, reference="validation"), "b": b})) == 2
  # the validation images of runs that held out other images are other images
  with pytest.raises(ValueError, match=r"different data.holdout.*'a': 5000, 'b': 10000"):
    metrics.compare_evaluations({"a": dict(a, reference="validation", holdout=5000),
                                 "b": dict(b, holdout=10000)})


def test_feature_spread_known_inputs():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(500, 8))
  assert metrics.feature_spread(ref, ref) == pytest.approx(1.0)
  assert metrics.feature_spread(0.5 * ref, ref) == pytest.approx(0.25)  # variances
  assert metrics.feature_spread(ref + 3.0, ref) == pytest.approx(1.0)  # not the mean
  # only two of eight directions: about 2 / 8 of the total variance
  flat = ref * np.r_[1.0, 1.0, np.zeros(6)]
  assert metrics.feature_spread(flat, ref) == pytest.approx(
      np.var(ref[:, :2], axis=0, ddof=1).sum() / np.var(ref, axis=0, ddof=1).sum())
  with pytest.raises(ValueError, match=">= 2 feature rows"):
    metrics.feature_spread(ref[:1], ref)
  with pytest.raises(ValueError, match="all equal"):
    metrics.feature_spread(ref, np.ones((5, 8)))


def test_roughness_known_inputs():
  # flat images: 0; a +-1 checkerboard: |4 x - 4 (-x)| = 8 at every interior pixel
  assert metrics.roughness(np.full((2, 5, 5, 1), 0.3)) == 0.0
  board = np.where(np.add.outer(np.arange(6), np.arange(6)) % 2 == 0, 1.0, -1.0)
  assert metrics.roughness(board[None, :, :, None]) == pytest.approx(8.0)
  # a linear ramp has no curvature; uint8 is read as [-1, 1] (255 -> 1, 0 -> -1)
  ramp = np.tile(np.linspace(-1, 1, 7), (7, 1))[None, :, :, None]
  assert metrics.roughness(ramp) == pytest.approx(0.0, abs=1e-6)  # float32 pixels
  as_uint8 = ((board + 1) * 127.5).astype(np.uint8)[None, :, :, None]
  assert metrics.roughness(as_uint8) == pytest.approx(8.0)
  # one spike of height 2 in a 5 x 5 image of -1: 8 at it and 2 at each of its 4
  # neighbours, over the 9 interior pixels; batches change nothing
  spike = np.full((3, 5, 5, 1), -1.0)
  spike[:, 2, 2] = 1.0
  assert metrics.roughness(spike, batch_size=2) == pytest.approx((8 + 4 * 2) / 9)
  with pytest.raises(ValueError, match="H, W >= 3"):
    metrics.roughness(np.zeros((1, 2, 5, 1)))


def test_nearest_distances_known_inputs():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (50, 4, 4, 1)).astype(np.uint8)
  as_float = train.astype(np.float32) / 127.5 - 1.0
  shifted = as_float[7].copy()
  shifted[1, 2, 0] += 0.25
  got = metrics.nearest_distances(np.stack([as_float[3], shifted]), train, batch_size=1)
  np.testing.assert_allclose(got, [0.0, 0.25], atol=1e-3)


def test_memorisation_tells_copies_from_new_images():
  rng = np.random.default_rng(1)
  train = rng.uniform(-1, 1, (400, 3, 3, 1)).astype(np.float32)
  test = rng.uniform(-1, 1, (400, 3, 3, 1)).astype(np.float32)
  copies = metrics.memorisation(train[:200], test, train, n=200)
  assert copies["samples_median"] < 1e-3 and copies["samples_below_test_min"] == 1.0
  assert copies["samples_ratio_median"] < 1e-3 and copies["samples_ratio_below_test_p1"] == 1.0
  # noisy copies (noise std 0.2): the ratio to the held-out images flags more
  # of them than the distance alone
  near = np.clip(train[:200] + 0.2 * rng.normal(size=(200, 3, 3, 1)), -1, 1)
  noisy = metrics.memorisation(near.astype(np.float32), test, train, n=200)
  assert noisy["samples_ratio_median"] < 0.6 * noisy["test_ratio_median"]
  assert noisy["samples_ratio_below_test_p1"] > max(0.4, noisy["samples_below_test_min"])
  fresh = metrics.memorisation(rng.uniform(-1, 1, (200, 3, 3, 1)), test, train, n=200)
  assert fresh["samples_below_test_min"] < 0.05
  assert 0.7 < fresh["samples_median"] / fresh["test_median"] < 1.4
  assert fresh["samples_ratio_below_test_p1"] < 0.05
  assert 0.8 < fresh["samples_ratio_median"] / fresh["test_ratio_median"] < 1.25
  # without held-out test images there is no ratio
  assert metrics.memorisation(train[:50], test[:50], train, n=50)["samples_ratio_median"] is None


def test_bad_samples_files_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.npz not found.*sample\.py"):
    metrics.load_samples(tmp_path / "nope.npz")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"\x00" * 64)
  with pytest.raises(ValueError, match=r"garbage\.npz is not a samples \.npz"):
    metrics.load_samples(garbage)
  # the grid given for its .npz: the .npz beside it is named
  (tmp_path / "grid.png").write_bytes(b"\x89PNG")
  np.savez(tmp_path / "grid.npz", images=np.zeros((2, 28, 28, 1)), labels=[0, 1])
  with pytest.raises(ValueError, match=r"the picture: pass .*grid\.npz$"):
    metrics.load_samples(tmp_path / "grid.png")
  out_of_range = tmp_path / "range.npz"
  np.savez(out_of_range, images=np.full((2, 28, 28, 1), 255.0), labels=[0, 1])
  with pytest.raises(ValueError, match=r"range\.npz.*\[-1, 1\]"):
    metrics.load_samples(out_of_range)
  negative = tmp_path / "negative.npz"
  np.savez(negative, images=-np.ones((2, 28, 28, 1)), labels=[-1, 1])
  with pytest.raises(ValueError, match=r"negative\.npz: 'labels' must be class indices"):
    metrics.load_samples(negative)


def test_linear_floor_matches_monte_carlo_of_the_linear_denoiser():
  """The closed form equals the simulated loss of D(x) = m + S (S + s^2)^-1 (x - m)
  on non-Gaussian data (only the first two moments matter)."""
  from scoreflow_jax.eval import linear_floor
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(4, 4))
  x0 = rng.uniform(-1, 1, (200_000, 4)) @ mix.T + np.array([0.3, -0.2, 0.0, 1.0])
  m, cov = x0.mean(0), np.cov(x0, rowvar=False)
  w = linear_floor.covariance_eigenvalues(x0)
  sigmas = np.array([0.05, 0.7, 3.0])
  closed = linear_floor.linear_denoiser_loss(w, sigmas, 0.5)
  for s, expected in zip(sigmas, closed):
    x = x0 + s * rng.standard_normal(x0.shape)
    gain = cov @ np.linalg.inv(cov + s**2 * np.eye(4))
    den = m + (x - m) @ gain.T
    mc = (s**2 + 0.25) / (s * 0.5) ** 2 * np.mean((den - x0) ** 2)
    np.testing.assert_allclose(mc, expected, rtol=0.02)
    worse = m + (x - m) @ (1.1 * gain).T  # any other linear map does worse
    assert (s**2 + 0.25) / (s * 0.5) ** 2 * np.mean((worse - x0) ** 2) > mc


def test_linear_floor_knowing_the_class_helps():
  from scoreflow_jax.eval import linear_floor
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 3000)
  x = rng.normal(size=(3000, 6)) * 0.3 + 2.0 * labels[:, None]  # classes differ by mean
  out = linear_floor.linear_floor(x, labels, ucg_rate=0.25, num_sigmas=2000)
  for k in out["training_mix"]:
    c, u, mixed = (out[n][k] for n in ("class_conditional", "unconditional", "training_mix"))
    assert c < u
    np.testing.assert_allclose(mixed, 0.75 * c + 0.25 * u, rtol=1e-12)


def test_linear_floor_samples_out_is_checked_before_the_work(tmp_path, capsys):
  from scoreflow_jax.eval import linear_floor
  (tmp_path / "mine.npz").write_bytes(b"a user's samples")
  for out, message in (("mine.npz", "exists; pass --overwrite"),
                       ("gauss", "name a .npz file")):
    with pytest.raises(SystemExit):  # before the data: this folder has none
      linear_floor.main(["--data_dir", str(tmp_path / "none"), "--samples_out",
                         str(tmp_path / out)])
    assert message in capsys.readouterr().err
  assert (tmp_path / "mine.npz").read_bytes() == b"a user's samples"
  assert not os.path.exists(tmp_path / "gauss") and not os.path.exists(tmp_path / "gauss.npz")


def test_gaussian_samples_have_each_class_mean_and_covariance():
  from scoreflow_jax.eval import linear_floor
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(2), 4000)
  mix = np.array([[0.2, 0.0, 0.0], [0.1, 0.1, 0.0], [0.0, -0.05, 0.15]])
  x = (rng.normal(size=(8000, 3)) @ mix.T + 0.4 * (2 * labels[:, None] - 1)).reshape(-1, 3, 1, 1)
  samples, sample_labels = linear_floor.gaussian_samples(x, labels, 20000, seed=0)
  assert samples.shape == (40000, 3, 1, 1) and samples.dtype == np.float32
  np.testing.assert_array_equal(sample_labels, np.repeat(np.arange(2), 20000))
  for c in range(2):
    data, drawn = x[labels == c].reshape(-1, 3), samples[sample_labels == c].reshape(-1, 3)
    np.testing.assert_allclose(drawn.mean(0), data.mean(0), atol=0.01)
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), np.cov(data, rowvar=False),
                               atol=0.003)
  wide, _ = linear_floor.gaussian_samples(3 * x, labels, 1000)
  assert wide.min() == -1.0 and wide.max() == 1.0  # clipped to the data range


def _error(proc):
  """The message a script failed with: ``error: MESSAGE``, the last line of
  stderr, without the page of --help absl printed above it until session 26."""
  lines = proc.stderr.strip().splitlines()
  assert "\nflags:\n" not in proc.stderr, proc.stderr[-2000:]
  return lines[-1].removeprefix("error: ") if lines else ""


def _evaluate(*args):
  """evaluate.py run as a user runs it."""
  return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"),
                         *map(str, args)], capture_output=True, text=True, cwd=REPO,
                        timeout=120, check=False)


def test_samples_outside_minus1_1_are_refused_with_the_fix(tmp_path):
  images, labels = data.make_synthetic(20, seed=5)
  def write(name, x):
    np.savez(tmp_path / name, images=x, labels=labels)
    return tmp_path / name
  unit = images.astype(np.float32) / 255.0  # real images in [0, 1]
  with pytest.raises(ValueError, match=r"unit\.npz.*no negative pixel.*look like \[0, 1\]"
                     r" images.*x \* 2 - 1"):
    metrics.load_samples(write("unit.npz", unit))
  with pytest.raises(ValueError, match=r"got \[0, 255\]\. They look like \[0, 255\].*"
                     r"x / 127\.5 - 1"):
    metrics.load_samples(write("bytes.npz", images.astype(np.float32)))
  with pytest.raises(ValueError, match=r"got \[-3, 3\]\. Map them to \[-1, 1\]"):
    metrics.load_samples(write("wide.npz", np.linspace(-3, 3, images.size).reshape(
        images.shape)))
  bad = unit * 2 - 1
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"1 NaN or infinite pixels"):
    metrics.load_samples(write("nan.npz", bad))
  # what is scored: [-1, 1] floats (x * 2 - 1 of the [0, 1] ones), noise, uint8
  fixed, _ = metrics.load_samples(write("fixed.npz", unit * 2 - 1))
  np.testing.assert_allclose(fixed, classifier_lib.to_inputs(images), atol=1e-6)
  metrics.load_samples(write("noise.npz", np.random.default_rng(0).uniform(
      -1, 1, images.shape)))
  assert metrics.load_samples(write("uint8.npz", images))[0].dtype == np.uint8
  # the script says it in one message, before the classifier or data are read
  proc = _evaluate("--samples", tmp_path / "unit.npz", "--classifier",
                   tmp_path / "none.npz", "--data_dir", tmp_path)
  assert proc.returncode != 0 and "look like [0, 1] images" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "unit_eval.json").exists()


def _grid(tmp_path, trained, n=120):
  """MNIST IDX files, a classifier and a samples file grid.npz in tmp_path."""
  params, acc, test_images, test_labels, _ = trained
  clf = _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels)
  images, labels = data.make_synthetic(n, seed=5)
  np.savez(tmp_path / "grid.npz", images=data.to_model_batch(images, labels)["jpg"],
           labels=labels)
  return clf, tmp_path / "grid.npz"


def test_evaluate_cli_replaces_no_results_file_unasked(trained, tmp_path):
  clf, samples = _grid(tmp_path, trained)
  args = ["--samples", samples, "--classifier", clf, "--data_dir", tmp_path,
          "--num_samples", 50]
  from tests.test_cli import run_noting_jax
  for out, extra in ((tmp_path / "grid_eval.json", []),  # the default --out
                     (tmp_path / "mine.json", ["--out", tmp_path / "mine.json"])):
    out.write_text("kept")
    proc, jax_imported = run_noting_jax("evaluate.py", *args, *extra)  # before JAX
    assert proc.returncode != 0 and f"{out} exists; pass --overwrite" in proc.stderr
    assert not jax_imported
    assert "Traceback" not in proc.stderr and "FD" not in proc.stdout  # before scoring
    assert out.read_text() == "kept"
  proc = _evaluate(*args, "--overwrite")
  assert proc.returncode == 0, proc.stderr
  res = json.loads((tmp_path / "grid_eval.json").read_text())
  assert res["num_samples"] == 50
  assert res["classifier_sha256"] == classifier_lib.file_sha256(clf)
  assert len(res["classifier_sha256"]) == 16
  # the results are printed before the write, so a write that fails loses nothing
  (tmp_path / "a_file").write_text("")  # no folder can be made where a file is
  os.symlink(tmp_path / "a_file" / "r.json", tmp_path / "dangling.json")
  proc = _evaluate(*args, "--out", tmp_path / "dangling.json")
  assert proc.returncode != 0 and f"FD {res['fd']:.3f}" in proc.stdout
  assert "the results above were not written" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_evaluate_cli_checks_its_flags_first_and_names_its_own(trained, tmp_path):
  clf, samples = _grid(tmp_path, trained)
  args = ["--samples", samples, "--classifier", clf]
  for n in (0, -3, 1):
    proc = _evaluate(*args, "--data_dir", tmp_path, "--num_samples", n)
    assert proc.returncode != 0 and "--num_samples must be >= 2" in proc.stderr
  # data.py's hint names train.py's --config.data.*; this script's flags are
  # --source and --data_dir
  proc = _evaluate(*args, "--data_dir", tmp_path / "missing")
  assert proc.returncode != 0 and _error(proc).endswith("or use --source tfds.")
  assert "config.data" not in _error(proc) and "Traceback" not in proc.stderr
  proc = _evaluate(*args)
  assert proc.returncode != 0 and "--source offline needs --data_dir" in proc.stderr


def test_data_hints_are_given_in_the_scripts_flags():
  from absl import app
  from scoreflow_jax import usage
  with pytest.raises(ValueError) as raised:
    data.load_split("mnist", "test", "offline", None)
  assert "--config.data.source=tfds" in str(raised.value)  # train.py's flags
  text = usage.with_script_flags(str(raised.value))
  assert text.startswith("--source offline needs --data_dir. ")
  assert text.endswith("or use --source tfds.") and "config.data" not in text
  assert usage.with_script_flags(
      "instead use --config.data.source=offline --config.data.data_dir=/p/mnist.") == (
          "instead use --source offline --data_dir /p/mnist.")
  with pytest.raises(app.UsageError, match=r"^--source offline needs --data_dir\."):
    with usage.usage_errors():
      data.load_split("mnist", "test", "offline", None)
  with pytest.raises(KeyError):  # a bug keeps its traceback
    with usage.usage_errors():
      raise KeyError("params")


def test_user_errors_keep_their_traceback_on_request(monkeypatch):
  # a ValueError may be a bug too: SCOREFLOW_TRACEBACK=1 re-raises it as it was
  from absl import app
  from scoreflow_jax import usage
  for value, raised in (("1", ValueError), ("0", app.UsageError), ("", app.UsageError)):
    monkeypatch.setenv("SCOREFLOW_TRACEBACK", value)
    with pytest.raises(raised, match="bad shape"):
      with usage.usage_errors():
        raise ValueError("bad shape")


def _scored_by(tmp_path, clf, out):
  """Results of tmp_path/grid.npz scored by the classifier file ``clf``."""
  return metrics.evaluate_sample_file(str(tmp_path / "grid.npz"), clf, str(tmp_path),
                                      num_samples=50,
                                      out=str(tmp_path / out), seed=[0, 1],
                                      log=lambda _: None)


def test_results_scored_by_other_classifiers_do_not_compare(trained, tmp_path):
  clf, _ = _grid(tmp_path, trained)
  params = trained[0]
  other = tmp_path / "other_clf.npz"
  classifier_lib.save_classifier(_scaled(params, 1.5), other)
  a = _scored_by(tmp_path, clf, "a.json")
  b = _scored_by(tmp_path, str(other), "b.json")
  assert a["classifier_sha256"] != b["classifier_sha256"]
  assert a["fd_floor"] != pytest.approx(b["fd_floor"], rel=1e-3)
  with pytest.raises(ValueError, match=r"different classifiers.*clf\.npz, sha256 "
                     f"{a['classifier_sha256']}.*other_clf\\.npz, sha256 "
                     f"{b['classifier_sha256']}.*same --classifier"):
    metrics.compare_evaluations({"a": a, "b": b})
  again = _scored_by(tmp_path, clf, "a2.json")  # the same classifier
  rows = metrics.compare_evaluations({"a": a, "again": again}, log=pytest.fail)
  assert rows[1]["paired"]["pairs"] == 2 and abs(rows[1]["paired"]["mean"]) < 1e-4
  proc = _evaluate("--compare", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}")
  assert proc.returncode != 0 and "different classifiers" in proc.stderr
  assert b["classifier_sha256"] in proc.stderr and "Traceback" not in proc.stderr
  # results from before the sha256 was recorded: their floors tell
  legacy = lambda r: {k: v for k, v in r.items() if k != "classifier_sha256"}
  with pytest.raises(ValueError, match=r"not scored against the same real images.*"
                     r"floors differ: \(file 0, seed 0\)"):
    metrics.compare_evaluations({"a": legacy(a), "b": b})
  assert len(metrics.compare_evaluations({"a": legacy(a), "again": again},
                                         log=pytest.fail)) == 2


def _scaled(tree, factor):
  """Classifier parameters times ``factor``: another classifier."""
  return {k: _scaled(v, factor) if isinstance(v, dict) else np.asarray(v) * factor
          for k, v in tree.items()}


def test_compare_checks_old_results_files_by_their_floors():
  base = _combined({(0, 0): 20.0, (0, 1): 19.0})  # floors 7 and 8: no sha256
  same = _combined({(0, 0): 18.0, (0, 1): 18.5})
  assert metrics.compare_evaluations({"base": base, "same": same},
                                     log=pytest.fail)[1]["paired"]["pairs"] == 2
  other = dict(_combined({(0, 1): 18.0}), fd_runs=[
      dict(draw=0, seed=1, fd=18.0, fd_floor=11.0)])
  with pytest.raises(ValueError, match=r"other's and base's FDs at the same \(file, seed\)"
                     r".*\(file 0, seed 1\) 11\.000 vs 8\.000"):
    metrics.compare_evaluations({"base": base, "other": other})
  # one classifier, but other reference images (a samples file of another size):
  # the recorded sha256s agree, the floors do not
  sha = "0123456789abcdef"
  with pytest.raises(ValueError, match="held different numbers of images"):
    metrics.compare_evaluations({"base": dict(base, classifier_sha256=sha),
                                 "other": dict(other, classifier_sha256=sha)})
  logs = []
  rows = metrics.compare_evaluations(
      {"base": base, "apart": _combined({(0, 5): 18.0})}, log=logs.append)
  assert len(logs) == 1 and "share no (file, seed) evaluation" in logs[0]
  assert rows[1]["warning"] == logs[0] and rows[1]["paired"] is None
  # one recorded sha256 beside an old file: the floors still decide
  with_sha = dict(same, classifier_sha256="0123456789abcdef")
  assert len(metrics.compare_evaluations({"base": base, "s": with_sha},
                                         log=pytest.fail)) == 2


def test_evaluate_cli_compare_checks_its_out_first(tmp_path):
  for name in ("a", "b"):
    with open(tmp_path / f"{name}.json", "w") as f:
      json.dump(_combined({(0, 0): 20.0}), f)
  (tmp_path / "cmp.json").write_text("kept")
  files = f"{tmp_path / 'a.json'},{tmp_path / 'missing.json'}"
  proc = _evaluate("--compare", files, "--out", tmp_path / "cmp.json")
  assert proc.returncode != 0 and "cmp.json exists; pass --overwrite" in proc.stderr
  assert (tmp_path / "cmp.json").read_text() == "kept"
  proc = _evaluate("--compare", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                   "--out", tmp_path / "cmp.json", "--overwrite")
  assert proc.returncode == 0, proc.stderr
  assert [r["name"] for r in json.loads((tmp_path / "cmp.json").read_text())] == ["a", "b"]
  kept = (tmp_path / "a.json").read_text()  # an input is not replaced, even asked
  proc = _evaluate("--compare", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                   "--out", tmp_path / "a.json", "--overwrite")
  assert proc.returncode != 0 and "is one of the inputs" in _error(proc)
  assert (tmp_path / "a.json").read_text() == kept


def test_evaluate_cli_refuses_flags_its_mode_would_ignore(tmp_path):
  files = f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
  for args, message in (
      (["--compare", files, "--seed", "7", "--classifier", "c.npz"],
       "--compare does not use --classifier, --seed: drop them"),
      (["--diagnose", "--workdir", tmp_path, "--reference", "validation"],
       "--diagnose does not use --reference: drop it"),
      (["--diagnose", "--workdir", tmp_path, "--num_samples", "50"],
       "--diagnose does not use --num_samples: drop it"),
      (["--samples", "s.npz", "--workdir", tmp_path, "--noema"],
       "--samples does not use --ema, --workdir: drop them"),
      (["--samples", "s.npz", "--classifier", "c.npz", "--data_dir", tmp_path,
        "--seed", "0,-1"], "--seed needs non-negative integers")):
    proc = _evaluate(*args)
    assert proc.returncode != 0 and message in _error(proc), proc.stderr[-800:]
    assert "Traceback" not in proc.stderr


def test_train_classifier_replaces_no_classifier_unasked(tmp_path):
  clf = tmp_path / "clf.npz"
  clf.write_bytes(b"a classifier")
  cmd = [sys.executable, os.path.join(REPO, "train_classifier.py"), "--data_dir",
         str(tmp_path / "missing"), "--out", str(clf), "--steps", "2"]
  run = lambda *extra: subprocess.run(cmd + list(extra), capture_output=True,
                                      text=True, cwd=REPO, timeout=120, check=False)
  proc = run()
  assert proc.returncode != 0 and f"{clf} exists; pass --overwrite" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = run("--overwrite")  # past the check, to the missing data: this script's flags
  assert proc.returncode != 0 and _error(proc).endswith("or use --source tfds.")
  assert "config.data" not in _error(proc) and "Traceback" not in proc.stderr
  assert clf.read_bytes() == b"a classifier"
  proc = run("--overwrite", "--steps", "0")
  assert proc.returncode != 0 and "--steps and --batch_size must be >= 1" in proc.stderr
  # data.py's holdout check names train.py's field; here it is --holdout
  _write_mnist(tmp_path, *data.make_synthetic(50, seed=4), "train")
  _write_mnist(tmp_path, *data.make_synthetic(20, seed=5), "t10k")
  proc = run("--overwrite", "--data_dir", str(tmp_path), "--holdout", "50")
  assert proc.returncode != 0 and _error(proc).startswith("--holdout 50 must be in [0, 50)")
  assert clf.read_bytes() == b"a classifier"


def test_samples_of_some_classes_or_an_uneven_mix_are_flagged():
  even = np.repeat(np.arange(10), 5)
  assert metrics.class_balance_warning("a.npz", even) is None
  assert metrics.class_balance_warning("a.npz", None) is None  # unlabelled: nothing known
  assert metrics.class_balance_warning("a.npz", np.repeat(np.arange(10), [9] + [5] * 9)) is None
  w = metrics.class_balance_warning("a.npz", np.repeat([0, 1, 2, 3], 10))
  assert w.startswith("warning: a.npz has no samples of classes [4, 5, 6, 7, 8, 9]")
  assert "sample.py without --classes" in w
  w = metrics.class_balance_warning("a.npz", np.repeat(np.arange(10), [11] + [5] * 9))
  assert "has 5 to 11 samples per class" in w
  results = {"fd": 1.0, "fd_floor": 0.5, "num_samples": 40, "floor_source": "x",
             "warnings": [w]}
  assert metrics.format_results(results).splitlines()[-1] == w


def test_evaluation_of_some_classes_records_the_warning(trained, tmp_path):
  clf, _ = _grid(tmp_path, trained)
  images, labels = data.make_synthetic(200, seed=5)
  keep = labels < 4  # what sample.py --classes 0,1,2,3 writes
  np.savez(tmp_path / "some.npz", images=data.to_model_batch(images, labels)["jpg"][keep],
           labels=labels[keep])
  logs = []
  res = metrics.evaluate_sample_file(str(tmp_path / "some.npz"), str(clf), str(tmp_path),
                                     num_samples=40, log=logs.append)
  assert res["warnings"] == [w for w in logs if w.startswith("warning:")]
  assert "no samples of classes [4, 5, 6, 7, 8, 9]" in res["warnings"][0]
  res = metrics.evaluate_sample_file(str(tmp_path / "grid.npz"), str(clf), str(tmp_path),
                                     num_samples=40, log=logs.append)
  assert "warnings" not in res
  # fewer images than num_samples: scored at the n there is, and told (the
  # reference sets are picked by (seed, n), so FDs at another n do not pair)
  n = len(np.load(tmp_path / "grid.npz")["labels"])
  res = metrics.evaluate_sample_file(str(tmp_path / "grid.npz"), str(clf), str(tmp_path),
                                     num_samples=5000, log=logs.append, overwrite=True)
  assert res["num_samples"] == n and res["warnings"] == [
      f"warning: scoring n = {n:,} images, not the 5,000 asked for (num_samples): "
      f"{tmp_path / 'grid.npz'} has {n:,}; the test split has 400. FDs at other n "
      "are not comparable (nor paired by --compare)."]


# --- what a first stage costs: reconstructions of the floor's own images ------------

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  """A randomly initialised 28x28x1 KL autoencoder written as train_autoencoder.py
  writes one (its ddconfig in the header): (file, module, params). Tests copy
  the file into their own folder."""
  import jax
  import jax.numpy as jnp
  from scoreflow_jax import autoencoder_training as aet
  from scoreflow_jax.networks import autoencoder as ae
  module = ae.AutoencoderKL(embed_dim=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(), resolution=28, in_channels=1, out_ch=1)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
  ae.save_safetensors(ae.state_dict_from_params(params), str(path),
                      aet.metadata(module, {"steps": 0}))
  return path, module, params


def test_autoencoder_floor_reconstructs_exactly_the_floors_images(trained, tiny_vae,
                                                                  tmp_path, monkeypatch):
  from scoreflow_jax import autoencoder_training as aet
  from scoreflow_jax.eval import autoencoder_floor as af
  params, acc, test_images, test_labels, _ = trained  # 400 test images
  _write_mnist(tmp_path, test_images, test_labels, "t10k")
  train_images, train_labels = data.make_synthetic(300, seed=4)
  _write_mnist(tmp_path, train_images, train_labels, "train")
  clf = tmp_path / "clf.npz"
  classifier_lib.save_classifier(params, clf, test_accuracy=acc)
  vae = tmp_path / "vae.safetensors"
  shutil.copy(tiny_vae[0], vae)
  module, vae_params = tiny_vae[1:]
  score = lambda n, seeds, out, **kw: af.autoencoder_floor(
      str(vae), str(clf), str(tmp_path), num_samples=n, seeds=seeds,
      out=str(tmp_path / out), log=lambda _: None, **kw)

  # An untrained autoencoder's reconstructions, seed 1 of n = 150 (the floor's
  # images are 150 test images disjoint from the reference): the FD of the
  # reconstructions of exactly those images, computed here by hand.
  res = score(150, [1, 2], "random.json")
  ref_idx, floor_idx, where = metrics.reference_indices(1, 150, 400)
  assert where == "reference" and res["floor_source"] == "mnist test vs disjoint test"
  rec = aet.reconstruct(module, vae_params,
                        test_images[floor_idx].astype(np.float32) / 127.5 - 1.0)
  feats = lambda x: classifier_lib.extract_features(params, x)
  by_hand = metrics.frechet_distance(feats(rec), feats(test_images[ref_idx]))
  assert res["fd_runs"][0]["seed"] == 1
  assert res["fd_runs"][0]["fd"] == pytest.approx(by_hand, rel=1e-4)
  costs = [r["fd"] - r["fd_floor"] for r in res["fd_runs"]]
  assert res["fd_cost"] == pytest.approx(np.mean(costs))
  assert (res["fd_cost_min"], res["fd_cost_max"]) == pytest.approx((min(costs), max(costs)))
  assert res["classifier_test_accuracy"] == acc
  assert min(costs) > 10 * res["fd_floor"]  # noise from an untrained decoder
  assert res["autoencoder_training"] == {"steps": 0}
  assert res["autoencoder_sha256"] == af.file_sha256(str(vae))
  with open(tmp_path / "random.json") as f:
    assert json.load(f)["fd_cost"] == pytest.approx(res["fd_cost"])
  from PIL import Image
  assert Image.open(tmp_path / "random.png").size == (10 * 30, 10 * 30)  # 10 classes x 5 pairs

  # A perfect autoencoder costs exactly nothing, at n = 150 (floor from the
  # reference) and at n = 250 (floor from the train split): the images
  # reconstructed are the floor's own, in any order.
  monkeypatch.setattr(aet, "reconstruct",
                      lambda m, p, x, batch_size=500: x[::-1].copy())
  for n, source in ((150, "mnist test vs disjoint test"), (250, "mnist train vs test")):
    res = score(n, [0, 1], f"perfect{n}.json")
    assert res["floor_source"] == source and res["num_samples"] == n
    for r in res["fd_runs"]:
      assert r["fd"] == pytest.approx(r["fd_floor"], rel=1e-6)
    assert abs(res["fd_cost"]) < 1e-6 * res["fd_floor"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    score(150, [0], "random.json")
  (tmp_path / "random.json").unlink()
  with pytest.raises(FileExistsError, match=r"the picture .*random\.png exists"):
    score(150, [0], "random.json")


def test_evaluate_cli_autoencoder_floor_and_its_errors(trained, tiny_vae, tmp_path):
  params, acc, test_images, test_labels, _ = trained
  clf = _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels)
  vae = tmp_path / "vae.safetensors"
  shutil.copy(tiny_vae[0], vae)
  base = ["--autoencoder", vae, "--classifier", clf, "--data_dir", tmp_path]
  proc = _evaluate(*base, "--num_samples", 100)
  assert proc.returncode == 0, proc.stderr
  assert "the autoencoder's cost: FD - floor" in proc.stdout
  assert os.path.exists(tmp_path / "vae_floor.json")
  assert "exists; pass --overwrite" in _error(_evaluate(*base, "--num_samples", 100))
  proc = _evaluate(*base, "--samples", "x.npz")
  assert "--samples and --autoencoder are separate runs" in _error(proc)
  for extra in (["--reference", "validation"], ["--memorisation"]):
    assert f"--autoencoder does not use {extra[0]}: drop it" in _error(
        _evaluate(*base, *extra))
  from scoreflow_jax.networks import autoencoder as ae
  bare = tmp_path / "bare.safetensors"  # an sgm state dict: no ddconfig
  ae.save_safetensors(ae.load_state_dict(str(vae)), str(bare))
  proc = _evaluate("--autoencoder", bare, "--classifier", clf, "--data_dir", tmp_path)
  assert "has no ddconfig in its header" in _error(proc)
  proc = _evaluate(*base[:-1], tmp_path / "missing", "--out", tmp_path / "m.json")
  assert "missing does not exist" in _error(proc)


def test_evaluate_cli_compare_guards_named_inputs_and_repeated_names(tmp_path):
  for name in ("a", "b"):
    with open(tmp_path / f"{name}.json", "w") as f:
      json.dump(_combined({(0, 0): 20.0}), f)
  kept = (tmp_path / "a.json").read_text()
  # NAME=FILE: the file is still an input, not replaced even with --overwrite
  proc = _evaluate("--compare", f"base={tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                   "--out", tmp_path / "a.json", "--overwrite")
  assert proc.returncode != 0 and "is one of the inputs" in _error(proc)
  assert (tmp_path / "a.json").read_text() == kept
  # two files of one stem would be one model, the other silently dropped
  (tmp_path / "sub").mkdir()
  shutil.copy(tmp_path / "b.json", tmp_path / "sub" / "a.json")
  proc = _evaluate("--compare", f"{tmp_path / 'a.json'},{tmp_path / 'sub' / 'a.json'}")
  assert proc.returncode != 0 and "'a' given twice" in _error(proc)


def test_evaluate_cli_scores_against_the_validation_images(trained, tmp_path):
  params, acc, test_images, test_labels, _ = trained
  clf = _mnist_folder_and_classifier(tmp_path, params, acc, test_images, test_labels)
  samples, labels = data.make_synthetic(100, seed=5)
  np.savez(tmp_path / "ho.npz", images=samples, labels=labels, holdout=60, step=7)
  proc = _evaluate("--samples", tmp_path / "ho.npz", "--classifier", clf, "--data_dir",
                   tmp_path, "--num_samples", 20, "--reference", "validation")
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads((tmp_path / "ho_eval.json").read_text())
  assert (res["reference"], res["holdout"]) == ("validation", 60)


def test_train_and_save_trains_with_the_given_batch_size_and_seed(tmp_path, monkeypatch):
  # train_classifier.py's --batch_size and --seed reach the training that the
  # header says they shaped (they were recorded while the defaults trained).
  _write_mnist(tmp_path, *data.make_synthetic(30, seed=1), "t10k")
  _write_mnist(tmp_path, *data.make_synthetic(60, seed=4), "train")
  calls, train = [], classifier_lib.train_classifier
  def spy(*args, **kwargs):
    calls.append(kwargs)
    return train(*args, **kwargs)
  monkeypatch.setattr(classifier_lib, "train_classifier", spy)
  out = str(tmp_path / "clf.npz")
  classifier_lib.train_and_save(str(tmp_path), out, steps=1, batch_size=8, seed=3,
                                log=lambda _: None)
  assert (calls[0]["batch_size"], calls[0]["seed"], calls[0]["steps"]) == (8, 3, 1)
  header = classifier_lib.load_classifier(out)[1]
  assert (header["batch_size"], header["seed"], header["steps"]) == (8, 3, 1)


def test_train_classifier_script_passes_its_seed_on(tmp_path):
  _write_mnist(tmp_path, *data.make_synthetic(30, seed=1), "t10k")
  _write_mnist(tmp_path, *data.make_synthetic(40, seed=4), "train")
  out = tmp_path / "clf.npz"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train_classifier.py"), "--data_dir",
       str(tmp_path), "--out", str(out), "--steps", "1", "--batch_size", "8",
       "--seed", "7"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  header = classifier_lib.load_classifier(out)[1]
  assert (header["seed"], header["batch_size"], header["steps"]) == (7, 8, 1)


def test_a_failed_classifier_save_keeps_the_file_that_was_there(trained, tmp_path,
                                                                monkeypatch):
  params = trained[0]
  path = tmp_path / "clf.npz"
  classifier_lib.save_classifier(params, path, test_accuracy=0.5)
  kept = path.read_bytes()
  def failing_savez(f, **arrays):
    f.write(b"half a file")
    raise OSError("disk full")
  monkeypatch.setattr(classifier_lib.np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    classifier_lib.save_classifier(params, path, test_accuracy=0.9)
  assert path.read_bytes() == kept
  assert os.listdir(tmp_path) == ["clf.npz"]  # no partial file left beside it


def test_load_refuses_other_formats_versions_and_shapes(trained, tmp_path):
  params = trained[0]
  path = tmp_path / "clf.npz"
  def write(header, p=params):
    flat = {f"params/{k}": v for k, v in
            classifier_lib.traverse_util.flatten_dict(p, sep="/").items()}
    np.savez(path, header=np.array(json.dumps(header)), **flat)
  good = {"format": classifier_lib.FORMAT, "arch_version": classifier_lib.ARCH_VERSION}
  write(dict(good, format="something else"))
  with pytest.raises(ValueError, match="lacks format 'scoreflow-jax classifier'"):
    classifier_lib.load_classifier(path)
  write(dict(good, arch_version=classifier_lib.ARCH_VERSION + 1))
  with pytest.raises(ValueError, match="architecture version 2, this code reads version 1"):
    classifier_lib.load_classifier(path)
  bad = {k: dict(v) for k, v in params.items()}
  bad["conv1"]["bias"] = np.zeros(3, np.float32)  # not conv1's width
  write(good, bad)
  with pytest.raises(ValueError, match=r"conv1/bias has shape \(3,\), expected"):
    classifier_lib.load_classifier(path)
  write(good)
  classifier_lib.load_classifier(path)  # the same file with its own header loads


def test_classifier_refuses_images_of_other_channels_and_pads_the_last_batch(trained):
  params, _, test_images, _, _ = trained
  with pytest.raises(ValueError, match=r"images of shape \(28, 28, 3\) do not fit"):
    classifier_lib.predict_logits(params, np.zeros((2, 28, 28, 3), np.uint8))
  whole = classifier_lib.predict_logits(params, test_images[:50])
  batched = classifier_lib.predict_logits(params, test_images[:50], batch_size=16)
  assert batched.shape == whole.shape  # 16 + 16 + 16 + 2, padded to 16
  np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)


def test_linear_floor_weights_classes_by_their_frequency():
  # Training draws classes as often as the data hold them: the class-known
  # floor is the frequency-weighted mean of the per-class floors.
  from scoreflow_jax.eval import linear_floor
  rng = np.random.default_rng(3)
  labels = np.repeat([0, 1], [900, 100])
  x = rng.normal(size=(1000, 4)) * np.where(labels[:, None] == 0, 0.1, 1.0)
  out = linear_floor.linear_floor(x, labels, num_sigmas=500, seed=1)
  sigma = np.exp(-1.2 + 1.2 * np.random.default_rng(1).standard_normal(500))
  per_class = [linear_floor.linear_denoiser_loss(
      linear_floor.covariance_eigenvalues(x[labels == c]), sigma, 0.5) for c in (0, 1)]
  np.testing.assert_allclose(out["class_conditional"]["all"],
                             np.mean(0.9 * per_class[0] + 0.1 * per_class[1]), rtol=1e-10)


def test_linear_floor_cli_uses_its_ucg_rate(tmp_path, capsys):
  from scoreflow_jax.eval import linear_floor
  _write_mnist(tmp_path, *data.make_synthetic(100, seed=1), "train")
  out = linear_floor.main(["--data_dir", str(tmp_path), "--ucg_rate", "0.6"])
  for k, mixed in out["training_mix"].items():
    c, u = out["class_conditional"][k], out["unconditional"][k]
    np.testing.assert_allclose(mixed, 0.4 * c + 0.6 * u, rtol=1e-10)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_autoencoder_floor_never_writes_over_its_inputs(tmp_path):
  # --out naming the autoencoder's weights or the classifier (with --overwrite)
  # would replace them with the results JSON; refused before any work.
  from scoreflow_jax.eval import autoencoder_floor as af
  vae, clf = tmp_path / "vae.safetensors", tmp_path / "clf.npz"
  vae.write_bytes(b"weights")
  clf.write_bytes(b"classifier")
  for out in (vae, clf):
    with pytest.raises(ValueError, match="is one of the inputs"):
      af.autoencoder_floor(str(vae), str(clf), str(tmp_path / "none"), out=str(out),
                           overwrite=True, log=lambda _: None)
  assert vae.read_bytes() == b"weights" and clf.read_bytes() == b"classifier"
  assert sorted(os.listdir(tmp_path)) == ["clf.npz", "vae.safetensors"]




def test_train_classifier_reports_the_test_sets_accuracy():
  # The accuracy returned (and stored in the file's header) is the test set's,
  # not the training set's: test labels that are all wrong score near 0.
  images, labels = data.make_synthetic(600, seed=0)
  test_images, test_labels = data.make_synthetic(100, seed=1)
  wrong = (test_labels + 1) % 10
  params, acc = classifier_lib.train_classifier(
      images, labels, test_images, wrong, steps=40, seed=0, log=lambda _: None,
      max_shift=2, learning_rate=3e-3, **TINY)
  assert acc == classifier_lib.accuracy(params, test_images, wrong) < 0.2
  assert classifier_lib.accuracy(params, test_images, test_labels) > 0.8


def test_train_classifier_goes_through_every_image_each_epoch(monkeypatch):
  # Batches walk through a permutation, a fresh one each epoch: 8 steps of 8
  # over 32 images see each image exactly twice (not one batch over and over).
  images, labels = data.make_synthetic(32, seed=0)
  seen, default_rng = [], np.random.default_rng
  class Recording:  # a Generator that records the permutations it draws
    def __init__(self, seed):
      self.rng = default_rng(seed)
    def permutation(self, n):
      perm = self.rng.permutation(n)
      seen.append(perm)
      return perm
    def __getattr__(self, name):
      return getattr(self.rng, name)
  monkeypatch.setattr(classifier_lib.np.random, "default_rng", Recording)
  classifier_lib.train_classifier(images, labels, steps=8, seed=0, log=lambda _: None,
                                  **dict(TINY, batch_size=8))
  assert len(seen) == 2
