"""REMAP head (Husain & Bober §III) against a numpy implementation of its equations, padded
buckets, the paper's descriptor dimensions, gradients, non-negative KL weights and the
initialisation from data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.kl_weighting import estimate_region_weights
from retrieval_jax.models.remap import (RemapHead, effective_klw, fixed_rmac_region_table,
                                        fixed_rmac_regions, grid_region_count,
                                        remap_init_from_data, remap_region_descriptors)
from retrieval_jax.regions import rmac_regions


def _l2n(v):
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def _stream_ref(x, regions, alpha):
  """P = sum_i alpha_i L2(zeta(o))(i) (§III-B): max over each region's slice, l2n, weighted sum."""
  x = np.asarray(x, np.float64)
  out = 0.0
  for a, (x0, y0, w, h) in zip(alpha, regions):
    out = out + a * _l2n(x[:, y0:y0 + h, x0:x0 + w].max((1, 2)))
  return out


def _remap_ref(taps, grids, alphas, kernel, bias, stream_l2n=False):
  """l2n(FC([P_1, ..., P_N])) with |alpha| (the non-negative weights in use)."""
  streams = [_stream_ref(x, g, np.abs(a)) for x, g, a in zip(taps, grids, alphas)]
  if stream_l2n:
    streams = [_l2n(s) for s in streams]
  p = np.concatenate(streams, axis=1)
  return _l2n(p @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)), p


def _taps(rng, batch=2):
  # Two layers at different resolutions and widths, post-ReLU-like with exact zeros.
  return [np.maximum(rng.normal(size=(batch, 12, 16, 6)), 0).astype(np.float32),
          np.maximum(rng.normal(size=(batch, 6, 8, 10)), 0).astype(np.float32)]


# Speed: tests trace shapes with eval_shape (no compilation) and run one jitted program per
# check; eager execution would compile ~100 primitives one by one.

def _shapes(head, *args):
  return jax.eval_shape(head.init, jax.random.PRNGKey(0), *args)


def _random_variables(head, taps, rng, positive=False):
  """Random parameters of the initialised shapes; some stored klw negative unless positive."""
  shapes = _shapes(head, taps)["params"]
  params = {}
  for k, v in shapes.items():
    if k.startswith("klw_"):
      w = rng.normal(size=v.shape)
      params[k] = (np.abs(w) if positive else w).astype(np.float32)
  params["fc"] = {k: rng.normal(size=v.shape).astype(np.float32)
                  for k, v in shapes["fc"].items()}
  return {"params": params}


# --- the grid -------------------------------------------------------------------------------

def test_grid_is_remaps_40_regions_and_rmac_where_rmac_has_one_extra_position():
  # Table I: a 1024x768 image at stride 32 is a 24x32 map; S = 2..5 give 8, 20, 40, 70 regions.
  for levels, count in [(2, 8), (3, 20), (4, 40), (5, 70)]:
    np.testing.assert_array_equal(fixed_rmac_regions(24, 32, levels),
                                  rmac_regions(24, 32, levels)[1:])
    assert grid_region_count(levels, False) == count
  np.testing.assert_array_equal(fixed_rmac_regions(24, 32, 4, include_full_map=True),
                                rmac_regions(24, 32, 4))
  for h, w in [(32, 24), (30, 40), (48, 64), (12, 16), (6, 8), (11, 19)]:
    np.testing.assert_array_equal(fixed_rmac_regions(h, w, 4), rmac_regions(h, w, 4)[1:])


