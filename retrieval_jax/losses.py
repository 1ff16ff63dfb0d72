"""Metric-learning and classification losses for fine-tuning retrieval networks.

Pure ``jax.numpy`` functions in the style of ``optax.losses``: jit-able, differentiable, no
state. Descriptors are rows (``[N, D]``, L2-normalised by the caller). Three input layouts:

- explicit pairs / triplets: ``x1, x2 [N, D]`` with ``is_positive [N]``, or
  ``anchors, positives, negatives [N, D]``;
- tuples as cirtorch builds them: ``tuples [T, 2 + k, D]`` = (query, positive, k negatives);
- labelled batches: ``embeddings [B, D]``, ``labels int [B]`` (class / landmark / cluster id);
  every pair, triplet or row is formed inside the batch.

Conventions shared by every loss:

- ``reduction``: ``"mean"`` (default) averages the per-item losses over the items that count,
  ``"sum"`` adds them, ``"none"`` returns them (items that do not count hold 0). Each docstring
  says what an item is (a pair, a tuple, an anchor, a triplet). A mean over zero items is 0,
  never NaN, so an empty or fully padded batch gives a zero loss and zero gradients.
- ``valid``: optional bool mask over the rows (``[N]``, ``[T]`` or ``[B]``). Padded rows of a
  static-shape batch (data-parallel steps) then neither count as items nor, in labelled
  batches, as anyone's positive or negative.
- Distances come from :mod:`retrieval_jax.distances`: the Euclidean distance has gradient 0
  (not NaN) at distance 0, so coincident descriptors (a collapsed batch, a positive equal to its
  query) give finite gradients. Paired distances are computed from differences (exactly 0 for
  equal rows); distances within a labelled batch from the Gram expansion
  (``||a||^2 + ||b||^2 - 2ab``, ``O(B^2)`` memory), whose rounding floor
  (``16 eps (||a||^2 + ||b||^2)`` in squared distance) is snapped to exactly 0.
- Margins and thresholds are in descriptor-distance units (for unit rows, ``D in [0, 2]``).
  Python-number hyper-parameters are checked (``ValueError`` naming the argument); traced ones
  under ``jax.jit`` are taken as given, as are all values (only shapes are checked there).

References:
  Survey: Chen et al., *Deep Image Retrieval: A Survey* (Eqs. 2.13, 2.16-2.19, Fig. 2.10).
  DLRTN: Min et al., *A Two-Stage Triplet Network Training Framework for Image Retrieval*,
  IEEE TMM (Eqs. 1, 3-5). REMAP: Husain, Bober, IEEE TIP (Eq. 2). LRML: Fan et al., *Image
  Retrieval Based on Learning to Rank and Multiple Loss*, Appl. Sci. 2019 (Eq. 1, Algorithm 1).
  NRA: Schall et al., *Deep Aggregation of Regional Convolutional Activations for Content Based
  Image Retrieval* (Eqs. 2-8). TriHard: Hermans, Beyer, Leibe, arXiv:1703.07737. Smooth-AP:
  Brown et al., ECCV 2020. cirtorch: Radenovic et al. (``ContrastiveLoss``, ``TripletLoss``).
  Conventions: DESIGN §4.5.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import check_ndim, is_concrete
from retrieval_jax.distances import (safe_sqrt, paired_euclidean, paired_squared_euclidean,
                                     pairwise_cosine_similarity, pairwise_squared_euclidean)

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")

CONTRASTIVE_MARGIN = 0.7  # cirtorch ContrastiveLoss default
TRIPLET_MARGIN = 0.1  # REMAP §IV (and cirtorch TripletLoss default)
DLRTN_MARGIN = 0.75  # DLRTN §IV-A
DLRTN_CLASSIFICATION_WEIGHT = 1.5  # DLRTN Eq. 5, lambda
LRML_TAU = 1.25  # LRML §4.2, VGG / ResNet (0.7 for AlexNet)
NRA_ALPHA = 4.0  # NRA §III-A
NRA_EPS = 1e-4  # NRA §III-A
SMOOTH_AP_TEMPERATURE = 0.01  # Smooth-AP default


# ----------------------------------------------------------------------------------------------
# Argument checks and reduction.


def _check_reduction(reduction: str) -> None:
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")


def _check_scalar(name: str, value, *, strictly_positive: bool) -> None:
  """Raises unless a concrete ``value`` is a finite scalar ``>= 0`` (``> 0`` if strict)."""
  if not is_concrete(value):
    return
  array = np.asarray(value)
  if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{name} must be a real scalar; got {value!r}.")
  bad = not np.isfinite(array) or (array <= 0 if strictly_positive else array < 0)
  if bad:
    want = "> 0" if strictly_positive else ">= 0"
    raise ValueError(f"{name} must be finite and {want}; got {value!r}.")


def _check_rows_mask(name: str, mask, n: int, layout: str) -> jax.Array | None:
  """Validates an optional per-row mask ``[n]`` and returns it as bool (or None)."""
  if mask is None:
    return None
  if tuple(np.shape(mask)) != (n,):
    raise ValueError(f"{name} must have shape {layout} = ({n},); got {tuple(np.shape(mask))}.")
  return jnp.asarray(mask).astype(bool)


def _check_labels(labels, n: int) -> jax.Array:
  if tuple(np.shape(labels)) != (n,):
    raise ValueError(
        f"labels must have shape [B] = ({n},) matching embeddings; got "
        f"{tuple(np.shape(labels))}.")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers (class ids); got dtype {labels.dtype}.")
  return labels


def _check_embeddings(embeddings) -> jax.Array:
  check_ndim("embeddings", embeddings, 2, "[B, D]")
  return jnp.asarray(embeddings)


def _check_tuples(tuples) -> jax.Array:
  check_ndim("tuples", tuples, 3, "[T, 2 + k, D] (query, positive, k negatives)")
  if np.shape(tuples)[1] < 3:
    raise ValueError(
        f"tuples must hold a query, a positive and at least one negative along axis 1 "
        f"([T, 2 + k, D], k >= 1); got shape {tuple(np.shape(tuples))}.")
  return jnp.asarray(tuples)


def _reduce(values: jax.Array, counts: jax.Array | None, reduction: Reduction) -> jax.Array:
  """Applies ``reduction`` to per-item ``values``; items where ``counts`` is False are zeroed
  and left out of the mean. A mean over no item is 0."""
  if counts is not None:
    values = jnp.where(counts, values, 0.0)
  if reduction == "none":
    return values
  total = jnp.sum(values)
  if reduction == "sum":
    return total
  n = values.size if counts is None else jnp.sum(counts)
  return total / jnp.maximum(n, 1).astype(total.dtype)


def _squared_hinge(x: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(jnp.maximum(x, 0.0))


# ----------------------------------------------------------------------------------------------
# Pair (Siamese) losses.


def contrastive_loss(x1, x2, is_positive, *, margin=CONTRASTIVE_MARGIN, valid=None,
                     reduction: Reduction = "mean") -> jax.Array:
  """Contrastive (Siamese) loss on explicit pairs (survey Eq. 2.16; Hadsell et al. 2006).

  For each pair ``(x1_i, x2_i)`` with Euclidean distance ``D_i``::

      l_i = 0.5 * D_i^2                  if is_positive_i
      l_i = 0.5 * max(0, margin - D_i)^2 otherwise

  This is DESIGN §4.5 and cirtorch's ``ContrastiveLoss`` (same 0.5 factors; cirtorch sums, i.e.
  ``reduction="sum"``). The survey prints Eq. 2.16 with ``D`` the *squared* distance (Eq. 2.14)
  and an unsquared hinge; the positive term is the same, the negative term here is the
  Hadsell/cirtorch one. At ``D = 0`` a negative pair has gradient 0 (no defined direction).

  Args:
    x1: float ``[N, D]``.
    x2: float ``[N, D]``.
    is_positive: bool (or 0/1) ``[N]``, True for a matching pair (``S = 1``).
    margin: ``>= 0``; negatives farther than it cost nothing.
    valid: optional bool ``[N]``; False pairs are ignored.
    reduction: over pairs: ``"mean"`` (over valid pairs), ``"sum"`` or ``"none"`` (``[N]``).

  Returns:
    Scalar, or ``[N]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("margin", margin, strictly_positive=False)
  return _pair_contrastive(x1, x2, is_positive, None, margin, valid, reduction)


