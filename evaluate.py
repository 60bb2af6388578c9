"""Measure sample quality: FD in classifier features (with its real-vs-real floor)
and class accuracy, against the MNIST test set.

python evaluate.py --samples grid.npz --classifier classifier.npz \
  --data_dir /path/to/mnist_idx [--source offline] [--num_samples 10000] \
  [--out results.json] [--memorisation]
grid.npz comes from sample.py (e.g. --num_per_class 1000 for 10k samples);
classifier.npz from train_classifier.py. Results go to <samples>_eval.json
unless --out is given.
"""
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("samples", None, "Samples .npz written by sample.py.")
flags.DEFINE_string("classifier", None, "Classifier file from train_classifier.py.")
flags.DEFINE_string("data_dir", None, "Folder of MNIST's four IDX files (offline), "
                    "or the TFDS data dir (tfds).")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where MNIST comes from.")
flags.DEFINE_integer("num_samples", 10_000, "Samples to evaluate (at most the number "
                     "in the file and 10k); the floor uses as many real images.")
flags.DEFINE_string("out", None, "Results JSON (default: <samples>_eval.json).")
flags.DEFINE_integer("seed", 0, "Seed of the random subsets.")
flags.DEFINE_bool("memorisation", False, "Also measure how near 1,000 samples are to"
                  " their nearest training image, against real test images.")
flags.mark_flags_as_required(["samples", "classifier"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.source == "offline" and not FLAGS.data_dir:
    raise app.UsageError("--source=offline needs --data_dir, the folder of"
                         " MNIST's four IDX files.")
  from scoreflow_jax.eval import metrics
  metrics.evaluate_sample_file(FLAGS.samples, FLAGS.classifier, FLAGS.data_dir,
                               FLAGS.source, FLAGS.num_samples, FLAGS.out, FLAGS.seed,
                               check_memorisation=FLAGS.memorisation)


if __name__ == "__main__":
  app.run(main)
