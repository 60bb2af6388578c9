"""A run's own config, as train.py saved it in the run folder's configs/.

train.py uses it when given --workdir of a run and no --config, so
python train.py --workdir logs/<run> [--config.training.num_steps=120000]
resumes the run as it was, or with the fields given changed; the long form is
--config configs/run.py:logs/<run>.
"""
from scoreflow_jax import run_config


def get_config(workdir=None):
  if not workdir:
    raise ValueError("configs/run.py needs the run folder after a colon: "
                     "--config configs/run.py:logs/<run>")
  return run_config.load(workdir)
