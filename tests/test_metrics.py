"""Tests for retrieval_jax.metrics against hand-computed values and a per-query reference."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_jax import metrics

# Any stray warning (division by zero, a spurious "empty query" report) fails a test.
pytestmark = pytest.mark.filterwarnings("error")


# --------------------------------------------------------------------------- reference


def reference_scores(ranked, ok, junk, kappas, ks):
  """Per-query AP, clipped P@k, recall@k and hit@k, written straight from the protocol text."""
  ok = set(int(i) for i in ok)
  junk = set(int(i) for i in junk) - ok
  positions = []  # junk-adjusted 0-based positions of positives, in rank order
  position = 0
  for index in ranked:
    if index in junk:
      continue
    if index in ok:
      positions.append(position)
    position += 1
  ap = 0.0
  for t, r in enumerate(positions):
    p0 = 1.0 if r == 0 else t / r
    p1 = (t + 1) / (r + 1)
    ap += (p0 + p1) / 2
  ap /= len(ok)
  prs = []
  for k in kappas:
    if not positions:
      prs.append(0.0)
      continue
    kq = min(positions[-1] + 1, k)
    prs.append(sum(1 for r in positions if r + 1 <= kq) / kq)
  recalls = [sum(1 for r in positions if r < k) / len(ok) for k in ks]
  hits = [float(any(r < k for r in positions)) for k in ks]
  return ap, prs, recalls, hits


def random_problem(rng, n_q, n_db, n_list):
  ranks = rng.permuted(np.tile(np.arange(n_db), (n_q, 1)), axis=1)[:, :n_list]
  gnd = []
  for _ in range(n_q):
    ok = rng.choice(n_db, size=rng.integers(1, 9), replace=False)
    # Junk drawn independently, so it sometimes overlaps ok (ok must win).
    junk = rng.choice(n_db, size=rng.integers(0, 6), replace=False)
    gnd.append({"ok": ok.tolist(), "junk": junk.tolist()})
  return ranks, gnd


KAPPAS = (1, 3, 5, 10)


@pytest.mark.parametrize("chunk_elements", [None, 64])
@pytest.mark.parametrize("n_list", [50, 20, 3])
def test_matches_reference_on_random_rankings(rng, monkeypatch, n_list, chunk_elements):
  if chunk_elements is not None:  # several query chunks per call
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_elements)
  n_db = 50
  ranks, gnd = random_problem(rng, n_q=30, n_db=n_db, n_list=n_list)
  if n_list < n_db:  # a query whose positives are all outside its truncated list
    gnd[0] = {"ok": np.setdiff1d(np.arange(n_db), ranks[0])[:3].tolist(), "junk": []}

  m, aps, mpk, prs = metrics.compute_map(ranks, gnd, KAPPAS, n_db=n_db)
  recalls = metrics.recall_at_k(ranks, gnd, KAPPAS, n_db=n_db)
  hits = metrics.hit_rate_at_k(ranks, gnd, KAPPAS, n_db=n_db)

  ref = [reference_scores(ranks[q], g["ok"], g["junk"], KAPPAS, KAPPAS) for q, g in enumerate(gnd)]
  ref_aps = np.array([r[0] for r in ref])
  ref_prs = np.array([r[1] for r in ref])
  np.testing.assert_allclose(aps, ref_aps, rtol=1e-12)
  np.testing.assert_allclose(prs, ref_prs, rtol=1e-12)
  assert m == pytest.approx(ref_aps.mean(), rel=1e-12)
  np.testing.assert_allclose(mpk, ref_prs.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(recalls, np.mean([r[2] for r in ref], axis=0), rtol=1e-12)
  np.testing.assert_allclose(hits, np.mean([r[3] for r in ref], axis=0), rtol=1e-12)
  if n_list < n_db:
    assert aps[0] == 0.0 and (prs[0] == 0.0).all()


def test_scale_70_queries_200k_database(rng):
  n_q, n_db = 70, 200_000
  ranks = rng.permuted(np.tile(np.arange(n_db, dtype=np.int32), (n_q, 1)), axis=1)
  gnd = [{"ok": rng.choice(n_db, 40, replace=False), "junk": rng.choice(n_db, 20, replace=False)}
         for _ in range(n_q)]
  _, aps, _, prs = metrics.compute_map(ranks, gnd, KAPPAS)
  top = ranks[:, :100]
  _, aps_top, _, prs_top = metrics.compute_map(top, gnd, KAPPAS, n_db=n_db)
  for q in (0, 37, 69):
    ap, pk, _, _ = reference_scores(ranks[q].tolist(), gnd[q]["ok"], gnd[q]["junk"], KAPPAS, ())
    assert aps[q] == pytest.approx(ap, rel=1e-12)
    np.testing.assert_allclose(prs[q], pk, rtol=1e-12)
    ap, pk, _, _ = reference_scores(top[q].tolist(), gnd[q]["ok"], gnd[q]["junk"], KAPPAS, ())
    assert aps_top[q] == pytest.approx(ap, rel=1e-12)
    np.testing.assert_allclose(prs_top[q], pk, rtol=1e-12)


# --------------------------------------------------------------------------- hand-computed AP


def test_ap_with_interleaved_junk():
  # ranks [p, j, n, p], 2 positives. Junk removed: [p, n, p], positives at r = 0, 2.
  # t=0, r=0: (1 + 1/1)/2 = 1.  t=1, r=2: (1/2 + 2/3)/2 = 7/12.  AP = (1 + 7/12)/2 = 19/24.
  gnd = [{"ok": [0, 3], "junk": [1]}]
  m, aps, _, _ = metrics.compute_map([[0, 1, 2, 3]], gnd)
  assert m == pytest.approx(19 / 24) and aps[0] == pytest.approx(19 / 24)
  # Without the junk entry the same list is [p, n, n, p]: t=1, r=3: (1/3 + 2/4)/2 = 5/12,
  # AP = (1 + 5/12)/2 = 17/24 (junk helps here because it pushed a positive down).
  m, _, _, _ = metrics.compute_map([[0, 1, 2, 3]], [{"ok": [0, 3]}])
  assert m == pytest.approx(17 / 24)


def test_ok_wins_over_junk():
  # Index 0 is in both lists, so it is a positive; index 1 is junk and is removed:
  # [j, p, n] -> [p, n], AP = 1.
  m, _, _, _ = metrics.compute_map([[1, 0, 2]], [{"ok": [0], "junk": [0, 1]}])
  assert m == pytest.approx(1.0)


def test_clipped_precision_at_k():
  # Junk-removed [p, n, p]: the last positive is at 1-based rank 3.
  # k=1: kq=1, 1 hit -> 1.  k=2: kq=2 -> 1/2.  k=3: kq=3 -> 2/3.
  # k=5: kq = min(3, 5) = 3 -> 2/3 (unclipped P@5 would be 2/5).
  _, _, mpk, prs = metrics.compute_map([[0, 1, 2, 3]], [{"ok": [0, 3], "junk": [1]}],
                                       kappas=(1, 2, 3, 5))
  np.testing.assert_allclose(prs[0], [1, 1 / 2, 2 / 3, 2 / 3])
  np.testing.assert_allclose(mpk, [1, 1 / 2, 2 / 3, 2 / 3])


def test_truncated_list_counts_missing_positives_as_misses():
  # Top-3 of a 10-image database: [n, p, n]; the other 2 positives are not listed.
  # t=0, r=1: (0/1 + 1/2)/2 = 1/4; AP = (1/4)/3 = 1/12.
  # Last listed positive at rank 2: P@1 = 0/1, P@5 = (kq=2) 1/2.
  gnd = [{"ok": [7, 8, 9]}, {"ok": [4, 5]}]
  ranks = [[0, 7, 1], [0, 1, 2]]  # query 1 has no positive in its list: AP = 0, P@k = 0.
  m, aps, mpk, prs = metrics.compute_map(ranks, gnd, kappas=(1, 5), n_db=10)
  np.testing.assert_allclose(aps, [1 / 12, 0.0])
  np.testing.assert_allclose(prs, [[0.0, 0.5], [0.0, 0.0]])
  assert m == pytest.approx(1 / 24)
  np.testing.assert_allclose(mpk, [0.0, 0.25])


def test_empty_queries_are_nan_excluded_and_reported():
  ranks = [[0, 1, 2], [0, 1, 2], [2, 1, 0]]
  gnd = [{"ok": [0]}, {"ok": [], "junk": [1]}, {"ok": [0]}]  # APs 1, NaN, (0 + 1/3)/2 = 1/6
  with pytest.warns(UserWarning, match=r"1 of 3 queries .*\[1\]"):
    m, aps, mpk, prs = metrics.compute_map(ranks, gnd, kappas=(1,))
  assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
  assert m == pytest.approx((1 + 1 / 6) / 2)
  # P@1: query 0 -> 1; query 2 -> kq = min(3, 1) = 1, 0 hits -> 0.
  np.testing.assert_allclose(mpk, [0.5])


def test_all_empty_queries_raise():
  with pytest.raises(ValueError, match="no positives"):
    metrics.compute_map([[0, 1], [1, 0]], [{"ok": []}, {"ok": [], "junk": [0]}])


# --------------------------------------------------------------------------- recall / hit rate


def test_recall_and_hit_rate_by_hand():
  # q0: ok {0, 3}, junk {1}: [0, 1, 2, 3] -> [p, n, p], positives at r = 0, 2.
  #     recall@1,3,4 = 1/2, 1, 1; hit@1,3,4 = 1, 1, 1.
  # q1: ok {2}: [3, 1, 0, 2], positive at r = 3. recall = hit = 0, 0, 1.
  ranks = [[0, 1, 2, 3], [3, 1, 0, 2]]
  gnd = [{"ok": [0, 3], "junk": [1]}, {"ok": [2]}]
  np.testing.assert_allclose(metrics.recall_at_k(ranks, gnd, (1, 3, 4)), [0.25, 0.5, 1.0])
  np.testing.assert_allclose(metrics.hit_rate_at_k(ranks, gnd, (1, 3, 4)), [0.5, 0.5, 1.0])


def test_recall_excludes_empty_queries():
  with pytest.warns(UserWarning, match="1 of 2"):
    r = metrics.recall_at_k([[0, 1], [1, 0]], [{"ok": [1]}, {"ok": []}], (1, 2))
  np.testing.assert_allclose(r, [0.0, 1.0])


# --------------------------------------------------------------------------- ground truth


TOY = [{"easy": [1, 2], "hard": [3], "junk": [4], "bbx": [0, 0, 10, 10]},
       {"easy": [], "hard": [5, 6], "junk": []}]


@pytest.mark.parametrize("protocol, ok, junk", [
    ("easy", [[1, 2], []], [[3, 4], [5, 6]]),
    ("medium", [[1, 2, 3], [5, 6]], [[4], []]),
    ("hard", [[3], [5, 6]], [[1, 2, 4], []]),
])
def test_revisited_gnd(protocol, ok, junk):
  out = metrics.revisited_gnd(TOY, protocol)
  assert [sorted(g["ok"].tolist()) for g in out] == ok
  assert [sorted(g["junk"].tolist()) for g in out] == junk
  assert out[0]["bbx"] == [0, 0, 10, 10] and "bbx" not in out[1]


def test_revisited_gnd_feeds_compute_map():
  # Hard protocol on query 0: ok {3}, junk {1, 2, 4}. Ranking [1, 3, 0, 2, 4, 5, 6]
  # -> junk removed [3, 0, 5, 6]: the hard positive is first, AP = 1.
  gnd = metrics.revisited_gnd(TOY[:1], "hard")
  m, _, _, _ = metrics.compute_map([[1, 3, 0, 2, 4, 5, 6]], gnd)
  assert m == pytest.approx(1.0)


def test_revisited_gnd_rejects_unknown_protocol():
  with pytest.raises(ValueError, match="protocol.*easy.*medium.*hard"):
    metrics.revisited_gnd(TOY, "extreme")


def test_original_gnd():
  out = metrics.original_gnd([{"good": [1], "ok": [2, 3], "junk": [4], "bbx": (1, 2, 3, 4)}])
  assert sorted(out[0]["ok"].tolist()) == [1, 2, 3]
  assert out[0]["junk"].tolist() == [4] and out[0]["bbx"] == (1, 2, 3, 4)
  with pytest.raises(ValueError, match=r"gnd\[0\].*'good'"):
    metrics.original_gnd([{"ok": [1], "junk": []}])


# --------------------------------------------------------------------------- Holidays


def test_holidays_query_is_excluded():
  # Query is database image 2, ranked first; its only relevant image is 1.
  # Raw list [q, 0, 1, 3]: positive at r = 2 -> AP = (0/2 + 1/3)/2 = 1/6.
  # With the query excluded: [0, 1, 3], positive at r = 1 -> AP = (0/1 + 1/2)/2 = 1/4.
  ranks, gnd = [[2, 0, 1, 3]], [{"ok": [1]}]
  assert metrics.compute_map(ranks, gnd)[0] == pytest.approx(1 / 6)
  assert metrics.holidays_map(ranks, gnd, [2]) == pytest.approx(1 / 4)
  # Even when the ground truth lists the query as relevant it neither helps nor hurts.
  assert metrics.holidays_map(ranks, [{"ok": [1, 2]}], [2]) == pytest.approx(1 / 4)


def test_exclude_query_gnd():
  out = metrics.exclude_query_gnd([{"ok": [1, 5], "junk": [3], "bbx": 0}, {"ok": [0]}], [5, 4])
  assert out[0]["ok"].tolist() == [1] and sorted(out[0]["junk"].tolist()) == [3, 5]
  assert out[0]["bbx"] == 0
  assert out[1]["ok"].tolist() == [0] and out[1]["junk"].tolist() == [4]
  with pytest.raises(ValueError, match="query_db_indices"):
    metrics.exclude_query_gnd([{"ok": [1]}], [0, 1])


# --------------------------------------------------------------------------- UKBench


LABELS = np.repeat(np.arange(3), 4)  # 3 objects x 4 images


def test_ukbench_perfect_ranking_scores_4():
  ranks = np.argsort(LABELS[None, :] != LABELS[:, None], axis=1, kind="stable")
  assert metrics.ukbench_ns_score(ranks, LABELS) == pytest.approx(4.0)


def test_ukbench_rotated_ranking():
  # Image i ranks i, i-1, i-2, ... (mod 12). Its top 4 {i, i-1, i-2, i-3} holds 1 + (i mod 4)
  # images of its own group, so N-S = (1 + 2 + 3 + 4)/4 = 2.5.
  i = np.arange(12)
  ranks = (i[:, None] - i[None, :]) % 12
  assert metrics.ukbench_ns_score(ranks, LABELS) == pytest.approx(2.5)
  # Only the top 4 matter: a truncated list gives the same score.
  assert metrics.ukbench_ns_score(ranks[:, :4], LABELS) == pytest.approx(2.5)


def test_ukbench_other_group_sizes():
  # A group of 5 and a singleton, ranked perfectly: 5 images see 4 of their group, the
  # singleton sees only itself: (5 * 4 + 1)/6 = 3.5.
  labels = np.array([0, 0, 0, 0, 0, 1])
  ranks = np.argsort(labels[None, :] != labels[:, None], axis=1, kind="stable")
  assert metrics.ukbench_ns_score(ranks, labels) == pytest.approx(3.5)


# --------------------------------------------------------------------------- bad input


GOOD_RANKS = [[0, 1, 2], [2, 1, 0]]
GOOD_GND = [{"ok": [0]}, {"ok": [1], "junk": [2]}]


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=[0, 1, 2]), r"ranks must be a 2-D"),
    (dict(ranks=[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), r"ranks must hold integer"),
    (dict(ranks=[[0, 1, 3], [2, 1, 0]]), r"ranks holds indices .*pass n_db"),
    (dict(ranks=[[0, -1, 2], [2, 1, 0]]), r"ranks holds indices"),
    (dict(ranks=[[0, 1, 1], [2, 1, 0]]), r"ranks must not repeat .*row 0"),
    (dict(ranks=[[0, 1], [1, 0]], n_db=1), r"n_db must be"),
    (dict(n_db=2.5), r"n_db must be"),
    (dict(gnd=GOOD_GND[:1]), r"gnd must have one entry per query"),
    (dict(gnd=[{"ok": [0]}, {"junk": [1]}]), r"gnd\[1\] must have a 'ok'"),
    (dict(gnd=[{"ok": [0]}, [1]]), r"gnd\[1\] must be a dict"),
    (dict(gnd=[{"ok": [3]}, {"ok": [1]}]), r"gnd\[0\]\['ok'\] holds indices"),
    (dict(gnd=[{"ok": [0]}, {"ok": [1], "junk": [7]}]), r"gnd\[1\]\['junk'\] holds indices"),
    (dict(gnd=[{"ok": [0.5]}, {"ok": [1]}]), r"gnd\[0\]\['ok'\] must hold integer"),
    (dict(kappas=(0, 5)), r"kappas must be .*positive integers"),
    (dict(kappas=(1.5,)), r"kappas must be .*positive integers"),
    (dict(kappas=(True,)), r"kappas must be .*positive integers"),
    (dict(kappas=()), r"kappas must be .*positive integers"),
])
def test_compute_map_rejects_bad_input(kwargs, match):
  args = dict(ranks=GOOD_RANKS, gnd=GOOD_GND, kappas=(1,))
  args.update(kwargs)
  n_db = args.pop("n_db", None)
  with pytest.raises(ValueError, match=match):
    metrics.compute_map(args["ranks"], args["gnd"], args["kappas"], n_db=n_db)


def test_truncated_list_with_n_db_is_accepted():
  m, _, _, _ = metrics.compute_map([[5, 0]], [{"ok": [0]}], n_db=6)
  assert m == pytest.approx((0 + 1 / 2) / 2)  # t=0, r=1


@pytest.mark.parametrize("fn", [metrics.recall_at_k, metrics.hit_rate_at_k])
def test_recall_rejects_bad_ks(fn):
  with pytest.raises(ValueError, match="ks must be"):
    fn(GOOD_RANKS, GOOD_GND, (0,))


ROTATED = (np.arange(12)[:, None] + np.arange(4)[None, :]) % 12  # valid [12, 4] top-4 lists


@pytest.mark.parametrize("ranks, labels, match", [
    (ROTATED, LABELS[:, None], r"labels must be a 1-D"),
    (ROTATED, LABELS.astype(float), r"labels must hold integer"),
    (ROTATED[:11], LABELS, r"ranks must have one row"),
    (np.tile(np.arange(3), (12, 1)), LABELS, r"ranks must list between 4"),
    (np.tile(np.arange(4), (12, 1)) + 9, LABELS, r"ranks holds indices"),
])
def test_ukbench_rejects_bad_input(ranks, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.ukbench_ns_score(ranks, labels)
