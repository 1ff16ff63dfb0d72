"""Compact codes: top-d truncation after whitening, and product quantization with ADC search.

REMAP (§III-E) compresses descriptors in two ways, both here:

- :func:`truncate`: keep the first ``d`` whitened dimensions (whitening orders components by
  decreasing variance, DESIGN §4.3) and re-normalise.
- :class:`ProductQuantizer`: split ``D`` into ``m`` sub-vectors and replace each by the index of
  its nearest of ``2**bits`` k-means centroids, learned per sub-space. With the default
  ``m = 16, bits = 8`` a descriptor costs 16 bytes. Search is asymmetric (ADC): the query stays
  uncompressed, its inner product with every centroid is tabulated once (``[m, 2**bits]``), and
  a code's score is the sum of ``m`` table entries, scanned in chunks with the exact top-k
  kernel of :mod:`retrieval_jax.search.exact`.

k-means runs in jax (all sub-spaces at once under ``vmap``), seeded: the same data, seed and
settings give the same codebooks. Empty clusters keep their previous centroid.

References:
  Jegou, Douze & Schmid, "Product quantization for nearest neighbor search", TPAMI 2011;
  Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN features for image
  retrieval", TIP 2019, §III-E.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from retrieval_jax._validation import check_finite, check_ndim, check_positive_int
from retrieval_jax.normalization import l2n
from retrieval_jax.search.exact import scan_top_k

_HIGHEST = lax.Precision.HIGHEST


def truncate(x, d: int) -> jax.Array:
  """First ``d`` dimensions of whitened descriptors, L2-normalised: ``[N, D] -> [N, d]``.

  Equivalent to ``whitening.apply_whitening(X, mean, P, dims=d)`` on the unwhitened rows, for
  descriptors already whitened with all ``D`` components.
  """
  check_ndim("x", x, 2, "[N, D]")
  width = np.shape(x)[1]
  d = check_positive_int("d", d)
  if d > width:
    raise ValueError(f"d must be at most the descriptor dimension {width}; got {d}.")
  return l2n(jnp.asarray(x)[:, :d])


def _nearest(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index of the nearest centroid: ``[S, ds], [K, ds] -> int32 [S]`` (Euclidean)."""
  # argmin ||x - c||^2 = argmax (2 x.c - ||c||^2); ||x||^2 does not change the winner.
  scores = 2.0 * jnp.matmul(x, centroids.T, precision=_HIGHEST) - jnp.sum(
      centroids * centroids, axis=-1)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_centroids", "iterations"))
def _kmeans(data: jax.Array, key: jax.Array, num_centroids: int,
            iterations: int) -> jax.Array:
  """Lloyd k-means on each sub-space: ``[m, S, ds] -> [m, K, ds]`` centroids."""

  def one_space(x, space_key):
    init = jax.random.choice(space_key, x.shape[0], (num_centroids,), replace=False)
    centroids = x[init]

    def step(_, c):
      assign = _nearest(x, c)
      sums = jax.ops.segment_sum(x, assign, num_segments=num_centroids)
      counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), assign,
                                   num_segments=num_centroids)
      return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    return lax.fori_loop(0, iterations, step, centroids)

  return jax.vmap(one_space)(data, jax.random.split(key, data.shape[0]))


@jax.jit
def _encode(x: jax.Array, codebooks: jax.Array) -> jax.Array:
  m, _, ds = codebooks.shape
  parts = x.reshape(x.shape[0], m, ds).transpose(1, 0, 2)
  return jax.vmap(_nearest)(parts, codebooks).T.astype(jnp.uint8)


def _adc_scores(tables: jax.Array, codes: jax.Array) -> jax.Array:
  """``sum_j tables[q, j, codes[n, j]]``: ``[Q, m, K], [C, m] -> [Q, C]``."""
  codes = codes.astype(jnp.int32)
  # One gather per sub-space, accumulated: never a [Q, C, m] intermediate.
  total = jnp.take(tables[:, 0, :], codes[:, 0], axis=1)
  for j in range(1, tables.shape[1]):
    total = total + jnp.take(tables[:, j, :], codes[:, j], axis=1)
  return total


