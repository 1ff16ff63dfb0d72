"""Product quantization and truncation (search/pq.py) against numpy brute force."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.metrics import compute_map
from retrieval_jax.search import ProductQuantizer, exact_search, synthetic, truncate
from retrieval_jax.whitening import apply_whitening, learn_pca_whitening


@pytest.fixture(scope="module")
def data():
  return synthetic.clustered_descriptors(6_000, 64, 60, spread=synthetic.EASY_SPREAD, seed=11)


@pytest.fixture(scope="module")
def pq(data):
  return ProductQuantizer.fit(data[0], iterations=10)


def test_codes_are_16_bytes_per_image(data, pq):
  codes = pq.encode(data[0])
  assert codes.dtype == np.uint8 and codes.shape == (6_000, 16)
  assert codes.nbytes == 16 * len(codes) and pq.bytes_per_code == 16


def test_encode_picks_the_nearest_centroid(data, pq):
  x = data[0][:500]
  parts = x.reshape(500, 16, 4)
  dist = ((parts[:, :, None, :] - pq.codebooks[None]) ** 2).sum(-1)  # [N, m, 256]
  expected = dist.argmin(-1)
  codes = pq.encode(x, chunk_size=128)
  chosen = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
  # Equal codes, or (float rounding) an equally near centroid.
  assert (codes == expected).mean() > 0.999
  np.testing.assert_allclose(chosen, dist.min(-1), atol=1e-5)


def test_adc_search_equals_brute_force_over_decoded_codes(data, pq):
  database, queries, _, _ = data
  codes = pq.encode(database)
  scores, indices = pq.search(queries, codes, 10, chunk_size=1000)
  approx = queries.astype(np.float64) @ pq.decode(codes).T.astype(np.float64)
  expected = np.argsort(-approx, axis=1, kind="stable")[:, :10]
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(approx, expected, 1),
                             atol=1e-5)
  assert (np.asarray(indices) == expected).mean() > 0.99  # float32 sums may swap near-ties
  tables = np.asarray(pq.lookup_tables(queries))
  manual = tables[:, np.arange(16), codes[:7].astype(np.int64)].sum(-1)  # [Q, 7]
  np.testing.assert_allclose(manual, approx[:, :7], atol=1e-5)


def test_kmeans_is_seeded(data):
  a = ProductQuantizer.fit(data[0][:2000], num_subvectors=8, bits=4, iterations=5, seed=3)
  b = ProductQuantizer.fit(data[0][:2000], num_subvectors=8, bits=4, iterations=5, seed=3)
  c = ProductQuantizer.fit(data[0][:2000], num_subvectors=8, bits=4, iterations=5, seed=4)
  np.testing.assert_array_equal(a.codebooks, b.codebooks)
  assert not np.array_equal(a.codebooks, c.codebooks)
  assert a.codebooks.shape == (8, 16, 8)


def test_pq_map_close_to_exact_map(data, pq):
  database, queries, database_labels, query_labels = data
  gnd = [{"ok": np.flatnonzero(database_labels == label)} for label in query_labels]
  _, exact_ranks = exact_search(queries, database, 200)
  _, pq_ranks = pq.search(queries, pq.encode(database), 200)
  exact_map = compute_map(np.asarray(exact_ranks), gnd, n_db=len(database))[0]
  pq_map = compute_map(np.asarray(pq_ranks), gnd, n_db=len(database))[0]
  assert pq_map > 0.8 * exact_map and exact_map > 0.3


def test_truncate_equals_whitening_with_fewer_dims(data):
  database = data[0]
  mean, projection = learn_pca_whitening(database)
  full = apply_whitening(jnp.asarray(database), mean, projection)
  np.testing.assert_allclose(np.asarray(truncate(full, 16)),
                             np.asarray(apply_whitening(jnp.asarray(database), mean, projection,
                                                        dims=16)), atol=1e-5)


def test_bad_arguments_are_refused(data, pq):
  with pytest.raises(ValueError, match="divisible by num_subvectors"):
    ProductQuantizer.fit(data[0], num_subvectors=10)
  with pytest.raises(ValueError, match="bits must be in 1..8"):
    ProductQuantizer.fit(data[0], bits=9)
  with pytest.raises(ValueError, match=r"codes must be uint8 \[N, 16\]"):
    pq.search(data[1], np.zeros((5, 8), np.uint8), 2)
  with pytest.raises(ValueError, match="d must be at most"):
    truncate(data[0], 65)
