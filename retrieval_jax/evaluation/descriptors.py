"""Descriptor extraction for evaluation, and a float16 on-disk store that bounds its memory.

A million database images at D = 2048 are 8 GB of float32, so extraction never gathers them:
:func:`extract_to_store` runs the retriever on ``chunk_size`` images at a time and writes each
chunk's rows into a float16 ``.npy`` memory map (``np.lib.format.open_memmap``), created under a
temporary name and renamed into place once complete, so a crash never leaves a file that looks
finished. Reading goes through :class:`StoredDescriptors`, which streams row blocks back as
float32 (:meth:`StoredDescriptors.chunks`) or gathers chosen rows (:meth:`~StoredDescriptors.take`).
Descriptors are L2-normalised (entries in [-1, 1]), where float16 keeps ~3 decimal digits per
entry; a cosine similarity moves by about 1e-3 at most.

Several hosts: each process extracts the contiguous slice :func:`process_slice` gives it
(``jax.process_index()`` of ``jax.process_count()``) into its own shard file,
``<key>.shard<p>-of-<P>.npy``; :meth:`DescriptorStore.open` reads a complete set of shards in
order as one matrix. The store directory must be shared by the hosts.

Cache: the key (:func:`descriptor_key`) names the dataset, the role (database, queries, train),
the retriever (:func:`retriever_fingerprint`: a hash of its config and weights) and every
extraction setting that changes the numbers (scales, max size, crops). A complete shard set with
the expected number of rows under that key is reused instead of re-extracted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "DescriptorArray",
    "DescriptorStore",
    "ExtractionInfo",
    "ImageSubset",
    "StoredDescriptors",
    "descriptor_key",
    "extract_to_store",
    "process_slice",
    "retriever_fingerprint",
]

#: On-disk dtype of stored descriptors.
STORE_DTYPE = np.float16
_SHARD_RE = re.compile(r"\.shard(\d+)-of-(\d+)\.npy$")


# --------------------------------------------------------------------------- processes


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """``(index, count)``, each defaulting to jax's, validated."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  for name, value, low in (("process_count", count, 1), ("process_index", index, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
  if index >= count:
    raise ValueError(f"process_index must be < process_count = {count}; got {index}.")
  return int(index), int(count)


