"""Output files of the scripts: checked before any work, never silently replaced;
and which file a result came from (``file_sha256``)."""
import hashlib
import json
import os


def check_output(path: str, overwrite: bool = False, what: str = "--out") -> str:
  """Returns ``path`` made absolute once it is safe to write there later.

  Raises before a script spends its time sampling or scoring: when ``path``
  is a folder, when its folder cannot be made or written to, or when a file
  is already there and ``overwrite`` is off (results a user had, such as a
  10k-sample .npz or a trained classifier, are not replaced unasked). Makes
  the parent folder.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{what} {path} is a folder; give a file name inside it.")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it, or "
                          "choose another path. Nothing was written.")
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OSError(f"{what} {path}: cannot make its folder ({e}).") from e
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"{what} {path}: the folder {parent} is not writable.")
  return path


def check_not_an_input(out, inputs):
  """Raises when ``out`` (a script's --out; None: its default) is one of the
  files ``inputs`` it reads, so that writing results cannot replace one."""
  if out is not None and os.path.realpath(out) in {os.path.realpath(p) for p in inputs}:
    raise ValueError(f"--out {out} is one of the inputs; name another results file.")


def results_path(out, default: str, overwrite: bool = False) -> str:
  """``check_output`` of ``out`` (a script's --out), or of ``default`` when
  ``out`` is None or empty."""
  if not out:
    return check_output(default, overwrite, "the default --out")
  return check_output(os.fspath(out), overwrite, "--out")


def write_json(path: str, obj, printed: str = "the results above were"):
  """Writes ``obj`` as JSON to ``path``, once its numbers were printed: a
  failing write says so (``printed``) and loses nothing."""
  try:
    with open(path, "w") as f:
      json.dump(obj, f, indent=2)
  except OSError as e:
    raise OSError(f"{printed} not written to {path}: {e}") from e


def file_sha256(path) -> str:
  """The sha256 of a file's bytes (hex): which classifier scored a result, or
  which autoencoder a run trained with, whatever their paths."""
  digest = hashlib.sha256()
  with open(os.fspath(path), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