@pytest.mark.parametrize("levels", [1, 3, 4])
def test_grid_has_a_fixed_count_of_square_windows_inside_any_map(levels):
  count = levels * (levels + 1) * (levels + 2) // 3
  for h in range(1, 26, 3):
    for w in range(1, 60, 4):
      g = fixed_rmac_regions(h, w, levels)
      assert g.shape == (count, 4)
      x, y, gw, gh = g.T
      assert np.all((x >= 0) & (y >= 0) & (gw == gh) & (gw >= 1) & (x + gw <= w) & (y + gh <= h))
      # Level l windows have side max(1, floor(2 min / (l + 1))) at l (l + 1) positions.
      sides = np.concatenate([[max(1, 2 * min(h, w) // (l + 1))] * (l * (l + 1))
                              for l in range(1, levels + 1)])
      np.testing.assert_array_equal(gw, sides)
  table = fixed_rmac_region_table(7, 9, levels)
  assert table.shape == (7, 9, count, 4)
  np.testing.assert_array_equal(table[4, 6], fixed_rmac_regions(5, 7, levels))


# --- the head against the equations ---------------------------------------------------------

@pytest.mark.parametrize("include_full_map,stream_l2n,as_dict", [(False, False, False),
                                                                 (True, False, True),
                                                                 (False, True, False)])
def test_head_matches_numpy_equations(rng, include_full_map, stream_l2n, as_dict):
  taps = _taps(rng)
  head = RemapHead(include_full_map=include_full_map, stream_l2n=stream_l2n, out_dims=7)
  variables = _random_variables(head, taps, rng)
  p_ = variables["params"]
  first = 0 if include_full_map else 1
  grids = [rmac_regions(12, 16, 4)[first:], rmac_regions(6, 8, 4)[first:]]
  want, p_want = _remap_ref(taps, grids, [p_["klw_0"], p_["klw_1"]], p_["fc"]["kernel"],
                            p_["fc"]["bias"], stream_l2n)
  # A mapping of taps gives the streams in its order.
  inputs = {"stage3": taps[0], "stage4": taps[1]} if as_dict else taps
  got, p = jax.jit(lambda v, t: (head.apply(v, t), head.apply(v, t, project=False)))(
      variables, inputs)
  assert got.shape == (2, 7)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(p, p_want, rtol=2e-5, atol=2e-6)


def test_masked_bucket_equals_unpadded_images(rng):
  head = RemapHead()
  full = _taps(rng, batch=1)
  variables = _random_variables(head, full, rng)
  # Image 0: valid 9x13 (and 5x7 at half resolution) in the 12x16 bucket, garbage in the padding.
  small = [full[0][:, :9, :13], full[1][:, :5, :7]]
  bucket = [np.concatenate([np.pad(s, ((0, 0), (0, f.shape[1] - s.shape[1]),
                                       (0, f.shape[2] - s.shape[2]), (0, 0)),
                                   constant_values=50.0), f]) for s, f in zip(small, full)]
  masks = []
  for s, f in zip(small, full):
    m = np.ones((2,) + f.shape[1:3], bool)
    m[0, s.shape[1]:, :] = False
    m[0, :, s.shape[2]:] = False
    masks.append(m)
  got = np.asarray(jax.jit(head.apply)(variables, bucket, masks))
  p_ = variables["params"]
  for i, taps in enumerate([small, full]):
    # Each image pooled on the reference grid of its own map (these sizes have one extra
    # long-side window, where the fixed-count grid is the reference one).
    grids = [rmac_regions(t.shape[1], t.shape[2], 4)[1:] for t in taps]
    want, _ = _remap_ref(taps, grids, [p_["klw_0"], p_["klw_1"]], p_["fc"]["kernel"],
                         p_["fc"]["bias"])
    np.testing.assert_allclose(got[i], want[0], rtol=2e-5, atol=2e-6)


# --- dimensions -----------------------------------------------------------------------------

def test_paper_dimensions_resnext101():
  """ResNeXt-101 at 1024x768: the last two convolutional layers are 24x32x2048 maps (§III-B step
  (2)), 40 regions each (Table I), D = 2048 + 2048 = 4096 (§V: "a 4096-dimensional descriptor",
  truncated to 128 for compact codes)."""
  head = RemapHead()
  taps = [jax.ShapeDtypeStruct((1, 24, 32, 2048), jnp.float32)] * 2
  variables = _shapes(head, taps)
  params = variables["params"]
  assert params["klw_0"].shape == params["klw_1"].shape == (40,)
  assert params["fc"]["kernel"].shape == (4096, 4096)
  assert jax.eval_shape(head.apply, variables, taps).shape == (1, 4096)
  compact = RemapHead(out_dims=128)
  assert jax.eval_shape(compact.apply, _shapes(compact, taps), taps).shape == (1, 128)
  # This library's stage3 + stage4 taps of ResNeXt-101 (strides 16 and 32): 1024 + 2048.
  stages = [jax.ShapeDtypeStruct((1, 48, 64, 1024), jnp.float32),
            jax.ShapeDtypeStruct((1, 24, 32, 2048), jnp.float32)]
  assert _shapes(head, stages)["params"]["fc"]["kernel"].shape == (3072, 3072)
  # VGG16's last two convolutions (conv5_2, conv5_3): 512 + 512.
  vgg = [jax.ShapeDtypeStruct((1, 48, 64, 512), jnp.float32)] * 2
  assert _shapes(head, vgg)["params"]["fc"]["bias"].shape == (1024,)


# --- training -------------------------------------------------------------------------------

@pytest.mark.parametrize("trainable", [True, False])
def test_gradients_reach_klw_and_fc(rng, trainable):
  taps = _taps(rng, batch=3)
  head = RemapHead(whiten_trainable=trainable)
  params = _random_variables(head, taps, rng)["params"]

  def triplet_loss(prm):
    # REMAP Eq. 2 with a margin above the largest possible distance gap: always active.
    d = head.apply({"params": prm}, taps)
    return 0.5 * jnp.maximum(0.0, 10.0 + jnp.sum((d[0] - d[1]) ** 2) - jnp.sum((d[0] - d[2]) ** 2))

  value, grads = jax.jit(jax.value_and_grad(triplet_loss))(params)
  assert float(value) > 0
  for name in ("klw_0", "klw_1"):
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
  fc = np.abs(np.asarray(grads["fc"]["kernel"])).sum() + np.abs(grads["fc"]["bias"]).sum()
  assert np.isfinite(fc) and (fc > 0) == trainable


def test_weights_stay_non_negative_after_a_step_that_pushes_them_below_zero(rng):
  taps = _taps(rng)
  head = RemapHead()
  params = _random_variables(head, taps, rng, positive=True)["params"]
  streams = jax.jit(lambda prm: head.apply({"params": prm}, taps, project=False))
  # sum(p) grows with every weight (region vectors are >= 0), so SGD pushes them all down;
  # a large step overshoots zero.
  grads = jax.grad(lambda prm: jnp.sum(streams(prm)))(params)
  lr = 5.0 / float(np.abs(np.asarray(grads["klw_0"])).min())
  stepped = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
  assert np.asarray(stepped["klw_0"]).min() < 0  # the stored values did cross zero
  for name, w in effective_klw(stepped).items():
    assert np.all(w >= 0), name
  p = np.asarray(streams(stepped))
  assert np.all(p >= 0)
  grids = [rmac_regions(12, 16, 4)[1:], rmac_regions(6, 8, 4)[1:]]
  _, want = _remap_ref(taps, grids, [np.asarray(stepped["klw_0"]), np.asarray(stepped["klw_1"])],
                       np.eye(16), np.zeros(16))
  np.testing.assert_allclose(p, want, rtol=2e-5, atol=2e-6)


# --- initialisation from data ---------------------------------------------------------------

def test_init_from_data_sets_kl_weights_and_pca_whitening(rng):
  n_pairs = 30
  head = RemapHead(levels=2)  # 8 regions per layer, D = 6 + 10
  base = _taps(rng, batch=n_pairs)
  other = _taps(rng, batch=n_pairs)
  same = np.arange(n_pairs) < n_pairs // 2
  # Matching pairs: the same maps up to small noise; the others independent.
  for b, o in zip(base, other):
    o[same] = np.maximum(b[same] + 0.05 * rng.normal(size=b[same].shape), 0)
  describe = jax.jit(lambda taps: [remap_region_descriptors(t, levels=2) for t in taps])
  desc_a = [np.asarray(d) for d in describe(base)]
  desc_b = [np.asarray(d) for d in describe(other)]
  init = remap_init_from_data(_shapes(head, base), desc_a, desc_b, same)
  for i in range(2):
    want = estimate_region_weights(desc_a[i], desc_b[i], same)
    np.testing.assert_allclose(init["params"][f"klw_{i}"], want, rtol=1e-6)
    assert np.all(want > 0)
  # The FC whitens p over the 2N images: zero mean, identity covariance (PCA-w, §III-C).
  images = [np.concatenate([b, o]) for b, o in zip(base, other)]
  out, p = jax.jit(lambda v, t: (head.apply(v, t), head.apply(v, t, project=False)))(init, images)
  p = np.asarray(p, np.float64)
  grids = [rmac_regions(12, 16, 2)[1:], rmac_regions(6, 8, 2)[1:]]
  _, p_want = _remap_ref(images, grids, [init["params"]["klw_0"], init["params"]["klw_1"]],
                         np.eye(16), np.zeros(16))
  np.testing.assert_allclose(p, p_want, rtol=1e-4, atol=1e-6)
  fc = init["params"]["fc"]
  z = p @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"], np.float64)
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)
  np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(16), atol=2e-3)
  np.testing.assert_allclose(out, _l2n(z), rtol=1e-4, atol=1e-5)


