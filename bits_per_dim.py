"""Exact bits/dim of the MNIST test set under a trained density run.

python bits_per_dim.py --workdir logs/<mnist-density run> --data_dir /path/to/mnist \
  [--source offline] [--sigma 0.002] [--num_images 10000] [--out bpd.json]
Class-conditional, uniform dequantisation, one forward pass per image (see
scoreflow_jax/likelihood.py). Needs a run of configs/mnist_density.py.
"""
import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder of a parameterization='density' run.")
flags.DEFINE_string("data_dir", None, "Folder of MNIST's IDX files (offline) or TFDS data dir.")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where MNIST comes from.")
flags.DEFINE_float("sigma", 0.002, "Noise level whose density is evaluated.")
flags.DEFINE_integer("num_images", 10_000, "Test images to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights.")
flags.DEFINE_string("out", None, "Results JSON (default: <workdir>/bits_per_dim.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from scoreflow_jax import data, generate, likelihood
  model, state, config = generate.load_run(FLAGS.workdir, FLAGS.step)
  images, labels = data.load_split("mnist", "test", FLAGS.source, FLAGS.data_dir)
  images, labels = images[:FLAGS.num_images], labels[:FLAGS.num_images]
  params = state.ema_params if FLAGS.ema else state.params
  mean, _ = likelihood.bits_per_dim(model, params, images, labels, jax.random.key(0),
                                    sigma=FLAGS.sigma)
  result = {"bits_per_dim": mean, "num_images": len(images), "sigma": FLAGS.sigma,
            "step": int(state.step), "weights": "ema" if FLAGS.ema else "raw",
            "workdir": os.path.abspath(FLAGS.workdir)}
  out = FLAGS.out or os.path.join(FLAGS.workdir, "bits_per_dim.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
