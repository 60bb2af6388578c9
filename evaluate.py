"""Measure sample quality: FD in classifier features (with its real-vs-real floor)
and class accuracy, against the MNIST test set.

python evaluate.py --samples grid.npz --classifier classifier.npz \
  --data_dir /path/to/mnist_idx [--source offline] [--num_samples 10000] \
  [--out results.json] [--overwrite] [--memorisation] [--seed 0]
grid.npz comes from sample.py (e.g. --num_per_class 1000 for 10k samples), its
images in [-1, 1] (a float file with no negative pixel is refused as [0, 1]
images: map them with x * 2 - 1); classifier.npz from train_classifier.py.
Results are printed, then written to <samples>_eval.json unless --out is given
(required when several --samples files are scored together);
an existing results file is replaced only with --overwrite (checked before the
scoring). They record the classifier file's sha256.

Comparing models by one FD at 2k is comparing noise (a draw moves it by about
2): score several sample draws of each model (sample.py --seed 0, 1, ...)
against several reference sets, and compare the means:
python evaluate.py --samples a_s0.npz,a_s1.npz --seed 0,1,2 --out a_eval.json ...
prints and writes the mean FD, floor and class accuracy over the 6 (file, seed)
evaluations, their spread and each one.

Choosing between checkpoints, EMA lengths or settings by the test-set FD is
selecting on the test set. Train with --config.data.holdout=10000 (50k images
trained on, 10k held out), choose by
python evaluate.py --samples a.npz --reference validation ...
(the held-out images, recorded by sample.py in the .npz), then score only the
choice against the test set.

Several models side by side, each paired with the first by (file, reference
seed), from their results files:
python evaluate.py --compare lr3=lr3_eval.json,lr6=lr6_eval.json [--out cmp.json]
prints each model's mean FD and, for the others, FD - the first's over the
evaluations both hold (mean, range, in how many it is lower). Results scored
by different classifiers are refused.

Where a run loses quality (scoreflow_jax/eval/diagnostics.py):
python evaluate.py --diagnose --workdir RUN [--data_dir /path/to/mnist_idx] \
  [--classifier classifier.npz] [--num_images 1000] [--step N] [--noema] [--seed 0] \
  [--sigmas 0.01,0.03,...] [--start_sigmas 0.05,0.2,...] [--renoise_from test,train]
prints the loss at fixed sigmas on the training and the test split (same
noise) and, with --classifier, the FD of test and of training images noised
to each start sigma and sampled back to 0 (against the other test images);
writes RUN/diagnostics.json (or --out; an existing file only with --overwrite).
The data are read from where the run's came from unless --source or
--data_dir says otherwise.

What a first stage costs any model diffusing in its latents
(scoreflow_jax/eval/autoencoder_floor.py):
python evaluate.py --autoencoder vae.safetensors --classifier classifier.npz \
  --data_dir /path/to/mnist_idx [--seed 0,1,2] [--num_samples 10000]
scores the autoencoder's reconstructions (train_autoencoder.py's file) of the
floor's own real images and prints FD - floor; writes vae_floor.json (the
weights' name with _floor.json, or --out) and, beside it, vae_floor.png: per
class, five real images each beside its reconstruction.
"""
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list("samples", None, "Samples .npz written by sample.py; several"
                  " (draws of one model, comma-separated) are scored together.")
flags.DEFINE_string("classifier", None, "Classifier file from train_classifier.py.")
flags.DEFINE_string("data_dir", None, "Folder of MNIST's four IDX files (offline), "
                    "or the TFDS data dir (tfds); --diagnose: default, with --source, "
                    "the run's own.")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where MNIST comes from "
                  "(--diagnose without --source and --data_dir: where the run's came "
                  "from).")
flags.DEFINE_integer("num_samples", 10_000, "Samples to evaluate (at most the number "
                     "in the file and 10k); the floor uses as many real images.")
flags.DEFINE_string("out", None, "Results JSON (default: <samples>_eval.json; "
                    "--diagnose: RUN/diagnostics.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out (or default "
                  "results file); without it, a file that exists is an error.")
flags.DEFINE_list("seed", ["0"], "Seed of the random subsets (which reference "
                  "images); several (0,1,2): score against each, report the mean.")
