"""Losses against brute-force float64 numpy references written from the papers' equations.

Every reference loops over the batch in Python (pairs, tuples, all triplets of a labelled batch,
LRML's Algorithm 1 and NRA's Eqs. 2-8 step by step). Gradients are compared, in float64, with
central finite differences of those references.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import losses
from retrieval_jax.models.dlrtn_classifier import DLRTNClassifier

RTOL = 1e-5
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 3])  # class 3 has one sample: an anchor without positive


def _unit_rows(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _dist(a, b, squared=False):
  d2 = float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return d2 if squared else np.sqrt(d2)


def _fd_grad(f, x, h=1e-6):
  """Central finite differences of a scalar numpy function, in float64."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (f(up) - f(down)) / (2 * h)
  return grad


# ------------------------------------------------------------------------------------------------
# References (float64, explicit loops).


def np_contrastive(x1, x2, is_pos, margin, m1=0.0):
  out = []
  for a, b, s in zip(x1, x2, is_pos):
    d = _dist(a, b)
    out.append(0.5 * max(0.0, d - m1) ** 2 if s else 0.5 * max(0.0, margin - d) ** 2)
  return np.array(out)


def np_tuple_contrastive(tuples, margin):
  out = []
  for t in tuples:
    q, p, negs = t[0], t[1], t[2:]
    out.append(0.5 * _dist(q, p) ** 2 + sum(0.5 * max(0.0, margin - _dist(q, n)) ** 2
                                            for n in negs))
  return np.array(out)


def np_lrml(tuples, tau, ranks=None):
  """LRML Algorithm 1: Step 2 ranks the negatives by distance to the query (the real sequence),
  then each pair adds 0.5 D^2 (Y = 1) or 0.5 max(0, e^(a/n) tau - D)^2 (Y = 0)."""
  out = []
  for ti, t in enumerate(tuples):
    q, p, negs = t[0], t[1], t[2:]
    n = len(negs)
    d_neg = [_dist(q, x) for x in negs]
    if ranks is None:
      sequence = sorted(range(n), key=lambda j: (d_neg[j], j))  # closest first
      a = {j: rank for rank, j in enumerate(sequence)}
    else:
      a = {j: int(ranks[ti][j]) for j in range(n)}
    loss = 0.5 * _dist(q, p) ** 2
    for j in range(n):
      loss += 0.5 * max(0.0, np.exp(a[j] / n) * tau - d_neg[j]) ** 2
    out.append(loss)
  return np.array(out)


def np_triplet(a, p, n, margin, squared=True):
  return np.array([0.5 * max(0.0, margin + _dist(ai, pi, squared) - _dist(ai, ni, squared))
                   for ai, pi, ni in zip(a, p, n)])


def np_tuple_triplet(tuples, margin, squared=True):
  return np.array([sum(0.5 * max(0.0, margin + _dist(t[0], t[1], squared)
                                 - _dist(t[0], n, squared)) for n in t[2:]) for t in tuples])


def _triplets(labels, valid):
  b = len(labels)
  for a, p, n in itertools.product(range(b), repeat=3):
    if (valid[a] and valid[p] and valid[n] and p != a and labels[p] == labels[a]
        and labels[n] != labels[a]):
      yield a, p, n


def np_batch_hard(x, labels, margin, squared=True, valid=None):
  """Per anchor: the largest triplet loss over all of its (p, n) (the hinge is monotone, so this
  is the hardest positive against the hardest negative). Returns (per_anchor, has_triplet)."""
  valid = np.ones(len(x), bool) if valid is None else valid
  per, has = np.zeros(len(x)), np.zeros(len(x), bool)
  for a, p, n in _triplets(labels, valid):
    value = 0.5 * max(0.0, margin + _dist(x[a], x[p], squared) - _dist(x[a], x[n], squared))
    per[a] = max(per[a], value) if has[a] else value
    has[a] = True
  return per, has


def np_batch_all(x, labels, margin, squared=True, valid=None):
  valid = np.ones(len(x), bool) if valid is None else valid
  values = [0.5 * max(0.0, margin + _dist(x[a], x[p], squared) - _dist(x[a], x[n], squared))
            for a, p, n in _triplets(labels, valid)]
  return np.array(values)


def np_transfer(r, alpha):
  return 0.5 * (2 * r) ** alpha if r < 0.5 else 1 - 0.5 * (2 * (1 - r)) ** alpha


