"""What a run shows: a progress line, TensorBoard events, metrics.jsonl, a loss
curve; and how a long run hears that it should stop (``recording_signals``)."""
import contextlib
import json
import os
import signal
import threading
import time
import warnings
from typing import Optional


def format_duration(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "unknown"
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


@contextlib.contextmanager
def recording_signals(received: list, signals=(signal.SIGTERM, signal.SIGINT)):
  """While in the block, ``signals`` are appended to ``received`` instead of
  ending the process, for the loop to stop at a step boundary and save. A
  second SIGINT (Ctrl-C twice) still interrupts at once. A signal the process
  ignores stays ignored (a job started with ``&`` from a script or with
  ``nohup`` ignores Ctrl-C, as the shell means it to). Nothing is installed
  outside the main thread, where Python cannot; the previous handlers are
  restored after (one set outside Python, ``None``, as the default)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  def handler(signum, frame):
    if signum == signal.SIGINT and signal.SIGINT in received:
      raise KeyboardInterrupt
    received.append(signum)
  previous = {}
  try:  # a signal named twice is installed once; one that fails, none left behind
    for s in dict.fromkeys(signals):
      if signal.getsignal(s) is not signal.SIG_IGN:
        previous[s] = signal.signal(s, handler)
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, signal.SIG_DFL if h is None else h)


class MetricWriter:
  """Scalars to TensorBoard (tensorboardX: no TensorFlow needed) and metrics.jsonl.

  Only the writing process (process 0) creates one; others use ``None``.
  A resumed run passes ``purge_step`` (its checkpoint's step + 1): TensorBoard
  then hides the earlier process's events from that step on, the steps lost
  to a stop between checkpoints that this process trains again (as
  ``_read_rows`` drops them from metrics.jsonl).
  """

  def __init__(self, workdir: str, purge_step: Optional[int] = None):
    from tensorboardX import SummaryWriter
    # tensorboardX names event files by the second and opens them "wb": the
    # pid keeps a process started in the same second from replacing one
    self.tb = SummaryWriter(logdir=workdir, purge_step=purge_step,
                            filename_suffix=f".{os.getpid()}")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    _end_last_line(self.jsonl_path)
    start = (purge_step or 1) - 1
    if os.path.isfile(self.jsonl_path) and any(
        r.get("step", -1) > start for r in _read_rows(self.jsonl_path)):
      # Rows past this start's step are of training that was thrown away; a
      # row at the start's step drops them in _read_rows, whichever steps
      # this start logs (another log_every would not log theirs again).
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps({"step": start, "event": "start"}) + "\n")

  def write(self, step: int, scalars: dict):
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self):
    self.tb.close()


class Progress:
  """Steps/s, images/s and ETA over the last log interval.

  ``time_left`` (optional, a callable giving seconds): a time limit that may
  end the run before ``total_steps``; the ETA is then the sooner of the two.
  """

  def __init__(self, start_step: int, total_steps: int, global_batch: int,
               time_left=None):
    self.total = total_steps
    self.batch = global_batch
    self.time_left = time_left
    self.last_step, self.last_time, self.excluded = start_step, time.perf_counter(), 0.0
    self.before = None

  def restart(self, step: int):
    """Counts steps and time from here (after the first, compiling step; a
    line at this very step reports the interval before, compilation and all)."""
    self.before = (self.last_step, self.last_time, self.excluded)
    self.last_step, self.last_time, self.excluded = step, time.perf_counter(), 0.0

  def exclude(self, seconds: float):
    """Leaves ``seconds`` spent on other work (sample grids, checkpoints,
    plots) out of the current interval's rate."""
    self.excluded += seconds

  def line(self, step: int, loss: float, bits_per_dim: Optional[float] = None):
    """The progress line and steps/s since the last line; ``bits_per_dim``
    (a run with loss.nll_weight) is shown after the loss."""
    now = time.perf_counter()
    if step == self.last_step and self.before is not None:
      self.last_step, self.last_time, self.excluded = self.before
    dt = max(now - self.last_time - self.excluded, 1e-9)
    steps_per_s = (step - self.last_step) / dt
    self.last_step, self.last_time, self.excluded = step, time.perf_counter(), 0.0
    self.before = None
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    limit = ""
    if self.time_left is not None and self.time_left() < eta:
      eta, limit = max(self.time_left(), 0.0), " (time limit)"
    nll = "" if bits_per_dim is None else f" | bits/dim {bits_per_dim:.3f}"
    text = (f"step {step}/{self.total} | loss {loss:.4f}{nll} | {steps_per_s:.2f} steps/s "
            f"{steps_per_s * self.batch:.0f} img/s | ETA {format_duration(eta)}{limit}")
    return text, steps_per_s


def _end_last_line(path: str):
  """Ends a file's last line if a write was cut short (a crash, a full disk),
  so that the next row is not glued to the fragment and lost with it."""
  if os.path.isfile(path) and os.path.getsize(path):
    with open(path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")


def _parse_rows(path: str):
  """Each line's dict; a line that is not JSON (the tail of a write cut short)
  is skipped with a warning instead of stopping every later read."""
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        warnings.warn(f"{path} line {number} is not JSON (a write cut short?): "
                      f"skipped: {line.strip()[:60]!r}")
  return rows


def _read_rows(path: str):
  """The rows of a metrics.jsonl, as dicts, without those of lost steps.

  The file is only appended to. A run stopped between checkpoints (killed,
  or a non-finite loss) logged steps past the checkpoint it resumes from,
  then trains and logs them again: a row below an earlier row's step drops
  the rows after its step, and one at the step of rows with the same keys
  replaces them, so each step has the row of the training that continued.
  """
  rows = _parse_rows(path)
  kept = []
  for row in rows:
    step = row.get("step")
    if step is not None:
      while kept and kept[-1].get("step", -1) > step:
        kept.pop()
      first = len(kept)
      while first and kept[first - 1].get("step") == step:
        first -= 1
      kept[first:] = [r for r in kept[first:] if set(r) != set(row)]
    kept.append(row)
  return kept


def _save_figure(fig, path):
  """The figure as a PNG at ``path``, replaced only once it is written whole."""
  from scoreflow_jax.outputs import replaced_when_done  # pylint: disable=g-import-not-at-top
  with replaced_when_done(path) as f:
    fig.savefig(f, format="png", dpi=100)


def plot_loss_curve(jsonl_path: str, out_path: str, title: str = ""):
  """Loss (and per-sigma-bin loss) against step from metrics.jsonl, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in _read_rows(jsonl_path) if "train/loss" in r]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = [r["step"] for r in rows]
  ax.plot(steps, [r["train/loss"] for r in rows], label="loss", color="k")
  # every bin any row has (a bin with no sample in an interval is not logged there)
  for key in sorted({k for r in rows for k in r if k.startswith("train/loss_sigma")}):
    ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key[11:], alpha=0.6)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("EDM-weighted loss")
  ax.set_title(title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save_figure(fig, out_path)
  plt.close(fig)


def read_metrics(path: str, key: str = "train/loss"):
  """``(steps, values, wall_s or None)`` of ``key`` from a run's metrics.jsonl.

  ``path`` is the file or the run folder holding it. ``wall_s`` is the
  seconds of training each row was logged at, data loading, a Gaussian
  base's fit and compilation included, summed over the processes of a
  resumed run; None when the run was logged before ``train/wall_s`` existed.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: pass a run folder made by train.py"
                            " (it writes metrics.jsonl) or the file itself.")
  all_rows = _read_rows(path)
  rows = [r for r in all_rows if key in r]
  if not rows:
    raise ValueError(f"{path} has no {key!r} rows; keys logged there:"
                     f" {sorted({k for r in all_rows for k in r})}.")
  wall = [r.get("train/wall_s") for r in rows]
  return ([r["step"] for r in rows], [r[key] for r in rows],
          None if None in wall else wall)


def last_wall_s(workdir: str, step: Optional[int] = None) -> float:
  """The last ``train/wall_s`` logged in ``workdir`` (0 if none), at or before
  ``step`` if given: where a run resumed from the checkpoint at ``step``
  continues its clock from (steps logged past it were lost)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = _read_rows(path) if os.path.isfile(path) else []
  return float(next((r["train/wall_s"] for r in reversed(rows) if "train/wall_s" in r
                     and (step is None or r.get("step", 0) <= step)), 0.0))


def plot_loss_curves(runs, out_path: str, x: str = "step", key: str = "train/loss",
                     title: str = ""):
  """One curve of ``key`` per run, against step or wall clock, as a PNG.

  ``runs`` maps a label to a run folder (or its metrics.jsonl). ``x="wall"``
  plots against minutes since each run started (needs ``train/wall_s``), the
  axis for equal-wall-clock comparisons.
  """
  if x not in ("step", "wall"):
    raise ValueError(f"x must be 'step' or 'wall', got {x!r}.")
  curves = {label: read_metrics(path, key) for label, path in runs.items()}
  if x == "wall":
    missing = [label for label, (_, _, wall) in curves.items() if wall is None]
    if missing:
      raise ValueError(f"run(s) {missing} have no train/wall_s in metrics.jsonl"
                       " (logged before it existed): plot them with x='step'.")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (steps, values, wall) in curves.items():
    ax.plot(steps if x == "step" else [w / 60 for w in wall], values, label=label,
            marker="." if len(steps) < 50 else None)  # a short run's points visible
  ax.set_yscale("log")
  ax.set_xlabel("step" if x == "step" else "wall clock (min, data, fit and compilation included)")
  ax.set_ylabel(key)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, out_path)
  plt.close(fig)
  return curves


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description="Loss curves of several runs in one PNG, e.g. python -m"
      " scoreflow_jax.run_logging --out curves.png unet=runs/unet flow=runs/flow")
  parser.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (or a metrics.jsonl)")
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("--x", default="step", choices=("step", "wall"),
                      help="step, or wall clock since each run started")
  parser.add_argument("--key", default="train/loss",
                      help="metric to plot, e.g. train/loss_sigma_0-0.1")
  parser.add_argument("--title", default="")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  from scoreflow_jax.outputs import check_output  # pylint: disable=g-import-not-at-top
  try:
    args.out = check_output(args.out, args.overwrite, "--out")
  except OSError as e:
    parser.exit(2, f"error: {e}\n")
  runs = {}
  for spec in args.runs:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      parser.error(f"runs are LABEL=RUN_FOLDER, got {spec!r}.")
    if label in runs:
      parser.error(f"label {label!r} given twice.")
    runs[label] = path
  try:
    curves = plot_loss_curves(runs, args.out, args.x, args.key, args.title)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  for label, (steps, values, wall) in curves.items():
    at = f", {wall[-1] / 60:.1f} min" if wall is not None else ""
    print(f"{label}: {len(steps)} points, last step {steps[-1]}{at}, last {args.key} {values[-1]:.4f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
