"""Output files of the scripts: checked before any work, never silently replaced,
never left half-written; and which file a result came from (``file_sha256``)."""
import contextlib
import hashlib
import json
import os
import shutil


def check_output(path: str, overwrite: bool = False, what: str = "--out") -> str:
  """Returns ``path`` made absolute once it is safe to write there later.

  Raises before a script spends its time sampling or scoring: when ``path``
  is a folder, when its folder could not be made or written to, or when a
  file is already there and ``overwrite`` is off (results a user had, such as
  a 10k-sample .npz or a trained classifier, are not replaced unasked).
  Makes nothing: a missing folder is made by ``replaced_when_done`` at the
  write, so that a script stopped by a later check leaves no empty folders.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{what} {path} is a folder; give a file name inside it.")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it, or "
                          "choose another path. Nothing was written.")
  parent = os.path.dirname(path)
  existing = parent
  while not os.path.exists(existing):  # the nearest folder that exists
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{what} {path}: {existing} is a file, so the folder "
                             f"{parent} cannot be made there.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{what} {path}: the folder {existing} is not writable.")
  return path


def paired_outputs(out: str, overwrite: bool = False):
  """The grid PNG and the samples .npz that ``out`` (either one) names.

  Checked before sampling (``check_output``): an existing file is refused
  unless ``overwrite``, so an expensive .npz is never replaced unasked.
  No JAX: sample.py checks them before JAX starts.
  """
  base, ext = os.path.splitext(out)
  if ext.lower() not in (".png", ".npz"):
    raise ValueError(f"--out {out} must end in .png (the grid) or .npz (the samples); "
                     "both are written, side by side")
  return tuple(check_output(base + e, overwrite) for e in (".png", ".npz"))


@contextlib.contextmanager
def replaced_when_done(path, mode: str = "wb"):
  """Opens a temporary file beside ``path`` (its folder made if missing) and
  moves it onto ``path`` once the ``with`` block ends without an error: a
  write cut short (an error, a kill, a full disk) leaves ``path`` as it was
  and no half-written file a rerun would refuse to replace. A symbolic link's
  target is what is replaced (the link stays)."""
  path = os.path.realpath(os.fspath(path))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  part = f"{path}.{os.getpid()}.part"
  try:
    with open(part, mode) as f:
      yield f
    if os.path.exists(path):  # a replaced file keeps its permissions
      shutil.copymode(path, part)
    os.replace(part, path)
  finally:
    if os.path.exists(part):
      os.remove(part)


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
    with replaced_when_done(path, "w") as f:
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
