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
