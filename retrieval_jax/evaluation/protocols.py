"""Which scores a test set is judged by, as plain functions of ``(ranks, dataset)``.

A :class:`~retrieval_jax.data.datasets.RetrievalSet`'s ``gnd_kind`` names its protocol
(DESIGN §4.4):

- ``"revisited"`` (ROxford5k, RParis6k, their +R1M variants, the synthetic benchmark): mAP and
  clipped mP@1/5/10 for each of Easy, Medium and Hard (``metrics.revisited_gnd``).
- ``"original"`` (Oxford5k, Paris6k): mAP with ok = good + ok (``metrics.original_gnd``).
- ``"ok_junk"`` (Holidays, UKBench, INSTRE, custom sets): mAP of the ground truth as given; where
  queries are database images (``query_db_indices``) the query's own image is made junk
  (``metrics.exclude_query_gnd``, a no-op for the builders, which already list it as junk). When
  every image of the database is a query and every group (``database_ids``) has 4 images, as in
  UKBench, the N-S score (``metrics.ukbench_ns_score``) is added.

Scores are fractions in [0, 1] (N-S in [0, 4]), as :mod:`retrieval_jax.metrics` returns them.
Queries with no positive under a protocol are excluded from its means; their indices are
returned with the scores so a report can state them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from retrieval_jax import metrics
from retrieval_jax.data.datasets import RetrievalSet

__all__ = ["has_ns_score", "ok_junk_gnd", "protocol_name", "score_ranks"]

#: Group size of the UKBench N-S protocol.
NS_GROUP_SIZE = 4


def protocol_name(dataset: RetrievalSet) -> str:
  """``"revisited"``, ``"original"``, ``"ok_junk"`` or ``"ukbench"`` (ok_junk + N-S)."""
  if dataset.gnd_kind == "ok_junk" and has_ns_score(dataset):
    return "ukbench"
  return dataset.gnd_kind


def has_ns_score(dataset: RetrievalSet) -> bool:
  """Whether the UKBench N-S score applies: every database image is a query exactly once
  (``query_db_indices`` a permutation of the database) and every group of ``database_ids`` has
  4 images."""
  own, ids = dataset.query_db_indices, dataset.database_ids
  n_db = len(dataset.database)
  if own is None or ids is None or len(own) != n_db or n_db == 0:
    return False
  if not np.array_equal(np.sort(own), np.arange(n_db)):
    return False
  _, counts = np.unique(ids, return_counts=True)
  return bool((counts == NS_GROUP_SIZE).all())


def ok_junk_gnd(dataset: RetrievalSet) -> list[dict]:
  """The ``ok``/``junk`` ground truth of an ``ok_junk`` set, with each query's own database
  image made junk when ``query_db_indices`` is given (Holidays rule)."""
  gnd = [{"ok": g["ok"], "junk": g["junk"]} for g in dataset.gnd]
  if dataset.query_db_indices is not None:
    gnd = metrics.exclude_query_gnd(gnd, dataset.query_db_indices)
  return gnd


def _without_positives(gnd: Sequence[dict]) -> list[int]:
  return [q for q, g in enumerate(gnd) if len(g["ok"]) == 0]


def _map_scores(ranks: np.ndarray, gnd: list[dict], kappas: Sequence[int] | None,
                n_db: int) -> tuple[dict[str, float], list[int]]:
  """``{"mAP": ..., ["mP@k": ...]}`` and the queries excluded for having no positive."""
  with warnings.catch_warnings():
    # compute_map warns about queries without positives; they are returned (and reported)
    # instead, so the warning would only repeat them.
    warnings.simplefilter("ignore", UserWarning)
    m, _, mpk, _ = metrics.compute_map(ranks, gnd, kappas or (1,), n_db=n_db)
  scores = {"mAP": float(m)}
  if kappas:
    scores.update({f"mP@{k}": float(v) for k, v in zip(kappas, mpk)})
  return scores, _without_positives(gnd)


def score_ranks(ranks: ArrayLike, dataset: RetrievalSet, *, kappas: Sequence[int] = (1, 5, 10),
                n_db: int | None = None) -> dict[str, Any]:
  """All the scores of ``dataset``'s protocol for one ranking.

  Args:
    ranks: int ``[Q, n_list]`` database indices best first, one row per query of ``dataset``;
      a full ranking (``n_list = N``) or a truncated top-k list.
    dataset: the test set (its ``gnd``, ``gnd_kind``, ``query_db_indices``, ``database_ids``).
    kappas: the k of mP@k (revisited protocols).
    n_db: database size; defaults to ``len(dataset.database)``. Positives missing from a
      truncated list count as misses.

  Returns:
    ``{"protocol": name, "scores": ..., "excluded_queries": ...}``. Revisited: ``scores`` is
    ``{"easy"|"medium"|"hard": {"mAP", "mP@1", ...}}`` and ``excluded_queries`` maps each
    protocol to the queries it has no positive for. Original / ok_junk: ``scores`` is
    ``{"mAP"}`` (plus ``"N-S"`` for UKBench-like sets) and ``excluded_queries`` a list.

  Raises:
    ValueError: ``ranks`` does not have one row per query, or ``metrics`` rejects it.
  """
  ranks = np.asarray(ranks)
  n_q = len(dataset.queries)
  if ranks.ndim != 2 or ranks.shape[0] != n_q:
    raise ValueError(f"ranks must be [Q={n_q}, n_list] (one row per query of "
                     f"{dataset.name}); got shape {ranks.shape}.")
  n_db = len(dataset.database) if n_db is None else n_db
  name = protocol_name(dataset)
  if dataset.gnd_kind == "revisited":
    scores, excluded = {}, {}
    for protocol in metrics.PROTOCOLS:
      scores[protocol], excluded[protocol] = _map_scores(
          ranks, metrics.revisited_gnd(dataset.gnd, protocol), kappas, n_db)
    return {"protocol": name, "scores": scores, "excluded_queries": excluded}
  if dataset.gnd_kind == "original":
    scores, excluded = _map_scores(ranks, metrics.original_gnd(dataset.gnd), None, n_db)
    return {"protocol": name, "scores": scores, "excluded_queries": excluded}
  scores, excluded = _map_scores(ranks, ok_junk_gnd(dataset), None, n_db)
  if name == "ukbench":
    # N-S wants row i to rank the database for database image i (the query itself counts).
    by_image = np.empty_like(ranks[:, :NS_GROUP_SIZE])
    by_image[dataset.query_db_indices] = ranks[:, :NS_GROUP_SIZE]
    scores["N-S"] = metrics.ukbench_ns_score(by_image, dataset.database_ids)
  return {"protocol": name, "scores": scores, "excluded_queries": excluded}
