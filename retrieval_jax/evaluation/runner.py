"""The evaluation protocol runner: descriptors -> (whitening) -> (codes) -> (re-ranking) -> search
-> scores.

>>> report = evaluate(retriever, dataset, {"whitening": "lw"}, whitening_set=train_split)
>>> print(format_table(report))

Phases (each timed in the report):

1. **Extract** the database and the queries (:mod:`.descriptors`): float16 shards on disk, one
   per host, reused when the same retriever already described the same set with the same
   settings. Queries are cropped to ``query_boxes`` unless ``crop_queries=False`` (which the
   report and the table then state). Queries that are database images (``query_db_indices``,
   Holidays / UKBench) and are not cropped reuse the database rows.
   :func:`evaluate_descriptors` starts after this phase, from given descriptors (arrays, or
   memory maps streamed from disk, e.g. a million distractors).
2. **Whitening** (optional): PCA-w or Lw learned on the descriptors of a named training
   :class:`~retrieval_jax.data.datasets.InstanceSet` (Lw pairs from its ``positive_pairs`` or
   clusters via ``data.samplers.sample_pairs``), applied to queries and database.
3. **Compact codes** (optional, REMAP §III-E; :mod:`retrieval_jax.search.pq`): ``"truncate"``
   keeps the first ``truncate_dims`` (whitened) dimensions of queries and database,
   re-normalised; ``"pq"`` learns a product quantizer (``pq_subvectors`` x ``2**pq_bits``
   centroids; 16 x 8: 16 bytes per image) on the training set's or the database's final
   descriptors, encodes the database to uint8 codes and searches them with asymmetric distance
   computation (ADC: queries stay uncompressed). The report states the bytes per image (also
   for full descriptors: float16 as stored) and what the quantizer was trained on.
4. **Re-ranking** (optional): DBA on the database, then AQE or alpha-QE on the queries
   (:mod:`retrieval_jax.rerank`), e.g. ``"dba+alpha_qe"``. Not with PQ codes (their rows are
   not kept in full).
5. **Search**: exact inner-product top-k (:func:`search`), the full ranking when it fits; ADC
   over the codes with ``codes="pq"``.
6. **Metrics**: the dataset's protocol (:mod:`.protocols`).

Memory: ``memory_budget_mb`` bounds every float32 ``[rows, cols]`` block the runner holds:
similarity blocks of the search (query chunks x database chunks), the database descriptors
when they are held in RAM (otherwise they are streamed from float16 memory maps, and whitened
or augmented copies go to float16 memory maps too), and the ranked lists (``top_k=None`` gives
the full ranking only when its int32 ``[Q, N]`` fits, else the top ``auto_top_k``; mAP of a
truncated list counts the positives beyond it as misses). Streamed database blocks (and the
similarities of one block) take at most 1/8 of the budget each, and a full ranking is sorted a
few query rows at a time, so sorting temporaries stay within a small fraction of it. Queries
``[Q, D]``, whitening training descriptors, PQ training rows (at most ``pq_sample``) and PQ
codes (``[N, pq_subvectors]`` uint8) are held in RAM.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retrieval_jax import distances, rerank, whitening
from retrieval_jax._atomic import write_json, write_npy
from retrieval_jax._validation import check_finite
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.samplers import sample_pairs
from retrieval_jax.evaluation import protocols
from retrieval_jax.evaluation.descriptors import (DescriptorArray, DescriptorStore,
                                                  StoredDescriptors, descriptor_key,
                                                  extract_to_store, retriever_fingerprint)
from retrieval_jax.normalization import L2_EPS
from retrieval_jax.search.exact import inner_product_scores
from retrieval_jax.search.pq import ProductQuantizer, truncate

__all__ = ["CODES", "RERANKINGS", "WHITENINGS", "default_eval_config", "evaluate",
           "evaluate_descriptors", "format_table", "search", "write_report"]

WHITENINGS = (None, "pca", "lw")
RERANKINGS = (None, "aqe", "alpha_qe", "dba", "dba+aqe", "dba+alpha_qe")
CODES = (None, "pq", "truncate")
PQ_TRAIN = (None, "whitening_set", "database")
_MB = 1 << 20
# Streamed database blocks (and one block's similarities) take at most this share of the budget:
# larger blocks are not faster, and the rest is left to the full ranking and its sort.
_BLOCK_SHARE = 8


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
      # Compact codes (REMAP §III-E), after whitening: None | "pq" | "truncate".
      "codes": None,
      "truncate_dims": None,  # truncate: keep the first d (whitened) dimensions
      "pq_subvectors": 16,  # pq: m sub-vectors, one uint8 each (bytes per image)
      "pq_bits": 8,  # pq: 2**bits centroids per sub-space, 1..8
      "pq_train": None,  # pq: "whitening_set" | "database"; None: the whitening set if given
      "pq_iterations": 20,  # pq: Lloyd iterations
      "pq_sample": 65536,  # pq: at most this many training rows (seeded sample)
      "pq_seed": 0,
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
  for name in ("max_size", "num_workers", "extract_chunk", "qe_k", "dba_k", "auto_top_k",
               "pq_subvectors", "pq_bits", "pq_iterations", "pq_sample"):
    if name == "num_workers" and full.num_workers == 0:
      continue
    _positive_int(full, name)
  for name in ("batch_size", "whitening_dims", "whitening_pairs", "top_k", "truncate_dims"):
    _positive_int(full, name, optional=True)
  if full.codes not in CODES:
    raise ValueError(f"codes must be one of {CODES}; got {full.codes!r}.")
  if (full.codes == "truncate") != (full.truncate_dims is not None):
    raise ValueError(f"truncate_dims goes with codes='truncate' (and only with it); got "
                     f"codes={full.codes!r}, truncate_dims={full.truncate_dims!r}.")
  if full.pq_bits > 8:
    raise ValueError(f"pq_bits must be in 1..8 (codes are uint8); got {full.pq_bits!r}.")
  if full.pq_train not in PQ_TRAIN:
    raise ValueError(f"pq_train must be one of {PQ_TRAIN}; got {full.pq_train!r}.")
  if isinstance(full.pq_seed, bool) or not isinstance(full.pq_seed, (int, np.integer)):
    raise ValueError(f"pq_seed must be an int; got {full.pq_seed!r}.")
  if full.codes == "pq" and full.rerank is not None:
    raise ValueError(f"rerank={full.rerank!r} cannot run on PQ codes (DBA and query expansion "
                     f"need the database rows in full); use codes=None or 'truncate'.")
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
  """Where the runner selects top-k lists of descriptors: exact top-``k`` of ``block`` rows per
  query, best first, ties to the lower row (``distances.top_k_similar``)."""
  scores, indices = distances.top_k_similar(queries, block, k, chunk_size=len(block))
  return np.asarray(scores), np.asarray(indices)


_block_scores = jax.jit(inner_product_scores)


def _all_scores_block(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
  """float32 ``[q, b]`` inner products of a full ranking's block (no selection: the whole row is
  sorted once, stably, so ties still go to the lower row); the arithmetic of ``scan_top_k``."""
  check_finite("database", block)
  return np.asarray(_block_scores(jnp.asarray(queries), jnp.asarray(block)), np.float32)


def _search_plan(n_q: int, n_db: int, dim: int, k: int, budget_cells: int) -> tuple[int, int]:
  """``(query rows, database rows)`` per block so every float32 block fits the budget: the
  ``[q, N]`` (full ranking) or ``[q, 2k]`` (top-k merge) block within it, a database block
  ``[b, dim]`` and one block's similarities ``[q, b]`` within ``1 / _BLOCK_SHARE`` of it."""
  width = n_db if k == n_db else 2 * k
  if width > budget_cells:
    raise ValueError(f"memory_budget_mb is too small: one query's {width} similarity scores "
                     f"({width * 4 / _MB:.3g} MB) do not fit; raise it or lower top_k.")
  q_rows = max(1, min(n_q, budget_cells // width))
  db_rows = max(1, min(n_db, budget_cells // (_BLOCK_SHARE * max(q_rows, dim, 1))))
  return q_rows, db_rows


class _ArrayDescriptors:
  """A float ``[N, D]`` array of any dtype (a float16 ``np.memmap`` of a million rows, say) with
  the reading interface of :class:`StoredDescriptors`: blocks are converted to float32 one at a
  time, so the whole matrix is never copied."""

  def __init__(self, array: Any):
    self.array = array if hasattr(array, "shape") and hasattr(array, "dtype") else np.asarray(
        array)
    if len(self.array.shape) != 2:
      raise ValueError(f"descriptors must be [N, D]; got shape {self.array.shape}.")
    if not np.issubdtype(self.array.dtype, np.floating):
      raise ValueError(f"descriptors must be floating point; got {self.array.dtype}.")

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(int(v) for v in self.array.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(self), rows):
      yield start, np.asarray(self.array[start:start + rows], dtype=np.float32)

  def take(self, indices: Any) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")  # sequential reads from a memory map
    out = np.empty((flat.size, self.shape[1]), np.float32)
    out[order] = self.array[flat[order]]
    return out.reshape(*indices.shape, self.shape[1])

  def read(self) -> np.ndarray:
    return np.asarray(self.array, dtype=np.float32)


Descriptors = Union[DescriptorArray, StoredDescriptors, _ArrayDescriptors]


def _as_descriptors(database: Any) -> Descriptors:
  """``database`` as a reader: stored and in-memory readers as they are, arrays (and memory
  maps) wrapped without a copy."""
  if isinstance(database, (DescriptorArray, StoredDescriptors, _ArrayDescriptors)):
    return database
  return _ArrayDescriptors(database)


def search(queries: Any, database: Any, k: int, memory_budget_mb: float = 1024.0, *,
           quantizer: ProductQuantizer | None = None) -> np.ndarray:
  """Exact inner-product ranking of the database for every query, in bounded memory.

  Queries are taken ``q`` rows at a time and the database streamed in blocks of ``b`` rows, with
  ``q`` and ``b`` chosen so that no float32 block exceeds ``memory_budget_mb``: the ``[q, b]``
  similarities and the ``[b, D]`` database block (each within 1/8 of it), and the ``[q, 2k]``
  running top-k merge (or, for a full ranking, the ``[q, N]`` similarities, sorted a few rows at
  a time). Ties go to the lower database index, as ``np.argsort(-similarity, kind="stable")``.

  Args:
    queries: float ``[Q, D]``.
    database: float ``[N, D]`` (an array or ``np.memmap`` of any float dtype, read block by
      block, a :class:`DescriptorArray` or :class:`StoredDescriptors`); with ``quantizer``,
      its uint8 ``[N, m]`` codes.
    k: list length, ``1 <= k``; ``k >= N`` gives the full ranking.
    memory_budget_mb: see above.
    quantizer: score the codes by asymmetric distance computation
      (:meth:`ProductQuantizer.search`: ``q . decode(code)``, the query uncompressed).

  Returns:
    int32 ``[Q, min(k, N)]`` database indices, best first.
  """
  queries = np.asarray(queries, dtype=np.float32)
  if quantizer is None:
    database = _as_descriptors(database)
    n_db, dim = database.shape
    width, blocks, top_k_block = dim, database.chunks, _top_k_block
  else:
    codes = np.asarray(database)
    if codes.ndim != 2 or codes.dtype != np.uint8:
      raise ValueError(f"with a quantizer, database must be uint8 [N, m] codes; got "
                       f"{codes.dtype} {codes.shape}.")
    n_db, dim, width = len(codes), quantizer.dim, codes.shape[1]

    def blocks(rows: int) -> Iterator[tuple[int, np.ndarray]]:
      for start in range(0, n_db, rows):
        yield start, codes[start:start + rows]

    def top_k_block(qc: np.ndarray, block: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
      scores, indices = quantizer.search(qc, block, kk, chunk_size=len(block))
      return np.asarray(scores), np.asarray(indices)

  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be [Q, D={dim}]; got {queries.shape}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int; got {k!r}.")
  k = int(min(k, n_db))
  n_q = len(queries)
  budget_cells = int(memory_budget_mb * _MB) // 4
  q_rows, db_rows = _search_plan(n_q, n_db, width, k, budget_cells)
  ranks = np.empty((n_q, k), np.int32)
  for q0 in range(0, n_q, q_rows):
    qc = queries[q0:q0 + q_rows]
    if k == n_db:
      # Full ranking: scatter each block's scores to their columns, then stable sorts of a few
      # rows at a time (argsort's negated copy and int64 result stay within 1/8 of the budget).
      sims = np.empty((len(qc), n_db), np.float32)
      for start, block in blocks(db_rows):
        if quantizer is None:
          sims[:, start:start + len(block)] = _all_scores_block(qc, block)
        else:
          scores, idx = top_k_block(qc, block, len(block))
          np.put_along_axis(sims, start + idx, scores, axis=1)
      sort_rows = max(1, budget_cells // (_BLOCK_SHARE * 3 * n_db))
      for r in range(0, len(qc), sort_rows):
        ranks[q0 + r:q0 + r + sort_rows] = np.argsort(-sims[r:r + sort_rows], axis=1,
                                                      kind="stable")
      del sims
      continue
    best_s = np.full((len(qc), 0), -np.inf, np.float32)
    best_i = np.zeros((len(qc), 0), np.int32)
    for start, block in blocks(db_rows):
      scores, idx = top_k_block(qc, block, min(k, len(block)))
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


def _expand_streamed(rows: np.ndarray, database: Descriptors, k: int, alpha: float,
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


def _pq_train_source(cfg: ml_collections.ConfigDict, whitening_set: Any) -> str | None:
  """Where PQ learns its codebooks (``"whitening_set"`` or ``"database"``); None without PQ."""
  if cfg.codes != "pq":
    return None
  return cfg.pq_train or ("whitening_set" if whitening_set is not None else "database")


def _check_inputs(cfg: ml_collections.ConfigDict, dataset: Any, whitening_set: Any) -> None:
  """The checks :func:`evaluate` and :func:`evaluate_descriptors` share (before any work)."""
  if not isinstance(dataset, RetrievalSet):
    raise ValueError(f"dataset must be a RetrievalSet; got {type(dataset).__name__}.")
  pq_source = _pq_train_source(cfg, whitening_set)
  needs_set = cfg.whitening is not None or pq_source == "whitening_set"
  if needs_set and not isinstance(whitening_set, InstanceSet):
    what = (f"whitening={cfg.whitening!r}" if cfg.whitening is not None
            else "codes='pq' with pq_train='whitening_set'")
    raise ValueError(f"{what} needs whitening_set, the InstanceSet to learn it on; got "
                     f"{type(whitening_set).__name__}.")
  if not needs_set and whitening_set is not None:
    raise ValueError(f"whitening_set {whitening_set.name!r} was given but whitening is None "
                     f"(and no PQ is trained on it); set whitening to 'pca' or 'lw'.")
  n_db = len(dataset.database)
  rerank_steps = () if cfg.rerank is None else tuple(cfg.rerank.split("+"))
  for step, field in (("dba", "dba_k"), ("aqe", "qe_k"), ("alpha_qe", "qe_k")):
    if step in rerank_steps and cfg[field] > n_db:
      raise ValueError(f"{field} = {cfg[field]} exceeds the {n_db} database images.")


def _run_phases(queries: np.ndarray, database: Descriptors, dataset: RetrievalSet,
                cfg: ml_collections.ConfigDict, whitening_set: InstanceSet | None,
                train: np.ndarray | None, scratch: DescriptorStore,
                timings: dict[str, float]) -> dict[str, Any]:
  """Whitening, codes, re-ranking, search and metrics from descriptors: the report's
  ``whitening``, ``codes``, ``rerank``, ``search``, ``metrics`` and ``excluded_queries``, and
  ``ranks``."""
  n_db, n_q = len(database), len(queries)
  budget_cells = int(cfg.memory_budget_mb * _MB) // 4
  rerank_steps = () if cfg.rerank is None else tuple(cfg.rerank.split("+"))
  pq_source = _pq_train_source(cfg, whitening_set)

  # Whitening.
  whitening_report = None
  t = time.perf_counter()
  if cfg.whitening is not None:
    mean, proj, n_pairs = _learn_whitening(cfg.whitening, train, whitening_set, cfg)
    dims = cfg.whitening_dims
    if dims is not None and dims > proj.shape[0]:
      raise ValueError(f"whitening_dims = {dims} exceeds the descriptor dimension "
                       f"{proj.shape[0]}.")

    def whiten(x: np.ndarray) -> np.ndarray:
      return np.asarray(whitening.apply_whitening(x, mean, proj, dims))

    out_dim = dims or proj.shape[0]
    queries = whiten(queries)
    database = _map_rows(database, whiten, out_dim, budget_cells, scratch, "whitened")
    if pq_source == "whitening_set":
      train = whiten(train)  # PQ learns on descriptors as they are searched
    whitening_report = {
        "method": {"pca": "PCA-w", "lw": "Lw"}[cfg.whitening], "dims": out_dim,
        "learned_on": whitening_set.name, "images": len(whitening_set), "pairs": n_pairs,
        "pairs_from": (None if n_pairs is None else "positive_pairs"
                       if whitening_set.positive_pairs is not None else "cluster_ids")}
  timings["whitening"] = time.perf_counter() - t

  # Compact codes.
  t = time.perf_counter()
  dim = database.shape[1]
  quantizer = codes = None
  if cfg.codes == "truncate":
    d = cfg.truncate_dims
    if d > dim:
      raise ValueError(f"truncate_dims = {d} exceeds the descriptor dimension {dim}.")

    def cut(x: np.ndarray) -> np.ndarray:
      return np.asarray(truncate(x, d))

    queries = cut(queries)
    database = _map_rows(database, cut, d, budget_cells, scratch, "truncated")
    codes_report = {"method": "truncate", "dims": d, "from_dims": dim,
                    "after_whitening": cfg.whitening is not None, "storage": "float16",
                    "bytes_per_image": 2 * d}
  elif cfg.codes == "pq":
    m = cfg.pq_subvectors
    if dim % m:
      raise ValueError(f"pq_subvectors = {m} must divide the descriptor dimension {dim}.")
    if pq_source == "database":
      rng = np.random.default_rng(cfg.pq_seed)
      rows = (np.sort(rng.choice(n_db, cfg.pq_sample, replace=False)) if n_db > cfg.pq_sample
              else np.arange(n_db))
      train_rows, trained_on = database.take(rows), f"{dataset.name} (database)"
    else:
      train_rows, trained_on = train, whitening_set.name
    quantizer = ProductQuantizer.fit(train_rows, m, cfg.pq_bits, iterations=cfg.pq_iterations,
                                     sample_size=cfg.pq_sample, seed=cfg.pq_seed)
    codes = np.empty((n_db, m), np.uint8)
    for start, block in database.chunks(max(1, budget_cells // (_BLOCK_SHARE * dim))):
      codes[start:start + len(block)] = quantizer.encode(block)
    codes_report = {
        "method": "pq", "subvectors": m, "bits": cfg.pq_bits, "centroids": 2 ** cfg.pq_bits,
        "dims": dim, "storage": "uint8 codes",
        "bytes_per_image": codes.nbytes / n_db if n_db else float(quantizer.bytes_per_code),
        "codes_bytes": int(codes.nbytes), "search": "ADC (asymmetric distance computation)",
        "trained_on": trained_on, "train_source": pq_source,
        "training_rows": int(min(len(train_rows), cfg.pq_sample)),
        "iterations": cfg.pq_iterations, "seed": cfg.pq_seed}
  else:
    codes_report = {"method": None, "dims": dim, "storage": "float16", "bytes_per_image": 2 * dim}
  timings["codes"] = time.perf_counter() - t

  # Re-ranking: DBA on the database, then query expansion against it.
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

  # Search.
  t = time.perf_counter()
  full_fits = n_q * n_db <= budget_cells
  k = min(n_db, cfg.top_k if cfg.top_k is not None else n_db if full_fits else cfg.auto_top_k)
  if quantizer is None:
    ranks = search(queries, database, k, cfg.memory_budget_mb)
    width = database.shape[1]
  else:
    ranks = search(queries, codes, k, cfg.memory_budget_mb, quantizer=quantizer)
    width = cfg.pq_subvectors
  q_rows, db_rows = _search_plan(n_q, n_db, width, k, budget_cells)
  timings["search"] = time.perf_counter() - t

  # Metrics.
  t = time.perf_counter()
  scored = protocols.score_ranks(ranks, dataset, kappas=cfg.kappas, n_db=n_db)
  timings["metrics"] = time.perf_counter() - t
  return {
      "whitening": whitening_report,
      "codes": codes_report,
      "rerank": None if cfg.rerank is None else {
          "method": cfg.rerank,
          **({"dba_k": cfg.dba_k, "dba_alpha": cfg.dba_alpha} if "dba" in rerank_steps else {}),
          **({"qe_k": cfg.qe_k, "alpha": qe_alpha[qe]} if qe is not None else {})},
      "search": {"method": "exact inner product (distances.top_k_similar)" if quantizer is None
                 else "PQ asymmetric distance computation, ADC (ProductQuantizer.search)",
                 "top_k": k, "full_ranking": k == n_db,
                 "memory_budget_mb": cfg.memory_budget_mb, "query_chunk": q_rows,
                 "database_chunk": db_rows,
                 "database_in_memory": isinstance(database, DescriptorArray)},
      "metrics": scored["scores"],
      "excluded_queries": scored["excluded_queries"],
      "protocol": scored["protocol"],
      "ranks": ranks,
  }


def _finish_report(dataset: RetrievalSet, cfg: ml_collections.ConfigDict, retriever: Any,
                   extraction: dict[str, Any], parts: dict[str, Any], timings: dict[str, float],
                   process_index: int) -> dict[str, Any]:
  """The report from the phases' ``parts``; written (with ranks) by process 0."""
  ranks = parts.pop("ranks")
  report = {
      "dataset": {"name": dataset.name, "protocol": parts.pop("protocol"),
                  "gnd_kind": dataset.gnd_kind, "database": len(dataset.database),
                  "queries": len(dataset.queries)},
      "config": _jsonable(cfg.to_dict()),
      "retriever": retriever,
      "extraction": extraction,
      **parts,
      "timings_s": {name: round(v, 4) for name, v in timings.items()},
      "versions": _versions(),
      "files": {},
  }
  if cfg.output_dir is not None and process_index == 0:
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_ranks:
      write_npy(out / "ranks.npy", ranks)
      report["files"]["ranks"] = str(out / "ranks.npy")
    report["files"]["report"] = str(out / "report.json")
    write_report(report, out / "report.json")
  return report


def evaluate(retriever: Any, dataset: RetrievalSet,
             cfg: ml_collections.ConfigDict | dict | None = None, *,
             whitening_set: InstanceSet | None = None) -> dict[str, Any]:
  """Runs the evaluation protocol of ``dataset`` with ``retriever``; see the module docstring.

  Args:
    retriever: a :class:`retrieval_jax.Retriever`, or any object with its ``extract`` (the
      cache identity then comes from ``config``/``variables`` or ``cfg.retriever_id``).
    dataset: the test set.
    cfg: fields of :func:`default_eval_config` (missing ones take defaults).
    whitening_set: the training split whitening (and, with ``codes="pq"``, by default the
      product quantizer) is learned on (required iff one of them uses it); its name goes into
      the report.

  Returns:
    The report (JSON-ready; also written to ``<output_dir>/report.json`` by process 0):
    ``dataset`` (name, protocol, sizes), ``config``, ``retriever``, ``extraction`` (scales,
    max_size, query cropping, descriptor dim, reuse), ``whitening`` (method, dims, learned_on,
    images, pairs; or None), ``codes`` (method, dims, bytes per image; for PQ also the
    quantizer's shape and what it was trained on), ``rerank`` (method and parameters; or None),
    ``search`` (list length, full or truncated, chunking), ``metrics`` (see
    ``protocols.score_ranks``), ``excluded_queries``, ``timings_s`` (per phase), ``versions``,
    ``files``.

  Raises:
    ValueError: a bad config field, whitening requested without a ``whitening_set`` (or the
      reverse), a neighbour count larger than the database, or a memory budget too small for
      a single query.
  """
  start_total = time.perf_counter()
  cfg = _resolve_config(cfg)
  _check_inputs(cfg, dataset, whitening_set)
  n_db, n_q = len(dataset.database), len(dataset.queries)
  p, count = jax.process_index(), jax.process_count()
  budget_cells = int(cfg.memory_budget_mb * _MB) // 4
  timings: dict[str, float] = {}
  crop = cfg.crop_queries and dataset.query_boxes is not None
  settings = {"scales": list(cfg.scales), "max_size": cfg.max_size}
  extract_kw = dict(max_size=cfg.max_size, scales=cfg.scales, batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers, chunk_size=cfg.extract_chunk,
                    reuse=cfg.reuse_descriptors, process_index=p, process_count=count)
  needs_train = cfg.whitening is not None or _pq_train_source(cfg, whitening_set) == (
      "whitening_set")

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
    if needs_train:
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
    train = store.open(train_key, len(whitening_set)).read() if needs_train else None

    # 2.-6. Whitening, codes, re-ranking, search, metrics.
    parts = _run_phases(queries, database, dataset, cfg, whitening_set, train, scratch,
                        timings)
    if parts["whitening"] is not None:
      parts["whitening"]["reused_descriptors"] = train_info.reused
    if parts["codes"]["method"] == "pq" and train_info is not None:
      parts["codes"]["reused_descriptors"] = train_info.reused
  timings["total"] = time.perf_counter() - start_total

  if not crop:
    query_crop = ("off (crop_queries=False)" if dataset.query_boxes is not None
                  and not cfg.crop_queries else "none (no query_boxes)")
  else:
    query_crop = "query_boxes"
  extraction = {
      "scales": list(cfg.scales), "max_size": cfg.max_size,
      "crop_queries": bool(cfg.crop_queries), "query_crop": query_crop,
      "queries_from": "database descriptors (query_db_indices)" if from_database
                      else "extracted",
      "descriptor_dim": dim, "store_dtype": "float16",
      "reused": {"database": db_info.reused,
                 "queries": None if q_info is None else q_info.reused},
      "process_index": p, "process_count": count}
  retriever_report = {"id": retriever_id, "type": type(retriever).__name__,
                      "config": _jsonable(_retriever_config(retriever))}
  return _finish_report(dataset, cfg, retriever_report, extraction, parts, timings, p)


def evaluate_descriptors(queries: Any, database: Any, dataset: RetrievalSet,
                         cfg: ml_collections.ConfigDict | dict | None = None, *,
                         whitening_set: InstanceSet | None = None,
                         train_descriptors: Any = None) -> dict[str, Any]:
  """:func:`evaluate` from given descriptors: whitening, codes, re-ranking, search, metrics.

  For descriptors computed elsewhere, or databases too large to extract here (a million
  distractors): ``database`` may be a ``np.memmap`` (``np.load(path, mmap_mode="r")``, e.g.
  float16) or :class:`StoredDescriptors` that is streamed from disk block by block when its
  float32 copy would exceed ``memory_budget_mb``, so peak memory does not grow with ``N``
  beyond the int32 ranked lists (and the pages the operating system maps in).

  Args:
    queries: float ``[Q, D]``, one row per query of ``dataset`` (already cropped if the
      protocol crops).
    database: float ``[N, D]``, one row per database image of ``dataset``, in its order.
    dataset: the ground truth and protocol (its images are not read: ``database`` may be any
      sequence of length ``N``, e.g. ``range(N)``).
    cfg: fields of :func:`default_eval_config`; the extraction and cache fields are unused.
    whitening_set: as in :func:`evaluate` (its name, pairs or clusters).
    train_descriptors: float ``[len(whitening_set), D]``, the descriptors of
      ``whitening_set``'s images (required with it).

  Returns:
    The report of :func:`evaluate`, with ``retriever`` None and ``extraction`` saying the
    descriptors were given (dimension, database dtype and type).

  Raises:
    ValueError: as :func:`evaluate`, or descriptors whose shapes do not match ``dataset``.
  """
  start_total = time.perf_counter()
  cfg = _resolve_config(cfg)
  _check_inputs(cfg, dataset, whitening_set)
  database = _as_descriptors(database)
  n_db, dim = database.shape
  source = type(getattr(database, "array", database)).__name__
  source_dtype = str(getattr(getattr(database, "array", None), "dtype", "float16"))
  if n_db != len(dataset.database):
    raise ValueError(f"database has {n_db} rows for the {len(dataset.database)} database "
                     f"images of {dataset.name}.")
  queries = np.asarray(queries, dtype=np.float32)
  if queries.shape != (len(dataset.queries), dim):
    raise ValueError(f"queries must be [Q={len(dataset.queries)}, D={dim}]; got "
                     f"{queries.shape}.")
  train = None
  if whitening_set is not None:
    if train_descriptors is None:
      raise ValueError(f"whitening_set {whitening_set.name!r} needs train_descriptors, the "
                       f"descriptors of its images.")
    train = np.asarray(train_descriptors, dtype=np.float32)
    if train.shape != (len(whitening_set), dim):
      raise ValueError(f"train_descriptors must be [{len(whitening_set)}, {dim}] (one row per "
                       f"image of {whitening_set.name}); got {train.shape}.")
  elif train_descriptors is not None:
    raise ValueError("train_descriptors were given without the whitening_set they describe.")
  budget_cells = int(cfg.memory_budget_mb * _MB) // 4
  if not isinstance(database, DescriptorArray) and n_db * dim <= budget_cells:
    database = DescriptorArray(database.read())
  timings: dict[str, float] = {}
  scratch_parent = cfg.cache_dir
  if scratch_parent is not None:
    os.makedirs(scratch_parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".scratch.", dir=scratch_parent) as scratch:
    parts = _run_phases(queries, database, dataset, cfg, whitening_set, train,
                        DescriptorStore(scratch), timings)
  timings["total"] = time.perf_counter() - start_total
  extraction = {"descriptors": "given", "descriptor_dim": dim, "database_source": source,
                "database_dtype": source_dtype,
                "database_streamed": not isinstance(database, DescriptorArray)}
  return _finish_report(dataset, cfg, None, extraction, parts, timings, jax.process_index())


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
  write_json(path, _jsonable(report))


def _pct(value: float | None) -> str:
  return "  -  " if value is None else f"{100 * value:5.1f}"


def format_table(report: dict[str, Any]) -> str:
  """The report as printable text: settings, then the scores in percent (N-S as is)."""
  ds, ex, se = report["dataset"], report["extraction"], report["search"]
  w, rr = report["whitening"], report["rerank"]
  c = report.get("codes")
  if c is None or c["method"] is None:
    codes = "none" if c is None else f"none ({c['dims']}-D float16, {c['bytes_per_image']} B/image)"
  elif c["method"] == "truncate":
    codes = (f"truncate to {c['dims']}-D of {c['from_dims']} ({c['bytes_per_image']} B/image "
             f"float16)")
  else:
    codes = (f"PQ {c['subvectors']}x{c['bits']} ({c['bytes_per_image']:g} B/image, ADC) trained "
             f"on {c['trained_on']}")
  lines = [
      f"{ds['name']}: {ds['queries']} queries, {ds['database']} database images "
      f"({ds['protocol']} protocol)",
      (f"  scales {tuple(ex['scales'])}, max_size {ex['max_size']}, query crop: "
       f"{ex['query_crop']}" if "scales" in ex else
       f"  descriptors given ({ex['descriptor_dim']}-D {ex['database_dtype']} "
       f"{ex['database_source']})"),
      "  whitening: " + ("none" if w is None else
                         f"{w['method']} ({w['dims']}-D) learned on {w['learned_on']}"),
      "  codes: " + codes,
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
