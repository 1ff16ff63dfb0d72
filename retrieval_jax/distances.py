"""Distances and similarities between descriptor rows, and exact chunked top-k search.

Descriptors are rows: ``a: float [N, D]``, ``b: float [M, D]``. The ``pairwise_*`` functions
compare every row of ``a`` with every row of ``b`` (``[N, M]``); the ``paired_*`` functions
compare row ``i`` of ``a`` with row ``i`` of ``b`` (``[N]``), which is what pair and triplet
losses need. ``top_k_similar`` is the exact inner-product search behind the search layer, query
expansion and mining.

All matrix products run at ``lax.Precision.HIGHEST``: accelerators otherwise default to reduced
precision (TF32 on recent GPUs, one bfloat16 pass on TPUs), which is enough to reorder near ties
and to make ``||a||^2 + ||b||^2 - 2ab`` lose every digit for nearby rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from retrieval_jax._validation import check_finite, check_ndim
from retrieval_jax.normalization import l2n
from retrieval_jax.search.exact import check_k, check_query_database, scan_top_k

_HIGHEST = lax.Precision.HIGHEST


def _check_rows(a, b, *, paired: bool) -> tuple[jax.Array, jax.Array]:
  """Validates two descriptor matrices with the same width (and the same height if paired)."""
  check_ndim("a", a, 2, "[N, D]")
  check_ndim("b", b, 2, "[N, D]" if paired else "[M, D]")
  a_shape, b_shape = tuple(jnp.shape(a)), tuple(jnp.shape(b))
  if a_shape[1] != b_shape[1]:
    raise ValueError(
        f"a and b must have the same descriptor dimension D; got a {a_shape} and b {b_shape}.")
  if paired and a_shape[0] != b_shape[0]:
    raise ValueError(
        f"a and b must have the same number of rows for paired distances; got a {a_shape} and "
        f"b {b_shape}.")
  check_finite("a", a)
  check_finite("b", b)
  return jnp.asarray(a), jnp.asarray(b)


def safe_sqrt(squared: jax.Array) -> jax.Array:
  """``sqrt`` whose gradient is 0 (not NaN) where ``squared`` is 0.

  ``d sqrt(s)/ds = 1/(2 sqrt(s))`` is infinite at 0 and the chain rule turns it into NaN. The
  inner ``where`` keeps the zero entries away from ``sqrt`` so their cotangent is exactly 0; the
  outer ``where`` puts the value 0 back. A single ``where`` is not enough: its unselected branch
  still receives ``0 * inf = NaN``.
  """
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def pairwise_squared_euclidean(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """Squared Euclidean distances between all rows of ``a`` and all rows of ``b``.

  Computed as ``||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (one matrix product, no ``[N, M, D]``
  intermediate) and clamped at 0, since the expansion can round slightly negative for nearby
  rows. When ``b`` is omitted (or is the very same array object as ``a``) the distances are
  self-distances and the diagonal is set to exactly 0, removing the rounding noise of order
  ``eps * ||a_i||^2`` that the expansion leaves there.

  Args:
    a: float ``[N, D]``.
    b: float ``[M, D]``; defaults to ``a``.

  Returns:
    float ``[N, M]``, entry ``(i, j) = ||a_i - b_j||^2 >= 0``.
  """
  self_distances = b is None or b is a
  a, b = _check_rows(a, a if b is None else b, paired=False)
  squared = (jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :]
             - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST))
  squared = jnp.maximum(squared, 0.0)
  if self_distances:
    squared = jnp.where(jnp.eye(squared.shape[0], dtype=bool), 0.0, squared)
  return squared


def pairwise_euclidean(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """Euclidean distances between all rows of ``a`` and ``b``, with a finite gradient at 0.

  Where two rows coincide (including ``a`` against itself) the distance is 0 and its gradient is
  defined as 0 rather than NaN (double-``where`` square root), so losses over all pairs of a
  batch can be differentiated. See ``pairwise_squared_euclidean`` for the expansion used and
  the exact zero diagonal of self-distances.

  Args:
    a: float ``[N, D]``.
    b: float ``[M, D]``; defaults to ``a``.

  Returns:
    float ``[N, M]``, entry ``(i, j) = ||a_i - b_j||_2``.
  """
  return safe_sqrt(pairwise_squared_euclidean(a, b))


def pairwise_cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarities between all rows of ``a`` and ``b``.

  Rows are first L2-normalised with ``l2n`` (``x / (||x|| + 1e-6)``, DESIGN §4.1), so an
  all-zero row has similarity 0 to everything, and the result equals the plain inner product
  when the rows are already normalised.

  Args:
    a: float ``[N, D]``.
    b: float ``[M, D]``.

  Returns:
    float ``[N, M]`` in ``[-1, 1]``.
  """
  a, b = _check_rows(a, b, paired=False)
  return jnp.matmul(l2n(a), l2n(b).T, precision=_HIGHEST)


