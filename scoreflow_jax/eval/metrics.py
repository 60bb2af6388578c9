"""Sample quality: Frechet distance in classifier features and class accuracy.

FD is biased upward at small sample counts, so every FD is printed with its
floor: the FD between two disjoint sets of real images of the same size.
"""
import os
import warnings

import numpy as np
import scipy.linalg

# The classifier (JAX) is imported by the functions that run it: comparing
# results files (evaluate.py --compare) needs no JAX.
from scoreflow_jax.outputs import check_not_an_input, results_path, write_json

SAMPLES_HINT = ("Make one with: python sample.py --workdir RUN"
                " --num_per_class 1000 --out grid.png (writes grid.npz).")


def frechet_distance(feats_a, feats_b):
  """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of ``(N, D)`` features.

  In float64 with unbiased covariances. ``sqrtm`` is retried with 1e-6 added
  to the diagonals when it is not finite or has a large imaginary part (as
  pytorch-fid does for near-singular covariances); the real part is used.
  """
  a = np.asarray(feats_a, np.float64)
  b = np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"features must be (N, D) with the same D, got {a.shape}"
                     f" and {b.shape}.")
  if min(a.shape[0], b.shape[0]) < 2:
    raise ValueError(f"need >= 2 feature vectors per set, got {a.shape[0]} and"
                     f" {b.shape[0]}.")
  diff = a.mean(0) - b.mean(0)
  # Features constant in both sets (dead ReLUs) add nothing to the trace
  # term; dropping them keeps the covariances from being singular for that.
  live = np.ptp(a, 0) + np.ptp(b, 0) > 0
  if not live.any():
    return float(diff @ diff)
  cov_a = np.atleast_2d(np.cov(a[:, live], rowvar=False))
  cov_b = np.atleast_2d(np.cov(b[:, live], rowvar=False))
  covmean = _sqrtm_product(cov_a, cov_b)
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b)
               - 2.0 * np.trace(covmean))


def _sqrtm_product(cov_a, cov_b):
  """Real part of sqrtm(cov_a @ cov_b), regularized if needed."""

  def ok(m):
    scale = max(1.0, float(np.abs(m.real).max()))
    return np.isfinite(m).all() and float(np.abs(np.imag(m)).max()) < 1e-3 * scale

  # A feature dead in one set only makes the product singular; sqrtm then
  # warns, but its trace still matches the eigenvalue formula closely.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not ok(covmean):
      eps = 1e-6 * np.eye(cov_a.shape[0])
      covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
  if not ok(covmean):
    raise ValueError("sqrtm(S_a S_b) is not finite or not real even with"
                     " 1e-6 added to the diagonals; are the features finite?")
  return np.real(covmean)


def class_accuracy(logits_or_preds, labels, num_classes=10):
  """Returns ``(accuracy, per_class)``: the fraction correct over all items
  and a float64 ``(num_classes,)`` array per true class (NaN for a class with
  no items). Takes logits ``(N, K)`` (argmax) or predicted labels ``(N,)``."""
  preds = np.asarray(logits_or_preds)
  if preds.ndim == 2:
    preds = preds.argmax(-1)
  labels = np.asarray(labels)
  if preds.shape != labels.shape or labels.ndim != 1 or not labels.size:
    raise ValueError(f"need N > 0 predictions and N labels, got shapes"
                     f" {np.shape(logits_or_preds)} and {labels.shape}.")
  correct = preds == labels
  per_class = np.full(num_classes, np.nan)
  for k in range(num_classes):
    if np.any(labels == k):
      per_class[k] = correct[labels == k].mean()
  return float(correct.mean()), per_class


class ClassifierCache:
  """The classifier's features and logits of image rows, each row computed once.

  ``evaluate_sample_file`` scores every samples file against every seed's
  reference set: the reference and floor sets of all seeds are rows of the
  same test (or train) split and each file is read under every seed, so
  without the cache most rows would pass through the classifier once per
  (file, seed). Arrays are keyed by identity (the cache keeps a reference to
  each, so an id cannot be reused while it lives): pass the same array
  object each time.
  """

  _FNS = {"features": "extract_features", "logits": "predict_logits"}

  def __init__(self, classifier_params):
    self.params = classifier_params
    self._entries = {}  # (kind, id(images)) -> [images, values, done]
    self.rows_computed = 0

  def get(self, kind, images, idx):
    """``kind`` ("features" or "logits") of ``images[idx]``."""
    entry = self._entries.setdefault(
        (kind, id(images)), [images, None, np.zeros(len(images), bool)])
    _, values, done = entry
    idx = np.asarray(idx)
    todo = np.unique(idx[~done[idx]])
    if todo.size:
      from scoreflow_jax.eval import classifier as classifier_lib
      new = getattr(classifier_lib, self._FNS[kind])(self.params, images[todo])
      if values is None:
        values = entry[1] = np.empty((len(images),) + new.shape[1:], new.dtype)
      values[todo] = new
      done[todo] = True
      self.rows_computed += todo.size
    return values[idx]


