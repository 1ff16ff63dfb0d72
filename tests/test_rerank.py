"""Query expansion and DBA against brute-force numpy references (full argsort, explicit weights)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from retrieval_jax import rerank

EPS = 1e-6  # DESIGN §4.1: l2n(v) = v / (||v|| + 1e-6)


def _np_l2n(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def _reference_expansion(queries, database, k, alpha, include_query):
  queries, database = queries.astype(np.float64), database.astype(np.float64)
  similarities = queries @ database.T
  neighbours = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  out = queries.copy() if include_query else np.zeros_like(queries)
  for row, indices in enumerate(neighbours):
    for i in indices:
      weight = 1.0 if alpha == 0 else max(similarities[row, i], 0.0) ** alpha
      out[row] += weight * database[i]
  return _np_l2n(out)


@pytest.fixture
def data(rng):
  # Clustered unit rows, so neighbours have large positive similarities, and some negative ones.
  centres = rng.normal(size=(4, 6))
  database = _np_l2n(centres[rng.integers(0, 4, 41)] + 0.4 * rng.normal(size=(41, 6)))
  queries = _np_l2n(centres[[0, 1, 2, 3, 0]] + 0.4 * rng.normal(size=(5, 6)))
  return queries.astype(np.float32), database.astype(np.float32)


@pytest.mark.parametrize("k, alpha, chunk_size, query_chunk_size", [
    (1, 3.0, 65536, 256),
    (5, 3.0, 7, 2),
    (10, 1.0, 41, 1),
    (41, 5.0, 8, 3),
    (10, 0.0, 16, 4),
])
def test_alpha_query_expansion_matches_reference(data, k, alpha, chunk_size, query_chunk_size):
  queries, database = data
  got = rerank.alpha_query_expansion(queries, database, k, alpha, chunk_size=chunk_size,
                                     query_chunk_size=query_chunk_size)
  assert got.shape == queries.shape
  np.testing.assert_allclose(got, _reference_expansion(queries, database, k, alpha, True),
                             atol=2e-6)


def test_average_query_expansion_is_alpha_zero(data):
  queries, database = data
  np.testing.assert_allclose(rerank.average_query_expansion(queries, database, 7),
                             _reference_expansion(queries, database, 7, 0.0, True), atol=2e-6)


def test_average_query_expansion_hand_made_example():
  query = np.array([[1.0, 0.0]], np.float32)
  database = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], np.float32)
  # Top-2 are [1, 0] (s = 1) and [0, 1] (s = 0): AQE gives both weight 1, so q' ~ [2, 1].
  np.testing.assert_allclose(rerank.average_query_expansion(query, database, 2),
                             [[2 / np.sqrt(5), 1 / np.sqrt(5)]], atol=1e-6)
  # All three, the opposite row included, with weight 1: q' ~ [1, 1].
  np.testing.assert_allclose(rerank.average_query_expansion(query, database, 3),
                             [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)
  # alpha > 0 weighs s = 0 and s = -1 by 0: only the s = 1 neighbour is added.
  np.testing.assert_allclose(rerank.alpha_query_expansion(query, database, 3, alpha=3.0),
                             [[1.0, 0.0]], atol=1e-6)


def test_large_alpha_keeps_only_the_top_neighbour(rng):
  query = np.array([[1.0, 0.0, 0.0]])
  top = np.array([0.99, np.sqrt(1 - 0.99 ** 2), 0.0])
  second = np.array([0.8, 0.0, 0.6])
  database = np.concatenate([[second, top], _np_l2n(rng.normal(size=(6, 3)) - [3, 0, 0])])
  alpha = 100.0
  got = rerank.alpha_query_expansion(query.astype(np.float32), database.astype(np.float32), 5,
                                     alpha)
  # 0.8^100 ~ 2e-10: the second neighbour's weight vanishes next to 0.99^100 ~ 0.37.
  np.testing.assert_allclose(got, _np_l2n(query + 0.99 ** alpha * top), atol=1e-5)


@pytest.mark.parametrize("k, alpha, query_chunk_size", [(3, 3.0, 5), (6, 0.0, 256), (1, 3.0, 8)])
def test_database_side_augmentation_matches_reference(data, k, alpha, query_chunk_size):
  _, database = data
  got = rerank.database_side_augmentation(database, k, alpha, chunk_size=9,
                                          query_chunk_size=query_chunk_size)
  assert got.shape == database.shape
  np.testing.assert_allclose(got, _reference_expansion(database, database, k, alpha, False),
                             atol=2e-6)
  if k == 1:  # every row is its own nearest neighbour
    np.testing.assert_allclose(got, database, atol=1e-5)


def test_expansion_runs_under_jit(data):
  queries, database = data
  jitted = jax.jit(lambda q, d: rerank.alpha_query_expansion(q, d, 4, 2.0, chunk_size=16))
  np.testing.assert_allclose(jitted(queries, database),
                             _reference_expansion(queries, database, 4, 2.0, True), atol=2e-6)


def test_rerank_rejects_bad_inputs(data):
  queries, database = data
  for k in (0, 42, 2.5):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 41\]"):
      rerank.alpha_query_expansion(queries, database, k)
  for alpha in (-1.0, np.nan, True):
    with pytest.raises(ValueError, match="alpha must be a finite Python number >= 0"):
      rerank.alpha_query_expansion(queries, database, 3, alpha)
  with pytest.raises(ValueError, match="same descriptor dimension"):
    rerank.average_query_expansion(queries[:, :5], database)
  with pytest.raises(ValueError, match="queries must be a 2-D"):
    rerank.average_query_expansion(queries[0], database)
  with pytest.raises(ValueError, match="query_chunk_size must be an int"):
    rerank.database_side_augmentation(database, query_chunk_size=0)
  bad = queries.copy()
  bad[2, 3] = np.nan
  with pytest.raises(ValueError, match="queries must be finite"):
    rerank.alpha_query_expansion(bad, database, 3)
  bad = database.copy()
  bad[7, 0] = np.inf
  with pytest.raises(ValueError, match="database must be finite"):
    rerank.database_side_augmentation(bad, 3)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 41\]"):
    rerank.database_side_augmentation(database, k=42)
