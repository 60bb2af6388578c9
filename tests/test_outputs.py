"""Output files: checked before any work, made only at the write, never half-written."""
import hashlib
import json
import os

import numpy as np
import pytest

from scoreflow_jax import generate, outputs


def test_check_output_makes_no_folder_and_the_write_does(tmp_path):
  # a script refused by a later check (a bad --classes) left empty folders behind
  path = tmp_path / "new" / "sub" / "grid.png"
  assert outputs.check_output(str(path)) == str(path)
  assert not (tmp_path / "new").exists()
  generate.save_png(np.zeros((4, 4, 1), np.uint8), str(path))
  assert path.is_file() and os.listdir(path.parent) == ["grid.png"]


def test_check_output_names_a_file_where_a_folder_would_go(tmp_path):
  (tmp_path / "taken").write_text("mine")
  with pytest.raises(NotADirectoryError, match="taken is a file"):
    outputs.check_output(str(tmp_path / "taken" / "sub" / "x.json"))


def test_a_write_cut_short_keeps_the_old_file_and_leaves_no_part(tmp_path):
  path = tmp_path / "results.json"
  outputs.write_json(str(path), {"fd": 1.0})
  # json.dump writes the first keys before it meets what it cannot encode:
  # writing in place left a truncated results.json
  with pytest.raises(TypeError):
    outputs.write_json(str(path), {"fd": 2.0, "bad": object()})
  assert json.loads(path.read_text()) == {"fd": 1.0}
  assert os.listdir(tmp_path) == ["results.json"]
  os.chmod(path, 0o600)  # a replaced file keeps its permissions
  outputs.write_json(str(path), {"fd": 1.0})
  assert os.stat(path).st_mode & 0o777 == 0o600
  with pytest.raises(RuntimeError):
    with outputs.replaced_when_done(str(path)) as f:
      f.write(b"half")
      raise RuntimeError("killed")
  assert json.loads(path.read_text()) == {"fd": 1.0}
  assert os.listdir(tmp_path) == ["results.json"]


def test_a_link_is_written_through(tmp_path):
  (tmp_path / "store").mkdir()
  os.symlink(tmp_path / "store" / "r.json", tmp_path / "r.json")
  outputs.write_json(str(tmp_path / "r.json"), {"fd": 3.0})
  assert os.path.islink(tmp_path / "r.json")
  assert json.loads((tmp_path / "store" / "r.json").read_text()) == {"fd": 3.0}


def test_sha256_reads_the_whole_file(tmp_path):
  head = b"x" * (1 << 20)  # classifiers differing only after the first MiB
  (tmp_path / "a").write_bytes(head + b"1")
  (tmp_path / "b").write_bytes(head + b"2")
  assert outputs.file_sha256(tmp_path / "a") == hashlib.sha256(head + b"1").hexdigest()
  assert outputs.file_sha256(tmp_path / "a") != outputs.file_sha256(tmp_path / "b")


def test_an_input_is_recognised_by_any_of_its_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "a.json").write_text("{}")
  os.symlink(tmp_path / "a.json", tmp_path / "link.json")
  for out in ("a.json", "./a.json", str(tmp_path / "a.json"), "link.json"):
    with pytest.raises(ValueError, match="is one of the inputs"):
      outputs.check_not_an_input(out, [str(tmp_path / "a.json")])
  outputs.check_not_an_input("b.json", ["a.json"])
  # an empty --out is the default, as None is
  assert outputs.results_path("", str(tmp_path / "d.json")) == str(tmp_path / "d.json")


def test_paired_outputs_refuses_the_npz_alone_and_names_either(tmp_path):
  (tmp_path / "mine.npz").write_bytes(b"10k samples")  # no mine.png beside it
  for out in ("mine.png", "mine.npz", "mine.PNG"):
    with pytest.raises(FileExistsError, match="mine.npz exists; pass --overwrite"):
      outputs.paired_outputs(str(tmp_path / out))
  assert (tmp_path / "mine.npz").read_bytes() == b"10k samples"
  png, npz = str(tmp_path / "mine.png"), str(tmp_path / "mine.npz")
  assert outputs.paired_outputs(png, overwrite=True) == (png, npz)
  # an upper-case extension names the pair too (os.path.splitext keeps its case)
  assert outputs.paired_outputs(str(tmp_path / "new.PNG")) == (
      str(tmp_path / "new.png"), str(tmp_path / "new.npz"))
  assert not os.path.exists(tmp_path / "new.png")
