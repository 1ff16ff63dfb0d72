"""Re-ranking by descriptor expansion: alpha-weighted and average query expansion, and DBA.

All three replace a descriptor by the L2-normalised, similarity-weighted sum of itself and its
nearest database neighbours, then the caller searches again with the new descriptors. Rows are
expected to be L2-normalised, so inner products are cosine similarities. Neighbours come from
``distances.top_k_similar`` (exact, database scanned in chunks); descriptors are processed in
blocks of ``query_chunk_size`` rows, so neither ``[Q, N]`` similarities nor ``[Q, k, D]``
gathered neighbours are ever held for all rows at once: besides the inputs and the output,
peak memory is about ``query_chunk_size * (k + chunk_size + k * D)`` values.

Weights are ``max(s, 0)^alpha`` for a neighbour of similarity ``s`` (negative similarities get
weight 0), except that ``alpha = 0`` gives every neighbour weight 1, whatever its similarity:
that is average query expansion.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from retrieval_jax._validation import check_finite, check_ndim
from retrieval_jax.distances import top_k_similar
from retrieval_jax.normalization import l2n


def _check_positive_int(name: str, value, upper: int | None = None, what: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
      upper is not None and value > upper):
    bound = f"[1, {upper}]{what}" if upper is not None else ">= 1"
    raise ValueError(f"{name} must be an int in {bound}; got {value!r}.")


def _check_arguments(queries, database, k, alpha, chunk_size, query_chunk_size) -> None:
  """Validates the shared arguments; ``queries=None`` means the database expands itself."""
  check_ndim("database", database, 2, "[N, D]")
  db_shape = tuple(jnp.shape(database))
  if queries is not None:
    check_ndim("queries", queries, 2, "[Q, D]")
    q_shape = tuple(jnp.shape(queries))
    if q_shape[1] != db_shape[1]:
      raise ValueError(
          f"queries and database must have the same descriptor dimension D; got queries "
          f"{q_shape} and database {db_shape}.")
  _check_positive_int("k", k, db_shape[0], " (N = database rows)")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
      math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"alpha must be a finite Python number >= 0; got {alpha!r}.")
  _check_positive_int("chunk_size", chunk_size)
  _check_positive_int("query_chunk_size", query_chunk_size)
  if queries is not None:
    check_finite("queries", queries)
  check_finite("database", database)


@functools.partial(jax.jit, static_argnames=(
    "k", "alpha", "include_query", "chunk_size", "query_chunk_size"))
def _expand(queries: jax.Array, database: jax.Array, k: int, alpha: float, include_query: bool,
            chunk_size: int, query_chunk_size: int) -> jax.Array:
  """``l2n([q +] sum_i w_i x_i)`` over the top-``k`` neighbours ``x_i`` of each query row."""
  dtype = jnp.promote_types(jnp.result_type(queries, database), jnp.float32)
  queries = queries.astype(dtype)
  n_queries = queries.shape[0]
  block = min(query_chunk_size, n_queries)
  n_blocks = -(-n_queries // block)
  # Zero padding rows only complete the last block; they are sliced off below.
  padded = jnp.pad(queries, ((0, n_blocks * block - n_queries), (0, 0)))

  def expand_block(q):
    scores, indices = top_k_similar(q, database, k, chunk_size=chunk_size)
    if alpha == 0:
      # Average expansion: weight 1 for every neighbour, by definition rather than via 0**0.
      weights = jnp.ones_like(scores)
    else:
      weights = jnp.maximum(scores, 0.0) ** alpha
    neighbours = database[indices].astype(dtype)  # [block, k, D]
    expanded = jnp.einsum("bk,bkd->bd", weights, neighbours, precision=lax.Precision.HIGHEST)
    return l2n(q + expanded if include_query else expanded)

  expanded = lax.map(expand_block, padded.reshape(n_blocks, block, -1))
  return expanded.reshape(n_blocks * block, -1)[:n_queries]


def alpha_query_expansion(queries: jax.Array, database: jax.Array, k: int = 50,
                          alpha: float = 3.0, *, chunk_size: int = 65536,
                          query_chunk_size: int = 256) -> jax.Array:
  """alpha-weighted query expansion (alpha-QE).

  ``q' = l2n(q + sum_{i in top-k(q)} max(s_i, 0)^alpha x_i)``, where ``x_i`` are the ``k``
  database rows with the largest inner products ``s_i = q . x_i`` (ties to the lower index) and
  the query keeps weight 1 (its similarity to itself). ``alpha = 0`` weights every neighbour 1:
  average query expansion. A query that is itself a database row finds itself among its
  neighbours (exclude it beforehand where the protocol requires, e.g. Holidays).

  Args:
    queries: float ``[Q, D]`` L2-normalised query descriptors.
    database: float ``[N, D]`` L2-normalised database descriptors.
    k: number of neighbours ``nQE``, ``1 <= k <= N`` (LRML uses 50).
    alpha: weight exponent, a Python number ``>= 0`` (LRML uses 5 on Oxford/Holidays, 0 on
      Paris; Radenovic et al. use 3).
    chunk_size: database rows scored per step of the neighbour search.
    query_chunk_size: query rows expanded per step.

  Returns:
    float ``[Q, D]`` expanded queries with unit-norm rows (up to the ``l2n`` epsilon), at least
    float32.

  Raises:
    ValueError: on non-2-D or mismatched inputs, ``k`` outside ``[1, N]``, negative or
      non-finite ``alpha``, non-positive chunk sizes, or non-finite concrete descriptors.

  References:
    Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
    TPAMI 2018 (alpha-QE); LRML (Fan et al.) Sec. 4.5.4 and Fig. 10.
  """
  _check_arguments(queries, database, k, alpha, chunk_size, query_chunk_size)
  return _expand(jnp.asarray(queries), jnp.asarray(database), k, float(alpha), True,
                 chunk_size, query_chunk_size)


def average_query_expansion(queries: jax.Array, database: jax.Array, k: int = 10, *,
                            chunk_size: int = 65536, query_chunk_size: int = 256) -> jax.Array:
  """Average query expansion (AQE): ``alpha_query_expansion`` with ``alpha = 0``.

  ``q' = l2n(q + sum_{i in top-k(q)} x_i)``, i.e. the mean of the query and its ``k`` nearest
  database rows, renormalised (the sum is normalised instead of the mean, which differs only
  through the ``l2n`` epsilon).

  Args:
    queries: float ``[Q, D]`` L2-normalised query descriptors.
    database: float ``[N, D]`` L2-normalised database descriptors.
    k: number of neighbours, ``1 <= k <= N`` (DLRTN uses the top 10).
    chunk_size: database rows scored per step of the neighbour search.
    query_chunk_size: query rows expanded per step.

  Returns:
    float ``[Q, D]`` expanded queries with unit-norm rows.

  Raises:
    ValueError: as for ``alpha_query_expansion``.

  References:
    Chum et al., "Total recall", ICCV 2007; DLRTN (Min et al.) Sec. 4 (AQE, top 10).
  """
  return alpha_query_expansion(queries, database, k, 0.0, chunk_size=chunk_size,
                               query_chunk_size=query_chunk_size)


def database_side_augmentation(database: jax.Array, k: int = 10, alpha: float = 3.0, *,
                               chunk_size: int = 65536,
                               query_chunk_size: int = 256) -> jax.Array:
  """Database-side augmentation (DBA), alpha-weighted.

  Every database row is replaced by ``l2n(sum_{i in top-k(x)} max(s_i, 0)^alpha x_i)`` over its
  ``k`` nearest database rows, itself included (a normalised row is its own nearest neighbour
  with ``s = 1``, hence weight 1), so ``k = 1`` leaves the database unchanged. ``alpha = 0``
  gives the plain average of the ``k`` neighbours. The ``[N, N]`` similarity matrix is never
  formed: rows are processed ``query_chunk_size`` at a time against database chunks of
  ``chunk_size``.

  Args:
    database: float ``[N, D]`` L2-normalised database descriptors.
    k: neighbours per row including the row itself, ``1 <= k <= N``.
    alpha: weight exponent, a Python number ``>= 0``.
    chunk_size: database rows scored per step of the neighbour search.
    query_chunk_size: database rows augmented per step.

  Returns:
    float ``[N, D]`` augmented database with unit-norm rows, at least float32.

  Raises:
    ValueError: as for ``alpha_query_expansion``.

  References:
    Arandjelovic and Zisserman, "Three things everyone should know to improve object
    retrieval", CVPR 2012 (DBA); Radenovic et al., TPAMI 2018 (alpha weighting).
  """
  _check_arguments(None, database, k, alpha, chunk_size, query_chunk_size)
  database = jnp.asarray(database)
  return _expand(database, database, k, float(alpha), False, chunk_size, query_chunk_size)
