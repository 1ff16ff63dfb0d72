"""Approximate inner-product search with ScaNN, saved as a verified index directory.

:class:`ScannIndex` wraps a ScaNN searcher built from ``[N, D]`` descriptors with tree
partitioning (k-means leaves), anisotropic asymmetric hashing (AH) of the residuals, and exact
float32 re-scoring ("reordering") of a shortlist, and keeps alongside it the user ids, optional
per-row metadata (image paths) and the id of the descriptor model. ``mode="brute_force"`` builds
an exact ScaNN searcher instead (for exactness checks and small databases).

Defaults (chosen from ``N``; every one can be overridden at build time, and the search-time
ones per call):

- ``num_leaves = round(sqrt(N))`` (ScaNN's rule of thumb, ~sqrt(N) points per leaf); no tree
  below ``_MIN_ROWS_FOR_TREE = 20_000`` rows, where scoring every AH code is already cheap.
- ``leaves_to_search = ceil(0.35 * num_leaves)`` (at least 8): on the hard clustered set of
  ``search.synthetic`` (100k x 512, true top-10 only 73 % from the query's cluster) recall@10
  against exact search was 0.82 / 0.91 / 0.955 / 0.99 at 10 / 20 / 32 / 50 % of the 316 leaves,
  and 32 % still ran 8x faster than exact search. At 30 % (95 leaves) recall varied between
  0.9495 and 0.953 from build to build (k-means training is threaded), too close to a 0.95
  target; 35 % (111 leaves) gave 0.967. ``build_index(mode="auto")`` calibrates it down where
  the data allow.
- AH with 2 dimensions per 16-centroid block (``dims_per_block=2``) and anisotropic threshold
  0.2, ScaNN's recommended setting for dot product; ``reorder_k = 250`` rows re-scored exactly.
- ``training_sample_size = min(N, 100_000)`` rows for both the tree and the AH codebooks.

Importing ScaNN loads its TensorFlow op library when TensorFlow is installed (about 5 s, and
only with ``tensorflow-cpu~=2.20``: DESIGN §7), so it is imported on first use, not with this
module.

References:
  Guo et al., "Accelerating large-scale inference with anisotropic vector quantization",
  ICML 2020 (ScaNN); github.com/google-research/google-research/tree/master/scann
  (docs/algorithms.md: choosing num_leaves, leaves_to_search, dims_per_block, reordering).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from retrieval_jax._validation import check_finite, check_ndim, check_positive_int
from retrieval_jax.search import _store

_MIN_ROWS_FOR_TREE = 20_000
_LEAVES_TO_SEARCH_FRACTION = 0.35
_MIN_LEAVES_TO_SEARCH = 8
DEFAULT_REORDER_K = 250
DEFAULT_DIMS_PER_BLOCK = 2
DEFAULT_ANISOTROPIC_THRESHOLD = 0.2
_SCANN_DIR = "scann"
MODES = ("ah", "brute_force")


def _scann_ops():
  # Deferred: importing scann imports TensorFlow (seconds), see the module docstring.
  from scann.scann_ops.py import scann_ops_pybind
  return scann_ops_pybind


def _default_leaves_to_search(num_leaves: int) -> int:
  if num_leaves == 0:
    return 0
  return min(num_leaves,
             max(_MIN_LEAVES_TO_SEARCH, math.ceil(_LEAVES_TO_SEARCH_FRACTION * num_leaves)))


def default_params(num_rows: int) -> dict:
  """The build parameters :meth:`ScannIndex.build` uses for ``num_rows`` descriptors."""
  num_rows = check_positive_int("num_rows", num_rows)
  num_leaves = 0 if num_rows < _MIN_ROWS_FOR_TREE else int(round(math.sqrt(num_rows)))
  return {"num_leaves": num_leaves, "leaves_to_search": _default_leaves_to_search(num_leaves),
          "reorder_k": DEFAULT_REORDER_K, "dims_per_block": DEFAULT_DIMS_PER_BLOCK,
          "anisotropic_threshold": DEFAULT_ANISOTROPIC_THRESHOLD,
          "training_sample_size": min(num_rows, 100_000)}


def _as_float32_rows(name: str, x) -> np.ndarray:
  check_ndim(name, x, 2, "[N, D]")
  x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  check_finite(name, x)
  return x


class ScannIndex:
  """A ScaNN searcher plus ids, metadata and model id; see the module docstring.

  Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` /
  :meth:`load`. Search returns user ids (not row numbers) and inner-product scores.
  """

  kind = "scann"
  auto_report: dict | None = None  # set by search.build_index(mode="auto")

  def __init__(self, searcher, *, num_rows: int, dim: int, ids: np.ndarray,
               metadata: list[str] | None, model_id: str, params: dict):
    self._searcher = searcher
    self.num_rows, self.dim = int(num_rows), int(dim)
    self.ids, self.metadata = ids, metadata
    self.model_id = str(model_id)
    self.params = dict(params)

  @classmethod
  def build(cls, descriptors, *, ids=None, metadata=None, model_id: str = "",
            mode: str = "ah", num_leaves: int | None = None,
            leaves_to_search: int | None = None, reorder_k: int | None = None,
            dims_per_block: int | None = None, anisotropic_threshold: float | None = None,
            training_sample_size: int | None = None, num_threads: int = 0) -> ScannIndex:
    """Builds an index over ``descriptors`` (float ``[N, D]``, any float dtype).

    Args:
      descriptors: database rows (L2-normalised for cosine similarity).
      ids: int ``[N]`` unique user ids returned by search; default ``arange(N)``.
      metadata: ``N`` strings kept with the rows (e.g. image paths); see :meth:`lookup`.
      model_id: id of the descriptor model, stored in the manifest and checked on load.
      mode: ``"ah"`` (tree + asymmetric hashing + reordering) or ``"brute_force"`` (exact).
      num_leaves, leaves_to_search, reorder_k, dims_per_block, anisotropic_threshold,
        training_sample_size: override :func:`default_params` (``num_leaves=0``: no tree).
      num_threads: ScaNN training/search threads (0: all cores).
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    x = _as_float32_rows("descriptors", descriptors)
    n, d = x.shape
    ids, metadata = _store.check_ids_metadata(n, ids, metadata)
    params = default_params(n)
    overrides = {"num_leaves": num_leaves, "leaves_to_search": leaves_to_search,
                 "reorder_k": reorder_k, "dims_per_block": dims_per_block,
                 "anisotropic_threshold": anisotropic_threshold,
                 "training_sample_size": training_sample_size}
    for key, value in overrides.items():
      if value is not None:
        if key == "anisotropic_threshold":
          params[key] = float(value)
        elif key == "num_leaves" and value == 0:
          params[key] = 0
        else:
          params[key] = check_positive_int(key, value)
    if num_leaves is not None and leaves_to_search is None:
      # An overridden tree keeps the default fraction of its leaves.
      params["leaves_to_search"] = _default_leaves_to_search(params["num_leaves"])
    if params["num_leaves"] > n:
      raise ValueError(f"num_leaves must be at most N={n}; got {params['num_leaves']}.")
    params["leaves_to_search"] = min(params["leaves_to_search"], params["num_leaves"])
    params["mode"] = mode

    ops = _scann_ops()
    # k here only sets ScaNN's default; search() always passes its own k.
    builder = ops.builder(x, 10, "dot_product")
    if mode == "brute_force":
      builder = builder.score_brute_force()
    else:
      if params["num_leaves"]:
        builder = builder.tree(
            num_leaves=params["num_leaves"], num_leaves_to_search=params["leaves_to_search"],
            training_sample_size=min(n, params["training_sample_size"]))
      builder = builder.score_ah(
          params["dims_per_block"],
          anisotropic_quantization_threshold=params["anisotropic_threshold"],
          training_sample_size=min(n, params["training_sample_size"]))
      builder = builder.reorder(params["reorder_k"])
    if num_threads:
      builder = builder.set_n_training_threads(num_threads)
    searcher = builder.build()
    if num_threads:
      searcher.set_num_threads(num_threads)
    return cls(searcher, num_rows=n, dim=d, ids=ids, metadata=metadata, model_id=model_id,
               params=params)

  def search(self, queries, k: int, *, batch_size: int = 4096,
             leaves_to_search: int | None = None,
             reorder_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows per query, best first.

    Args:
      queries: float ``[Q, D]``.
      k: neighbours per query, ``1 <= k <= N``.
      batch_size: queries handed to ScaNN per call (multi-threaded inside a batch).
      leaves_to_search, reorder_k: override the build-time values for this call.

    Returns:
      ``(scores, ids)``: float32 ``[Q, k]`` inner products and int64 ``[Q, k]`` user ids. If the
      searched leaves hold fewer than ``k`` rows, the missing places are ``-inf`` / ``-1``.
    """
    q = _as_float32_rows("queries", queries)
    if q.shape[1] != self.dim:
      raise ValueError(f"queries must have dimension D={self.dim} (the index's); got shape "
                       f"{q.shape}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_rows:
      raise ValueError(f"k must be an int in [1, N={self.num_rows}]; got {k!r}.")
    batch_size = check_positive_int("batch_size", batch_size)
    kwargs = {}
    if self.params["mode"] == "ah":
      reorder = self.params["reorder_k"] if reorder_k is None else check_positive_int(
          "reorder_k", reorder_k)
      kwargs["pre_reorder_num_neighbors"] = max(int(k), reorder)
      if self.params["num_leaves"]:
        kwargs["leaves_to_search"] = (self.params["leaves_to_search"] if leaves_to_search is None
                                      else check_positive_int("leaves_to_search",
                                                              leaves_to_search))
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(q), batch_size):
      found, dist = self._searcher.search_batched_parallel(
          q[s:s + batch_size], final_num_neighbors=int(k), batch_size=256, **kwargs)
      found, dist = np.asarray(found), np.asarray(dist)
      width = found.shape[1] if found.ndim == 2 else 0
      rows[s:s + batch_size, :width] = found
      scores[s:s + batch_size, :width] = dist
    ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
    return scores, ids

  def lookup(self, ids) -> list[str]:
    """Metadata (e.g. image paths) of user ``ids`` (any shape, flattened)."""
    if self.metadata is None:
      raise ValueError("this index was built without metadata.")
    position = {int(i): p for p, i in enumerate(self.ids)}
    return [self.metadata[position[int(i)]] for i in np.ravel(ids)]

  def save(self, directory) -> Path:
    """Writes the searcher, ids, metadata and manifest atomically to ``directory``."""

    def populate(tmp: Path) -> None:
      (tmp / _SCANN_DIR).mkdir()
      # Relative asset paths, so the directory can be moved (and renamed into place).
      self._searcher.serialize(str(tmp / _SCANN_DIR), relative_path=True)

    return _store.write_index(directory, kind=self.kind, dim=self.dim, count=self.num_rows,
                              model_id=self.model_id, ids=self.ids, metadata=self.metadata,
                              extra={"params": self.params}, populate=populate)

  @classmethod
  def load(cls, directory, *, model_id: str | None = None,
           dim: int | None = None) -> ScannIndex:
    """Reads an index saved by :meth:`save`, refusing a corrupted or mismatched directory.

    Every file is checked against the sha256 in ``manifest.json``; ``model_id`` and ``dim``,
    when given, must match the manifest.
    """
    manifest, ids, metadata = _store.read_index(directory, kind=cls.kind, model_id=model_id,
                                                dim=dim)
    searcher = _scann_ops().load_searcher(str(Path(directory) / _SCANN_DIR))
    if searcher.size() != manifest["count"]:
      raise ValueError(f"{Path(directory) / _SCANN_DIR} holds {searcher.size()} rows; the "
                       f"manifest says count {manifest['count']}.")
    return cls(searcher, num_rows=manifest["count"], dim=manifest["dim"], ids=ids,
               metadata=metadata, model_id=manifest["model_id"], params=manifest["params"])