def process_slice(n: int, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """The contiguous rows ``[start, stop)`` of ``n`` that process ``p`` of ``P`` extracts.

  ``start = n * p // P``: the slices tile ``[0, n)`` in process order, sizes differing by at
  most one, so concatenating the shards in process order restores input order.
  """
  p, count = _process(process_index, process_count)
  return n * p // count, n * (p + 1) // count


class ImageSubset(Sequence):
  """A lazy view of chosen positions of an image sequence (no image is read or copied).

  Args:
    images: any image sequence (arrays, paths, a lazy TFDS source).
    positions: int ``[M]`` positions in ``images``.
  """

  def __init__(self, images: Sequence[Any], positions: Any):
    self.images = images
    self.positions = np.asarray(positions, dtype=np.int64).reshape(-1)

  @classmethod
  def range(cls, images: Sequence[Any], start: int, stop: int) -> ImageSubset:
    return cls(images, np.arange(start, stop))

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return ImageSubset(self.images, self.positions[i])
    return self.images[int(self.positions[i])]


# --------------------------------------------------------------------------- identity


def _config_json(config: Any) -> str:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.dumps(config, sort_keys=True, default=str)


def retriever_fingerprint(retriever: Any) -> str:
  """A 16-hex-digit hash of a retriever's class, config and variables (its weights).

  Two retrievers with the same fingerprint give the same descriptors, so it keys the cache.
  Hashing reads every weight once (about 0.2 s for a ResNet-50).

  Raises:
    ValueError: the object has no ``config`` and ``variables`` to hash; give the evaluation
      config a ``retriever_id`` instead.
  """
  config = getattr(retriever, "config", None)
  variables = getattr(retriever, "variables", None)
  if config is None or variables is None:
    raise ValueError(f"cannot fingerprint a {type(retriever).__name__}: it has no config and "
                     f"variables; set the evaluation config's retriever_id.")
  digest = hashlib.sha256(type(retriever).__qualname__.encode())
  digest.update(_config_json(config).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def descriptor_key(dataset_name: str, role: str, retriever_id: str, n: int,
                   **settings: Any) -> str:
  """A file-name-safe key: ``<dataset>.<role>.<hash>``, the hash over everything that changes
  the descriptors (retriever, dataset, role, image count and ``settings`` such as scales,
  max_size, crops)."""
  slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", dataset_name).strip("._") or "dataset"
  payload = json.dumps({"retriever": retriever_id, "dataset": dataset_name, "role": role,
                        "n": int(n), **settings}, sort_keys=True, default=str)
  return f"{slug}.{role}.{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------- reading


class DescriptorArray:
  """In-memory descriptors with the reading interface of :class:`StoredDescriptors`.

  Args:
    array: float ``[N, D]``; kept as float32.
  """

  def __init__(self, array: Any):
    self.array = np.asarray(array, dtype=np.float32)
    if self.array.ndim != 2:
      raise ValueError(f"array must be [N, D] descriptors; got shape {self.array.shape}.")

  @property
  def shape(self) -> tuple[int, int]:
    return self.array.shape

  def __len__(self) -> int:
    return self.shape[0]

  def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(start, float32 [<= rows, D])`` blocks in order."""
    for start in range(0, len(self), rows):
      yield start, self.array[start:start + rows]

  def take(self, indices: Any) -> np.ndarray:
    """float32 ``[*indices.shape, D]`` rows."""
    return self.array[np.asarray(indices)]

  def read(self) -> np.ndarray:
    """All rows, float32 ``[N, D]``."""
    return self.array


class StoredDescriptors:
  """Descriptor shards on disk read as one float32 ``[N, D]`` matrix, without loading it.

  Args:
    paths: ``.npy`` files in row order (a shard set); each is memory-mapped read-only.
  """

  def __init__(self, paths: Sequence[str | os.PathLike]):
    self.paths = [pathlib.Path(p) for p in paths]
    self._shards = [np.load(p, mmap_mode="r") for p in self.paths]
    dims = {a.shape[1] for a in self._shards if a.shape[0]}
    if len(dims) > 1 or any(a.ndim != 2 for a in self._shards):
      raise ValueError(f"shards {[str(p) for p in self.paths]} do not share one [rows, D] "
                       f"shape: {[a.shape for a in self._shards]}.")
    self._dim = dims.pop() if dims else 0
    self._offsets = np.cumsum([0] + [a.shape[0] for a in self._shards])

  @property
  def shape(self) -> tuple[int, int]:
    return int(self._offsets[-1]), self._dim

  def __len__(self) -> int:
    return self.shape[0]

  def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(start, float32 [<= rows, D])`` blocks in order (blocks never span shards)."""
    for offset, shard in zip(self._offsets, self._shards):
      for start in range(0, shard.shape[0], rows):
        yield int(offset + start), np.asarray(shard[start:start + rows], dtype=np.float32)

  def take(self, indices: Any) -> np.ndarray:
    """float32 ``[*indices.shape, D]`` rows, read from whichever shards hold them."""
    indices = np.asarray(indices, dtype=np.int64)
    flat = indices.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise ValueError(f"indices must lie in [0, {len(self)}); got [{flat.min()}, "
                       f"{flat.max()}].")
    out = np.empty((flat.size, self._dim), np.float32)
    shard_of = np.searchsorted(self._offsets, flat, side="right") - 1
    for s in np.unique(shard_of):
      mine = shard_of == s
      local = flat[mine] - self._offsets[s]
      # Sorted reads are sequential on disk; the memmap then copies only the rows asked for.
      order = np.argsort(local, kind="stable")
      rows = np.empty((local.size, self._dim), np.float32)
      rows[order] = self._shards[s][local[order]]
      out[mine] = rows
    return out.reshape(*indices.shape, self._dim)

  def read(self) -> np.ndarray:
    """All rows, float32 ``[N, D]`` (only for sets known to fit in memory)."""
    if not self._shards:
      return np.zeros((0, 0), np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32) for a in self._shards]).reshape(
        len(self), self._dim)


# --------------------------------------------------------------------------- writing


