"""The evaluation protocol runner: descriptors -> (whitening) -> (re-ranking) -> search -> scores.

>>> report = evaluate(retriever, dataset, {"whitening": "lw"}, whitening_set=train_split)
>>> print(format_table(report))

Phases (each timed in the report):

1. **Extract** the database and the queries (:mod:`.descriptors`): float16 shards on disk, one
   per host, reused when the same retriever already described the same set with the same
   settings. Queries are cropped to ``query_boxes`` unless ``crop_queries=False`` (which the
   report and the table then state). Queries that are database images (``query_db_indices``,
   Holidays / UKBench) and are not cropped reuse the database rows.
2. **Whitening** (optional): PCA-w or Lw learned on the descriptors of a named training
   :class:`~retrieval_jax.data.datasets.InstanceSet` (Lw pairs from its ``positive_pairs`` or
   clusters via ``data.samplers.sample_pairs``), applied to queries and database.
3. **Re-ranking** (optional): DBA on the database, then AQE or alpha-QE on the queries
   (:mod:`retrieval_jax.rerank`), e.g. ``"dba+alpha_qe"``.
4. **Search**: exact inner-product top-k (:func:`search`), the full ranking when it fits.
5. **Metrics**: the dataset's protocol (:mod:`.protocols`).

Memory: ``memory_budget_mb`` bounds every float32 ``[rows, cols]`` block the runner holds:
similarity blocks of the search (query chunks x database chunks), the database descriptors
when they are held in RAM (otherwise they are streamed from float16 memory maps, and whitened
or augmented copies go to float16 memory maps too), and the ranked lists (``top_k=None`` gives
the full ranking only when its int32 ``[Q, N]`` fits, else the top ``auto_top_k``; mAP of a
truncated list counts the positives beyond it as misses). Sorting temporaries add a small
multiple of the budget. Queries ``[Q, D]`` and whitening training descriptors are held in RAM.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Union

import jax
import ml_collections
import numpy as np

from retrieval_jax import distances, rerank, whitening
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.samplers import sample_pairs
from retrieval_jax.evaluation import protocols
from retrieval_jax.evaluation.descriptors import (DescriptorArray, DescriptorStore,
                                                  StoredDescriptors, descriptor_key,
                                                  extract_to_store, retriever_fingerprint)
from retrieval_jax.normalization import L2_EPS

__all__ = ["RERANKINGS", "WHITENINGS", "default_eval_config", "evaluate", "format_table",
           "search", "write_report"]

Descriptors = Union[DescriptorArray, StoredDescriptors]

WHITENINGS = (None, "pca", "lw")
RERANKINGS = (None, "aqe", "alpha_qe", "dba", "dba+aqe", "dba+alpha_qe")
_MB = 1 << 20


def default_eval_config() -> ml_collections.ConfigDict:
  """The fields :func:`evaluate` reads, with their defaults."""
  return ml_collections.ConfigDict({
      # Extraction.
      "scales": (1.0,),  # multi-scale: e.g. (1.0, 2 ** -0.5, 0.5), combined by the retriever
      "max_size": 1024,  # long side after resizing (never enlarged)
      "batch_size": None,  # None: the retriever's own
      "num_workers": 2,  # decoding threads
      "crop_queries": True,  # crop queries to query_boxes (the protocol); False is reported
      "extract_chunk": 1024,  # images per extract call / float16 block written
      # Whitening, learned on the InstanceSet passed as evaluate(..., whitening_set=...).
      "whitening": None,  # None | "pca" | "lw"
      "whitening_dims": None,  # keep this many components; None: all
      "whitening_pairs": None,  # Lw: pairs drawn with sample_pairs; None: all available
      "whitening_seed": 0,
      # Re-ranking.
      "rerank": None,  # None | "aqe" | "alpha_qe" | "dba" | "dba+aqe" | "dba+alpha_qe"
      "qe_k": 10,  # query expansion neighbours
      "alpha": 3.0,  # alpha-QE exponent
      "dba_k": 10,  # DBA neighbours (the row itself included)
      "dba_alpha": 3.0,  # DBA exponent (0: plain average)
      # Search and metrics.
      "kappas": (1, 5, 10),  # mP@k of the revisited protocols
      "top_k": None,  # ranked list length; None: full ranking if it fits, else auto_top_k
      "auto_top_k": 1000,
      "memory_budget_mb": 1024.0,  # largest float32 block (see the module docstring)
      # Outputs and cache.
      "output_dir": None,  # report.json (+ ranks.npy) here; None: nothing written
      "save_ranks": False,  # ranks.npy: int32 [Q, top_k] database indices, best first
      "cache_dir": None,  # descriptor store; None: <output_dir>/descriptors, or a temp dir
      "reuse_descriptors": True,  # reuse stored descriptors of the same retriever and set
      "retriever_id": None,  # cache identity; None: hash of the retriever's config + weights
  })


# --------------------------------------------------------------------------- config


def _positive_int(cfg: ml_collections.ConfigDict, name: str, optional: bool = False) -> None:
  value = cfg[name]
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}; got "
                     f"{value!r}.")


def _resolve_config(cfg: ml_collections.ConfigDict | dict | None) -> ml_collections.ConfigDict:
  """Defaults updated with ``cfg``, validated (each error names the field)."""
  full = default_eval_config()
  given = dict(cfg.items() if isinstance(cfg, ml_collections.ConfigDict) else (cfg or {}))
  unknown = sorted(set(given) - set(full))
  if unknown:
    raise ValueError(f"evaluation config has unknown field(s) {unknown}; known: {sorted(full)}.")
  for name, value in given.items():
    # None-valued defaults accept any type; the others keep theirs (ints widen to floats).
    try:
      full[name] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: {value!r} does not fit the field's type ({e}).") from None
  full.scales = tuple(full.scales)
  if not full.scales or any(isinstance(s, bool) or not isinstance(s, (int, float))
                            or not s > 0 for s in full.scales):
    raise ValueError(f"scales must be a non-empty sequence of positive numbers; got "
                     f"{full.scales!r}.")
  for name in ("max_size", "num_workers", "extract_chunk", "qe_k", "dba_k", "auto_top_k"):
    if name == "num_workers" and full.num_workers == 0:
      continue
    _positive_int(full, name)
  for name in ("batch_size", "whitening_dims", "whitening_pairs", "top_k"):
    _positive_int(full, name, optional=True)
  if full.whitening not in WHITENINGS:
    raise ValueError(f"whitening must be one of {WHITENINGS}; got {full.whitening!r}.")
  if full.rerank not in RERANKINGS:
    raise ValueError(f"rerank must be one of {RERANKINGS}; got {full.rerank!r}.")
  for name in ("alpha", "dba_alpha"):
    if isinstance(full[name], bool) or not isinstance(full[name], (int, float)) or not (
        math.isfinite(full[name]) and full[name] >= 0):
      raise ValueError(f"{name} must be a finite number >= 0; got {full[name]!r}.")
  budget = full.memory_budget_mb
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
    raise ValueError(f"memory_budget_mb must be a positive number; got {budget!r}.")
  full.kappas = tuple(full.kappas)
  if full.save_ranks and full.output_dir is None:
    raise ValueError("save_ranks needs an output_dir to write ranks.npy to.")
  return full


# --------------------------------------------------------------------------- search


def _top_k_block(queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The one place the runner searches: exact top-``k`` of ``block`` rows for each query,
  best first, ties to the lower row (``distances.top_k_similar``)."""
  scores, indices = distances.top_k_similar(queries, block, k, chunk_size=len(block))
  return np.asarray(scores), np.asarray(indices)


