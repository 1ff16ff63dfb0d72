"""Samplers: against brute-force enumeration, determinism per (seed, epoch), and validation."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_jax.data import samplers
from retrieval_jax.data.samplers import (Tuples, epoch_rng, m_per_class_batches, mine_tuples,
                                         nearest_negatives, random_negatives, random_tuples,
                                         ranked_negatives, sample_pairs, sample_pool)

# 9 clusters with sizes 1..5 (ids not contiguous, shuffled image order).
_SIZES = {3: 4, 7: 1, 10: 5, 11: 2, 20: 3, 21: 1, 30: 4, 41: 2, 50: 3}


def _cluster_ids(seed: int = 0) -> np.ndarray:
  ids = np.concatenate([np.full(n, c) for c, n in _SIZES.items()])
  return np.random.default_rng(seed).permutation(ids).astype(np.int64)


def _brute_ranked(d: np.ndarray, pool_ids: np.ndarray, query_ids: np.ndarray) -> list[list[int]]:
  """Per query: walk the pool by (distance, index), keep the first image of each new cluster
  that is not the query's cluster."""
  out = []
  for q in range(d.shape[0]):
    kept, seen = [], set()
    for j in sorted(range(d.shape[1]), key=lambda j: (d[q, j], j)):
      if pool_ids[j] != query_ids[q] and pool_ids[j] not in seen:
        seen.add(pool_ids[j])
        kept.append(j)
    out.append(kept)
  return out


# --------------------------------------------------------------------------- rng


def test_epoch_rng_is_a_function_of_seed_epoch_and_stream():
  draw = lambda *a: epoch_rng(*a).integers(0, 1 << 30, 8).tolist()  # noqa: E731
  assert draw(1, 2, "pairs") == draw(1, 2, "pairs")
  assert draw(1, 2, "pairs") != draw(1, 3, "pairs")
  assert draw(1, 2, "pairs") != draw(2, 2, "pairs")
  assert draw(1, 2, "pairs") != draw(1, 2, "pool")
  with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
    epoch_rng(0, -1)


# --------------------------------------------------------------------------- pairs


def test_random_pairs_from_clusters():
  ids = _cluster_ids()
  eligible = {i for i in range(ids.size) if _SIZES[int(ids[i])] >= 2}
  pairs = sample_pairs(ids, num_pairs=10, seed=3, epoch=5)
  assert pairs.shape == (10, 2) and pairs.dtype == np.int64
  assert len(set(pairs[:, 0].tolist())) == 10  # without replacement
  for q, p in pairs.tolist():
    assert q in eligible and p != q and ids[p] == ids[q]
  np.testing.assert_array_equal(pairs, sample_pairs(ids, num_pairs=10, seed=3, epoch=5))
  assert not np.array_equal(pairs, sample_pairs(ids, num_pairs=10, seed=3, epoch=6))
  # Asking for more than exist takes every eligible query once (cirtorch's min(qsize, pairs)).
  everything = sample_pairs(ids, num_pairs=1000, seed=0, epoch=0)
  assert sorted(everything[:, 0].tolist()) == sorted(eligible)
  # Over epochs the random positive of a query reaches every other member of its cluster.
  q = next(i for i in range(ids.size) if _SIZES[int(ids[i])] == 5)
  seen = set()
  for epoch in range(60):
    pairs = sample_pairs(ids, seed=1, epoch=epoch)
    seen.update(pairs[pairs[:, 0] == q, 1].tolist())
  assert seen == {i for i in range(ids.size) if ids[i] == ids[q] and i != q}


@pytest.mark.parametrize("strategy", ["hardest", "closest"])
def test_hardest_and_closest_positives_match_brute_force(strategy):
  ids = _cluster_ids(1)
  x = np.random.default_rng(2).normal(size=(ids.size, 4))
  x[5] = np.nan  # an image the model did not describe: never a positive
  pairs = sample_pairs(ids, seed=0, epoch=0, positive=strategy, descriptors=x)
  # The same queries as the random strategy: only the positive changes.
  np.testing.assert_array_equal(pairs[:, 0], sample_pairs(ids, seed=0, epoch=0)[:, 0])
  for q, p in pairs.tolist():
    if q == 5:
      continue
    others = [(float(np.linalg.norm(x[j] - x[q])), j) for j in range(ids.size)
              if ids[j] == ids[q] and j != q and j != 5]
    if not others:
      continue
    best = max(others, key=lambda t: (t[0], -t[1])) if strategy == "hardest" else min(others)
    assert p == best[1], (q, p, others)


