"""Train the MNIST classifier that evaluate.py uses (never downloads).

python train_classifier.py --data_dir /path/to/mnist_idx --out classifier.npz \
  [--steps 3000] [--source offline|tfds] [--holdout 10000] [--overwrite]
Prints the MNIST test accuracy and stores it in the file's header. An existing
--out is replaced only with --overwrite (checked before training). --holdout N
trains without the training images that runs with --config.data.holdout=N hold
out, so that evaluate.py --reference validation scores against images the
classifier has not seen either.
"""
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder of MNIST's four IDX files (offline), "
                    "or the TFDS data dir (tfds).")
flags.DEFINE_string("out", None, "Output classifier file (.npz).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out; without it, a "
                  "file that exists is an error.")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where MNIST comes from.")
flags.DEFINE_integer("steps", 3000, "Training steps.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of initialization, batches and augmentation.")
flags.DEFINE_integer("holdout", 0, "Leave out the training images a run with "
                     "--config.data.holdout=N holds out (0: train on all 60,000).")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from scoreflow_jax import usage
  usage.check_data_flags(FLAGS.source, FLAGS.data_dir)
  if FLAGS.steps < 1 or FLAGS.batch_size < 1:
    raise app.UsageError(f"--steps and --batch_size must be >= 1, got"
                         f" {FLAGS.steps} and {FLAGS.batch_size}.")
  from scoreflow_jax.eval import classifier
  try:
    with usage.usage_errors():
      classifier.train_and_save(FLAGS.data_dir, FLAGS.out, FLAGS.source, FLAGS.steps,
                                FLAGS.batch_size, FLAGS.seed, holdout=FLAGS.holdout,
                                overwrite=FLAGS.overwrite)
  except app.UsageError as e:  # data.py names train.py's field; here it is --holdout
    raise app.UsageError(str(e).replace("data.holdout=", "--holdout ")) from e


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main)
