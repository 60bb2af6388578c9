"""Output files of the scripts: checked before any work, never silently replaced."""
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
