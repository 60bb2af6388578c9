"""Train a small KL autoencoder (sgm's AutoencoderKL) as a latent first stage.

python train_autoencoder.py --data_dir /path/to/mnist_idx --out vae.safetensors \
  [--steps 2000] [--ch 32 --ch_mult 1,2,2 --embed_dim 4] [--dataset mnist|cifar10] \
  [--source offline|tfds] [--holdout N] [--checkpoint_every 250] [--overwrite]
(--help lists the rest: batch size, learning rate, KL weight, seed, blocks, attention).
Writes the weights in sgm's state-dict names (.safetensors, readable by
torch), scores the reconstruction on the test split, and prints the train.py
flags that diffuse in its latents (--config.model.first_stage=kl_autoencoder
...), shift_factor = the latents' mean and scale_factor = 0.5 / their std
included (centred latents with the std sigma_data = 0.5 that EDM's
preconditioning assumes, as EDM2 normalises its latents). The loss is L1 + KL
(sgm's without LPIPS and GAN): enough for MNIST. An existing --out is
replaced only with --overwrite (checked before training).

Training is saved to OUT.ckpt every --checkpoint_every steps and when
SIGTERM or Ctrl-C stops it; the same command resumes from there (the same
batches and updates as a run never stopped) and deletes the file once --out
is written. A checkpoint of other flags is refused, never replaced.
"""
import re
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder of the data set's original files "
                    "(offline), or the TFDS data dir (tfds).")
flags.DEFINE_string("out", None, "Output weights (.safetensors).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_enum("source", "offline", ["offline", "tfds"], "Where the data come from.")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "cifar10"], "Data set.")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam's peak rate (cosine decay to 1%).")
flags.DEFINE_float("kl_weight", 1e-6, "Weight of the KL term (Stable Diffusion: 1e-6).")
flags.DEFINE_integer("seed", 0, "Seed of initialization, batches and posterior draws.")
flags.DEFINE_integer("holdout", 0, "Leave out the training images a run with "
                     "--config.data.holdout=N holds out.")
flags.DEFINE_integer("ch", 32, "Base width (a multiple of 32).")
flags.DEFINE_list("ch_mult", ["1", "2", "2"], "Width per level; all but the last "
                  "halve the sides (1,2,2: 28x28 -> 7x7).")
flags.DEFINE_integer("num_res_blocks", 1, "ResnetBlocks per level.")
flags.DEFINE_list("attn_resolutions", [], "Sizes with attention blocks (the middle "
                  "always has one).")
flags.DEFINE_integer("embed_dim", 4, "Latent channels.")
flags.DEFINE_integer("checkpoint_every", 250, "Save training to OUT.ckpt every N "
                     "steps (0: only after the last) to resume a stopped run.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  # the flags' checks import no JAX: a mistyped flag is told at once
  from scoreflow_jax import data as data_lib, usage
  usage.check_data_flags(FLAGS.source, FLAGS.data_dir)
  try:
    ch_mult = tuple(int(m) for m in FLAGS.ch_mult)
    attn = tuple(int(r) for r in FLAGS.attn_resolutions)
  except ValueError:
    raise app.UsageError("--ch_mult and --attn_resolutions are integers separated by "
                         f"commas, got {FLAGS.ch_mult} and {FLAGS.attn_resolutions}.")
  if FLAGS.steps < 1 or FLAGS.batch_size < 1:
    raise app.UsageError(f"--steps and --batch_size must be >= 1, got {FLAGS.steps} "
                         f"and {FLAGS.batch_size}.")
  if FLAGS.checkpoint_every < 0:
    raise app.UsageError(f"--checkpoint_every must be >= 0 (0: save only after the "
                         f"last step), got {FLAGS.checkpoint_every}.")
  if FLAGS.num_res_blocks < 1 or FLAGS.embed_dim < 1 or not ch_mult or min(ch_mult) < 1:
    raise app.UsageError(f"--num_res_blocks, --embed_dim and every --ch_mult level must "
                         f"be >= 1, got {FLAGS.num_res_blocks}, {FLAGS.embed_dim} and "
                         f"{','.join(map(str, ch_mult)) or 'none'}.")
  import ml_collections
  from scoreflow_jax import autoencoder_training, first_stage
  shape = data_lib.IMAGE_SHAPES[FLAGS.dataset]
  a = ml_collections.ConfigDict(dict(
      weights="-", scale_factor=1.0, in_channels=shape[-1], embed_dim=FLAGS.embed_dim,
      z_channels=FLAGS.embed_dim, ch=FLAGS.ch, ch_mult=ch_mult,
      num_res_blocks=FLAGS.num_res_blocks, attn_resolutions=attn, resolution=shape[0]))
  try:
    with usage.usage_errors():
      first_stage.check_autoencoder_config(a)
      autoencoder_training.train_and_save(
          first_stage.build_autoencoder(a), FLAGS.data_dir, FLAGS.out, FLAGS.source,
          FLAGS.dataset, FLAGS.steps, FLAGS.batch_size, FLAGS.learning_rate,
          FLAGS.kl_weight, FLAGS.seed, FLAGS.holdout, FLAGS.overwrite,
          checkpoint_every=FLAGS.checkpoint_every)
  except autoencoder_training.Stopped as e:  # saved and told; not an error
    sys.exit(e.exit_code)
  except FloatingPointError as e:  # its message names the fix
    raise app.UsageError(str(e)) from e
  except app.UsageError as e:  # the checks name train.py's fields: these are flags here
    raise app.UsageError(own_flags(str(e))) from e


def own_flags(message: str) -> str:
  """``message`` with train.py's config fields named as this script's flags."""
  message = re.sub(r"config\.model\.autoencoder\.(\w+)", r"--\1", message)
  return re.sub(r"data\.holdout=", "--holdout ", message)


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main)
