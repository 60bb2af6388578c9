"""Loss curves of several runs: the metrics reader and the comparison plot."""
import json

import pytest
from PIL import Image

from scoreflow_jax import run_logging


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_metrics_rows_and_last_wall_clock(tmp_path):
  _write(tmp_path / "metrics.jsonl", [
      {"step": 100, "train/loss": 0.5, "train/wall_s": 10.0},
      {"step": 200, "train/loss": 0.4, "train/wall_s": 20.0},
      {"step": 200, "eval/other": 1.0},  # rows without the key are skipped
  ])
  steps, values, wall = run_logging.read_metrics(str(tmp_path))
  assert (steps, values, wall) == ([100, 200], [0.5, 0.4], [10.0, 20.0])
  assert run_logging.last_wall_s(str(tmp_path)) == 20.0
  assert run_logging.last_wall_s(str(tmp_path / "new_run")) == 0.0


def test_steps_logged_past_the_checkpoint_a_run_resumed_from_are_dropped(tmp_path):
  # killed at step 250 after its checkpoint at 200: the rows of 220 and 240 were
  # lost, the resume logged 220 and 240 again, its clock continuing from 200's
  row = lambda step, wall: {"step": step, "train/loss": 1.0 / step, "train/wall_s": wall}
  _write(tmp_path / "metrics.jsonl", [
      row(180, 18.0), row(200, 20.0), {"step": 200, "eval/fd": 9.0}, row(220, 22.0),
      row(240, 24.0), row(220, 23.0), row(240, 25.0), row(260, 27.0)])
  assert run_logging.last_wall_s(str(tmp_path), step=200) == 20.0
  steps, _, wall = run_logging.read_metrics(str(tmp_path))
  assert (steps, wall) == ([180, 200, 220, 240, 260], [18.0, 20.0, 23.0, 25.0, 27.0])
  assert run_logging.read_metrics(str(tmp_path), "eval/fd")[:2] == ([200], [9.0])
  # a row at the same step and with the same keys replaces (one lost log, again)
  _write(tmp_path / "m2.jsonl", [row(200, 20.0), row(220, 22.0), row(220, 23.0)])
  assert run_logging.read_metrics(str(tmp_path / "m2.jsonl"))[2] == [20.0, 23.0]


def test_old_runs_have_no_wall_clock_and_plot_by_step(tmp_path):
  _write(tmp_path / "old.jsonl", [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.9}])
  _write(tmp_path / "new.jsonl", [{"step": 1, "train/loss": 1.0, "train/wall_s": 3.0}])
  assert run_logging.read_metrics(str(tmp_path / "old.jsonl"))[2] is None
  runs = {"old": str(tmp_path / "old.jsonl"), "new": str(tmp_path / "new.jsonl")}
  with pytest.raises(ValueError, match=r"\['old'\] have no train/wall_s.*x='step'"):
    run_logging.plot_loss_curves(runs, str(tmp_path / "c.png"), x="wall")
  curves = run_logging.plot_loss_curves(runs, str(tmp_path / "c.png"), x="step")
  assert curves["old"][1] == [1.0, 0.9] and Image.open(tmp_path / "c.png").size == (600, 400)


def test_bad_key_and_axis_are_named(tmp_path):
  _write(tmp_path / "m.jsonl", [{"step": 1, "train/loss": 1.0}])
  with pytest.raises(ValueError, match=r"no 'train/los' rows; keys logged there: \['step', 'train/loss'\]"):
    run_logging.read_metrics(str(tmp_path / "m.jsonl"), "train/los")
  with pytest.raises(ValueError, match="x must be 'step' or 'wall'"):
    run_logging.plot_loss_curves({"a": str(tmp_path / "m.jsonl")}, str(tmp_path / "c.png"), x="time")
  with pytest.raises(FileNotFoundError, match="run folder made by train.py"):
    run_logging.read_metrics(str(tmp_path / "missing"))


def test_progress_eta_counts_down_to_a_time_limit_that_comes_first(monkeypatch):
  clock = iter([100.0, 110.0, 110.0, 120.0, 120.0, 120.0, 130.0, 130.0])
  monkeypatch.setattr(run_logging.time, "perf_counter", lambda: next(clock))
  left = [30.0]
  progress = run_logging.Progress(0, 1000, 8, time_left=lambda: left[0])
  # 10 steps in 10 s: 990 s to go by steps, but the limit ends the run in 30 s
  text, rate = progress.line(10, 0.5)
  assert rate == 1.0 and text.endswith("| ETA 0:00:30 (time limit)"), text
  left[0] = 5000.0  # the steps end first: the plain ETA
  text, _ = progress.line(20, 0.5)
  assert text.endswith("| ETA 0:16:20"), text
  text, _ = run_logging.Progress(20, 1000, 8).line(30, 0.5)  # no limit
  assert text.endswith("| ETA 0:16:10"), text


def test_a_process_started_in_the_same_second_keeps_the_others_events(tmp_path, monkeypatch):
  # tensorboardX names event files by the second and opens them "wb"
  import os
  import time
  monkeypatch.setattr(time, "time", lambda: 1796000000.25)
  for pid in (101, 102):
    monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
    w = run_logging.MetricWriter(str(tmp_path), purge_step=5 if pid == 102 else None)
    w.write(pid, {"train/loss": 1.0})
    w.close()
  events = sorted(f for f in os.listdir(tmp_path) if f.startswith("events"))
  assert len(events) == 2 and all(os.path.getsize(tmp_path / f) > 0 for f in events)
