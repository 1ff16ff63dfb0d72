"""Multi-scale combination against numpy written from the papers' formulas (DARAC sum, REMAP
Eq. 3, cirtorch's GeM over scales), and resize targets against Pillow and torch's own sizing."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.multiscale import (CIRTORCH_SCALES, DARAC_SIZES, REMAP_SIZES, REMAP_WEIGHTS,
                                      combine_scales, scale_sizes)


def _l2n(v):
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


@pytest.fixture
def per_scale(rng):
  """Three scales of five L2-normalised, non-negative (GeM-like) descriptors."""
  return _l2n(rng.random((3, 5, 8))).astype(np.float32)


def test_sum_is_l2n_of_the_sum(per_scale):
  want = _l2n(per_scale.astype(np.float64).sum(0))
  np.testing.assert_allclose(combine_scales(per_scale, "sum"), want, rtol=1e-5, atol=1e-6)


def test_weighted_matches_definition(per_scale):
  w = np.array([0.5, 2.0, 1.0])
  want = _l2n(np.tensordot(w, per_scale.astype(np.float64), axes=1))
  np.testing.assert_allclose(combine_scales(per_scale, "weighted", weights=w), want, rtol=1e-5,
                             atol=1e-6)


def test_remap_weights_example():
  # REMAP Eq. 3, X = 2 X1 + 1.4 X2, worked by hand on 2-D descriptors.
  x1 = np.array([[1.0, 0.0]], np.float32)
  x2 = np.array([[0.6, 0.8]], np.float32)
  assert REMAP_WEIGHTS == (2.0, 1.4)
  got = combine_scales(np.stack([x1, x2]), "weighted", weights=REMAP_WEIGHTS)
  unnormalised = np.array([2.0 + 1.4 * 0.6, 1.4 * 0.8])  # (2.84, 1.12)
  want = unnormalised / (math.hypot(2.84, 1.12) + 1e-6)
  np.testing.assert_allclose(got[0], want, rtol=1e-6)


@pytest.mark.parametrize("p", [3.0, 2.32])
def test_gem_matches_cirtorch_formula(per_scale, p):
  v = per_scale.astype(np.float64)
  want = _l2n(np.mean(v ** p, axis=0) ** (1.0 / p))
  np.testing.assert_allclose(combine_scales(per_scale, "gem", p=p), want, rtol=1e-5, atol=1e-6)


def test_gem_per_dimension_p_and_p_one_is_sum(per_scale):
  p = np.linspace(1.0, 4.0, 8)
  v = per_scale.astype(np.float64)
  want = _l2n(np.mean(v ** p, axis=0) ** (1.0 / p))
  np.testing.assert_allclose(combine_scales(per_scale, "gem", p=p), want, rtol=1e-5, atol=1e-6)
  # p = 1: the mean, which after L2 is the sum (cirtorch's msp = 1 for non-GeM heads).
  np.testing.assert_allclose(combine_scales(per_scale, "gem", p=1.0),
                             combine_scales(per_scale, "sum"), rtol=1e-5, atol=1e-6)


def test_jit_with_traced_p_and_weights(per_scale):
  gem = jax.jit(lambda v, p: combine_scales(v, "gem", p=p))
  np.testing.assert_allclose(gem(per_scale, jnp.float32(3.0)), combine_scales(per_scale, "gem",
                                                                              p=3.0), rtol=1e-6)
  weighted = jax.jit(lambda v, w: combine_scales(v, "weighted", weights=w))
  w = jnp.asarray([1.0, 2.0, 3.0])
  np.testing.assert_allclose(weighted(per_scale, w), combine_scales(per_scale, "weighted",
                                                                    weights=[1.0, 2.0, 3.0]),
                             rtol=1e-6)
  # The learned p is a parameter: gradients reach it through the combination.
  g = jax.grad(lambda p: jnp.sum(combine_scales(per_scale, "gem", p=p)[:, 0]))(3.0)
  assert np.isfinite(g) and g != 0


def test_single_scale_is_renormalised_identity(per_scale):
  for method, kwargs in (("sum", {}), ("weighted", {"weights": [3.0]}), ("gem", {"p": 3.0})):
    np.testing.assert_allclose(combine_scales(per_scale[:1], method, **kwargs), per_scale[0],
                               rtol=1e-5, atol=1e-6)


def test_combine_bad_input(per_scale):
  with pytest.raises(ValueError, match=r"descriptors must be a 3-D array \[S, N, D\]"):
    combine_scales(per_scale[0])
  with pytest.raises(ValueError, match="descriptors must hold at least one scale"):
    combine_scales(per_scale[:0])
  with pytest.raises(ValueError, match="method must be one of"):
    combine_scales(per_scale, "max")
  with pytest.raises(ValueError, match="method='weighted' needs weights"):
    combine_scales(per_scale, "weighted")
  with pytest.raises(ValueError, match=r"weights must have shape \[S\] = \(3,\)"):
    combine_scales(per_scale, "weighted", weights=REMAP_WEIGHTS)
  with pytest.raises(ValueError, match="weights must be non-negative and not all zero"):
    combine_scales(per_scale, "weighted", weights=[1.0, -1.0, 1.0])
  with pytest.raises(ValueError, match="weights must be non-negative and not all zero"):
    combine_scales(per_scale, "weighted", weights=[0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="weights must be finite"):
    combine_scales(per_scale, "weighted", weights=[1.0, np.nan, 1.0])
  with pytest.raises(ValueError, match="weights are only used by method='weighted'"):
    combine_scales(per_scale, "sum", weights=[1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="method='gem' needs p"):
    combine_scales(per_scale, "gem")
  with pytest.raises(ValueError, match="p is only used by method='gem'"):
    combine_scales(per_scale, "sum", p=3.0)
  with pytest.raises(ValueError, match="p must be positive"):
    combine_scales(per_scale, "gem", p=0.0)
  with pytest.raises(ValueError, match=r"p must be a scalar or have shape \[8\]"):
    combine_scales(per_scale, "gem", p=np.ones(3))
  with pytest.raises(ValueError, match="descriptors must be non-negative for method='gem'"):
    combine_scales(-per_scale, "gem", p=3.0)
  with pytest.raises(ValueError, match="descriptors must be finite"):
    combine_scales(np.full((2, 1, 2), np.inf), "sum")


# --- scale_sizes ----------------------------------------------------------------------------------

def _thumbnail_hw(height, width, max_size):
  """Pillow's own answer: the size ``Image.thumbnail`` (cirtorch's ``imresize``) produces."""
  from PIL import Image
  image = Image.new("L", (width, height))
  image.thumbnail((max_size, max_size))
  return image.height, image.width


def _interpolate_hw(height, width, factor):
  """torch's own output size for ``interpolate(scale_factor=factor)`` (cirtorch's
  ``extract_ms``)."""
  torch = pytest.importorskip("torch")
  out = torch.nn.functional.interpolate(torch.zeros(1, 1, height, width), scale_factor=factor,
                                        mode="bilinear", align_corners=False)
  return tuple(out.shape[2:])


@pytest.mark.parametrize("hw", [(1200, 1600), (1600, 1200), (683, 1024), (333, 500), (7, 3000),
                                (1025, 1023), (900, 900)])
def test_relative_scales_match_pillow_thumbnail_then_torch_interpolate(hw):
  pytest.importorskip("PIL")
  base = _thumbnail_hw(*hw, 1024)
  want = [_interpolate_hw(*base, s) for s in CIRTORCH_SCALES]
  assert scale_sizes(hw, CIRTORCH_SCALES, max_size=1024) == want


def test_cirtorch_example_by_hand():
  # 1600x1200 landscape: thumbnail to 1024x768, then floor(side * s).
  assert scale_sizes((1200, 1600), CIRTORCH_SCALES, max_size=1024) == [
      (768, 1024), (543, 724), (384, 512)]
  # Never enlarged by max_size; factors above 1 enlarge.
  assert scale_sizes((300, 400), (1, 2), max_size=1024) == [(300, 400), (600, 800)]
  assert scale_sizes((300, 400), (0.5,)) == [(150, 200)]
  assert scale_sizes((3, 3), (0.25,)) == [(1, 1)]  # at least one pixel


@pytest.mark.parametrize("hw", [(1200, 1600), (1600, 1200), (683, 1024), (7, 3000)])
def test_absolute_long_sides_shrinking_match_pillow(hw):
  pytest.importorskip("PIL")
  assert scale_sizes(hw, DARAC_SIZES) == [_thumbnail_hw(*hw, s) for s in DARAC_SIZES]


def test_absolute_long_sides_by_hand():
  # DARAC on a 768x1024 image: short side 0.75 * long, rounded to the nearest pixel.
  assert scale_sizes((768, 1024), DARAC_SIZES) == [(224, 299), (405, 540), (765, 1020)]
  # REMAP's two scales: 1024x768 and 1280x960 images (enlarging is allowed).
  assert scale_sizes((768, 1024), REMAP_SIZES) == [(768, 1024), (960, 1280)]
  assert scale_sizes((1024, 768), REMAP_SIZES) == [(1024, 768), (1280, 960)]
  # max_size does not cap absolute sizes; mixing both kinds is allowed.
  assert scale_sizes((600, 800), (1.0, 1020), max_size=400) == [(300, 400), (765, 1020)]


def test_scale_sizes_bad_input():
  with pytest.raises(ValueError, match="image_hw must be a"):
    scale_sizes((10,), (1.0,))
  with pytest.raises(ValueError, match=r"image_hw\[0\] must be a positive integer"):
    scale_sizes((0, 10), (1.0,))
  with pytest.raises(ValueError, match=r"image_hw\[1\] must be a positive integer"):
    scale_sizes((10, 10.5), (1.0,))
  with pytest.raises(ValueError, match="scales must hold at least one"):
    scale_sizes((10, 10), ())
  with pytest.raises(ValueError, match="scales must be a sequence"):
    scale_sizes((10, 10), 1.0)
  with pytest.raises(ValueError, match=r"scales\[1\] must be a finite positive number"):
    scale_sizes((10, 10), (1.0, -0.5))
  with pytest.raises(ValueError, match=r"scales\[0\] must be a finite positive number"):
    scale_sizes((10, 10), (float("inf"),))
  with pytest.raises(ValueError, match="long sides in pixels and must be whole numbers"):
    scale_sizes((10, 10), (299.5,))
  with pytest.raises(ValueError, match="max_size must be a positive integer"):
    scale_sizes((10, 10), (1.0,), max_size=0)
