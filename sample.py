"""Sample image grids from a trained run.

python sample.py --workdir logs/<run> [--step N] --sampler heun_edm --num_steps 18 \
  --cfg_scale 1.0 [--cfg_interval 0.3,5] --classes 0,1,2 --num_per_class 10 --seed 0 --out grid.png
  [--noema | --average_from M | --posthoc_ema SIGMA_REL]
  [--score_scale 2 [--score_scale_interval 0.1,1]]
Writes grid.png (a row per class) and grid.npz (images in [-1, 1], labels);
--out may name either. Existing files are kept unless --overwrite.
"""
import math

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder made by train.py.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("sampler", None, "Sampler (default: the run's config): euler_edm, "
                    "heun_edm, euler_ancestral, dpmpp_2s_ancestral, dpmpp_2m, lms.")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the run's config).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (1: none; "
                   "default: the run's config, 1 in every config here).")
flags.DEFINE_list("cfg_interval", None, "lo,hi: guide only where lo < sigma <= hi "
                  "(default: every sigma); outside it each step makes one network "
                  "call, not two.")
flags.DEFINE_float("score_scale", None, "Multiply the (guided) score by this where "
                   "lo < sigma <= hi of --score_scale_interval (the noisy densities "
                   "raised to this power: a lower temperature there, still an exact "
                   "energy gradient, no extra network call; 1: none; default: the "
                   "run's sampling.score_scale, 1 in every config here).")
flags.DEFINE_list("score_scale_interval", None, "lo,hi for the score scale (default: the "
                  "run's sampling.score_scale_interval, 0.1,1). On MNIST in 0.1,1: 1.5-2 "
                  "lowered the pixel flows' FD by a quarter to a third, 1.5 the latent "
                  "conv flow's by 1.8 where 2 raised it; at every sigma a scale ruins "
                  "the samples. Choose it per model: bench/score_scale_sweep.py "
                  "(docs/results.md, sessions 46-47).")