class _ShardWriter:
  """Writes ``[n, D]`` rows block by block into a float16 memmap, then renames it into place."""

  def __init__(self, path: pathlib.Path, n: int):
    self.path = path
    self.n = n
    self._tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    self._array: np.ndarray | None = None
    self.written = 0

  def write(self, start: int, block: Any) -> None:
    block = np.asarray(block)
    if block.ndim != 2 or start + block.shape[0] > self.n:
      raise ValueError(f"{self.path.name}: a block must be [rows, D] within the {self.n} rows; "
                       f"got {block.shape} at row {start}.")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
      stored = block.astype(STORE_DTYPE)
    bad = ~np.isfinite(stored).all(axis=1)
    if bad.any():
      raise ValueError(f"{self.path.name}: descriptor row {start + int(np.argmax(bad))} is not "
                       f"finite in float16 (descriptors should be L2-normalised).")
    if self._array is None:
      self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=STORE_DTYPE,
                                              shape=(self.n, block.shape[1]))
    elif block.shape[1] != self._array.shape[1]:
      raise ValueError(f"{self.path.name}: block width {block.shape[1]} differs from the "
                       f"first block's {self._array.shape[1]}.")
    self._array[start:start + block.shape[0]] = stored
    self.written += block.shape[0]

  def commit(self) -> StoredDescriptors:
    if self.written != self.n:
      raise ValueError(f"{self.path.name}: {self.written} of {self.n} rows were written.")
    if self._array is None:  # no rows: an empty [0, 0] shard
      with open(self._tmp, "wb") as f:
        np.save(f, np.zeros((0, 0), STORE_DTYPE))
    else:
      self._array.flush()
      self._array = None  # closes the map before the rename
    os.replace(self._tmp, self.path)
    return StoredDescriptors([self.path])

  def abort(self) -> None:
    self._array = None
    self._tmp.unlink(missing_ok=True)


