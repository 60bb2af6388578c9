"""A user's errors in the scripts (evaluate.py, train_classifier.py,
bits_per_dim.py): one message in the script's own flags, no traceback."""
import contextlib
import re

from absl import app

# data.py's hints name train.py's config fields (--config.data.source=tfds);
# these scripts take --source and --data_dir.
_CONFIG_FLAGS = (
    (re.compile(r"--config\.data\.source=(\w+)"), r"--source \1"),
    (re.compile(r"--config\.data\.data_dir=(\S+?)(?=[.,;)]?(\s|$))"), r"--data_dir \1"),
    (re.compile(r"(?<![-\w.])config\.data\.data_dir\b"), "--data_dir"),
    (re.compile(r"(?<![-\w.])source='(\w+)'"), r"--source \1"),
)
# A missing, unreadable or misnamed file, a bad value, a missing package.
USER_ERRORS = (OSError, ValueError, ImportError)


def with_script_flags(message: str) -> str:
  """``message`` with data.py's ``--config.data.*`` hints in these scripts'
  flags: ``--source tfds``, ``--data_dir DIR``."""
  for pattern, flag in _CONFIG_FLAGS:
    message = pattern.sub(flag, message)
  return message


@contextlib.contextmanager
def usage_errors():
  """Re-raises a user's error as ``app.UsageError`` in the script's flags.

  The user's errors are ``USER_ERRORS`` and any error whose message carries a
  ``--config.data.`` hint (data.py's TFDS errors); ``app.run`` prints their
  message without a traceback. Other errors (bugs) keep their traceback.
  """
  try:
    yield
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, USER_ERRORS) and "--config.data." not in str(e):
      raise
    raise app.UsageError(with_script_flags(str(e))) from e