class ProductQuantizer:
  """``m`` sub-space codebooks of ``2**bits`` centroids each; see the module docstring.

  Attributes:
    codebooks: float32 ``[m, 2**bits, D/m]``.
  """

  def __init__(self, codebooks):
    codebooks = np.asarray(codebooks, np.float32)
    check_ndim("codebooks", codebooks, 3, "[m, 2**bits, D/m]")
    if codebooks.shape[1] > 256:
      raise ValueError(f"at most 256 centroids per sub-space fit in uint8 codes; got "
                       f"{codebooks.shape[1]}.")
    self.codebooks = codebooks

  @property
  def num_subvectors(self) -> int:
    return self.codebooks.shape[0]

  @property
  def dim(self) -> int:
    return self.codebooks.shape[0] * self.codebooks.shape[2]

  @property
  def bytes_per_code(self) -> int:
    return self.num_subvectors  # one uint8 per sub-vector

  @classmethod
  def fit(cls, x, num_subvectors: int = 16, bits: int = 8, *, iterations: int = 20,
          sample_size: int = 65536, seed: int = 0) -> ProductQuantizer:
    """Learns the codebooks with k-means on (a seeded sample of) ``x``.

    Args:
      x: float ``[N, D]`` training descriptors, ``D`` divisible by ``num_subvectors``.
      num_subvectors: ``m``, bytes per code.
      bits: ``log2`` of centroids per sub-space, 1..8 (codes are uint8).
      iterations: Lloyd iterations.
      sample_size: training rows drawn (without replacement) when ``N`` is larger.
      seed: seed of the sample and of the centroid initialisation.
    """
    check_ndim("x", x, 2, "[N, D]")
    m = check_positive_int("num_subvectors", num_subvectors)
    bits = check_positive_int("bits", bits)
    if bits > 8:
      raise ValueError(f"bits must be in 1..8 (uint8 codes); got {bits}.")
    n, d = np.shape(x)
    if d % m:
      raise ValueError(f"the descriptor dimension {d} must be divisible by num_subvectors; "
                       f"got num_subvectors={m}.")
    k = 2**bits
    if n < k:
      raise ValueError(f"x must have at least 2**bits = {k} rows to train; got {n}.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, sample_size, replace=False)) if n > sample_size else slice(None)
    sample = np.asarray(x[rows], np.float32)
    check_finite("x", sample)
    data = jnp.asarray(sample.reshape(len(sample), m, d // m).transpose(1, 0, 2))
    codebooks = _kmeans(data, jax.random.key(seed), k, check_positive_int(
        "iterations", iterations))
    return cls(np.asarray(codebooks))

  def encode(self, x, *, chunk_size: int = 65536) -> np.ndarray:
    """uint8 ``[N, m]`` codes of float ``[N, D]`` rows (encoded ``chunk_size`` rows at a time)."""
    check_ndim("x", x, 2, "[N, D]")
    if np.shape(x)[1] != self.dim:
      raise ValueError(f"x must have dimension {self.dim}; got shape {np.shape(x)}.")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    codebooks = jnp.asarray(self.codebooks)
    out = np.empty((np.shape(x)[0], self.num_subvectors), np.uint8)
    for s in range(0, len(out), chunk_size):
      block = np.asarray(x[s:s + chunk_size], np.float32)
      check_finite("x", block)
      out[s:s + chunk_size] = np.asarray(_encode(jnp.asarray(block), codebooks))
    return out

  def decode(self, codes) -> np.ndarray:
    """float32 ``[N, D]`` reconstructions (concatenated centroids) of uint8 ``[N, m]`` codes."""
    codes = self._check_codes(codes)
    parts = self.codebooks[np.arange(self.num_subvectors), codes.astype(np.int64)]
    return parts.reshape(len(codes), self.dim)

  def lookup_tables(self, queries) -> jax.Array:
    """Per-query ADC tables ``[Q, m, 2**bits]``: ``q_j . c_jk`` for sub-space ``j``."""
    check_ndim("queries", queries, 2, "[Q, D]")
    if np.shape(queries)[1] != self.dim:
      raise ValueError(f"queries must have dimension {self.dim}; got {np.shape(queries)}.")
    check_finite("queries", queries)
    q = jnp.asarray(queries, jnp.float32)
    parts = q.reshape(q.shape[0], self.num_subvectors, -1)
    return jnp.einsum("qmd,mkd->qmk", parts, jnp.asarray(self.codebooks), precision=_HIGHEST)

  def search(self, queries, codes, k: int, *,
             chunk_size: int = 65536) -> tuple[jax.Array, jax.Array]:
    """Asymmetric (ADC) top-``k`` by approximate inner product ``q . decode(code)``.

    Args:
      queries: float ``[Q, D]``, uncompressed.
      codes: uint8 ``[N, m]`` from :meth:`encode`.
      k: neighbours per query, ``1 <= k <= N``.
      chunk_size: codes scored per step (peak memory ``O(Q * (k + chunk_size))``).

    Returns:
      ``(scores, indices)``: float32 ``[Q, k]`` decreasing, int32 ``[Q, k]`` rows of ``codes``.
    """
    codes = self._check_codes(codes)
    n = len(codes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
      raise ValueError(f"k must be an int in [1, N={n}] (N = codes rows); got {k!r}.")
    chunk = min(check_positive_int("chunk_size", chunk_size), n)
    return scan_top_k(self.lookup_tables(queries), jnp.asarray(codes), int(k), chunk,
                      _adc_scores)

  def _check_codes(self, codes) -> np.ndarray:
    check_ndim("codes", codes, 2, "[N, m]")
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.shape[1] != self.num_subvectors:
      raise ValueError(f"codes must be uint8 [N, {self.num_subvectors}]; got {codes.dtype} "
                       f"{codes.shape}.")
    if codes.size and int(codes.max()) >= self.codebooks.shape[1]:
      raise ValueError(f"codes must be below {self.codebooks.shape[1]} (centroids per "
                       f"sub-space); got {int(codes.max())}.")
    return codes
