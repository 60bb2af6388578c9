import os

# Four virtual CPU devices for the data-parallel tests; must precede JAX's start.
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats (tight numerical checks), restoring after."""
  with jax.enable_x64(True):
    yield
