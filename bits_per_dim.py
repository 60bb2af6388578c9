"""Exact bits/dim of a data set's test split under a trained density run.

python bits_per_dim.py --workdir logs/<mnist-density run> [--data_dir /path/to/mnist] \
  [--source offline] [--sigma 0.002] [--num_images 10000] [--step N] [--noema] \
  [--noisy] [--out bpd.json] [--overwrite]
Class-conditional, uniform dequantisation, one forward pass per image (see
scoreflow_jax/likelihood.py). Needs a parameterization='density' run (e.g.
configs/mnist_density.py); the test split is that of the run's data.name
(MNIST for a run on synthetic data), read from where the run's data came
from unless --source or --data_dir says otherwise. Prints
the result (JSON), then writes it to <workdir>/bits_per_dim.json
unless --out is given; an existing file is replaced only with --overwrite
(checked before any work). --noisy scores the test images noised at --sigma
(x + u + sigma * eps), the points q(. | sigma) models: a cross-entropy of the
noised test set in bits/dim, not the data's bits/dim.
"""
import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder of a parameterization='density' run.")
flags.DEFINE_string("data_dir", None, "Folder of the data set's original files "
                    "(offline: MNIST's IDX files, CIFAR-10's python batches) or the "
                    "TFDS data dir (default, with --source: the run's own).")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where the data come from "
                  "(without --source and --data_dir: where the run's came from).")
flags.DEFINE_float("sigma", 0.002, "Noise level whose density is evaluated (> 0).")
flags.DEFINE_integer("num_images", 10_000, "Test images to evaluate (the first ones).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights.")
flags.DEFINE_bool("noisy", False, "Score the test images plus N(0, sigma^2) noise "
                  "(the noised data q(. | sigma) models), not the clean images.")
flags.DEFINE_string("out", None, "Results JSON (default: <workdir>/bits_per_dim.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out (or default "
                  "results file); without it, a file that exists is an error.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from scoreflow_jax import likelihood, usage
  if FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images must be >= 1, got {FLAGS.num_images}.")
  try:
    likelihood.check_sigma(FLAGS.sigma)
  except ValueError as e:
    raise app.UsageError(f"--{e}")
  from scoreflow_jax import data, outputs, run_config
  with usage.usage_errors():  # the run folder, the data and --out: before JAX starts
    config = run_config.load(FLAGS.workdir)
    source, data_dir = run_config.data_flags(
        config, FLAGS.source, FLAGS.data_dir,
        FLAGS["source"].present or FLAGS["data_dir"].present)
  usage.check_data_flags(source, data_dir)
  with usage.usage_errors():
    likelihood.check_density_config(config.model)
    name = config.data.name if config.data.name in data.DATASETS else "mnist"
    if data.image_shape(config.data) != data.IMAGE_SHAPES[name]:
      raise ValueError(f"the run was trained on images of shape "
                       f"{data.image_shape(config.data)} ({config.data.name} "
                       f"data) and bits/dim scores the {name} test set "
                       f"{data.IMAGE_SHAPES[name]}: score a run trained on {name}.")
    out = outputs.results_path(FLAGS.out, os.path.join(FLAGS.workdir, "bits_per_dim.json"),
                               FLAGS.overwrite)
  import jax
  from scoreflow_jax import generate
  with usage.usage_errors():
    model, state, _ = generate.load_run(FLAGS.workdir, FLAGS.step)
    images, labels = data.load_split(name, "test", source, data_dir)
    images, labels = images[:FLAGS.num_images], labels[:FLAGS.num_images]
    params = state.ema_params if FLAGS.ema else state.params
    mean, _ = likelihood.bits_per_dim(model, params, images, labels,
                                      jax.random.key(0), sigma=FLAGS.sigma,
                                      noisy=FLAGS.noisy)
  result = {"bits_per_dim": mean, "dataset": name, "num_images": len(images),
            "sigma": FLAGS.sigma, "noisy": FLAGS.noisy,
            "step": int(state.step), "weights": "ema" if FLAGS.ema else "raw",
            "workdir": os.path.abspath(FLAGS.workdir)}
  print(json.dumps(result))  # before the write: a failing write loses nothing
  with usage.usage_errors():
    outputs.write_json(out, result, printed="the result above was")
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main)
