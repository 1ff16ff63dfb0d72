"""Shared pieces of the benchmark scripts: the row format, optional peers, timing loops, the
machine description and atomic JSON reports.

Every benchmark module in this folder has the same shape, so ``run.py`` can import it and the
script still runs alone:

- ``build_parser() -> argparse.ArgumentParser``: its command line (``--json`` included);
- ``QUICK`` / ``FULL``: argument lists for ``run.py``'s default run (a busy 2-core CPU) and for
  ``run.py --full`` (accelerators: the benchmark's published sizes);
- ``run(args) -> list[dict]``: measures and returns rows (below); prints progress only;
- ``print_report(rows, args)``: the script's own table; ``main(argv)`` ties them together.

A row is a dict with these keys (extra keys are kept in the JSON report):

- ``case``: what was measured, with the size when it matters;
- ``ratio``: the figure, measured against ``baseline`` in the same process (never a bare
  wall-clock claim: machines differ, ratios travel);
- ``baseline``: what the ratio is relative to, and which way it reads ("img/s ours / torch");
- ``value``, ``unit``: an absolute figure for context (images/s, QPS, GB), optional;
- ``detail``: a short free text (recalls, percentages), optional;
- ``peer_ratio``: for rows that compare us with another library on the same work, our speed
  over theirs (> 1: we are faster); ``run.py`` lists the rows where it is below 1;
- ``skipped``: the reason, when a case could not run (an optional peer is not installed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

# Distributions whose versions every report records (when installed). Read from the package
# metadata, so recording them imports nothing (importing scann would load TensorFlow).
VERSIONED = ("jax", "jaxlib", "flax", "numpy", "scann", "tensorflow-cpu", "tensorflow", "torch",
             "torchvision", "faiss-cpu", "faiss-gpu", "pillow")

PEER_HINTS = {"torch": "pip install 'retrieval-jax[torch]'",
              "torchvision": "pip install 'retrieval-jax[torch]'",
              "faiss": "pip install faiss-cpu", "scann": "pip install scann"}


def optional_import(name: str) -> ModuleType | None:
  """The module, or None when it is not installed (a peer we can do without)."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def missing(name: str) -> str:
  """The ``skipped`` text for a peer that is not installed."""
  hint = PEER_HINTS.get(name)
  return f"{name} not installed" + (f" ({hint})" if hint else "")


def row(case: str, ratio: float | None, baseline: str, value: float | None = None,
        unit: str = "", **extra: Any) -> dict[str, Any]:
  """One result row (see the module docstring)."""
  out = {"case": case, "ratio": None if ratio is None else float(ratio), "baseline": baseline,
         "value": None if value is None else float(value), "unit": unit}
  out.update(extra)
  return out


def skipped(case: str, reason: str, **extra: Any) -> dict[str, Any]:
  """A row for a case that did not run, e.g. ``skipped("... vs faiss", missing("faiss"))``."""
  return row(case, None, "", skipped=reason, **extra)


def round_robin(cases: dict[str, Callable[[], Any]], repeats: int = 3,
                seconds: float = 0.0) -> dict[str, list[float]]:
  """Wall times of every case, run in turns (one call of each per round) until each has run
  ``repeats`` times and ``seconds`` have passed. On a shared machine the load drifts; taking
  turns makes the drift hit every case alike, so the ratios between them stay meaningful.
  Each case runs once untimed first (compilation, caches)."""
  for fn in cases.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in cases}
  start = time.perf_counter()
  rounds = 0
  while rounds < repeats or time.perf_counter() - start < seconds:
    for name, fn in cases.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    rounds += 1
  return times


def median(values: list[float]) -> float:
  return float(np.median(values))


# ------------------------------------------------------------------------------ machine / report

def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """The CPU, its cores and load: what the ratios were measured on."""
  info: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform(), "python": platform.python_version()}
  if hasattr(os, "sched_getaffinity"):
    info["cpus_available"] = len(os.sched_getaffinity(0))
  if hasattr(os, "getloadavg"):
    info["load_average"] = [round(v, 2) for v in os.getloadavg()]
  return info


def versions() -> dict[str, str]:
  out = {}
  for name in VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def jax_info() -> dict[str, Any]:
  """Backend and device count of this process's jax (imported only if already loaded: a
  report about a subprocess-only benchmark should not start a backend for nothing)."""
  info: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
  jax = sys.modules.get("jax")
  if jax is not None:
    info.update(backend=jax.default_backend(), device_count=jax.device_count(),
                devices=sorted({d.device_kind for d in jax.devices()}))
  return info


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``: a
  reader never sees half a file, even if this process dies mid-write."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, data: Any) -> None:
  write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def report(name: str, rows: list[dict], args: argparse.Namespace | None, *,
           status: str = "ok", error: str | None = None, duration_s: float | None = None,
           command: list[str] | None = None, benchmark_command: list[str] | None = None,
           mode: str | None = None) -> dict[str, Any]:
  """The JSON document of one benchmark run."""
  command = sys.argv if command is None else command
  out: dict[str, Any] = {
      "benchmark": name, "status": status,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "mode": mode, "duration_s": duration_s,
      "command": shlex.join(["python", *command]),
      "machine": machine(), "versions": versions(), "jax": jax_info(),
      "args": {k: v for k, v in vars(args).items() if k != "json"} if args else None,
      "rows": rows,
  }
  if benchmark_command is not None:
    out["benchmark_command"] = shlex.join(["python", *benchmark_command])
  if error is not None:
    out["error"] = error
  return out


def finish(name: str, rows: list[dict], args: argparse.Namespace) -> None:
  """The end of a benchmark script's ``main``: the report to ``--json`` when asked."""
  if getattr(args, "json", None):
    write_json_atomic(args.json, report(name, rows, args))
