"""Exact search (search/exact.py) against numpy brute force."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.search import ExactIndex, exact_search, merge_top_k, synthetic


def _numpy_top_k(queries, database, k):
  scores = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("chunk_size,k", [(None, 10), (4096, 10), (1000, 7), (3, 5), (4096, 300)])
def test_exact_search_equals_argsort(chunk_size, k):
  database, queries, _, _ = synthetic.clustered_descriptors(10_000, 32, 50, seed=1)
  scores, indices = exact_search(queries, jnp.asarray(database), k, chunk_size=chunk_size)
  expected_scores, expected = _numpy_top_k(queries, database, k)
  indices = np.asarray(indices)
  np.testing.assert_allclose(np.asarray(scores), expected_scores, atol=1e-5)
  if k <= 10:
    np.testing.assert_array_equal(indices, expected)
  else:
    # Deep in the list float32 and float64 reorder near-ties (gaps below 1e-6): require the
    # true scores of the returned rows to be the best k, and no row twice.
    true_scores = np.take_along_axis(np.asarray(queries, np.float64) @ database.T.astype(
        np.float64), indices, 1)
    np.testing.assert_allclose(true_scores, expected_scores, atol=1e-5)
    assert all(len(set(row)) == k for row in indices)
    assert (indices == expected).mean() > 0.95


def test_grouped_selection_breaks_ties_by_lower_index(rng):
  # 4096-row chunks with k = 8 take the two-stage path; every row appears three times.
  base = synthetic.clustered_descriptors(3000, 16, 1, seed=6)[0]
  database = np.concatenate([base, base, base])
  _, indices = exact_search(base[:20], jnp.asarray(database), 8, chunk_size=4096)
  _, expected = _numpy_top_k(base[:20], database, 8)
  np.testing.assert_array_equal(np.asarray(indices), expected)


def test_query_batches_under_score_budget():
  database, queries, _, _ = synthetic.clustered_descriptors(5_000, 16, 300, seed=2)
  # A 64 KiB budget forces batches of a few queries and small chunks.
  _, indices = exact_search(queries, jnp.asarray(database), 5, max_score_bytes=65536)
  np.testing.assert_array_equal(np.asarray(indices), _numpy_top_k(queries, database, 5)[1])


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_reduced_precision_storage_on_device(dtype):
  database, queries, _, _ = synthetic.clustered_descriptors(4_000, 64, 20, seed=3)
  stored = jnp.asarray(database).astype(dtype)
  scores, indices = exact_search(queries, stored, 10, chunk_size=1024)
  assert scores.dtype == jnp.float32
  expected_scores, expected = _numpy_top_k(queries, np.asarray(stored.astype(jnp.float32)), 10)
  np.testing.assert_allclose(np.asarray(scores), expected_scores, atol=1e-5)
  assert (np.asarray(indices) == expected).mean() > 0.99  # float32 vs float64 near-ties


def test_host_memmap_streamed_in_blocks(tmp_path):
  database, queries, _, _ = synthetic.clustered_descriptors(12_345, 32, 40, seed=4)
  path = tmp_path / "db.npy"
  stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=database.shape)
  stored[:] = database
  stored.flush()
  memmap = np.load(path, mmap_mode="r")
  scores, indices = exact_search(queries, memmap, 20, host_block_rows=3000, chunk_size=1024)
  expected_scores, expected = _numpy_top_k(queries, memmap.astype(np.float32), 20)
  np.testing.assert_allclose(np.asarray(scores), expected_scores, atol=1e-5)
  assert (np.asarray(indices) == expected).mean() > 0.99
  # The same database resident on the device gives the same answer.
  _, device_indices = exact_search(queries, jnp.asarray(memmap), 20, chunk_size=1024)
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(device_indices))


def test_host_block_with_nan_is_refused_naming_the_row(rng):
  database = rng.standard_normal((500, 8)).astype(np.float32)
  database[321, 5] = np.nan
  with pytest.raises(ValueError, match="row 321 column 5"):
    exact_search(database[:2], database, 3, host_block_rows=100)


def test_bad_arguments_are_refused(rng):
  database = rng.standard_normal((50, 8)).astype(np.float32)
  with pytest.raises(ValueError, match="k must be an int in"):
    exact_search(database[:2], database, 51)
  with pytest.raises(ValueError, match="same descriptor dimension"):
    exact_search(database[:2, :4], database, 3)
  with pytest.raises(ValueError, match="max_score_bytes"):
    exact_search(database[:2], database, 3, max_score_bytes=0)


def test_merge_top_k_gives_ties_to_the_first_list():
  a = (jnp.array([[3.0, 1.0]]), jnp.array([[0, 1]]))
  b = (jnp.array([[3.0, 2.0]]), jnp.array([[5, 6]]))
  scores, ids = merge_top_k(*a, *b, 3)
  np.testing.assert_array_equal(np.asarray(ids), [[0, 5, 6]])
  np.testing.assert_array_equal(np.asarray(scores), [[3.0, 3.0, 2.0]])


def test_exact_index_round_trip_and_refusals(tmp_path):
  database, queries, _, _ = synthetic.clustered_descriptors(3_000, 16, 10, seed=5)
  ids = np.arange(3_000) * 7 + 11
  paths = [f"img/{i}.jpg" for i in range(3_000)]
  index = ExactIndex.build(database, ids=ids, metadata=paths, model_id="gem-r101")
  scores, found = index.search(queries, 10)
  np.testing.assert_array_equal(found, ids[_numpy_top_k(queries, database, 10)[1]])
  index.save(tmp_path / "idx")
  loaded = ExactIndex.load(tmp_path / "idx", model_id="gem-r101", dim=16)
  np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], scores)
  assert loaded.metadata == paths
  mapped = ExactIndex.load(tmp_path / "idx", mmap=True)
  np.testing.assert_array_equal(mapped.search(queries, 10)[1], found)
  with pytest.raises(ValueError, match="built for descriptor model 'gem-r101'"):
    ExactIndex.load(tmp_path / "idx", model_id="other")
  with pytest.raises(ValueError, match="expected dim 32"):
    ExactIndex.load(tmp_path / "idx", dim=32)
  with open(tmp_path / "idx" / "descriptors.npy", "r+b") as f:
    f.seek(-4, 2)
    f.write(b"\x00\x00\x80\x7f")
  with pytest.raises(ValueError, match="descriptors.npy does not match its sha256"):
    ExactIndex.load(tmp_path / "idx")
