"""Training samplers: pairs, (query, positive, negatives) tuples and m-per-class batches.

Every sampler returns image *indices* (int64 numpy arrays), never images, and every random one is
a pure function of ``(seed, epoch)``: the generator is seeded from ``(seed, epoch, stream)``
(:func:`epoch_rng`), so an interrupted run that restarts at epoch ``e`` draws exactly the data
order it would have drawn, and two samplers used in the same epoch draw independent streams.

What the papers need:

- cirtorch / LRML / DLRTN tuples: each epoch :func:`sample_pairs` picks ``query_size`` (query,
  positive) pairs (from cluster ids, or from explicit positive pairs such as
  retrieval-SfM-120k's ``qidxs``/``pidxs``), :func:`sample_pool` picks ``pool_size`` candidate
  negatives, the current model describes both, and :func:`mine_tuples` (the miner's hook, built
  on :func:`nearest_negatives`) keeps, for each query, the ``num_negatives`` nearest pool images
  from distinct clusters, never the query's own (cirtorch's rule: at most one negative per
  cluster). :func:`random_tuples` gives tuples without a model (random negatives, one per
  cluster), e.g. for a first epoch or a baseline.
- positive selection (``positive=``): ``"random"`` (cirtorch), ``"hardest"`` = the farthest
  image of the query's cluster (DLRTN Eq. 10) or ``"closest"`` = the nearest (LRML Eq. 4), given
  descriptors.
- LRML's ranked list of negatives: :func:`ranked_negatives`, every distinct-cluster negative
  in the pool sorted by distance (the loss then keeps those inside its margin).
- NRA / DARAC m-per-class batches: :func:`m_per_class_batches`, ``k`` classes x ``n`` images.

Distances are Euclidean between descriptors (on unit descriptors the same order as cosine).
Ties are broken by the lower index (stable sorts), so results never depend on sort internals.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

POSITIVE_STRATEGIES = ("random", "hardest", "closest")
# Cells of the [chunk, pool] tables in ranked_negatives: ~32 MB per int64 table.
_CHUNK_ELEMENTS = 1 << 22


class Tuples(NamedTuple):
  """Training tuples as image indices.

  Attributes:
    queries: int64 ``[T]``.
    positives: int64 ``[T]``, an image of the query's cluster (or its listed positive).
    negatives: int64 ``[T, k]``, images of ``k`` distinct clusters other than the query's,
      nearest first when mined.
  """

  queries: np.ndarray
  positives: np.ndarray
  negatives: np.ndarray

  def as_array(self) -> np.ndarray:
    """int64 ``[T, 2 + k]`` rows ``(query, positive, negative_1, ..., negative_k)``, cirtorch's
    tuple layout (its contrastive target is ``[-1, 1, 0, ..., 0]``)."""
    return np.concatenate([self.queries[:, None], self.positives[:, None], self.negatives], 1)


# --------------------------------------------------------------------------- helpers


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  return int(value)


def epoch_rng(seed: int, epoch: int, stream: str = "") -> np.random.Generator:
  """A generator that depends only on ``(seed, epoch, stream)``.

  Args:
    seed: the run's seed, an integer >= 0.
    epoch: the epoch, an integer >= 0.
    stream: which sampler draws (``"pairs"``, ``"pool"``, ...), so samplers sharing a seed and
      an epoch are independent of each other and of the order they are called in.

  Returns:
    A fresh ``np.random.Generator`` (PCG64 seeded by a ``SeedSequence``).
  """
  seed = _check_int("seed", seed, 0)
  epoch = _check_int("epoch", epoch, 0)
  return np.random.default_rng(np.random.SeedSequence([seed, epoch, zlib.crc32(stream.encode())]))


def _check_cluster_ids(cluster_ids: ArrayLike, name: str = "cluster_ids") -> np.ndarray:
  ids = np.asarray(cluster_ids)
  if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
    raise ValueError(f"{name} must be a 1-D integer array (one cluster id per image); got "
                     f"{ids.dtype} {ids.shape}.")
  return ids.astype(np.int64)


def _groups(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Groups images by cluster.

  Returns:
    ``(inverse, order, starts, counts)``: ``inverse[i]`` is image i's cluster number
    (0..C-1, sorted id order); the images of cluster c are
    ``order[starts[c]:starts[c] + counts[c]]``, in increasing index order.
  """
  _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  order = np.argsort(inverse, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return inverse.reshape(-1), order, starts, counts


def _check_descriptors(descriptors: ArrayLike | None, n: int, strategy: str) -> np.ndarray:
  """Descriptors as float64 ``[N, D]`` with at least ``n`` rows (one per image index used)."""
  if descriptors is None:
    raise ValueError(f"positive={strategy!r} needs descriptors (float [N, D], one row per "
                     f"image) to measure distances; got None.")
  x = np.asarray(descriptors, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < n:
    raise ValueError(f"descriptors must be float [N, D] with a row for each of the {n} images; "
                     f"got shape {x.shape}.")
  return x


def _pick_by_distance(queries: np.ndarray, candidates: list[np.ndarray], x: np.ndarray,
                      strategy: str) -> np.ndarray:
  """For each query, the candidate farthest (``"hardest"``) or nearest (``"closest"``) in
  Euclidean distance; candidates whose distance is NaN (a NaN descriptor row: an image the
  model did not describe) are never chosen."""
  out = np.empty(len(queries), np.int64)
  for i, (q, cand) in enumerate(zip(queries, candidates)):
    d = ((x[cand] - x[q]) ** 2).sum(axis=1)
    valid = ~np.isnan(d)
    if not valid.any():
      raise ValueError(f"query image {q}: no positive candidate has a finite descriptor "
                       f"distance (candidates {cand[:5].tolist()}...); describe them first.")
    # argmax/argmin return the first extreme, i.e. the lowest candidate index on ties.
    d = np.where(valid, d, -np.inf if strategy == "hardest" else np.inf)
    out[i] = cand[np.argmax(d) if strategy == "hardest" else np.argmin(d)]
  return out


# --------------------------------------------------------------------------- pairs and pools


def sample_pairs(cluster_ids: ArrayLike | None = None, *, positive_pairs: ArrayLike | None = None,
                 num_pairs: int | None = None, seed: int = 0, epoch: int = 0,
                 positive: str = "random", descriptors: ArrayLike | None = None) -> np.ndarray:
  """Picks an epoch's (query, positive) pairs.

  From clusters (``positive_pairs`` None): queries are drawn without replacement from the images
  whose cluster has at least two images; the positive is another image of the query's cluster,
  chosen by ``positive``. From explicit pairs (cirtorch's retrieval-SfM-120k ``qidxs/pidxs``):
  pairs are drawn without replacement; ``"random"`` keeps each drawn pair's positive, while
  ``"hardest"``/``"closest"`` choose among all positives listed for that query.

  Args:
    cluster_ids: int ``[N]`` cluster of each image (needed without ``positive_pairs``).
    positive_pairs: optional int ``[P, 2]`` ``(query, positive)`` image indices; used instead of
      the clusters when given.
    num_pairs: how many pairs (cirtorch's ``qsize``); None or more than are available takes all
      available, in random order, as cirtorch does.
    seed: run seed; epoch: epoch (the result is a pure function of both).
    positive: ``"random"``, ``"hardest"`` (farthest same-cluster image, DLRTN Eq. 10) or
      ``"closest"`` (nearest, LRML Eq. 4).
    descriptors: float ``[N, D]`` (for hardest/closest); NaN rows are never chosen as positives.

  Returns:
    int64 ``[min(num_pairs, available), 2]`` rows ``(query, positive)``, query != positive.

  Raises:
    ValueError: no cluster has two images, bad shapes, unknown strategy or missing descriptors.
  """
  if positive not in POSITIVE_STRATEGIES:
    raise ValueError(f"positive must be one of {POSITIVE_STRATEGIES}; got {positive!r}.")
  if num_pairs is not None:
    num_pairs = _check_int("num_pairs", num_pairs, 1)
  rng = epoch_rng(seed, epoch, "pairs")

  if positive_pairs is not None:
    pairs = np.asarray(positive_pairs)
    if (pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0
        or not np.issubdtype(pairs.dtype, np.integer)):
      raise ValueError(f"positive_pairs must be a non-empty integer [P, 2] array of (query, "
                       f"positive) image indices; got {pairs.dtype} {pairs.shape}.")
    pairs = pairs.astype(np.int64)
    n = int(pairs.max()) + 1 if cluster_ids is None else len(_check_cluster_ids(cluster_ids))
    if pairs.min() < 0 or pairs.max() >= n:
      raise ValueError(f"positive_pairs holds image indices in [{pairs.min()}, {pairs.max()}] "
                       f"but they must lie in [0, {n}) (the number of cluster ids).")
    chosen = pairs[rng.permutation(len(pairs))[:num_pairs]]
    if positive == "random":
      return chosen
    x = _check_descriptors(descriptors, n, positive)
    by_query: dict[int, list[int]] = {}
    for q, p in pairs.tolist():
      by_query.setdefault(q, []).append(p)
    candidates = [np.unique(by_query[q]) for q in chosen[:, 0].tolist()]
    return np.stack([chosen[:, 0], _pick_by_distance(chosen[:, 0], candidates, x, positive)], 1)

  if cluster_ids is None:
    raise ValueError("sample_pairs needs cluster_ids or positive_pairs; got neither.")
  ids = _check_cluster_ids(cluster_ids)
  inverse, order, starts, counts = _groups(ids)
  eligible = np.flatnonzero(counts[inverse] >= 2) if ids.size else np.zeros(0, np.int64)
  if eligible.size == 0:
    raise ValueError(f"no cluster has two or more images ({ids.size} images in "
                     f"{counts.size} clusters), so no (query, positive) pair exists.")
  queries = eligible[rng.permutation(eligible.size)[:num_pairs]]
  c = inverse[queries]
  if positive == "random":
    # The query's rank among its cluster's images (members are in increasing index order).
    rank = np.empty(ids.size, np.int64)
    rank[order] = np.arange(ids.size) - np.repeat(starts, counts)
    j = rng.integers(0, counts[c] - 1)  # one of the count - 1 other members ...
    j = j + (j >= rank[queries])  # ... skipping the query itself
    positives = order[starts[c] + j]
  else:
    x = _check_descriptors(descriptors, ids.size, positive)
    candidates = [np.delete(order[starts[k]:starts[k] + counts[k]],
                            np.searchsorted(order[starts[k]:starts[k] + counts[k]], q))
                  for q, k in zip(queries.tolist(), c.tolist())]
    positives = _pick_by_distance(queries, candidates, x, positive)
  return np.stack([queries, positives], 1).astype(np.int64)


def sample_pool(candidates: int | ArrayLike, pool_size: int | None, *, seed: int = 0,
                epoch: int = 0) -> np.ndarray:
  """Picks an epoch's pool of candidate negatives (cirtorch's ``poolsize`` random images).

  Args:
    candidates: the number of images N (candidates ``0..N-1``) or an int array of the image
      indices allowed in the pool (e.g. one split).
    pool_size: how many; None or more than there are takes all.
    seed: run seed; epoch: epoch (the result is a pure function of both).

  Returns:
    int64 ``[min(pool_size, N)]`` distinct image indices, sorted ascending (so images are read
    in file order and distance ties go to the lower index).
  """
  if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
    pool = np.arange(_check_int("candidates", candidates, 1), dtype=np.int64)
  else:
    pool = np.unique(_check_cluster_ids(candidates, "candidates"))
    if pool.size == 0:
      raise ValueError("candidates must hold at least one image index; got none.")
  if pool_size is not None:
    pool_size = _check_int("pool_size", pool_size, 1)
  rng = epoch_rng(seed, epoch, "pool")
  return np.sort(pool[rng.permutation(pool.size)[:pool_size]])


# --------------------------------------------------------------------------- negatives


def ranked_negatives(distances: ArrayLike, pool_cluster_ids: ArrayLike,
                     query_cluster_ids: ArrayLike, max_negatives: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Each query's pool negatives, nearest first, at most one per cluster, never its own cluster.

  This is the hook the miners call: for every query, walk its pool in increasing distance and
  keep an image when its cluster is neither the query's nor already kept (cirtorch's rule; LRML's
  ranked negative list). Vectorised over chunks of queries.

  Args:
    distances: float ``[Q, M]``, query-to-pool distances (smaller = nearer); no NaN.
    pool_cluster_ids: int ``[M]``, the cluster of each pool image, or ``[Q, M]`` when every
      query has its own candidate list (a per-query shortlist, as ``mining.mine_negatives``).
    query_cluster_ids: int ``[Q]``, the cluster of each query.
    max_negatives: keep at most this many per query; None keeps all.

  Returns:
    ``(positions, dists)``: int64 ``[Q, K]`` column indices into the pool (``-1`` pads rows with
    fewer negatives) and float ``[Q, K]`` their distances (``inf`` pads), where ``K`` is
    ``max_negatives`` or, when None, the most any query has.
  """
  d = np.asarray(distances)
  pool_ids = np.asarray(pool_cluster_ids)
  per_row = pool_ids.ndim == 2
  pool_ids = (_check_cluster_ids(pool_ids.reshape(-1), "pool_cluster_ids").reshape(pool_ids.shape)
              if per_row else _check_cluster_ids(pool_ids, "pool_cluster_ids"))
  query_ids = _check_cluster_ids(query_cluster_ids, "query_cluster_ids")
  if d.ndim != 2 or d.shape[0] != query_ids.size or d.shape != (
      pool_ids.shape if per_row else (query_ids.size, pool_ids.size)):
    raise ValueError(f"distances must be float [Q={query_ids.size}, M] (queries x pool) with "
                     f"pool_cluster_ids [M] or [Q, M]; got distances {d.shape} and "
                     f"pool_cluster_ids {pool_ids.shape}.")
  if np.isnan(d).any():
    raise ValueError(f"distances holds NaN at (query, pool) {np.argwhere(np.isnan(d))[0].tolist()}"
                     f"; describe every image before mining.")
  if max_negatives is not None:
    max_negatives = _check_int("max_negatives", max_negatives, 1)
  n_q, n_pool = d.shape
  # Compact cluster numbers over pool and queries, so (row, cluster) keys fit in an int64.
  _, both = np.unique(np.concatenate([pool_ids.reshape(-1), query_ids]), return_inverse=True)
  pool_c, query_c = both[:pool_ids.size].reshape(pool_ids.shape), both[pool_ids.size:]
  n_c = int(both.max()) + 1 if both.size else 1

  positions, values = [], []
  chunk = max(1, _CHUNK_ELEMENTS // max(n_pool, 1))
  for start in range(0, n_q, chunk):
    block = d[start:start + chunk]
    rows = len(block)
    order = np.argsort(block, axis=1, kind="stable")  # nearest first, lower index on ties
    clusters = (np.take_along_axis(pool_c[start:start + rows], order, axis=1) if per_row
                else pool_c[order])
    # First occurrence of each (row, cluster) in rank order: unique on row-major flat keys
    # returns the first flat position of each key, i.e. the nearest image of that cluster.
    keys = (np.arange(rows)[:, None] * n_c + clusters).reshape(-1)
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(rows * n_pool, bool)
    keep[first] = True
    keep = keep.reshape(rows, n_pool) & (clusters != query_c[start:start + rows, None])
    rank = np.cumsum(keep, axis=1) - 1  # 0-based rank among the kept
    width = max_negatives if max_negatives is not None else int(keep.sum(1).max(initial=0))
    keep &= rank < width
    pos = np.full((rows, width), -1, np.int64)
    val = np.full((rows, width), np.inf, dtype=np.result_type(d.dtype, np.float32))
    r, col = np.nonzero(keep)
    pos[r, rank[r, col]] = order[r, col]
    val[r, rank[r, col]] = block[r, order[r, col]]
    positions.append(pos)
    values.append(val)
  if max_negatives is None:  # chunks may differ in width: pad to the widest
    width = max((p.shape[1] for p in positions), default=0)
    positions = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1)
                 for p in positions]
    values = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=np.inf)
              for v in values]
  if not positions:
    return np.zeros((0, max_negatives or 0), np.int64), np.zeros((0, max_negatives or 0))
  return np.concatenate(positions), np.concatenate(values)


def nearest_negatives(distances: ArrayLike, pool_cluster_ids: ArrayLike,
                      query_cluster_ids: ArrayLike, num_negatives: int) -> np.ndarray:
  """The ``num_negatives`` nearest pool images of distinct clusters, excluding the query's.

  Args:
    distances: float ``[Q, M]`` query-to-pool distances.
    pool_cluster_ids: int ``[M]``; query_cluster_ids: int ``[Q]``.
    num_negatives: ``k >= 1``.

  Returns:
    int64 ``[Q, k]`` column indices into the pool, nearest first.

  Raises:
    ValueError: a query whose pool has fewer than ``k`` clusters other than its own (naming the
      query row and both numbers): enlarge the pool or lower ``num_negatives``.
  """
  k = _check_int("num_negatives", num_negatives, 1)
  positions, _ = ranked_negatives(distances, pool_cluster_ids, query_cluster_ids, k)
  short = (positions < 0).any(axis=1)
  if short.any():
    q = int(np.argmax(short))
    have = int((positions[q] >= 0).sum())
    raise ValueError(f"query row {q} (cluster {np.asarray(query_cluster_ids)[q]}) has only "
                     f"{have} other clusters in the pool of {np.asarray(pool_cluster_ids).size} "
                     f"images but num_negatives={k} (one negative per cluster); use a larger "
                     f"pool or fewer negatives.")
  return positions


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances ``[len(a), len(b)]`` in float64 (clamped at 0 before the root)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.sqrt(np.maximum(sq, 0.0))


def mine_tuples(pairs: ArrayLike, pool: ArrayLike, query_descriptors: ArrayLike,
                pool_descriptors: ArrayLike, cluster_ids: ArrayLike,
                num_negatives: int) -> Tuples:
  """Hard-negative tuples from the current model's descriptors (cirtorch's epoch mining).

  Args:
    pairs: int ``[T, 2]`` (query, positive) image indices (:func:`sample_pairs`).
    pool: int ``[M]`` candidate negative image indices (:func:`sample_pool`).
    query_descriptors: float ``[T, D]``, the descriptor of each pair's query.
    pool_descriptors: float ``[M, D]``, the descriptor of each pool image.
    cluster_ids: int ``[N]`` cluster of every image.
    num_negatives: negatives per tuple (cirtorch's ``nnum``).

  Returns:
    :class:`Tuples` whose negatives are, per query, the ``num_negatives`` nearest pool images
    (Euclidean) of distinct clusters other than the query's.
  """
  pairs = np.asarray(pairs)
  pool = np.asarray(pool)
  ids = _check_cluster_ids(cluster_ids)
  if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
    raise ValueError(f"pairs must be an integer [T, 2] array; got {pairs.dtype} {pairs.shape}.")
  if pool.ndim != 1 or not np.issubdtype(pool.dtype, np.integer):
    raise ValueError(f"pool must be a 1-D integer array; got {pool.dtype} {pool.shape}.")
  for name, idx in (("pairs", pairs), ("pool", pool)):
    if idx.size and (idx.min() < 0 or idx.max() >= ids.size):
      raise ValueError(f"{name} holds image indices outside [0, {ids.size}).")
  qd, pd = np.asarray(query_descriptors), np.asarray(pool_descriptors)
  if qd.ndim != 2 or pd.ndim != 2 or len(qd) != len(pairs) or len(pd) != len(pool) or (
      qd.shape[1] != pd.shape[1]):
    raise ValueError(f"query_descriptors must be [T={len(pairs)}, D] and pool_descriptors "
                     f"[M={len(pool)}, D]; got {qd.shape} and {pd.shape}.")
  positions = nearest_negatives(_euclidean(qd, pd), ids[pool], ids[pairs[:, 0]], num_negatives)
  return Tuples(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64),
                pool.astype(np.int64)[positions])


def random_negatives(query_cluster_ids: ArrayLike, cluster_ids: ArrayLike, num_negatives: int,
                     *, seed: int = 0, epoch: int = 0) -> np.ndarray:
  """Random negatives: per query, ``k`` distinct clusters other than its own, drawn uniformly,
  and one random image of each.

  Args:
    query_cluster_ids: int ``[Q]`` cluster of each query.
    cluster_ids: int ``[N]`` cluster of every image (negatives are drawn from these).
    num_negatives: ``k >= 1``.
    seed: run seed; epoch: epoch (the result is a pure function of both).

  Returns:
    int64 ``[Q, k]`` image indices.

  Raises:
    ValueError: fewer than ``k`` clusters other than a query's, naming the numbers.
  """
  k = _check_int("num_negatives", num_negatives, 1)
  ids = _check_cluster_ids(cluster_ids)
  query_ids = _check_cluster_ids(query_cluster_ids, "query_cluster_ids")
  inverse, order, starts, counts = _groups(ids)
  unique = np.unique(ids)
  n_c = unique.size
  own = np.searchsorted(unique, query_ids)
  own_present = (own < n_c) & (unique[np.minimum(own, n_c - 1)] == query_ids) if n_c else own < 0
  available = n_c - own_present.astype(np.int64)
  if query_ids.size and available.min() < k:
    q = int(np.argmin(available))
    raise ValueError(f"query {q} (cluster {query_ids[q]}) has only {available[q]} other "
                     f"clusters among {ids.size} images but num_negatives={k} needs {k} "
                     f"distinct ones.")
  rng = epoch_rng(seed, epoch, "random_negatives")
  scores = rng.random((query_ids.size, n_c))
  scores[np.flatnonzero(own_present), own[own_present]] = np.inf  # never the query's cluster
  chosen = np.argsort(scores, axis=1, kind="stable")[:, :k]  # k distinct random clusters
  member = (rng.random(chosen.shape) * counts[chosen]).astype(np.int64)
  return order[starts[chosen] + member]


def random_tuples(cluster_ids: ArrayLike, num_tuples: int | None, num_negatives: int, *,
                  positive_pairs: ArrayLike | None = None, seed: int = 0,
                  epoch: int = 0) -> Tuples:
  """Tuples without a model: :func:`sample_pairs` (random positives) and
  :func:`random_negatives`, for a first epoch or a random-negative baseline.

  Args:
    cluster_ids: int ``[N]`` cluster of every image.
    num_tuples: how many (None: all available pairs).
    num_negatives: negatives per tuple, from distinct clusters other than the query's.
    positive_pairs: optional explicit int ``[P, 2]`` (query, positive) pairs.
    seed: run seed; epoch: epoch (the result is a pure function of both).
  """
  ids = _check_cluster_ids(cluster_ids)
  pairs = sample_pairs(ids, positive_pairs=positive_pairs, num_pairs=num_tuples, seed=seed,
                       epoch=epoch)
  negatives = random_negatives(ids[pairs[:, 0]], ids, num_negatives, seed=seed, epoch=epoch)
  return Tuples(pairs[:, 0], pairs[:, 1], negatives)


# --------------------------------------------------------------------------- class batches


def m_per_class_batches(cluster_ids: ArrayLike, classes_per_batch: int, samples_per_class: int,
                        *, num_batches: int | None = None, allow_repeats: bool = False,
                        seed: int = 0, epoch: int = 0) -> np.ndarray:
  """Batches of ``k`` distinct classes x ``n`` images each (NRA / DARAC, metric learning).

  Classes are shuffled and cut into groups of ``k`` (a round uses each class at most once; the
  ``C mod k`` left over sit the round out); further rounds reshuffle when ``num_batches`` asks for
  more than one round. Within a class the ``n`` images are drawn without replacement.

  Classes with fewer than ``n`` images are *refused* by default (left out of every batch), since
  a duplicated image makes a zero-distance "positive"; ``allow_repeats=True`` keeps those with at
  least two images and draws their ``n`` uniformly with replacement.

  Args:
    cluster_ids: int ``[N]`` cluster of every image.
    classes_per_batch: ``k >= 1``.
    samples_per_class: ``n >= 1``.
    num_batches: batches to return; None: one round, ``C_eligible // k``.
    allow_repeats: see above.
    seed: run seed; epoch: epoch (the result is a pure function of both).

  Returns:
    int64 ``[num_batches, k * n]`` image indices, class-major: entries ``[j * n:(j + 1) * n]`` of
    a batch are one class.

  Raises:
    ValueError: fewer eligible classes than ``k``, naming the numbers.
  """
  k = _check_int("classes_per_batch", classes_per_batch, 1)
  n = _check_int("samples_per_class", samples_per_class, 1)
  ids = _check_cluster_ids(cluster_ids)
  _, order, starts, counts = _groups(ids)
  minimum = min(n, 2) if allow_repeats else n
  eligible = np.flatnonzero(counts >= minimum)
  if eligible.size < k:
    raise ValueError(
        f"m-per-class batches need {k} classes with >= {minimum} images each, but only "
        f"{eligible.size} of the {counts.size} classes have that many ({ids.size} images); "
        f"lower classes_per_batch or samples_per_class" +
        ("." if allow_repeats else ", or pass allow_repeats=True."))
  per_round = eligible.size // k
  if num_batches is None:
    num_batches = per_round
  num_batches = _check_int("num_batches", num_batches, 0)
  rng = epoch_rng(seed, epoch, "m_per_class")
  rounds = -(-num_batches // per_round)
  classes = np.concatenate(
      [rng.permutation(eligible)[:per_round * k] for _ in range(rounds)] or [np.zeros(0, int)])
  classes = classes[:num_batches * k].reshape(num_batches, k).astype(np.int64)
  # Without replacement: the n smallest of random keys over each class's members, on a
  # [rows, max_count] table (padding keys +inf, never chosen) built in bounded chunks of rows.
  flat = classes.reshape(-1)
  width = int(counts[eligible].max())
  pick = np.empty((flat.size, n), np.int64)
  chunk = max(1, _CHUNK_ELEMENTS // width)
  for start in range(0, flat.size, chunk):
    rows = flat[start:start + chunk]
    keys = rng.random((rows.size, width))
    keys[np.arange(width)[None, :] >= counts[rows][:, None]] = np.inf
    top = np.argsort(keys, axis=1, kind="stable")[:, :n]
    if top.shape[1] < n:  # every class is smaller than n (allow_repeats): filled below
      top = np.pad(top, ((0, 0), (0, n - top.shape[1])))
    pick[start:start + chunk] = top
  small = counts[flat] < n
  if small.any():  # allow_repeats: n uniform draws with replacement
    pick[small] = (rng.random((int(small.sum()), n)) * counts[flat[small]][:, None]).astype(
        np.int64)
  batches = order[starts[flat][:, None] + pick]
  return batches.reshape(num_batches, k * n)