def double_margin_contrastive_loss(x1, x2, is_positive, *, positive_margin, negative_margin,
                                   valid=None, reduction: Reduction = "mean") -> jax.Array:
  """Double-margin contrastive loss on explicit pairs (survey Eq. 2.19; Lin et al. 2015).

  Positives are pulled only while farther than ``positive_margin`` (m1), negatives pushed only
  while closer than ``negative_margin`` (m2), with Euclidean ``D_i``::

      l_i = 0.5 * max(0, D_i - m1)^2     if is_positive_i
      l_i = 0.5 * max(0, m2 - D_i)^2     otherwise

  Hinges are squared on the Euclidean distance, as in :func:`contrastive_loss` (DESIGN §4.5),
  so ``positive_margin = 0`` gives exactly :func:`contrastive_loss`. (The survey prints Eq. 2.19
  with the squared distance of Eq. 2.14 and unsquared hinges.)

  Args:
    x1: float ``[N, D]``.
    x2: float ``[N, D]``.
    is_positive: bool (or 0/1) ``[N]``.
    positive_margin: m1 ``>= 0``.
    negative_margin: m2 ``>= 0``.
    valid: optional bool ``[N]``; False pairs are ignored.
    reduction: over pairs: ``"mean"`` (over valid pairs), ``"sum"`` or ``"none"`` (``[N]``).

  Returns:
    Scalar, or ``[N]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("positive_margin", positive_margin, strictly_positive=False)
  _check_scalar("negative_margin", negative_margin, strictly_positive=False)
  return _pair_contrastive(x1, x2, is_positive, positive_margin, negative_margin, valid,
                           reduction)


def _pair_contrastive(x1, x2, is_positive, positive_margin, negative_margin, valid,
                      reduction) -> jax.Array:
  """Shared body of the pair losses; ``positive_margin=None`` is the plain contrastive term."""
  squared = paired_squared_euclidean(x1, x2)  # validates x1, x2
  n = squared.shape[0]
  if tuple(np.shape(is_positive)) != (n,):
    raise ValueError(
        f"is_positive must have shape [N] = ({n},); got {tuple(np.shape(is_positive))}.")
  is_positive = jnp.asarray(is_positive).astype(bool)
  valid = _check_rows_mask("valid", valid, n, "[N]")
  distance = paired_euclidean(x1, x2)
  # Without m1 the positive term is 0.5 * ||x1 - x2||^2 computed without the square root: its
  # gradient x1 - x2 is exact everywhere, including at D = 0.
  if positive_margin is None:
    positive = 0.5 * squared
  else:
    positive = _squared_hinge(distance - positive_margin)
  negative = _squared_hinge(negative_margin - distance)
  return _reduce(jnp.where(is_positive, positive, negative), valid, reduction)


def _tuple_distances(tuples: jax.Array, squared: bool) -> tuple[jax.Array, jax.Array]:
  """``(d(q, p) [T], d(q, n_j) [T, k])`` of tuples ``[T, 2 + k, D]``, from differences."""
  num, size, dim = tuples.shape
  query = jnp.broadcast_to(tuples[:, :1], (num, size - 1, dim)).reshape(-1, dim)
  others = tuples[:, 1:].reshape(-1, dim)
  distance = (paired_squared_euclidean if squared else paired_euclidean)(query, others)
  distance = distance.reshape(num, size - 1)
  return distance[:, 0], distance[:, 1:]


def tuple_contrastive_loss(tuples, *, margin=CONTRASTIVE_MARGIN, valid=None,
                           reduction: Reduction = "mean") -> jax.Array:
  """Contrastive loss on (query, positive, k negatives) tuples, as cirtorch trains GeM.

  Per tuple, the sum of :func:`contrastive_loss` over its ``1 + k`` pairs::

      l_t = 0.5 * D(q, p)^2 + sum_j 0.5 * max(0, margin - D(q, n_j))^2

  cirtorch's ``ContrastiveLoss`` over a batch of tuples equals ``reduction="sum"``.

  Args:
    tuples: float ``[T, 2 + k, D]``: query, positive, then ``k >= 1`` negatives.
    margin: ``>= 0``.
    valid: optional bool ``[T]``; False tuples are ignored.
    reduction: over tuples: ``"mean"`` (over valid tuples), ``"sum"`` or ``"none"`` (``[T]``).

  Returns:
    Scalar, or ``[T]`` for ``reduction="none"``.
  """
  _check_scalar("margin", margin, strictly_positive=False)
  return _ranked_contrastive(tuples, lambda d_neg: jnp.full_like(d_neg, margin), valid,
                             reduction)


def _ranked_contrastive(tuples, thresholds_fn, valid, reduction) -> jax.Array:
  _check_reduction(reduction)
  tuples = _check_tuples(tuples)
  valid = _check_rows_mask("valid", valid, tuples.shape[0], "[T]")
  squared_pos, _ = _tuple_distances(tuples, squared=True)
  _, d_neg = _tuple_distances(tuples, squared=False)
  thresholds = thresholds_fn(d_neg)
  per_tuple = 0.5 * squared_pos + jnp.sum(_squared_hinge(thresholds - d_neg), axis=1)
  return _reduce(per_tuple, valid, reduction)


def lrml_negative_ranks(negative_distances) -> jax.Array:
  """LRML's "real sequence": the rank of each negative by its distance to the query.

  Rank 0 is the closest (most similar) negative, ``k - 1`` the farthest (LRML §4.1.3, Fig. 5);
  ties go to the lower index (stable sort). Ranks carry no gradient.

  Args:
    negative_distances: float ``[T, k]``, distance of each tuple's query to its negatives.

  Returns:
    int32 ``[T, k]``, a permutation of ``0..k-1`` per row.
  """
  check_ndim("negative_distances", negative_distances, 2, "[T, k]")
  order = jnp.argsort(jax.lax.stop_gradient(jnp.asarray(negative_distances)), axis=1,
                      stable=True)
  return jnp.argsort(order, axis=1, stable=True).astype(jnp.int32)


def lrml_loss(tuples, *, tau=LRML_TAU, negative_ranks=None, valid=None,
              reduction: Reduction = "mean") -> jax.Array:
  """LRML ranked multiple loss (Fan et al. Eq. 1, Algorithm 1).

  A contrastive loss whose negative margin grows with the negative's rank: per tuple
  ``(q, p, n_1..n_k)`` with Euclidean ``D``::

      l_t = 0.5 * D(q, p)^2 + sum_j 0.5 * max(0, tau * exp(a_j / k) - D(q, n_j))^2

  where ``a_j`` in ``0..k-1`` is the rank of ``n_j`` among the tuple's negatives by distance to
  the query, closest first (the "real sequence", Algorithm 1 Step 2), and ``n = k`` is the
  number of negatives (the paper uses k = 5). By default the ranks are computed online from the
  current descriptors (:func:`lrml_negative_ranks`, no gradient through them); pass
  ``negative_ranks`` to use ranks mined elsewhere (e.g. on the whole training set). The
  thresholds ``tau * e^(a/k)`` run from ``tau`` to ``tau * e^((k-1)/k)``. Eq. 1 prints the
  threshold without ``tau``; Algorithm 1 and §4.4.1 scale it by ``tau`` (1.25 for VGG/ResNet).

  Args:
    tuples: float ``[T, 2 + k, D]``: query, positive, then ``k >= 1`` negatives.
    tau: ``> 0``, the base margin.
    negative_ranks: optional int ``[T, k]``, each row a permutation of ``0..k-1``.
    valid: optional bool ``[T]``; False tuples are ignored.
    reduction: over tuples: ``"mean"`` (over valid tuples), ``"sum"`` (Algorithm 1 sums over
      pairs) or ``"none"`` (``[T]``).

  Returns:
    Scalar, or ``[T]`` for ``reduction="none"``.
  """
  _check_scalar("tau", tau, strictly_positive=True)
  tuples = _check_tuples(tuples)
  num, k = tuples.shape[0], tuples.shape[1] - 2
  if negative_ranks is not None and tuple(np.shape(negative_ranks)) != (num, k):
    raise ValueError(
        f"negative_ranks must have shape [T, k] = ({num}, {k}); got "
        f"{tuple(np.shape(negative_ranks))}.")

  def thresholds(d_neg):
    ranks = lrml_negative_ranks(d_neg) if negative_ranks is None else negative_ranks
    return tau * jnp.exp(jnp.asarray(ranks).astype(d_neg.dtype) / k)

  return _ranked_contrastive(tuples, thresholds, valid, reduction)


# ----------------------------------------------------------------------------------------------
# Triplet losses.


def _triplet_hinge(d_ap: jax.Array, d_an: jax.Array, margin) -> jax.Array:
  return 0.5 * jnp.maximum(margin + d_ap - d_an, 0.0)


def triplet_loss(anchors, positives, negatives, *, margin=TRIPLET_MARGIN, squared: bool = True,
                 valid=None, reduction: Reduction = "mean") -> jax.Array:
  """Triplet ranking loss on explicit triplets (DLRTN Eq. 1, REMAP Eq. 2)::

      l_i = 0.5 * max(0, margin + ||a_i - p_i||^2 - ||a_i - n_i||^2)

  This is DESIGN §4.5 (squared distances, factor 0.5, as both papers print it). With
  ``squared=False`` the distances are Euclidean (Hermans et al.; survey Eq. 2.17 with a plain
  metric), the 0.5 kept. cirtorch's ``TripletLoss`` (no 0.5, sum) is ``2 x`` the ``"sum"``.

  Args:
    anchors: float ``[N, D]`` (queries).
    positives: float ``[N, D]``.
    negatives: float ``[N, D]``.
    margin: ``>= 0``, in the units of the distance used.
    squared: squared Euclidean distances (default) or Euclidean.
    valid: optional bool ``[N]``; False triplets are ignored.
    reduction: over triplets: ``"mean"`` (over valid triplets), ``"sum"`` or ``"none"``
      (``[N]``).

  Returns:
    Scalar, or ``[N]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("margin", margin, strictly_positive=False)
  check_ndim("anchors", anchors, 2, "[N, D]")
  for name, x in (("positives", positives), ("negatives", negatives)):
    if tuple(np.shape(x)) != tuple(np.shape(anchors)):
      raise ValueError(
          f"{name} must have the shape of anchors {tuple(np.shape(anchors))} ([N, D]); got "
          f"{tuple(np.shape(x))}.")
  distance = paired_squared_euclidean if squared else paired_euclidean
  per_triplet = _triplet_hinge(distance(anchors, positives), distance(anchors, negatives),
                               margin)
  valid = _check_rows_mask("valid", valid, per_triplet.shape[0], "[N]")
  return _reduce(per_triplet, valid, reduction)


