"""Loss curves of several runs: the metrics reader and the comparison plot."""
import json
import os
import signal
import threading

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
  assert "bits/dim" not in text


def test_progress_shows_the_nll_terms_bits_per_dim():
  # a run with loss.nll_weight: its bits/dim after the loss
  text, _ = run_logging.Progress(20, 1000, 8).line(30, 0.5, bits_per_dim=4.2346)
  assert text.startswith("step 30/1000 | loss 0.5000 | bits/dim 4.235 | "), text


def test_progress_rate_leaves_out_the_first_step_and_other_work(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(run_logging.time, "perf_counter", lambda: now[0])
  progress = run_logging.Progress(0, 1000, 8)
  now[0] = 130.0  # the first step compiled for 30 s
  progress.restart(1)
  now[0] = 139.0  # steps 2..10 in 9 s (the old rate: 10 steps since the compile's end)
  assert progress.line(10, 0.5)[1] == 1.0
  now[0] = 144.0  # 5 steps, then a 3-s sample grid, then 5 steps: 10 steps in 10 s
  progress.exclude(3.0)
  now[0] = 152.0
  assert progress.line(20, 0.5)[1] == 1.0
  now[0] = 162.0  # excluded time counts in its interval only
  assert progress.line(30, 0.5)[1] == 1.0
  # a line at the first step itself (log_every=1) reports that step, compilation and all
  progress = run_logging.Progress(0, 1000, 8)
  now[0] = 192.0
  progress.restart(1)
  text, rate = progress.line(1, 0.5)
  assert rate == 1 / 30 and "ETA 8:19:30" in text  # 999 steps at 1/30 per s


def test_rows_of_a_thrown_away_start_are_dropped_whatever_it_logged(tmp_path):
  # interrupted at step 15 after the checkpoint at 10, resumed logging every 5:
  # the lost rows 12 and 14 are logged by no later start
  path = tmp_path / "metrics.jsonl"
  _write(path, [{"step": s, "train/loss": 1.0} for s in (2, 4, 6, 8, 10, 12, 14)])
  w = run_logging.MetricWriter(str(tmp_path), purge_step=11)
  for s in (15, 20):
    w.write(s, {"train/loss": 0.5})
  w.close()
  assert run_logging.read_metrics(str(tmp_path))[0] == [2, 4, 6, 8, 10, 15, 20]
  # a fresh start in a folder without a checkpoint: none of the old rows count
  w = run_logging.MetricWriter(str(tmp_path), purge_step=1)
  w.write(5, {"train/loss": 0.25})
  w.close()
  assert run_logging.read_metrics(str(tmp_path))[0] == [5]
  # a plain resume (no rows past its step) adds no marker row
  lines = path.read_text().splitlines()
  w = run_logging.MetricWriter(str(tmp_path), purge_step=6)
  w.close()
  assert path.read_text().splitlines() == lines


def test_a_row_cut_short_is_skipped_and_the_next_row_kept(tmp_path):
  # a crash or a full disk mid-write left half a row and no newline: the resume
  # must start (it raised JSONDecodeError) and its first row must not be glued on
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
  with pytest.warns(UserWarning, match="line 2 is not JSON"):
    w = run_logging.MetricWriter(str(tmp_path), purge_step=2)
    w.write(2, {"train/loss": 0.5})
    w.close()
    assert run_logging.read_metrics(str(tmp_path))[:2] == ([1, 2], [1.0, 0.5])


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


def test_loss_curve_plots_every_sigma_bin_any_row_has(tmp_path, monkeypatch):
  # a bin with no sample in the first interval is not in the first row
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.axes import Axes
  labels, plot = [], Axes.plot
  def recording(self, *args, **kwargs):
    labels.append(kwargs.get("label"))
    return plot(self, *args, **kwargs)
  monkeypatch.setattr(Axes, "plot", recording)
  _write(tmp_path / "metrics.jsonl", [
      {"step": 10, "train/loss": 0.5, "train/loss_sigma_0-0.1": 0.4},
      {"step": 20, "train/loss": 0.4, "train/loss_sigma_0-0.1": 0.3,
       "train/loss_sigma_10-80": 0.9}])
  run_logging.plot_loss_curve(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))
  assert labels == ["loss", "sigma_0-0.1", "sigma_10-80"]
  assert Image.open(tmp_path / "c.png").size == (600, 400)


def test_a_lost_row_right_after_the_checkpoint_is_dropped_and_the_curve_plots(tmp_path):
  # checkpoint at 10, killed after logging 11 and 12; the resume logs every 5
  path = tmp_path / "metrics.jsonl"
  _write(path, [{"step": s, "train/loss": 1.0} for s in (9, 10, 11, 12)])
  w = run_logging.MetricWriter(str(tmp_path), purge_step=11)
  w.write(15, {"train/loss": 0.5})
  w.close()
  assert run_logging.read_metrics(str(tmp_path))[0] == [9, 10, 15]
  # the start's marker row has no loss: the trainer's loss curve still plots
  run_logging.plot_loss_curve(str(path), str(tmp_path / "c.png"))
  assert Image.open(tmp_path / "c.png").size == (600, 400)


