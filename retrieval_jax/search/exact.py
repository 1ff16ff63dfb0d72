"""Exact inner-product search: chunked scoring + ``lax.top_k``, in bounded memory.

The database is scored ``chunk`` rows at a time under ``lax.scan`` and the running best ``k``
of every query is merged with each chunk's candidates, so the scores held at any time are
``[Q, k + chunk]`` whatever the database size ``N``. Two sources are supported:

- a device array (``jax.Array``): scanned in place, never copied or padded;
- a host array (numpy, including a ``np.memmap`` on disk larger than RAM, typically float16):
  streamed to the device in blocks of ``host_block_rows`` rows, at most two blocks alive on the
  device at once, each block's top-``k`` merged into the running result.

Storage may be float16/bfloat16; each chunk is cast to (at least) float32 before its product,
and products run at ``lax.Precision.HIGHEST`` (see :mod:`retrieval_jax.distances`). Queries are
split into batches so that one ``[batch, chunk]`` float32 score tile never exceeds
``max_score_bytes``.

Selecting the ``k`` best of a chunk is done in two exact stages when the chunk is large: the
maximum of every group of ``_GROUP`` consecutive scores, ``lax.top_k`` over those maxima, then
``lax.top_k`` over the members of the ``k`` winning groups. Every true top-``k`` element lies
in one of the ``k`` best groups (each group ranked above it holds an element that beats it), so
the result is exact, and on CPU it costs about half of one ``lax.top_k`` over the whole chunk.
Ties go to the lower database index everywhere, as with a stable descending sort.

References:
  Johnson, Douze & Jegou, "Billion-scale similarity search with GPUs", IEEE TBD 2019 (blocked
  exact k-selection merged across database tiles).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from retrieval_jax._validation import check_finite, check_ndim, check_positive_int
from retrieval_jax.search import _store

_HIGHEST = lax.Precision.HIGHEST
# Scores per group in the two-stage selection: measured fastest of 8/16/32/64 for k = 100 on a
# 2-core CPU ([1000, 32768] tile: 0.067 s against 0.127 s for one lax.top_k).
_GROUP = 16
DEFAULT_CHUNK_SIZE = 32768
DEFAULT_MAX_SCORE_BYTES = 256 * 2**20
DEFAULT_HOST_BLOCK_BYTES = 256 * 2**20

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def inner_product_scores(queries: jax.Array, rows: jax.Array) -> jax.Array:
  """``queries @ rows.T`` in (at least) float32 at HIGHEST precision: ``[Q, D], [C, D] -> [Q, C]``.

  Rows stored in float16/bfloat16 are cast per chunk, so the database keeps its storage type.
  """
  dtype = jnp.promote_types(jnp.result_type(queries, rows), jnp.float32)
  return jnp.matmul(queries.astype(dtype), rows.astype(dtype).T, precision=_HIGHEST)


def _select_top_k(scores: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-``k`` of ``[Q, C]`` scores (``indices`` increasing along a row), ties to lower."""
  q, c = scores.shape
  if c % _GROUP or c // _GROUP < 4 * k:
    top, pos = lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, pos, axis=1)
  groups = scores.reshape(q, c // _GROUP, _GROUP)
  _, best_groups = lax.top_k(groups.max(axis=-1), k)
  # Ascending group order keeps candidates in database order, so the stable top_k below still
  # gives ties to the lower index.
  best_groups = jnp.sort(best_groups, axis=1)
  candidates = jnp.take_along_axis(groups, best_groups[:, :, None], axis=1).reshape(q, -1)
  candidate_idx = jnp.take_along_axis(
      indices.reshape(q, c // _GROUP, _GROUP), best_groups[:, :, None], axis=1).reshape(q, -1)
  top, pos = lax.top_k(candidates, k)
  return top, jnp.take_along_axis(candidate_idx, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "score_fn"))
def scan_top_k(queries: jax.Array, database: jax.Array, k: int, chunk: int,
               score_fn: ScoreFn = inner_product_scores) -> tuple[jax.Array, jax.Array]:
  """Top-``k`` database rows per query under ``score_fn``, scanning ``chunk`` rows per step.

  The generic kernel behind :func:`exact_search`, ``distances.top_k_similar`` and the PQ
  asymmetric search (whose ``score_fn`` reads lookup tables instead of a matrix product). The
  database is never copied or padded: when ``chunk`` does not divide ``N`` the last chunk is
  shifted back to end at row ``N`` and the rows it re-reads are scored ``-inf``. The running best
  precedes each chunk in the merge, so ties go to the lower database index.

  Args:
    queries: ``[Q, ...]``, whatever ``score_fn`` takes as its first argument.
    database: ``[N, ...]``, ``N >= k``.
    k: neighbours per query (static).
    chunk: database rows per step (static), ``1 <= chunk <= N``.
    score_fn: ``(queries, rows [chunk, ...]) -> [Q, chunk]`` scores, higher is better (static;
      a module-level function so that jit caches it).

  Returns:
    ``(scores, indices)``: ``[Q, k]`` decreasing along rows, int32 ``[Q, k]`` database rows.
  """
  n = database.shape[0]
  n_chunks = -(-n // chunk)
  offsets = jnp.arange(chunk, dtype=jnp.int32)
  score_shape = jax.eval_shape(
      score_fn, queries, jax.ShapeDtypeStruct((chunk,) + database.shape[1:], database.dtype))
  n_q, dtype = score_shape.shape[0], score_shape.dtype

  def merge(best, i):
    best_scores, best_indices = best
    nominal_start = i * chunk
    start = jnp.minimum(nominal_start, n - chunk)
    rows = lax.dynamic_slice_in_dim(database, start, chunk)
    scores = score_fn(queries, rows)
    indices = start + offsets
    # Rows before nominal_start were scored by the previous chunk (only the shifted last chunk
    # has any); scoring them again would let one row occupy two of the k places.
    scores = jnp.where(indices < nominal_start, -jnp.inf, scores)
    indices = jnp.broadcast_to(indices, scores.shape)
    if chunk > k:  # pre-select, so the merge below sorts 2k scores rather than k + chunk
      scores, indices = _select_top_k(scores, indices, k)
    top, pos = lax.top_k(jnp.concatenate([best_scores, scores], axis=1), k)
    top_indices = jnp.take_along_axis(
        jnp.concatenate([best_indices, indices], axis=1), pos, axis=1)
    return (top, top_indices), None

  init = (jnp.full((n_q, k), -jnp.inf, dtype), jnp.full((n_q, k), -1, jnp.int32))
  (scores, indices), _ = lax.scan(merge, init, jnp.arange(n_chunks, dtype=jnp.int32))
  return scores, indices


@functools.partial(jax.jit, static_argnames=("k",))
def merge_top_k(scores_a: jax.Array, ids_a: jax.Array, scores_b: jax.Array, ids_b: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array]:
  """Best ``k`` of two ``[Q, ka]`` and ``[Q, kb]`` result lists; ties go to list ``a``.

  Used to merge database blocks, shards and hosts: pass the lists in database order so that
  ties keep going to the lower index.
  """
  top, pos = lax.top_k(jnp.concatenate([scores_a, scores_b.astype(scores_a.dtype)], axis=1), k)
  ids = jnp.concatenate([ids_a, ids_b.astype(ids_a.dtype)], axis=1)
  return top, jnp.take_along_axis(ids, pos, axis=1)


def plan_batches(num_queries: int, num_rows: int, k: int, *, chunk_size: int | None = None,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES) -> tuple[int, int]:
  """``(query_batch, chunk)`` keeping one float32 score tile ``[batch, chunk + k]`` in budget.

  ``chunk`` defaults to ``DEFAULT_CHUNK_SIZE`` (8k-32k were fastest on a 2-core CPU for 1M x
  128 and 100k x 2048) and is lowered, not below ``4 k`` or 1024, before queries are batched.
  """
  chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, num_rows)
  if chunk_size is None:
    floor = min(num_rows, max(1024, 4 * k))
    while chunk > floor and num_queries * (chunk + k) * 4 > max_score_bytes:
      chunk = max(floor, chunk // 2)
  batch = max(1, min(num_queries, max_score_bytes // (4 * (chunk + k))))
  return batch, chunk


def check_query_database(queries, database) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes ``([Q, D], [N, D])`` of a search's inputs, raising unless both are 2-D with one D."""
  check_ndim("queries", queries, 2, "[Q, D]")
  check_ndim("database", database, 2, "[N, D]")
  q_shape, db_shape = tuple(np.shape(queries)), tuple(np.shape(database))
  if q_shape[1] != db_shape[1]:
    raise ValueError(
        f"queries and database must have the same descriptor dimension D; got queries "
        f"{q_shape} and database {db_shape}.")
  return q_shape, db_shape


def check_k(k, n: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, N={n}] (N = database rows); got {k!r}.")
  return int(k)


def exact_search(queries, database, k: int, *, chunk_size: int | None = None,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
                 host_block_rows: int | None = None,
                 check_values: bool = True) -> tuple[jax.Array, jax.Array]:
  """Exact top-``k`` database rows by inner product for each query, best first.

  A ``jax.Array`` database is scanned where it lives; any other array (numpy, ``np.memmap``)
  stays on the host and is streamed to the device in blocks, so a float16 memmap larger than
  RAM or device memory can be searched. For L2-normalised rows the scores are cosine
  similarities.

  Args:
    queries: float ``[Q, D]`` (numpy or jax).
    database: float ``[N, D]`` in any float dtype (float16/bfloat16 storage is fine).
    k: neighbours per query, ``1 <= k <= N``.
    chunk_size: database rows scored per scan step; default from :func:`plan_batches`.
    max_score_bytes: cap on one float32 score tile ``[query batch, chunk + k]`` (bytes).
    host_block_rows: rows per host-to-device block for host databases; default: blocks of
      about 256 MiB in the stored dtype.
    check_values: refuse NaN/inf in queries and database (a host database is checked block by
      block on the device, never materialised on the host).

  Returns:
    ``(scores, indices)``: float32 ``[Q, k]`` (float64 with x64 and float64 inputs), decreasing
    along each row, and int32 ``[Q, k]`` database row indices.
  """
  q_shape, db_shape = check_query_database(queries, database)
  n = db_shape[0]
  k = check_k(k, n)
  if chunk_size is not None:
    chunk_size = check_positive_int("chunk_size", chunk_size)
  max_score_bytes = check_positive_int("max_score_bytes", max_score_bytes)
  if check_values:
    check_finite("queries", queries)
  queries = jnp.asarray(queries)
  batch, chunk = plan_batches(q_shape[0], n, k, chunk_size=chunk_size,
                              max_score_bytes=max_score_bytes)
  if isinstance(database, jax.Array):
    if check_values:
      check_finite("database", database)
    return _search_device(queries, database, k, batch, chunk)
  return _search_host(queries, database, k, batch, chunk, host_block_rows, check_values)


def _search_device(queries: jax.Array, database: jax.Array, k: int, batch: int,
                   chunk: int) -> tuple[jax.Array, jax.Array]:
  results = [scan_top_k(queries[s:s + batch], database, k, chunk)
             for s in range(0, queries.shape[0], batch)]
  if len(results) == 1:
    return results[0]
  return (jnp.concatenate([r[0] for r in results]), jnp.concatenate([r[1] for r in results]))


def _search_host(queries: jax.Array, database, k: int, batch: int, chunk: int,
                 host_block_rows: int | None, check_values: bool) -> tuple[jax.Array, jax.Array]:
  n, d = np.shape(database)
  itemsize = np.dtype(database.dtype).itemsize
  if host_block_rows is None:
    host_block_rows = max(chunk, DEFAULT_HOST_BLOCK_BYTES // max(1, d * itemsize))
  host_block_rows = check_positive_int("host_block_rows", host_block_rows)
  best: jax.Array | None = None
  best_ids: jax.Array | None = None
  pending = None
  for start in range(0, n, host_block_rows):
    stop = min(n, start + host_block_rows)
    block = jax.device_put(np.ascontiguousarray(database[start:stop]))
    if check_values and not bool(jnp.isfinite(block).all()):
      bad = np.argwhere(~np.isfinite(np.asarray(block, np.float32)))[0]
      raise ValueError(f"database must be finite; row {start + int(bad[0])} column "
                       f"{int(bad[1])} is NaN/inf.")
    kb = min(k, stop - start)
    scores, ids = _search_device(queries, block, kb, batch, min(chunk, stop - start))
    ids = ids + start
    if best is None:
      best, best_ids = scores, ids
    else:
      best, best_ids = merge_top_k(best, best_ids, scores, ids, min(k, best.shape[1] + kb))
    # Async dispatch would otherwise let the loop put every block on the device before the
    # first is scored: wait for the previous block's result, so at most two are alive.
    if pending is not None:
      jax.block_until_ready(pending)
    pending = best
  return best, best_ids


class ExactIndex:
  """Exact search over stored descriptors, with the interface of the approximate indexes.

  Attributes:
    descriptors: ``[N, D]`` (device array, or host array / memmap streamed in blocks).
    ids: int64 ``[N]`` user ids returned by :meth:`search` (default ``arange(N)``).
    metadata: optional list of ``N`` strings (e.g. image paths), kept in order with ``ids``.
    model_id: free-form id of the descriptor model, checked on load.
  """

  kind = "exact"
  auto_report: dict | None = None  # set by search.build_index(mode="auto")

  def __init__(self, descriptors, *, ids=None, metadata=None, model_id: str = ""):
    check_ndim("descriptors", descriptors, 2, "[N, D]")
    self.descriptors = descriptors
    self.ids, self.metadata = _store.check_ids_metadata(len(descriptors), ids, metadata)
    self.model_id = str(model_id)

  @classmethod
  def build(cls, descriptors, *, ids=None, metadata=None, model_id: str = "",
            on_device: bool = True) -> ExactIndex:
    """Keeps ``descriptors`` (moved to the device unless ``on_device=False``)."""
    check_ndim("descriptors", descriptors, 2, "[N, D]")
    check_finite("descriptors", descriptors)
    if on_device and not isinstance(descriptors, jax.Array):
      descriptors = jnp.asarray(descriptors)
    return cls(descriptors, ids=ids, metadata=metadata, model_id=model_id)

  @property
  def num_rows(self) -> int:
    return int(np.shape(self.descriptors)[0])

  @property
  def dim(self) -> int:
    return int(np.shape(self.descriptors)[1])

  def search(self, queries, k: int, *, batch_size: int | None = None,
             **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [Q, k], ids int64 [Q, k])``, best first; ``kwargs`` go to
    :func:`exact_search` (``batch_size`` caps the query batch via ``max_score_bytes``)."""
    if batch_size is not None:
      batch_size = check_positive_int("batch_size", batch_size)
      kwargs.setdefault("max_score_bytes", 4 * batch_size * (
          min(kwargs.get("chunk_size") or DEFAULT_CHUNK_SIZE, self.num_rows) + k))
    scores, rows = exact_search(queries, self.descriptors, k, **kwargs)
    return np.asarray(scores, np.float32), self.ids[np.asarray(rows)]

  def save(self, directory) -> None:
    """Writes ``descriptors.npy``, ids, metadata and a manifest atomically to ``directory``."""
    _store.write_index(directory, kind=self.kind, dim=self.dim, count=self.num_rows,
                       model_id=self.model_id, ids=self.ids, metadata=self.metadata,
                       arrays={"descriptors": np.asarray(self.descriptors)})

  @classmethod
  def load(cls, directory, *, model_id: str | None = None, dim: int | None = None,
           on_device: bool = True, mmap: bool = False) -> ExactIndex:
    """Reads a saved index, verifying the manifest (and ``model_id`` / ``dim`` when given).

    ``mmap=True`` keeps the descriptors as a read-only memmap, streamed at search time.
    """
    manifest, ids, metadata = _store.read_index(directory, kind=cls.kind, model_id=model_id,
                                                dim=dim)
    descriptors = _store.load_array(directory, manifest, "descriptors", mmap=mmap)
    if on_device and not mmap:
      descriptors = jnp.asarray(descriptors)
    return cls(descriptors, ids=ids, metadata=metadata, model_id=manifest["model_id"])