def np_nra(x, labels, alpha=4.0, eps=1e-4, valid=None):
  """NRA Eqs. 2-8 for each anchor; returns (per_anchor, counted)."""
  b = len(x)
  valid = np.ones(b, bool) if valid is None else valid
  per, counted = np.zeros(b), np.zeros(b, bool)
  for i in range(b):
    if not valid[i]:
      continue
    others = [j for j in range(b) if j != i and valid[j]]
    pos = [j for j in others if labels[j] == labels[i]]
    neg = [j for j in others if labels[j] != labels[i]]
    if not pos or not neg:
      continue
    d = {j: _dist(x[i], x[j]) for j in others}
    d_pos_max = max(d[j] for j in pos)  # Eq. 2
    d_neg_min = min(d[j] for j in neg)
    d_max, d_min = max(d.values()), min(d.values())  # Eq. 3
    if d_max > d_min:  # Eqs. 4-5
      r_pos = (d_pos_max - d_min) / (d_max - d_min)
      r_neg = (d_neg_min - d_min) / (d_max - d_min)
    else:  # documented degenerate row: all normalised ranks 0
      r_pos = r_neg = 0.0
    s_pos, s_neg = 1 - np_transfer(r_pos, alpha), 1 - np_transfer(r_neg, alpha)  # Eqs. 6-7
    per[i] = -(np.log(s_pos + eps) + np.log(1 - s_neg + eps))  # Eq. 8
    counted[i] = True
  return per, counted


def np_cross_entropy(logits, labels):
  out = []
  for z, y in zip(np.asarray(logits, np.float64), labels):
    z = z - z.max()
    log_p = z - np.log(np.sum(np.exp(z)))
    out.append(-log_p[y])
  return np.array(out)


def np_smooth_ap(x, labels, tau=0.01, valid=None):
  b = len(x)
  valid = np.ones(b, bool) if valid is None else valid
  x = np.asarray(x, np.float64)
  xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
  sim = xn @ xn.T
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  per, counted = np.zeros(b), np.zeros(b, bool)
  for q in range(b):
    if not valid[q]:
      continue
    omega = [j for j in range(b) if j != q and valid[j]]
    pos = [j for j in omega if labels[j] == labels[q]]
    if not pos:
      continue
    ap = 0.0
    for i in pos:
      r_pos = 1 + sum(sig((sim[q, j] - sim[q, i]) / tau) for j in pos if j != i)
      r_all = 1 + sum(sig((sim[q, j] - sim[q, i]) / tau) for j in omega if j != i)
      ap += r_pos / r_all
    per[q], counted[q] = 1 - ap / len(pos), True
  return per, counted



def _mean(per_item, counted=None):
  per_item = np.asarray(per_item, np.float64)
  counted = np.ones(per_item.shape, bool) if counted is None else counted
  return per_item[counted].sum() / max(counted.sum(), 1)


# ------------------------------------------------------------------------------------------------
# Compiled batteries. XLA compile time dominates this file on a small CPU, so each family of
# losses is compiled once (per dtype) as one function returning, for every loss, its "none",
# "sum" and "mean" values and the gradient of the mean; inputs that vary between tests (masks,
# labels, ranks) are arguments, not constants. Optimisation level 0 halves the compile time.

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _battery(loss_fns, primal, *args):
  out = {}
  for name, fn in loss_fns.items():
    mean, grad = jax.value_and_grad(lambda x, fn=fn: fn(x, *args, "mean"))(primal)
    out[name] = {"mean": mean, "grad": grad, "sum": fn(primal, *args, "sum"),
                 "none": fn(primal, *args, "none")}
  return out


