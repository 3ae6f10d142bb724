"""Workdir, records and catalogue paths that may be URLs (gs://bucket/run on a pod, ram:// in tests).

A pod run's workdir is a bucket: `os.path.abspath("gs://b/run")` would make a local folder named
`gs:`, and `open`/`os.makedirs` cannot reach it. Every file of a run's spine goes through these
few functions instead. They use `tf.io.gfile`, which serves local paths, gs:// and TensorFlow's
in-memory ram:// alike (`etils.epath` has no ram://, and orbax keeps its own epath for checkpoints).
"""
from __future__ import annotations

import builtins
import os
import re
import shutil
import tempfile
from typing import IO

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL ('gs://...', 'ram://...', any 'scheme://'): never a local folder."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path, or a URL exactly as given (abspath would turn gs://b into ./gs:/b)."""
  text = os.fspath(path)
  return text if is_remote(text) else os.path.abspath(text)


def join(path: str | os.PathLike, *parts: str) -> str:
  """os.path.join, which keeps 'scheme://' intact; a str for APIs that want one."""
  return os.path.join(os.fspath(path), *parts)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TF is heavy; only file I/O needs it)
  return tf.io.gfile


def open(path: str | os.PathLike, mode: str = "r", encoding: str = "utf-8") -> IO:  # pylint: disable=redefined-builtin
  """A file object; local files open natively (faster; text encodings honoured), URLs through gfile."""
  path = os.fspath(path)
  if not is_remote(path):
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": encoding}))
  return _gfile().GFile(path, mode)


def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.exists(path) if not is_remote(path) else _gfile().exists(path)


def size_and_mtime(path: str | os.PathLike) -> tuple[int, int] | None:
  """(bytes, modification time in ns) of a file, None if it cannot be read: what cache keys hash."""
  path = os.fspath(path)
  try:
    if not is_remote(path):
      st = os.stat(path)
      return st.st_size, st.st_mtime_ns
    st = _gfile().stat(path)
    return int(st.length), int(st.mtime_nsec)
  except Exception:  # pylint: disable=broad-except  # OSError locally; tf.errors.NotFoundError for URLs
    return None


def read_bytes(path: str | os.PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes data to a temporary sibling, then moves it over path: readers never see half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  replace(tmp, path)


def isdir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isdir(path) if not is_remote(path) else _gfile().isdir(path)


def makedirs(path: str | os.PathLike) -> None:
  """Creates path and its parents (exist_ok); object stores need none, gfile makes it a no-op there."""
  path = os.fspath(path)
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = True) -> None:
  """Fails (ValueError naming `what`) unless `path` can be written as a folder (`folder`; else a file), before
  any work is spent and without leaving anything behind: locally, a temporary file is made and removed in the
  nearest existing folder on the way; a bucket URL is only checked not to be in the way of a file."""
  path = os.fspath(path)
  if folder and exists(path) and not isdir(path):
    raise ValueError(f"{what}={path} is an existing file; pass a folder (created if missing)")
  if not folder and isdir(path):
    raise ValueError(f"{what}={path} is a folder; pass a file name")
  if is_remote(path):
    return
  existing = os.path.abspath(path if folder else os.path.dirname(path) or ".")
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is a file")
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"{what}={path} cannot be written: {type(e).__name__}: {e.strerror or e}") from e


def listdir(path: str | os.PathLike) -> list[str]:
  """Entry names (no trailing '/', which gfile adds to folders on some filesystems)."""
  path = os.fspath(path)
  names = os.listdir(path) if not is_remote(path) else _gfile().listdir(path)
  return [n.rstrip("/") for n in names]


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves src over dst (atomic locally; a copy and delete on object stores)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_remote(src) or is_remote(dst):
    _gfile().rename(src, dst, overwrite=True)
  else:
    os.replace(src, dst)


def remove(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  os.remove(path) if not is_remote(path) else _gfile().remove(path)  # pylint: disable=expression-not-assigned


def rmtree(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  shutil.rmtree(path) if not is_remote(path) else _gfile().rmtree(path)  # pylint: disable=expression-not-assigned


def copy_tree(local_dir: str, dst: str, *, last: str | None = None) -> None:
  """Copies a local folder's files to dst (e.g. a bucket), `last` after the rest.

  Object stores have no atomic folder rename: writing the completion marker (records.json) last
  keeps a half-copied folder from looking complete.
  """
  gfile = _gfile()
  names = sorted(n for n in os.listdir(local_dir) if n != last) + ([last] if last else [])
  gfile.makedirs(dst)
  for name in names:
    src = os.path.join(local_dir, name)
    if os.path.isdir(src):
      copy_tree(src, join(dst, name))
    else:
      gfile.copy(src, join(dst, name), overwrite=True)


def copy_tree_down(url: str, local_dir: str) -> None:
  """Copies the folder at url (files and subfolders) into a local folder, streaming each file: the
  inverse of `copy_tree`, for libraries that read local files only (ScaNN)."""
  os.makedirs(local_dir, exist_ok=True)
  for name in listdir(url):
    src, dst = join(url, name), os.path.join(local_dir, name)
    if isdir(src):
      copy_tree_down(src, dst)
    else:
      with open(src, "rb") as fin, builtins.open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 24)
