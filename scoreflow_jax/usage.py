"""A user's errors in the scripts (sample.py, evaluate.py, train_classifier.py,
bits_per_dim.py): one message in the script's own flags, no traceback.

train.py uses it only for the config check before a run starts; errors from
training keep their tracebacks (they may come from a model being changed,
where the traceback is what a researcher needs).
"""
import contextlib
import os
import re
import sys

from absl import app

# data.py's hints name train.py's config fields (--config.data.source=tfds);
# these scripts take --source and --data_dir.
_CONFIG_FLAGS = (
    (re.compile(r"--config\.data\.source=(\w+)"), r"--source \1"),
    (re.compile(r"--config\.data\.data_dir=(\S+?)(?=[.,;)]?(\s|$))"), r"--data_dir \1"),
    (re.compile(r"(?<![-\w.])config\.data\.data_dir\b"), "--data_dir"),
    (re.compile(r"(?<![-\w.])source='(\w+)'"), r"--source \1"),
)
# A missing, unreadable or misnamed file, a bad value, a missing package; and
# a checkpoint that does not fit (checkpointing.CheckpointError, in _is_users).
USER_ERRORS = (OSError, ValueError, ImportError)


def with_script_flags(message: str) -> str:
  """``message`` with data.py's ``--config.data.*`` hints in these scripts'
  flags: ``--source tfds``, ``--data_dir DIR``."""
  for pattern, flag in _CONFIG_FLAGS:
    message = pattern.sub(flag, message)
  return message


def check_data_flags(source, data_dir):
  """The scripts' --source/--data_dir: offline MNIST needs its folder."""
  if source == "offline" and not data_dir:
    raise app.UsageError("--source offline needs --data_dir, the folder of"
                         " MNIST's four IDX files (or use --source tfds).")


@contextlib.contextmanager
def usage_errors(script_flags=True):
  """Re-raises a user's error as ``app.UsageError`` in the script's flags.

  The user's errors are ``USER_ERRORS``, ``checkpointing.CheckpointError`` and
  any error whose message carries a ``--config.data.`` hint (data.py's TFDS
  errors); ``app.run`` prints their message without a traceback. Other errors
  (bugs) keep their traceback. ``script_flags=False`` keeps the hints as they
  are (train.py, whose flags they are). With the environment variable
  ``SCOREFLOW_TRACEBACK=1`` every error keeps its traceback: for a ValueError
  or OSError that is a bug (a model being changed) rather than a user's.
  """
  try:
    yield
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not _is_users(e) or os.environ.get("SCOREFLOW_TRACEBACK", "0") not in ("", "0"):
      raise
    raise app.UsageError(with_script_flags(str(e)) if script_flags else str(e)) from e


def _is_users(e):
  # checkpointing (and orbax) are imported only where a checkpoint was read
  ckpt = sys.modules.get("scoreflow_jax.checkpointing")
  return (isinstance(e, USER_ERRORS) or "--config.data." in str(e)
          or (ckpt is not None and isinstance(e, ckpt.CheckpointError)))
