"""Pooling against numpy references written from the definitions (DESIGN §4.1), and the
masked-vs-unpadded property that shape buckets rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from retrieval_jax import pooling
from retrieval_jax.regions import rmac_regions
from strategies import padded_bucket


def _gem_ref(x, p=3.0, eps=1e-6):
  x = np.asarray(x, np.float64)
  return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def _region_ref(x, regions, method, p=3.0):
  """Slices every region in a loop: [B,H,W,C] -> [B,R,C]."""
  x = np.asarray(x, np.float64)
  out = []
  for b in range(x.shape[0]):
    per_image = regions[b] if regions.ndim == 3 else regions
    rows = []
    for x0, y0, w, h in per_image:
      cell = x[b:b + 1, y0:y0 + h, x0:x0 + w]
      rows.append({"max": lambda c: c.max((1, 2)), "avg": lambda c: c.mean((1, 2)),
                   "gem": lambda c: _gem_ref(c, p)}[method](cell)[0])
    out.append(rows)
  return np.asarray(out)


def _rmac_ref(x, levels=3, eps=1e-6):
  x = np.asarray(x, np.float64)
  total = 0.0
  for x0, y0, w, h in rmac_regions(x.shape[1], x.shape[2], levels):
    v = x[:, y0:y0 + h, x0:x0 + w].max((1, 2))
    total = total + v / (np.linalg.norm(v, axis=1, keepdims=True) + eps)
  return total


@pytest.fixture
def fmap(rng):
  # Post-ReLU-like maps with some exact zeros, and odd sizes.
  return np.maximum(rng.standard_normal((3, 11, 47, 5)), 0).astype(np.float32)


def test_global_poolings_match_definitions(fmap):
  np.testing.assert_allclose(pooling.mac(fmap), fmap.max((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(pooling.spoc(fmap), fmap.astype(np.float64).mean((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(pooling.gem(fmap), _gem_ref(fmap), rtol=1e-5)
  np.testing.assert_allclose(pooling.gem(fmap, p=1.0), _gem_ref(fmap, 1.0), rtol=1e-5)


def test_gem_per_channel_p_and_limits(fmap):
  p = np.array([1.0, 2.0, 3.0, 5.0, 8.0], np.float32)
  expect = np.stack([_gem_ref(fmap[..., c:c + 1], float(p[c]))[:, 0] for c in range(5)], 1)
  np.testing.assert_allclose(pooling.gem(fmap, p=p), expect, rtol=1e-5)
  # Power-mean bounds: max * (1/N)^(1/p) <= GeM <= max, so large p approaches MAC.
  n = fmap.shape[1] * fmap.shape[2]
  top = fmap.max((1, 2)) + 1.0
  big = np.asarray(pooling.gem(fmap + 1.0, p=40.0))
  assert np.all(big <= top * (1 + 1e-5)) and np.all(big >= top * (1 / n) ** (1 / 40) * (1 - 1e-5))


def test_gem_gradient_wrt_p_matches_finite_difference(fmap):
  x = jnp.asarray(fmap[:1] + 0.1)
  f = lambda p: jnp.sum(pooling.gem(x, p=p))
  g = jax.grad(f)(3.0)
  h = 1e-2
  fd = (f(3.0 + h) - f(3.0 - h)) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=1e-2)


@pytest.mark.parametrize("method", ["max", "avg", "gem"])
@pytest.mark.parametrize("shape", [(11, 47), (2, 32), (24, 32), (1, 1), (7, 3)])
def test_regional_pool_matches_region_slices(rng, method, shape):
  x = np.maximum(rng.standard_normal((2,) + shape + (4,)), 0).astype(np.float32)
  regions = rmac_regions(*shape, levels=4)
  got = pooling.regional_pool(x, regions, method)
  assert got.shape == (2, len(regions), 4)
  np.testing.assert_allclose(got, _region_ref(x, regions, method), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["max", "avg", "gem"])
def test_regional_pool_per_image_regions_and_jit(rng, method):
  x = rng.random((2, 9, 13, 3)).astype(np.float32)
  regions = np.array([[[0, 0, 13, 9], [2, 3, 4, 5], [12, 8, 1, 1]],
                      [[5, 1, 8, 2], [0, 0, 1, 9], [3, 3, 3, 3]]], np.int32)
  jitted = jax.jit(lambda v, r: pooling.regional_pool(v, r, method))
  np.testing.assert_allclose(jitted(x, regions), _region_ref(x, regions, method), rtol=2e-5)


def test_rmac_matches_definition(fmap):
  np.testing.assert_allclose(pooling.rmac(fmap), _rmac_ref(fmap), rtol=1e-5)
  np.testing.assert_allclose(pooling.rmac(fmap, levels=5), _rmac_ref(fmap, 5), rtol=1e-5)
  jitted = jax.jit(pooling.rmac, static_argnames="levels")
  np.testing.assert_allclose(jitted(fmap, levels=2), _rmac_ref(fmap, 2), rtol=1e-5)


# --- masked == unpadded -------------------------------------------------------------------------

_BUCKET = (3, 9, 9, 2)  # one bucket shape, so each jitted pooling compiles once
_MASKED = {
    "mac": jax.jit(lambda x, m: pooling.mac(x, mask=m)),
    "spoc": jax.jit(lambda x, m: pooling.spoc(x, mask=m)),
    "gem": jax.jit(lambda x, m: pooling.gem(x, mask=m)),
    "rmac": jax.jit(lambda x, m: pooling.rmac(x, mask=m)),
}
_REFERENCE = {
    "mac": lambda c: c.max((1, 2)),
    "spoc": lambda c: c.astype(np.float64).mean((1, 2)),
    "gem": _gem_ref,
    "rmac": _rmac_ref,
}
_MASKED_REGIONAL = {m: jax.jit(lambda x, r, k, m=m: pooling.regional_pool(x, r, m, mask=k))
                    for m in ("max", "avg", "gem")}


def _bucket():
  return padded_bucket(_BUCKET, lambda rng, shape: np.maximum(rng.standard_normal(shape), 0))


def _crop(x, b, size):
  return x[b:b + 1, :size[0], :size[1]]


@given(_bucket())
def test_masked_global_poolings_equal_unpadded(bucket):
  # The padded, masked batch against the reference on each unpadded image.
  x, mask, sizes, _ = bucket
  for name, fn in _MASKED.items():
    padded = np.asarray(fn(x, mask))
    for b, size in enumerate(sizes):
      np.testing.assert_allclose(padded[b], _REFERENCE[name](_crop(x, b, size))[0], rtol=2e-5,
                                 atol=1e-6, err_msg=name)


@given(_bucket(), st.sampled_from(["max", "avg", "gem"]))
def test_masked_regional_pool_equals_unpadded(bucket, method):
  x, mask, sizes, rng = bucket
  # Per-image regions starting inside each image's valid map; they may run into the padding,
  # which the mask must cut back to the valid cells (the crop does that for the reference).
  regions = []
  for h, w in sizes:
    rows = []
    for _ in range(4):
      x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
      rows.append([x0, y0, int(rng.integers(1, x.shape[2] - x0 + 1)),
                   int(rng.integers(1, x.shape[1] - y0 + 1))])
    regions.append(rows)
  regions = np.asarray(regions, np.int32)
  padded = np.asarray(_MASKED_REGIONAL[method](x, regions, mask))
  for b, size in enumerate(sizes):
    clipped = regions[b].copy()
    clipped[:, 2] = np.minimum(clipped[:, 0] + clipped[:, 2], size[1]) - clipped[:, 0]
    clipped[:, 3] = np.minimum(clipped[:, 1] + clipped[:, 3], size[0]) - clipped[:, 1]
    expect = _region_ref(_crop(x, b, size), clipped, method)[0]
    np.testing.assert_allclose(padded[b], expect, rtol=2e-5, atol=1e-6)


def test_masked_rmac_jits_with_traced_mask(rng):
  x = np.maximum(rng.standard_normal((2, 12, 16, 3)), 0).astype(np.float32)
  mask = np.zeros((2, 12, 16), bool)
  mask[0, :9, :16] = True
  mask[1, :12, :5] = True
  got = jax.jit(lambda v, m: pooling.rmac(v, mask=m))(x, mask)
  np.testing.assert_allclose(got[0], _rmac_ref(x[:1, :9])[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], _rmac_ref(x[1:, :, :5])[0], rtol=1e-5)


def test_empty_mask_pools_to_zero(rng):
  x = rng.random((1, 3, 3, 2)).astype(np.float32)
  mask = np.zeros((1, 3, 3), bool)
  for fn in (pooling.mac, pooling.spoc, pooling.rmac):
    np.testing.assert_array_equal(fn(x, mask=mask), 0.0)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [pooling.mac, pooling.spoc, pooling.gem, pooling.rmac])
def test_non_4d_feature_map_raises(fn):
  with pytest.raises(ValueError, match=r"x must be a 4-D array \[B, H, W, C\]"):
    fn(np.zeros((3, 4, 5), np.float32))


def test_regional_pool_bad_input():
  x = np.zeros((2, 4, 6, 3), np.float32)
  with pytest.raises(ValueError, match="regions row 1 .* outside the 4x6 feature map"):
    pooling.regional_pool(x, np.array([[0, 0, 6, 4], [5, 0, 2, 1]]))
  with pytest.raises(ValueError, match="x must be a 4-D"):
    pooling.regional_pool(x[0], np.array([[0, 0, 1, 1]]))
  with pytest.raises(ValueError, match="method must be one of"):
    pooling.regional_pool(x, np.array([[0, 0, 1, 1]]), method="sum")
  with pytest.raises(ValueError, match="B = 2"):
    pooling.regional_pool(x, np.zeros((3, 1, 4), np.int32) + [0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"mask must have shape \[B, H, W\]"):
    pooling.gem(x, mask=np.ones((2, 4, 5), bool))