class DescriptorStore:
  """A directory of descriptor shard sets, ``<key>.shard<p>-of-<P>.npy``.

  Args:
    directory: created if missing; shared by all hosts of a multi-host run.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)

  def shard_path(self, key: str, process_index: int, process_count: int) -> pathlib.Path:
    return self.directory / f"{key}.shard{process_index:03d}-of-{process_count:03d}.npy"

  def shard_sets(self, key: str) -> dict[int, dict[int, pathlib.Path]]:
    """``{process_count: {process_index: path}}`` of the shards present for ``key``."""
    sets: dict[int, dict[int, pathlib.Path]] = {}
    for path in self.directory.glob(f"{glob_escape(key)}.shard*-of-*.npy"):
      match = _SHARD_RE.search(path.name)
      if match and path.name[:match.start()] == key:
        sets.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    return sets

  def find(self, key: str, n: int | None = None,
           prefer_count: int | None = None) -> StoredDescriptors | None:
    """A complete shard set of ``key`` (with ``n`` rows if given), or None.

    Sets written with ``prefer_count`` processes are tried first.
    """
    sets = self.shard_sets(key)
    for count in sorted(sets, key=lambda c: (c != prefer_count, c)):
      if sorted(sets[count]) != list(range(count)):
        continue  # another host has not finished (or a run was cut short)
      stored = StoredDescriptors([sets[count][p] for p in range(count)])
      if n is None or len(stored) == n:
        return stored
    return None

  def open(self, key: str, n: int | None = None) -> StoredDescriptors:
    """The complete shard set of ``key``; raises a ValueError naming what is missing."""
    stored = self.find(key, n)
    if stored is None:
      present = {c: sorted(s) for c, s in self.shard_sets(key).items()}
      raise ValueError(f"no complete descriptor shard set for {key!r}"
                       f"{'' if n is None else f' with {n} rows'} in {self.directory}; shards "
                       f"present (process_count: indices): {present}.")
    return stored

  def writer(self, key: str, n: int, process_index: int = 0,
             process_count: int = 1) -> _ShardWriter:
    """A writer for shard ``process_index`` of ``key`` with ``n`` rows; call ``commit()``."""
    return _ShardWriter(self.shard_path(key, process_index, process_count), n)

  def write(self, key: str, n: int, blocks: Iterator[tuple[int, np.ndarray]]) -> StoredDescriptors:
    """Writes ``(start, rows)`` blocks covering ``[0, n)`` as a single shard; returns it."""
    writer = self.writer(key, n)
    try:
      for start, block in blocks:
        writer.write(start, block)
      return writer.commit()
    except BaseException:
      writer.abort()
      raise


def glob_escape(text: str) -> str:
  """``text`` with glob metacharacters escaped (keys may hold ``[`` from dataset names)."""
  return re.sub(r"([*?\[])", r"[\1]", text)


# --------------------------------------------------------------------------- extraction


@dataclasses.dataclass(frozen=True)
class ExtractionInfo:
  """What :func:`extract_to_store` did.

  Attributes:
    key: the store key.
    rows: ``(start, stop)`` rows this process covered.
    reused: whether existing files were reused instead of extracting.
    seconds: wall time.
    path: this process's shard file (None when a complete set was reused).
  """

  key: str
  rows: tuple[int, int]
  reused: bool
  seconds: float
  path: str | None


def extract_to_store(retriever: Any, images: Sequence[Any], store: DescriptorStore, key: str, *,
                     boxes: Any = None, max_size: int | None = None,
                     scales: Sequence[float] | None = None, batch_size: int | None = None,
                     num_workers: int = 2, chunk_size: int = 1024, reuse: bool = True,
                     process_index: int | None = None,
                     process_count: int | None = None) -> ExtractionInfo:
  """Extracts this process's slice of ``images`` into a float16 shard of ``key``.

  The slice is :func:`process_slice`; it is described ``chunk_size`` images at a time
  (``retriever.extract``), so at most one chunk of float32 rows is in memory. With ``reuse``,
  a complete shard set of ``key`` with ``len(images)`` rows (from any process count), or this
  process's own finished shard, is kept instead.

  Args:
    retriever: anything with ``extract(images, max_size, scales, batch_size, *, boxes,
      num_workers) -> float [n, D]`` (:class:`retrieval_jax.Retriever`).
    images: ``N`` images (arrays or paths; a lazy sequence is read lazily).
    store: where the shard goes.
    key: the store key (:func:`descriptor_key`).
    boxes: optional float ``[N, 4]`` crops (NaN rows: whole image), passed to ``extract``.
    max_size, scales, batch_size, num_workers: passed to ``extract``.
    chunk_size: images per ``extract`` call.
    reuse: reuse existing shards (see above).
    process_index, process_count: this process and how many there are; default jax's.

  Returns:
    An :class:`ExtractionInfo`.

  Raises:
    ValueError: bad arguments, or an ``extract`` result without one row per image.
  """
  start_time = time.perf_counter()
  p, count = _process(process_index, process_count)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
  n = len(images)
  if boxes is not None:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.shape != (n, 4):
      raise ValueError(f"boxes must be [{n}, 4]; got {boxes.shape}.")
  start, stop = process_slice(n, p, count)
  if reuse and store.find(key, n, prefer_count=count) is not None:
    return ExtractionInfo(key, (start, stop), True, time.perf_counter() - start_time, None)
  path = store.shard_path(key, p, count)
  if reuse and path.exists() and np.load(path, mmap_mode="r").shape[0] == stop - start:
    return ExtractionInfo(key, (start, stop), True, time.perf_counter() - start_time, str(path))
  writer = store.writer(key, stop - start, p, count)
  try:
    for a in range(start, stop, chunk_size):
      b = min(a + chunk_size, stop)
      rows = retriever.extract(ImageSubset.range(images, a, b), max_size, scales, batch_size,
                               boxes=None if boxes is None else boxes[a:b],
                               num_workers=num_workers)
      rows = np.asarray(rows)
      if rows.ndim != 2 or rows.shape[0] != b - a:
        raise ValueError(f"retriever.extract returned {rows.shape} for images {a}..{b - 1} "
                         f"of {key}; expected one row per image.")
      writer.write(a - start, rows)
    writer.commit()
  except BaseException:
    writer.abort()
    raise
  return ExtractionInfo(key, (start, stop), False, time.perf_counter() - start_time, str(path))