def test_explicit_positive_pairs():
  pairs_in = np.array([[0, 1], [0, 2], [0, 3], [4, 5], [6, 7], [6, 8]])
  got = sample_pairs(positive_pairs=pairs_in, num_pairs=4, seed=0, epoch=1)
  rows = {tuple(r) for r in pairs_in.tolist()}
  assert len({tuple(r) for r in got.tolist()}) == 4 and {tuple(r) for r in got.tolist()} <= rows
  x = np.random.default_rng(0).normal(size=(9, 3))
  hard = sample_pairs(positive_pairs=pairs_in, seed=0, epoch=1, positive="hardest",
                      descriptors=x)
  for q, p in hard.tolist():
    listed = [b for a, b in pairs_in.tolist() if a == q]
    assert p == max(listed, key=lambda b: np.linalg.norm(x[b] - x[q]))
  with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
    sample_pairs(np.zeros(5, np.int64), positive_pairs=pairs_in)


def test_pair_validation():
  with pytest.raises(ValueError, match="no cluster has two or more images"):
    sample_pairs(np.arange(6))
  with pytest.raises(ValueError, match="needs descriptors"):
    sample_pairs(_cluster_ids(), positive="hardest")
  with pytest.raises(ValueError, match="positive must be one of"):
    sample_pairs(_cluster_ids(), positive="semi-hard")


def test_sample_pool():
  pool = sample_pool(50, 20, seed=4, epoch=2)
  assert pool.shape == (20,) and np.all(np.diff(pool) > 0) and pool.min() >= 0 and pool.max() < 50
  np.testing.assert_array_equal(pool, sample_pool(50, 20, seed=4, epoch=2))
  assert not np.array_equal(pool, sample_pool(50, 20, seed=4, epoch=3))
  allowed = np.array([3, 9, 12, 40, 41])
  np.testing.assert_array_equal(sample_pool(allowed, 100, seed=0, epoch=0), allowed)
  assert set(sample_pool(allowed, 3, seed=0, epoch=0).tolist()) <= set(allowed.tolist())


# --------------------------------------------------------------------------- negatives


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranked_negatives_match_brute_force(seed, monkeypatch):
  rng = np.random.default_rng(seed)
  n_q, n_pool = 7, 30
  d = rng.integers(0, 6, size=(n_q, n_pool)).astype(np.float32)  # many ties
  pool_ids = rng.integers(0, 8, n_pool)
  query_ids = rng.integers(0, 10, n_q)  # some queries' clusters are not in the pool
  want = _brute_ranked(d, pool_ids, query_ids)
  # Small chunks: the per-chunk widths differ and must be padded to one table.
  monkeypatch.setattr(samplers, "_CHUNK_ELEMENTS", 2 * n_pool)
  positions, dists = ranked_negatives(d, pool_ids, query_ids)
  assert positions.shape[1] == max(len(w) for w in want)
  for q in range(n_q):
    k = len(want[q])
    assert positions[q, :k].tolist() == want[q]
    assert np.all(positions[q, k:] == -1) and np.all(np.isinf(dists[q, k:]))
    np.testing.assert_array_equal(dists[q, :k], d[q, want[q]])
  top3 = nearest_negatives(d, pool_ids, query_ids, 3)
  assert top3.tolist() == [w[:3] for w in want]


def test_nearest_negatives_needs_enough_clusters():
  d = np.zeros((2, 4))
  with pytest.raises(ValueError, match=r"query row 1 \(cluster 1\) has only 1 other clusters "
                                       r"in the pool of 4 images but num_negatives=2"):
    nearest_negatives(d, np.array([0, 0, 1, 1]), np.array([2, 1]), 2)
  with pytest.raises(ValueError, match="NaN"):
    nearest_negatives(np.full((1, 2), np.nan), np.array([0, 1]), np.array([2]), 1)


