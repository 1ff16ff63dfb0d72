"""Runs every benchmark, writes ``benchmarks/results/<name>.json`` and prints one table.

The default sizes fit a busy 2-core CPU (about 12 minutes in all); ``--full`` uses each
benchmark's published sizes (ResNet-50 at batch 16, 1M x 128 search, 1,000,000 distractors,
the ``small`` synthetic preset: meant for accelerators and big machines). Seeds are fixed in
every benchmark. Each figure is a ratio to a baseline measured in the same process (ours /
torch, regional / global pooling, ScaNN / exact search, 4 devices / 1 device, ...); absolute
rates are shown next to them for context only.

The benchmarks run in this process, one after the other (``train_step`` and ``scale`` start
their own subprocesses: forced device counts, clean peak-RSS figures). A benchmark that fails is
reported in the table and in its JSON file, makes the exit code 1, and does not stop the others.
Optional peers that are not installed (torch, faiss) are skipped with a note.

Run:  python benchmarks/run.py [--full] [--only NAME ...] [--results-dir DIR] [--list]
      make bench
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the benchmark modules import each other by file name
  sys.path.insert(0, HERE)

import harness  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")


@dataclass(frozen=True)
class Benchmark:
  """One benchmark module of this folder and what its figures are measured against."""
  name: str
  measures: str
  baseline: str


BENCHMARKS = (
    Benchmark("backbones", "GeM descriptor extraction img/s, ResNet-50 and Lite0, 224/512 px",
              "PyTorch eager (torchvision ResNet-50) NCHW and channels_last, same threads"),
    Benchmark("heads", "regional heads (R-MAC, R-GAC, REMAP, DARAC) at 1024x768",
              "global GeM head on the same ResNet-50 maps"),
    Benchmark("pooling", "regional pooling ops on a 24x32x2048 map (1024x768 px)",
              "global gem on the same map"),
    Benchmark("train_step", "triplet-step tuples/s, 1 vs 4 forced devices; mining share",
              "1 device; the epoch's training steps"),
    Benchmark("search", "search QPS and recall: jax exact, ScaNN, faiss-cpu",
              "jax exact search on the same queries"),
    Benchmark("cpu_kernels", "each convolution of ResNet-50 / Lite0; one exact-search chunk",
              "torch conv2d channels_last (oneDNN); numpy matmul, faiss IndexFlatIP"),
    Benchmark("scale", "peak RSS of evaluation with +250k (default) / +1M (--full) distractors",
              "the 4 GB RSS budget; mAP without distractors"),
    Benchmark("data", "image loader img/s (JPEG decode, resize, bucket)",
              "1 loader thread"),
    Benchmark("codes", "mAP of PQ / PCA-w truncated codes (synthetic tiny; small with --full)",
              "full descriptors"),
    Benchmark("orl_map", "mAP on the ORL faces, ImageNet Lite0 GeM", "random weights"),
)
NAMES = tuple(b.name for b in BENCHMARKS)
TORCH_USERS = ("backbones", "cpu_kernels")  # import torch(vision) before TensorFlow


@dataclass
class Selected:
  """A benchmark to run: its name, its module (a name in this folder, or a module-like object
  with ``build_parser``, ``run`` and ``print_report``) and its argument list."""
  name: str
  module: ModuleType | Any
  argv: list[str] = field(default_factory=list)


def _load(module: ModuleType | Any | str) -> Any:
  return importlib.import_module(module) if isinstance(module, str) else module


def run_one(sel: Selected, results_dir: str, mode: str, command: list[str]) -> dict[str, Any]:
  """Runs one benchmark, writes its JSON report atomically and returns the report. Failures
  (an exception, a failed subprocess) become ``status: "failed"`` with the traceback's tail."""
  print(f"\n=== {sel.name}: python benchmarks/{sel.name}.py {shlex.join(sel.argv)}", flush=True)
  start = time.perf_counter()
  args, rows, status, error = None, [], "ok", None
  try:
    module = _load(sel.module)
    args = module.build_parser().parse_args(sel.argv)
    rows = module.run(args)
    module.print_report(rows, args)
  except Exception as e:  # one failure is reported, the other benchmarks still run
    status = "failed"
    error = f"{type(e).__name__}: {e}"[:500] + "\n" + traceback.format_exc()[-3000:]
    print(f"FAILED: {error}", flush=True)
  except SystemExit as e:  # argparse errors and sys.exit in a benchmark
    status, error = "failed", f"SystemExit: {e.code}"
    print(f"FAILED: {error}", flush=True)
  duration = time.perf_counter() - start
  report = harness.report(
      sel.name, rows, args, status=status, error=error, duration_s=round(duration, 2),
      command=command, benchmark_command=[f"benchmarks/{sel.name}.py", *sel.argv], mode=mode)
  harness.write_json_atomic(os.path.join(results_dir, f"{sel.name}.json"), report)
  print(f"=== {sel.name}: {status} in {duration:.0f} s", flush=True)
  return report


def _torch_first() -> None:
  """torchvision must be imported before TensorFlow (ScaNN's op library loads it): importing
  it afterwards segfaults in triton's native library. Settle the order up front."""
  if "tensorflow" not in sys.modules:
    harness.optional_import("torchvision.models")


