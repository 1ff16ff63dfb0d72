"""PCA whitening and Lw against numpy references written from DESIGN §4.3 / LRML Eqs. 2-3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import whitening

EPS = 1e-6  # DESIGN §4.1: l2n(v) = v / (||v|| + 1e-6)


def _np_l2n(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def _sorted_eig(matrix):
  # np.linalg.eig (general solver), not the module's eigh, so the reference is independent.
  values, vectors = np.linalg.eig(matrix)
  order = np.argsort(values.real)[::-1]
  return values.real[order], vectors.real[:, order]


def _align_rows(P, reference):
  """Flips the rows of P whose sign differs from reference's (eigenvector signs are arbitrary)."""
  signs = np.sign(np.sum(P * reference, axis=1, keepdims=True))
  return P * signs


def _correlated(rng, n, d):
  mixing = rng.normal(size=(d, d)) * np.linspace(3.0, 0.3, d)[:, None]
  return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


@pytest.fixture
def X(rng):
  return _correlated(rng, 300, 6)


def _covariance(X):
  centred = X - X.mean(axis=0)
  return centred.T @ centred / X.shape[0]


# ---------------------------------------------------------------------------- PCA whitening


def test_pca_whitening_matches_reference(X):
  mean, P = whitening.learn_pca_whitening(X)
  values, vectors = _sorted_eig(_covariance(X))
  reference = np.diag(values ** -0.5) @ vectors.T
  assert mean.dtype == P.dtype == np.float64 and P.shape == (6, 6)
  np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(_align_rows(P, reference), reference, rtol=1e-8, atol=1e-10)


def test_pca_whitening_whitens_and_orders_components(X):
  mean, P = whitening.learn_pca_whitening(X)
  C = _covariance(X)
  np.testing.assert_allclose(P @ C @ P.T, np.eye(6), atol=1e-10)
  np.testing.assert_allclose(_covariance((X - mean) @ P.T), np.eye(6), atol=1e-10)
  # Row i of P is component i scaled by lambda_i^-1/2, so the variance along it is decreasing.
  directions = P / np.linalg.norm(P, axis=1, keepdims=True)
  variances = np.diag(directions @ C @ directions.T)
  assert np.all(np.diff(variances) < 0)


def test_pca_whitening_of_fewer_rows_than_dimensions_is_finite_and_usable(rng):
  X = rng.normal(size=(5, 10))  # rank of the centred data: 4
  mean, P = whitening.learn_pca_whitening(X)
  assert np.all(np.isfinite(P))
  # The 4 informative components are whitened exactly; the jittered null directions come last.
  np.testing.assert_allclose((P @ _covariance(X) @ P.T)[:4, :4], np.eye(4), atol=1e-8)
  whitened = np.asarray(whitening.apply_whitening(X, mean, P, dims=4))
  assert np.all(np.isfinite(whitened))
  np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, atol=1e-5)


def test_pca_whitening_of_collinear_rows_finds_their_direction(rng):
  direction = np.array([3.0, -4.0, 0.0])
  X = rng.normal(size=(20, 1)) * direction + 1.0
  _, P = whitening.learn_pca_whitening(X)
  assert np.all(np.isfinite(P))
  np.testing.assert_allclose(np.abs(P[0] / np.linalg.norm(P[0])), np.abs(direction) / 5,
                             atol=1e-8)


def test_pca_whitening_rejects_unusable_data(X):
  with pytest.raises(ValueError, match="at least 2 rows"):
    whitening.learn_pca_whitening(X[:1])
  with pytest.raises(ValueError, match="all rows are identical"):
    whitening.learn_pca_whitening(np.tile(X[:1], (4, 1)))
  with pytest.raises(ValueError, match="X must be a 2-D"):
    whitening.learn_pca_whitening(X[0])
  bad = X.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="X must be finite"):
    whitening.learn_pca_whitening(bad)
  with pytest.raises(ValueError, match="X must be a concrete array"):
    jax.jit(whitening.learn_pca_whitening)(X)


# ---------------------------------------------------------------------------- Lw


@pytest.fixture
def pairs(rng, X):
  """X with rows 30..59 matching rows 0..29 up to anisotropic noise."""
  X = X.copy()
  X[30:60] = X[:30] + rng.normal(size=(30, 6)) * np.array([1.0, 0.1, 0.5, 0.05, 0.2, 0.3])
  return X, np.arange(30), np.arange(30, 60)


def _reference_lw(X, query_idx, positive_idx):
  """LRML Eq. 2 whitening + the reference's rotation over all rows, with plain numpy."""
  m = X[query_idx].mean(axis=0)
  df = X[query_idx] - X[positive_idx]
  S = df.T @ df / len(query_idx)
  P1 = np.linalg.inv(np.linalg.cholesky(S))
  Y = P1 @ (X - m).T
  _, V = _sorted_eig(Y @ Y.T)
  return m, S, V.T @ P1


