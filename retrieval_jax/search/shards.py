"""A database split into S shards (one ScaNN or exact index each), searched with a top-k merge.

Rows are split into ``S`` contiguous, near-equal ranges (:func:`shard_bounds`); shard ``s`` is
an ordinary :class:`~retrieval_jax.search.ScannIndex` (or :class:`ExactIndex`) over its range,
holding the global ids of its rows. Searching asks every shard for its best ``k`` and merges
the ``S * k`` candidates by score with a stable sort in shard order, so ties go to the lower
shard, i.e. the lower global row: in brute-force mode the result equals one index over all rows.

Layouts:

- One machine: :meth:`ShardedIndex.build` builds the shards in parallel worker processes
  (``concurrent.futures.ProcessPoolExecutor``, spawned: forking a process that has started jax
  is unsafe) and writes ``directory/shard-00000 ...`` plus a top-level ``manifest.json`` that
  pins every shard's manifest; :meth:`ShardedIndex.load` verifies it all.
- One shard per host: every host calls ``ShardedIndex.build(..., shard_indices=[
  jax.process_index()])`` with ``num_shards = jax.process_count()`` (same descriptors file, or
  just its own rows via ``rows_are_shard=True``), later ``ShardedIndex.load(directory,
  shard_indices=[jax.process_index()])``, searches its shard, and combines the hosts' answers
  with :func:`merge_across_processes`. Each shard directory is a complete, verified index, so
  no host needs the others' files.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retrieval_jax._validation import check_ndim, check_positive_int
from retrieval_jax.search import _store
from retrieval_jax.search.exact import ExactIndex
from retrieval_jax.search.scann_index import ScannIndex

_KINDS = {"scann": ScannIndex, "exact": ExactIndex}


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
  """``[start, stop)`` row ranges of ``num_shards`` contiguous near-equal shards."""
  num_shards = check_positive_int("num_shards", num_shards)
  if num_shards > num_rows:
    raise ValueError(f"num_shards must be at most the number of rows {num_rows}; got "
                     f"{num_shards}.")
  edges = np.linspace(0, num_rows, num_shards + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def shard_name(index: int) -> str:
  return f"shard-{index:05d}"


def merge_results(results: list[tuple[np.ndarray, np.ndarray]],
                  k: int) -> tuple[np.ndarray, np.ndarray]:
  """Best ``k`` of several ``(scores [Q, k_s], ids [Q, k_s])`` lists, ties to the earlier list.

  Lists must be given in database (shard) order for ties to go to the lower row.
  """
  scores = np.concatenate([np.asarray(s, np.float32) for s, _ in results], axis=1)
  ids = np.concatenate([np.asarray(i, np.int64) for _, i in results], axis=1)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_across_processes(scores: np.ndarray, ids: np.ndarray,
                           k: int) -> tuple[np.ndarray, np.ndarray]:
  """Merges every jax process's ``[Q, k]`` answers (one shard per host) into the global top-k.

  All processes must pass the same queries in the same order; each gets the merged result.
  With one process this is the identity (up to truncation to ``k``).
  """
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return merge_results([(scores, ids)], k)
  all_scores = np.asarray(multihost_utils.process_allgather(np.asarray(scores, np.float32)))
  all_ids = np.asarray(multihost_utils.process_allgather(np.asarray(ids, np.int64)))
  return merge_results(list(zip(all_scores, all_ids)), k)


def _build_shard(kind: str, rows_path: str, start: int, stop: int, ids: np.ndarray,
                 metadata: list[str] | None, model_id: str, out_dir: str,
                 kwargs: dict) -> str:
  """Worker: builds one shard from rows ``[start, stop)`` of a ``.npy`` file and saves it."""
  rows = np.load(rows_path, mmap_mode="r", allow_pickle=False)[start:stop]
  if kind == "exact":
    index = ExactIndex.build(np.asarray(rows), ids=ids, metadata=metadata, model_id=model_id,
                             on_device=False)
  else:
    index = ScannIndex.build(rows, ids=ids, metadata=metadata, model_id=model_id, **kwargs)
  index.save(out_dir)
  return out_dir


class ShardedIndex:
  """Shards searched together; see the module docstring.

  Attributes:
    shards: the loaded shard indexes, in shard order.
    shard_indices: which of the ``num_shards`` shards these are.
  """

  kind = "sharded"

  def __init__(self, shards: list, *, shard_indices: list[int], num_shards: int,
               model_id: str = ""):
    if not shards:
      raise ValueError("shards must not be empty.")
    dims = {s.dim for s in shards}
    if len(dims) != 1:
      raise ValueError(f"all shards must have the same dimension; got {sorted(dims)}.")
    self.shards = list(shards)
    self.shard_indices = list(shard_indices)
    self.num_shards = int(num_shards)
    self.model_id = str(model_id)
    self.dim = dims.pop()

  @property
  def num_rows(self) -> int:
    return sum(s.num_rows for s in self.shards)

  @classmethod
  def build(cls, descriptors, directory, *, num_shards: int, index: str = "scann",
            ids=None, metadata=None, model_id: str = "", workers: int | None = None,
            shard_indices: list[int] | None = None, rows_are_shard: bool = False,
            **index_kwargs) -> ShardedIndex:
    """Builds shards of ``descriptors`` in parallel processes and saves them to ``directory``.

    Args:
      descriptors: float ``[N, D]`` (numpy, memmap), all rows, or only the rows of the single
        shard in ``shard_indices`` when ``rows_are_shard`` (then ``ids`` are required, global).
      directory: output; gets ``shard-xxxxx/`` sub-directories (and, when every shard is
        built here, a top-level manifest).
      num_shards: ``S``.
      index: ``"scann"`` or ``"exact"`` shards.
      ids, metadata, model_id: as for :meth:`ScannIndex.build` (ids default to global rows).
      workers: processes (default ``min(S, os.cpu_count())``); 1 builds in this process.
      shard_indices: build only these shards (one per host: ``[jax.process_index()]``).
      **index_kwargs: passed to :meth:`ScannIndex.build` (e.g. ``mode="brute_force"``).
    """
    if index not in _KINDS:
      raise ValueError(f"index must be one of {sorted(_KINDS)}; got {index!r}.")
    check_ndim("descriptors", descriptors, 2, "[N, D]")
    n, d = np.shape(descriptors)
    num_shards = check_positive_int("num_shards", num_shards)
    wanted = list(range(num_shards)) if shard_indices is None else [int(s) for s in
                                                                   shard_indices]
    if any(not 0 <= s < num_shards for s in wanted) or len(set(wanted)) != len(wanted):
      raise ValueError(f"shard_indices must be distinct values in [0, {num_shards}); got "
                       f"{shard_indices!r}.")
    if rows_are_shard:
      if len(wanted) != 1 or ids is None:
        raise ValueError("rows_are_shard needs exactly one shard index and global ids.")
      bounds = {wanted[0]: (0, n)}
    else:
      bounds = dict(enumerate(shard_bounds(n, num_shards)))
    ids, metadata = _store.check_ids_metadata(n, ids, metadata)
    directory = Path(directory)
    complete = len(wanted) == num_shards and not rows_are_shard
    workers = min(len(wanted), os.cpu_count() or 1) if workers is None else check_positive_int(
        "workers", workers)

    def build_into(root: Path) -> None:
      scratch = Path(tempfile.mkdtemp(prefix=".rows-", dir=root))
      try:
        # Workers memory-map the rows from disk instead of receiving them pickled; copied in
        # blocks so that a memmap larger than RAM is never loaded whole.
        rows_path = scratch / "rows.npy"
        rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=descriptors.dtype,
                                         shape=(n, d))
        for s in range(0, n, 65536):
          rows[s:s + 65536] = descriptors[s:s + 65536]
        rows.flush()
        del rows
        jobs = [(index, str(rows_path), *bounds[s], ids[slice(*bounds[s])],
                 None if metadata is None else metadata[slice(*bounds[s])], model_id,
                 str(root / shard_name(s)), index_kwargs) for s in wanted]
        if workers == 1:
          for job in jobs:
            _build_shard(*job)
        else:
          context = multiprocessing.get_context("spawn")
          with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for future in [pool.submit(_build_shard, *job) for job in jobs]:
              future.result()
      finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if complete:
      _store.write_index(directory, kind=cls.kind, dim=d, count=n, model_id=model_id,
                         ids=ids, metadata=None, extra={"num_shards": num_shards},
                         populate=build_into)
    else:
      directory.mkdir(parents=True, exist_ok=True)
      build_into(directory)
    return cls.load(directory, shard_indices=None if complete else wanted,
                    num_shards=num_shards)

  @classmethod
  def load(cls, directory, *, shard_indices: list[int] | None = None,
           num_shards: int | None = None, model_id: str | None = None,
           dim: int | None = None) -> ShardedIndex:
    """Loads all shards (verifying the top-level manifest) or only ``shard_indices``.

    Loading a subset (one shard per host) verifies each shard's own manifest; ``num_shards`` is
    then taken from the top-level manifest if present, else from the argument.
    """
    directory = Path(directory)
    if shard_indices is None:
      manifest, _, _ = _store.read_index(directory, kind=cls.kind, model_id=model_id, dim=dim)
      num_shards = manifest["num_shards"]
      shard_indices = list(range(num_shards))
    elif (directory / _store.MANIFEST).exists():
      num_shards = _store.verify_directory(directory, kind=cls.kind)["num_shards"]
    if num_shards is None:
      raise ValueError(f"{directory} has no top-level manifest; pass num_shards.")
    shards = []
    for s in shard_indices:
      shard_dir = directory / shard_name(int(s))
      manifest = _store.verify_directory(shard_dir)
      kind = manifest["kind"]
      if kind not in _KINDS:
        raise ValueError(f"{shard_dir / _store.MANIFEST} has kind {kind!r}; expected one of "
                         f"{sorted(_KINDS)}.")
      shards.append(_KINDS[kind].load(shard_dir, model_id=model_id, dim=dim))
    return cls(shards, shard_indices=list(shard_indices), num_shards=num_shards,
               model_id=shards[0].model_id)

  def search(self, queries, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [Q, k], ids int64 [Q, k])`` over the loaded shards, best first.

    Each shard returns its best ``min(k, shard rows)``; ``kwargs`` go to every shard's search.
    With one shard per host, follow with :func:`merge_across_processes`.
    """
    k = check_positive_int("k", k)
    if k > self.num_rows:
      raise ValueError(f"k must be at most the {self.num_rows} rows of the loaded shards; "
                       f"got {k}.")
    results = [shard.search(queries, min(k, shard.num_rows), **kwargs) for shard in self.shards]
    return merge_results(results, k)
