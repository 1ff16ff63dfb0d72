"""Clustered descriptor sets with known neighbours, for search tests and benchmarks.

A Gaussian mixture on a random ``intrinsic_dim``-dimensional subspace of ``R^D`` (descriptors of
real images occupy a low-dimensional part of their space, which is what lets partitioning and
quantization work), plus a little isotropic noise in all ``D`` dimensions, with L2-normalised
rows. Cluster centres are unit vectors of the subspace; a row is its centre plus Gaussian noise
of norm about ``spread``, normalised, mapped to ``R^D``, plus noise of norm ``isotropic_noise``,
normalised again. Queries are drawn the same way, so each has a home cluster.

``spread`` sets the difficulty: with 100 rows per cluster and ``intrinsic_dim = 64``, the share
of a query's exact top-10 that comes from its own cluster was measured as 1.00 at
``EASY_SPREAD = 0.8``; for 100k rows 0.90 / 0.73 at spread 1.2 / 1.35, for 1M rows 0.86 / 0.69
at 1.1 / 1.2 (more rows, more foreign near neighbours). :func:`hard_spread` interpolates these
to the "true neighbours only ~80 % from the query's own cluster" regime, in which
partition-based search must probe many cells. :func:`own_cluster_fraction` measures the share
for any set.
"""

from __future__ import annotations

import numpy as np

from retrieval_jax._validation import check_positive_int

EASY_SPREAD = 0.8
HARD_SPREAD = 1.35  # ~0.73 own-cluster share at 100k rows


def hard_spread(num_database: int) -> float:
  """Spread giving ~80 % own-cluster top-10 neighbours: 1.3 at 100k rows, 1.15 at 1M (log-linear
  between the measurements of the module docstring, clipped to [1.0, 1.45])."""
  num_database = check_positive_int("num_database", num_database)
  return float(np.clip(1.3 - 0.15 * (np.log10(num_database) - 5.0), 1.0, 1.45))


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_descriptors(num_database: int, dim: int, num_queries: int, *,
                          points_per_cluster: int = 100, spread: float | None = None,
                          intrinsic_dim: int = 64, isotropic_noise: float = 0.1,
                          seed: int = 0, dtype=np.float32
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Database and queries drawn from one seeded mixture; see the module docstring.

  ``spread`` defaults to :func:`hard_spread` of ``num_database``.

  Returns:
    ``(database [N, D], queries [Q, D], database_labels int64 [N], query_labels int64 [Q])``,
    rows L2-normalised, in ``dtype``.
  """
  n = check_positive_int("num_database", num_database)
  dim = check_positive_int("dim", dim)
  num_queries = check_positive_int("num_queries", num_queries)
  r = min(check_positive_int("intrinsic_dim", intrinsic_dim), dim)
  clusters = max(1, n // check_positive_int("points_per_cluster", points_per_cluster))
  spread = hard_spread(n) if spread is None else float(spread)
  rng = np.random.default_rng(seed)
  centres = _normalise(rng.standard_normal((clusters, r)).astype(np.float32))
  basis = np.linalg.qr(rng.standard_normal((dim, r)))[0].T.astype(np.float32)  # [r, D]

  def draw(labels: np.ndarray) -> np.ndarray:
    out = np.empty((len(labels), dim), dtype)
    for s in range(0, len(labels), 65536):  # bounded temporaries for millions of rows
      lab = labels[s:s + 65536]
      z = centres[lab] + spread / np.sqrt(r) * rng.standard_normal((len(lab), r), np.float32)
      x = _normalise(z) @ basis + isotropic_noise / np.sqrt(dim) * rng.standard_normal(
          (len(lab), dim), np.float32)
      out[s:s + 65536] = _normalise(x)
    return out

  database_labels = rng.integers(0, clusters, n)
  query_labels = rng.integers(0, clusters, num_queries)
  return draw(database_labels), draw(query_labels), database_labels, query_labels


def own_cluster_fraction(neighbours, database_labels, query_labels) -> float:
  """Share of the ``[Q, k]`` neighbour rows that lie in their query's own cluster."""
  neighbours = np.asarray(neighbours)
  return float((np.asarray(database_labels)[neighbours]
                == np.asarray(query_labels)[:, None]).mean())
