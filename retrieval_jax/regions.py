"""Regions on a feature map: the R-MAC grid, box conversion and region indicators.

A region is a row ``(x, y, w, h)`` of integer feature-map cells: columns ``x .. x+w-1`` and rows
``y .. y+h-1``. Grids depend only on the map size, so they are computed on the host in numpy and
cached per ``(H, W, L)``; pooling then runs them as one static, jitted program.

References:
  Tolias, Sicre, Jegou. Particular object retrieval with integral max-pooling of CNN activations.
  ICLR 2016 (the R-MAC grid; DESIGN §4.2 gives the reference computation reproduced here).
  Husain, Bober. REMAP (IEEE TIP), §III and Table I: 8 / 20 / 40 / 70 regions on a 24x32 map for
  L = 2 .. 5.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import check_positive_int, is_concrete

# Candidate numbers of window positions on the long side of the map, and the overlap the grid
# aims for between neighbouring windows (Tolias et al.).
_LONG_SIDE_STEPS = np.arange(2, 8, dtype=np.float32)
_TARGET_OVERLAP = np.float32(0.4)


def _level_starts(extent: int, window: int, count: int) -> np.ndarray:
  """Window starts along one side, evaluated in float32 as the reference code does.

  The reference computes ``floor(wl2 + i * b) - wl2`` with ``i`` a float32 vector, ``b`` a Python
  float and ``wl2 = floor(wl / 2 - 1)``; the float32 products make a few sizes (e.g. 11x47,
  2x32) start one cell earlier than exact arithmetic would.
  """
  spacing = 0.0 if count == 1 else (extent - window) / (count - 1)
  half = np.floor(window / 2 - 1)
  positions = np.arange(count, dtype=np.float32) * np.float32(spacing)
  return (np.floor(np.float32(half) + positions) - np.float32(half)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _rmac_grid(height: int, width: int, levels: int) -> np.ndarray:
  short, long = min(height, width), max(height, width)
  # Spacing of the candidate long-side positions, as the reference's float32 tensor op
  # (max - w) / (steps - 1), which torch evaluates as reciprocal(steps - 1) * (max - w).
  spacing = (np.float32(1.0) / (_LONG_SIDE_STEPS - np.float32(1.0))) * np.float32(long - short)
  square = np.float32(short * short)
  overlap = (square - np.float32(short) * spacing) / square
  extra = int(np.argmin(np.abs(overlap - _TARGET_OVERLAP))) + 1  # first minimiser
  extra_w = extra if height < width else 0
  extra_h = extra if height > width else 0
  return _square_window_grid(height, width, levels, extra_w, extra_h, min_window=0)


def _square_window_grid(height: int, width: int, levels: int, extra_w: int, extra_h: int,
                        min_window: int) -> np.ndarray:
  """Full map, then per level ``l`` square windows of side ``floor(2 min(H, W) / (l + 1))``
  (raised to ``min_window``; levels whose side is 0 are dropped) at ``(l + extra_h) x
  (l + extra_w)`` float32-placed starts, row-major. Read-only int32 ``[R, 4]``."""
  short = min(height, width)
  rows = [(0, 0, width, height)]
  for level in range(1, levels + 1):
    window = max(min_window, int(np.floor(2 * short / (level + 1))))
    if window == 0:
      continue
    starts_x = _level_starts(width, window, level + extra_w)
    starts_y = _level_starts(height, window, level + extra_h)
    rows.extend((int(x), int(y), window, window) for y in starts_y for x in starts_x)
  grid = np.asarray(rows, dtype=np.int32)
  grid.setflags(write=False)
  return grid


def rmac_regions(height: int, width: int, levels: int = 3) -> np.ndarray:
  """The R-MAC region grid of an ``height x width`` feature map (DESIGN §4.2).

  Square windows of side ``floor(2 min(H, W) / (l + 1))`` at level ``l = 1 .. L``, placed with
  about 40 % overlap; the long side gets extra positions chosen by the reference rule. Row 0 is
  always the full map (so on square maps the level-1 window repeats it, as in the reference), then
  levels 1..L, each row-major (start rows outer, start columns inner). Duplicates on tiny maps are
  kept; levels whose window side would be 0 are dropped.

  Args:
    height: feature-map rows H >= 1.
    width: feature-map columns W >= 1.
    levels: number of levels L >= 1.

  Returns:
    int32 ``[R, 4]`` rows ``(x, y, w, h)`` in cells, read-only (cached per ``(H, W, L)``).
    ``R - 1`` is REMAP Table I's count: 8, 20, 40, 70 on a 24x32 map for L = 2, 3, 4, 5.
  """
  return _rmac_grid(check_positive_int("height", height), check_positive_int("width", width),
                    check_positive_int("levels", levels))


@functools.lru_cache(maxsize=16)
def rmac_region_table(max_height: int, max_width: int,
                      levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """R-MAC grids of every map size up to ``max_height x max_width``, padded to one length.

  A shape-bucketed batch holds images whose valid maps differ in size while the array shape is the
  bucket's. Indexing this table with each image's valid ``(h - 1, w - 1)`` gives its own grid
  inside a jitted program, with no host round-trip.

  Args:
    max_height: bucket rows H.
    max_width: bucket columns W.
    levels: number of R-MAC levels L.

  Returns:
    ``regions`` int32 ``[H, W, R_max, 4]``, where ``regions[h - 1, w - 1, :R]`` equals
    ``rmac_regions(h, w, levels)`` and padding rows are ``(0, 0, 1, 1)``; and ``valid`` bool
    ``[H, W, R_max]`` marking the real rows.
  """
  max_height = check_positive_int("max_height", max_height)
  max_width = check_positive_int("max_width", max_width)
  levels = check_positive_int("levels", levels)
  grids = [[_rmac_grid(h, w, levels) for w in range(1, max_width + 1)]
           for h in range(1, max_height + 1)]
  r_max = max(len(g) for row in grids for g in row)
  regions = np.tile(np.array([0, 0, 1, 1], np.int32), (max_height, max_width, r_max, 1))
  valid = np.zeros((max_height, max_width, r_max), bool)
  for i, row in enumerate(grids):
    for j, grid in enumerate(row):
      regions[i, j, :len(grid)] = grid
      valid[i, j, :len(grid)] = True
  regions.setflags(write=False)
  valid.setflags(write=False)
  return regions, valid


def rmac_grid_regions(height: int, width: int, levels: int = 3,
                      mask=None) -> tuple[Any, jax.Array | None]:
  """The R-MAC grid (full map first, DESIGN §4.2) for a map, or one per image of a bucket.

  Without a mask every image shares the static grid of the ``H x W`` map. With a mask (padding
  at the bottom and right, as :mod:`retrieval_jax.pooling` assumes) each image gets the grid of
  its own valid ``h x w`` map, looked up from
  :func:`rmac_region_table` inside the jitted program (no host round-trip).

  Args:
    height: map rows H.
    width: map columns W.
    levels: R-MAC levels L.
    mask: optional bool ``[B, H, W]``.

  Returns:
    ``(regions, valid)``: without a mask int32 numpy ``[R, 4]`` and ``None``; with a mask int32
    ``[B, R_max, 4]`` and bool ``[B, R_max]`` marking each image's real grid rows. An image with
    no valid cell gets the 1x1 grid (its regions then pool to 0).
  """
  if mask is None:
    return rmac_regions(height, width, levels), None
  table, table_valid = rmac_region_table(height, width, levels)
  rows, cols = table_index(mask)
  return jnp.asarray(table)[rows, cols], jnp.asarray(table_valid)[rows, cols]


def table_index(mask) -> tuple[jax.Array, jax.Array]:
  """Each image's row into a region table: ``(h - 1, w - 1)`` of its valid top-left map.

  Args:
    mask: bool ``[B, H, W]``, padding at the bottom and right.

  Returns:
    int32 ``[B]`` twice. An image with no valid cell gets ``(0, 0)``: the 1x1 grid, whose
    regions then pool to 0.
  """
  mask = jnp.asarray(mask, bool)
  rows = jnp.sum(jnp.any(mask, axis=2), axis=1).astype(jnp.int32)
  cols = jnp.sum(jnp.any(mask, axis=1), axis=1).astype(jnp.int32)
  return jnp.maximum(rows - 1, 0), jnp.maximum(cols - 1, 0)


def grid_region_count(levels: int, include_full_map: bool) -> int:
  """Regions of :func:`fixed_rmac_regions`: ``L (L + 1) (L + 2) / 3`` (+ 1 with the full map)."""
  levels = check_positive_int("levels", levels)
  return levels * (levels + 1) * (levels + 2) // 3 + int(bool(include_full_map))


@functools.cache
def _fixed_grid(height: int, width: int, levels: int) -> np.ndarray:
  # One extra window position on the long side (the width of a square map); windows of at
  # least one cell, so the count of regions does not depend on the map size.
  extra_w, extra_h = (1, 0) if width >= height else (0, 1)
  return _square_window_grid(height, width, levels, extra_w, extra_h, min_window=1)


def fixed_rmac_regions(height: int, width: int, levels: int = 4,
                       include_full_map: bool = False) -> np.ndarray:
  """R-MAC grid with exactly one extra window position on the long side (a fixed count).

  Level ``l = 1..L`` has square windows of side ``max(1, floor(2 min(H, W) / (l + 1)))`` at
  ``l x (l + 1)`` positions (``l + 1`` along the long side; along the width of a square map),
  placed with the reference's float32 starts (DESIGN §4.2) and listed row-major (start rows
  outer). Identical to ``rmac_regions(H, W, L)`` wherever the reference picks one extra
  position (long/short in about (1.02, 1.8], e.g. 24 x 32 -> REMAP's 40 regions for L = 4);
  elsewhere windows overlap more (square, where one pair coincides) or less (elongated) than
  the reference's 40 %, so that the count is always ``L (L + 1) (L + 2) / 3``.

  Args:
    height: map rows H >= 1.
    width: map columns W >= 1.
    levels: grid levels L >= 1.
    include_full_map: prepend the full map ``(0, 0, W, H)`` as row 0.

  Returns:
    int32 ``[R, 4]`` rows ``(x, y, w, h)``, read-only.
  """
  grid = _fixed_grid(check_positive_int("height", height), check_positive_int("width", width),
                     check_positive_int("levels", levels))
  return grid if include_full_map else grid[1:]


@functools.lru_cache(maxsize=16)
def fixed_rmac_region_table(max_height: int, max_width: int, levels: int = 4,
                            include_full_map: bool = False) -> np.ndarray:
  """:func:`fixed_rmac_regions` of every map size up to ``max_height x max_width``.

  For shape-bucketed batches: ``table[h - 1, w - 1]`` is the grid of an image whose valid map is
  ``h x w``; every entry has the same count, so no validity flags are needed.

  Returns:
    int32 ``[max_height, max_width, R, 4]``, read-only.
  """
  max_height = check_positive_int("max_height", max_height)
  max_width = check_positive_int("max_width", max_width)
  table = np.stack([
      np.stack([fixed_rmac_regions(h, w, levels, include_full_map)
                for w in range(1, max_width + 1)]) for h in range(1, max_height + 1)])
  table.setflags(write=False)
  return table


def check_regions(regions, height: int, width: int, name: str = "regions") -> None:
  """Raises ``ValueError`` unless every ``(x, y, w, h)`` row lies inside an ``H x W`` map.

  Only concrete arrays are checked (under ``jax.jit`` the values are unknown); the rank and the
  trailing size of 4 are always checked.

  Args:
    regions: int ``[..., R, 4]`` rows ``(x, y, w, h)`` in cells.
    height: map rows H.
    width: map columns W.
    name: the argument name used in the message.
  """
  if np.ndim(regions) < 2 or np.shape(regions)[-1] != 4:
    raise ValueError(
        f"{name} must have shape [R, 4] or [B, R, 4] with rows (x, y, w, h); got shape "
        f"{tuple(np.shape(regions))}.")
  if not is_concrete(regions):
    return
  r = np.asarray(regions).reshape(-1, 4)
  x, y, w, h = r.T
  bad = (x < 0) | (y < 0) | (w < 1) | (h < 1) | (x + w > width) | (y + h > height)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{name} row {i} = (x={x[i]}, y={y[i]}, w={w[i]}, h={h[i]}) lies outside the {height}x"
        f"{width} feature map; expected 0 <= x, 0 <= y, w >= 1, h >= 1, x + w <= {width} and "
        f"y + h <= {height} ({int(bad.sum())} bad row(s)).")


def boxes_to_cells(boxes, image_size: tuple[int, int], map_size: tuple[int, int]):
  """Converts pixel boxes to the feature-map cells they overlap.

  For a query bounding box, region proposals or detections: box corners are scaled by the
  map/image ratio, the start rounded down and the end up, so every cell the box touches is
  included; boxes are clipped to the map and keep at least one cell.

  Args:
    boxes: float ``[..., 4]`` rows ``(x0, y0, x1, y1)`` in image pixels, ``x1 > x0``,
      ``y1 > y0`` (the Oxford/Paris ``bbx`` convention).
    image_size: ``(image_height, image_width)`` in pixels.
    map_size: ``(map_height, map_width)`` in cells.

  Returns:
    int32 ``[..., 4]`` rows ``(x, y, w, h)`` in cells (numpy for concrete input, a jax array
    under tracing).
  """
  img_h, img_w = (check_positive_int("image_size[0]", image_size[0]),
                  check_positive_int("image_size[1]", image_size[1]))
  map_h, map_w = (check_positive_int("map_size[0]", map_size[0]),
                  check_positive_int("map_size[1]", map_size[1]))
  if np.ndim(boxes) < 1 or np.shape(boxes)[-1] != 4:
    raise ValueError(
        f"boxes must have shape [..., 4] with rows (x0, y0, x1, y1); got shape "
        f"{tuple(np.shape(boxes))}.")
  xp = np if is_concrete(boxes) else jnp
  boxes = xp.asarray(boxes, dtype=xp.float32)
  if xp is np:
    flat = boxes.reshape(-1, 4)
    x0, y0, x1, y1 = flat.T
    bad = ~np.isfinite(flat).all(1) | (x1 <= x0) | (y1 <= y0) | (x1 <= 0) | (y1 <= 0) | (
        x0 >= img_w) | (y0 >= img_h)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
          f"boxes row {i} = {flat[i].tolist()} is empty or outside the {img_h}x{img_w} image; "
          f"expected finite (x0, y0, x1, y1) with x1 > x0, y1 > y0 overlapping the image.")
  sx, sy = map_w / img_w, map_h / img_h
  cx0 = xp.clip(xp.floor(boxes[..., 0] * sx), 0, map_w - 1)
  cy0 = xp.clip(xp.floor(boxes[..., 1] * sy), 0, map_h - 1)
  cx1 = xp.clip(xp.ceil(boxes[..., 2] * sx), cx0 + 1, map_w)
  cy1 = xp.clip(xp.ceil(boxes[..., 3] * sy), cy0 + 1, map_h)
  return xp.stack([cx0, cy0, cx1 - cx0, cy1 - cy0], axis=-1).astype(xp.int32)


def region_indicators(regions, height: int, width: int):
  """Separable membership of cells in rectangular regions.

  Cell ``(i, j)`` lies in region ``r`` iff ``rows[..., r, i] and cols[..., r, j]``. Pooling uses
  the two factors instead of a full ``[R, H, W]`` mask, so regional sums become two small matrix
  products and regional maxima two masked reductions.

  Args:
    regions: int ``[..., R, 4]`` rows ``(x, y, w, h)`` (numpy or jax, possibly traced).
    height: map rows H.
    width: map columns W.

  Returns:
    ``rows`` bool ``[..., R, H]`` and ``cols`` bool ``[..., R, W]`` (jax arrays).
  """
  regions = jnp.asarray(regions)
  x, y, w, h = (regions[..., k, None] for k in range(4))
  i = jnp.arange(height)
  j = jnp.arange(width)
  rows = (i >= y) & (i < y + h)
  cols = (j >= x) & (j < x + w)
  return rows, cols
