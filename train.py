"""Train a diffusion model: python train.py --config configs/mnist.py [--workdir DIR].

A new run's folder is --workdir, or --logdir/<timestamp>-<run_name> (default logs/).

--workdir pointing at an existing run resumes it from its latest checkpoint,
with the run's own saved config when --config is left out (that is
--config configs/run.py:DIR), fields changed as usual:
python train.py --workdir DIR --config.training.num_steps=N.
Multi-process (several hosts): --coordinator_address host:port
--num_processes N --process_id i, or --distributed where JAX detects the
cluster itself (TPU pods, SLURM); see docs/scaling.md.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (optional when "
                                "--workdir is a run to resume).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder; an existing run is resumed. "
                    "Default: <logdir>/<timestamp>-<run_name>.")
flags.DEFINE_string("logdir", "logs", "Parent folder of new runs.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "(auto-detects TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = FLAGS.config  # a run's saved one when --workdir is a run (with_run_config)
  if config is None:  # told before JAX starts
    raise app.UsageError(
        "give --config (e.g. --config configs/mnist.py), or --workdir of a run "
        "to resume with its own config" + (f" ({FLAGS.workdir} is not one: "
        + ("no configs/ inside)" if os.path.isdir(FLAGS.workdir) else
           "it does not exist)") if FLAGS.workdir else ""))
  from scoreflow_jax import distributed, trainer
  from scoreflow_jax.usage import training_errors, usage_errors
  with usage_errors(script_flags=False):
    distributed.maybe_initialize(FLAGS.distributed, FLAGS.coordinator_address,
                                 FLAGS.num_processes, FLAGS.process_id)
  with usage_errors(script_flags=False):  # bad values: one line, before any work
    model = trainer.validate_config(config)
  with training_errors():  # a missing data file: one line too
    trainer.train_and_evaluate(config, FLAGS.workdir, FLAGS.logdir, model=model)


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def with_run_config(argv):
  """``argv`` with ``--config configs/run.py:DIR`` added when it has no --config
  and --workdir DIR is a run: the run's saved config, which --config.* flags
  can then change (they exist only once a config file is named)."""
  workdir = _flag_value(argv, "workdir")
  has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
  if has_config or not workdir:
    return argv
  if not os.path.isdir(os.path.join(workdir, "configs")):
    if any(a.startswith("--config.") for a in argv):  # absl would only say "unknown flag"
      sys.exit(f"FATAL: --workdir {workdir} is not a run folder (no configs/ inside), "
               "so there is no config for the --config.* flags to change: give the "
               "run's folder to resume it, or --config (e.g. --config configs/mnist.py) "
               "for a new run.")
    return argv
  run_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "run.py")
  return argv[:1] + [f"--config={run_py}:{workdir}"] + argv[1:]


def check_config_flag(argv):
  """Refuses, in one line before the flags are parsed, a --config file that
  is not there (with the configs that are) and a variant of this project's
  configs they do not take (``:tinyy``; ml_collections would report both as
  a traceback inside a flags error). Returns ``argv``."""
  value = _flag_value(argv, "config")
  if value is None:
    return argv
  path, _, variant = value.partition(":")
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
  if not os.path.isfile(path):
    names = sorted(n for n in os.listdir(here) if n.endswith(".py")
                   and n not in ("__init__.py", "run.py"))
    rel = os.path.relpath(here)
    shown = here if rel.startswith("..") else rel
    sys.exit(f"FATAL: --config {path}: no such file (from {os.getcwd()}). The "
             f"configs in {shown}/: {', '.join(names)}; or --workdir RUN alone "
             "resumes a run with its own config.")
  if os.path.dirname(os.path.abspath(path)) == here:
    name = os.path.basename(path)
    try:
      if name == "run.py":  # the run's saved config: read it
        from configs import run  # pylint: disable=g-import-not-at-top
        run.get_config(variant)
      elif name != "default.py":
        from configs import default  # pylint: disable=g-import-not-at-top
        default.is_tiny(variant)
    except (OSError, ValueError) as e:
      sys.exit(f"FATAL: --config {value}: {e}")
  return argv


if __name__ == "__main__":
  from scoreflow_jax import usage
  usage.run(main, argv=with_run_config(check_config_flag(sys.argv)))