# --- bad inputs -----------------------------------------------------------------------------

def test_bad_inputs_name_the_argument(rng):
  taps = _taps(rng)
  head = RemapHead()
  variables = _shapes(head, taps)
  check = lambda *args: jax.eval_shape(head.apply, variables, *args)  # traces, never compiles
  with pytest.raises(ValueError, match="taps must hold layers = 2"):
    check(taps[:1])
  with pytest.raises(ValueError, match=r"taps\[1\] must be a 4-D"):
    check([taps[0], taps[1][0]])
  with pytest.raises(ValueError, match=r"mask of taps\[0\]"):
    check(taps, [np.ones((2, 12, 15), bool), None])
  with pytest.raises(ValueError, match="masks must be a sequence"):
    check(taps, [None])
  with pytest.raises(ValueError, match="taps must share the batch"):
    check([taps[0], taps[1][:1]])
  with pytest.raises(ValueError, match="taps must be a mapping"):
    check(taps[0])
  with pytest.raises(ValueError, match="out_dims"):
    _shapes(RemapHead(out_dims=17), taps)
  with pytest.raises(ValueError, match="levels"):
    _shapes(RemapHead(levels=0), taps)
  desc = [rng.random((2, 40, 6)), rng.random((2, 40, 10))]
  with pytest.raises(ValueError, match="region_descriptors_a must be a sequence of 2"):
    remap_init_from_data(variables, desc[:1], desc, np.array([True, False]))
  with pytest.raises(ValueError, match=r"region_descriptors_a\[0\] must be \[N, R = 40"):
    remap_init_from_data(variables, [d[:, :8] for d in desc], desc, np.array([True, False]))