def run_benchmarks(selected: list[Selected], results_dir: str = RESULTS_DIR, mode: str = "quick",
                   command: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs ``selected`` in order; returns their reports (also written to ``results_dir``)."""
  command = list(sys.argv) if command is None else command
  if any(s.name in TORCH_USERS for s in selected):
    _torch_first()
  return [run_one(sel, results_dir, mode, command) for sel in selected]


# ------------------------------------------------------------------------------ the table

def _fmt_ratio(r: dict[str, Any]) -> str:
  if r.get("skipped"):
    return "skipped"
  return "" if r.get("ratio") is None else f"{r['ratio']:.2f}x"


def _fmt_value(r: dict[str, Any]) -> str:
  if r.get("skipped"):
    return r["skipped"]
  parts = []
  if r.get("value") is not None:
    parts.append(f"{r['value']:.4g} {r.get('unit', '')}".strip())
  if r.get("detail"):
    parts.append(str(r["detail"]))
  return "; ".join(parts)


def table_lines(reports: list[dict[str, Any]]) -> list[str]:
  """The combined table: one line per row, with the failures and skips in place."""
  body = []
  for rep in reports:
    if rep["status"] != "ok":
      first = (rep.get("error") or "").splitlines()[0] if rep.get("error") else ""
      body.append((rep["benchmark"], "FAILED", "", "", first))
      continue
    for r in rep["rows"]:
      body.append((rep["benchmark"], r["case"], _fmt_ratio(r), r.get("baseline", ""),
                   _fmt_value(r)))
  header = ("benchmark", "case", "ratio", "ratio of", "absolute (context only)")
  widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(4)]
  lines = []
  for line in [header, None, *body]:
    if line is None:
      lines.append("-" * (sum(widths) + 8 + len(header[4])))
      continue
    lines.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}  "
                 f"{line[3]:<{widths[3]}}  {line[4]}".rstrip())
  return lines


def slower_than_peers(reports: list[dict[str, Any]]) -> list[str]:
  """Rows where another library did the same work faster than we did (``peer_ratio`` < 1)."""
  out = []
  for rep in reports:
    for r in rep["rows"]:
      if r.get("peer_ratio") is not None and r["peer_ratio"] < 1:
        out.append(f"{rep['benchmark']}: {r['case']}: ours at {r['peer_ratio']:.2f}x the "
                   f"peer ({1 / r['peer_ratio']:.2f}x slower)")
  return out


def summary(reports: list[dict[str, Any]], mode: str, elapsed_s: float) -> str:
  machine = harness.machine()
  jax_info = next((rep["jax"] for rep in reports if rep["jax"].get("backend")), {})
  backend = (f"jax {jax_info['backend']} x{jax_info['device_count']}" if jax_info
             else "jax not started")
  versions = harness.versions()
  shown = " ".join(f"{k} {versions[k]}" for k in ("jax", "flax", "torch", "faiss-cpu", "scann")
                   if k in versions)
  load = machine.get("load_average")
  lines = [f"mode {mode}; {machine['cpu_model']}, {machine['cpu_count']} cores"
           + (f" (load {load[0]:.1f} at the end)" if load else "")
           + f"; {backend}; {shown}; {elapsed_s / 60:.1f} min", *table_lines(reports)]
  slow = slower_than_peers(reports)
  lines.append("")
  lines.append("slower than a peer:" + (" none" if not slow else ""))
  lines += [f"  {s}" for s in slow]
  failed = [rep["benchmark"] for rep in reports if rep["status"] != "ok"]
  if failed:
    lines.append(f"FAILED: {', '.join(failed)} (tracebacks in their JSON files)")
  return "\n".join(lines)


def load_reports(results_dir: str) -> list[dict[str, Any]]:
  """The JSON reports in ``results_dir``, known benchmarks first in suite order."""
  reports = []
  for name in sorted(os.listdir(results_dir), key=lambda n: (
      NAMES.index(n[:-5]) if n[:-5] in NAMES else len(NAMES), n)):
    if name.endswith(".json") and not name.startswith("."):
      with open(os.path.join(results_dir, name)) as f:
        reports.append(json.load(f))
  return reports


def exit_code(reports: list[dict[str, Any]]) -> int:
  return 0 if all(rep["status"] == "ok" for rep in reports) else 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true",
                      help="the benchmarks' full sizes (accelerators, big machines)")
  parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                      help=f"run only these, in this order (of {', '.join(NAMES)})")
  parser.add_argument("--results-dir", default=RESULTS_DIR)
  parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.list:
    for b in BENCHMARKS:
      print(f"{b.name:<11} {b.measures}\n{'':<11} baseline: {b.baseline}")
    return 0
  mode = "full" if args.full else "quick"
  names = args.only or NAMES
  if set(TORCH_USERS) & set(names):
    _torch_first()
  selected = []
  for name in names:
    # The argument lists live in each module (QUICK / FULL), next to the parser they feed. A
    # module that does not import is reported as failed by run_one, which imports it again.
    try:
      module = importlib.import_module(name)
      bench_argv = list(module.FULL if args.full else module.QUICK)
    except Exception:
      bench_argv = []
    selected.append(Selected(name, name, bench_argv))
  start = time.perf_counter()
  command = ["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
  reports = run_benchmarks(selected, args.results_dir, mode, command)
  text = summary(reports, mode, time.perf_counter() - start)
  print("\n" + text)
  # table.txt: the latest report of every benchmark in the folder, so that a --only run
  # refreshes its own rows and keeps the others (each line of dates says when each ran).
  latest = load_reports(args.results_dir)
  dates = ", ".join(f"{rep['benchmark']} {rep['date'][:16]}" for rep in latest)
  harness.write_text_atomic(os.path.join(args.results_dir, "table.txt"),
                            summary(latest, mode, time.perf_counter() - start).split("\n", 1)[1]
                            + f"\n\nrun at (UTC): {dates}\n")
  return exit_code(reports)


if __name__ == "__main__":
  sys.exit(main())