def reference_indices(seed, n, num_ref, num_floor_images=None):
  """Which real images ``evaluate_samples`` compares: ``(ref_idx, floor_idx,
  floor_source)``, n indices into the reference and n of the floor's second
  real set, the reference itself (``floor_source`` "reference") when it has
  >= 2n images, else ``floor_images`` ("floor_images", ``num_floor_images`` of
  them).

  They depend on (seed, n) only, not on the samples file's size, so that files
  of other sizes scored at the same n pair. The generator skips a permutation
  of n first: for a file of n images, the draws of every earlier version
  (which drew the reference after the file's own permutation).
  """
  rng = np.random.default_rng(seed)
  rng.permutation(n)
  ref_perm = rng.permutation(num_ref)
  if num_ref >= 2 * n:
    return ref_perm[:n], ref_perm[n:2 * n], "reference"
  if num_floor_images is not None and num_floor_images >= n:
    return ref_perm[:n], rng.permutation(num_floor_images)[:n], "floor_images"
  raise ValueError(
      f"the floor needs a second set of {n} real images: the reference has"
      f" {num_ref} < 2n = {2 * n} and floor_images has {num_floor_images or 0}."
      " Pass floor_images (e.g. the train split) or a smaller n.")


def roughness(images, batch_size=1000):
  """Mean |discrete Laplacian| per interior pixel (4 x - its 4 neighbours), in
  [-1, 1] pixel units, over ``images`` (N, H, W, C), uint8 or [-1, 1]: how much
  fine grain a set of images has. 0 for flat images, 8 inside a +-1
  checkerboard; MNIST's test images score 0.40 (docs/results.md: the
  samples of two models on one base differed in FD by 13 and in this by 7%)."""
  from scoreflow_jax.eval import classifier as classifier_lib
  images = np.asarray(images)
  if images.ndim != 4 or min(images.shape[1:3]) < 3 or not len(images):
    raise ValueError(f"roughness needs (N, H, W, C) images with N > 0 and H, W >= 3, "
                     f"got {images.shape}")
  total = 0.0
  for i in range(0, len(images), batch_size):
    x = classifier_lib.to_inputs(images[i:i + batch_size]).astype(np.float64)
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
           - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    total += np.abs(lap).sum()
  n, h, w, c = images.shape
  return float(total / (n * (h - 2) * (w - 2) * c))


def evaluate_samples(classifier_params, sample_images, sample_labels,
                     ref_images, ref_labels=None, n=10_000, floor_images=None,
                     seed=0, cache=None):
  """FD of samples to real images, its real-vs-real floor, class accuracy.

  Images are uint8 or [-1, 1] ``(N, H, W, C)``. With ``n`` capped at the
  number of samples and of reference images, ``n`` random samples are
  compared with ``n`` random reference images R (``fd``), and a disjoint set
  of ``n`` real images is compared with the same R (``fd_floor``). That set
  comes from the reference itself when it has >= 2n images, else from
  ``floor_images`` (e.g. MNIST train when the reference is its 10k test set
  and n = 10k); ``floor_source`` says which. Class accuracy is over the same
  ``n`` samples (None without ``sample_labels``); ``reference_class_accuracy``
  is the classifier's accuracy on R (with ``ref_labels``), its ceiling.
  ``cache``, a ``ClassifierCache`` of these params, reuses the classifier's
  outputs across calls on the same arrays (several seeds, several files).
  ``roughness`` / ``reference_roughness``: :func:`roughness` of the ``n``
  samples and of R (grain that FD's features see and a loss may not).
  ``feature_spread``: :func:`feature_spread` of the samples against R (1: as
  spread out in the classifier's features as real images, below: less
  diverse); ``floor_feature_spread`` the same for the floor's real images,
  what 1 looks like at this n.
  """
  from scoreflow_jax.eval import classifier as classifier_lib
  if cache is None:
    cache = ClassifierCache(classifier_params)
  elif cache.params is not classifier_params:
    raise ValueError("cache holds another classifier's outputs: make it with"
                     " ClassifierCache(classifier_params).")
  sample_images, ref_images = np.asarray(sample_images), np.asarray(ref_images)
  num_samples, num_ref = len(sample_images), len(ref_images)
  n = min(n, num_samples, num_ref)
  if n < 2:
    raise ValueError(f"need >= 2 samples and reference images, got"
                     f" {num_samples} and {num_ref}.")
  classifier_lib.check_input_shape(classifier_params, sample_images.shape[1:])
  classifier_lib.check_input_shape(classifier_params, ref_images.shape[1:])
  pick = np.random.default_rng(seed).permutation(num_samples)[:n]
  ref_idx, floor_idx, floor_source = reference_indices(
      seed, n, num_ref, None if floor_images is None else len(floor_images))
  floor_set = ref_images if floor_source == "reference" else np.asarray(floor_images)
  ref_feats = cache.get("features", ref_images, ref_idx)
  sample_feats = cache.get("features", sample_images, pick)
  floor_feats = cache.get("features", floor_set, floor_idx)
  results = {
      "fd": frechet_distance(sample_feats, ref_feats),
      "fd_floor": frechet_distance(floor_feats, ref_feats),
      "feature_spread": feature_spread(sample_feats, ref_feats),
      "floor_feature_spread": feature_spread(floor_feats, ref_feats),
      "floor_source": floor_source,
      "num_samples": int(n),
      "class_accuracy": None,
      "per_class_accuracy": None,
      "roughness": roughness(sample_images[pick]),
      "reference_roughness": roughness(ref_images[ref_idx]),
  }
  num_classes = classifier_lib.classifier_from_params(
      classifier_params).num_classes
  if sample_labels is not None:
    logits = cache.get("logits", sample_images, pick)
    acc, per_class = class_accuracy(
        logits, np.asarray(sample_labels)[pick], num_classes)
    results["class_accuracy"] = acc
    results["per_class_accuracy"] = [_nan_to_none(x) for x in per_class]
  if ref_labels is not None:
    logits = cache.get("logits", ref_images, ref_idx)
    results["reference_class_accuracy"] = class_accuracy(
        logits, np.asarray(ref_labels)[ref_idx], num_classes)[0]
  return results


