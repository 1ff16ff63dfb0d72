"""Index directories: atomic writes and a verified manifest.

Every saved index is a directory holding ``manifest.json`` and its files. The manifest records
the index kind, descriptor dimension, row count, descriptor model id, and the size and sha256
of every file (sub-directories that carry their own manifest, such as shards, are pinned by the
sha256 of that manifest instead). Loading re-hashes the files and refuses any mismatch with a
``ValueError`` naming the file, so a truncated copy, a swapped file or an index built for
another model never answers queries silently.

Writes go to a temporary sibling directory that is renamed into place only when complete, so a
crash leaves either the old index or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retrieval_jax._atomic import give_default_mode

FORMAT = "retrieval_jax.search"
VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.json"


def check_ids_metadata(n: int, ids, metadata) -> tuple[np.ndarray, list[str] | None]:
  """Validates ``N`` user ids (default ``arange(N)``, unique integers) and ``N`` metadata."""
  if ids is None:
    ids = np.arange(n, dtype=np.int64)
  else:
    ids = np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be {n} integers (one per descriptor row); got dtype "
                       f"{ids.dtype} and shape {ids.shape}.")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != n:
      raise ValueError("ids must be unique; got repeated values.")
  if metadata is not None:
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence):
      raise ValueError(f"metadata must be a sequence of {n} strings (e.g. image paths); got "
                       f"{type(metadata).__name__}.")
    metadata = [str(m) for m in metadata]
    if len(metadata) != n:
      raise ValueError(f"metadata must have one entry per descriptor row ({n}); got "
                       f"{len(metadata)}.")
  return ids, metadata


def sha256_file(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _pinned_files(root: Path) -> dict[str, dict]:
  """Size and sha256 of every file under ``root`` except inside self-manifested sub-dirs."""
  files = {}
  for dirpath, dirnames, filenames in os.walk(root):
    here = Path(dirpath)
    if here != root and (here / MANIFEST).exists():
      dirnames.clear()
      rel = (here / MANIFEST).relative_to(root).as_posix()
      files[rel] = {"bytes": (here / MANIFEST).stat().st_size,
                    "sha256": sha256_file(here / MANIFEST)}
      continue
    dirnames.sort()
    for name in sorted(filenames):
      if here == root and name == MANIFEST:
        continue
      path = here / name
      files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size,
                                                  "sha256": sha256_file(path)}
  return files


def write_index(directory, *, kind: str, dim: int, count: int, model_id: str,
                ids: np.ndarray, metadata: list[str] | None,
                arrays: dict[str, np.ndarray] | None = None, extra: dict | None = None,
                populate: Callable[[Path], None] | None = None) -> Path:
  """Writes an index directory atomically (temporary sibling, then rename) and returns it.

  ``arrays`` are saved as ``<name>.npy``; ``populate(tmp_dir)`` may add more files (a ScaNN
  searcher, shard directories) before the manifest is computed. An existing ``directory`` is
  replaced only if it is empty or itself an index (holds a manifest).
  """
  directory = Path(directory)
  if directory.exists() and not (directory / MANIFEST).exists() and any(directory.iterdir()):
    raise ValueError(f"{directory} exists and is not an index directory (no {MANIFEST}); "
                     f"refusing to overwrite it.")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    np.save(tmp / IDS_FILE, np.asarray(ids, np.int64), allow_pickle=False)
    if metadata is not None:
      (tmp / METADATA_FILE).write_text(json.dumps(metadata))
    for name, array in (arrays or {}).items():
      np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    if populate is not None:
      populate(tmp)
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "dim": int(dim),
                "count": int(count), "model_id": str(model_id), **(extra or {}),
                "files": _pinned_files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    give_default_mode(tmp, directory=True)
    if directory.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
      os.rename(directory, old / "index")
      os.rename(tmp, directory)
      shutil.rmtree(old)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def verify_directory(directory, *, kind: str | None = None) -> dict:
  """Reads ``manifest.json`` and checks every pinned file's size and sha256; returns it."""
  directory = Path(directory)
  path = directory / MANIFEST
  if not directory.is_dir():
    raise ValueError(f"index directory {directory} does not exist.")
  if not path.is_file():
    raise ValueError(f"{path} is missing: {directory} is not a saved index.")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); the index is corrupted.") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} manifest.")
  if manifest.get("version") != VERSION:
    raise ValueError(f"{path} has format version {manifest.get('version')!r}; this library "
                     f"reads version {VERSION}.")
  if kind is not None and manifest.get("kind") != kind:
    raise ValueError(f"{path} describes a {manifest.get('kind')!r} index; expected {kind!r}.")
  for key in ("dim", "count", "model_id", "files"):
    if key not in manifest:
      raise ValueError(f"{path} lacks the field {key!r}; the index is corrupted.")
  for rel, entry in manifest["files"].items():
    file = directory / rel
    if not file.is_file():
      raise ValueError(f"{file} is listed in {path} but missing.")
    if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
      raise ValueError(f"{file} does not match its sha256 in {path} (corrupted or modified).")
  return manifest


def read_index(directory, *, kind: str, model_id: str | None = None,
               dim: int | None = None) -> tuple[dict, np.ndarray, list[str] | None]:
  """Verifies an index directory and returns ``(manifest, ids, metadata)``.

  ``model_id`` / ``dim``, when given, must equal the manifest's (an index of descriptors from
  another model, or of another width, is refused).
  """
  directory = Path(directory)
  manifest = verify_directory(directory, kind=kind)
  if model_id is not None and manifest["model_id"] != model_id:
    raise ValueError(f"{directory / MANIFEST} was built for descriptor model "
                     f"{manifest['model_id']!r}; expected model_id {model_id!r}.")
  if dim is not None and manifest["dim"] != dim:
    raise ValueError(f"{directory / MANIFEST} holds {manifest['dim']}-D descriptors; expected "
                     f"dim {dim}.")
  ids = np.load(directory / IDS_FILE, allow_pickle=False)
  if ids.shape != (manifest["count"],):
    raise ValueError(f"{directory / IDS_FILE} has shape {ids.shape}; the manifest says "
                     f"count {manifest['count']}.")
  metadata = None
  if (directory / METADATA_FILE).exists():
    metadata = json.loads((directory / METADATA_FILE).read_text())
  return manifest, ids, metadata


def load_array(directory, manifest: dict, name: str, *, mmap: bool = False) -> np.ndarray:
  """Loads ``<name>.npy`` (optionally memory-mapped), checking ``[count, dim]``."""
  path = Path(directory) / f"{name}.npy"
  array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
  if array.shape != (manifest["count"], manifest["dim"]):
    raise ValueError(f"{path} has shape {array.shape}; the manifest says "
                     f"[{manifest['count']}, {manifest['dim']}].")
  return array