@_jit
def _pairs(stack, logits, is_pos, labels, valid):
  """``stack [3, N, D]`` = (x1 / anchors, x2 / positives, negatives)."""
  fns = {
      "contrastive": lambda s, r: losses.contrastive_loss(s[0], s[1], is_pos, margin=1.3,
                                                          valid=valid, reduction=r),
      "double_margin": lambda s, r: losses.double_margin_contrastive_loss(
          s[0], s[1], is_pos, positive_margin=0.9, negative_margin=1.3, valid=valid,
          reduction=r),
      "triplet": lambda s, r: losses.triplet_loss(s[0], s[1], s[2], margin=0.75, valid=valid,
                                                  reduction=r),
      "triplet_euclidean": lambda s, r: losses.triplet_loss(s[0], s[1], s[2], margin=0.1,
                                                            squared=False, valid=valid,
                                                            reduction=r),
      "triplet_all_active": lambda s, r: losses.triplet_loss(s[0], s[1], s[2], margin=5.0,
                                                             valid=valid, reduction=r),
      "dlrtn": lambda s, r: losses.dlrtn_loss(s[0], s[1], s[2], s[3, :, :3], labels,
                                              valid=valid, reduction=r),
      "cross_entropy": lambda s, r: losses.softmax_cross_entropy(s[3] * 10, labels, valid=valid,
                                                                 reduction=r),
  }
  # Logits ride along as a fourth "row set" so one gradient covers descriptors and logits.
  return _battery({k: (lambda x, r, f=f: f(x, r)) for k, f in fns.items()},
                  jnp.concatenate([stack, logits[None]]))


@_jit
def _tuples(tuples, valid, ranks):
  fns = {
      "lrml": lambda t, r: losses.lrml_loss(t, tau=1.25, valid=valid, reduction=r),
      "lrml_given_ranks": lambda t, r: losses.lrml_loss(t, tau=1.25, negative_ranks=ranks,
                                                        valid=valid, reduction=r),
      "contrastive": lambda t, r: losses.tuple_contrastive_loss(t, margin=1.2, valid=valid,
                                                                reduction=r),
      "triplet": lambda t, r: losses.tuple_triplet_loss(t, margin=0.9, valid=valid, reduction=r),
      "triplet_euclidean": lambda t, r: losses.tuple_triplet_loss(t, margin=0.4, squared=False,
                                                                  valid=valid, reduction=r),
  }
  return _battery(fns, tuples)


LABEL_LOSSES = {
    "batch_hard": lambda x, y, v, r: losses.batch_hard_triplet_loss(x, y, margin=0.5, valid=v,
                                                                    reduction=r),
    "batch_hard_euclidean": lambda x, y, v, r: losses.batch_hard_triplet_loss(
        x, y, margin=0.5, squared=False, valid=v, reduction=r),
    "batch_all": lambda x, y, v, r: losses.batch_all_triplet_loss(x, y, margin=0.5, valid=v,
                                                                  reduction=r),
    "batch_all_euclidean": lambda x, y, v, r: losses.batch_all_triplet_loss(
        x, y, margin=0.5, squared=False, valid=v, reduction=r),
    "nra": lambda x, y, v, r: losses.nra_loss(x, y, valid=v, reduction=r),
    "nra_alpha_1.5": lambda x, y, v, r: losses.nra_loss(x, y, alpha=1.5, valid=v, reduction=r),
    "smooth_ap": lambda x, y, v, r: losses.smooth_ap_loss(x, y, temperature=0.1, valid=v,
                                                          reduction=r),
    "smooth_ap_sharp": lambda x, y, v, r: losses.smooth_ap_loss(x, y, temperature=1e-5,
                                                                valid=v, reduction=r),
}


@_jit
def _labelled(x, labels, valid):
  return _battery(LABEL_LOSSES, x, labels, valid)


def _label_references(x, labels, valid):
  """name -> (per-item reference, counted items, scalar reference function of x for FD)."""
  def per_anchor(fn, **kw):
    per, counted = fn(x, labels, valid=valid, **kw)
    return per, counted, lambda z: _mean(*fn(z, labels, valid=valid, **kw))

  def batch_all(squared):
    return (np_batch_all(x, labels, 0.5, squared, valid), None,
            lambda z: _mean(np_batch_all(z, labels, 0.5, squared, valid)))

  return {
      "batch_hard": per_anchor(np_batch_hard, margin=0.5),
      "batch_hard_euclidean": per_anchor(np_batch_hard, margin=0.5, squared=False),
      "batch_all": batch_all(True),
      "batch_all_euclidean": batch_all(False),
      "nra": per_anchor(np_nra),
      "nra_alpha_1.5": per_anchor(np_nra, alpha=1.5),
      "smooth_ap": per_anchor(np_smooth_ap, tau=0.1),
  }


def _f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def _run(battery, *args, x64: bool = True):
  """Runs a battery (in float64 by default) and returns numpy outputs."""
  with jax.enable_x64(x64):
    return jax.tree_util.tree_map(np.asarray, battery(*args))


