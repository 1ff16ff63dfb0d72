"""Retrieval evaluation: Oxford AP/mAP, clipped mP@k, revisited E/M/H, Holidays, UKBench, recall@k.

Host-side numpy, vectorised over queries (DESIGN §4.4). Every score is built on one core: for a
chunk of queries, label each database image (other / positive / junk), gather the labels in rank
order, drop junk, and return the junk-adjusted 0-based rank of every positive found. Memory is
bounded by processing the queries in chunks of about ``_CHUNK_ELEMENTS`` table cells, so 70
queries against 1,000,000 database images fit comfortably.

Conventions that differ from revisitop's code: ``ranks`` holds one row per query
(``[n_queries, n_list]``, revisitop uses ``[n_db, n_queries]``), and scores are fractions in
[0, 1], not percent.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from retrieval_jax._validation import check_ndim

__all__ = [
    "compute_map",
    "exclude_query_gnd",
    "hit_rate_at_k",
    "holidays_map",
    "original_gnd",
    "precision_recall_curve",
    "recall_at_k",
    "revisited_gnd",
    "ukbench_ns_score",
]

PROTOCOLS = ("easy", "medium", "hard")

_OTHER, _OK, _JUNK = 0, 1, 2
# Cells of the per-chunk [chunk, n_db] label table (int8) and its helpers: ~16 MB each.
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- validation


def _check_ranks(ranks: ArrayLike, n_db: int | None) -> tuple[np.ndarray, int]:
  """Returns ``(ranks as an array [n_q, n_list], n_db)`` after checking shape, dtype, range, dups.

  The integer dtype is kept: converting 70 x 1e6 int32 indices to intp would double the memory.
  """
  ranks = np.asarray(ranks)
  check_ndim("ranks", ranks, 2, "[n_queries, n_list] of database indices, best first")
  if not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"ranks must hold integer database indices; got dtype {ranks.dtype}.")
  n_q, n_list = ranks.shape
  if n_db is None:
    n_db = n_list
  elif isinstance(n_db, bool) or not isinstance(n_db, (int, np.integer)) or n_db < n_list:
    raise ValueError(
        f"n_db must be an integer >= the ranked list length {n_list} (the number of database "
        f"images); got {n_db!r}.")
  n_db = int(n_db)
  if ranks.size:
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0 or hi >= n_db:
      raise ValueError(
          f"ranks holds indices in [{lo}, {hi}] but they must lie in [0, n_db={n_db}); for a "
          f"truncated list (e.g. a top-k from an index) pass n_db=<database size>.")
  # A row with n_list distinct entries marks n_list cells of a [chunk, n_db] table.
  chunk = max(1, _CHUNK_ELEMENTS // max(n_db, 1))
  for start in range(0, n_q, chunk):
    block = ranks[start:start + chunk]
    seen = np.zeros((len(block), n_db), dtype=bool)
    seen[np.arange(len(block))[:, None], block] = True
    bad = np.flatnonzero(np.count_nonzero(seen, axis=1) != n_list)
    if bad.size:
      raise ValueError(
          f"ranks must not repeat a database index within a query's row; row {start + bad[0]} "
          f"has duplicates.")
  return ranks, n_db


def _check_ks(name: str, ks: ArrayLike) -> np.ndarray:
  """Returns ``ks`` as int64 [K] after checking they are positive integers."""
  values = np.atleast_1d(np.asarray(ks))
  if (values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer)
      or (values <= 0).any()):
    raise ValueError(f"{name} must be a non-empty sequence of positive integers; got {ks!r}.")
  return values.astype(np.int64)


def _index_list(name: str, values: ArrayLike, n_db: int) -> np.ndarray:
  """Returns ``values`` as a sorted, duplicate-free int64 array of indices in [0, n_db)."""
  arr = np.asarray(values).reshape(-1)
  if arr.size == 0:
    return np.zeros(0, dtype=np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer database indices; got dtype {arr.dtype}.")
  if arr.min() < 0 or arr.max() >= n_db:
    raise ValueError(
        f"{name} holds indices in [{arr.min()}, {arr.max()}] but they must lie in "
        f"[0, n_db={n_db}).")
  return np.unique(arr.astype(np.int64))


def _entry(gnd: Sequence[Mapping], q: int, key: str) -> ArrayLike:
  """Returns ``gnd[q][key]``, raising a ValueError naming the entry when it is missing."""
  if not isinstance(gnd[q], Mapping):
    raise ValueError(f"gnd[{q}] must be a dict; got {type(gnd[q]).__name__}.")
  if key not in gnd[q]:
    raise ValueError(f"gnd[{q}] must have a {key!r} entry; it has {sorted(gnd[q])}.")
  return gnd[q][key]


def _check_gnd(gnd: Sequence[Mapping], n_q: int, n_db: int) -> tuple[list, list]:
  """Returns per-query ``(ok, junk)`` index arrays; an index in both counts as ok."""
  if len(gnd) != n_q:
    raise ValueError(f"gnd must have one entry per query (ranks has {n_q} rows); got {len(gnd)}.")
  oks, junks = [], []
  for q in range(n_q):
    ok = _index_list(f"gnd[{q}]['ok']", _entry(gnd, q, "ok"), n_db)
    junk = _index_list(f"gnd[{q}]['junk']", gnd[q].get("junk", ()), n_db)
    oks.append(ok)
    junks.append(np.setdiff1d(junk, ok, assume_unique=True))
  return oks, junks


def _nonempty_queries(n_ok: np.ndarray) -> np.ndarray:
  """Bool [n_q]: queries with positives. Warns about the others; raises if there are none."""
  empty = np.flatnonzero(n_ok == 0)
  if empty.size == len(n_ok):
    raise ValueError(f"gnd has no positives ('ok' is empty) for every one of the {len(n_ok)} "
                     f"queries; nothing to evaluate.")
  if empty.size:
    shown = ", ".join(map(str, empty[:20])) + (", ..." if empty.size > 20 else "")
    warnings.warn(
        f"{empty.size} of {len(n_ok)} queries have no positives ('ok' is empty) and are excluded "
        f"from the means: queries [{shown}].", stacklevel=3)
  return n_ok > 0


# --------------------------------------------------------------------------- shared core


def _positive_ranks(
    ranks: np.ndarray, chunk_labels: Callable[[int, int], np.ndarray], n_db: int
) -> tuple[np.ndarray, np.ndarray]:
  """Junk-adjusted ranks of the positives found in each ranked list.

  Args:
    ranks: int [n_q, n_list], validated database indices, best first.
    chunk_labels: ``(start, stop) -> int8 [stop - start, n_list]`` labels (``_OTHER``, ``_OK``,
      ``_JUNK``) of ``ranks[start:stop]`` in rank order.
    n_db: database size, which sets the chunk size (label tables are ``[chunk, n_db]``).

  Returns:
    ``(query, rank0)``, int64 [n_found] each: the query of every positive found and its 0-based
    rank after junk removal, sorted by query then rank.
  """
  n_q, n_list = ranks.shape
  chunk = max(1, _CHUNK_ELEMENTS // max(n_db, n_list, 1))
  queries, rank0s = [], []
  for start in range(0, n_q, chunk):
    stop = min(start + chunk, n_q)
    labels = chunk_labels(start, stop)
    # Flat (row-major) positions are sorted, so a positive's junk count is a difference of two
    # searchsorted results; this avoids a [chunk, n_list] cumsum when positives are few.
    flat_ok = np.flatnonzero(labels == _OK)
    flat_junk = np.flatnonzero(labels == _JUNK)
    rows, cols = np.divmod(flat_ok, n_list)
    junk_before = (np.searchsorted(flat_junk, flat_ok)
                   - np.searchsorted(flat_junk, rows * n_list))
    queries.append(rows + start)
    rank0s.append(cols - junk_before)
  return np.concatenate(queries).astype(np.int64), np.concatenate(rank0s).astype(np.int64)


def _gnd_positive_ranks(
    ranks: np.ndarray, oks: list, junks: list, n_db: int
) -> tuple[np.ndarray, np.ndarray]:
  """``_positive_ranks`` with labels from per-query ok/junk index lists (see ``_check_gnd``)."""
  def offsets(lists):
    return np.concatenate([[0], np.cumsum([len(v) for v in lists])])

  # CSR layout, so a chunk's table is filled by two scatters instead of a loop over its queries.
  ok_flat, ok_off = np.concatenate(oks), offsets(oks)
  junk_flat, junk_off = np.concatenate(junks), offsets(junks)

  def chunk_labels(start: int, stop: int) -> np.ndarray:
    table = np.zeros((stop - start, n_db), dtype=np.int8)
    for values, off, label in ((junk_flat, junk_off, _JUNK), (ok_flat, ok_off, _OK)):
      counts = np.diff(off[start:stop + 1])
      rows = np.repeat(np.arange(stop - start), counts)
      table[rows, values[off[start]:off[stop]]] = label
    return np.take_along_axis(table, ranks[start:stop], axis=1)

  return _positive_ranks(ranks, chunk_labels, n_db)


def _hits_within(query: np.ndarray, rank0: np.ndarray, limits: np.ndarray, n_q: int) -> np.ndarray:
  """Float [n_q, K]: per query, positives with 0-based rank < limit (limits [K] or [n_q, K])."""
  limits = np.broadcast_to(limits, (n_q, np.shape(limits)[-1]))
  counts = np.zeros(limits.shape)
  np.add.at(counts, query, rank0[:, None] < limits[query])
  return counts


# --------------------------------------------------------------------------- metrics


def compute_map(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """Mean average precision (Oxford rule) and clipped mean precision at k (revisitop).

  Protocol (Oxford5k/Paris6k, revisited ROxford/RParis): junk images are deleted from the ranked
  list before scoring, so they neither help nor hurt. AP is the trapezoidal rule of the Oxford
  ``compute_ap``: positive number ``t`` (0-based, in rank order) at junk-adjusted 0-based position
  ``r_t`` contributes ``(p0 + p1) / 2`` with ``p0 = 1 if r_t == 0 else t / r_t`` and
  ``p1 = (t + 1) / (r_t + 1)``; the sum is divided by ``len(ok)``. P@k is clipped:
  ``kq = min(1-based junk-adjusted rank of the last positive in the list, k)`` and
  ``P@k = #(positives with rank <= kq) / kq``.

  Positives missing from a truncated list count as misses (they add nothing to AP, which is still
  divided by ``len(ok)``); a query with no positive in its list has AP = 0 and P@k = 0. Queries with
  an empty ``ok`` list get NaN in ``aps`` and ``prs`` and are excluded from the means (a warning
  names them). ``ok`` and ``junk`` are treated as sets; an index in both counts as a positive.

  Args:
    ranks: int [n_queries, n_list], database indices best first, one row per query (revisitop's
      ``ranks`` is the transpose, [n_db, n_queries]). Without ``n_db`` each row must be a full
      ranking (n_list = n_db); a truncated list (e.g. top-100 from an ANN index) needs ``n_db``.
    gnd: n_queries dicts with ``"ok"`` and optionally ``"junk"`` lists of database indices, e.g.
      from ``revisited_gnd`` or ``original_gnd``.
    kappas: positive integers k for mP@k.
    n_db: number of database images; defaults to ``ranks.shape[1]``.

  Returns:
    ``(mAP, aps, mpk, prs)``: mAP as a float in [0, 1]; ``aps`` float [n_queries]; ``mpk`` float
    [len(kappas)] the mean P@k; ``prs`` float [n_queries, len(kappas)].

  Raises:
    ValueError: on malformed ``ranks``, ``gnd``, ``kappas`` or ``n_db``, or when no query has
      positives.

  References:
    Philbin et al., "Object retrieval with large vocabularies and fast spatial matching", CVPR 2007
    (``compute_ap``). Radenovic et al., "Revisiting Oxford and Paris: Large-Scale Image Retrieval
    Benchmarking", CVPR 2018 (revisitop ``compute_map``).
  """
  ranks, n_db = _check_ranks(ranks, n_db)
  kappas = _check_ks("kappas", kappas)
  oks, junks = _check_gnd(gnd, ranks.shape[0], n_db)
  n_q = ranks.shape[0]
  n_ok = np.array([len(ok) for ok in oks])
  valid = _nonempty_queries(n_ok)

  query, rank0 = _gnd_positive_ranks(ranks, oks, junks, n_db)
  # The result is sorted by query, so a positive's ordinal is its offset from its query's first.
  t = np.arange(len(query)) - np.searchsorted(query, query)
  p0 = np.where(rank0 == 0, 1.0, t / np.maximum(rank0, 1))
  p1 = (t + 1) / (rank0 + 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    aps = np.bincount(query, weights=(p0 + p1) / 2, minlength=n_q) / n_ok
  aps[~valid] = np.nan

  last = np.zeros(n_q, dtype=np.int64)
  np.maximum.at(last, query, rank0 + 1)
  kq = np.minimum(last[:, None], kappas[None, :])
  with np.errstate(invalid="ignore", divide="ignore"):
    prs = np.where(kq > 0, _hits_within(query, rank0, kq, n_q) / kq, 0.0)
  prs[~valid] = np.nan
  return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


#: Default recall levels of :func:`precision_recall_curve` (the demo's ``pr_curve.png``).
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
#: A recall level within this of a reachable recall counts as reached (0.3 of 10 positives
#: needs 3, although ``0.3 * 10`` is ``3.0000000000000004`` in floating point).
_LEVEL_TOLERANCE = 1e-9


def precision_recall_curve(ranks: ArrayLike, gnd: Sequence[Mapping[str, ArrayLike]],
                           recall_levels: ArrayLike = RECALL_LEVELS, *,
                           n_db: int | None = None) -> np.ndarray:
  """Interpolated precision at fixed recall levels, averaged over queries.

  Per query, junk is deleted from the ranked list first (as :func:`compute_map` does).
  The ``t``-th positive found (1-based) at junk-adjusted 1-based rank ``r_t`` has recall
  ``t / len(ok)`` and precision ``t / r_t``; the interpolated precision at recall level ``R`` is
  the highest precision at any rank whose recall is at least ``R`` (the usual PASCAL / TREC
  interpolation, which makes the curve non-increasing), and 0 when the list never reaches ``R``
  (positives missing from a truncated list). At ``R = 0`` it is the best precision anywhere.
  Queries with an empty ``ok`` list are excluded from the mean, as in ``compute_map``.

  Args:
    ranks: int ``[n_queries, n_list]`` database indices, best first.
    gnd: ``n_queries`` dicts with ``"ok"`` and optionally ``"junk"`` index lists, e.g.
      ``revisited_gnd(gnd, "medium")``.
    recall_levels: float ``[L]`` levels in ``[0, 1]``.
    n_db: number of database images; defaults to ``ranks.shape[1]`` (a full ranking).

  Returns:
    float64 ``[L]``: the mean interpolated precision at each level.

  Raises:
    ValueError: malformed ``ranks`` or ``gnd`` (as ``compute_map``), levels outside ``[0, 1]``,
      or no query with positives.
  """
  # compute_map's validation and its junk-adjusted ranks of the positives found, so both
  # scores read a ranked list the same way.
  ranks, n_db = _check_ranks(ranks, n_db)
  oks, junks = _check_gnd(gnd, ranks.shape[0], n_db)
  levels = np.asarray(recall_levels, np.float64)
  if levels.ndim != 1 or not np.all((levels >= 0) & (levels <= 1)):
    raise ValueError(f"recall_levels must be a 1-D array of values in [0, 1]; got "
                     f"{np.asarray(recall_levels)!r}.")
  n_q = ranks.shape[0]
  n_ok = np.array([len(ok) for ok in oks], np.int64)
  valid = n_ok > 0
  if not valid.any():
    raise ValueError(f"gnd has no positives ('ok' is empty) for every one of the {n_q} "
                     f"queries; nothing to evaluate.")
  query, rank0 = _gnd_positive_ranks(ranks, oks, junks, n_db)
  ordinal = np.arange(len(query)) - np.searchsorted(query, query)  # t - 1, sorted by query
  width = int(n_ok.max())
  precision = np.zeros((n_q, width))  # [Q, positive]; 0 for positives never found
  precision[query, ordinal] = (ordinal + 1) / (rank0 + 1)
  # Best precision at this positive or any later one: the interpolation's max over R' >= R.
  envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
  needed = np.ceil(levels[None, :] * n_ok[:, None] - _LEVEL_TOLERANCE)  # positives for level R
  column = np.clip(needed, 1, np.maximum(n_ok, 1)[:, None]).astype(np.int64) - 1
  return np.take_along_axis(envelope, column, axis=1)[valid].mean(axis=0)


def _hits_at_k(ranks: ArrayLike, gnd: Sequence[Mapping[str, ArrayLike]], ks: Sequence[int],
               n_db: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Positives in the junk-removed top k ``[n_valid, K]`` and ``len(ok)`` ``[n_valid]``, over the
  queries with positives (the others are excluded with a warning)."""
  ranks, n_db = _check_ranks(ranks, n_db)
  ks = _check_ks("ks", ks)
  oks, junks = _check_gnd(gnd, ranks.shape[0], n_db)
  n_ok = np.array([len(ok) for ok in oks])
  valid = _nonempty_queries(n_ok)
  query, rank0 = _gnd_positive_ranks(ranks, oks, junks, n_db)
  return _hits_within(query, rank0, ks, ranks.shape[0])[valid], n_ok[valid]


