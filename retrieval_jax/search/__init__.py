"""Search over descriptor databases: exact top-k, ScaNN, product quantization, shards.

- :func:`exact_search` / :class:`ExactIndex`: exact chunked inner-product top-k in bounded
  memory, for device arrays and host (memmap) databases streamed in blocks.
- :class:`ScannIndex`: ScaNN (tree + anisotropic hashing + reordering, or brute force) with
  ids, metadata and a verified, checksummed save directory.
- :func:`build_index`: ``mode="auto"`` picks exact or ScaNN by size and a measured calibration.
- :class:`ProductQuantizer`, :func:`truncate`: compact codes (REMAP §III-E) and ADC search.
- :class:`ShardedIndex`: S shards built in parallel processes (or one per host), top-k merged.
- :mod:`~retrieval_jax.search.synthetic`: clustered benchmark descriptors with known neighbours.

ScaNN itself (and TensorFlow with it) is imported only when a ScaNN index is built or loaded.
"""

from retrieval_jax.search import synthetic
from retrieval_jax.search.auto import build_index, calibrate, choose_index
from retrieval_jax.search.exact import ExactIndex, exact_search, merge_top_k, scan_top_k
from retrieval_jax.search.pq import ProductQuantizer, truncate
from retrieval_jax.search.scann_index import ScannIndex, default_params
from retrieval_jax.search.shards import (ShardedIndex, merge_across_processes, merge_results,
                                         shard_bounds)

__all__ = [
    "ExactIndex", "ProductQuantizer", "ScannIndex", "ShardedIndex", "build_index", "calibrate",
    "choose_index", "default_params", "exact_search", "merge_across_processes", "merge_results",
    "merge_top_k", "scan_top_k", "shard_bounds", "synthetic", "truncate",
]
