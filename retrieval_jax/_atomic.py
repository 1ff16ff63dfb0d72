"""Atomic writes: a temporary sibling is written in full, then renamed over the target.

A reader never sees a half-written file, and a crash leaves the previous version (or nothing)
in place. ``tempfile`` creates its files ``0600`` and directories ``0700``; the result is given
the permissions an ordinary ``open`` or ``mkdir`` would have (``0666`` / ``0777`` less the
umask), so a report or index written here is as readable as any other output.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np


def _umask() -> int:
  # Linux reports the umask without changing it; os.umask(0) would open a window in which
  # another thread (orbax saves in the background) creates world-writable files.
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def give_default_mode(path: str | os.PathLike, *, directory: bool = False) -> None:
  """Sets ``path`` to the mode ``open``/``mkdir`` would have given it under the umask."""
  os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], None],
                 mode: str = "wb") -> None:
  """Calls ``write(f)`` on a temporary file beside ``path`` (opened with ``mode``), then
  renames it to ``path``; on any error the temporary file is removed and ``path`` untouched."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp", delete=False) as f:
    try:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      f.close()
      os.unlink(f.name)
      raise
  give_default_mode(f.name)
  os.replace(f.name, path)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes ``value`` as indented JSON, atomically."""
  write_atomic(path, lambda f: json.dump(value, f, indent=2), "w")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as ``.npy`` (no pickled objects), atomically."""
  write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
