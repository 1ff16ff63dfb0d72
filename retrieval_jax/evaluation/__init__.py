"""Evaluation: descriptor extraction to a float16 on-disk store, the protocol runner, scores.

- :mod:`.descriptors`: per-host descriptor shards (float16 memory maps, written atomically),
  the extraction cache, bounded-memory readers.
- :mod:`.protocols`: which scores a ``RetrievalSet`` is judged by (revisited E/M/H mAP and
  mP@k, original mAP, ok/junk mAP with Holidays' query exclusion, UKBench N-S).
- :mod:`.runner`: ``evaluate(retriever, dataset, cfg)`` -> report, ``evaluate_descriptors``
  (the same phases on descriptors you already have, e.g. a 1M-row float16 memmap),
  ``default_eval_config()``, ``format_table``, ``write_report``, the bounded-memory exact
  ``search``, and compact codes (``CODES``: PQ with ADC, top-d truncation).
"""

from retrieval_jax.evaluation.descriptors import (DescriptorArray, DescriptorStore,
                                                  ExtractionInfo, ImageSubset, StoredDescriptors,
                                                  descriptor_key, extract_to_store,
                                                  process_slice, retriever_fingerprint)
from retrieval_jax.evaluation.protocols import (has_ns_score, ok_junk_gnd, protocol_name,
                                                score_ranks)
from retrieval_jax.evaluation.runner import (CODES, RERANKINGS, WHITENINGS, default_eval_config,
                                             evaluate, evaluate_descriptors, format_table, search,
                                             write_report)

__all__ = [
    "CODES", "DescriptorArray", "DescriptorStore", "ExtractionInfo", "ImageSubset", "RERANKINGS",
    "StoredDescriptors", "WHITENINGS", "default_eval_config", "descriptor_key", "evaluate",
    "evaluate_descriptors",
    "extract_to_store", "format_table", "has_ns_score", "ok_junk_gnd", "process_slice",
    "protocol_name", "retriever_fingerprint", "score_ranks", "search", "write_report",
]