# ------------------------------------------------------------------------------------------------
# Pairs, explicit triplets, DLRTN, cross-entropy.


@pytest.fixture
def pair_data(rng):
  stack = _unit_rows(rng, 3, 8, 4)  # x1 / anchors, x2 / positives, negatives
  logits = rng.normal(size=(8, 4)).astype(np.float32)
  is_pos = np.array([1, 0, 1, 0, 0, 1, 0, 1], bool)
  labels = np.array([0, 2, 1, 2, 0, 1, 1, 2])
  return stack, logits, is_pos, labels


def _pair_references(stack, logits, is_pos, labels):
  """name -> (per-item reference function of the [4, N, D] primal)."""
  return {
      "contrastive": lambda s: np_contrastive(s[0], s[1], is_pos, 1.3),
      "double_margin": lambda s: np_contrastive(s[0], s[1], is_pos, 1.3, m1=0.9),
      "triplet": lambda s: np_triplet(s[0], s[1], s[2], 0.75),
      "triplet_euclidean": lambda s: np_triplet(s[0], s[1], s[2], 0.1, squared=False),
      "triplet_all_active": lambda s: np_triplet(s[0], s[1], s[2], 5.0),
      "dlrtn": lambda s: np_triplet(s[0], s[1], s[2], 0.75)
      + 1.5 * np_cross_entropy(s[3, :, :3], labels),
      "cross_entropy": lambda s: np_cross_entropy(s[3] * 10, labels),
  }


@pytest.mark.parametrize("masked", [False, True])
def test_pair_and_triplet_losses_match_references_with_gradients(pair_data, masked):
  stack, logits, is_pos, labels = pair_data
  valid = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool) if masked else np.ones(8, bool)
  primal = np.concatenate([stack, logits[None]]).astype(np.float64)
  got = _run(_pairs, *_f64(stack, logits), is_pos, labels, valid)
  for name, reference in _pair_references(stack, logits, is_pos, labels).items():
    per = reference(primal)
    assert np.any(per[valid] > 0), name
    np.testing.assert_allclose(got[name]["none"], np.where(valid, per, 0.0), rtol=RTOL,
                               atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got[name]["sum"], per[valid].sum(), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["mean"], _mean(per, valid), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["grad"],
                               _fd_grad(lambda s, f=reference: _mean(f(s), valid), primal),
                               rtol=1e-5, atol=1e-7, err_msg=name)


def test_triplet_gradient_is_the_closed_form_of_dlrtn_eq_2(pair_data):
  stack, logits, is_pos, labels = pair_data
  got = _run(_pairs, *_f64(stack, logits), is_pos, labels, np.ones(8, bool))
  # Margin 5 > any squared-distance gap of unit rows (<= 4): every triplet is active, and the
  # gradient of the sum is n - p, p - q, q - n (Eq. 2 prints the last two with flipped signs).
  a, p, n = stack.astype(np.float64)
  np.testing.assert_allclose(got["triplet_all_active"]["grad"][:3] * 8, [n - p, p - a, a - n],
                             rtol=1e-6, atol=1e-7)


def test_dlrtn_loss_is_eq_5_with_batch_means(pair_data):
  stack, logits, is_pos, labels = pair_data
  got = _run(_pairs, *_f64(stack, logits), is_pos, labels, np.ones(8, bool))
  expected = (_mean(np_triplet(*stack, 0.75))
              + 1.5 * _mean(np_cross_entropy(logits[:, :3], labels)))
  np.testing.assert_allclose(got["dlrtn"]["mean"], expected, rtol=RTOL)


def test_pair_losses_at_zero_distance_are_finite_with_zero_gradient(pair_data):
  stack, logits, is_pos, labels = pair_data
  stack = stack.copy()
  stack[1] = stack[0]  # x2 = x1 (positives equal their anchors): every distance is 0
  got = _run(_pairs, *_f64(stack, logits), is_pos, labels, np.ones(8, bool))
  # Positives cost 0; negatives sit at the full margin with no direction to move along.
  for name in ("contrastive", "double_margin"):
    np.testing.assert_allclose(got[name]["mean"], 0.5 * 1.3**2 * (~is_pos).mean(), rtol=RTOL)
    np.testing.assert_array_equal(got[name]["grad"], 0.0)
  for name in ("triplet", "triplet_euclidean", "dlrtn"):
    assert np.all(np.isfinite(got[name]["grad"]))
  np.testing.assert_allclose(got["triplet_euclidean"]["none"],
                             np_triplet(*stack, 0.1, squared=False), rtol=RTOL, atol=1e-12)