def pairwise_cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """``1 - pairwise_cosine_similarity(a, b)``: float ``[N, M]`` in ``[0, 2]``.

  Args:
    a: float ``[N, D]``.
    b: float ``[M, D]``.

  Returns:
    float ``[N, M]``.
  """
  return 1.0 - pairwise_cosine_similarity(a, b)


def paired_squared_euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distance between row ``i`` of ``a`` and row ``i`` of ``b``.

  Computed from the difference ``a_i - b_i`` (not the expansion), so it is exact to rounding
  and exactly 0 for identical rows.

  Args:
    a: float ``[N, D]``.
    b: float ``[N, D]``.

  Returns:
    float ``[N]``, ``||a_i - b_i||^2``.
  """
  a, b = _check_rows(a, b, paired=True)
  diff = a - b
  return jnp.sum(diff * diff, axis=-1)


def paired_euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distance between row ``i`` of ``a`` and of ``b``, with gradient 0 at 0.

  Args:
    a: float ``[N, D]``.
    b: float ``[N, D]``.

  Returns:
    float ``[N]``, ``||a_i - b_i||_2``; where ``a_i == b_i`` the gradient is 0, not NaN.
  """
  return safe_sqrt(paired_squared_euclidean(a, b))


def paired_cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity between row ``i`` of ``a`` and row ``i`` of ``b``.

  Args:
    a: float ``[N, D]``.
    b: float ``[N, D]``.

  Returns:
    float ``[N]``, ``l2n(a_i) . l2n(b_i)`` (``l2n`` of DESIGN §4.1).
  """
  a, b = _check_rows(a, b, paired=True)
  return jnp.sum(l2n(a) * l2n(b), axis=-1)


def top_k_similar(queries: jax.Array, database: jax.Array, k: int, *,
                  chunk_size: int = 65536) -> tuple[jax.Array, jax.Array]:
  """Exact top-``k`` database rows by inner product for each query, best first.

  The database is scanned in chunks of ``chunk_size`` rows under ``lax.scan``; after each chunk
  the running best ``k`` and the chunk's scores are merged with ``lax.top_k``. Peak memory for
  scores is ``O(Q * (k + chunk_size))`` whatever ``N``, and the database is never copied or
  padded: when ``chunk_size`` does not divide ``N`` the last chunk is shifted back to end at row
  ``N`` and the rows it re-reads are scored ``-inf``. ``lax.top_k`` keeps the lower index first
  among equal values and the running best precedes the chunk in the merge, so ties go to the
  lower database index, as with a stable descending sort. For L2-normalised rows the scores are
  cosine similarities. Compiled with ``jax.jit`` (``k`` and ``chunk_size`` static). The kernel
  is :func:`retrieval_jax.search.exact.scan_top_k`; :func:`retrieval_jax.search.exact_search`
  adds query batching under a memory budget and host-streamed (memmap) databases.

  Args:
    queries: float ``[Q, D]``.
    database: float ``[N, D]``.
    k: number of neighbours, ``1 <= k <= N``.
    chunk_size: database rows scored per step (clipped to ``N``).

  Returns:
    ``(scores, indices)``: float ``[Q, k]`` inner products, decreasing along each row (at least
    float32), and int32 ``[Q, k]`` database row indices.
  """
  _, (n, _) = check_query_database(queries, database)
  k = check_k(k, n)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
  check_finite("queries", queries)
  check_finite("database", database)
  return scan_top_k(jnp.asarray(queries), jnp.asarray(database), k, min(chunk_size, n))
