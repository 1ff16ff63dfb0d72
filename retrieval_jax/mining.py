"""Hard-example mining with the current model, at the scale of real training pools.

Offline (cirtorch, DLRTN, LRML, REMAP): every refresh the model describes the epoch's queries
and a pool of candidate negatives; each query then gets the nearest pool images of distinct
clusters other than its own (one negative per cluster), or, for LRML, the whole ranked list of
such negatives. A ``[Q, M]`` distance table does not fit for real pools (2,000 queries x 100,000
images is 1.6 GB in float64), so :func:`mine_negatives` first takes an exact Euclidean shortlist
of each query's nearest pool images with the chunked top-k of :mod:`retrieval_jax.distances`
(peak memory ``O(Q * (shortlist + chunk))``), applies the distinct-cluster rule of
:func:`retrieval_jax.data.samplers.ranked_negatives` inside it, and widens the shortlist only
for the queries whose shortlist held too few clusters (up to the whole pool, so the result is
always the one a full table would give).

Semi-hard negatives (FaceNet, Schroff et al. 2015; the survey's mining section): with
``farther_than`` (each query's distance to its positive), :func:`mine_negatives` skips the pool
images nearer the query than its positive and takes the nearest of the rest. When the hardest
negatives are nearer than the positives, as on our synthetic benchmark with an ImageNet start,
a triplet loss on them is lower for a network that maps every image to one point (``m / 2``)
than at the start, and larger learning rates collapse it; semi-hard triplets have a loss below
``m / 2`` and so no such pull.

Online: :func:`active_triplets` keeps only the triplets that still violate the margin (DLRTN
trains on "triplets with non-zero loss"); in-batch mining for the labelled-batch losses (hardest
positive and negative per anchor, NRA's ranks) happens inside those losses
(:mod:`retrieval_jax.losses`). :class:`RefreshSchedule` says when to re-mine: every ``n`` epochs
(DLRTN: 5) or every ``K`` tuples (REMAP: 3,000).

References:
  Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018;
  Min et al. (DLRTN) Eqs. 10-11; Fan et al. (LRML) Sec. 3.2; Husain & Bober (REMAP) Sec. IV-C.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from retrieval_jax._validation import check_finite, check_ndim, check_positive_int
from retrieval_jax.data.samplers import ranked_negatives
from retrieval_jax.distances import top_k_similar
from retrieval_jax.losses import TRIPLET_MARGIN, triplet_loss


def _augment_for_euclidean(queries: np.ndarray, pool: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Rows whose inner products order the pool by Euclidean distance to each query.

  ``||q - p||^2 = ||q||^2 - (2 q.p - ||p||^2)``: with ``q' = [2q, -1]`` and
  ``p' = [p, ||p||^2]``, ``q'.p'`` is ``||q||^2 - ||q - p||^2``, decreasing in the distance, so
  an inner-product top-k is an exact nearest-neighbour shortlist for any descriptors, unit or not.
  """
  q = np.concatenate([2.0 * queries, -np.ones((len(queries), 1), queries.dtype)], axis=1)
  p = np.concatenate([pool, (pool * pool).sum(1, keepdims=True)], axis=1)
  return q, p