flags.DEFINE_enum("reference", "test", ["test", "validation"], "Real images to "
                  "score against: the test set, or the training images the samples' "
                  "run held out (train.py --config.data.holdout=N), to choose "
                  "checkpoints or settings without looking at the test set.")
flags.DEFINE_bool("memorisation", False, "Also measure how near 1,000 samples are to"
                  " their nearest training image, against real test images.")
flags.DEFINE_list("compare", None, "NAME=RESULTS.json,... written by this script"
                  " (the first is the baseline): print their FDs, paired.")
flags.DEFINE_bool("diagnose", False, "Diagnose a run (--workdir) instead of "
                  "scoring a samples file: loss by sigma on train vs test, and with "
                  "--classifier the FD by start sigma.")
flags.DEFINE_string("workdir", None, "--diagnose: the run's folder (train.py --workdir).")
flags.DEFINE_integer("num_images", 1000, "--diagnose: images per split (a tenth "
                     "per class).")
flags.DEFINE_list("sigmas", None, "--diagnose: noise levels of the loss "
                  "(default 0.01,0.03,0.1,0.3,1,3,10).")
flags.DEFINE_list("renoise_from", ["test", "train"], "--diagnose: splits whose "
                  "images start the FD part (scored against the rest of the test set).")
flags.DEFINE_list("start_sigmas", None, "--diagnose: start sigmas of the FD "
                  "part (default 0.05,0.2,0.5,1,2,5; empty: skip).")
flags.DEFINE_integer("step", None, "--diagnose: the checkpoint's step (default: "
                     "the latest).")
flags.DEFINE_string("autoencoder", None, "Score this autoencoder's reconstructions "
                    "(a train_autoencoder.py .safetensors) of the floor's real images "
                    "instead of a samples file: the limit of a model in its latents.")
flags.DEFINE_bool("ema", True, "--diagnose: the EMA weights (--noema: the raw ones).")


# The flags each mode reads (--out and --overwrite: every mode's).
_SCORING = ("classifier", "data_dir", "source", "num_samples", "seed")
MODE_FLAGS = {
    "samples": _SCORING + ("reference", "memorisation"),
    "compare": (),
    "diagnose": ("workdir", "classifier", "data_dir", "source", "seed", "num_images",
                 "sigmas", "renoise_from", "start_sigmas", "step", "ema"),
    "autoencoder": _SCORING,
}


