"""Distances and exact top-k against float64 numpy references written from the definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import distances

EPS = 1e-6  # DESIGN §4.1: l2n(v) = v / (||v|| + 1e-6)


def _np_l2n(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def _np_pairwise_sq(a, b):
  # Broadcast differences: independent of the ||a||^2 + ||b||^2 - 2ab expansion under test.
  diff = a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None, :, :]
  return np.sum(diff * diff, axis=-1)


@pytest.fixture
def ab(rng):
  a = rng.normal(size=(7, 5)).astype(np.float32)
  b = rng.normal(size=(9, 5)).astype(np.float32)
  return a, b


def test_pairwise_squared_euclidean_matches_reference(ab):
  a, b = ab
  got = distances.pairwise_squared_euclidean(a, b)
  assert got.shape == (7, 9)
  np.testing.assert_allclose(got, _np_pairwise_sq(a, b), rtol=1e-5, atol=1e-5)


def test_pairwise_euclidean_matches_reference(ab):
  a, b = ab
  np.testing.assert_allclose(distances.pairwise_euclidean(a, b),
                             np.sqrt(_np_pairwise_sq(a, b)), rtol=1e-5, atol=1e-5)


def test_self_distances_have_an_exact_zero_diagonal_and_are_never_negative(rng):
  x = (rng.normal(size=(6, 4)) * 100).astype(np.float32)
  for got in (distances.pairwise_squared_euclidean(x), distances.pairwise_squared_euclidean(x, x),
              distances.pairwise_euclidean(x, x)):
    np.testing.assert_array_equal(np.diag(got), 0.0)
  # Another array with the same values: no exact diagonal, but the clamp keeps it >= 0.
  assert np.all(np.asarray(distances.pairwise_squared_euclidean(x, x.copy())) >= 0)


def test_cosine_similarity_and_distance_match_reference(ab):
  a, b = ab
  expected = _np_l2n(a.astype(np.float64)) @ _np_l2n(b.astype(np.float64)).T
  np.testing.assert_allclose(distances.pairwise_cosine_similarity(a, b), expected, atol=1e-6)
  np.testing.assert_allclose(distances.pairwise_cosine_distance(a, b), 1 - expected, atol=1e-6)


def test_cosine_similarity_of_a_zero_row_is_zero(ab):
  a, b = ab
  a[2] = 0
  np.testing.assert_array_equal(distances.pairwise_cosine_similarity(a, b)[2], 0.0)


def test_paired_functions_match_reference(rng):
  a = rng.normal(size=(8, 5))
  b = rng.normal(size=(8, 5))
  b[3] = a[3]
  sq = np.sum((a - b) ** 2, axis=1)
  np.testing.assert_allclose(distances.paired_squared_euclidean(a, b), sq, rtol=1e-5)
  np.testing.assert_allclose(distances.paired_euclidean(a, b), np.sqrt(sq), rtol=1e-5)
  assert float(distances.paired_euclidean(a, b)[3]) == 0.0
  np.testing.assert_allclose(distances.paired_cosine_similarity(a, b),
                             np.sum(_np_l2n(a) * _np_l2n(b), axis=1), atol=1e-6)


def _closed_form_grad(a, b):
  """d/da_i sum_j ||a_i - b_j|| = sum_j (a_i - b_j)/||a_i - b_j||, 0 for coinciding rows."""
  diff = a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None, :, :]
  norm = np.linalg.norm(diff, axis=-1, keepdims=True)
  return np.sum(np.where(norm > 0, diff / np.where(norm > 0, norm, 1), 0), axis=1)


def test_pairwise_euclidean_gradient_matches_closed_form(ab):
  a, b = ab
  grad_a, grad_b = jax.jit(jax.grad(lambda a, b: distances.pairwise_euclidean(a, b).sum(),
                                    argnums=(0, 1)))(a, b)
  np.testing.assert_allclose(grad_a, _closed_form_grad(a, b), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_b, _closed_form_grad(b, a), rtol=1e-4, atol=1e-4)


def test_pairwise_euclidean_gradient_is_finite_against_itself(rng):
  x = rng.normal(size=(6, 4)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x: distances.pairwise_euclidean(x, x).sum()))(x)
  assert np.all(np.isfinite(grad))
  # x appears as both arguments, so each pair (i, j) contributes twice.
  np.testing.assert_allclose(grad, 2 * _closed_form_grad(x, x), rtol=1e-4, atol=1e-4)


def test_pairwise_euclidean_gradient_is_zero_for_coinciding_rows():
  # Small integers make the expansion exact, so coinciding rows give a distance of exactly 0
  # even though a and b are different arrays (no exact-diagonal shortcut).
  a = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]], np.float32)
  b = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], np.float32)
  assert float(distances.pairwise_euclidean(a, b)[0, 0]) == 0.0
  grad_a = jax.jit(jax.grad(lambda a: distances.pairwise_euclidean(a, b).sum()))(a)
  assert np.all(np.isfinite(grad_a))
  np.testing.assert_allclose(grad_a, _closed_form_grad(a, b), rtol=1e-6, atol=1e-6)


def test_paired_euclidean_gradient(rng):
  a = rng.normal(size=(5, 3)).astype(np.float32)
  b = rng.normal(size=(5, 3)).astype(np.float32)
  b[1] = a[1]
  grad = jax.jit(jax.grad(lambda a: distances.paired_euclidean(a, b).sum()))(a)
  diff = a - b
  norm = np.linalg.norm(diff, axis=1, keepdims=True)
  expected = np.where(norm > 0, diff / np.where(norm > 0, norm, 1), 0)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad[1], 0.0)


def test_distances_work_under_jit(ab):
  a, b = ab
  np.testing.assert_allclose(jax.jit(distances.pairwise_euclidean)(a, b),
                             distances.pairwise_euclidean(a, b), rtol=1e-6)


@pytest.mark.parametrize("fn", [distances.pairwise_euclidean, distances.pairwise_cosine_similarity,
                                distances.paired_euclidean])
def test_distances_reject_bad_inputs(fn, ab):
  a, b = ab
  with pytest.raises(ValueError, match="same descriptor dimension"):
    fn(a, b[:, :4])
  with pytest.raises(ValueError, match="a must be a 2-D"):
    fn(a[0], b)
  bad = a.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="a must be finite"):
    fn(bad, a)


def test_paired_distances_need_equal_row_counts(ab):
  a, b = ab
  with pytest.raises(ValueError, match="same number of rows"):
    distances.paired_squared_euclidean(a, b)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 100, 65536])
@pytest.mark.parametrize("k", [1, 4, 37])
def test_top_k_similar_matches_argsort(rng, chunk_size, k):
  queries = rng.normal(size=(6, 5)).astype(np.float32)
  database = rng.normal(size=(37, 5)).astype(np.float32)
  scores, indices = distances.top_k_similar(queries, database, k, chunk_size=chunk_size)
  reference = queries.astype(np.float64) @ database.astype(np.float64).T
  order = np.argsort(-reference, axis=1)[:, :k]
  assert indices.dtype == jnp.int32 and indices.shape == scores.shape == (6, k)
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_allclose(scores, np.take_along_axis(reference, order, axis=1), atol=1e-5)


def test_top_k_similar_breaks_ties_by_lower_index():
  database = np.array([[1.0, 0], [0, 1], [1, 0], [0, 1], [1, 0]], np.float32)
  _, indices = distances.top_k_similar(database[:2], database, 4, chunk_size=2)
  np.testing.assert_array_equal(indices, [[0, 2, 4, 1], [1, 3, 0, 2]])


def test_top_k_similar_runs_under_jit(rng):
  queries = rng.normal(size=(3, 4)).astype(np.float32)
  database = rng.normal(size=(11, 4)).astype(np.float32)
  jitted = jax.jit(lambda q, d: distances.top_k_similar(q, d, 3, chunk_size=4))
  scores, indices = jitted(queries, database)
  expected_scores, expected_indices = distances.top_k_similar(queries, database, 3)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def test_top_k_similar_rejects_bad_arguments(rng):
  queries = rng.normal(size=(3, 4))
  database = rng.normal(size=(5, 4))
  for k in (0, 6, 2.0, True):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
      distances.top_k_similar(queries, database, k)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    distances.top_k_similar(queries, database, 2, chunk_size=0)
  with pytest.raises(ValueError, match="same descriptor dimension"):
    distances.top_k_similar(queries[:, :3], database, 2)
  with pytest.raises(ValueError, match="queries must be a 2-D"):
    distances.top_k_similar(queries[0], database, 2)
  database[4, 0] = np.inf
  with pytest.raises(ValueError, match="database must be finite"):
    distances.top_k_similar(queries, database, 2)
