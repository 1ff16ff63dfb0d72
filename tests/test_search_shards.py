"""Sharded indexes (search/shards.py): equal to one index in brute-force mode."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_jax.search import (ExactIndex, ShardedIndex, merge_across_processes,
                                  merge_results, shard_bounds, synthetic)


@pytest.fixture(scope="module")
def data():
  return synthetic.clustered_descriptors(5_001, 32, 40, seed=12)


def test_shard_bounds_cover_all_rows():
  assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
  with pytest.raises(ValueError, match="num_shards must be at most"):
    shard_bounds(2, 3)


def test_merge_results_keeps_ties_in_shard_order():
  scores, ids = merge_results([(np.array([[2.0, 1.0]]), np.array([[0, 1]])),
                               (np.array([[2.0, 1.5]]), np.array([[9, 8]]))], 3)
  np.testing.assert_array_equal(ids, [[0, 9, 8]])
  np.testing.assert_array_equal(scores, [[2.0, 2.0, 1.5]])


def test_exact_shards_equal_one_exact_index(tmp_path, data):
  database, queries, _, _ = data
  ids = np.arange(len(database)) + 1000
  single = ExactIndex.build(database, ids=ids)
  sharded = ShardedIndex.build(database, tmp_path / "idx", num_shards=3, index="exact", ids=ids,
                               workers=1)
  assert sharded.num_rows == len(database) and len(sharded.shards) == 3
  expected = single.search(queries, 10)
  got = sharded.search(queries, 10)
  np.testing.assert_array_equal(got[1], expected[1])
  np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
  # One shard per host: load a subset, search it, merge (a single process: identity).
  part = ShardedIndex.load(tmp_path / "idx", shard_indices=[1])
  assert part.num_shards == 3 and part.num_rows == 1667
  merged = merge_across_processes(*part.search(queries, 10), 10)
  np.testing.assert_array_equal(merged[1], part.search(queries, 10)[1])


def test_scann_brute_force_shards_built_in_two_processes_equal_one_index(tmp_path, data):
  pytest.importorskip("scann")
  from retrieval_jax.search import ScannIndex
  database, queries, _, _ = data
  single = ScannIndex.build(database, mode="brute_force", model_id="m")
  sharded = ShardedIndex.build(database, tmp_path / "idx", num_shards=2, workers=2,
                               mode="brute_force", model_id="m")
  expected = single.search(queries, 20)
  got = sharded.search(queries, 20)
  np.testing.assert_array_equal(got[1], expected[1])
  np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
  reloaded = ShardedIndex.load(tmp_path / "idx", model_id="m")
  np.testing.assert_array_equal(reloaded.search(queries, 20)[1], expected[1])
  # A shard modified after saving is refused, naming the file.
  manifest = tmp_path / "idx" / "shard-00001" / "manifest.json"
  manifest.write_text(manifest.read_text().replace('"model_id": "m"', '"model_id": "x"'))
  with pytest.raises(ValueError, match="shard-00001/manifest.json does not match its sha256"):
    ShardedIndex.load(tmp_path / "idx")


def test_per_host_build_of_one_shard(tmp_path, data):
  database, queries, _, _ = data
  start, stop = shard_bounds(len(database), 2)[1]
  part = ShardedIndex.build(database[start:stop], tmp_path / "idx", num_shards=2, index="exact",
                            shard_indices=[1], rows_are_shard=True,
                            ids=np.arange(start, stop), workers=1)
  assert not (tmp_path / "idx" / "manifest.json").exists()
  assert part.shard_indices == [1]
  scores, ids = part.search(queries, 5)
  full = ExactIndex.build(database[start:stop], ids=np.arange(start, stop)).search(queries, 5)
  np.testing.assert_array_equal(ids, full[1])
  with pytest.raises(ValueError, match="shard_indices must be distinct"):
    ShardedIndex.build(database, tmp_path / "x", num_shards=2, shard_indices=[2])