def tuple_triplet_loss(tuples, *, margin=TRIPLET_MARGIN, squared: bool = True, valid=None,
                       reduction: Reduction = "mean") -> jax.Array:
  """Triplet loss on (query, positive, k negatives) tuples: the sum over the tuple's ``k``
  triplets ``(q, p, n_j)`` of :func:`triplet_loss`'s term::

      l_t = sum_j 0.5 * max(0, margin + ||q - p||^2 - ||q - n_j||^2)

  (cirtorch's ``TripletLoss`` layout; it sums without the 0.5.)

  Args:
    tuples: float ``[T, 2 + k, D]``: query, positive, then ``k >= 1`` negatives.
    margin: ``>= 0``.
    squared: squared Euclidean distances (default) or Euclidean.
    valid: optional bool ``[T]``; False tuples are ignored.
    reduction: over tuples: ``"mean"`` (over valid tuples), ``"sum"`` or ``"none"`` (``[T]``).

  Returns:
    Scalar, or ``[T]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("margin", margin, strictly_positive=False)
  tuples = _check_tuples(tuples)
  valid = _check_rows_mask("valid", valid, tuples.shape[0], "[T]")
  d_pos, d_neg = _tuple_distances(tuples, squared)
  per_tuple = jnp.sum(_triplet_hinge(d_pos[:, None], d_neg, margin), axis=1)
  return _reduce(per_tuple, valid, reduction)


def _batch_structure(embeddings, labels, valid):
  """Shared set-up of the labelled-batch losses.

  Returns ``(x [B, D], same [B, B], different [B, B], valid [B])``: ``same[i, j]`` when ``j``
  is a positive of anchor ``i`` (same label, ``j != i``, both valid), ``different[i, j]`` when
  a negative (different label, both valid).
  """
  x = _check_embeddings(embeddings)
  b = x.shape[0]
  labels = _check_labels(labels, b)
  valid = _check_rows_mask("valid", valid, b, "[B]")
  if valid is None:
    valid = jnp.ones((b,), bool)
  both = valid[:, None] & valid[None, :]
  equal = labels[:, None] == labels[None, :]
  same = equal & both & ~jnp.eye(b, dtype=bool)
  different = ~equal & both
  return x, same, different, valid


# Squared distances from the Gram expansion carry a rounding error of a few float eps times
# ||a||^2 + ||b||^2 (measured: <= 4 eps up to D = 2048). Below this floor they are noise, not
# distance; snapping them to 0 makes coincident rows exactly 0 apart under jit as well, so the
# degenerate-batch rules (zero gradient at zero distance, NRA's equal-distance rows) apply.
_GRAM_NOISE_EPS = 16


def _batch_distances(x: jax.Array, squared: bool) -> jax.Array:
  """All-pairs distances of a labelled batch, with the Gram rounding floor snapped to 0."""
  squared_distance = pairwise_squared_euclidean(x)
  norms = jnp.sum(x * x, axis=1)
  eps = jnp.finfo(squared_distance.dtype).eps
  floor = _GRAM_NOISE_EPS * eps * (norms[:, None] + norms[None, :])
  squared_distance = jnp.where(squared_distance > floor, squared_distance, 0.0)
  return squared_distance if squared else safe_sqrt(squared_distance)


def batch_hard_triplet_loss(embeddings, labels, *, margin=TRIPLET_MARGIN, squared: bool = True,
                            valid=None, reduction: Reduction = "mean") -> jax.Array:
  """Batch-hard triplet loss (TriHard; Hermans et al. 2017; survey Fig. 2.10, LRML §2).

  Each valid anchor ``i`` is paired with its hardest positive (farthest same-label row) and its
  hardest negative (closest other-label row) in the batch::

      l_i = 0.5 * max(0, margin + max_{p: y_p = y_i, p != i} d(i, p)
                                - min_{n: y_n != y_i} d(i, n))

  with ``d`` the squared (default, DESIGN §4.5) or plain Euclidean distance, as in
  :func:`triplet_loss`. Anchors without a valid positive (a class with one sample in the batch)
  or without a valid negative (a single-class batch) form no triplet: they are excluded from
  the mean and hold 0 in ``"none"``; a batch with no such anchor gives 0. Ties in the max/min
  share the gradient equally (``jnp.max``/``jnp.min``).

  Args:
    embeddings: float ``[B, D]``.
    labels: int ``[B]``.
    margin: ``>= 0``.
    squared: squared Euclidean distances (default) or Euclidean.
    valid: optional bool ``[B]``; padded rows are neither anchors, positives nor negatives.
    reduction: over anchors: ``"mean"`` (over anchors with a triplet), ``"sum"`` or ``"none"``
      (``[B]``).

  Returns:
    Scalar, or ``[B]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("margin", margin, strictly_positive=False)
  x, same, different, valid = _batch_structure(embeddings, labels, valid)
  distance = _batch_distances(x, squared)
  has_positive = jnp.any(same, axis=1)
  has_negative = jnp.any(different, axis=1)
  # Masked entries are filled with a constant, so they receive no gradient; rows with nothing to
  # pick are then replaced by 0 to keep infinities out of the arithmetic.
  hardest_positive = jnp.max(jnp.where(same, distance, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(different, distance, jnp.inf), axis=1)
  counts = valid & has_positive & has_negative
  hardest_positive = jnp.where(counts, hardest_positive, 0.0)
  hardest_negative = jnp.where(counts, hardest_negative, 0.0)
  return _reduce(_triplet_hinge(hardest_positive, hardest_negative, margin), counts, reduction)


def batch_all_triplet_loss(embeddings, labels, *, margin=TRIPLET_MARGIN, squared: bool = True,
                           valid=None, reduction: Reduction = "mean") -> jax.Array:
  """Triplet loss over all valid triplets of a labelled batch ("batch all", Hermans et al.).

  Every ``(a, p, n)`` with ``y_p = y_a``, ``p != a`` and ``y_n != y_a`` (all valid rows) is a
  triplet with :func:`triplet_loss`'s term
  ``0.5 * max(0, margin + d(a, p) - d(a, n))``. The mean is over all valid triplets, including
  those already satisfied (Hermans et al.'s "BA" variant; their "BA != 0" averages over the
  active ones only); a batch without triplets gives 0. Memory is ``O(B^3)``.

  Args:
    embeddings: float ``[B, D]``.
    labels: int ``[B]``.
    margin: ``>= 0``.
    squared: squared Euclidean distances (default) or Euclidean.
    valid: optional bool ``[B]``; padded rows take part in no triplet.
    reduction: over triplets: ``"mean"`` (over valid triplets), ``"sum"`` or ``"none"``
      (``[B, B, B]`` indexed ``(a, p, n)``, 0 where no triplet).

  Returns:
    Scalar, or ``[B, B, B]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("margin", margin, strictly_positive=False)
  x, same, different, _ = _batch_structure(embeddings, labels, valid)
  distance = _batch_distances(x, squared)
  triplets = same[:, :, None] & different[:, None, :]
  per_triplet = _triplet_hinge(distance[:, :, None], distance[:, None, :], margin)
  return _reduce(per_triplet, triplets, reduction)


# ----------------------------------------------------------------------------------------------
# Nonlinear rank approximation (NRA).


def nra_transfer(r, alpha=NRA_ALPHA) -> jax.Array:
  """NRA's transfer function ``w(r; alpha)`` on ``[0, 1]`` (Schall et al. Eqs. 6-7)::

      w(r) = 0.5 * (2 r)^alpha            for r in [0, 1/2)
      w(r) = 1 - 0.5 * (2 (1 - r))^alpha  for r in [1/2, 1]

  ``alpha`` sets the slope at ``r = 1/2``; ``w(0) = 0``, ``w(1/2) = 1/2``, ``w(1) = 1``. For
  ``alpha < 1`` the true derivative at ``r = 0`` and ``r = 1`` is infinite; it is taken as 0
  there so gradients stay finite (so is it for a traced ``alpha``, whose value is unknown when
  the function is traced; for a Python ``alpha >= 1`` the exact derivative is used).

  Args:
    r: float array of normalised ranks in ``[0, 1]``.
    alpha: ``> 0``.

  Returns:
    float array of the shape of ``r``.
  """
  _check_scalar("alpha", alpha, strictly_positive=True)
  r = jnp.asarray(r)
  lower = r < 0.5
  # Each branch's base lies in [0, 1] where the branch is selected; the other branch's base is
  # in [1, 2], away from the singular point, so the where below never mixes in an inf.
  base = jnp.where(lower, 2.0 * r, 2.0 * (1.0 - r))
  powered = _safe_power(base, alpha)
  return jnp.where(lower, 0.5 * powered, 1.0 - 0.5 * powered)


def _safe_power(base: jax.Array, exponent) -> jax.Array:
  """``base ** exponent`` for ``base >= 0`` with a finite gradient at ``base = 0``.

  For exponents ``>= 1`` ``jnp.power`` already has the right (finite) derivative at 0; below 1
  it is infinite, so 0 is kept away from ``jnp.power`` and the gradient there is 0.
  """
  if is_concrete(exponent) and float(exponent) >= 1.0:
    return jnp.power(base, exponent)
  positive = base > 0
  return jnp.where(positive, jnp.power(jnp.where(positive, base, 1.0), exponent), 0.0)


def nra_loss(embeddings, labels, *, alpha=NRA_ALPHA, eps=NRA_EPS, valid=None,
             reduction: Reduction = "mean") -> jax.Array:
  """Nonlinear rank approximation loss (Schall et al. Eqs. 2-8; DARAC's training loss).

  Meant for ``m = k x n`` batches (k classes, n samples each). For anchor ``i``, with Euclidean
  distances ``D_ij`` to every *other* valid row ``j != i`` ("the distances to all other feature
  vectors", §III-A):

  - Eq. 3: ``D_i,max = max_j D_ij``, ``D_i,min = min_j D_ij``;
  - Eq. 2: ``D+_i,max`` = max over positives (same label), ``D-_i,min`` = min over negatives;
  - Eqs. 4-5: ``r+ = (D+_i,max - D_i,min) / (D_i,max - D_i,min)``, ``r-`` likewise from
    ``D-_i,min``;
  - Eqs. 6-7: ``s = 1 - w(r; alpha)`` (:func:`nra_transfer`);
  - Eq. 8: ``l_i = -(log(s+ + eps) + log(1 - s- + eps))``; ``J`` is their mean.

  Degenerate cases: a row whose candidates are all at the same distance
  (``D_i,max = D_i,min``, e.g. a collapsed batch) has all normalised ranks 0, hence
  ``s+ = s- = 1`` and ``l_i = -log(1 + eps) - log(eps)`` (about 9.21, the largest value: the
  anchor cannot tell positives from negatives), with zero gradient through that row's ranks.
  Anchors without a positive or without a negative are excluded from the mean (0 in
  ``"none"``); a batch with none gives 0.

  Args:
    embeddings: float ``[B, D]`` (the paper trains on unnormalised DARAC outputs).
    labels: int ``[B]``.
    alpha: ``> 0``, the transfer-function slope (paper: 4).
    eps: ``> 0``, bounds each log term (paper: 1e-4).
    valid: optional bool ``[B]``; padded rows are neither anchors nor candidates.
    reduction: over anchors: ``"mean"`` (Eq. 8, over anchors with a positive and a negative),
      ``"sum"`` or ``"none"`` (``[B]``).

  Returns:
    Scalar, or ``[B]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("alpha", alpha, strictly_positive=True)
  _check_scalar("eps", eps, strictly_positive=True)
  x, same, different, valid = _batch_structure(embeddings, labels, valid)
  distance = _batch_distances(x, squared=False)
  candidate = same | different
  has_positive = jnp.any(same, axis=1)
  has_negative = jnp.any(different, axis=1)
  counts = valid & has_positive & has_negative

  def masked_max(mask):
    return jnp.where(counts, jnp.max(jnp.where(mask, distance, -jnp.inf), axis=1), 0.0)

  def masked_min(mask):
    return jnp.where(counts, jnp.min(jnp.where(mask, distance, jnp.inf), axis=1), 0.0)

  d_max, d_min = masked_max(candidate), masked_min(candidate)
  d_pos_max, d_neg_min = masked_max(same), masked_min(different)
  spread = d_max - d_min
  spread_ok = spread > 0
  # Double where: on rows with no spread the division never sees a zero denominator, so its
  # gradient is 0 there rather than NaN.
  denominator = jnp.where(spread_ok, spread, 1.0)
  r_pos = jnp.where(spread_ok, (d_pos_max - d_min) / denominator, 0.0)
  r_neg = jnp.where(spread_ok, (d_neg_min - d_min) / denominator, 0.0)
  s_pos = 1.0 - nra_transfer(r_pos, alpha)
  # 1 - s- is w(r-) itself: using it directly avoids the cancellation in 1 - (1 - w), which
  # loses most digits of small w in float32 (and XLA may reassociate it with + eps).
  per_anchor = -(jnp.log(s_pos + eps) + jnp.log(nra_transfer(r_neg, alpha) + eps))
  return _reduce(per_anchor, counts, reduction)


# ----------------------------------------------------------------------------------------------
# Classification and joint losses.


def softmax_cross_entropy(logits, labels, *, valid=None,
                          reduction: Reduction = "mean") -> jax.Array:
  """Softmax cross-entropy for classification fine-tuning (survey Eq. 2.13; DLRTN Eq. 4)::

      l_i = -sum_j y_ij * log softmax(logits_i)_j

  with ``y_i`` one-hot from an integer class id, or a given probability row. Computed with
  ``log_softmax`` (stable for large logits).

  Args:
    logits: float ``[N, C]``.
    labels: int ``[N]`` class ids in ``[0, C)``, or float ``[N, C]`` target probabilities.
    valid: optional bool ``[N]``; False rows are ignored.
    reduction: over rows: ``"mean"`` (over valid rows; DLRTN Eq. 4's ``1/N``), ``"sum"`` or
      ``"none"`` (``[N]``).

  Returns:
    Scalar, or ``[N]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  check_ndim("logits", logits, 2, "[N, C]")
  logits = jnp.asarray(logits)
  n, c = logits.shape
  log_p = jax.nn.log_softmax(logits, axis=-1)
  label_shape = tuple(np.shape(labels))
  label_dtype = jnp.asarray(labels).dtype
  if label_shape == (n,) and jnp.issubdtype(label_dtype, jnp.integer):
    if is_concrete(labels) and n and not np.all((np.asarray(labels) >= 0)
                                                & (np.asarray(labels) < c)):
      raise ValueError(f"labels must be class ids in [0, C = {c}); got {np.asarray(labels)}.")
    per_row = -jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None], axis=1)[:, 0]
  elif label_shape == (n, c):
    per_row = -jnp.sum(jnp.asarray(labels, log_p.dtype) * log_p, axis=1)
  else:
    raise ValueError(
        f"labels must be int [N] = ({n},) or float [N, C] = ({n}, {c}) matching logits; got "
        f"shape {label_shape} and dtype {label_dtype}.")
  valid = _check_rows_mask("valid", valid, n, "[N]")
  return _reduce(per_row, valid, reduction)


def dlrtn_loss(anchors, positives, negatives, logits, labels, *, margin=DLRTN_MARGIN,
               classification_weight=DLRTN_CLASSIFICATION_WEIGHT, valid=None,
               reduction: Reduction = "mean") -> jax.Array:
  """DLRTN joint loss (Min et al. Eq. 5): ``L = L_r + lambda * L_c``.

  Per triplet ``i``: ``l_i = triplet_i + lambda * ce_i`` where ``triplet_i`` is Eq. 1
  (:func:`triplet_loss`, squared distances, 0.5 factor) and ``ce_i`` is the softmax loss (Eqs.
  3-4, :func:`softmax_cross_entropy`) of the classification sub-network's ``logits`` for the
  pair ``[q, d+]_i`` (:class:`retrieval_jax.models.dlrtn_classifier.DLRTNClassifier`), whose
  class is the landmark / cluster id. With ``"mean"`` this is exactly Eq. 5 with both terms
  averaged over the batch. (Eq. 2's printed sub-gradients for ``d+`` and ``d-`` have their signs
  flipped; autodiff uses the correct ones, ``p - q`` and ``q - n``.)

  Args:
    anchors: float ``[N, D]`` (query descriptors ``q``).
    positives: float ``[N, D]`` (``d+``).
    negatives: float ``[N, D]`` (``d-``).
    logits: float ``[N, C]`` for the pairs ``[q, d+]``.
    labels: int ``[N]`` class ids (or float ``[N, C]`` probabilities).
    margin: triplet margin ``>= 0`` (paper: 0.75).
    classification_weight: lambda ``>= 0`` (paper: 1.5).
    valid: optional bool ``[N]``; False triplets are ignored.
    reduction: over triplets: ``"mean"`` (over valid triplets), ``"sum"`` or ``"none"``
      (``[N]``).

  Returns:
    Scalar, or ``[N]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("classification_weight", classification_weight, strictly_positive=False)
  ranking = triplet_loss(anchors, positives, negatives, margin=margin, reduction="none")
  n = ranking.shape[0]
  if np.shape(logits)[:1] != (n,):
    raise ValueError(
        f"logits must have shape [N, C] with N = {n} triplets; got {tuple(np.shape(logits))}.")
  classification = softmax_cross_entropy(logits, labels, reduction="none")
  valid = _check_rows_mask("valid", valid, n, "[N]")
  return _reduce(ranking + classification_weight * classification, valid, reduction)


# ----------------------------------------------------------------------------------------------
# Listwise.


def smooth_ap_loss(embeddings, labels, *, temperature=SMOOTH_AP_TEMPERATURE, valid=None,
                   reduction: Reduction = "mean") -> jax.Array:
  """Smooth-AP listwise loss (Brown et al. 2020; the sigmoid-relaxed AP of survey §2.4.1.2).

  Each valid row ``q`` ranks the other valid rows by cosine similarity ``s``; the rank of a
  positive ``i`` is relaxed with a sigmoid of temperature ``tau`` on similarity differences::

      R(i, S) = 1 + sum_{j in S, j != i} sigmoid((s_qj - s_qi) / tau)
      AP_q = 1/|P_q| sum_{i in P_q} R(i, P_q) / R(i, Omega_q)
      l_q = 1 - AP_q

  with ``P_q`` the positives (same label, ``!= q``) and ``Omega_q`` all other rows. As ``tau ->
  0`` ``AP_q`` tends to the exact average precision. Queries without a positive are excluded
  from the mean (0 in ``"none"``). Memory is ``O(B^3)``.

  Args:
    embeddings: float ``[B, D]``; similarities are cosines (``l2n`` rows, DESIGN §4.1).
    labels: int ``[B]``.
    temperature: ``> 0``.
    valid: optional bool ``[B]``; padded rows are neither queries nor ranked.
    reduction: over queries: ``"mean"`` (over queries with a positive), ``"sum"`` or
      ``"none"`` (``[B]``).

  Returns:
    Scalar, or ``[B]`` for ``reduction="none"``.
  """
  _check_reduction(reduction)
  _check_scalar("temperature", temperature, strictly_positive=True)
  x, same, different, valid = _batch_structure(embeddings, labels, valid)
  similarity = pairwise_cosine_similarity(x, x)
  others = same | different  # [q, j]
  # [q, i, j]: sigmoid((s_qj - s_qi) / tau), counted for j != i among q's ranked rows.
  b = x.shape[0]
  beats = jax.nn.sigmoid((similarity[:, None, :] - similarity[:, :, None]) / temperature)
  beats = jnp.where(~jnp.eye(b, dtype=bool)[None], beats, 0.0)
  rank_all = 1.0 + jnp.sum(jnp.where(others[:, None, :], beats, 0.0), axis=2)
  rank_pos = 1.0 + jnp.sum(jnp.where(same[:, None, :], beats, 0.0), axis=2)
  n_pos = jnp.sum(same, axis=1)
  precision = jnp.where(same, rank_pos / rank_all, 0.0)
  ap = jnp.sum(precision, axis=1) / jnp.maximum(n_pos, 1)
  counts = valid & (n_pos > 0)
  return _reduce(1.0 - ap, counts, reduction)


__all__ = [
    "Reduction", "batch_all_triplet_loss", "batch_hard_triplet_loss", "contrastive_loss",
    "dlrtn_loss", "double_margin_contrastive_loss", "lrml_loss", "lrml_negative_ranks",
    "nra_loss", "nra_transfer", "smooth_ap_loss", "softmax_cross_entropy",
    "triplet_loss", "tuple_contrastive_loss", "tuple_triplet_loss",
]