def test_progress_line_images_per_second_and_an_unknown_eta(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(run_logging.time, "perf_counter", lambda: now[0])
  progress = run_logging.Progress(0, 100, 8)
  now[0] = 110.0
  text, _ = progress.line(10, 0.5)
  assert "1.00 steps/s 8 img/s" in text, text
  assert run_logging.format_duration(float("inf")) == "unknown"
  text, _ = progress.line(10, 0.5)  # no step since the last line: no rate, no crash
  assert text.endswith("ETA unknown"), text


def test_wall_clock_axis_is_in_minutes(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.axes import Axes
  xs, plot = [], Axes.plot
  def recording(self, x, *args, **kwargs):
    xs.append(list(x))
    return plot(self, x, *args, **kwargs)
  monkeypatch.setattr(Axes, "plot", recording)
  _write(tmp_path / "m.jsonl", [{"step": 1, "train/loss": 1.0, "train/wall_s": 60.0},
                                {"step": 2, "train/loss": 0.9, "train/wall_s": 180.0}])
  run_logging.plot_loss_curves({"a": str(tmp_path / "m.jsonl")}, str(tmp_path / "c.png"),
                               x="wall")
  assert xs == [[1.0, 3.0]]


def test_a_figure_cut_short_keeps_the_old_png(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  _write(tmp_path / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}])
  (tmp_path / "c.png").write_bytes(b"old curve")
  def cut_short(self, f, **kwargs):
    f.write(b"half")
    raise OSError("disk full")
  monkeypatch.setattr(Figure, "savefig", cut_short)
  with pytest.raises(OSError, match="disk full"):
    run_logging.plot_loss_curve(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").read_bytes() == b"old curve"
  assert sorted(os.listdir(tmp_path)) == ["c.png", "metrics.jsonl"]


def test_stop_signals_are_recorded_and_a_second_ctrl_c_interrupts(terminal_sigint):
  # SIGTERM and a first SIGINT are recorded (training stops at the next step,
  # saved); a second Ctrl-C interrupts at once (a hung step can be left);
  # the handlers are restored after.
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  both = (signal.SIGTERM, signal.SIGINT)
  received = []
  with run_logging.recording_signals(received, both):
    os.kill(os.getpid(), signal.SIGTERM)
    try:  # after a SIGTERM: still the first Ctrl-C, recorded
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pytest.fail("a first Ctrl-C after a SIGTERM interrupted training unsaved")
    assert received == [signal.SIGTERM, signal.SIGINT]
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
  received = []
  with pytest.raises(KeyboardInterrupt):
    with run_logging.recording_signals(received, both):
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
  assert received == [signal.SIGINT]
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_recording_signals_default_and_ignored_signals_and_outside_handlers(terminal_sigint):
  # both trainers' use: SIGTERM and a first Ctrl-C recorded (Ctrl-C as in a
  # terminal: the fixture installs Python's handler and restores it after)
  before = signal.getsignal(signal.SIGTERM)
  received = []
  with run_logging.recording_signals(received):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert received == [signal.SIGTERM, signal.SIGINT]
  # a job started with `&` from a script (or nohup) ignores Ctrl-C: it stays
  # ignored, not recorded (the shell's Ctrl-C is not meant for it)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  received = []
  with run_logging.recording_signals(received):
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM]
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  assert signal.getsignal(signal.SIGTERM) == before
  # a handler set outside Python (getsignal: None) comes back as the default
  original = signal.signal
  calls = []
  def fake_signal(s, h):
    calls.append((s, h))
    return None if len(calls) == 1 else original(s, h)
  try:
    signal.signal = fake_signal
    with run_logging.recording_signals([], (signal.SIGTERM,)):
      pass
  finally:
    signal.signal = original
    signal.signal(signal.SIGTERM, before)
  assert calls[-1] == (signal.SIGTERM, signal.SIG_DFL)


def test_recording_signals_installs_nothing_outside_the_main_thread():
  # Python allows handlers only in the main thread: a trainer run from another
  # thread (a notebook's worker, a test harness) runs without them, unchanged.
  before = signal.getsignal(signal.SIGTERM)
  seen, errors = [], []
  def run():
    try:
      with run_logging.recording_signals(seen):
        seen.append(signal.getsignal(signal.SIGTERM))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  t = threading.Thread(target=run)
  t.start()
  t.join()
  assert not errors, errors
  assert seen == [before]


def test_recording_signals_named_twice_or_failing_leaves_no_handler_behind():
  # a signal named twice is installed once (else its own handler would be
  # "restored"); a signal that cannot be installed restores those before it
  before = signal.getsignal(signal.SIGTERM)
  with run_logging.recording_signals([], (signal.SIGTERM, signal.SIGTERM)):
    pass
  assert signal.getsignal(signal.SIGTERM) == before
  with pytest.raises((ValueError, OSError)):  # SIGKILL cannot be caught
    with run_logging.recording_signals([], (signal.SIGTERM, signal.SIGKILL)):
      pass
  assert signal.getsignal(signal.SIGTERM) == before