def test_mine_tuples_picks_the_nearest_distinct_cluster_negatives():
  ids = _cluster_ids(2)
  x = np.random.default_rng(5).normal(size=(ids.size, 6)).astype(np.float32)
  pairs = sample_pairs(ids, num_pairs=6, seed=0, epoch=0)
  pool = sample_pool(ids.size, 18, seed=0, epoch=0)
  tuples = mine_tuples(pairs, pool, x[pairs[:, 0]], x[pool], ids, 3)
  assert isinstance(tuples, Tuples) and tuples.as_array().shape == (6, 5)
  np.testing.assert_array_equal(tuples.queries, pairs[:, 0])
  np.testing.assert_array_equal(tuples.positives, pairs[:, 1])
  for t, (q, negs) in enumerate(zip(pairs[:, 0].tolist(), tuples.negatives.tolist())):
    # Brute force over image indices: all pool images by true distance.
    kept, seen = [], set()
    for j in sorted(pool.tolist(), key=lambda j: (float(np.linalg.norm(x[j] - x[q])), j)):
      if ids[j] != ids[q] and ids[j] not in seen:
        seen.add(ids[j])
        kept.append(j)
    assert negs == kept[:3], t


def test_random_negatives_and_tuples():
  ids = _cluster_ids(3)
  query_ids = ids[:10]
  negs = random_negatives(query_ids, ids, 4, seed=1, epoch=0)
  assert negs.shape == (10, 4)
  for q_id, row in zip(query_ids.tolist(), negs.tolist()):
    clusters = ids[row].tolist()
    assert len(set(clusters)) == 4 and q_id not in clusters
  np.testing.assert_array_equal(negs, random_negatives(query_ids, ids, 4, seed=1, epoch=0))
  # Every other cluster (even singletons) is drawn over epochs: the choice is per cluster.
  seen = set()
  for epoch in range(40):
    seen.update(ids[random_negatives(query_ids[:1], ids, 2, seed=0, epoch=epoch)].ravel().tolist())
  assert seen == set(_SIZES) - {int(query_ids[0])}
  with pytest.raises(ValueError, match=r"has only 8 other clusters among 25 images but "
                                       r"num_negatives=9"):
    random_negatives(query_ids, ids, 9)
  tuples = random_tuples(ids, 5, 2, seed=0, epoch=3)
  assert tuples.as_array().shape == (5, 4)
  assert np.all(ids[tuples.positives] == ids[tuples.queries])
  assert np.all(ids[tuples.negatives] != ids[tuples.queries][:, None])


# --------------------------------------------------------------------------- m-per-class


def test_m_per_class_batches(monkeypatch):
  ids = _cluster_ids(4)
  k, n = 2, 3
  monkeypatch.setattr(samplers, "_CHUNK_ELEMENTS", 7)  # several chunks of the key table
  batches = m_per_class_batches(ids, k, n, seed=0, epoch=0)
  eligible = {c for c, size in _SIZES.items() if size >= n}  # 3, 10, 20, 30, 50
  assert batches.shape == (len(eligible) // k, k * n)
  used = []
  for batch in batches:
    blocks = batch.reshape(k, n)
    classes = [int(ids[b[0]]) for b in blocks]
    assert len(set(classes)) == k and set(classes) <= eligible
    for block in blocks:
      assert len(set(block.tolist())) == n  # no image twice within a class
      assert np.all(ids[block] == ids[block[0]])
    used += classes
  assert len(set(used)) == len(used)  # one round: each class at most once
  np.testing.assert_array_equal(batches, m_per_class_batches(ids, k, n, seed=0, epoch=0))
  assert not np.array_equal(batches, m_per_class_batches(ids, k, n, seed=0, epoch=1))
  # More batches than a round: rounds reshuffle, every batch still has k distinct classes.
  many = m_per_class_batches(ids, k, n, num_batches=7, seed=0, epoch=0)
  assert many.shape == (7, k * n)
  for batch in many:
    assert len(set(ids[batch.reshape(k, n)[:, 0]].tolist())) == k


def test_m_per_class_small_classes_refused_or_repeated():
  ids = _cluster_ids(5)
  with pytest.raises(ValueError, match=r"need 3 classes with >= 5 images each, but only 1 of "
                                       r"the 9 classes"):
    m_per_class_batches(ids, 3, 5)
  batches = m_per_class_batches(ids, 3, 5, allow_repeats=True, num_batches=4, seed=2, epoch=0)
  assert batches.shape == (4, 15)
  for batch in batches:
    blocks = batch.reshape(3, 5)
    assert len(set(ids[blocks[:, 0]].tolist())) == 3
    for block in blocks:
      assert np.all(ids[block] == ids[block[0]]) and _SIZES[int(ids[block[0]])] >= 2
      # A class with >= 5 images is still drawn without replacement.
      if _SIZES[int(ids[block[0]])] >= 5:
        assert len(set(block.tolist())) == 5
