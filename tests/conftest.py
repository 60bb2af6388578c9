import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats (tight numerical checks), restoring after."""
  with jax.enable_x64(True):
    yield