def _search_plan(n_q: int, n_db: int, dim: int, k: int, budget_cells: int) -> tuple[int, int]:
  """``(query rows, database rows)`` per block so every float32 block fits the budget."""
  # A full ranking holds a [q, N] similarity block; a top-k merge a [q, 2k] block.
  width = n_db if k == n_db else 2 * k
  if width > budget_cells:
    raise ValueError(f"memory_budget_mb is too small: one query's {width} similarity scores "
                     f"({width * 4 / _MB:.3g} MB) do not fit; raise it or lower top_k.")
  q_rows = max(1, min(n_q, budget_cells // width))
  db_rows = max(1, min(n_db, budget_cells // max(q_rows, dim, 1)))
  return q_rows, db_rows


def search(queries: Any, database: Descriptors | np.ndarray, k: int,
           memory_budget_mb: float = 1024.0) -> np.ndarray:
  """Exact inner-product ranking of the database for every query, in bounded memory.

  Queries are taken ``q`` rows at a time and the database streamed in blocks of ``b`` rows, with
  ``q`` and ``b`` chosen so that no float32 block exceeds ``memory_budget_mb``: the ``[q, b]``
  similarities, the ``[b, D]`` database block and the ``[q, 2k]`` running top-k merge (or, for
  a full ranking, the ``[q, N]`` similarities that are sorted once). Ties go to the lower
  database index, as ``np.argsort(-similarity, kind="stable")``.

  Args:
    queries: float ``[Q, D]``.
    database: float ``[N, D]`` (array, :class:`DescriptorArray` or :class:`StoredDescriptors`).
    k: list length, ``1 <= k``; ``k >= N`` gives the full ranking.
    memory_budget_mb: see above.

  Returns:
    int32 ``[Q, min(k, N)]`` database indices, best first.
  """
  if not isinstance(database, (DescriptorArray, StoredDescriptors)):
    database = DescriptorArray(database)
  queries = np.asarray(queries, dtype=np.float32)
  n_db, dim = database.shape
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be [Q, D={dim}]; got {queries.shape}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int; got {k!r}.")
  k = int(min(k, n_db))
  n_q = len(queries)
  q_rows, db_rows = _search_plan(n_q, n_db, dim, k, int(memory_budget_mb * _MB) // 4)
  ranks = np.empty((n_q, k), np.int32)
  for q0 in range(0, n_q, q_rows):
    qc = queries[q0:q0 + q_rows]
    if k == n_db:
      # Full ranking: scatter each block's scores to their columns, then one stable sort.
      sims = np.empty((len(qc), n_db), np.float32)
      for start, block in database.chunks(db_rows):
        scores, idx = _top_k_block(qc, block, len(block))
        np.put_along_axis(sims, start + idx, scores, axis=1)
      ranks[q0:q0 + len(qc)] = np.argsort(-sims, axis=1, kind="stable")
      continue
    best_s = np.full((len(qc), 0), -np.inf, np.float32)
    best_i = np.zeros((len(qc), 0), np.int32)
    for start, block in database.chunks(db_rows):
      scores, idx = _top_k_block(qc, block, min(k, len(block)))
      # The running best (earlier, lower indices) comes first, so the stable sort keeps ties
      # in index order.
      cat_s = np.concatenate([best_s, scores], axis=1)
      cat_i = np.concatenate([best_i, (start + idx).astype(np.int32)], axis=1)
      order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
      best_s = np.take_along_axis(cat_s, order, axis=1)
      best_i = np.take_along_axis(cat_i, order, axis=1)
    ranks[q0:q0 + len(qc)] = best_i
  return ranks


# --------------------------------------------------------------------------- pipeline pieces


def _l2n(x: np.ndarray) -> np.ndarray:
  """``x / (||x|| + 1e-6)`` per row (DESIGN §4.1), float32."""
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + L2_EPS)


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
  # As rerank: alpha = 0 weighs every neighbour 1 (AQE); otherwise max(s, 0)^alpha.
  return np.ones_like(scores) if alpha == 0 else np.maximum(scores, 0.0) ** alpha


def _expand_streamed(rows: np.ndarray, database: StoredDescriptors, k: int, alpha: float,
                     include_self: bool, budget_mb: float) -> np.ndarray:
  """``rerank``'s expansion with neighbours from :func:`search` and rows read from disk:
  ``l2n([x +] sum_i w_i x_i)`` over the top-``k`` database rows ``x_i`` of each row ``x``."""
  idx = search(rows, database, k, budget_mb)
  neighbours = database.take(idx)  # [n, k, D]
  scores = np.einsum("nd,nkd->nk", rows, neighbours)
  expanded = np.einsum("nk,nkd->nd", _weights(scores, alpha), neighbours)
  return _l2n(rows + expanded if include_self else expanded)


def _map_rows(database: Descriptors, fn, out_dim: int, budget_cells: int,
              store: DescriptorStore | None, key: str) -> Descriptors:
  """``fn`` applied to row blocks of ``database``: in RAM when the float32 result fits the
  budget (and the input does), else written block by block to a float16 store."""
  n, dim = database.shape
  if n * max(dim, out_dim) <= budget_cells or store is None:
    return DescriptorArray(fn(database.read()) if n else np.zeros((0, out_dim), np.float32))
  rows = max(1, budget_cells // max(dim, out_dim))
  return store.write(key, n, ((s, fn(b)) for s, b in database.chunks(rows)))


def _learn_whitening(kind: str, descriptors: np.ndarray, train: InstanceSet,
                     cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int | None]:
  """``(mean, P, number of pairs or None)`` learned on ``descriptors`` of ``train``."""
  if kind == "pca":
    mean, proj = whitening.learn_pca_whitening(descriptors)
    return mean, proj, None
  pairs = sample_pairs(train.cluster_ids, positive_pairs=train.positive_pairs,
                       num_pairs=cfg.whitening_pairs, seed=cfg.whitening_seed)
  mean, proj = whitening.learn_lw(descriptors, pairs[:, 0], pairs[:, 1])
  return mean, proj, len(pairs)


def _versions() -> dict[str, str]:
  import flax

  import retrieval_jax
  return {"retrieval_jax": retrieval_jax.__version__, "jax": jax.__version__,
          "jaxlib": _dist_version("jaxlib"),
          "flax": flax.__version__, "numpy": np.__version__, "ml_collections":
          _dist_version("ml_collections"), "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": str(jax.devices()[0].device_kind)}


def _dist_version(name: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def _barrier(name: str, process_count: int) -> None:
  """Waits for every host (shards are written before anyone reads them)."""
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _workspace(cfg: ml_collections.ConfigDict,
               process_count: int) -> Iterator[tuple[DescriptorStore, DescriptorStore, bool]]:
  """``(descriptor store, scratch store, persistent?)``; the scratch store (whitened and
  augmented copies) is deleted on exit, as is a temporary descriptor store."""
  directory = cfg.cache_dir or (None if cfg.output_dir is None
                                else os.path.join(cfg.output_dir, "descriptors"))
  if directory is None and process_count > 1:
    raise ValueError("cache_dir (or output_dir) must name a directory shared by the hosts when "
                     "jax.process_count() > 1.")
  with contextlib.ExitStack() as stack:
    if directory is None:
      directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="retrieval_eval."))
    store = DescriptorStore(directory)
    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=".scratch.", dir=directory))
    yield store, DescriptorStore(scratch), cfg.cache_dir is not None or cfg.output_dir is not None


# --------------------------------------------------------------------------- evaluate


def evaluate(retriever: Any, dataset: RetrievalSet,
             cfg: ml_collections.ConfigDict | dict | None = None, *,
             whitening_set: InstanceSet | None = None) -> dict[str, Any]:
  """Runs the evaluation protocol of ``dataset`` with ``retriever``; see the module docstring.

  Args:
    retriever: a :class:`retrieval_jax.Retriever`, or any object with its ``extract`` (the
      cache identity then comes from ``config``/``variables`` or ``cfg.retriever_id``).
    dataset: the test set.
    cfg: fields of :func:`default_eval_config` (missing ones take defaults).
    whitening_set: the training split whitening is learned on (required iff
      ``cfg.whitening``); its name goes into the report.

  Returns:
    The report (JSON-ready; also written to ``<output_dir>/report.json`` by process 0):
    ``dataset`` (name, protocol, sizes), ``config``, ``retriever``, ``extraction`` (scales,
    max_size, query cropping, descriptor dim, reuse), ``whitening`` (method, dims, learned_on,
    images, pairs; or None), ``rerank`` (method and parameters; or None), ``search`` (list
    length, full or truncated, chunking), ``metrics`` (see ``protocols.score_ranks``),
    ``excluded_queries``, ``timings_s`` (per phase), ``versions``, ``files``.

  Raises:
    ValueError: a bad config field, whitening requested without a ``whitening_set`` (or the
      reverse), a neighbour count larger than the database, or a memory budget too small for
      a single query.
  """
  start_total = time.perf_counter()
  cfg = _resolve_config(cfg)
  if not isinstance(dataset, RetrievalSet):
    raise ValueError(f"dataset must be a RetrievalSet; got {type(dataset).__name__}.")
  if cfg.whitening is not None and not isinstance(whitening_set, InstanceSet):
    raise ValueError(f"whitening={cfg.whitening!r} needs whitening_set, the InstanceSet to "
                     f"learn it on; got {type(whitening_set).__name__}.")
  if cfg.whitening is None and whitening_set is not None:
    raise ValueError(f"whitening_set {whitening_set.name!r} was given but whitening is None; "
                     f"set whitening to 'pca' or 'lw'.")
  n_db, n_q = len(dataset.database), len(dataset.queries)
  rerank_steps = () if cfg.rerank is None else tuple(cfg.rerank.split("+"))
  for step, field in (("dba", "dba_k"), ("aqe", "qe_k"), ("alpha_qe", "qe_k")):
    if step in rerank_steps and cfg[field] > n_db:
      raise ValueError(f"{field} = {cfg[field]} exceeds the {n_db} database images.")
  p, count = jax.process_index(), jax.process_count()
  budget_cells = int(cfg.memory_budget_mb * _MB) // 4
  timings: dict[str, float] = {}
  crop = cfg.crop_queries and dataset.query_boxes is not None
  settings = {"scales": list(cfg.scales), "max_size": cfg.max_size}
  extract_kw = dict(max_size=cfg.max_size, scales=cfg.scales, batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers, chunk_size=cfg.extract_chunk,
                    reuse=cfg.reuse_descriptors, process_index=p, process_count=count)

  with _workspace(cfg, count) as (store, scratch, persistent):
    retriever_id = cfg.retriever_id or (retriever_fingerprint(retriever) if persistent
                                        else "unsaved")

    # 1. Extraction.
    db_key = descriptor_key(dataset.name, "database", retriever_id, n_db, **settings)
    t = time.perf_counter()
    db_info = extract_to_store(retriever, dataset.database, store, db_key, **extract_kw)
    timings["extract_database"] = time.perf_counter() - t
    from_database = dataset.query_db_indices is not None and not crop
    t = time.perf_counter()
    q_info = None
    if not from_database:
      q_key = descriptor_key(dataset.name, "queries", retriever_id, n_q, crop=crop, **settings)
      q_info = extract_to_store(retriever, dataset.queries, store, q_key,
                                boxes=dataset.query_boxes if crop else None, **extract_kw)
    timings["extract_queries"] = time.perf_counter() - t
    train_key = train_info = None
    if cfg.whitening is not None:
      train_key = descriptor_key(whitening_set.name, "train", retriever_id, len(whitening_set),
                                 **settings)
      t = time.perf_counter()
      train_info = extract_to_store(retriever, whitening_set.images, store, train_key,
                                    **extract_kw)
      timings["extract_whitening_set"] = time.perf_counter() - t
    _barrier(f"retrieval_jax.evaluate:{db_key}", count)
    stored_db = store.open(db_key, n_db)
    database: Descriptors = stored_db
    dim = stored_db.shape[1]
    if n_db * dim <= budget_cells:
      database = DescriptorArray(stored_db.read())
    queries = (database.take(dataset.query_db_indices) if from_database
               else store.open(q_key, n_q).read())

    # 2. Whitening.
    whitening_report = None
    t = time.perf_counter()
    if cfg.whitening is not None:
      mean, proj, n_pairs = _learn_whitening(cfg.whitening,
                                             store.open(train_key, len(whitening_set)).read(),
                                             whitening_set, cfg)
      dims = cfg.whitening_dims
      if dims is not None and dims > proj.shape[0]:
        raise ValueError(f"whitening_dims = {dims} exceeds the descriptor dimension "
                         f"{proj.shape[0]}.")

      def whiten(x: np.ndarray) -> np.ndarray:
        return np.asarray(whitening.apply_whitening(x, mean, proj, dims))

      out_dim = dims or proj.shape[0]
      queries = whiten(queries)
      database = _map_rows(database, whiten, out_dim, budget_cells, scratch, "whitened")
      whitening_report = {
          "method": {"pca": "PCA-w", "lw": "Lw"}[cfg.whitening], "dims": out_dim,
          "learned_on": whitening_set.name, "images": len(whitening_set), "pairs": n_pairs,
          "pairs_from": (None if n_pairs is None else "positive_pairs"
                         if whitening_set.positive_pairs is not None else "cluster_ids"),
          "reused_descriptors": train_info.reused}
    timings["whitening"] = time.perf_counter() - t

    # 3. Re-ranking: DBA on the database, then query expansion against it.
    t = time.perf_counter()
    if "dba" in rerank_steps:
      if isinstance(database, DescriptorArray):
        database = DescriptorArray(np.asarray(rerank.database_side_augmentation(
            database.read(), cfg.dba_k, float(cfg.dba_alpha))))
      else:
        # Blocks of rows whose gathered [rows, dba_k, D] neighbours fit the budget.
        source, width = database, cfg.dba_k * database.shape[1]
        database = scratch.write("dba", n_db, (
            (s, _expand_streamed(b, source, cfg.dba_k, float(cfg.dba_alpha), False,
                                 cfg.memory_budget_mb))
            for s, b in source.chunks(max(1, budget_cells // width))))
    qe_alpha = {"aqe": 0.0, "alpha_qe": float(cfg.alpha)}
    qe = next((s for s in rerank_steps if s in qe_alpha), None)
    if qe is not None:
      if isinstance(database, DescriptorArray):
        queries = np.asarray(rerank.alpha_query_expansion(queries, database.read(), cfg.qe_k,
                                                          qe_alpha[qe]))
      else:
        queries = _expand_streamed(queries, database, cfg.qe_k, qe_alpha[qe], True,
                                   cfg.memory_budget_mb)
    timings["rerank"] = time.perf_counter() - t

    # 4. Search.
    t = time.perf_counter()
    full_fits = n_q * n_db <= budget_cells
    k = min(n_db, cfg.top_k if cfg.top_k is not None else n_db if full_fits else cfg.auto_top_k)
    ranks = search(queries, database, k, cfg.memory_budget_mb)
    q_rows, db_rows = _search_plan(n_q, n_db, database.shape[1], k, budget_cells)
    database_in_memory = isinstance(database, DescriptorArray)
    timings["search"] = time.perf_counter() - t

  # 5. Metrics.
  t = time.perf_counter()
  scored = protocols.score_ranks(ranks, dataset, kappas=cfg.kappas, n_db=n_db)
  timings["metrics"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start_total

  if not crop:
    query_crop = ("off (crop_queries=False)" if dataset.query_boxes is not None
                  and not cfg.crop_queries else "none (no query_boxes)")
  else:
    query_crop = "query_boxes"
  report = {
      "dataset": {"name": dataset.name, "protocol": scored["protocol"],
                  "gnd_kind": dataset.gnd_kind, "database": n_db, "queries": n_q},
      "config": _jsonable(cfg.to_dict()),
      "retriever": {"id": retriever_id, "type": type(retriever).__name__,
                    "config": _jsonable(_retriever_config(retriever))},
      "extraction": {
          "scales": list(cfg.scales), "max_size": cfg.max_size,
          "crop_queries": bool(cfg.crop_queries), "query_crop": query_crop,
          "queries_from": "database descriptors (query_db_indices)" if from_database
                          else "extracted",
          "descriptor_dim": dim, "store_dtype": "float16",
          "reused": {"database": db_info.reused,
                     "queries": None if q_info is None else q_info.reused},
          "process_index": p, "process_count": count},
      "whitening": whitening_report,
      "rerank": None if cfg.rerank is None else {
          "method": cfg.rerank,
          **({"dba_k": cfg.dba_k, "dba_alpha": cfg.dba_alpha} if "dba" in rerank_steps else {}),
          **({"qe_k": cfg.qe_k, "alpha": qe_alpha[qe]} if qe is not None else {})},
      "search": {"method": "exact inner product (distances.top_k_similar)", "top_k": k,
                 "full_ranking": k == n_db, "memory_budget_mb": cfg.memory_budget_mb,
                 "query_chunk": q_rows, "database_chunk": db_rows,
                 "database_in_memory": database_in_memory},
      "metrics": scored["scores"],
      "excluded_queries": scored["excluded_queries"],
      "timings_s": {name: round(v, 4) for name, v in timings.items()},
      "versions": _versions(),
      "files": {},
  }
  if cfg.output_dir is not None and p == 0:
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_ranks:
      _atomic_npy(out / "ranks.npy", ranks)
      report["files"]["ranks"] = str(out / "ranks.npy")
    report["files"]["report"] = str(out / "report.json")
    write_report(report, out / "report.json")
  return report


def _retriever_config(retriever: Any) -> Any:
  config = getattr(retriever, "config", None)
  return config.to_dict() if hasattr(config, "to_dict") else config


# --------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
  """``value`` with numpy / jax scalars and arrays, tuples and paths turned into JSON types."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else str(value)
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  return str(value)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes ``report`` as indented JSON, atomically (temporary file, then ``os.replace``)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp", delete=False) as f:
    try:
      json.dump(_jsonable(report), f, indent=2)
    except BaseException:
      f.close()
      os.unlink(f.name)
      raise
  os.replace(f.name, path)


def _atomic_npy(path: pathlib.Path, array: np.ndarray) -> None:
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False) as f:
    np.save(f, array)
  os.replace(f.name, path)


def _pct(value: float | None) -> str:
  return "  -  " if value is None else f"{100 * value:5.1f}"


def format_table(report: dict[str, Any]) -> str:
  """The report as printable text: settings, then the scores in percent (N-S as is)."""
  ds, ex, se = report["dataset"], report["extraction"], report["search"]
  w, rr = report["whitening"], report["rerank"]
  lines = [
      f"{ds['name']}: {ds['queries']} queries, {ds['database']} database images "
      f"({ds['protocol']} protocol)",
      f"  scales {tuple(ex['scales'])}, max_size {ex['max_size']}, query crop: "
      f"{ex['query_crop']}",
      "  whitening: " + ("none" if w is None else
                         f"{w['method']} ({w['dims']}-D) learned on {w['learned_on']}"),
      "  re-ranking: " + ("none" if rr is None else ", ".join(
          f"{k}={v}" for k, v in rr.items())),
      f"  search: {'full ranking' if se['full_ranking'] else 'top ' + str(se['top_k'])}",
  ]
  scores = report["metrics"]
  if ds["gnd_kind"] == "revisited":
    columns = list(next(iter(scores.values())))
    lines.append(f"{'':<8}" + "".join(f"{c:>8}" for c in columns))
    for protocol, row in scores.items():
      lines.append(f"{protocol.capitalize():<8}" + "".join(f"{_pct(row[c]):>8}"
                                                           for c in columns))
  else:
    lines.append(f"{'mAP':<8}{_pct(scores['mAP']):>8}")
    if "N-S" in scores:
      lines.append(f"{'N-S':<8}{scores['N-S']:>8.3f}")
  excluded = report["excluded_queries"]
  excluded = excluded if isinstance(excluded, dict) else {"all": excluded}
  notes = [f"{name}: {len(qs)}" for name, qs in excluded.items() if qs]
  if notes:
    lines.append("  queries without positives, excluded from the means: " + ", ".join(notes))
  return "\n".join(lines)
