"""What a first stage costs: FD of an autoencoder's reconstructions of real images.

A model diffusing in an autoencoder's latents cannot score better than the
autoencoder's own reconstructions of real images. ``autoencoder_floor``
scores those reconstructions as ``evaluate.py`` scores samples, and pairs them
with the real-vs-real floor exactly: it reconstructs the very images the floor
compares with the reference (``metrics.reference_indices``), so that ``fd`` -
``fd_floor`` (``fd_cost``) is what the autoencoder alone adds, with nothing
else drawn differently.

At n = 10k against MNIST's test set the floor's images are training images
(the test set holds only 10k), which the autoencoder was trained on, as a
latent model's are; at n <= 5k they are test images disjoint from the
reference, which it has not seen.
"""
import os

import numpy as np

from scoreflow_jax.eval import classifier as classifier_lib
from scoreflow_jax.eval import metrics
from scoreflow_jax.outputs import (check_not_an_input, check_output, file_sha256,
                                   results_path, write_json)


def autoencoder_floor(autoencoder_path, classifier_path, data_dir, source="offline",
                      num_samples=10_000, seeds=(0,), out=None, overwrite=False,
                      log=print):
  """Scores reconstructions (decoded posterior means) of the floor's real images.

  Writes and returns the results of ``metrics.evaluate_samples`` for the
  reconstructions (combined over ``seeds``, one reference set each), with
  ``fd_cost`` (the mean of fd - fd_floor; ``fd_cost_min`` / ``fd_cost_max``
  over the seeds), the autoencoder's path, sha256 and training record. ``out``
  defaults to ``<autoencoder>_floor.json``; beside it, a .png of the first
  seed's real images and their reconstructions, five of each class. Existing
  files are replaced only with ``overwrite``.
  """
  from scoreflow_jax import autoencoder_training as aet  # pylint: disable=g-import-not-at-top
  from scoreflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in np.atleast_1d(seeds)]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"need distinct seeds, got {seeds}.")
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 (an FD needs two samples), got"
                     f" {num_samples}.")
  check_not_an_input(out, [autoencoder_path, classifier_path])
  out = results_path(out, os.path.splitext(autoencoder_path)[0] + "_floor.json",
                     overwrite)
  png = check_output(os.path.splitext(out)[0] + ".png", overwrite, "the picture")
  module, ae_params, trained = aet.load_trained(autoencoder_path)
  params, header = classifier_lib.load_classifier(classifier_path)
  load = lambda split: data_lib.load_split("mnist", split, source, data_dir)
  ref_images, ref_labels = load("test")
  module.latent_shape(ref_images.shape[1:])  # raises on images it cannot take
  classifier_lib.check_input_shape(params, ref_images.shape[1:])
  n = min(num_samples, len(ref_images))
  floor_images = floor_labels = None
  if len(ref_images) < 2 * n:
    floor_images, floor_labels = load("train")
  cache = metrics.ClassifierCache(params)
  evaluations = []
  for seed in seeds:
    _, floor_idx, where = metrics.reference_indices(
        seed, n, len(ref_images), None if floor_images is None else len(floor_images))
    real, labels = ((ref_images, ref_labels) if where == "reference"
                    else (floor_images, floor_labels))
    real, labels = real[floor_idx], labels[floor_idx]
    log(f"seed {seed}: reconstructing the floor's {n:,} real images")
    rec = aet.reconstruct(module, ae_params, data_lib.to_model_images(real))
    if seed == seeds[0]:
      _save_pairs(png, real, rec, labels)
    res = metrics.evaluate_samples(params, rec, labels, ref_images, ref_labels, n,
                                   floor_images, seed, cache)
    evaluations.append(dict(res, draw=0, seed=seed, fd_cost=res["fd"] - res["fd_floor"]))
  results = (metrics.combine_evaluations(evaluations) if len(evaluations) > 1
             else dict(evaluations[0]))
  costs = [e["fd_cost"] for e in evaluations]
  other = "test" if results["floor_source"] == "reference" else "train"
  results.update(
      fd_cost=float(np.mean(costs)), fd_cost_min=float(np.min(costs)),
      fd_cost_max=float(np.max(costs)),
      floor_source=f"mnist {other} vs {'disjoint ' * (other == 'test')}test",
      reference="test", holdout=0, seed=seeds[0] if len(seeds) == 1 else seeds,
      samples=f"reconstructions by {os.path.abspath(autoencoder_path)} of the "
              "floor's real images",
      autoencoder=os.path.abspath(autoencoder_path),
      autoencoder_sha256=file_sha256(autoencoder_path),  # as a run's config records it
      autoencoder_training=trained,
      classifier=os.path.abspath(classifier_path),
      classifier_sha256=classifier_lib.file_sha256(classifier_path),
      classifier_test_accuracy=header.get("test_accuracy"))
  results.pop("draw", None)
  log(metrics.format_results(results))
  log(f"the autoencoder's cost: FD - floor {results['fd_cost']:.3f}"
      + (f" (range {results['fd_cost_min']:.3f} - {results['fd_cost_max']:.3f} over"
         f" {len(seeds)} reference sets)" if len(seeds) > 1 else "")
      + f", reconstructing the floor's own {other} images")
  write_json(out, results)
  log(f"wrote {out} and {png} (per class, real images and their reconstructions)")
  return results


def _save_pairs(path, real, rec, labels, per_class=5):
  """A row per class: ``per_class`` (real, reconstruction) pairs side by side."""
  from scoreflow_jax.data import to_model_images  # pylint: disable=g-import-not-at-top
  from scoreflow_jax.generate import image_grid, save_png  # pylint: disable=g-import-not-at-top
  classes = sorted(set(int(c) for c in labels))
  rows = []
  for c in classes:
    idx = np.flatnonzero(labels == c)[:per_class]
    pairs = np.stack([to_model_images(real[idx]), rec[idx]], axis=1)
    blank = np.full((per_class - len(idx), 2) + pairs.shape[2:], -1.0, np.float32)
    rows.append(np.concatenate([pairs, blank]).reshape((-1,) + pairs.shape[2:]))
  save_png(image_grid(np.concatenate(rows), rows=len(classes)), path)
