"""Compact codes (REMAP §III-E): mAP of PQ and truncated codes next to full descriptors.

On the test split of the synthetic benchmark (``data.synthetic.generate``; ``small``: 600
database photos, 20 queries with boxes, revisited Easy / Medium / Hard), with
``Retriever.from_pretrained("efficientnet-lite0", pooling="gem")`` at ``max_size`` 256, this runs
``evaluation.evaluate`` once per setting, reusing the extracted descriptors (one descriptor store
for all):

- full descriptors (1280-D, float16 as stored);
- product quantization, ``m`` sub-vectors x ``2**bits`` centroids (16 x 8 = 16 bytes per image),
  searched by asymmetric distance computation, trained on the database itself or on the
  synthetic ``train`` split;
- PCA whitening learned on the ``train`` split, with all components, and truncated to the first
  ``d`` (128) whitened dimensions;
- PCA-w to ``d`` dimensions followed by PQ (trained on the ``train`` split).

It prints E / M / H mAP, the bytes per image (asserting 16 for 16 x 8 PQ) and the ratio of each
mAP to the full descriptors'. Extraction dominates the run time (a few minutes on a 2-core CPU,
plus ~40 s to generate ``small``); scores are deterministic for a given environment.

Run:  python benchmarks/codes.py [--preset small] [--max-size 256] [--truncate-dims 128]
      [--cache-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import harness
from retrieval_jax.data import synthetic
from retrieval_jax.evaluation.runner import evaluate
from retrieval_jax.retriever import Retriever

PROTOCOLS = ("easy", "medium", "hard")
# The default run uses the tiny preset (48 database photos, 12 queries: seconds, not minutes);
# its 48 training rows cannot train 2**8 centroids, so PQ there is 16 x 4 bits.
QUICK = ["--preset", "tiny", "--pq-bits", "4"]
FULL = ["--preset", "small"]


def settings(args: argparse.Namespace) -> list[tuple[str, dict, bool]]:
  """``(name, evaluation config, learns on the train split)`` of every row, full first."""
  pq = {"codes": "pq", "pq_subvectors": args.pq_subvectors, "pq_bits": args.pq_bits}
  pq_name = f"PQ {args.pq_subvectors}x{args.pq_bits}"
  d = args.truncate_dims
  return [
      ("full descriptors", {}, False),
      (f"{pq_name} (trained on database)", {**pq, "pq_train": "database"}, False),
      (f"{pq_name} (trained on train split)", {**pq, "pq_train": "whitening_set"}, True),
      ("PCA-w (all dims)", {"whitening": "pca"}, True),
      (f"PCA-w + truncate to {d}", {"whitening": "pca", "codes": "truncate",
                                    "truncate_dims": d}, True),
      (f"PCA-w {d} + {pq_name}", {"whitening": "pca", "whitening_dims": d, **pq,
                                  "pq_train": "whitening_set"}, True),
  ]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small", help="synthetic benchmark preset")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-size", type=int, default=256)
  parser.add_argument("--pq-subvectors", type=int, default=16)
  parser.add_argument("--pq-bits", type=int, default=8)
  parser.add_argument("--truncate-dims", type=int, default=128)
  parser.add_argument("--cache-dir", help="descriptor store to reuse (default: a temp dir)")
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def run(args: argparse.Namespace) -> list[dict]:
  start = time.perf_counter()
  bench = synthetic.generate(args.preset, seed=args.seed)
  args.generated_s = time.perf_counter() - start
  args.counts = (len(bench.test.queries), len(bench.test.database))
  retriever = Retriever.from_pretrained("efficientnet-lite0", pooling="gem")
  results = []
  with tempfile.TemporaryDirectory(prefix="codes_bench.") as tmp:
    cache = args.cache_dir or tmp
    for name, cfg, uses_train in settings(args):
      start = time.perf_counter()
      report = evaluate(retriever, bench.test, {"max_size": args.max_size, "cache_dir": cache,
                                                "retriever_id": "efficientnet-lite0-gem",
                                                **cfg},
                        whitening_set=bench.train if uses_train else None)
      codes = report["codes"]
      if codes["method"] == "pq" and (args.pq_subvectors, args.pq_bits) == (16, 8):
        assert codes["bytes_per_image"] == 16, codes  # the acceptance criterion
      results.append({"setting": name, "dims": codes["dims"],
                      "bytes_per_image": codes["bytes_per_image"],
                      "mAP": {p: report["metrics"][p]["mAP"] for p in PROTOCOLS},
                      "codes": codes, "whitening": report["whitening"],
                      "seconds": time.perf_counter() - start})
      print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
  full = results[0]
  rows = []
  for r in results:
    ratios = {p: r["mAP"][p] / full["mAP"][p] if full["mAP"][p] else float("nan")
              for p in PROTOCOLS}
    rows.append(harness.row(
        f"{r['setting']} ({args.preset})", ratios["medium"], "mAP M / full descriptors",
        r["bytes_per_image"], "B/image",
        detail="E/M/H " + "/".join(f"{100 * r['mAP'][p]:.1f}" for p in PROTOCOLS),
        ratio_to_full=ratios, **r))
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  full = rows[0]
  print(f"synthetic {args.preset} (seed {args.seed}) test split: {args.counts[0]} "
        f"queries, {args.counts[1]} database photos; EfficientNet-Lite0 ImageNet + "
        f"GeM, max_size {args.max_size}; revisited mAP (%); generated in {args.generated_s:.0f} s")
  print(f"{'setting':<36} {'dims':>5} {'B/image':>8} {'E':>6} {'M':>6} {'H':>6}   "
        f"{'ratio to full E / M / H':>23} {'bytes':>7}")
  for r in rows:
    ratios = " / ".join(f"{r['ratio_to_full'][p]:.2f}" for p in PROTOCOLS)
    print(f"{r['setting']:<36} {r['dims']:>5} {r['bytes_per_image']:>8g} "
          + " ".join(f"{100 * r['mAP'][p]:>6.1f}" for p in PROTOCOLS)
          + f"   {ratios:>23} {r['bytes_per_image'] / full['bytes_per_image']:>7.4f}")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("codes", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
