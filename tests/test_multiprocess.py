"""Two local processes (jax.distributed, gloo CPU collectives) train like one; the
coordinator flags and environment that start them."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import mnist
from scoreflow_jax import distributed, trainer, train_step as ts

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tiny(num_steps):
  config = mnist.get_config("tiny")
  config.model.score_flow.update(gaussian_base=True, gaussian_components=2, gaussian_rank=4)
  config.training.update(num_steps=num_steps, log_every=3, checkpoint_every=3, image_every=0)
  return config


def _flat(state):
  return traverse_util.flatten_dict(ts.host(state.params), sep="/")


def test_two_processes_match_one(tmp_path):
  workdir, out = str(tmp_path / "mp_run"), str(tmp_path / "params")
  port = _free_port()
  t0 = time.perf_counter()
  # Both run with a one-hour time limit; process 1 reads its start two hours early.
  # Process 0 decides for both (each deciding alone, process 1 stopped at once
  # and process 0 waited for it in the next step's collectives until killed).
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), workdir, out, "6",
                             str(7200.0 * i)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  print(f"two-process phase: {time.perf_counter() - t0:.1f} s")
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  assert "2 processes" in logs[0] and "4 devices" in logs[0]
  assert all("Gaussian base fitted" in log for log in logs)

  single = trainer.train_and_evaluate(_tiny(6), str(tmp_path / "single"), log=lambda s: None)
  expected = _flat(single["state"])
  for i in range(2):
    got = dict(np.load(f"{out}.{i}.npz"))
    assert sorted(got) == sorted(expected)
    for k in expected:
      np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # only process 0 wrote logs and configs
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [3, 6]
  assert len(os.listdir(os.path.join(workdir, "configs"))) == 1

  # The two-process checkpoint resumes in one process (4 devices here): the
  # global batch is the invariant, so it continues like the single run.
  resumed = trainer.train_and_evaluate(_tiny(9), workdir, log=lambda s: None)
  straight = trainer.train_and_evaluate(_tiny(9), str(tmp_path / "single"), log=lambda s: None)
  a, b = _flat(resumed["state"]), _flat(straight["state"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_processes_without_a_coordinator_are_refused(monkeypatch):
  # else each would train alone as process 0 of 1, all writing one run folder
  import pytest
  from scoreflow_jax import distributed
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(ValueError, match="need --coordinator_address"):
    distributed.maybe_initialize(False, None, 2, 1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  with pytest.raises(ValueError, match="need --coordinator_address"):
    distributed.maybe_initialize()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert distributed.maybe_initialize() is False  # one process: nothing to start
  assert distributed.maybe_initialize(False, None, 1, 0) is False
  # a bad value is named (it was int()'s "invalid literal for int()")
  monkeypatch.setenv("JAX_PROCESS_ID", "x")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' must be an integer"):
    distributed.maybe_initialize()


def test_coordinator_flags_and_environment(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  # a process id alone (JAX_PROCESS_ID=1) would train alone as process 0 of 1
  with pytest.raises(ValueError, match="need --coordinator_address"):
    distributed.maybe_initialize(False, None, None, 1)
  # an address needs the count and the id, checked before anything starts
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    distributed.maybe_initialize(False, "127.0.0.1:1234", 2, None, cpu_collectives=None)
  assert calls == []
  # the environment stands in for every flag, the address included
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.maybe_initialize(cpu_collectives=None) is True
  assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]
