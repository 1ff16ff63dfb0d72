"""R-MAC grid and box conversion against independent references.

Two references: ``tests/data/rmac_grids_cirtorch.json`` holds grids produced by running the
published PyTorch R-MAC code (cirtorch's ``rmac``, float32 tensors) for sizes where float32
rounding matters, and ``_reference_grid`` below re-derives the rule from DESIGN §4.2 in plain
numpy, so every size can be checked without torch.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import regions as rg

_CIRTORCH = json.loads((pathlib.Path(__file__).parent / "data" / "rmac_grids_cirtorch.json")
                       .read_text())


def _reference_grid(height, width, levels, dtype=np.float32):
  """The DESIGN §4.2 rule, evaluated in ``dtype`` (float32 as the reference code does)."""
  f = dtype
  short, long = min(height, width), max(height, width)
  best, best_err = 0, None
  for k, s in enumerate(range(2, 8)):
    b = (f(1) / f(s - 1)) * f(long - short)
    err = abs((f(short * short) - f(short) * b) / f(short * short) - f(0.4))
    if best_err is None or err < best_err:  # strict: the first minimiser wins
      best, best_err = k, err
  wd = best + 1 if height < width else 0
  hd = best + 1 if height > width else 0
  out = [(0, 0, width, height)]
  for level in range(1, levels + 1):
    wl = math.floor(2 * short / (level + 1))
    if wl == 0:
      continue
    wl2 = math.floor(wl / 2 - 1)

    def starts(extent, n):
      b = 0.0 if n == 1 else (extent - wl) / (n - 1)
      return [int(np.floor(f(wl2) + f(i) * f(b)) - wl2) for i in range(n)]

    out += [(x, y, wl, wl) for y in starts(height, level + hd) for x in starts(width, level + wd)]
  return out


@pytest.mark.parametrize("key", sorted(_CIRTORCH))
def test_grid_equals_cirtorch_output(key):
  height, width, levels = map(int, key.split("x"))
  np.testing.assert_array_equal(rg.rmac_regions(height, width, levels), _CIRTORCH[key])


def test_float32_matters_on_2x32():
  # The exact-arithmetic grid differs from the published (float32) one on this size.
  assert _reference_grid(2, 32, 3, dtype=np.float64) != _CIRTORCH["2x32x3"]
  assert _reference_grid(2, 32, 3) == [tuple(r) for r in _CIRTORCH["2x32x3"]]


def test_all_small_sizes_match_reference_rule():
  for height in range(1, 41):
    for width in range(1, 41):
      for levels in (1, 3, 5):
        got = rg.rmac_regions(height, width, levels)
        assert [tuple(r) for r in got.tolist()] == _reference_grid(height, width, levels), (
            height, width, levels)
        assert (got[:, 0] >= 0).all() and (got[:, 1] >= 0).all()
        assert (got[:, 0] + got[:, 2] <= width).all() and (got[:, 1] + got[:, 3] <= height).all()


def test_remap_table_one_region_counts():
  # 1024x768 image at stride 32 -> 24x32 map; REMAP Table I: 8, 20, 40, 70 regions.
  counts = [len(rg.rmac_regions(24, 32, levels)) - 1 for levels in (2, 3, 4, 5)]
  assert counts == [8, 20, 40, 70]


def test_grid_layout_row0_full_map_then_row_major():
  grid = rg.rmac_regions(24, 32, 3)
  assert tuple(grid[0]) == (0, 0, 32, 24)
  level2 = grid[3:9]  # level 1 has 2 windows, level 2 has 3 x 2
  assert (level2[:, 2] == 16).all()
  # start rows outer, start columns inner
  assert list(map(tuple, level2[:, :2])) == [(0, 0), (8, 0), (16, 0), (0, 8), (8, 8), (16, 8)]


def test_square_map_repeats_full_map_and_is_cached_read_only():
  grid = rg.rmac_regions(10, 10, 1)
  assert grid.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
  assert rg.rmac_regions(10, 10, 1) is grid
  with pytest.raises(ValueError):
    grid[0, 0] = 1


@pytest.mark.parametrize("args", [(0, 5, 3), (5, -1, 3), (5, 5, 0), (5.5, 5, 3), (True, 5, 3)])
def test_bad_grid_arguments(args):
  with pytest.raises(ValueError, match="must be a positive integer"):
    rg.rmac_regions(*args)


def test_region_table_matches_individual_grids():
  table, valid = rg.rmac_region_table(6, 9, 3)
  for h in range(1, 7):
    for w in range(1, 10):
      grid = rg.rmac_regions(h, w, 3)
      n = int(valid[h - 1, w - 1].sum())
      assert n == len(grid)
      np.testing.assert_array_equal(table[h - 1, w - 1, :n], grid)
      assert valid[h - 1, w - 1, :n].all()


def test_boxes_to_cells_covers_touched_cells():
  # 320x480 image (H x W) -> 10x15 map: 32 px per cell.
  boxes = np.array([[0, 0, 480, 320],        # whole image
                    [33, 40, 95, 64],        # cells x 1..2 (33/32=1.03 .. 95/32=2.97), y 1..1
                    [-20, 300, 10, 400],     # clipped: x 0..0, y 9..9
                    [100.5, 100.5, 100.6, 100.6]])  # tiny: one cell
  cells = rg.boxes_to_cells(boxes, (320, 480), (10, 15))
  np.testing.assert_array_equal(cells, [[0, 0, 15, 10], [1, 1, 2, 1], [0, 9, 1, 1], [3, 3, 1, 1]])
  # Independent check: cell (i, j) covers pixels [32 j, 32 (j+1)); the box must overlap it.
  for box, (x, y, w, h) in zip(boxes, cells):
    touched_x = [j for j in range(15) if 32 * j < box[2] and 32 * (j + 1) > box[0]]
    touched_y = [i for i in range(10) if 32 * i < box[3] and 32 * (i + 1) > box[1]]
    assert list(range(x, x + w)) == touched_x
    assert list(range(y, y + h)) == touched_y


def test_boxes_to_cells_traced_matches_concrete():
  boxes = np.array([[[10, 20, 200, 150], [0, 0, 50, 50]]], np.float32)
  eager = rg.boxes_to_cells(boxes, (240, 320), (8, 10))
  traced = jax.jit(lambda b: rg.boxes_to_cells(b, (240, 320), (8, 10)))(boxes)
  np.testing.assert_array_equal(eager, traced)


@pytest.mark.parametrize("box", [[10, 10, 5, 20], [10, 10, 20, 10], [500, 0, 600, 10],
                                 [0, np.nan, 10, 10]])
def test_bad_boxes(box):
  with pytest.raises(ValueError, match="boxes row 0"):
    rg.boxes_to_cells(np.array([box], np.float32), (240, 320), (8, 10))


def test_check_regions_names_the_bad_row():
  rg.check_regions(np.array([[0, 0, 4, 3]]), 3, 4)
  with pytest.raises(ValueError, match=r"regions row 1 .* outside the 3x4 feature map"):
    rg.check_regions(np.array([[0, 0, 4, 3], [2, 0, 3, 1]]), 3, 4)
  with pytest.raises(ValueError, match=r"shape \[R, 4\]"):
    rg.check_regions(np.zeros((3, 5)), 3, 4)


def test_region_indicators_match_dense_masks():
  regions = np.array([[0, 0, 4, 3], [1, 2, 2, 1], [3, 0, 1, 3]])
  rows, cols = rg.region_indicators(regions, 3, 4)
  dense = np.asarray(rows)[:, :, None] & np.asarray(cols)[:, None, :]
  for r, (x, y, w, h) in enumerate(regions):
    expect = np.zeros((3, 4), bool)
    expect[y:y + h, x:x + w] = True
    np.testing.assert_array_equal(dense[r], expect)
  assert isinstance(rows, jnp.ndarray)
