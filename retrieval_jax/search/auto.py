"""``build_index``: exact search or ScaNN, chosen from the database size and a measured check.

How ``mode="auto"`` decides:

1. Static rule (:func:`choose_index`): exact below ``MIN_ROWS_FOR_SCANN = 50_000`` rows (the
   exact scan of 50k rows costs ~1 ms per query here, less than building a ScaNN index pays back
   over typical query counts) and for ``recall_target > MAX_SCANN_RECALL = 0.99`` (ScaNN's
   recall is not promised that high at practical settings).
2. Otherwise ScaNN is built with the defaults of :mod:`retrieval_jax.search.scann_index` and
   calibrated on ``calibration_queries`` (default: 256 database rows, their own row excluded
   from both answers): ``leaves_to_search`` is doubled from 1/32 of the leaves until recall@10
   against exact search reaches ``recall_target``; the exact scan of the same queries is timed
   (after compilation), and ScaNN is kept only if it reached the target *and* was faster. So
   ``auto`` is never slower than exact at the requested recall on the calibration queries.

Measured on this 2-core CPU (``benchmarks/search.py``, 1000 queries, k = 100, hard clustered
sets of ``search.synthetic``, other jobs sharing the cores): ScaNN at recall@10 >= 0.95 ran
10x the jax exact QPS on 1M x 128 (300/1000 leaves, r@10 0.957; exact 159 QPS), 2-3x on
100k x 2048 (144/316 leaves, r@10 0.978; exact 282 QPS), ~8x on 100k x 512 and ~5x on
100k x 128; at 20k x 512 it was still ~4x per query but its 3-4 s build only pays back after
~10k queries, hence the static 50k-row floor. The crossover is a matter of ``N`` more than
``D``: both costs grow as ``N * D`` but ScaNN scores only a fraction of the rows; it loses at
small ``N`` and where the data are too unstructured for partitioning to reach the target recall
(then the calibration falls back to exact).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import check_ndim
from retrieval_jax.search.exact import ExactIndex, exact_search
from retrieval_jax.search.scann_index import ScannIndex

MIN_ROWS_FOR_SCANN = 50_000
MAX_SCANN_RECALL = 0.99
MODES = ("auto", "exact", "scann")
_CALIBRATION_QUERIES = 256
_RECALL_K = 10


def choose_index(num_rows: int, dim: int, recall_target: float = 0.95) -> str:
  """The static part of the ``auto`` rule: ``"exact"`` or ``"scann"`` (to be calibrated)."""
  del dim  # both costs scale with D alike; kept in the signature for future rules
  if num_rows < MIN_ROWS_FOR_SCANN or recall_target > MAX_SCANN_RECALL:
    return "exact"
  return "scann"


def _recall(truth: np.ndarray, found: np.ndarray) -> float:
  return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found)]))


def _without_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
  if self_ids is None:
    return ids[:, :k]
  return np.stack([row[row != s][:k] for row, s in zip(ids, self_ids)])


def build_index(descriptors, *, mode: str = "auto", recall_target: float = 0.95,
                calibration_queries=None, ids=None, metadata=None, model_id: str = "",
                seed: int = 0, **scann_kwargs) -> ExactIndex | ScannIndex:
  """Builds an exact or ScaNN index over ``descriptors`` (float ``[N, D]``).

  Args:
    descriptors: database rows.
    mode: ``"auto"`` (see the module docstring), ``"exact"`` or ``"scann"``.
    recall_target: recall@10 against exact search that ``auto`` must reach with ScaNN.
    calibration_queries: float ``[Q, D]`` representative queries for ``auto``; default 256
      seeded database rows (their own row excluded from the answers).
    ids, metadata, model_id: as for :meth:`ScannIndex.build`.
    seed: seed of the default calibration sample.
    **scann_kwargs: passed to :meth:`ScannIndex.build`.

  Returns:
    An :class:`ExactIndex` or :class:`ScannIndex`; after ``auto``, ``index.auto_report`` holds
    the measured recall and seconds per query of both candidates (when ScaNN was tried).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
  if not 0.0 < recall_target <= 1.0:
    raise ValueError(f"recall_target must be in (0, 1]; got {recall_target!r}.")
  check_ndim("descriptors", descriptors, 2, "[N, D]")
  n, d = np.shape(descriptors)
  common = {"ids": ids, "metadata": metadata, "model_id": model_id}
  if mode == "exact" or (mode == "auto" and choose_index(n, d, recall_target) == "exact"):
    index = ExactIndex.build(descriptors, **common)
    if mode == "auto":
      index.auto_report = {"choice": "exact", "reason": "static rule"}
    return index
  scann = ScannIndex.build(descriptors, **common, **scann_kwargs)
  if mode == "scann":
    return scann
  return calibrate(descriptors, scann, recall_target, calibration_queries, seed, common)


def calibrate(descriptors, scann: ScannIndex, recall_target: float = 0.95, queries=None,
              seed: int = 0, common: dict | None = None) -> ExactIndex | ScannIndex:
  """The measured step of ``auto`` on a built ScaNN index: keep it (with ``leaves_to_search``
  lowered as far as ``recall_target`` allows) if faster than exact search, else an exact index.
  """
  common = common or {"ids": scann.ids, "metadata": scann.metadata, "model_id": scann.model_id}
  n = scann.num_rows
  self_rows = None
  if queries is None:
    self_rows = np.sort(np.random.default_rng(seed).choice(n, min(n, _CALIBRATION_QUERIES),
                                                           replace=False))
    queries = np.asarray(descriptors[self_rows], np.float32)
  queries = np.asarray(queries, np.float32)
  k = min(n, _RECALL_K + (self_rows is not None))
  database = jnp.asarray(descriptors)
  jax.block_until_ready(exact_search(queries, database, k))  # compile before timing
  start = time.perf_counter()
  _, truth = jax.block_until_ready(exact_search(queries, database, k))
  exact_seconds = time.perf_counter() - start
  truth = _without_self(np.asarray(truth), self_rows, _RECALL_K)
  self_ids = None if self_rows is None else self_rows

  report = {"exact_seconds_per_query": exact_seconds / len(queries), "recall_target":
            recall_target, "tried": []}
  leaves = scann.params["num_leaves"]
  candidates = [0] if not leaves else sorted({min(leaves, max(1, leaves // 32) * 2**i)
                                              for i in range(6)})
  chosen = None
  for leaves_to_search in candidates:
    extra = {"leaves_to_search": leaves_to_search} if leaves_to_search else {}
    start = time.perf_counter()
    _, found = scann.search(queries, k, **extra)
    seconds = time.perf_counter() - start
    # ScaNN answers with user ids; map them back to rows for the comparison.
    order = np.argsort(scann.ids)
    rows = order[np.clip(np.searchsorted(scann.ids[order], found), 0, n - 1)]
    recall = _recall(truth, _without_self(rows, self_ids, _RECALL_K))
    report["tried"].append({"leaves_to_search": leaves_to_search, "recall": recall,
                            "seconds_per_query": seconds / len(queries)})
    if recall >= recall_target:
      chosen = (leaves_to_search, seconds)
      break
  if chosen is not None and chosen[1] < exact_seconds:
    if chosen[0]:
      scann.params["leaves_to_search"] = chosen[0]
    scann.auto_report = {"choice": "scann", **report}
    return scann
  index = ExactIndex.build(descriptors, **common)
  index.auto_report = {"choice": "exact", **report}
  return index
