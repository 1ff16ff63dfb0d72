"""Extraction split across processes: two ``jax.distributed`` processes on localhost each write
their own descriptor shard, and the shards read back as the single-process extraction."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import extract_worker as ew
from retrieval_jax.evaluation import DescriptorStore, extract_to_store, process_slice


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_one_shard_each_matching_one_process(tmp_path):
  worker = Path(__file__).with_name("extract_worker.py")
  shared = tmp_path / "shared_store"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]))
  port = _free_port()
  outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
  start = time.monotonic()
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), str(shared),
                             str(outs[i])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  # Meanwhile, the single-process reference with the same retriever, images and settings.
  reference_store = DescriptorStore(tmp_path / "single")
  info = extract_to_store(ew.tiny_retriever(), ew.images(), reference_store, ew.KEY,
                          boxes=ew.boxes(), process_index=0, process_count=1, **ew.SETTINGS)
  assert info.rows == (0, ew.N_IMAGES) and not info.reused
  single = reference_store.open(ew.KEY, ew.N_IMAGES)
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=max(1.0, 150 - (time.monotonic() - start)))[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"

  store = DescriptorStore(shared)
  # One shard per process, each holding exactly its slice of the images.
  sets = store.shard_sets(ew.KEY)
  assert sorted(sets) == [2] and sorted(sets[2]) == [0, 1]
  expected = single.read()
  assert expected.shape[0] == ew.N_IMAGES and np.isfinite(expected).all()
  for i, out in enumerate(outs):
    result = np.load(out)
    assert int(result["process_index"]) == i and int(result["process_count"]) == 2
    lo, hi = process_slice(ew.N_IMAGES, i, 2)
    assert tuple(result["rows"]) == (lo, hi) and not bool(result["reused"])
    assert str(result["path"]) == str(store.shard_path(ew.KEY, i, 2))
    shard = np.load(store.shard_path(ew.KEY, i, 2))
    assert shard.dtype == np.float16 and shard.shape[0] == hi - lo
    np.testing.assert_allclose(shard.astype(np.float32), expected[lo:hi], rtol=0, atol=2e-3)
    # After the barrier every process read the complete set, in input order.
    np.testing.assert_array_equal(result["complete"], store.open(ew.KEY, ew.N_IMAGES).read())
  # The two shards, read as one matrix, are the single-process extraction (float16 storage).
  both = store.open(ew.KEY, ew.N_IMAGES).read()
  np.testing.assert_allclose(both, expected, rtol=0, atol=2e-3)
  # A single-process run now reuses the complete two-process set instead of re-extracting.
  again = extract_to_store(ew.tiny_retriever(), ew.images(), store, ew.KEY, boxes=ew.boxes(),
                           process_index=0, process_count=1, **ew.SETTINGS)
  assert again.reused
