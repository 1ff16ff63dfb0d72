"""Evaluation: descriptor extraction to a float16 on-disk store, the protocol runner, scores.

- :mod:`.descriptors`: per-host descriptor shards (float16 memory maps, written atomically),
  the extraction cache, bounded-memory readers.
- :mod:`.protocols`: which scores a ``RetrievalSet`` is judged by (revisited E/M/H mAP and
  mP@k, original mAP, ok/junk mAP with Holidays' query exclusion, UKBench N-S).
- :mod:`.runner`: ``evaluate(retriever, dataset, cfg)`` -> report, ``default_eval_config()``,
  ``format_table``, ``write_report``, and the bounded-memory exact ``search``.
"""

from retrieval_jax.evaluation.descriptors import (DescriptorArray, DescriptorStore,
                                                  ExtractionInfo, ImageSubset, StoredDescriptors,
                                                  descriptor_key, extract_to_store,
                                                  process_slice, retriever_fingerprint)
from retrieval_jax.evaluation.protocols import (has_ns_score, ok_junk_gnd, protocol_name,
                                                score_ranks)
from retrieval_jax.evaluation.runner import (RERANKINGS, WHITENINGS, default_eval_config,
                                             evaluate, format_table, search, write_report)

__all__ = [
    "DescriptorArray", "DescriptorStore", "ExtractionInfo", "ImageSubset", "RERANKINGS",
    "StoredDescriptors", "WHITENINGS", "default_eval_config", "descriptor_key", "evaluate",
    "extract_to_store", "format_table", "has_ns_score", "ok_junk_gnd", "process_slice",
    "protocol_name", "retriever_fingerprint", "score_ranks", "search", "write_report",
]
