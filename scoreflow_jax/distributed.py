"""Multi-process start-up through JAX's own runtime (jax.distributed)."""
import os

import jax


def maybe_initialize(enabled=False, coordinator_address=None, num_processes=None,
                     process_id=None, cpu_collectives="gloo"):
  """Calls ``jax.distributed.initialize`` when the run is multi-process.

  Multi-process means: ``enabled`` (auto-detection: TPU pods, SLURM, ...), or an
  explicit ``coordinator_address`` with ``num_processes`` and ``process_id``
  (flags or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  environment variables). On CPU the collectives go through ``gloo``.
  Returns True if it initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES", "--num_processes")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID", "--process_id")
  if coordinator_address is None and not enabled:
    if (num_processes or 1) > 1 or (process_id or 0) > 0:
      # else each process would train alone as process 0 of 1, all of them
      # writing the same run folder
      raise ValueError(
          f"--num_processes {num_processes} / --process_id {process_id} (or "
          "JAX_NUM_PROCESSES / JAX_PROCESS_ID) need --coordinator_address "
          "HOST:PORT (process 0's; or JAX_COORDINATOR_ADDRESS), or --distributed "
          "where JAX finds the processes itself (TPU pods, SLURM)")
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs --num_processes and --process_id "
                     "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def _env_int(name, flag):
  """The integer in environment variable ``name``, or None if it is unset."""
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"the environment variable {name}={value!r} must be an integer "
                     f"(it stands in for {flag}): set it to one, or unset it") from None
