"""A run's own config, as train.py saved it in the run folder's configs/.

Resume a run with some fields changed (the others as the run had them):
python train.py --config configs/run.py:logs/<run> --workdir logs/<run> \
  --config.training.num_steps=120000
(`python train.py --workdir logs/<run>` alone resumes it unchanged.)
"""
from scoreflow_jax import generate


def get_config(workdir=None):
  if not workdir:
    raise ValueError("configs/run.py needs the run folder after a colon: "
                     "--config configs/run.py:logs/<run>")
  return generate.load_run_config(workdir)