flags.DEFINE_list("classes", None, "Comma-separated class labels (default: all).")
flags.DEFINE_integer("num_per_class", 10, "Images per class (grid columns).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("ema", True, "Use the EMA weights (else the raw weights).")
flags.DEFINE_integer("average_from", None, "Sample the uniform average of the raw "
                     "weights of every checkpoint kept at steps average_from..--step "
                     "(a post-hoc weight average; replaces --ema).")
flags.DEFINE_float("posthoc_ema", None, "Sample the power-function EMA of this relative "
                   "width (sigma_rel, e.g. 0.05) at --step, reconstructed from the "
                   "snapshots of a run trained with ema.posthoc_stds (EDM2's post-hoc "
                   "EMA; replaces --ema).")
flags.DEFINE_integer("batch_size", 256, "Images per sampler call.")
flags.DEFINE_string("low_noise_workdir", None, "Another run whose denoiser (its EMA "
                    "weights) takes over at sigma <= --switch_sigma: which noise range "
                    "a model's samples are made or lost in (same image shape and "
                    "classes, pixel runs).")
flags.DEFINE_integer("low_noise_step", None, "--low_noise_workdir's checkpoint step "
                     "(default: its latest).")
flags.DEFINE_float("switch_sigma", None, "With --low_noise_workdir: that run's "
                   "denoiser at sigma <= this, --workdir's above.")
flags.DEFINE_string("out", "grid.png", "Output PNG (or .npz); the other goes beside it.")
flags.DEFINE_bool("overwrite", False, "Replace existing output files (else refused).")
flags.mark_flags_as_required(["workdir"])


def _interval(name, what, verb):
  """--name's lo,hi as floats, or None; a usage error unless 0 <= lo < hi."""
  value = FLAGS[name].value
  if value is None:
    return None
  if len(value) != 2:
    raise app.UsageError(f"--{name} takes lo,hi, got {','.join(value)}")
  try:
    interval = tuple(float(v) for v in value)
  except ValueError:
    raise app.UsageError(f"--{name} takes two numbers lo,hi, got {','.join(value)}")
  if not 0 <= interval[0] < interval[1]:
    raise app.UsageError(f"--{name} needs 0 <= lo < hi ({what} where lo < sigma <= hi), "
                         f"got {interval}: it would {verb} nowhere")
  return interval


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:  # the flags' checks import no JAX: a mistyped flag is told at once
    classes = None if FLAGS.classes is None else [int(c) for c in FLAGS.classes]
  except ValueError:
    raise app.UsageError(f"--classes takes integer labels, e.g. 0,1,2; got "
                         f"{','.join(FLAGS.classes)}")
  if classes == []:
    raise app.UsageError("--classes is empty: name at least one class, e.g. 0,3 (or "
                         "leave it out for all)")
  for name in ("batch_size", "num_per_class", "num_steps"):
    if FLAGS[name].value is not None and FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  if (FLAGS.low_noise_workdir is None) != (FLAGS.switch_sigma is None):
    raise app.UsageError("--low_noise_workdir and --switch_sigma go together: the other "
                         "run's denoiser at sigma <= --switch_sigma")
  if FLAGS.low_noise_step is not None and FLAGS.low_noise_workdir is None:
    raise app.UsageError("--low_noise_step is a step of --low_noise_workdir; pass that run")
  for name in ("step", "average_from", "low_noise_step"):
    if FLAGS[name].value is not None and FLAGS[name].value < 0:
      raise app.UsageError(f"--{name} is a checkpoint step, >= 0; got {FLAGS[name].value}")
  interval = _interval("cfg_interval", "guidance", "guide")
  if FLAGS.score_scale is not None and not (math.isfinite(FLAGS.score_scale)
                                            and FLAGS.score_scale > 0):
    raise app.UsageError(f"--score_scale must be a finite number > 0 (1: none), got "
                         f"{FLAGS.score_scale}")
  scale_interval = _interval("score_scale_interval", "the scale", "scale")
  if FLAGS.average_from is not None and FLAGS["ema"].present and FLAGS.ema:
    raise app.UsageError("--average_from averages the raw weights; drop --ema")
  if FLAGS.posthoc_ema is not None and FLAGS["ema"].present and FLAGS.ema:
    raise app.UsageError("--posthoc_ema replaces the EMA weights; drop --ema")
  if FLAGS.posthoc_ema is not None and FLAGS.average_from is not None:
    raise app.UsageError("--posthoc_ema and --average_from each choose the weights; "
                         "pass one")
  replaced = FLAGS.average_from is not None or FLAGS.posthoc_ema is not None
  from scoreflow_jax import outputs, run_config
  from scoreflow_jax.usage import usage_errors
  with usage_errors():  # not a run, classes it lacks, files it would replace: before JAX
    config = run_config.load(FLAGS.workdir)
    run_config.classes(config, classes)
    if FLAGS.low_noise_workdir is not None:
      low = run_config.load(FLAGS.low_noise_workdir)
      run_config.check_low_noise_run(config, low, FLAGS.switch_sigma, FLAGS.low_noise_workdir)
      run_config.classes(low, classes)
    if FLAGS.posthoc_ema is not None:
      run_config.check_posthoc(config)
    outputs.paired_outputs(FLAGS.out, FLAGS.overwrite)
  score_scale = None  # the run's sampling.score_scale (1, none, in every config here)
  if FLAGS.score_scale is not None or scale_interval is not None:
    if FLAGS.score_scale is None and float(config.sampling.score_scale) == 1.0:
      raise app.UsageError("--score_scale_interval says where to scale the score, but the "
                           "run's sampling.score_scale is 1 (none): pass --score_scale S "
                           "too (e.g. --score_scale 2 --score_scale_interval 0.1,1)")
    score_scale = (config.sampling.score_scale if FLAGS.score_scale is None
                   else FLAGS.score_scale,
                   scale_interval or tuple(config.sampling.score_scale_interval))
  from scoreflow_jax import generate
  with usage_errors():
    generate.sample_from_run(
        FLAGS.workdir, FLAGS.out, step=FLAGS.step, sampler=FLAGS.sampler,
        num_steps=FLAGS.num_steps, cfg_scale=FLAGS.cfg_scale, classes=classes,
        num_per_class=FLAGS.num_per_class, seed=FLAGS.seed,
        use_ema=FLAGS.ema and not replaced, batch_size=FLAGS.batch_size,
        cfg_interval=interval, average_from=FLAGS.average_from,
        posthoc_ema=FLAGS.posthoc_ema, overwrite=FLAGS.overwrite,
        low_noise_workdir=FLAGS.low_noise_workdir, low_noise_step=FLAGS.low_noise_step,
        switch_sigma=FLAGS.switch_sigma, score_scale=score_scale)


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main)