def recall_at_k(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    ks: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> np.ndarray:
  """Mean recall at k: the fraction of each query's positives retrieved in the top k.

  Per query ``#(ok in the junk-removed top k) / len(ok)``, averaged over queries with positives
  (empty ones are excluded with a warning). This is the information-retrieval recall; the
  "Recall@K" of metric-learning papers (a query scores 1 if any positive is in the top k) is
  ``hit_rate_at_k``. The two agree when every query has exactly one positive.

  Args:
    ranks: int [n_queries, n_list], database indices best first (see ``compute_map``).
    gnd: n_queries dicts with ``"ok"`` and optionally ``"junk"`` index lists.
    ks: positive integers k.
    n_db: number of database images; required when the lists are truncated.

  Returns:
    float [len(ks)], values in [0, 1].
  """
  hits, n_ok = _hits_at_k(ranks, gnd, ks, n_db)
  return (hits / n_ok[:, None]).mean(axis=0)


def hit_rate_at_k(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    ks: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> np.ndarray:
  """Hit rate at k: the fraction of queries with at least one positive in the top k.

  This is what metric-learning papers (CUB, Cars196, SOP, In-Shop) call "Recall@K". Unlike
  ``recall_at_k`` it ignores how many positives a query has: one hit in the junk-removed top k
  scores 1. Queries with an empty ``ok`` list are excluded with a warning.

  Args:
    ranks: int [n_queries, n_list], database indices best first (see ``compute_map``).
    gnd: n_queries dicts with ``"ok"`` and optionally ``"junk"`` index lists.
    ks: positive integers k.
    n_db: number of database images; required when the lists are truncated.

  Returns:
    float [len(ks)], values in [0, 1].

  References:
    Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016.
  """
  hits, _ = _hits_at_k(ranks, gnd, ks, n_db)
  return (hits > 0).mean(axis=0)


def ukbench_ns_score(ranks: ArrayLike, labels: ArrayLike) -> float:
  """UKBench N-S score: mean number of same-object images among each image's top 4.

  Protocol (Nister & Stewenius): every database image is a query against the whole database,
  itself included, so the query counts as one of its own relevant images. With UKBench's groups
  of 4 this equals ``4 x mean recall@4`` and ranges over 0..4. Groups of other sizes are allowed;
  the score is still the mean count of same-group images in the top 4 (so it is no longer
  4 x recall@4).

  Args:
    ranks: int [n_db, n_list], n_list >= 4; row i ranks the database for query image i.
    labels: int [n_db], the object group of each database image.

  Returns:
    The N-S score, a float in [0, 4].

  References:
    Nister & Stewenius, "Scalable Recognition with a Vocabulary Tree", CVPR 2006.
  """
  labels = np.asarray(labels)
  check_ndim("labels", labels, 1, "[n_db] of group ids")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must hold integer group ids; got dtype {labels.dtype}.")
  n_db = len(labels)
  if np.ndim(ranks) == 2 and not 4 <= np.shape(ranks)[1] <= n_db:
    raise ValueError(f"ranks must list between 4 and n_db = len(labels) = {n_db} images per "
                     f"query; got {np.shape(ranks)[1]}.")
  ranks, _ = _check_ranks(ranks, n_db)
  if ranks.shape[0] != n_db:
    raise ValueError(f"ranks must have one row per database image ({n_db} labels); got "
                     f"{ranks.shape[0]} rows.")
  top4 = ranks[:, :4]

  def chunk_labels(start: int, stop: int) -> np.ndarray:
    same = labels[top4[start:stop]] == labels[start:stop, None]
    return np.where(same, _OK, _OTHER).astype(np.int8)

  query, _ = _positive_ranks(top4, chunk_labels, n_db)
  return float(np.bincount(query, minlength=n_db).mean())


def holidays_map(
    ranks: ArrayLike,
    gnd: Sequence[Mapping[str, ArrayLike]],
    query_db_indices: ArrayLike,
    *,
    n_db: int | None = None,
) -> float:
  """INRIA Holidays mAP: Oxford-rule mAP with each query removed from its own ranking.

  Holidays queries are database images, so a query's own entry (usually at rank 0) is made junk:
  it neither helps nor hurts (``exclude_query_gnd``).

  Args:
    ranks: int [n_queries, n_list], database indices best first (see ``compute_map``).
    gnd: n_queries dicts with ``"ok"`` (the query's other images) and optionally ``"junk"``.
    query_db_indices: int [n_queries], the database index of each query image.
    n_db: number of database images; required when the lists are truncated.

  Returns:
    mAP as a float in [0, 1].

  References:
    Jegou et al., "Hamming embedding and weak geometric consistency for large scale image
    search", ECCV 2008.
  """
  return compute_map(ranks, exclude_query_gnd(gnd, query_db_indices), n_db=n_db)[0]


# --------------------------------------------------------------------------- ground truth


def revisited_gnd(gnd: Sequence[Mapping[str, ArrayLike]], protocol: str) -> list[dict]:
  """Builds the ground truth of one revisited ROxford/RParis protocol.

  Protocol (revisitop): easy: ok = easy, junk = junk + hard; medium: ok = easy + hard,
  junk = junk; hard: ok = hard, junk = junk + easy.

  Args:
    gnd: per-query dicts with ``"easy"``, ``"hard"`` and ``"junk"`` index lists (and optionally a
      ``"bbx"`` query box, which is kept).
    protocol: ``"easy"``, ``"medium"`` or ``"hard"``.

  Returns:
    A list of dicts with int64 ``"ok"`` and ``"junk"`` arrays (and ``"bbx"`` where given).

  References:
    Radenovic et al., "Revisiting Oxford and Paris", CVPR 2018.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}.")
  ok_keys, junk_keys = {
      "easy": (("easy",), ("junk", "hard")),
      "medium": (("easy", "hard"), ("junk",)),
      "hard": (("hard",), ("junk", "easy")),
  }[protocol]
  return [_combine(gnd, q, ok_keys, junk_keys) for q in range(len(gnd))]


def original_gnd(gnd: Sequence[Mapping[str, ArrayLike]]) -> list[dict]:
  """Builds the original Oxford5k/Paris6k ground truth: ok = good + ok, junk = junk.

  Args:
    gnd: per-query dicts with ``"good"``, ``"ok"`` and ``"junk"`` index lists (and optionally
      ``"bbx"``, which is kept).

  Returns:
    A list of dicts with int64 ``"ok"`` and ``"junk"`` arrays (and ``"bbx"`` where given).

  References:
    Philbin et al., CVPR 2007.
  """
  return [_combine(gnd, q, ("good", "ok"), ("junk",)) for q in range(len(gnd))]


def _combine(gnd: Sequence[Mapping], q: int, ok_keys: tuple, junk_keys: tuple) -> dict:
  """``{"ok": concat of gnd[q][ok_keys], "junk": concat of gnd[q][junk_keys]}`` (+ ``"bbx"``)."""
  def concat(keys):
    return np.concatenate(
        [np.asarray(_entry(gnd, q, k), dtype=np.int64).reshape(-1) for k in keys])

  entry = {"ok": concat(ok_keys), "junk": concat(junk_keys)}
  if "bbx" in gnd[q]:
    entry["bbx"] = gnd[q]["bbx"]
  return entry


def exclude_query_gnd(
    gnd: Sequence[Mapping[str, ArrayLike]], query_db_indices: ArrayLike
) -> list[dict]:
  """Makes each query's own database image junk, for benchmarks whose queries are in the database.

  Used for INRIA Holidays: the query is excluded from its own ranking, so it neither helps nor
  hurts. The index is also dropped from ``"ok"`` (where an index in both would count as positive).

  Args:
    gnd: n_queries dicts with ``"ok"`` and optionally ``"junk"`` index lists; other keys are kept.
    query_db_indices: int [n_queries], the database index of each query image.

  Returns:
    A new list of dicts with int64 ``"ok"`` and ``"junk"`` arrays.
  """
  query_db_indices = np.asarray(query_db_indices)
  check_ndim("query_db_indices", query_db_indices, 1, "[n_queries]")
  if not np.issubdtype(query_db_indices.dtype, np.integer):
    raise ValueError(
        f"query_db_indices must hold integer database indices; got dtype "
        f"{query_db_indices.dtype}.")
  if len(query_db_indices) != len(gnd):
    raise ValueError(f"query_db_indices must have one entry per gnd entry ({len(gnd)}); got "
                     f"{len(query_db_indices)}.")
  out = []
  for q, own in enumerate(query_db_indices.tolist()):
    ok = np.asarray(_entry(gnd, q, "ok"), dtype=np.int64).reshape(-1)
    junk = np.asarray(gnd[q].get("junk", ()), dtype=np.int64).reshape(-1)
    out.append({**gnd[q], "ok": ok[ok != own], "junk": np.append(junk, own)})
  return out
