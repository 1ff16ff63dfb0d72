"""Global and regional pooling of convolutional feature maps (NHWC).

Every function takes an optional validity ``mask`` ``[B, H, W]`` (True = real cell). A batch
padded to a shape bucket then pools exactly as its unpadded images would: padded cells never
enter a maximum, a mean or a region. Padding is expected at the bottom and right (images
top-left aligned in the bucket), which is what :func:`rmac` assumes when it recovers each image's
own map size from the mask.

References:
  MAC: Tolias et al., ICLR 2016; Razavian et al. 2016. SPoC: Babenko, Lempitsky, ICCV 2015.
  GeM: Radenovic, Tolias, Chum, TPAMI 2018 (LRML §3.1 uses it; survey Eq. 2.6).
  R-MAC: Tolias et al., ICLR 2016; DLRTN §III-B; REMAP §III-B (ROI pooling on the grid).
  Conventions: DESIGN §4.1.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import check_ndim
from retrieval_jax.normalization import l2n
from retrieval_jax.regions import check_regions, region_indicators, rmac_grid_regions

GEM_EPS = 1e-6
PoolMethod = Literal["max", "avg", "gem"]
_METHODS = ("max", "avg", "gem")


def _check_map(x, mask) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  check_ndim("x", x, 4, "[B, H, W, C] (NHWC feature map)")
  x = jnp.asarray(x)
  if mask is None:
    return x, None
  if np.shape(mask) != x.shape[:3]:
    raise ValueError(
        f"mask must have shape [B, H, W] = {x.shape[:3]} matching x {x.shape}; got shape "
        f"{tuple(np.shape(mask))}.")
  return x, jnp.asarray(mask, dtype=bool)


def _gem_power(x: jnp.ndarray, p, eps: float) -> jnp.ndarray:
  return jnp.power(jnp.maximum(x, eps), jnp.asarray(p, x.dtype))


def _gem_root(mean: jnp.ndarray, p) -> jnp.ndarray:
  return jnp.power(mean, 1.0 / jnp.asarray(p, mean.dtype))


def _row_range_max(values: jnp.ndarray, regions: jnp.ndarray) -> jnp.ndarray:
  """Maximum over each region's rows, for every column: ``[B,H,W,C] -> [B,R,W,C]``.

  A sparse table of maxima over row windows of length 1, 2, 4, ... (``log2 H`` shifted maxima)
  answers any row range as the max of two overlapping power-of-two windows. This costs about
  ``(log2 H) H W C + 2 R W C`` instead of the ``R H W C`` of masking every region, and it works
  for traced (per-image) regions, since the lookup is a row gather.
  """
  batch, height, width, channels = values.shape
  levels = [values]  # level k: max of rows i .. i + 2^k - 1, for the H - 2^k + 1 valid starts
  span = 1
  while 2 * span <= height:
    levels.append(jnp.maximum(levels[-1][:, :-span], levels[-1][:, span:]))
    span *= 2
  offsets = jnp.asarray(np.cumsum([0] + [lv.shape[1] for lv in levels[:-1]]))
  table = jnp.concatenate(levels, axis=1)  # [B, S, W, C], levels stacked along rows
  table = table.reshape(batch * table.shape[1], width * channels)
  y, h = regions[..., 1], regions[..., 3]
  level = jnp.sum(h[..., None] >= 2 ** jnp.arange(1, len(levels)), axis=-1)  # floor(log2 h)
  base = offsets[level] + jnp.arange(batch)[:, None] * (table.shape[0] // batch)  # [B, R]
  first = jnp.take(table, (base + y).reshape(-1), axis=0)
  second = jnp.take(table, (base + y + h - 2**level).reshape(-1), axis=0)
  return jnp.maximum(first, second).reshape(batch, -1, width, channels)

def mac(x, mask=None) -> jnp.ndarray:
  """Maximum activation of convolutions: the spatial max per channel.

  Args:
    x: float ``[B, H, W, C]``.
    mask: optional bool ``[B, H, W]``; the max runs over valid cells only (an image with no valid
      cell gives 0).

  Returns:
    ``[B, C]``, unnormalised.
  """
  x, mask = _check_map(x, mask)
  if mask is None:
    return jnp.max(x, axis=(1, 2))
  pooled = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=(1, 2))
  return jnp.where(jnp.any(mask, axis=(1, 2))[:, None], pooled, 0.0).astype(x.dtype)


def spoc(x, mask=None) -> jnp.ndarray:
  """Sum-pooled convolutional features, as the spatial mean per channel.

  The mean (not the sum) keeps the scale independent of the image size; after the L2
  normalisation every pipeline applies, the two are identical.

  Args:
    x: float ``[B, H, W, C]``.
    mask: optional bool ``[B, H, W]``; the mean runs over valid cells only.

  Returns:
    ``[B, C]``, unnormalised.
  """
  x, mask = _check_map(x, mask)
  if mask is None:
    return jnp.mean(x, axis=(1, 2))
  weights = mask[..., None].astype(x.dtype)
  count = jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
  return jnp.sum(x * weights, axis=(1, 2)) / count


def gem(x, p=3.0, eps: float = GEM_EPS, mask=None) -> jnp.ndarray:
  """Generalized-mean pooling: ``(mean_{H,W} max(x, eps)^p)^(1/p)`` per channel.

  ``p = 1`` is SPoC (on non-negative maps) and ``p -> inf`` tends to MAC. The papers learn ``p``
  (LRML reports p ~ 2.32 after fine-tuning; DLRTN's regional variant ~ 2.7).

  Args:
    x: float ``[B, H, W, C]``, typically post-ReLU.
    p: the exponent, a scalar or one per channel ``[C]`` (may be a traced parameter).
    eps: activations are clamped to at least ``eps`` before the power (DESIGN §4.1).
    mask: optional bool ``[B, H, W]``; the mean runs over valid cells only.

  Returns:
    ``[B, C]``, unnormalised.
  """
  x, mask = _check_map(x, mask)
  return _gem_root(spoc(_gem_power(x, p, eps), mask), p)


def regional_pool(x, regions, method: PoolMethod = "max", p=3.0, eps: float = GEM_EPS,
                  mask=None) -> jnp.ndarray:
  """Pools every region of a list in one vectorised program.

  Membership is separable (rows x columns), so sums are two contractions with 0/1 indicator
  matrices, ``[R,H] x [B,H,W,C] -> [B,R,W,C]`` then over W, and maxima two masked reductions: no
  loop over regions and no ``[B, R, H, W, C]`` mask in memory beyond what XLA fuses.

  Args:
    x: float ``[B, H, W, C]``.
    regions: int ``[R, 4]`` (the same regions for every image, e.g. an R-MAC grid) or
      ``[B, R, 4]`` (per image, e.g. proposals), rows ``(x, y, w, h)`` in cells.
    method: ``"max"`` (R-MAC / REMAP ROI pooling), ``"avg"`` or ``"gem"`` (R-GAC, DLRTN Eq. 9).
    p: GeM exponent (scalar or ``[C]``), used by ``"gem"`` only.
    eps: GeM clamp, used by ``"gem"`` only.
    mask: optional bool ``[B, H, W]``; only valid cells of each region are pooled. A region
      with no valid cell pools to 0.

  Returns:
    ``[B, R, C]`` unnormalised, in the order of ``regions``.
  """
  x, mask = _check_map(x, mask)
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
  batch, height, width, _ = x.shape
  check_regions(regions, height, width)
  check_ndim("regions", regions, (2, 3), "[R, 4] or [B, R, 4]")
  if np.ndim(regions) == 3 and np.shape(regions)[0] != batch:
    raise ValueError(
        f"regions of shape [B, R, 4] must have B = {batch} (the batch of x); got shape "
        f"{tuple(np.shape(regions))}.")
  rows, cols = region_indicators(regions, height, width)  # [(B,) R, H], [(B,) R, W]
  per_image = rows.ndim == 3
  r_axes = "brh" if per_image else "rh"
  c_axes = "brw" if per_image else "rw"

  if method == "max":
    values = x if mask is None else jnp.where(mask[..., None], x, -jnp.inf)
    over_rows = _row_range_max(values, jnp.asarray(regions))  # [B, R, W, C]
    # Keeps XLA from fusing the row gather into the column reduction, which re-gathers per
    # output element (3-4x slower on CPU for the 40-region grid).
    over_rows = jax.lax.optimization_barrier(over_rows)
    cols_b = cols[..., None] if per_image else cols[None, :, :, None]
    pooled = jnp.max(jnp.where(cols_b, over_rows, -jnp.inf), axis=2)  # [B, R, C]
    # Only an empty region (all of it padding) stays at -inf.
    return jnp.where(jnp.isneginf(pooled), 0.0, pooled).astype(x.dtype)

  values = x if method == "avg" else _gem_power(x, p, eps)
  weights = None if mask is None else mask[..., None].astype(x.dtype)
  if weights is not None:
    values = values * weights
  rows_f, cols_f = rows.astype(x.dtype), cols.astype(x.dtype)
  # The region sums are products with 0/1 masks: at the GPU default (TF32 operands, 10-bit
  # mantissas) they would carry ~1e-3 relative errors (measured on an H100: the numpy-reference
  # tests of avg / GeM regions failed there), so they run at full float32 precision.
  einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  sums = einsum(f"brwc,{c_axes}->brc", einsum(f"{r_axes},bhwc->brwc", rows_f, values), cols_f)
  if weights is None:
    counts = (jnp.sum(rows_f, -1) * jnp.sum(cols_f, -1))[..., None]
    counts = jnp.broadcast_to(counts, (batch,) + counts.shape[-2:])
  else:
    counts = einsum(f"brw,{c_axes}->br", einsum(f"{r_axes},bhw->brw", rows_f, weights[..., 0]),
                    cols_f)[..., None]
  mean = sums / jnp.maximum(counts, 1.0)
  return mean if method == "avg" else _gem_root(mean, p)


def rmac(x, levels: int = 3, eps: float = 1e-6, mask=None) -> jnp.ndarray:
  """Regional maximum activation of convolutions (Tolias et al.; DESIGN §4.1).

  ``l2n(MAC(full map)) + sum_r l2n(MAC(region_r))`` over the R-MAC grid of
  :func:`~retrieval_jax.regions.rmac_regions` (row 0 of the grid is the full map), not
  re-normalised: callers add whitening and the final L2 normalisation.

  Args:
    x: float ``[B, H, W, C]``.
    levels: grid levels L (3 gives 20 regions plus the full map on a 24x32 map).
    eps: the L2-normalisation epsilon added to each region's norm.
    mask: optional bool ``[B, H, W]`` for padded buckets; each image uses the grid of its own
      valid ``h x w`` map (padding at the bottom and right), looked up from
      :func:`~retrieval_jax.regions.rmac_region_table` inside the jitted program.

  Returns:
    ``[B, C]``.
  """
  x, mask = _check_map(x, mask)
  _, height, width, _ = x.shape
  regions, valid = rmac_grid_regions(height, width, levels, mask)
  vectors = l2n(regional_pool(x, regions, "max", mask=mask), eps=eps)
  if valid is not None:
    vectors = jnp.where(valid[..., None], vectors, 0.0)
  return jnp.sum(vectors, axis=1)
