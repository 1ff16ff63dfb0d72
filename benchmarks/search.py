"""Search speed and recall: exact jax search, ScaNN, and (when installed) faiss-cpu.

For each dataset (``search.synthetic`` clustered descriptors, L2-normalised; "hard": a query's
true top-10 only ~75-80 % from its own cluster, "easy": ~100 %) this measures, on the same
queries in one process, queries per second and recall@10 / recall@100 against exact search of:

- jax exact search (``search.exact_search``, device-resident float32 database): the baseline;
- ScaNN (``search.ScannIndex``, default build) at a few ``leaves_to_search`` settings;
- ``auto`` (``search.calibrate`` on that ScaNN index: exact or ScaNN at recall@10 >= 0.95);
- faiss ``IndexFlatIP`` (exact: the like-for-like peer of ours) and ``IndexIVFPQ`` (when
  ``faiss`` is importable).

QPS ratios are to jax exact search. Build times are printed for context. No timing is asserted.

Run:  python benchmarks/search.py [--quick] [--queries 1000] [--json out.json]
(full size: 1M x 128 and 100k x 2048; ``--quick``: 100k x 128 and 20k x 512).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import harness
from retrieval_jax.search import calibrate, exact_search, synthetic

K = 100
BASELINE = "jax exact"
QUICK = ["--sizes", "50000x128,20000x512", "--queries", "500"]
FULL = ["--queries", "1000", "--easy"]


def _recall(truth: np.ndarray, found: np.ndarray, k: int) -> float:
  return float(np.mean([len(set(t[:k]) & set(f[:k])) / k for t, f in zip(truth, found)]))


def _timed(fn, repeats: int = 1):
  """(seconds, result) of the fastest of ``repeats`` runs (after one warm-up run)."""
  result = fn()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def run_dataset(name: str, n: int, d: int, spread: float | None, num_queries: int) -> list[dict]:
  """Rows (see ``harness``) of every method on one dataset; progress is printed."""
  database, queries, db_labels, q_labels = synthetic.clustered_descriptors(
      n, d, num_queries, spread=spread, seed=0)
  rows = []
  base_qps = None

  def add(method, setting, seconds, found, build_s=0.0, exact_peer=False):
    qps = num_queries / seconds
    r10, r100 = _recall(truth, found, 10), _recall(truth, found, 100)
    extra = {"peer_ratio": base_qps / qps} if exact_peer else {}
    rows.append(harness.row(
        f"{name}: {method} {setting}", qps / (base_qps or qps), "QPS / jax exact", qps, "QPS",
        detail=f"r@10 {r10:.3f} r@100 {r100:.3f}", dataset=name, method=method,
        setting=setting, qps=qps, **{"recall@10": r10, "recall@100": r100}, build_s=build_s,
        **extra))
    print(f"  {method:<16} {setting:<22} {qps:>9.0f} qps  r@10 {r10:.3f}  r@100 {r100:.3f}  "
          f"build {build_s:.1f}s", flush=True)

  device_db = jnp.asarray(database)
  seconds, (_, truth) = _timed(lambda: jax.block_until_ready(
      exact_search(queries, device_db, K)))
  truth = np.asarray(truth)
  own = synthetic.own_cluster_fraction(truth[:, :10], db_labels, q_labels)
  print(f"{name}: {n} x {d}, {num_queries} queries, own-cluster share of true top-10 "
        f"{own:.2f}", flush=True)
  add(BASELINE, "f32, chunked", seconds, truth)
  base_qps = rows[0]["qps"]

  if harness.optional_import("scann") is None:
    rows.append(harness.skipped(f"{name}: scann", harness.missing("scann"), dataset=name,
                                method="scann"))
  else:
    from retrieval_jax.search import ScannIndex
    start = time.perf_counter()
    index = ScannIndex.build(database)
    build = time.perf_counter() - start
    leaves = index.params["num_leaves"]
    for fraction in (0.05, 0.1, 0.3):
      lts = max(1, int(round(fraction * leaves)))
      seconds, (_, found) = _timed(lambda: index.search(queries, K, leaves_to_search=lts))
      add("scann", f"{lts}/{leaves} leaves", seconds, found, build)
    start = time.perf_counter()
    chosen = calibrate(database, index, 0.95)
    calib = time.perf_counter() - start
    seconds, (_, found) = _timed(lambda: chosen.search(queries, K))
    setting = chosen.kind + (f" {chosen.params['leaves_to_search']}/{leaves} leaves"
                             if chosen.kind == "scann" else "")
    add("auto (r>=0.95)", setting, seconds, found, build + calib)

  faiss = harness.optional_import("faiss")
  if faiss is None:
    print("  faiss not installed: skipped")
    rows.append(harness.skipped(f"{name}: jax exact vs faiss", harness.missing("faiss"),
                                dataset=name, method="faiss"))
    return rows
  flat = faiss.IndexFlatIP(d)
  flat.add(database)
  seconds, (_, found) = _timed(lambda: flat.search(queries, K))
  add("faiss flat", "IndexFlatIP", seconds, found, exact_peer=True)
  nlist = int(4 * np.sqrt(n))
  m = 16 if d <= 256 else 64
  start = time.perf_counter()
  ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
  ivfpq.train(database[np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)])
  ivfpq.add(database)
  build = time.perf_counter() - start
  for nprobe in (16, 64):
    ivfpq.nprobe = nprobe
    seconds, (_, found) = _timed(lambda: ivfpq.search(queries, K))
    add("faiss ivfpq", f"nlist {nlist} m {m} np {nprobe}", seconds, found, build)
  return rows


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="100k x 128 and 20k x 512")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--easy", action="store_true", help="also run the easy sets")
  parser.add_argument("--sizes", help="override the sizes, e.g. 1000000x128,100000x2048")
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def run(args: argparse.Namespace) -> list[dict]:
  sizes = [(100_000, 128), (20_000, 512)] if args.quick else [(1_000_000, 128),
                                                               (100_000, 2048)]
  if args.sizes:
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
  spreads = {"hard": None}  # None: synthetic.hard_spread(N), ~80 % own-cluster neighbours
  if args.easy:
    spreads["easy"] = synthetic.EASY_SPREAD
  rows = []
  for n, d in sizes:
    for label, spread in spreads.items():
      rows += run_dataset(f"{label} {n // 1000}k x {d}", n, d, spread, args.queries)
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  print(f"\nbackend {jax.default_backend()} x{jax.device_count()}; k = {K}; QPS ratio to jax "
        f"exact search on the same dataset")
  print(f"{'dataset':<18} {'method':<16} {'setting':<24} {'QPS':>8} {'ratio':>6} "
        f"{'r@10':>6} {'r@100':>6}")
  for r in rows:
    if r.get("skipped"):
      print(f"{r['dataset']:<18} {r['method']:<16} skipped: {r['skipped']}")
      continue
    print(f"{r['dataset']:<18} {r['method']:<16} {r['setting']:<24} {r['qps']:>8.0f} "
          f"{r['ratio']:>6.2f} {r['recall@10']:>6.3f} {r['recall@100']:>6.3f}")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("search", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
