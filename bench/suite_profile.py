"""Where the test suite's time goes: XLA compilation, scripts run as
subprocesses, and the rest, per test and per file.

As a pytest plugin (from the repository root; any pytest flags):

  PYTHONPATH=bench python -m pytest -q -n auto --dist loadfile -p suite_profile
  python bench/suite_profile.py [suite_profile/] [--top 30]

Each process that runs tests (every xdist worker, or pytest itself without
xdist) writes ``<dir>/<pid>.json`` at its end (``SUITE_PROFILE_DIR``, default
``suite_profile``; a new run first removes the last one's files); the second
command sums them. Per test it records the
setup + call + teardown time pytest reports, the seconds JAX spent tracing,
lowering to MLIR and in XLA's backend compile (JAX's own monitoring events:
a module-scoped fixture's counts go to the test that first used it), the
compile time the persistent compilation cache saved, and the wall time of
the subprocesses it started (``train.py``, ``sample.py``, ...: their own
compiles are inside that, not in the compile columns).
"""
import collections
import json
import os
import subprocess
import sys
import time

_DIR = os.environ.get("SUITE_PROFILE_DIR", "suite_profile")
_EVENTS = {  # JAX monitoring event -> column
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/compilation_cache/compile_time_saved_sec": "cache_saved",
}
_tests = collections.defaultdict(collections.Counter)
_recording = False


def _current_test():
  return os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]


class _TimedPopen(subprocess.Popen):
  """Popen that adds its wall time, start to first exit seen, to the test."""

  def __init__(self, *args, **kwargs):
    self._profile_start = time.perf_counter()
    self._profile_test = _current_test()
    super().__init__(*args, **kwargs)

  def wait(self, timeout=None):
    counted = self.returncode is not None
    code = super().wait(timeout)
    if not counted and self._profile_test:
      row = _tests[self._profile_test]
      row["subprocess"] += time.perf_counter() - self._profile_start
      row["subprocesses"] += 1
    return code


def _runs_tests_here(config):
  # xdist's controller only relays its workers' reports: count them there once.
  return "PYTEST_XDIST_WORKER" in os.environ or getattr(config.option, "dist", "no") == "no"


def pytest_configure(config):
  # A new run's numbers only: the controller (or the one process) clears the
  # folder before any worker starts.
  if "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(_DIR):
    for name in os.listdir(_DIR):
      if name.endswith(".json"):
        os.remove(os.path.join(_DIR, name))


def pytest_sessionstart(session):
  global _recording
  _recording = _runs_tests_here(session.config)
  if not _recording:
    return
  # Imported here, after the tests' conftest has set JAX's environment.
  import jax.monitoring

  def on_duration(event, seconds, **kwargs):
    column = _EVENTS.get(event)
    if column:
      _tests[_current_test()][column] += seconds

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  subprocess.Popen = _TimedPopen


def pytest_runtest_logreport(report):
  if _recording:
    _tests[report.nodeid]["total"] += report.duration


def pytest_sessionfinish(session):
  if not _recording:
    return
  os.makedirs(_DIR, exist_ok=True)
  with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as f:
    json.dump({test: dict(row) for test, row in _tests.items()}, f)


# (field, heading, width) of the printed table
_COLUMNS = (("total", "total s", 8), ("trace", "trace", 6), ("lower", "lower", 6),
            ("compile", "compile", 7), ("subprocess", "subproc", 7), ("cache_saved", "saved", 6))


def summarise(folder, top=30):
  tests = collections.defaultdict(collections.Counter)
  names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
  if not names:
    sys.exit(f"no <pid>.json files in {folder}: run pytest with -p suite_profile first")
  for name in names:
    with open(os.path.join(folder, name)) as f:
      for test, row in json.load(f).items():
        tests[test].update(row)
  tests.pop("", None)  # events outside any test (collection, session hooks)
  files = collections.defaultdict(collections.Counter)
  for test, row in tests.items():
    files[test.split("::")[0]].update(row)
  header = " ".join(f"{heading:>{width}}" for _, heading, width in _COLUMNS)

  def line(row, name):
    return " ".join(f"{row[field]:{width}.1f}" for field, _, width in _COLUMNS) + f"  {name}"

  print(header + "  file")
  for name, row in sorted(files.items(), key=lambda kv: -kv[1]["total"]):
    print(line(row, name))
  everything = sum(files.values(), collections.Counter())
  print(line(everything, f"all {len(tests)} tests, {len(names)} process(es)"))
  jit = everything["trace"] + everything["lower"] + everything["compile"]
  if everything["total"]:
    print(f"tracing + lowering + XLA compile: {jit / everything['total']:.0%} of the tests' time; "
          f"subprocesses: {everything['subprocess'] / everything['total']:.0%} "
          f"({everything['subprocesses']:.0f} of them)")
  print(f"\n{header}  the {top} slowest tests")
  for name, row in sorted(tests.items(), key=lambda kv: -kv[1]["total"])[:top]:
    print(line(row, name))


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("folder", nargs="?", default=_DIR)
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  summarise(args.folder, args.top)
