"""Offline mining equals a brute-force scan of the whole pool; schedules and filters."""

import numpy as np
import pytest

from retrieval_jax import mining


def brute_force_negatives(q, pool, q_ids, pool_ids, k, far=None):
  """Per query: walk the whole pool by increasing Euclidean distance (ties: lower index) and
  keep an image when its cluster is new and not the query's. With ``far`` (FaceNet's
  semi-hard rule), first walk only the images farther than ``far[i]``, then the whole pool."""
  out_pos, out_dist = [], []
  for i in range(len(q)):
    d = np.sqrt(((q[i].astype(np.float64) - pool.astype(np.float64)) ** 2).sum(1))
    seen, pos, dist = {q_ids[i]}, [], []
    order = sorted(range(len(pool)), key=lambda j: (d[j], j))
    for j in order if far is None else [j for j in order if d[j] > far[i]] + order:
      if pool_ids[j] not in seen:
        seen.add(pool_ids[j])
        pos.append(j)
        dist.append(d[j])
    out_pos.append(pos if k is None else pos[:k])
    out_dist.append(dist if k is None else dist[:k])
  return out_pos, out_dist


def clustered_pool(rng, n_clusters=30, per_cluster=12, dim=8, unit=True):
  centres = rng.normal(size=(n_clusters, dim))
  ids = np.repeat(np.arange(n_clusters), per_cluster)
  x = centres[ids] + 0.05 * rng.normal(size=(len(ids), dim))
  if unit:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), ids


@pytest.mark.parametrize("unit", [True, False])
def test_shortlist_mining_equals_full_scan(rng, unit):
  pool, pool_ids = clustered_pool(rng, unit=unit)
  q_rows = rng.choice(len(pool), 15, replace=False)
  q = pool[q_rows] + 0.01 * rng.normal(size=(15, pool.shape[1])).astype(np.float32)
  q_ids = pool_ids[q_rows]
  # A shortlist of 4 holds ~1 other cluster (12 images per cluster crowd each query): most rows
  # must be widened several times before 5 distinct clusters appear.
  pos, dist = mining.mine_negatives(q, pool, q_ids, pool_ids, 5, shortlist=4, chunk_size=50)
  want_pos, want_dist = brute_force_negatives(q, pool, q_ids, pool_ids, 5)
  np.testing.assert_array_equal(pos, np.array(want_pos))
  np.testing.assert_allclose(dist, np.array(want_dist), rtol=1e-5, atol=1e-6)
  assert (pool_ids[pos] != q_ids[:, None]).all()


def test_ranked_list_of_every_cluster(rng):
  pool, pool_ids = clustered_pool(rng, n_clusters=7, per_cluster=5)
  q, q_ids = pool[:6], pool_ids[:6]
  pos, dist = mining.mine_negatives(q, pool, q_ids, pool_ids, None)
  want_pos, want_dist = brute_force_negatives(q, pool, q_ids, pool_ids, None)
  assert pos.shape == (6, 6)  # every other cluster, once
  np.testing.assert_array_equal(pos, np.array(want_pos))
  np.testing.assert_allclose(dist, np.array(want_dist), rtol=1e-5, atol=1e-6)
  assert (np.diff(dist, axis=1) >= 0).all()


def test_semi_hard_negatives_are_the_nearest_beyond_the_positive(rng):
  pool, pool_ids = clustered_pool(rng, n_clusters=12, per_cluster=6, unit=False)
  q_rows = rng.choice(len(pool), 10, replace=False)
  q, q_ids = pool[q_rows] + 0.05 * rng.normal(size=(10, 8)).astype(np.float32), pool_ids[q_rows]
  d_sorted = np.sort(np.sqrt(((q[:, None].astype(np.float64) - pool) ** 2).sum(-1)), axis=1)
  # Positive distances from "nothing excluded" to "only the farthest few beyond": rows 7-9 have
  # fewer than 4 clusters beyond it, so hard negatives fill their remaining slots.
  far = np.concatenate([[0.0], d_sorted[1:7, 20], d_sorted[7:, -3]])
  pos, dist = mining.mine_negatives(q, pool, q_ids, pool_ids, 4, shortlist=4, farther_than=far)
  want, _ = brute_force_negatives(q, pool, q_ids, pool_ids, 4, far)
  np.testing.assert_array_equal(pos, np.array(want))
  np.testing.assert_allclose(dist, np.linalg.norm(q[:, None] - pool[pos], axis=-1), rtol=1e-5)
  assert (dist[1:7] > far[1:7, None]).all()
  assert (dist[7:, -1] <= far[7:]).all()  # filled with hard ones
  # Nothing excluded: plain hard mining.
  np.testing.assert_array_equal(pos[0], mining.mine_negatives(q[:1], pool, q_ids[:1], pool_ids,
                                                              4)[0][0])
  ranked, _ = mining.mine_negatives(q, pool, q_ids, pool_ids, None, farther_than=far)
  assert ((ranked >= 0).sum(1)[7:] < 4).all()  # the ranked list has no fill
  with pytest.raises(ValueError, match=r"farther_than must be float \[Q=10\]"):
    mining.mine_negatives(q, pool, q_ids, pool_ids, 4, farther_than=far[:3])


def test_too_few_clusters_names_the_query(rng):
  pool, pool_ids = clustered_pool(rng, n_clusters=3, per_cluster=4)
  with pytest.raises(ValueError, match=r"query row 0 .* only 2 other clusters.*num_negatives=3"):
    mining.mine_negatives(pool[:2], pool, pool_ids[:2], pool_ids, 3)
  with pytest.raises(ValueError, match="same descriptor dimension"):
    mining.mine_negatives(pool[:2, :4], pool, pool_ids[:2], pool_ids, 1)
  with pytest.raises(ValueError, match="pool_cluster_ids"):
    mining.mine_negatives(pool[:2], pool, pool_ids[:2], pool_ids[:-1], 1)
  bad = pool.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="pool_descriptors must be finite"):
    mining.mine_negatives(pool[:2], bad, pool_ids[:2], pool_ids, 1)


def test_active_triplets_match_the_margin_rule(rng):
  a, p, n = (rng.normal(size=(40, 6)).astype(np.float32) for _ in range(3))
  margin = 0.5
  d_ap = ((a - p) ** 2).sum(1)
  d_an = ((a - n) ** 2).sum(1)
  np.testing.assert_array_equal(mining.active_triplets(a, p, n, margin=margin),
                                margin + d_ap - d_an > 0)
  # A triplet whose negative is far beyond the margin is inactive.
  assert not mining.active_triplets(a[:1], a[:1], a[:1] + 10.0, margin=margin)[0]


def test_refresh_schedule():
  every_5 = mining.RefreshSchedule(every_epochs=5)
  assert every_5.due(0, None)
  assert [e for e in range(1, 16) if every_5.due(e, 100)] == [5, 10, 15]
  every_3000 = mining.RefreshSchedule(every_epochs=None, every_tuples=3000)
  assert every_3000.due(0, None) and not every_3000.due(0, 2999) and every_3000.due(0, 3000)
  with pytest.raises(ValueError, match="exactly one of every_epochs and every_tuples"):
    mining.RefreshSchedule(every_epochs=2, every_tuples=10)
  with pytest.raises(ValueError, match="every_tuples must be a positive integer"):
    mining.RefreshSchedule(every_epochs=None, every_tuples=0)