def feature_spread(feats, ref_feats):
  """tr Cov(feats) / tr Cov(ref_feats): how spread out a set of features is
  against a reference set's (1: as much, 0: one point). FD mixes a lack of
  diversity with the distance of the means; this ratio is the first alone
  (e.g. whether a lower sampling temperature narrowed the samples)."""
  feats, ref_feats = np.asarray(feats, np.float64), np.asarray(ref_feats, np.float64)
  if len(feats) < 2 or len(ref_feats) < 2:
    raise ValueError("feature_spread needs >= 2 feature rows in each set")
  total = lambda f: float(np.sum(np.var(f, axis=0, ddof=1)))
  ref = total(ref_feats)
  if ref == 0:
    raise ValueError("feature_spread: the reference features are all equal")
  return total(feats) / ref


def _nan_to_none(x):
  return None if np.isnan(x) else float(x)


def load_samples(path):
  """Returns ``(images, labels or None)`` from a sample.py .npz."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"samples file {path} not found. {SAMPLES_HINT}")
  try:
    with np.load(path, allow_pickle=False) as f:
      images = f["images"]
      labels = f["labels"] if "labels" in f.files else None
  except Exception as e:  # pylint: disable=broad-except
    beside = os.path.splitext(path)[0] + ".npz"
    hint = (f"sample.py wrote the samples beside the picture: pass {beside}"
            if path.endswith(".png") and os.path.isfile(beside) else SAMPLES_HINT)
    raise ValueError(f"{path} is not a samples .npz with an 'images' array"
                     f" ({e!r}). {hint}") from e
  if images.ndim != 4 or not len(images):
    raise ValueError(f"{path}: 'images' must be (N, H, W, C) with N > 0, got"
                     f" {images.shape}.")
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
    _check_minus1_1(images, path)
  if labels is not None and labels.shape != (len(images),):
    raise ValueError(f"{path}: 'labels' must have shape ({len(images)},), got"
                     f" {labels.shape}.")
  if labels is not None and (labels.dtype.kind not in "iu" or labels.min() < 0):
    raise ValueError(f"{path}: 'labels' must be class indices >= 0 (integers), got"
                     f" {labels.dtype} from {labels.min()} to {labels.max()}.")
  return images, labels


def _check_minus1_1(images, path):
  """Raises unless float ``images`` are in [-1, 1] like sample.py's samples.

  Images in another range would be scored as [-1, 1] ones without a sign:
  real MNIST / 255 (in [0, 1]) scores an FD of about 444 instead of 14. MNIST
  backgrounds are -1 in sample.py's samples (clipped to [-1, 1]), so a file
  with no negative pixel at all is taken to be [0, 1] images.
  """
  if not np.isfinite(images).all():
    raise ValueError(f"{path}: 'images' has {int(np.sum(~np.isfinite(images)))}"
                     " NaN or infinite pixels (did the model diverge?).")
  lo, hi = float(images.min()), float(images.max())
  if lo < -1.001 or hi > 1.001:
    guess = (" They look like [0, 255] pixels: save them as uint8, or map them"
             " with x / 127.5 - 1." if lo >= 0 and hi <= 255 else
             " Map them to [-1, 1] (sample.py clips its samples to it).")
    raise ValueError(f"{path}: float 'images' must be in [-1, 1], got [{lo:g},"
                     f" {hi:g}].{guess}")
  if lo >= 0:
    raise ValueError(
        f"{path}: float 'images' are in [{lo:g}, {hi:g}], with no negative pixel:"
        " they look like [0, 1] images, which would be scored as [-1, 1] ones"
        " (MNIST's black background, -1 in sample.py's samples, as mid-grey)."
        " Map them with x * 2 - 1 (or save uint8 pixels 0..255).")


def combine_evaluations(evaluations):
  """One result from several ``evaluate_samples`` results of one model (other
  sample draws, other reference sets): FD, floor and class accuracies are
  means, and ``fd_runs`` / ``fd_sd`` / ``fd_min`` / ``fd_max`` keep the spread.

  A single 2k FD moves by about 2 between draws (docs/results.md, session 9),
  so compare models by these means. The evaluations share samples or
  reference images, so ``fd_sd`` is a spread, not a standard error. Each item
  of ``evaluations`` may carry ``draw`` and ``seed``; ``fd_runs`` keeps them.
  """
  if not evaluations:
    raise ValueError("need at least one evaluation to combine.")
  if len({e["num_samples"] for e in evaluations}) != 1:
    raise ValueError("evaluations to combine must have the same num_samples, got"
                     f" {[e['num_samples'] for e in evaluations]}.")
  fds = np.array([e["fd"] for e in evaluations])
  out = dict(evaluations[0])
  out.update(
      fd=float(fds.mean()),
      fd_floor=float(np.mean([e["fd_floor"] for e in evaluations])),
      fd_sd=float(fds.std(ddof=1)) if len(fds) > 1 else 0.0,
      fd_min=float(fds.min()), fd_max=float(fds.max()),
      num_evaluations=len(evaluations),
      fd_runs=[{k: e[k] for k in ("draw", "seed", "fd", "fd_floor",
                                  "class_accuracy") if k in e}
               for e in evaluations])
  for key in ("class_accuracy", "reference_class_accuracy", "roughness",
              "reference_roughness", "feature_spread", "floor_feature_spread"):
    values = [e.get(key) for e in evaluations]
    if all(v is not None for v in values):
      out[key] = float(np.mean(values))
  per_class = [e.get("per_class_accuracy") for e in evaluations]
  if all(p is not None for p in per_class):
    per_class = np.array([[np.nan if a is None else a for a in p] for p in per_class])
    with warnings.catch_warnings():  # a class absent from every draw stays None
      warnings.simplefilter("ignore", RuntimeWarning)
      out["per_class_accuracy"] = [_nan_to_none(x) for x in np.nanmean(per_class, 0)]
  return out


def _runs(results, key="fd"):
  """{(draw, seed): results' ``key`` ("fd" or "fd_floor")} of one results dict,
  combined or single; evaluations that do not hold ``key`` are left out."""
  runs = results.get("fd_runs")
  if runs is None:  # one file against one reference set
    seed = results.get("seed", 0)
    runs = [{"draw": 0, "seed": seed[0] if isinstance(seed, list) else seed,
             "fd": results["fd"], "fd_floor": results.get("fd_floor")}]
  return {(r.get("draw", 0), r.get("seed", 0)): r[key] for r in runs
          if r.get(key) is not None}


def _classifier_name(name, results):
  return (f"{name} ({results.get('classifier', 'classifier not recorded')},"
          f" sha256 {results.get('classifier_sha256') or 'not recorded'})")


def _check_same_classifier(named_results, log):
  """Raises ValueError unless every model's FDs can be paired with the first's.

  Results record the sha256 of the classifier file's bytes
  (``classifier_sha256``); those that record it must agree. Then, at every
  (file, seed) evaluation two models both hold, their real-vs-real floors must
  be equal: the same classifier scoring the same real images gives the same
  floor, while another classifier (an older results file records none), or a
  samples file of another size (for one seed it draws other reference
  images), gives another. Where a results file records no classifier and
  shares no evaluation with the first, nothing shows which classifier it was:
  it is compared with a printed warning (returned too, by name).
  """
  names = list(named_results)
  shas = {n: r.get("classifier_sha256") for n, r in named_results.items()}
  known = [n for n in names if shas[n]]
  if len({shas[n] for n in known}) > 1:
    raise ValueError(
        "FDs in different classifiers' features do not compare: "
        + "; ".join(_classifier_name(n, named_results[n]) for n in known)
        + ". Score every model with the same --classifier.")
  warnings_by_name = {}
  base = names[0]
  for name in names[1:]:
    floors, base_floors = (_runs(named_results[n], "fd_floor") for n in (name, base))
    keys = sorted(set(floors) & set(base_floors))
    if not keys:
      if not (shas[name] and shas[base]):
        warnings_by_name[name] = (
            f"warning: {name} or {base} does not record its classifier, and they share"
            " no (file, seed) evaluation whose real-vs-real floors would show it is"
            " the same one; compared as if it were (score both again with"
            " evaluate.py to record it).")
        log(warnings_by_name[name])
      continue
    differ = [k for k in keys if not np.isclose(floors[k], base_floors[k], rtol=1e-3)]
    if differ:
      shown = ", ".join(f"(file {d}, seed {s}) {floors[d, s]:.3f} vs {base_floors[d, s]:.3f}"
                        for d, s in differ[:3])
      raise ValueError(
          f"{name}'s and {base}'s FDs at the same (file, seed) were not scored against"
          f" the same real images in the same features: their real-vs-real floors"
          f" differ: {shown}. Either the classifiers differ"
          f" ({_classifier_name(name, named_results[name])} vs"
          f" {_classifier_name(base, named_results[base])}), or (results from"
          " before session 23) the samples files held different numbers of images,"
          " or (before session 25) a run that held out data.holdout images was"
          " scored at over 5,000 samples (its floor drew on its own training"
          " images). Score every model with the same --classifier (evaluate.py records its"
          " sha256).")
  return warnings_by_name


def compare_evaluations(named_results, log=print):
  """Models' FDs side by side, each paired with the first model's.

  ``named_results`` maps a name to the results of ``evaluate_sample_file``
  (one model each; the first is the baseline). Their FDs must be at the same
  sample count, against the same reference and in one classifier's features
  (``_check_same_classifier``: the recorded sha256s, or for older results
  files the floors; ``log`` prints a warning where neither can tell). Pairs
  are the (sample file position, reference seed) evaluations both hold: the
  same reference images when the files are of the same size, and the same
  sample seed when both models' draws were listed in the same seed order
  (sample.py --seed 0 first, then 1, ...). Returns one row per model with its
  mean FD and spread, its classifier's sha256 and, from the second model on,
  ``paired``: the mean, min and max of (its FD - the baseline's) over the
  pairs and in how many it is lower. A paired difference whose range excludes
  0 is worth more than a difference of means within a draw's noise (about 2
  at 2k).
  """
  if len(named_results) < 2:
    raise ValueError("compare at least two evaluations.")
  refs = {name: r.get("reference", "test") for name, r in named_results.items()}
  if len(set(refs.values())) != 1:
    raise ValueError(f"FDs against different reference images do not compare: {refs}."
                     " Evaluate every model with the same --reference.")
  if next(iter(refs.values())) == "validation":
    holdouts = {name: r.get("holdout") for name, r in named_results.items()}
    if len(set(holdouts.values())) != 1:
      raise ValueError(f"FDs against the validation images of runs with different "
                       f"data.holdout do not compare: {holdouts} (other images were "
                       "held out). Compare them against --reference test.")
  counts = {name: r["num_samples"] for name, r in named_results.items()}
  if len(set(counts.values())) != 1:
    raise ValueError(f"FDs at different sample counts do not compare: {counts}."
                     " Evaluate every model with the same --num_samples.")
  unchecked = _check_same_classifier(named_results, log)
  names = list(named_results)
  base = _runs(named_results[names[0]])
  rows = []
  for name in names:
    res, runs = named_results[name], _runs(named_results[name])
    row = {"name": name, "fd": res["fd"], "fd_sd": res.get("fd_sd", 0.0),
           "num_evaluations": res.get("num_evaluations", 1), "fd_floor": res["fd_floor"],
           "class_accuracy": res.get("class_accuracy"),
           "classifier_sha256": res.get("classifier_sha256")}
    if name in unchecked:
      row["warning"] = unchecked[name]
    if name != names[0]:
      keys = sorted(set(runs) & set(base))
      if keys:
        diff = np.array([runs[k] - base[k] for k in keys])
        row["paired"] = {"pairs": len(keys), "mean": float(diff.mean()),
                         "min": float(diff.min()), "max": float(diff.max()),
                         "lower": int(np.sum(diff < 0))}
      else:
        row["paired"] = None
    rows.append(row)
  return rows


def format_comparison(rows):
  """A table of ``compare_evaluations`` rows."""
  base = rows[0]["name"]
  w = max([5] + [len(row["name"]) for row in rows])
  lines = [f"{'model':<{w}} {'FD':>8} {'sd':>6} {'n':>3} {'floor':>7} {'acc.':>7}"
           f"  paired with {base}: FD - {base} (mean, range), lower in"]
  for row in rows:
    acc = "" if row["class_accuracy"] is None else f"{100 * row['class_accuracy']:.2f}%"
    # one evaluation has no spread: "-", not an sd of 0
    sd = f"{row['fd_sd']:6.3f}" if row["num_evaluations"] > 1 else f"{'-':>6}"
    line = (f"{row['name']:<{w}} {row['fd']:8.3f} {sd}"
            f" {row['num_evaluations']:3d} {row['fd_floor']:7.3f} {acc:>7}")
    p = row.get("paired", "base")
    if p is None:
      line += "  no (file, seed) pair in common"
    elif p != "base":
      line += (f"  {p['mean']:+.3f} ({p['min']:+.3f} to {p['max']:+.3f}),"
               f" lower in {p['lower']} of {p['pairs']}")
    lines.append(line)
  return "\n".join(lines)


REFERENCES = ("test", "validation")


def sample_holdout(path):
  """``data.holdout`` of the run a sample.py .npz came from (None: not recorded,
  a file from before sample.py recorded it)."""
  with np.load(os.fspath(path), allow_pickle=False) as f:
    return int(f["holdout"]) if "holdout" in f.files else None


def check_holdout_source(paths, source, holdout):
  """Raises unless the runs that wrote ``paths`` read their data from ``source``.

  ``data.holdout`` picks images by position in the training split, and TFDS
  orders MNIST otherwise than its IDX files: with another source, the
  "validation" images (and the "train" ones of the memorisation check) would
  be other images, most of them images the run trained on. Files written
  before sample.py recorded the source are not checked.
  """
  for p in paths:
    with np.load(os.fspath(p), allow_pickle=False) as f:
      recorded = str(f["data_source"]) if "data_source" in f.files else None
    if recorded is not None and recorded != source:
      raise ValueError(
          f"{p} comes from a run that held out data.holdout={holdout} images by "
          f"their position in its {recorded} data, and --source {source} orders "
          "MNIST otherwise: its validation (and training) images would be other "
          f"ones. Score it with --source {recorded} and that source's --data_dir.")


def _validation_holdout(paths):
  """The one ``data.holdout`` > 0 of the runs that wrote ``paths``, or why not."""
  holdouts = {p: sample_holdout(p) for p in paths}
  for p, h in holdouts.items():
    if h is None:
      raise ValueError(
          f"{p} does not record which training images its run held out (it was"
          " written by sample.py before data.holdout existed): sample the run"
          " again, or score it against the test set (--reference test).")
    if h == 0:
      raise ValueError(
          f"{p} comes from a run trained on the whole training split"
          " (data.holdout=0): the validation images would be images it trained"
          " on. Train with --config.data.holdout=10000 to validate, or score"
          " against the test set (--reference test).")
  if len(set(holdouts.values())) > 1:
    raise ValueError(f"the samples come from runs with different data.holdout"
                     f" {holdouts}: their validation images differ; score them"
                     " separately.")
  return next(iter(holdouts.values()))


def class_balance_warning(path, labels, num_classes=10):
  """A warning (None: none) when a samples file's labels do not cover the
  classes about evenly: its FD against the whole reference set (all classes,
  about 10% each) would then measure the class mix more than the images."""
  if labels is None:
    return None
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
  missing = [k for k in range(num_classes) if counts[k] == 0]
  if missing:
    why = f"has no samples of classes {missing}"
  elif counts.max() > 2 * counts.min():
    why = f"has {counts.min()} to {counts.max()} samples per class"
  else:
    return None
  return (f"warning: {path} {why}; its FD is against real images of all {num_classes}"
          " classes in equal parts, so it measures the class mix more than the"
          " images. Sample every class equally (sample.py without --classes).")


def evaluate_sample_file(samples_path, classifier_path, data_dir,
                         source="offline", num_samples=10_000, out=None, seed=0,
                         log=print, check_memorisation=False, reference="test",
                         overwrite=False):
  """Evaluates sample.py .npz file(s) against MNIST test; writes and returns results.

  ``reference="validation"`` scores against the training images the samples'
  run held out (``data.holdout``, recorded in each file by sample.py) instead:
  the set to choose checkpoints, EMA lengths or settings on, so that the test
  set is looked at once, for the choice. The floor's second real set is the
  reference itself when it has >= 2 * num_samples images, else the other
  split (train, or test for a validation reference). ``out`` defaults to
  ``<samples>_eval.json``. ``samples_path`` may be a list of files (sample
  draws of one model) and ``seed`` a list of seeds (reference sets): every
  file is scored against every seed's reference set and the results combined
  by ``combine_evaluations`` (several files need ``out``). Memorisation
  (nearest images of the run's training images) is measured on the first file
  with the first seed. An existing results file is replaced only with
  ``overwrite`` (checked before the scoring); the results are logged before
  they are written. They record the classifier file's path and the sha256 of
  its bytes (``classifier_sha256``), so that ``compare_evaluations`` pairs
  only FDs in one classifier's features.
  """
  from scoreflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  paths = [samples_path] if isinstance(samples_path, (str, os.PathLike)) else list(samples_path)
  seeds = [seed] if np.ndim(seed) == 0 else [int(s) for s in seed]
  if not paths or not seeds:
    raise ValueError("need at least one samples file and one seed.")
  if reference not in REFERENCES:
    raise ValueError(f"unknown reference {reference!r}; choose one of {REFERENCES}.")
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 (an FD needs two samples), got"
                     f" {num_samples}.")
  real = [os.path.realpath(p) for p in paths]
  repeated = sorted({p for p, r in zip(paths, real) if real.count(r) > 1})
  if repeated or len(set(seeds)) != len(seeds):
    raise ValueError(f"a samples file or seed is given twice (files {repeated}, seeds "
                     f"{seeds}): repeated evaluations would count as independent ones "
                     "and understate the FD's spread.")
  check_not_an_input(out, paths + [classifier_path])
  if len(paths) > 1 and out is None:
    raise ValueError(f"{len(paths)} samples files are scored together: name the"
                     " results file with out (evaluate.py --out FILE.json), so that"
                     " no file's own <samples>_eval.json is overwritten.")
  draws = [load_samples(p) for p in paths]  # every file checked before any work
  warnings = [w for p, (_, labels) in zip(paths, draws)
              for w in [class_balance_warning(p, labels)] if w]
  for w in warnings:
    log(w)
  holdout = (_validation_holdout(paths) if reference == "validation"
             else sample_holdout(paths[0]))
  if holdout and (reference == "validation" or check_memorisation):
    check_holdout_source(paths, source, holdout)
  # a results file that would be replaced is told before JAX starts
  out = results_path(out, os.path.splitext(paths[0])[0] + "_eval.json", overwrite)
  from scoreflow_jax.eval import classifier as classifier_lib
  params, header = classifier_lib.load_classifier(classifier_path)
  classifier_sha256 = classifier_lib.file_sha256(classifier_path)
  for images, _ in draws:
    classifier_lib.check_input_shape(params, images.shape[1:])
  load = lambda split: data_lib.load_run_split("mnist", split, source, data_dir,
                                               holdout or 0)
  ref_images, ref_labels = load(reference)
  n = min([num_samples, len(ref_images)] + [len(images) for images, _ in draws])
  if n < num_samples:
    # the reference sets are picked by (seed, n): other n, other FD and floor
    fewer = [f"{p} has {len(images):,}" for p, (images, _) in zip(paths, draws)
             if len(images) < num_samples]
    if len(ref_images) < num_samples:
      fewer.append(f"the {reference} split has {len(ref_images):,}")
    warnings.append(f"warning: scoring n = {n:,} images, not the {num_samples:,} asked "
                    f"for (num_samples): {'; '.join(fewer)}. FDs at other n are not "
                    "comparable (nor paired by --compare).")
    log(warnings[-1])
  floor_images, other = None, "train" if reference == "test" else "test"
  if len(ref_images) < 2 * n:
    # the whole other split, whatever the run held out: the same seed and n
    # give the same floor for every run (and --compare pairs them)
    floor_images = data_lib.load_split("mnist", other, source, data_dir)[0]
  evaluations = []
  cache = ClassifierCache(params)
  for i, (images, labels) in enumerate(draws):
    for s in seeds:
      res = evaluate_samples(params, images, labels, ref_images, ref_labels, n,
                             floor_images, s, cache)
      evaluations.append(dict(res, draw=i, seed=s))
  results = combine_evaluations(evaluations) if len(evaluations) > 1 else evaluations[0]
  results.pop("draw", None)
  if check_memorisation:
    train_images = (floor_images if floor_images is not None and other == "train"
                    and not holdout else load("train")[0])  # what the run trained on
    results["memorisation"] = memorisation(draws[0][0], ref_images, train_images,
                                           seed=seeds[0])
  results["floor_source"] = (
      f"mnist {other} vs {reference}" if results["floor_source"] == "floor_images"
      else f"mnist {reference} vs disjoint {reference}")
  results.update(reference=reference, holdout=holdout)
  results.update(samples=(os.path.abspath(paths[0]) if len(paths) == 1
                          else [os.path.abspath(p) for p in paths]),
                 classifier=os.path.abspath(classifier_path),
                 classifier_sha256=classifier_sha256,
                 classifier_test_accuracy=header.get("test_accuracy"),
                 classifier_holdout=header.get("holdout", 0),
                 seed=seeds[0] if len(seeds) == 1 else seeds)
  if warnings:
    results["warnings"] = warnings
  log(format_results(results))  # before the write: a failing write loses nothing
  write_json(out, results)
  log(f"wrote {out}")
  return results


def nearest_distances(images, train_images, batch_size=500):
  """Euclidean distance (pixels in [-1, 1]) from each image to its nearest
  training image, (N,). Images uint8 or [-1, 1], any shape (N, ...)."""
  from scoreflow_jax.eval import classifier as classifier_lib
  flat = lambda a: classifier_lib.to_inputs(a).reshape(len(a), -1)
  train = flat(train_images)
  train_sq = np.sum(train.astype(np.float64)**2, 1)
  out = []
  for i in range(0, len(images), batch_size):
    x = flat(images[i:i + batch_size])
    d2 = np.sum(x.astype(np.float64)**2, 1)[:, None] - 2.0 * (x @ train.T) + train_sq[None]
    out.append(np.sqrt(np.clip(d2.min(1), 0.0, None)))
  return np.concatenate(out)


def memorisation(sample_images, test_images, train_images, n=1000, seed=0):
  """Do samples copy the training set? For ``n`` samples and ``n`` real test
  images (which the model never saw): the distance to the nearest training
  image (medians, 1st percentiles, the fraction of samples nearer their nearest
  training image than any of the n test images is to its own), and the ratio of
  that distance to the distance to the nearest of the *other* test images.

  The ratio does not depend on how blurry or sharp an image is (both distances
  move together); for real test images it is a baseline (below 1 when the
  training set is the larger), a sample copied from the training set has ratio
  0, and a model that generalises has about 1% of its samples below the real
  images' 1st percentile (``samples_ratio_below_test_p1``). The ratios need
  more than n test images (None otherwise).
  """
  from scoreflow_jax.eval import classifier as classifier_lib
  rng = np.random.default_rng(seed)
  samples = np.asarray(sample_images)[rng.permutation(len(sample_images))[:n]]
  order = rng.permutation(len(test_images))
  test, held = np.asarray(test_images)[order[:n]], np.asarray(test_images)[order[n:]]
  # samples and test images in one pass over each reference set
  queries = np.concatenate([classifier_lib.to_inputs(samples), classifier_lib.to_inputs(test)])
  split = lambda d: (d[:len(samples)], d[len(samples):])
  to_train, test_to_train = split(nearest_distances(queries, train_images))
  out = {"samples_median": float(np.median(to_train)),
         "test_median": float(np.median(test_to_train)),
         "samples_p1": float(np.percentile(to_train, 1)),
         "test_p1": float(np.percentile(test_to_train, 1)),
         "samples_below_test_min": float(np.mean(to_train < test_to_train.min())),
         "num": int(len(to_train)), "samples_ratio_median": None, "test_ratio_median": None,
         "samples_ratio_below_test_p1": None}
  if len(held):
    to_held, test_to_held = split(nearest_distances(queries, held))
    ratio = to_train / np.maximum(to_held, 1e-12)
    test_ratio = test_to_train / np.maximum(test_to_held, 1e-12)
    out.update(samples_ratio_median=float(np.median(ratio)),
               test_ratio_median=float(np.median(test_ratio)),
               samples_ratio_below_test_p1=float(np.mean(ratio < np.percentile(test_ratio, 1))))
  return out


def format_results(results):
  """A few lines of text for the results of ``evaluate_samples``."""
  lines = [f"FD {results['fd']:.3f} | real-vs-real floor"
           f" {results['fd_floor']:.3f} at n = {results['num_samples']}"
           f" ({results['floor_source']})"]
  if results.get("num_evaluations", 1) > 1:
    runs = results["fd_runs"]
    lines[0] = "mean " + lines[0] + (
        f"\nFD over {len(runs)} evaluations ({len({r.get('draw') for r in runs})}"
        f" sample file(s) x {len({r.get('seed') for r in runs})} reference set(s)):"
        f" sd {results['fd_sd']:.3f}, range {results['fd_min']:.3f} - "
        f"{results['fd_max']:.3f}; each (file, seed): " + ", ".join(
            f"({r.get('draw')}, {r.get('seed')}) {r['fd']:.3f}" for r in runs))
  if results.get("reference") == "validation":
    lines.insert(0, f"against the validation split ({results['holdout']:,} held-out"
                 " training images):")
    if results.get("classifier_holdout", 0) != results["holdout"]:
      lines.append("(the classifier was trained on these images: train_classifier.py"
                   f" --holdout {results['holdout']} makes one that was not)")
  if results.get("class_accuracy") is not None:
    ref = results.get("reference_class_accuracy")
    lines.append(f"class accuracy {results['class_accuracy']:.4f}"
                 + ("" if ref is None else f" (real images: {ref:.4f})"))
    lines.append("per class: " + " | ".join(
        f"{k} {'-' if a is None else f'{a:.3f}'}"
        for k, a in enumerate(results["per_class_accuracy"])))
  if results.get("roughness") is not None:
    ref = results.get("reference_roughness")
    lines.append(f"roughness (mean |Laplacian|, [-1, 1] pixels) {results['roughness']:.4f}"
                 + ("" if ref is None else f" (real images: {ref:.4f})"))
  if results.get("feature_spread") is not None:
    ref = results.get("floor_feature_spread")
    lines.append(f"feature spread (trace of the features' covariance over the real "
                 f"images') {results['feature_spread']:.3f}"
                 + ("" if ref is None else f" (other real images: {ref:.3f})"))
  lines += results.get("warnings", [])
  mem = results.get("memorisation")
  if mem:
    lines.append(f"nearest training image (L2, [-1, 1] pixels, n = {mem['num']}): samples "
                 f"median {mem['samples_median']:.2f} (1st pct {mem['samples_p1']:.2f}), "
                 f"real test images median {mem['test_median']:.2f} (1st pct "
                 f"{mem['test_p1']:.2f}); {100 * mem['samples_below_test_min']:.1f}% of "
                 "samples nearer than the nearest test image")
    if mem.get("samples_ratio_median") is not None:
      lines.append(f"nearest training / nearest held-out test image: samples median "
                   f"{mem['samples_ratio_median']:.3f}, real test images median "
                   f"{mem['test_ratio_median']:.3f}; "
                   f"{100 * mem['samples_ratio_below_test_p1']:.1f}% of samples below the "
                   "real images' 1st percentile (about 1% if not copying)")
  return "\n".join(lines)