def _distances(queries: np.ndarray, pool: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Exact float64 Euclidean distances ``[Q, K]`` from each query to ``pool[positions[q]]``."""
  diff = queries[:, None, :].astype(np.float64) - pool[positions].astype(np.float64)
  return np.sqrt((diff * diff).sum(-1))


def mine_negatives(query_descriptors: ArrayLike, pool_descriptors: ArrayLike,
                   query_cluster_ids: ArrayLike, pool_cluster_ids: ArrayLike,
                   num_negatives: int | None, *, shortlist: int | None = None,
                   chunk_size: int = 65536, farther_than: ArrayLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Each query's nearest pool images of distinct clusters other than its own.

  Args:
    query_descriptors: float ``[Q, D]``.
    pool_descriptors: float ``[M, D]``.
    query_cluster_ids: int ``[Q]``; pool_cluster_ids: int ``[M]``.
    num_negatives: negatives per query (cirtorch's ``nnum``: 5; DLRTN/REMAP: 1); None returns
      every distinct-cluster negative in the pool, ranked (LRML's "real sequence").
    shortlist: pool images first examined per query; default ``max(64, 8 * num_negatives)``
      (rows that need more are widened, doubling, up to the whole pool).
    chunk_size: pool rows scored per step of the top-k scan.
    farther_than: float ``[Q]`` or None. Semi-hard mining: only pool images farther than
      ``farther_than[q]`` from query ``q`` (its positive's distance) are taken, nearest first;
      when fewer than ``num_negatives`` clusters have one, the remaining slots take the
      nearest negatives of the other clusters (hard ones), so every row is still full. With
      ``num_negatives=None`` only the semi-hard list is returned.

  Returns:
    ``(positions, distances)``: int64 ``[Q, K]`` pool row indices, nearest first, and float64
    Euclidean distances, where ``K = num_negatives`` (or, when None, the most any query has;
    shorter rows padded with ``-1`` / ``inf``).

  Raises:
    ValueError: mismatched shapes, non-finite descriptors, or (when ``num_negatives`` is set) a
      query whose pool has fewer than ``num_negatives`` clusters other than its own.
  """
  q = np.asarray(query_descriptors, np.float32)
  p = np.asarray(pool_descriptors, np.float32)
  check_ndim("query_descriptors", q, 2, "[Q, D]")
  check_ndim("pool_descriptors", p, 2, "[M, D]")
  if q.shape[1] != p.shape[1]:
    raise ValueError(f"query_descriptors {q.shape} and pool_descriptors {p.shape} must have the "
                     f"same descriptor dimension.")
  check_finite("query_descriptors", q)
  check_finite("pool_descriptors", p)
  query_ids = np.asarray(query_cluster_ids)
  pool_ids = np.asarray(pool_cluster_ids)
  if query_ids.shape != (len(q),) or pool_ids.shape != (len(p),):
    raise ValueError(f"query_cluster_ids must be [Q={len(q)}] and pool_cluster_ids "
                     f"[M={len(p)}]; got {query_ids.shape} and {pool_ids.shape}.")
  k = None if num_negatives is None else check_positive_int("num_negatives", num_negatives)
  n_pool = len(p)
  width = n_pool if k is None else min(
      n_pool, check_positive_int("shortlist", shortlist) if shortlist else max(64, 8 * k))
  far = None
  if farther_than is not None:
    far = np.asarray(farther_than, np.float64)
    if far.shape != (len(q),) or np.isnan(far).any():
      raise ValueError(f"farther_than must be float [Q={len(q)}] without NaN; got shape "
                       f"{far.shape}.")
  qa, pa = _augment_for_euclidean(q, p)
  pa_device = jnp.asarray(pa)

  rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  todo = np.arange(len(q))
  while todo.size:
    _, near = top_k_similar(jnp.asarray(qa[todo]), pa_device, width, chunk_size=chunk_size)
    near = np.asarray(near, np.int64)
    # Exact distances of the shortlist (the augmented inner products lose digits to ||p||^2).
    # ranked_negatives re-sorts them stably, so ties go to the lower shortlist position, which
    # top-k gave to the lower pool index.
    dist = _distances(q[todo], p, near)
    if far is not None:  # nearer than the positive: ranked last (inf), then dropped
      dist = np.where(dist > far[todo, None], dist, np.inf)
    pos, val = ranked_negatives(dist, pool_ids[near], query_ids[todo], k)
    pos = np.where((pos >= 0) & np.isfinite(val),
                   np.take_along_axis(near, np.maximum(pos, 0), axis=1), -1)
    val = np.where(pos >= 0, val, np.inf)
    # Final when the row has its k negatives or the whole pool was examined; the others retry
    # with a shortlist twice as long.
    done = np.full(len(todo), width >= n_pool)
    if k is not None:
      done |= (pos >= 0).all(axis=1)
    for row in np.flatnonzero(done):
      rows[int(todo[row])] = (pos[row], val[row])
    todo = todo[~done]
    width = min(n_pool, 2 * width)

  out_width = k if k is not None else max((int((r[0] >= 0).sum()) for r in rows.values()),
                                          default=0)
  positions = np.full((len(q), out_width), -1, np.int64)
  distances = np.full((len(q), out_width), np.inf)
  for query, (pos, val) in rows.items():
    n = min(len(pos), out_width)
    positions[query, :n], distances[query, :n] = pos[:n], val[:n]
  if far is not None and k is not None:
    _fill_with_hard(positions, distances, q, p, query_ids, pool_ids)
  if k is not None:
    short = (positions < 0).any(axis=1)
    if short.any():
      row = int(np.argmax(short))
      raise ValueError(
          f"query row {row} (cluster {query_ids[row]}) has only "
          f"{int((positions[row] >= 0).sum())} other clusters in the pool of {n_pool} images but "
          f"num_negatives={k} (one negative per cluster); use a larger pool or fewer negatives.")
  return positions, distances


def _fill_with_hard(positions: np.ndarray, distances: np.ndarray, q: np.ndarray, p: np.ndarray,
                    query_ids: np.ndarray, pool_ids: np.ndarray) -> None:
  """Semi-hard rows with free slots (``-1``) take, in place, the nearest negatives of clusters
  the row does not hold yet (whole-pool ranking; rows needing it are few)."""
  for row in np.flatnonzero((positions < 0).any(axis=1)):
    every = np.arange(len(p))[None]
    ranked, dist = ranked_negatives(_distances(q[row:row + 1], p, every), pool_ids,
                                    query_ids[row:row + 1])
    held = {int(pool_ids[i]) for i in positions[row] if i >= 0}
    free = np.flatnonzero(positions[row] < 0)
    extra = [(i, d) for i, d in zip(ranked[0], dist[0])
             if i >= 0 and int(pool_ids[i]) not in held][:len(free)]
    for slot, (i, d) in zip(free, extra):
      positions[row, slot], distances[row, slot] = i, d


def active_triplets(anchors: ArrayLike, positives: ArrayLike, negatives: ArrayLike, *,
                    margin: float = TRIPLET_MARGIN, squared: bool = True) -> np.ndarray:
  """Which triplets still have a non-zero loss (DLRTN: train only on those).

  Args:
    anchors, positives, negatives: float ``[N, D]`` descriptors of each triplet's images.
    margin, squared: as :func:`retrieval_jax.losses.triplet_loss`.

  Returns:
    bool ``[N]``: ``margin + d(a, p) - d(a, n) > 0``.
  """
  per_triplet = triplet_loss(anchors, positives, negatives, margin=margin, squared=squared,
                             reduction="none")
  return np.asarray(per_triplet) > 0


@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
  """When the offline miner describes a fresh pool.

  Attributes:
    every_epochs: re-mine at the start of every ``n``-th epoch (DLRTN: 5; cirtorch: 1).
    every_tuples: re-mine whenever this many tuples were trained on since the last mining
      (REMAP: 3,000). Exactly one of the two is set.
  """

  every_epochs: int | None = 1
  every_tuples: int | None = None

  def __post_init__(self):
    if (self.every_epochs is None) == (self.every_tuples is None):
      raise ValueError(f"set exactly one of every_epochs and every_tuples; got "
                       f"every_epochs={self.every_epochs!r}, every_tuples={self.every_tuples!r}.")
    for name in ("every_epochs", "every_tuples"):
      if getattr(self, name) is not None:
        check_positive_int(name, getattr(self, name))

  def due(self, epoch: int, tuples_since_refresh: int | None) -> bool:
    """True when the pool must be (re-)mined now.

    Args:
      epoch: the current epoch (0-based).
      tuples_since_refresh: tuples trained on since the last mining; None before the first.
    """
    if tuples_since_refresh is None:
      return True
    if self.every_epochs is not None:
      return tuples_since_refresh > 0 and epoch % self.every_epochs == 0
    return tuples_since_refresh >= self.every_tuples