def test_lw_matches_reference(pairs):
  X, q, p = pairs
  mean, P = whitening.learn_lw(X, q, p)
  ref_mean, _, ref_P = _reference_lw(X, q, p)
  assert mean.dtype == P.dtype == np.float64 and P.shape == (6, 6)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
  np.testing.assert_allclose(_align_rows(P, ref_P), ref_P, rtol=1e-7, atol=1e-9)


def test_lw_whitens_matching_pairs_and_rotates_by_decreasing_variance(pairs):
  X, q, p = pairs
  mean, P = whitening.learn_lw(X, q, p)
  _, S, _ = _reference_lw(X, q, p)
  np.testing.assert_allclose(P @ S @ P.T, np.eye(6), atol=1e-9)
  scatter = P @ (X - mean).T @ (X - mean) @ P.T
  off_diagonal = scatter - np.diag(np.diag(scatter))
  np.testing.assert_allclose(off_diagonal, 0.0, atol=1e-8 * np.abs(scatter).max())
  assert np.all(np.diff(np.diag(scatter)) < 0)


def test_lw_mean_counts_repeated_queries(pairs):
  X, _, _ = pairs
  q = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
  mean, _ = whitening.learn_lw(X, q, q + 30)
  np.testing.assert_allclose(mean, X[q].mean(axis=0), rtol=1e-12)


def test_lw_jitters_a_rank_deficient_pair_covariance(rng):
  X = rng.normal(size=(12, 8))
  q, p = np.arange(3), np.arange(3, 6)  # S has rank 3 < D = 8
  _, P = whitening.learn_lw(X, q, p)
  assert np.all(np.isfinite(P))
  df = X[q] - X[p]
  S = df.T @ df / 3
  # With jitter a, P S P^T has eigenvalues s / (s + a): ~1 on the pair span, ~0 elsewhere
  # (up to S's rounding, amplified by the a^-1/2 ~ 1e5 scale of the null directions).
  eigenvalues = np.sort(np.linalg.eigvalsh(P @ S @ P.T))[::-1]
  np.testing.assert_allclose(eigenvalues[:3], 1.0, atol=1e-6)
  np.testing.assert_allclose(eigenvalues[3:], 0.0, atol=1e-4)


def test_lw_accepts_all_pairs_identical(rng):
  X = rng.normal(size=(10, 4))
  q = np.arange(5)
  mean, P = whitening.learn_lw(X, q, q)  # S == 0: only the jitter whitens
  assert np.all(np.isfinite(P))
  np.testing.assert_allclose(mean, X[:5].mean(axis=0))


@pytest.mark.parametrize("query_idx, positive_idx, match", [
    ([0, 1, 300], [2, 3, 4], r"query_idx must index rows of X, in \[0, 299\]"),
    ([0, 1, 2], [2, -1, 4], r"positive_idx must index rows of X"),
    ([0, 1, 2], [3, 4], "same length"),
    ([], [], "at least one pair"),
    ([0.0, 1.0], [2, 3], "query_idx must hold integer"),
    ([[0, 1]], [[2, 3]], "query_idx must be a 1-D"),
])
def test_lw_rejects_bad_indices(pairs, query_idx, positive_idx, match):
  X, _, _ = pairs
  with pytest.raises(ValueError, match=match):
    whitening.learn_lw(X, np.array(query_idx), np.array(positive_idx))


def test_lw_rejects_non_finite_descriptors(pairs):
  X, q, p = pairs
  X[40, 0] = np.nan
  with pytest.raises(ValueError, match="X must be finite"):
    whitening.learn_lw(X, q, p)


# ---------------------------------------------------------------------------- apply


def test_apply_whitening_reduces_dims_and_normalises(X):
  mean, P = whitening.learn_pca_whitening(X)
  X32 = X.astype(np.float32)
  got = whitening.apply_whitening(X32, mean, P, dims=3)
  assert got.shape == (300, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_l2n((X - mean) @ P[:3].T), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert whitening.apply_whitening(X32, mean, P).shape == (300, 6)


def test_apply_whitening_runs_under_jit(X):
  mean, P = whitening.learn_pca_whitening(X)
  X32 = X.astype(np.float32)
  jitted = jax.jit(whitening.apply_whitening, static_argnames="dims")
  np.testing.assert_allclose(jitted(X32, mean, P, dims=2),
                             whitening.apply_whitening(X32, mean, P, dims=2), rtol=1e-6)


def test_apply_whitening_rejects_bad_arguments(X):
  mean, P = whitening.learn_pca_whitening(X)
  for dims in (0, 7, 2.5, True):
    with pytest.raises(ValueError, match=r"dims must be None or an int in \[1, 6\]"):
      whitening.apply_whitening(X, mean, P, dims=dims)
  with pytest.raises(ValueError, match="mean must be"):
    whitening.apply_whitening(X, mean[:5], P)
  with pytest.raises(ValueError, match="P must be a 2-D"):
    whitening.apply_whitening(X, mean, P[0])
  bad = X.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="X must be finite"):
    whitening.apply_whitening(bad, mean, P)
