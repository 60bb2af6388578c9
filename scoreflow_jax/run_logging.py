"""What a run shows: a progress line, TensorBoard events, metrics.jsonl, a loss curve."""
import json
import os
import time


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


class MetricWriter:
  """Scalars to TensorBoard (tensorboardX: no TensorFlow needed) and metrics.jsonl.

  Only the writing process (process 0) creates one; others use ``None``.
  """

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(logdir=workdir)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, scalars: dict):
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self):
    self.tb.close()


class Progress:
  """Steps/s, images/s and ETA over the last log interval."""

  def __init__(self, start_step: int, total_steps: int, global_batch: int):
    self.total = total_steps
    self.batch = global_batch
    self.last_step, self.last_time = start_step, time.perf_counter()

  def skip(self):
    """Leaves time since the last line (sampling, checkpoints) out of the rate."""
    self.last_time = time.perf_counter()

  def line(self, step: int, loss: float):
    now = time.perf_counter()
    dt = max(now - self.last_time, 1e-9)
    steps_per_s = (step - self.last_step) / dt
    self.last_step, self.last_time = step, time.perf_counter()
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    text = (f"step {step}/{self.total} | loss {loss:.4f} | {steps_per_s:.2f} steps/s "
            f"{steps_per_s * self.batch:.0f} img/s | ETA {format_duration(eta)}")
    return text, steps_per_s


def plot_loss_curve(jsonl_path: str, out_path: str, title: str = ""):
  """Loss (and per-sigma-bin loss) against step from metrics.jsonl, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in open(jsonl_path) if l.strip()]
  rows = [r for r in rows if "train/loss" in r]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = [r["step"] for r in rows]
  ax.plot(steps, [r["train/loss"] for r in rows], label="loss", color="k")
  for key in sorted(k for k in rows[0] if k.startswith("train/loss_sigma")):
    ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key[11:], alpha=0.6)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("EDM-weighted loss")
  ax.set_title(title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
