"""retrieval_jax: deep instance-level image retrieval in JAX/Flax.

The functional core, importable as submodules or from here:

- ``regions``: the reference-exact R-MAC grid, box conversion, region indicators.
- ``pooling``: MAC, SPoC, GeM, regional pooling, R-MAC (all with validity masks).
- ``whitening``: PCA whitening and learned discriminative whitening (Lw).
- ``distances``: pairwise / paired distances with safe gradients, exact chunked top-k.
- ``rerank``: alpha query expansion, average query expansion, database-side augmentation.
- ``search``: exact chunked top-k (streams float16 memmaps), ScaNN indexes with manifests,
  product quantization (ADC), sharded indexes, ``build_index(mode="auto")``.
- ``metrics``: Oxford mAP, clipped mP@k, revisited E/M/H, Holidays, UKBench N-S, recall@k.
- ``losses``: contrastive, double-margin, triplet, batch-hard/all, LRML, NRA, DLRTN joint,
  Smooth-AP (each with a validity mask for padded batches).
- ``multiscale``: combining descriptors of several scales; ``kl_weighting``: REMAP's KL region
  weights.

Backbones, heads and weight converters live in :mod:`retrieval_jax.models`; ``Retriever``
(backbone + head + weights: ``Retriever.from_pretrained("efficientnet-lite0").extract(paths)``)
in :mod:`retrieval_jax.retriever`; the protocol runner (``evaluate``) in
:mod:`retrieval_jax.evaluation`.
"""

from retrieval_jax import (distances, kl_weighting, losses, metrics, multiscale, normalization,
                           pooling, regions, rerank, search, whitening)
from retrieval_jax.distances import (paired_cosine_similarity, paired_euclidean,
                                     paired_squared_euclidean, pairwise_cosine_distance,
                                     pairwise_cosine_similarity, pairwise_euclidean,
                                     pairwise_squared_euclidean, top_k_similar)
from retrieval_jax.kl_weighting import estimate_region_weights, region_kl_divergence
from retrieval_jax.metrics import (compute_map, exclude_query_gnd, hit_rate_at_k, holidays_map,
                                   original_gnd, recall_at_k, revisited_gnd, ukbench_ns_score)
from retrieval_jax.multiscale import combine_scales, scale_sizes
from retrieval_jax.normalization import l2n
from retrieval_jax.pooling import gem, mac, regional_pool, rmac, spoc
from retrieval_jax.regions import (boxes_to_cells, fixed_rmac_regions, rmac_region_table,
                                   rmac_regions)
from retrieval_jax.rerank import (alpha_query_expansion, average_query_expansion,
                                  database_side_augmentation)
from retrieval_jax.search import (ExactIndex, ProductQuantizer, ScannIndex, ShardedIndex,
                                  build_index, exact_search)
from retrieval_jax.whitening import apply_whitening, learn_lw, learn_pca_whitening

__version__ = "0.1.0"


def __getattr__(name: str):
  # Retriever pulls in flax and the backbones; import it on first use so that the functional
  # core stays a light import.
  if name == "Retriever":
    from retrieval_jax.retriever import Retriever
    return Retriever
  if name in ("evaluate", "default_eval_config"):
    from retrieval_jax.evaluation import runner
    return getattr(runner, name)
  raise AttributeError(f"module 'retrieval_jax' has no attribute {name!r}")


__all__ = [
    "alpha_query_expansion", "apply_whitening", "average_query_expansion", "boxes_to_cells",
    "build_index", "combine_scales", "compute_map", "database_side_augmentation",
    "default_eval_config", "distances", "estimate_region_weights", "evaluate", "exact_search",
    "ExactIndex", "exclude_query_gnd", "fixed_rmac_regions", "gem", "hit_rate_at_k", "holidays_map",
    "kl_weighting", "l2n", "learn_lw", "learn_pca_whitening", "losses", "mac", "metrics",
    "multiscale", "normalization", "original_gnd", "paired_cosine_similarity", "paired_euclidean",
    "paired_squared_euclidean", "pairwise_cosine_distance", "pairwise_cosine_similarity",
    "pairwise_euclidean", "pairwise_squared_euclidean", "pooling", "ProductQuantizer",
    "recall_at_k", "region_kl_divergence", "regional_pool", "regions", "rerank", "Retriever",
    "revisited_gnd", "rmac", "rmac_region_table", "rmac_regions", "scale_sizes", "ScannIndex",
    "search", "ShardedIndex", "spoc", "top_k_similar", "ukbench_ns_score", "whitening"
]