def test_cross_entropy_with_probability_targets_and_large_logits(rng):
  logits = (rng.normal(size=(4, 3)) * 300).astype(np.float32)  # log-sum-exp path
  labels = np.array([0, 1, 2, 2])
  expected = np_cross_entropy(logits, labels)
  got = losses.softmax_cross_entropy(logits, np.eye(3, dtype=np.float32)[labels],
                                     reduction="none")
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-3)
  assert np.all(np.isfinite(got))


# ------------------------------------------------------------------------------------------------
# Tuples (cirtorch layout) and LRML.


@pytest.fixture
def tuples(rng):
  return _unit_rows(rng, 4, 2 + 5, 4)  # T = 4 tuples, k = 5 negatives, D = 4


def _tuple_references(ranks):
  return {
      "lrml": lambda t: np_lrml(t, 1.25),
      "lrml_given_ranks": lambda t: np_lrml(t, 1.25, ranks=ranks),
      "contrastive": lambda t: np_tuple_contrastive(t, 1.2),
      "triplet": lambda t: np_tuple_triplet(t, 0.9),
      "triplet_euclidean": lambda t: np_tuple_triplet(t, 0.4, squared=False),
  }


def _check_tuples(tuples, valid, ranks):
  got = _run(_tuples, tuples.astype(np.float64), valid, ranks)
  t64 = tuples.astype(np.float64)
  for name, reference in _tuple_references(ranks).items():
    per = reference(t64)
    np.testing.assert_allclose(got[name]["none"], np.where(valid, per, 0.0), rtol=RTOL,
                               atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got[name]["sum"], per[valid].sum(), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["mean"], _mean(per, valid), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["grad"],
                               _fd_grad(lambda t, f=reference: _mean(f(t), valid), t64),
                               rtol=1e-5, atol=1e-7, err_msg=name)
  return got


def test_tuple_losses_and_lrml_algorithm_1_match_references_with_gradients(tuples):
  d_neg = np.linalg.norm(tuples[:, 2:] - tuples[:, :1], axis=-1)
  online = np.argsort(np.argsort(d_neg, axis=1), axis=1)
  np.testing.assert_array_equal(losses.lrml_negative_ranks(d_neg), online)  # 0 = closest
  reversed_ranks = 4 - online
  for valid in (np.ones(4, bool), np.array([1, 0, 1, 1], bool)):
    got = _check_tuples(tuples, valid, reversed_ranks)
  # tau = 1.25 keeps every threshold active here, so the ranks matter.
  assert not np.allclose(got["lrml"]["none"], got["lrml_given_ranks"]["none"])


def test_lrml_ties_rank_the_lower_index_first():
  np.testing.assert_array_equal(losses.lrml_negative_ranks(np.array([[0.5, 0.2, 0.5, 0.2]])),
                                [[2, 0, 3, 1]])


def test_tuple_losses_with_zero_distances_match_references(tuples):
  t = tuples.copy()
  t[:, 1] = t[:, 0]  # every positive equals its query
  t[0, 2] = t[0, 0]  # and one negative too
  # Central differences are symmetric around the |x| kink at distance 0, which matches the
  # gradient-0 convention there.
  _check_tuples(t, np.ones(4, bool), np.tile(np.arange(5), (4, 1)))


# ------------------------------------------------------------------------------------------------
# Labelled batches: batch-hard, batch-all, NRA, Smooth-AP.


@pytest.fixture
def batch(rng):
  return _unit_rows(rng, len(LABELS), 4)


@pytest.mark.parametrize("valid", [np.ones(8, bool), np.array([1, 0, 1, 1, 1, 1, 0, 1], bool)],
                         ids=["full", "padded"])
