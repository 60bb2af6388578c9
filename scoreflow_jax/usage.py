"""A user's errors in the scripts (sample.py, evaluate.py, train_classifier.py,
bits_per_dim.py, train_autoencoder.py, train.py): one message in the
script's own flags, no traceback, no page of --help (``run``).

train.py uses ``usage_errors`` for the config check before a run starts and
``training_errors`` for the rest: a missing data file or checkpoint is told
in one line, while errors from the model keep their tracebacks (they may
come from a model being changed, where the traceback is what a researcher
needs).
"""
import contextlib
import os
import re
import sys
import traceback

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


def run(main, argv=None):
  """``app.run(main)`` where a user's error is one message on stderr:

  * an ``app.UsageError`` from ``main`` prints ``error: MESSAGE`` and exits 1
    (absl's own prints the script's whole --help before it);
  * a ``--config.FIELD=VALUE`` that names no field, or a value of the wrong
    type, is a flags error naming that flag (ml_collections raises it while
    the flags are parsed, which absl reported as a traceback). An error
    raised in the config file's own ``get_config`` keeps its traceback.
  """
  def parse(args):
    try:
      return app.parse_flags_with_usage(args)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      named = [a for a in args[1:] if a.startswith("--config.")]
      if not named or any(frame.name == "get_config"
                          for frame in traceback.extract_tb(e.__traceback__)):
        raise
      text = " ".join(_innermost_message(e).split())
      bad = next((a for a in reversed(named) if any(
          re.search(r"\b" + re.escape(part) + r"\b", text)
          for part in a.split("=", 1)[0].split(".")[1:])), None)
      sys.stderr.write(f"FATAL Flags parsing error: {bad + ': ' if bad else ''}{text}\n"
                       "(a --config.* flag sets a field of the config file: check its "
                       "name and value type)\n")
      sys.exit(1)

  def main_with_message(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(e.exitcode)

  app.run(main_with_message, argv=argv, flags_parser=parse)


def _innermost_message(e: BaseException) -> str:
  """The text of ``e``, unwrapped from exceptions raised with an exception as
  their message (ml_collections' AttributeError(KeyError("'x'\\nDid you mean"))),
  without the quotes KeyError puts around it."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if len(e.args) == 1 else str(e)


def check_data_flags(source, data_dir):
  """The scripts' --source/--data_dir: offline MNIST needs its folder."""
  if source == "offline" and not data_dir:
    raise app.UsageError("--source offline needs --data_dir, the folder of"
                         " MNIST's four IDX files (or use --source tfds).")


@contextlib.contextmanager
def usage_errors(script_flags=True, is_users=None, hint=""):
  """Re-raises a user's error as ``app.UsageError`` in the script's flags.

  The user's errors are ``USER_ERRORS``, ``checkpointing.CheckpointError`` and
  any error whose message carries a ``--config.data.`` hint (data.py's TFDS
  errors), or those ``is_users(e)`` accepts; ``app.run`` prints their message
  (and ``hint``) without a traceback. Other errors (bugs) keep their
  traceback. ``script_flags=False`` keeps the hints as they are (train.py,
  whose flags they are). With the environment variable
  ``SCOREFLOW_TRACEBACK=1`` every error keeps its traceback: for a ValueError
  or OSError that is a bug (a model being changed) rather than a user's.
  """
  try:
    yield
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if (not (is_users or _is_users)(e)
        or os.environ.get("SCOREFLOW_TRACEBACK", "0") not in ("", "0")):
      raise
    message = with_script_flags(str(e)) if script_flags else str(e)
    raise app.UsageError(message + hint) from e


# A field of train.py's config (config.training.batch_size, training.batch_size,
# --config.seed) or one of its flags named in a message: it says what to change.
_NAMES_A_FIELD = re.compile(
    r"(?<![\w.])((--)?config\.)?(data|model|training|optim|loss|ema|sampling)\.[a-z]\w*"
    r"|--(config|workdir|logdir|num_processes|process_id|coordinator_address)\b")
_MISSING = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError)


def training_errors():
  """train.py's run: an error that names its fix -- a missing or unreadable
  file (data, autoencoder weights), a checkpoint that does not fit, or any
  message naming a config field to change -- becomes one ``app.UsageError``
  line; anything else (a model's error) keeps its traceback, as does every
  error with ``SCOREFLOW_TRACEBACK=1``."""
  names_its_fix = lambda e: (isinstance(e, _MISSING) or _is_checkpoint_error(e)
                             or _NAMES_A_FIELD.search(str(e)) is not None)
  return usage_errors(script_flags=False, is_users=names_its_fix,
                      hint="\n(SCOREFLOW_TRACEBACK=1 shows where it was raised)")


def _is_checkpoint_error(e):
  # checkpointing (and orbax) are imported only where a checkpoint was read
  ckpt = sys.modules.get("scoreflow_jax.checkpointing")
  return ckpt is not None and isinstance(e, ckpt.CheckpointError)


def _is_users(e):
  return (isinstance(e, USER_ERRORS) or "--config.data." in str(e)
          or _is_checkpoint_error(e))