def _check_mode_flags(mode):
  """Refuses flags the mode would ignore (a --reference validation given to
  --diagnose would otherwise score against the test set without a word)."""
  others = {f for m, fs in MODE_FLAGS.items() for f in fs + (m,)}
  ignored = sorted(f for f in others - set(MODE_FLAGS[mode]) - {mode}
                   if FLAGS[f].present)
  if ignored:
    raise app.UsageError(
        f"--{mode} does not use {', '.join('--' + f for f in ignored)}: drop "
        f"{'it' if len(ignored) == 1 else 'them'} (--{mode} reads "
        f"{', '.join('--' + f for f in MODE_FLAGS[mode] + ('out', 'overwrite'))}).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from scoreflow_jax import usage
  modes = [m for m in ("samples", "diagnose", "compare", "autoencoder")
           if getattr(FLAGS, m)]
  if len(modes) > 1:
    raise app.UsageError(f"{' and '.join('--' + m for m in modes)} are separate runs"
                         " of this script: give one of them.")
  _check_mode_flags(modes[0] if modes else "samples")
  if FLAGS.compare:
    with usage.usage_errors():
      compare(FLAGS.compare, FLAGS.out, FLAGS.overwrite)
    return
  source, data_dir = FLAGS.source, FLAGS.data_dir
  if FLAGS.diagnose and FLAGS.workdir:  # the run's own data unless told
    from scoreflow_jax import run_config
    with usage.usage_errors():
      source, data_dir = run_config.data_flags(
          run_config.load(FLAGS.workdir), source, data_dir,
          FLAGS["source"].present or FLAGS["data_dir"].present)
  usage.check_data_flags(source, data_dir)
  try:
    seeds = [int(s) for s in FLAGS.seed]
  except ValueError as e:
    raise app.UsageError(f"--seed must be integers, e.g. 0 or 0,1,2: {e}")
  if not seeds or min(seeds) < 0:
    raise app.UsageError(f"--seed needs non-negative integers, got {FLAGS.seed}.")
  if FLAGS.diagnose:
    if len(seeds) > 1:
      raise app.UsageError("--diagnose takes one --seed.")
    if not FLAGS.workdir:
      raise app.UsageError("--diagnose needs --workdir, the run's folder.")
    if FLAGS.num_images < 10:
      raise app.UsageError(f"--num_images must be >= 10 (a tenth per class), got"
                           f" {FLAGS.num_images}.")
    from scoreflow_jax.eval import diagnostics
    floats = lambda xs, default: (default if xs is None
                                  else tuple(float(x) for x in xs))
    try:
      sigmas = floats(FLAGS.sigmas, diagnostics.DEFAULT_SIGMAS)
      start_sigmas = floats(FLAGS.start_sigmas, diagnostics.DEFAULT_START_SIGMAS)
    except ValueError as e:
      raise app.UsageError(f"--sigmas / --start_sigmas must be numbers: {e}")
    with usage.usage_errors():
      diagnostics.diagnose_run(FLAGS.workdir, data_dir, source,
                               FLAGS.classifier, sigmas, start_sigmas,
                               FLAGS.num_images, FLAGS.renoise_from,
                               step=FLAGS.step, use_ema=FLAGS.ema, seed=seeds[0],
                               out=FLAGS.out, overwrite=FLAGS.overwrite)
    return
  if FLAGS.num_samples < 2:
    raise app.UsageError(f"--num_samples must be >= 2 (an FD needs two samples),"
                         f" got {FLAGS.num_samples}.")
  if FLAGS.autoencoder:
    if not FLAGS.classifier:
      raise app.UsageError("--autoencoder needs --classifier (train_classifier.py).")
    from scoreflow_jax.eval import autoencoder_floor
    with usage.usage_errors():
      autoencoder_floor.autoencoder_floor(
          FLAGS.autoencoder, FLAGS.classifier, FLAGS.data_dir, FLAGS.source,
          FLAGS.num_samples, seeds, FLAGS.out, FLAGS.overwrite)
    return
  if not FLAGS.samples or not FLAGS.classifier:
    raise app.UsageError("give --samples and --classifier (or --diagnose "
                         "--workdir RUN, or --autoencoder VAE).")
  from scoreflow_jax.eval import metrics
  with usage.usage_errors():
    metrics.evaluate_sample_file(FLAGS.samples, FLAGS.classifier, FLAGS.data_dir,
                                 FLAGS.source, FLAGS.num_samples, FLAGS.out, seeds,
                                 check_memorisation=FLAGS.memorisation,
                                 reference=FLAGS.reference,
                                 overwrite=FLAGS.overwrite)


def compare(specs, out=None, overwrite=False):
  import json
  import os
  from scoreflow_jax.eval import metrics
  from scoreflow_jax.outputs import check_not_an_input, check_output, write_json
  if out:
    check_not_an_input(out, [spec.rpartition("=")[2] for spec in specs])
    out = check_output(out, overwrite, "--out")
  named = {}
  for spec in specs:
    name, sep, path = spec.rpartition("=")
    name = name if sep else os.path.splitext(os.path.basename(path))[0]
    if name in named:
      raise app.UsageError(f"--compare: {name!r} given twice; name them NAME=FILE.")
    need = {"fd", "fd_floor", "num_samples"}
    try:
      with open(path) as f:
        results, why = json.load(f), f"no {sorted(need)}"
    except (OSError, ValueError) as e:
      results, why = None, repr(e)
    if not isinstance(results, dict) or not need <= results.keys():
      raise app.UsageError(f"--compare: {path} is not a results file of evaluate.py"
                           f" ({why}); make one with evaluate.py --samples ... --out {path}.")
    named[name] = results
  try:
    rows = metrics.compare_evaluations(named)
  except ValueError as e:
    raise app.UsageError(f"--compare: {e}")
  print(metrics.format_comparison(rows))
  if out:
    write_json(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main)
