"""KL-divergence region weights (REMAP's "region entropy", Husain & Bober, IEEE TIP, §III-B).

REMAP weights every region of its R-MAC-style grid by how well the region alone separates
matching from non-matching image pairs. With the *frozen* (off-the-shelf) network, for each region
``r`` (and each layer, one call per layer):

1. every image of a labelled pair gives the region's max-pooled vector; it is L2-normalised (the
   ``L2(zeta(o))`` of §III-B, so distances lie in ``[0, 2]``);
2. ``y = ||l2n(a_r) - l2n(b_r)||_2`` for every pair; ``Pr(y|m)`` and ``Pr(y|n)`` are the densities
   of ``y`` over matching and non-matching pairs (§III-B steps (1)-(3), Fig. 2 (a)-(e));
3. the region's weight is the KL divergence between the two densities (Fig. 2 (f)): regions with
   well separated distributions carry identity information and get large weights.

Direction: ``KL(Pr(y|m) || Pr(y|n))``. The paper never writes the formula; its footnote 1 defines
region entropy as "the relative entropy between the distributions of distances for matching and
non-matching image pairs", i.e. ``D(P_match || P_nonmatch)`` in the usual reading of "relative
entropy of A with respect to B".

Density estimate (not given in the paper; Fig. 2 shows histograms): a histogram per region with
``bins`` (default 64) equal-width bins over the region's shared range ``[min, max]`` of both
samples, and additive smoothing of the bin probabilities,
``p_k = (count_k / n + eps) / (1 + bins * eps)`` with ``eps = smoothing`` (default 1e-6), so
both distributions are strictly positive and the KL is finite (at most
``log((1 + bins eps) / eps)``, 13.8 nats by default; a larger ``eps`` trades accuracy in sparse
tails for a smaller range). Smoothing the probabilities rather than the counts (Laplace) treats
both samples alike whatever their sizes, so identical histograms give exactly 0. The bin width
cancels in the ratio, so the discrete KL estimates the continuous one (binning can only lower
it); with few pairs per bin, sampling noise biases it upward for every region alike (by roughly
``(bins - 1) / (2 n)`` nats), which leaves the ranking of regions intact.

This is host-side numpy: users run it once, on their own pairs, and store the result
(:func:`save_weights` / :func:`load_weights`);
:func:`retrieval_jax.models.remap.remap_init_from_data` puts it into a ``RemapHead``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import numpy as np

from retrieval_jax._atomic import write_atomic

DEFAULT_BINS = 64
DEFAULT_SMOOTHING = 1e-6
_L2_EPS = 1e-6  # DESIGN §4.1: l2n(v) = v / (||v|| + 1e-6)
Normalization = Literal["none", "mean", "max", "sum"]
_NORMALIZATIONS = ("none", "mean", "max", "sum")


def _host_array(name: str, x, ndim: int, layout: str) -> np.ndarray:
  """A finite float64 host copy of ``x`` with ``ndim`` dimensions, or ``ValueError``."""
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a numeric array {layout}; got {type(x).__name__}.") from err
  if arr.ndim != ndim:
    raise ValueError(f"{name} must be a {ndim}-D array {layout}; got shape {arr.shape}.")
  if not np.isfinite(arr).all():
    raise ValueError(f"{name} must be finite; it has {int((~np.isfinite(arr)).sum())} NaN/inf "
                     "value(s).")
  return arr


def _check_bins_smoothing(bins, smoothing) -> tuple[int, float]:
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
    raise ValueError(f"bins must be an integer >= 2; got {bins!r}.")
  if isinstance(smoothing, bool) or not np.isscalar(smoothing) or not (
      np.isfinite(smoothing) and smoothing > 0):
    raise ValueError(
        f"smoothing must be a finite number > 0 (probability added to every bin; 0 would make "
        f"the KL infinite for empty bins); got {smoothing!r}.")
  return int(bins), float(smoothing)


def _histograms(values: np.ndarray, lo: np.ndarray, width: np.ndarray, bins: int) -> np.ndarray:
  """Counts ``[R, bins]`` of the columns of ``values [n, R]`` on per-column equal-width bins.

  Bin ``k`` of column ``r`` is ``[lo_r + k w_r, lo_r + (k + 1) w_r)``, the last one closed (as
  ``np.histogram``). One ``bincount`` over flat ``r * bins + k`` indices counts every column at
  once.
  """
  regions = values.shape[1]
  index = np.floor((values - lo) / width * bins)
  index = np.clip(index, 0, bins - 1).astype(np.int64)  # the maximum lands in the last bin
  flat = index + np.arange(regions)[None, :] * bins
  return np.bincount(flat.ravel(), minlength=regions * bins).reshape(regions, bins)


def region_kl_divergence(matching_distances, non_matching_distances, bins: int = DEFAULT_BINS,
                         smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
  """Per-region ``KL(P_match || P_nonmatch)`` of pair distances (REMAP §III-B, Fig. 2).

  For each region (column) ``r``: both samples are histogrammed on the same ``bins`` equal-width
  bins spanning ``[min, max]`` of the two columns together; bin probabilities are smoothed as
  ``p_k = (c_k / n + eps) / (1 + bins eps)``, ``eps = smoothing``; then
  ``KL = sum_k p_k log(p_k / q_k)`` in nats. Identical histograms (e.g. a region whose distances
  are all equal) give exactly 0.

  Args:
    matching_distances: float ``[n_pos, R]``, distances of matching pairs, ``n_pos >= 1``.
    non_matching_distances: float ``[n_neg, R]``, distances of non-matching pairs, ``n_neg >= 1``.
    bins: number of histogram bins (>= 2), default 64.
    smoothing: probability ``eps > 0`` added to every bin before renormalising, default 1e-6.

  Returns:
    float64 ``[R]``, each ``>= 0``.

  Raises:
    ValueError: non-2-D, empty or non-finite inputs, different ``R``, bad ``bins`` or
      ``smoothing``.
  """
  bins, smoothing = _check_bins_smoothing(bins, smoothing)
  match = _host_array("matching_distances", matching_distances, 2, "[n_pos, R]")
  non_match = _host_array("non_matching_distances", non_matching_distances, 2, "[n_neg, R]")
  if match.shape[0] < 1:
    raise ValueError("matching_distances must hold at least one pair (row); got none.")
  if non_match.shape[0] < 1:
    raise ValueError("non_matching_distances must hold at least one pair (row); got none.")
  if match.shape[1] != non_match.shape[1]:
    raise ValueError(
        f"matching_distances and non_matching_distances must have the same number of regions "
        f"R (columns); got {match.shape} and {non_match.shape}.")
  lo = np.minimum(match.min(0), non_match.min(0))
  hi = np.maximum(match.max(0), non_match.max(0))
  # A constant column has zero range: any positive width puts everything in bin 0.
  width = np.where(hi > lo, hi - lo, 1.0)
  p = _histograms(match, lo, width, bins) / match.shape[0] + smoothing
  q = _histograms(non_match, lo, width, bins) / non_match.shape[0] + smoothing
  p /= 1.0 + bins * smoothing
  q /= 1.0 + bins * smoothing
  kl = np.sum(p * (np.log(p) - np.log(q)), axis=1)
  # Gibbs' inequality makes it >= 0; rounding can leave -1e-17 on identical histograms.
  return np.maximum(kl, 0.0)


def region_pair_distances(region_descriptors_a, region_descriptors_b) -> np.ndarray:
  """``||l2n(a_{i,r}) - l2n(b_{i,r})||_2`` for every pair ``i`` and region ``r``.

  Args:
    region_descriptors_a: float ``[N, R, D]`` region vectors (e.g. max-pooled, as REMAP's ROI
      block gives them) of the first image of each pair.
    region_descriptors_b: float ``[N, R, D]`` of the second image.

  Returns:
    float64 ``[N, R]`` in ``[0, 2]``.
  """
  a = _host_array("region_descriptors_a", region_descriptors_a, 3, "[N, R, D]")
  b = _host_array("region_descriptors_b", region_descriptors_b, 3, "[N, R, D]")
  if a.shape != b.shape:
    raise ValueError(
        f"region_descriptors_a and region_descriptors_b must have the same shape [N, R, D]; got "
        f"{a.shape} and {b.shape}.")
  a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + _L2_EPS)
  b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + _L2_EPS)
  return np.linalg.norm(a - b, axis=-1)


def estimate_region_weights(region_descriptors_a, region_descriptors_b, same,
                            bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING,
                            normalize: Normalization = "none") -> np.ndarray:
  """REMAP's KL-divergence initial weights of the regions of one layer (§III-B).

  Distances of L2-normalised region vectors (:func:`region_pair_distances`) split into matching
  (``same``) and non-matching pairs, then :func:`region_kl_divergence` per region.

  Normalisation: REMAP initialises the weights with the KL values themselves ("the
  KL-divergence values for each region (Figure 2(f)) are used to initialize the ROI weight
  vector"), so the default is ``"none"``; that also keeps the relative scale of the layers in a
  multi-layer head. ``"mean"`` rescales to mean 1 (the total weight of R-MAC's all-ones
  ``alpha``), ``"max"`` to maximum 1, ``"sum"`` to sum 1; an all-zero result stays zero.

  Args:
    region_descriptors_a: float ``[N, R, D]``, pair ``i``'s first image, computed with the
      frozen network.
    region_descriptors_b: float ``[N, R, D]``, pair ``i``'s second image.
    same: bool ``[N]``, True for matching pairs; both kinds must occur.
    bins: histogram bins (default 64).
    smoothing: probability added to every bin (default 1e-6).
    normalize: ``"none"`` (paper), ``"mean"``, ``"max"`` or ``"sum"``.

  Returns:
    float64 ``[R]``, non-negative.
  """
  if normalize not in _NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {_NORMALIZATIONS}; got {normalize!r}.")
  distances = region_pair_distances(region_descriptors_a, region_descriptors_b)
  same_arr = np.asarray(same)
  if same_arr.shape != (distances.shape[0],) or same_arr.dtype != np.bool_:
    raise ValueError(
        f"same must be a bool array [N] with N = {distances.shape[0]} (one flag per pair); got "
        f"dtype {same_arr.dtype} and shape {same_arr.shape}.")
  if same_arr.all() or not same_arr.any():
    raise ValueError(
        f"same must mark both matching (True) and non-matching (False) pairs; got "
        f"{int(same_arr.sum())} matching of {same_arr.size}.")
  weights = region_kl_divergence(distances[same_arr], distances[~same_arr], bins, smoothing)
  if normalize == "none":
    return weights
  total = {"mean": np.mean, "max": np.max, "sum": np.sum}[normalize](weights)
  return weights / total if total > 0 else weights


def save_weights(path: str | os.PathLike, weights: Mapping[str, np.ndarray]) -> None:
  """Writes named weight vectors (e.g. ``{"klw_0": w0, "klw_1": w1}``) to an ``.npz`` file.

  The file is written to a temporary name in the same directory and renamed over ``path``
  (atomic on POSIX), so a reader never sees a partial file.

  Args:
    path: destination, conventionally ending in ``.npz`` (used as given).
    weights: name -> array; names must be non-empty strings.
  """
  if not isinstance(weights, Mapping) or not weights:
    raise ValueError(f"weights must be a non-empty mapping name -> array; got "
                     f"{type(weights).__name__}.")
  arrays = {}
  for name, value in weights.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"weights keys must be non-empty strings; got {name!r}.")
    arrays[name] = np.asarray(value)
  write_atomic(path, lambda f: np.savez(f, **arrays))


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the mapping written by :func:`save_weights` (no pickled objects are loaded)."""
  with np.load(os.fspath(path), allow_pickle=False) as data:
    return {name: data[name] for name in data.files}
