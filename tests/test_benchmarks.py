"""benchmarks/run.py's machinery on cheap cases: the JSON reports and their fields, the
combined table, a missing optional peer reported as skipped, and a failing benchmark that is
reported (exit code 1) without stopping the others. The real benchmark (search) runs at a
tiny size with both of its peers made unimportable."""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import types

import numpy as np

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run_module():
  sys.path.insert(0, str(BENCHMARKS))
  try:
    yield importlib.import_module("run")
  finally:
    sys.path.remove(str(BENCHMARKS))


def _fake(run_fn) -> types.SimpleNamespace:
  """A module-like benchmark: a parser, a ``run`` and a report printer."""
  return types.SimpleNamespace(build_parser=lambda: argparse.ArgumentParser(), run=run_fn,
                               print_report=lambda rows, args: None)


def _broken(args):
  raise RuntimeError("this benchmark is broken")


def test_reports_table_skipped_peers_and_failures(run_module, tmp_path, monkeypatch):
  harness = importlib.import_module("harness")
  # Neither peer of the search benchmark can be imported: both are skipped, not errors.
  monkeypatch.setitem(sys.modules, "faiss", None)
  monkeypatch.setitem(sys.modules, "scann", None)

  def faster_peer(args):  # a made-up comparison in which the peer wins
    return [harness.row("fake vs peer", 0.5, "speed ours / peer", 10.0, "img/s",
                        peer_ratio=0.5)]

  selected = [
      run_module.Selected("broken", _fake(_broken)),
      run_module.Selected("search", "search", ["--sizes", "300x16", "--queries", "20"]),
      run_module.Selected("fake", _fake(faster_peer)),
  ]
  reports = run_module.run_benchmarks(selected, str(tmp_path), "quick",
                                      ["benchmarks/run.py", "--test"])

  # Every benchmark ran, the one after the broken one too, and each has its JSON report.
  assert [r["benchmark"] for r in reports] == ["broken", "search", "fake"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "broken.json", "fake.json", "search.json"]  # no temporary files left behind
  search = json.loads((tmp_path / "search.json").read_text())
  assert search["status"] == "ok" and search["mode"] == "quick"
  assert search["command"] == "python benchmarks/run.py --test"
  assert search["benchmark_command"] == ("python benchmarks/search.py --sizes 300x16 "
                                         "--queries 20")
  assert search["machine"]["cpu_count"] >= 1 and search["machine"]["cpu_model"]
  assert {"jax", "jaxlib", "flax", "numpy"} <= set(search["versions"])
  assert search["jax"]["backend"] == "cpu" and search["jax"]["device_count"] >= 1
  assert search["args"]["queries"] == 20 and search["duration_s"] > 0
  exact, *rest = search["rows"]
  assert exact["method"] == "jax exact" and exact["ratio"] == 1.0 and exact["recall@10"] == 1.0
  assert exact["baseline"] == "QPS / jax exact" and exact["value"] > 0 and exact["unit"] == "QPS"
  assert [r["skipped"] for r in rest] == ["scann not installed (pip install scann)",
                                          "faiss not installed (pip install faiss-cpu)"]

  broken = json.loads((tmp_path / "broken.json").read_text())
  assert broken["status"] == "failed" and "this benchmark is broken" in broken["error"]
  assert broken["rows"] == []
  assert run_module.exit_code(reports) == 1
  assert run_module.exit_code(reports[1:]) == 0

  text = run_module.summary(reports, "quick", 1.0)
  lines = text.splitlines()
  assert any(line.startswith("broken") and "FAILED" in line for line in lines)
  skipped_lines = [line for line in lines if "skipped" in line and "not installed" in line]
  assert len(skipped_lines) == 2 and all(line.startswith("search") for line in skipped_lines)
  assert any(line.startswith("search") and "QPS / jax exact" in line for line in lines)
  assert "fake: fake vs peer: ours at 0.50x the peer (2.00x slower)" in text
  assert "FAILED: broken" in lines[-1]


def test_every_benchmark_has_the_module_interface(run_module):
  for name in run_module.NAMES:
    text = (BENCHMARKS / f"{name}.py").read_text()
    for needed in ("def build_parser(", "def run(", "def print_report(", "QUICK", "FULL",
                   "--json"):
      assert needed in text, (name, needed)
  # The Makefile's bench target runs the suite.
  makefile = (BENCHMARKS.parent / "Makefile").read_text()
  assert "$(PY) benchmarks/run.py" in makefile


def test_cpu_kernels_records_every_convolution_and_matches_torch(run_module):
  """The per-layer benchmark sees each convolution of the network once per use (counted here
  from the architectures: ResNet-50 has a stem, 16 bottlenecks of 3 and 4 projection
  shortcuts; Lite0 a stem, 16 blocks of 3 less the first block's expansion, and a head), and
  its torch peer computes the same convolution (asymmetric TF padding and depthwise included)."""
  cpu_kernels = importlib.import_module("cpu_kernels")
  resnet = cpu_kernels.record_convolutions("resnet50", 64, 1)
  lite = cpu_kernels.record_convolutions("efficientnet_lite0", 64, 1)
  assert sum(count for *_, count in resnet) == 1 + 16 * 3 + 4
  assert sum(count for *_, count in lite) == 1 + 16 * 3 - 1 + 1
  assert len(resnet) < 53 and len(lite) < 49  # repeated layers are timed once
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  checked = set()
  for layer, shape, _ in resnet + lite:
    k, stride, pads, groups = cpu_kernels._conv_geometry(layer, shape)
    kind = (k, stride, pads[0] != pads[0][::-1], groups > 1)
    if kind in checked:
      continue
    checked.add(kind)
    *_, diff = cpu_kernels._conv_cases(torch, layer, shape, rng)
    assert diff < 1e-5, (layer, shape, diff)
  assert (3, 2, True, True) in checked  # a depthwise stride-2 layer with TF's uneven padding
