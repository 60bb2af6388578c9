import os

# Four virtual CPU devices for the data-parallel tests; must precede JAX's start.
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent XLA compilation cache for the session, its xdist workers and the
# scripts the tests start: the tiny models compile the same programs again and
# again (train.py subprocesses, one test file after another). It cut the suite's
# CPU time by a fifth here (24.3 -> 19.7 min user time). The conftest of the
# xdist controller makes it, the workers inherit it, and it is removed at the end;
# a JAX_COMPILATION_CACHE_DIR set beforehand is used and kept.
_xla_cache = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _xla_cache = tempfile.mkdtemp(prefix="scoreflow-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # all of them
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _xla_cache is not None:
    import shutil
    shutil.rmtree(_xla_cache, ignore_errors=True)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats (tight numerical checks), restoring after."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def terminal_sigint():
  """Python's own Ctrl-C handler for a test that sends SIGINT, restored after:
  a shell starts background jobs (``pytest ... &`` in a script) with SIGINT
  ignored, and the trainers rightly leave an ignored Ctrl-C ignored."""
  import signal
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