def test_label_losses_match_enumeration_with_gradients(batch, valid):
  # The padded rows 1 and 6 have labels that would make them positives and negatives of others.
  x = batch.astype(np.float64)
  got = _run(_labelled, x, LABELS, valid)
  for name, (per, counted, scalar) in _label_references(x, LABELS, valid).items():
    if per.ndim == 1 and per.shape == (8,):
      np.testing.assert_allclose(got[name]["none"], np.where(counted, per, 0.0), rtol=RTOL,
                                 atol=1e-12, err_msg=name)
      np.testing.assert_allclose(got[name]["sum"], per[counted].sum(), rtol=RTOL, err_msg=name)
    else:  # batch-all: the enumerated triplets against the non-zero cells of [B, B, B]
      grid = np.asarray(got[name]["none"])
      assert grid.shape == (8, 8, 8)
      np.testing.assert_allclose(np.sort(grid[grid > 0]), np.sort(per[per > 0]), rtol=RTOL)
      np.testing.assert_allclose(got[name]["sum"], per.sum(), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["mean"], scalar(x), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(got[name]["grad"], _fd_grad(scalar, x), rtol=1e-5, atol=1e-7,
                               err_msg=name)
    np.testing.assert_array_equal(got[name]["grad"][~valid], 0.0)
  # The singleton class 3 has no positive: no triplet, no NRA term.
  assert got["batch_hard"]["none"][7] == 0.0 and got["nra"]["none"][7] == 0.0


def test_batch_hard_is_the_hardest_triplet_per_anchor(batch):
  x = batch.astype(np.float64)
  got = _run(_labelled, x, LABELS, np.ones(8, bool))
  dist = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
  for a in range(7):
    pos = [j for j in range(8) if LABELS[j] == LABELS[a] and j != a]
    neg = [j for j in range(8) if LABELS[j] != LABELS[a]]
    expected = 0.5 * max(0.0, 0.5 + max(dist[a, pos]) - min(dist[a, neg]))
    np.testing.assert_allclose(got["batch_hard"]["none"][a], expected, rtol=RTOL)


def test_nra_transfer_function_eq_7():
  r = np.array([0.0, 0.1, 0.3, 0.5, 0.6, 0.9, 1.0], np.float32)
  for alpha in (0.5, 1.0, 4.0):
    np.testing.assert_allclose(losses.nra_transfer(r, alpha), [np_transfer(v, alpha) for v in r],
                               rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(losses.nra_transfer(r, 1.0), r, atol=1e-7)  # alpha = 1: identity
  # alpha < 1: infinite slope at 0 and 1, taken as 0 there so gradients stay finite.
  grad = jax.grad(lambda v: jnp.sum(losses.nra_transfer(v, 0.5)))(r)
  assert np.all(np.isfinite(grad)) and grad[0] == 0.0 and grad[-1] == 0.0


def test_smooth_ap_tends_to_exact_average_precision(batch):
  got = _run(_labelled, batch.astype(np.float64), LABELS, np.ones(8, bool))
  sims = batch.astype(np.float64) @ batch.T.astype(np.float64)
  for q in range(7):
    order = [j for j in np.argsort(-sims[q]) if j != q]
    hits = np.array([LABELS[j] == LABELS[q] for j in order])
    exact_ap = np.mean([hits[:i + 1].mean() for i in np.flatnonzero(hits)])
    np.testing.assert_allclose(1 - got["smooth_ap_sharp"]["none"][q], exact_ap, rtol=1e-6)


def test_label_losses_when_each_class_collapses_to_a_point(batch):
  # "All positives equal": positive distances are exactly 0, and each class's copies tie as
  # negatives of the other anchors. Ties make the gradient per copy a convention (jnp.min and
  # jnp.max share it), but the gradient with respect to the class centre (all copies moving
  # together: the sum over copies) is defined. Compare that with central differences.
  centres = batch[[0, 3, 5, 7]].astype(np.float64)
  x = centres[LABELS]
  valid = np.ones(8, bool)
  got = _run(_labelled, x, LABELS, valid)
  for name, (_, _, scalar) in _label_references(x, LABELS, valid).items():
    np.testing.assert_allclose(got[name]["mean"], scalar(x), rtol=RTOL, atol=1e-12,
                               err_msg=name)
    grad_centres = np.zeros_like(centres)
    np.add.at(grad_centres, LABELS, np.asarray(got[name]["grad"]))
    np.testing.assert_allclose(grad_centres, _fd_grad(lambda c, f=scalar: f(c[LABELS]), centres),
                               rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_losses_on_a_fully_collapsed_batch(batch, dtype):
  # Every distance is 0 (in float32 the Gram expansion leaves rounding noise: snapped to 0).
  x = np.repeat(batch[:1] * 3.0, 8, axis=0).astype(dtype)
  got = _run(_labelled, x, LABELS, np.ones(8, bool), x64=dtype == np.float64)
  nra_row = -np.log(1 + 1e-4) - np.log(1e-4)  # documented: all normalised ranks 0
  np.testing.assert_allclose(np_nra(x, LABELS)[0][0], nra_row, rtol=1e-12)
  expected = {"batch_hard": 0.25, "batch_hard_euclidean": 0.25, "batch_all": 0.25,
              "batch_all_euclidean": 0.25, "nra": nra_row, "nra_alpha_1.5": nra_row}
  for name, out in got.items():
    assert np.isfinite(out["mean"]) and np.all(np.isfinite(out["grad"])), name
    if name in expected:
      np.testing.assert_allclose(out["mean"], expected[name], rtol=RTOL, err_msg=name)
      np.testing.assert_array_equal(out["grad"], 0.0, err_msg=name)


@pytest.mark.parametrize("labels", [np.zeros(8, int), np.arange(8)],
                         ids=["single_class", "all_singletons"])
def test_label_losses_without_any_triplet_are_zero(batch, labels):
  got = _run(_labelled, batch, labels.astype(LABELS.dtype), np.ones(8, bool), x64=False)
  for name, out in got.items():
    assert np.all(np.isfinite(out["grad"])), name
    if name.startswith("smooth_ap") and labels[1] == 0:
      # Only positives: every positive ranks above every negative, AP = 1.
      np.testing.assert_allclose(out["mean"], 0.0, atol=1e-6)
      continue
    assert float(out["mean"]) == 0.0 and float(out["sum"]) == 0.0, name
    np.testing.assert_array_equal(out["grad"], 0.0, err_msg=name)
  # A fully padded batch as well.
  got = _run(_labelled, batch, LABELS, np.zeros(8, bool), x64=False)
  assert all(float(out["mean"]) == 0.0 for out in got.values())


# ------------------------------------------------------------------------------------------------
# jit with traced hyper-parameters, validation.


def test_losses_compile_under_jit_with_traced_hyperparameters(batch, tuples, pair_data):
  stack, logits, is_pos, labels = pair_data

  @_jit
  def all_losses(x, t, s, margin, tau, alpha):
    return jnp.stack([
        losses.contrastive_loss(s[0], s[1], is_pos, margin=margin),
        losses.batch_hard_triplet_loss(x, LABELS, margin=margin),
        losses.batch_all_triplet_loss(x, LABELS, margin=margin),
        losses.nra_loss(x, LABELS, alpha=alpha),
        losses.lrml_loss(t, tau=tau),
        losses.tuple_triplet_loss(t, margin=margin),
        losses.dlrtn_loss(s[0], s[1], s[2], logits, labels, margin=margin),
    ])

  got = all_losses(batch, tuples, stack, 0.5, 1.25, 4.0)
  expected = [_mean(np_contrastive(stack[0], stack[1], is_pos, 0.5)),
              _mean(*np_batch_hard(batch, LABELS, 0.5)),
              _mean(np_batch_all(batch, LABELS, 0.5)),
              _mean(*np_nra(batch, LABELS)),
              _mean(np_lrml(tuples, 1.25)),
              _mean(np_tuple_triplet(tuples, 0.5)),
              _mean(np_triplet(*stack, 0.5) + 1.5 * np_cross_entropy(logits, labels))]
  np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_invalid_arguments_raise_value_errors_naming_them(batch, tuples, pair_data):
  (x1, x2, n), logits, is_pos, labels = pair_data
  cases = [
      ("margin", lambda: losses.contrastive_loss(x1, x2, is_pos, margin=-0.1)),
      ("negative_margin", lambda: losses.double_margin_contrastive_loss(
          x1, x2, is_pos, positive_margin=0.1, negative_margin=-1.0)),
      ("positive_margin", lambda: losses.double_margin_contrastive_loss(
          x1, x2, is_pos, positive_margin=-0.1, negative_margin=1.0)),
      ("is_positive", lambda: losses.contrastive_loss(x1, x2, is_pos[:3])),
      ("a and b", lambda: losses.contrastive_loss(x1, x2[:4], is_pos)),
      ("margin", lambda: losses.triplet_loss(x1, x2, n, margin=-1.0)),
      ("margin", lambda: losses.batch_hard_triplet_loss(batch, LABELS, margin=float("nan"))),
      ("negatives", lambda: losses.triplet_loss(x1, x2, n[:, :3])),
      ("valid", lambda: losses.triplet_loss(x1, x2, n, valid=np.ones(3, bool))),
      ("reduction", lambda: losses.triplet_loss(x1, x2, n, reduction="avg")),
      ("tau", lambda: losses.lrml_loss(tuples, tau=0.0)),
      ("negative_ranks", lambda: losses.lrml_loss(tuples, negative_ranks=np.zeros((4, 4), int))),
      ("tuples", lambda: losses.tuple_triplet_loss(tuples[:, :2])),
      ("tuples", lambda: losses.tuple_contrastive_loss(tuples[0])),
      ("alpha", lambda: losses.nra_loss(batch, LABELS, alpha=0.0)),
      ("alpha", lambda: losses.nra_transfer(0.5, alpha=-1.0)),
      ("eps", lambda: losses.nra_loss(batch, LABELS, eps=0.0)),
      ("labels", lambda: losses.batch_hard_triplet_loss(batch, LABELS[:5])),
      ("labels", lambda: losses.nra_loss(batch, LABELS.astype(float))),
      ("embeddings", lambda: losses.batch_all_triplet_loss(batch[0], LABELS)),
      ("valid", lambda: losses.smooth_ap_loss(batch, LABELS, valid=np.ones(9, bool))),
      ("temperature", lambda: losses.smooth_ap_loss(batch, LABELS, temperature=0.0)),
      ("labels", lambda: losses.softmax_cross_entropy(logits, np.arange(8))),
      ("labels", lambda: losses.softmax_cross_entropy(logits, np.zeros((8, 3)))),
      ("logits", lambda: losses.dlrtn_loss(x1, x2, n, logits[:5], labels)),
      ("classification_weight", lambda: losses.dlrtn_loss(x1, x2, n, logits, labels,
                                                          classification_weight=-1.0)),
  ]
  for name, call in cases:
    with pytest.raises(ValueError, match=name):
      call()


# ------------------------------------------------------------------------------------------------
# DLRTN classification sub-network.


def test_dlrtn_classifier_shares_stream_weights_and_feeds_dlrtn_loss(rng, pair_data):
  (a, p, n), _, _, labels = pair_data
  model = DLRTNClassifier(num_classes=3, stream_features=(8,), fused_features=(6,))
  params = _jit(model.init)(jax.random.key(0), a, p)["params"]
  assert set(params) == {"stream_0", "fused_0", "classifier"}  # one stream, shared by q and p
  assert params["stream_0"]["kernel"].shape == (4, 8)
  assert params["fused_0"]["kernel"].shape == (16, 6)

  def manual(q, d):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    dense = lambda v, layer: v @ np.asarray(params[layer]["kernel"]) + np.asarray(  # noqa: E731
        params[layer]["bias"])
    h = np.concatenate([relu(dense(q, "stream_0")), relu(dense(d, "stream_0"))], axis=1)
    return dense(relu(dense(h, "fused_0")), "classifier")

  @_jit
  def joint(params, q, d, neg):
    logits = model.apply({"params": params}, q, d)
    return jax.value_and_grad(
        lambda pr, q, d, neg: losses.dlrtn_loss(q, d, neg, model.apply({"params": pr}, q, d),
                                                labels), argnums=(0, 1, 2, 3))(
                                                    params, q, d, neg), logits

  (value, grads), logits = joint(params, a, p, n)
  np.testing.assert_allclose(logits, manual(a, p), rtol=1e-5, atol=1e-6)
  expected = _mean(np_triplet(a, p, n, 0.75) + 1.5 * np_cross_entropy(manual(a, p), labels))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert np.any(np.asarray(grads[0]["stream_0"]["kernel"]) != 0)

  # Feature maps are flattened; a plain linear classifier when no hidden layer is asked for.
  maps = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  linear = DLRTNClassifier(num_classes=5, stream_features=())
  variables = _jit(linear.init)(jax.random.key(1), maps, maps)
  assert variables["params"]["classifier"]["kernel"].shape == (36, 5)
  with pytest.raises(ValueError, match="same shape"):
    linear.apply(variables, maps, maps[:1])
