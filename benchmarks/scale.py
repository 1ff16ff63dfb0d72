"""Evaluation at the scale of +1M distractors, in bounded memory: peak RSS and time.

A revisited-protocol test set of 512-D descriptors is made with known positives: 70 queries and
a "real" database of 5,000 rows in which every query has a few easy (cosine ~0.55-0.75), hard
(~0.15-0.35) and junk (~0.45) rows, the others random. Then 1,000,000 random unit 512-D
distractors (cosines to a query ~N(0, 1/512), up to ~0.22) are written, 65,536 rows at a time,
to a float16 ``.npy`` memory map on disk (1 GB; the full matrix is never in memory), and the
real database and the distractors are read as one ``[1,005,000, 512]`` matrix
(``evaluation.StoredDescriptors`` over the two files, real rows first, as R1M appends its
distractors). ``evaluation.runner.evaluate_descriptors`` then ranks the database for every
query with the runner's bounded-memory search (default ``memory_budget_mb``: 1024; the full
ranking fits it, so each query gets all 1,005,000 ranks) and scores revisited E/M/H mAP with
``n_db`` = 1,005,000, next to the same queries against the real database alone.

The evaluation runs in a child process, so the peak resident set size it reports counts its
own imports and memory once, not the parent's, nor the writing of the distractors. The figure
is the child's ``VmHWM`` (/proc/self/status), which starts afresh at ``exec``; its
``ru_maxrss`` is printed too, but Linux carries the forking parent's resident size into it
across ``exec`` (so under ``run.py``, after ResNet-50 and torch, it reads ~2 GB whatever the
evaluation does). Resident pages of the memory-mapped float16 files count in RSS too (up to
their 1 GB). Times are printed for context; nothing about time is asserted. The temporary
directory is removed at the end.

Run:  python benchmarks/scale.py [--distractors 1000000] [--dim 512] [--queries 70]
      [--real 5000] [--budget-mb 1024] [--tmp-dir DIR] [--json out.json]
(``run.py`` uses 250,000 distractors by default, to fit its time budget, and 1M with --full.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import harness

GB = 1 << 30
RSS_BUDGET_GB = 4.0
BLOCK_ROWS = 65536
QUICK = ["--distractors", "250000"]
FULL = ["--distractors", "1000000"]


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _at_cosine(rng: np.random.Generator, q: np.ndarray, cosines: np.ndarray) -> np.ndarray:
  """Unit rows whose cosine with unit ``q`` is each of ``cosines``."""
  u = rng.standard_normal((len(cosines), len(q)))
  u = _unit(u - np.outer(u @ q, q))  # orthogonal to q
  return cosines[:, None] * q + np.sqrt(1.0 - cosines[:, None] ** 2) * u


def real_set(n_queries: int, n_real: int, dim: int, seed: int = 0):
  """``(queries [Q, D] float32, real database [n_real, D] float16, revisited gnd)``."""
  rng = np.random.default_rng(seed)
  queries = _unit(rng.standard_normal((n_queries, dim)))
  database = _unit(rng.standard_normal((n_real, dim)))
  slots = iter(rng.permutation(n_real))
  gnd = []
  for q in queries:
    entry = {}
    for key, count, (lo, hi) in (("easy", rng.integers(3, 7), (0.55, 0.75)),
                                 ("hard", rng.integers(4, 9), (0.15, 0.35)),
                                 ("junk", rng.integers(1, 3), (0.4, 0.5))):
      rows = [next(slots) for _ in range(count)]
      database[rows] = _at_cosine(rng, q, rng.uniform(lo, hi, count))
      entry[key] = [int(r) for r in rows]
    gnd.append(entry)
  return queries.astype(np.float32), database.astype(np.float16), gnd


def write_distractors(path: str, n: int, dim: int, seed: int = 1) -> None:
  """``n`` random unit rows as a float16 ``.npy`` memory map, written block by block."""
  out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
  rng = np.random.default_rng(seed)
  for start in range(0, n, BLOCK_ROWS):
    rows = min(BLOCK_ROWS, n - start)
    out[start:start + rows] = _unit(rng.standard_normal((rows, dim), np.float32))
    out.flush()
  del out


def _proc_status() -> dict[str, float]:
  """Peak and current RSS (and its anonymous / file-backed parts) in GB, from /proc."""
  fields = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
          fields[name] = int(value.split()[0]) * 1024 / GB
  except OSError:
    pass
  return fields


def child(directory: str, budget_mb: float) -> None:
  """Evaluates the stored set; prints one JSON line with scores, times and memory."""
  import jax

  from retrieval_jax.data.datasets import RetrievalSet
  from retrieval_jax.evaluation import StoredDescriptors
  from retrieval_jax.evaluation.runner import evaluate_descriptors

  start = time.perf_counter()
  with open(os.path.join(directory, "gnd.json")) as f:
    gnd = json.load(f)
  queries = np.load(os.path.join(directory, "queries.npy"))
  database = StoredDescriptors([os.path.join(directory, "real.npy"),
                                os.path.join(directory, "distractors.npy")])
  n_db = len(database)
  dataset = RetrievalSet(name="scale+distractors", database=range(n_db),
                         queries=range(len(queries)), gnd=gnd)
  # Resident before the evaluation, with jax's backend started: the evaluation adds the peak
  # minus this.
  jax.numpy.zeros(1).block_until_ready()
  rss_before_gb = _proc_status().get("VmRSS", 0.0)
  report = evaluate_descriptors(queries, database, dataset, {"memory_budget_mb": budget_mb})
  print(json.dumps({
      "metrics": {p: report["metrics"][p]["mAP"] for p in report["metrics"]},
      "search": report["search"], "timings_s": report["timings_s"],
      "wall_s": time.perf_counter() - start,
      "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
      "proc_status_gb": _proc_status(), "rss_before_gb": rss_before_gb, "n_db": n_db}))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--distractors", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--queries", type=int, default=70)
  parser.add_argument("--real", type=int, default=5000, help="real database rows")
  parser.add_argument("--budget-mb", type=float, default=None,
                      help="memory_budget_mb (default: the runner's)")
  parser.add_argument("--tmp-dir", help="where the float16 files go (default: system temp)")
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  return parser


def _budget_mb(args: argparse.Namespace) -> float:
  if args.budget_mb is None:
    from retrieval_jax.evaluation.runner import default_eval_config
    return float(default_eval_config().memory_budget_mb)
  return args.budget_mb


def run(args: argparse.Namespace) -> list[dict]:
  budget_mb = _budget_mb(args)
  directory = tempfile.mkdtemp(prefix="scale_bench.", dir=args.tmp_dir)
  try:
    start = time.perf_counter()
    queries, real, gnd = real_set(args.queries, args.real, args.dim)
    np.save(os.path.join(directory, "queries.npy"), queries)
    np.save(os.path.join(directory, "real.npy"), real)
    with open(os.path.join(directory, "gnd.json"), "w") as f:
      json.dump(gnd, f)
    write_distractors(os.path.join(directory, "distractors.npy"), args.distractors, args.dim)
    build_s = time.perf_counter() - start
    disk_gb = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)) / GB

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", directory,
                           "--budget-mb", str(budget_mb)], capture_output=True, text=True)
    child_s = time.perf_counter() - start
    if proc.returncode != 0:
      raise RuntimeError(f"the evaluation process failed:\n{proc.stdout[-4000:]}"
                         f"{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The largest child of this process so far (the evaluation, unless a caller ran bigger
    # ones before), with the same inherited-ru_maxrss caveat as the child's own.
    children_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
  finally:
    shutil.rmtree(directory, ignore_errors=True)

  # The same queries against the real database alone (small: in this process).
  from retrieval_jax.data.datasets import RetrievalSet
  from retrieval_jax.evaluation.runner import evaluate_descriptors
  real_only = evaluate_descriptors(queries, real, RetrievalSet(
      name="scale", database=range(len(real)), queries=range(len(queries)), gnd=gnd))
  real_map = {p: real_only["metrics"][p]["mAP"] for p in real_only["metrics"]}

  n_db = result["n_db"]
  # VmHWM: the child's own high-water mark (ru_maxrss includes the parent's RSS at fork).
  peak = result["proc_status_gb"].get("VmHWM", result["ru_maxrss_gb"])
  float32_gb = n_db * args.dim * 4 / GB  # what holding the database in memory would take
  size = f"{args.queries} q x {n_db:,} db ({args.distractors:,} distractors) x {args.dim}"
  info = {"n_db": n_db, "distractors": args.distractors, "budget_mb": budget_mb,
          "build_s": build_s, "child_s": child_s, "disk_gb": disk_gb,
          "children_maxrss_gb": children_gb, "real_only_mAP": real_map,
          "distractors_mAP": result["metrics"], "peak_rss_gb": peak,
          "ru_maxrss_gb": result["ru_maxrss_gb"],
          "proc_status_gb": result["proc_status_gb"], "search": result["search"],
          "timings_s": result["timings_s"]}
  timings = result["timings_s"]
  return [
      harness.row(f"peak RSS, {size}", peak / RSS_BUDGET_GB,
                  f"peak RSS / {RSS_BUDGET_GB:g} GB budget", peak, "GB",
                  detail=f"+{peak - result['rss_before_gb']:.2f} GB over imports; f32 db "
                  f"{float32_gb:.2f} GB", float32_database_gb=float32_gb, **info),
      harness.row(f"mAP M with {args.distractors:,} distractors",
                  result["metrics"]["medium"] / real_map["medium"],
                  "mAP / real database only", None, "",
                  detail="E/M/H " + " ".join(f"{100 * result['metrics'][p]:.1f}"
                                             for p in ("easy", "medium", "hard"))
                  + f" vs {100 * real_map['medium']:.1f} M real only",
                  metrics=result["metrics"], real_only_mAP=real_map),
      harness.row(f"evaluation time, {n_db:,} db", timings["search"] / timings["total"],
                  "search share of evaluate_descriptors", timings["total"], "s",
                  detail=f"metrics {timings['metrics']:.1f} s", timings_s=timings),
  ]


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  r = rows[0]
  n_db, se, status = r["n_db"], r["search"], r["proc_status_gb"]
  print(f"{args.queries} queries x {n_db:,} database rows ({args.real:,} real + "
        f"{args.distractors:,} random distractors), {args.dim}-D float16 on disk "
        f"({r['disk_gb']:.2f} GB, written in {r['build_s']:.1f} s); memory_budget_mb "
        f"{r['budget_mb']:g}")
  print(f"search: {'full ranking' if se['full_ranking'] else 'top ' + str(se['top_k'])}, "
        f"query chunk {se['query_chunk']}, database chunk {se['database_chunk']:,} rows, "
        f"database in memory: {se['database_in_memory']}")
  print(f"{'':<28}{'E':>7}{'M':>7}{'H':>7}")
  for name, scores in ((f"real database ({args.real:,})", r["real_only_mAP"]),
                       (f"+{args.distractors:,} distractors", r["distractors_mAP"])):
    print(f"{name:<28}" + "".join(f"{100 * scores[p]:>7.1f}" for p in ("easy", "medium",
                                                                         "hard")))
  peak, children_gb = r["peak_rss_gb"], r["children_maxrss_gb"]
  print(f"peak RSS of the evaluation process: {peak:.2f} GB (VmHWM in the child; ru_maxrss "
        f"{r['ru_maxrss_gb']:.2f} GB, RUSAGE_CHILDREN {children_gb:.2f} GB); "
        f"budget {RSS_BUDGET_GB:.0f} GB: "
        f"{'within' if peak < RSS_BUDGET_GB else 'EXCEEDED'} ({peak / RSS_BUDGET_GB:.0%} of it)")
  if status:
    print(f"  at exit: RSS {status.get('VmRSS', 0):.2f} GB = anonymous "
          f"{status.get('RssAnon', 0):.2f} + file-backed (mapped descriptors, libraries) "
          f"{status.get('RssFile', 0):.2f} GB")
  timings = r["timings_s"]
  print(f"time: evaluation process {r['child_s']:.1f} s (imports included), "
        f"evaluate_descriptors {timings['total']:.1f} s: search {timings['search']:.1f} s, "
        f"metrics {timings['metrics']:.1f} s")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  if args.child:
    child(args.child, _budget_mb(args))
    return
  rows = run(args)
  print_report(rows, args)
  harness.finish("scale", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
