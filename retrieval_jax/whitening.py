"""Descriptor whitening: PCA whitening, learned discriminative whitening (Lw), and applying them.

Learning runs once, on the host, in numpy float64 (it needs ``eigh`` and ``cholesky`` of
``[D, D]`` matrices and benefits from the precision); the learned ``mean [D]`` and projection
``P [D, D]`` come back as float64 numpy arrays. Applying a projection is jax and jit-able.
Descriptors are rows, so ``P`` acts as ``P (x - mean)`` on a column ``x``, i.e.
``(X - mean) @ P.T`` on the matrix; the rows of ``P`` are the output components in decreasing
order of importance, so keeping the first ``dims`` rows reduces the dimension (DESIGN §4.3).

Eigenvector signs are arbitrary (LAPACK may flip them between platforms): compare projections up
to the sign of each row. Flipping a row of ``P`` flips one coordinate of every whitened
descriptor alike, so similarities between whitened descriptors do not change.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import check_finite, check_ndim, is_concrete
from retrieval_jax.normalization import l2n

# Jitter ladder shared by both learners (Radenovic et al.'s reference ``cholesky``): try a = 0,
# then 1e-10, multiplying by 10 on each failure.
_FIRST_JITTER = 1e-10
_JITTER_FACTOR = 10.0


def _host_descriptors(X) -> np.ndarray:
  """Validates the training descriptors and returns them as a float64 host array."""
  if not is_concrete(X):
    raise ValueError(
        "X must be a concrete array: whitening is learned on the host, outside jax.jit.")
  check_ndim("X", X, 2, "[N, D]")
  check_finite("X", X)
  return np.asarray(X, dtype=np.float64)


def _noise_floor(matrix: np.ndarray) -> float:
  """Level below which an eigenvalue or pivot of a symmetric PSD ``matrix`` is rounding noise.

  Same scale as ``np.linalg.matrix_rank``'s tolerance: ``D * eps64 * largest diagonal entry``
  (the largest diagonal entry bounds the largest eigenvalue within a factor ``D``).
  """
  return matrix.shape[0] * np.finfo(np.float64).eps * float(np.max(np.diag(matrix)))


def _jitters():
  """Yields the jitter ladder 0, 1e-10, 1e-9, ... without end; callers decide when to stop."""
  yield 0.0
  jitter = _FIRST_JITTER
  while True:
    yield jitter
    jitter *= _JITTER_FACTOR


def _eigh_decreasing(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigenvalues (decreasing) and eigenvectors (matching columns) of a symmetric matrix."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  order = np.argsort(values)[::-1]
  return values[order], vectors[:, order]


def learn_pca_whitening(X) -> tuple[np.ndarray, np.ndarray]:
  """Learns PCA whitening from descriptors (Radenovic et al.; DESIGN §4.3).

  ``mean`` is the mean of all rows; ``C = (X - mean)^T (X - mean) / N`` (divided by ``N``, not
  ``N - 1``) and symmetrised as ``(C + C^T) / 2``; ``C = V diag(lambda) V^T`` with eigenvalues in
  decreasing order; ``P = diag((lambda + a)^-1/2) V^T``, so ``P C P^T = I`` when ``a = 0``.

  A singular covariance (``N <= D``, or collinear descriptors) has zero eigenvalues, which
  ``eigh`` returns as rounding noise of either sign. The jitter ``a`` is then added to every
  eigenvalue (the same as whitening ``C + a I``): ``a = 0`` when all eigenvalues exceed the
  noise floor ``D * eps64 * max(diag C)``, otherwise the first of 1e-10, 1e-9, ... (x10) that
  lifts the smallest one above it. The null directions then get the large but finite scale
  ``a^-1/2`` and sort last, where ``dims`` reduction drops them.

  Args:
    X: float ``[N, D]`` training descriptors, ``N >= 2``, concrete and finite.

  Returns:
    ``(mean, P)``: float64 numpy ``[D]`` and ``[D, D]``; row ``i`` of ``P`` is the ``i``-th
    principal direction scaled by ``(lambda_i + a)^-1/2``.

  Raises:
    ValueError: ``X`` is not 2-D, has fewer than 2 rows or non-finite values, or all its rows
      are identical (zero covariance: nothing to whiten).

  References:
    Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
    TPAMI 2018 (cirtorch ``pcawhitenlearn``).
  """
  X = _host_descriptors(X)
  if X.shape[0] < 2:
    raise ValueError(f"X must have at least 2 rows to estimate a covariance; got {X.shape}.")
  if np.all(X == X[0]):
    raise ValueError("X has zero covariance (all rows are identical); it cannot be whitened.")
  mean = X.mean(axis=0)
  centred = X - mean
  covariance = centred.T @ centred / X.shape[0]
  eigenvalues, eigenvectors = _eigh_decreasing(covariance)
  floor = _noise_floor(covariance)
  # Terminates: the ladder grows without bound and every quantity here is finite.
  jitter = next(a for a in _jitters() if eigenvalues[-1] + a > floor)
  P = (eigenvalues + jitter)[:, None] ** -0.5 * eigenvectors.T
  return mean, P


def _check_pair_indices(name: str, idx, n_rows: int) -> np.ndarray:
  check_ndim(name, idx, 1, "[n_pairs]")
  idx = np.asarray(idx)
  if idx.size and not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{name} must hold integer row indices; got dtype {idx.dtype}.")
  if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
    raise ValueError(
        f"{name} must index rows of X, in [0, {n_rows - 1}]; got values in "
        f"[{idx.min()}, {idx.max()}].")
  return idx.astype(np.int64)


def _whitening_cholesky(S: np.ndarray) -> np.ndarray:
  """Lower Cholesky factor of ``S + a I`` for the first jitter ``a`` that makes it usable.

  The reference retries only when ``np.linalg.cholesky`` raises; a rank-deficient ``S`` can
  instead factor "successfully" with pivots made of rounding noise, whose inverses are
  arbitrary huge numbers. A factor whose smallest squared pivot is below the noise floor
  therefore counts as a failure too. For a well-conditioned ``S`` both rules agree (``a = 0``).
  """
  floor = _noise_floor(S)
  # A jitter far above S's own scale would whiten the jitter, not S: give up there.
  limit = 1e2 * max(float(np.max(np.diag(S))), _FIRST_JITTER)
  for jitter in itertools.takewhile(lambda a: a <= limit, _jitters()):
    try:
      L = np.linalg.cholesky(S + jitter * np.eye(S.shape[0]))
    except np.linalg.LinAlgError:
      continue
    if np.min(np.diag(L)) ** 2 > floor:
      return L
  raise ValueError(
      "The matching-pair covariance S of X could not be made positive definite with jitter "
      f"up to {limit:.3g} (1e2 * max(diag S)).")


def learn_lw(X, query_idx, positive_idx) -> tuple[np.ndarray, np.ndarray]:
  """Learns discriminative whitening (Lw) from matching pairs (Radenovic et al.; DESIGN §4.3).

  With ``n`` pairs ``(q_j, p_j)`` of rows of ``X``:

  1. ``mean`` = mean of the query rows ``X[query_idx]`` (a row used by several pairs counts
     each time).
  2. Whitening: ``S = sum_j (x_qj - x_pj)(x_qj - x_pj)^T / n`` (LRML Eq. 2, ``C_S``, divided by
     the number of pairs); ``P1 = inv(chol(S + a I))`` with ``a = 0``, then 1e-10, x10 on each
     failure (see below), so ``P1 (S + a I) P1^T = I``.
  3. Rotation: ``Y = P1 (x - mean)`` for ALL rows of ``X``; ``Y Y^T = V diag(mu) V^T`` with
     ``mu`` decreasing; ``P = V^T P1``.

  LRML's Eq. 3 states the rotation as the PCA of the whitened non-matching-pair covariance
  ``C_D``; like the reference implementation (cirtorch ``whitenlearn``) this uses the scatter of
  all rows around the query mean instead, which needs no negative pairs.

  Beyond the reference, a Cholesky factor whose smallest squared pivot is below the noise floor
  ``D * eps64 * max(diag S)`` also counts as a failure, so a rank-deficient ``S`` (fewer pairs
  than dimensions, or all pairs identical so ``S = 0``) always takes the jitter path instead of
  inverting rounding noise. Then ``P S P^T`` has eigenvalues ``s / (s + a)``: 1 on the span of
  the pair differences and 0 on their null space.

  Args:
    X: float ``[N, D]`` descriptors, concrete and finite.
    query_idx: int ``[n_pairs]`` rows of ``X`` used as queries, ``n_pairs >= 1``.
    positive_idx: int ``[n_pairs]`` rows of ``X`` matching ``query_idx`` pairwise (a pair with
      ``q == p`` is allowed).

  Returns:
    ``(mean, P)``: float64 numpy ``[D]`` and ``[D, D]``, rows of ``P`` in decreasing order of
    the whitened variance ``mu``; ``P S P^T = I`` for a positive-definite ``S``.

  Raises:
    ValueError: ``X`` is not 2-D or not finite; the index arrays are not 1-D integer arrays of
      the same nonzero length with values in ``[0, N)``; or no jitter up to ``1e2 * max(diag S)``
      makes ``S`` positive definite.

  References:
    Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
    TPAMI 2018, Sec. 3.4 (Lw); LRML (Fan et al.) Eqs. 2-3.
  """
  X = _host_descriptors(X)
  query_idx = _check_pair_indices("query_idx", query_idx, X.shape[0])
  positive_idx = _check_pair_indices("positive_idx", positive_idx, X.shape[0])
  if query_idx.shape != positive_idx.shape:
    raise ValueError(
        f"query_idx and positive_idx must have the same length (one entry per pair); got "
        f"{query_idx.shape[0]} and {positive_idx.shape[0]}.")
  if query_idx.size == 0:
    raise ValueError("query_idx and positive_idx must describe at least one pair; got none.")
  mean = X[query_idx].mean(axis=0)
  differences = X[query_idx] - X[positive_idx]
  S = differences.T @ differences / differences.shape[0]
  P1 = np.linalg.inv(_whitening_cholesky((S + S.T) / 2.0))
  Y = (X - mean) @ P1.T
  _, rotation = _eigh_decreasing(Y.T @ Y)
  return mean, rotation.T @ P1


def apply_whitening(X: jax.Array, mean, P, dims: int | None = None) -> jax.Array:
  """Projects descriptors with a learned whitening and L2-normalises them (DESIGN §4.3).

  Computes ``l2n(P[:dims] (x - mean))`` for every row ``x``, with ``l2n`` the ``x / (||x|| +
  1e-6)`` of DESIGN §4.1. ``mean`` and ``P`` are cast to the dtype of ``X`` (float64 learners,
  float32 descriptors: the product runs in float32, at ``lax.Precision.HIGHEST`` because ``P``
  can be ill-conditioned). Pure jax, so it can run under ``jax.jit`` (``dims`` static).

  Args:
    X: float ``[N, D]`` descriptors.
    mean: float ``[D]`` from ``learn_pca_whitening`` or ``learn_lw``.
    P: float ``[K, D]`` projection (``[D, D]`` as learned), rows in decreasing order.
    dims: number of leading components kept, ``1 <= dims <= K``; ``None`` keeps all ``K``.

  Returns:
    float ``[N, dims]`` with unit-norm rows (up to the epsilon), in the dtype of ``X`` (float32
    for integer ``X``).

  Raises:
    ValueError: on mismatched shapes, ``dims`` outside ``[1, K]``, or non-finite concrete
      inputs.
  """
  check_ndim("X", X, 2, "[N, D]")
  check_ndim("mean", mean, 1, "[D]")
  check_ndim("P", P, 2, "[K, D]")
  x_shape, mean_shape, p_shape = (tuple(np.shape(v)) for v in (X, mean, P))
  if mean_shape[0] != x_shape[1] or p_shape[1] != x_shape[1]:
    raise ValueError(
        f"mean must be [D] and P [K, D] with D = X.shape[1] = {x_shape[1]}; got mean "
        f"{mean_shape} and P {p_shape}.")
  if dims is None:
    dims = p_shape[0]
  if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= p_shape[0]:
    raise ValueError(f"dims must be None or an int in [1, {p_shape[0]}] (rows of P); got "
                     f"{dims!r}.")
  for name, value in (("X", X), ("mean", mean), ("P", P)):
    check_finite(name, value)
  X = jnp.asarray(X)
  if not jnp.issubdtype(X.dtype, jnp.floating):
    X = X.astype(jnp.float32)
  mean = jnp.asarray(mean, dtype=X.dtype)
  P = jnp.asarray(P, dtype=X.dtype)
  return l2n(jnp.matmul(X - mean, P[:dims].T, precision=jax.lax.Precision.HIGHEST))
