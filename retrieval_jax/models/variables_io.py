"""Saving and restoring Flax variables (``params``, ``batch_stats``) with orbax.

Saves are atomic: orbax writes into a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint where a good one was expected.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_variables(directory: str | os.PathLike, variables: Any, *, force: bool = False) -> None:
  """Writes a pytree of arrays (e.g. ``{"params": ..., "batch_stats": ...}``) to ``directory``.

  Args:
    directory: a path that must not exist yet (unless ``force``); it is created.
    variables: the pytree; leaves are converted to numpy first, so device arrays of any
      sharding are saved as plain host arrays.
    force: replace an existing checkpoint at ``directory``.
  """
  path = pathlib.Path(directory).absolute()
  if path.exists() and not force:
    raise ValueError(f"directory {path} already exists; pass force=True to replace it.")
  host = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, host, force=force)


def load_variables(directory: str | os.PathLike) -> Any:
  """Restores what :func:`save_variables` wrote, as numpy arrays on the host.

  Raises ``ValueError`` naming the directory when it is missing or is not an orbax checkpoint.
  """
  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise ValueError(f"directory {path} does not exist or is not a directory; expected a "
                     f"checkpoint written by save_variables.")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path)
  except (FileNotFoundError, ValueError, KeyError) as err:
    raise ValueError(f"directory {path} is not a readable orbax checkpoint: {err}") from err
  return jax.tree_util.tree_map(np.asarray, restored)
