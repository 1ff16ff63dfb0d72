"""Retrieval heads against numpy references written from the definitions (DESIGN §4.1; DLRTN
Eqs. 7-9; LRML §3.1), padded buckets against unpadded images, and where gradients reach."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from retrieval_jax.models.heads import (GlobalPoolHead, RegionalHead, learn_head_whitening,
                                        replace_whitening)
from retrieval_jax.models.whitening_layer import whitening_params
from retrieval_jax.regions import rmac_regions
from retrieval_jax.whitening import learn_lw, learn_pca_whitening
from strategies import padded_bucket

KEY = jax.random.PRNGKey(0)


# --- numpy references ----------------------------------------------------------------------------

def _l2n(v):
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def _pool(cells, method, p=3.0):
  """``[h, w, C] -> [C]`` in float64: DLRTN Eq. 7 (max), Eq. 8 (avg), Eq. 9 (GeM)."""
  cells = np.asarray(cells, np.float64).reshape(-1, cells.shape[-1])
  if method in ("max", "mac"):
    return cells.max(0)
  if method in ("avg", "spoc"):
    return cells.mean(0)
  return np.mean(np.maximum(cells, 1e-6) ** p, axis=0) ** (1.0 / np.asarray(p, np.float64))


def _global_ref(image, method, p=3.0, whiten=None):
  """One image ``[H, W, C]``: l2n(pool), then l2n(v @ kernel + bias) when whitened."""
  v = _l2n(_pool(image, method, p))
  if whiten is not None:
    v = _l2n(v @ np.asarray(whiten["kernel"], np.float64) + np.asarray(whiten["bias"], np.float64))
  return v


def _region_vectors_ref(image, boxes, method, p=3.0):
  return np.stack([_l2n(_pool(image[y:y + h, x:x + w], method, p)) for x, y, w, h in boxes])


def _regional_ref(image, boxes, method, p=3.0, whiten=None):
  """One image: l2n(sum_r l2n(W(l2n(pool_r)))), the inner l2n(W(.)) only when whitened."""
  v = _region_vectors_ref(image, boxes, method, p)
  if whiten is not None:
    v = _l2n(v @ np.asarray(whiten["kernel"], np.float64) + np.asarray(whiten["bias"], np.float64))
  return _l2n(v.sum(0))


def _rmac_ref(image, levels=3):
  """R-MAC written out: sum over the grid (full map first) of l2n(max over the region)."""
  total = 0.0
  for x, y, w, h in rmac_regions(image.shape[0], image.shape[1], levels):
    total = total + _l2n(np.asarray(image, np.float64)[y:y + h, x:x + w].max((0, 1)))
  return total


def _relu_map(rng, shape):
  return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def _set(variables, name, value):
  params = dict(variables["params"])
  params[name] = jnp.asarray(value, jnp.float32)
  return {**variables, "params": params}


def _init(head, *args, **kwargs):
  """``head.init`` as one jitted program: eager init/apply compiles every small op on its own,
  which costs seconds per test."""
  return jax.jit(lambda *a, **k: head.init(KEY, *a, **k))(*args, **kwargs)


def _apply(head, variables, *args, before_whitening=False, **kwargs):
  fn = lambda v, *a, **k: head.apply(v, *a, before_whitening=before_whitening, **k)
  return jax.jit(fn)(variables, *args, **kwargs)


def _np(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


# --- GlobalPoolHead ------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc"])
def test_global_head_matches_numpy(rng, pooling):
  x = _relu_map(rng, (2, 5, 7, 6))
  head = GlobalPoolHead(pooling=pooling)
  variables = _init(head, x)
  assert ("p" in variables.get("params", {})) == (pooling == "gem")
  if pooling == "gem":
    assert variables["params"]["p"].shape == ()
    np.testing.assert_allclose(variables["params"]["p"], 3.0)
    variables = _set(variables, "p", 2.5)
  got = _apply(head, variables, x)
  assert got.shape == (2, 6)
  for b in range(2):
    np.testing.assert_allclose(got[b], _global_ref(x[b], pooling, 2.5), rtol=1e-5, atol=1e-6)


def test_global_head_per_channel_p(rng):
  x = _relu_map(rng, (2, 4, 5, 3))
  head = GlobalPoolHead(per_channel_p=True)
  variables = _init(head, x)
  assert variables["params"]["p"].shape == (3,)
  p = np.array([1.5, 3.0, 6.0])
  got = _apply(head, _set(variables, "p", p), x)
  for b in range(2):
    np.testing.assert_allclose(got[b], _global_ref(x[b], "gem", p), rtol=1e-5, atol=1e-6)


def test_global_head_clamps_p_at_one(rng):
  # A p pushed below 1 acts as p = 1 (the mean of max(x, eps)), not as a sub-arithmetic mean.
  x = _relu_map(rng, (1, 4, 4, 3))
  head = GlobalPoolHead()
  variables = _set(_init(head, x), "p", 0.3)
  np.testing.assert_allclose(_apply(head, variables, x)[0], _global_ref(x[0], "gem", 1.0),
                             rtol=1e-5, atol=1e-6)


def test_global_head_with_pca_whitening(rng):
  x = _relu_map(rng, (12, 4, 5, 6))
  head = GlobalPoolHead(whiten_dims=4)
  variables = _init(head, x)
  assert variables["params"]["whiten"]["kernel"].shape == (6, 4)
  # What the whitening is learned on: l2n(GeM(x)), checked against numpy first.
  vectors = np.asarray(_apply(head, variables, x, before_whitening=True))
  want_vectors = np.stack([_l2n(_pool(x[b], "gem")) for b in range(12)])
  np.testing.assert_allclose(vectors, want_vectors, rtol=1e-5, atol=1e-6)
  whiten = learn_head_whitening(vectors, "pca", dims=4)
  mean, P = learn_pca_whitening(vectors)
  np.testing.assert_allclose(whiten["kernel"], P[:4].T, rtol=1e-5, atol=1e-5)
  variables = replace_whitening(variables, whiten)
  got = _apply(head, variables, x)
  assert got.shape == (12, 4)
  for b in range(12):
    # Independent of the layer's parametrisation: the definition P[:4] (v - mean).
    want = _l2n((want_vectors[b] - mean) @ P[:4].T)
    np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


def test_global_head_lw_whitening():
  rng = np.random.default_rng(1)
  vectors = rng.random((30, 5))
  q, pos = np.arange(0, 20, 2), np.arange(1, 20, 2)
  whiten = learn_head_whitening(vectors, "lw", dims=3, query_idx=q, positive_idx=pos)
  expect = whitening_params(*learn_lw(vectors, q, pos), dims=3)
  for key in ("kernel", "bias"):
    np.testing.assert_allclose(whiten[key], expect[key], rtol=1e-6)


# --- masked buckets ------------------------------------------------------------------------------

_BUCKET = (3, 8, 9, 3)


def _bucket():
  return padded_bucket(_BUCKET, lambda rng, shape: 0.1 + rng.random(shape))


def _random_whitening(rng, c, d):
  return {"kernel": rng.standard_normal((c, d)), "bias": rng.standard_normal(d)}


_GLOBAL = GlobalPoolHead(per_channel_p=True, whiten_dims=2)
_GLOBAL_VARS = _init(_GLOBAL, np.ones(_BUCKET, np.float32))
_GLOBAL_VARS = replace_whitening(_set(_GLOBAL_VARS, "p", [1.5, 2.5, 4.0]),
                                 _random_whitening(np.random.default_rng(2), 3, 2))
_GLOBAL_MASKED = jax.jit(lambda x, m: _GLOBAL.apply(_GLOBAL_VARS, x, m))

_REGIONAL = {pooling: RegionalHead(pooling=pooling, whiten_dims=2) for pooling in ("max", "gem")}
_REGIONAL_VARS = {
    pooling: replace_whitening(_init(head, np.ones(_BUCKET, np.float32)),
                               _random_whitening(np.random.default_rng(3), 3, 2))
    for pooling, head in _REGIONAL.items()}
_REGIONAL_VARS["gem"] = _set(_REGIONAL_VARS["gem"], "xi", 2.5)
_REGIONAL_MASKED = {pooling: jax.jit(lambda x, m, pooling=pooling, head=head: head.apply(
    _REGIONAL_VARS[pooling], x, m)) for pooling, head in _REGIONAL.items()}


@given(_bucket())
def test_masked_global_head_equals_unpadded(bucket):
  x, mask, sizes, _ = bucket
  padded = np.asarray(_GLOBAL_MASKED(x, mask))
  whiten = _np(_GLOBAL_VARS["params"]["whiten"])
  for b, (h, w) in enumerate(sizes):
    image = x[b, :h, :w]
    want = _global_ref(image, "gem", np.array([1.5, 2.5, 4.0]), whiten)
    np.testing.assert_allclose(padded[b], want, rtol=1e-4, atol=1e-5)


@given(_bucket(), st.sampled_from(["max", "gem"]))
def test_masked_regional_head_uses_each_images_own_grid(bucket, pooling):
  x, mask, sizes, _ = bucket
  padded = np.asarray(_REGIONAL_MASKED[pooling](x, mask))
  whiten = _np(_REGIONAL_VARS[pooling]["params"]["whiten"])
  for b, (h, w) in enumerate(sizes):
    image = x[b, :h, :w]
    want = _regional_ref(image, rmac_regions(h, w, 3), pooling, 2.5, whiten)
    np.testing.assert_allclose(padded[b], want, rtol=1e-4, atol=1e-5)


def test_masked_heads_equal_the_head_on_the_unpadded_image(rng):
  x = np.full((2, 6, 7, 3), 40.0, np.float32)
  mask = np.zeros((2, 6, 7), bool)
  x[0, :6, :4] = _relu_map(rng, (6, 4, 3)) + 0.1
  x[1, :3, :7] = _relu_map(rng, (3, 7, 3)) + 0.1
  mask[0, :6, :4] = mask[1, :3, :7] = True
  for head in (RegionalHead(), GlobalPoolHead(whiten_dims=2)):
    variables = _init(head, x)
    padded = _apply(head, variables, x, mask)
    np.testing.assert_allclose(padded[0], _apply(head, variables, x[:1, :6, :4])[0], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(padded[1], _apply(head, variables, x[1:, :3, :7])[0], rtol=1e-5,
                               atol=1e-6)


# --- RegionalHead ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,levels", [((11, 17), 3), ((8, 8), 3), ((9, 30), 4)])
def test_rmac_head_equals_l2n_rmac(rng, shape, levels):
  x = _relu_map(rng, (2,) + shape + (5,))
  head = RegionalHead(pooling="max", levels=levels)
  variables = _init(head, x)
  assert not variables.get("params")  # max pooling, no whitening: nothing to learn
  got = _apply(head, variables, x)
  for b in range(2):
    np.testing.assert_allclose(got[b], _l2n(_rmac_ref(x[b], levels)), rtol=1e-5, atol=1e-6)


def test_rgac_with_xi_one_is_regional_average_pooling(rng):
  x = _relu_map(rng, (2, 7, 10, 4)) + 0.01  # positive: the GeM clamp at 1e-6 never bites
  head = RegionalHead(pooling="gem", xi_init=1.0)
  got = _apply(head, _init(head, x), x)
  grid = rmac_regions(7, 10, 3)
  for b in range(2):
    np.testing.assert_allclose(got[b], _regional_ref(x[b], grid, "avg"), rtol=1e-5, atol=1e-6)
  avg = RegionalHead(pooling="avg")
  np.testing.assert_allclose(_apply(avg, _init(avg, x), x), got, rtol=1e-5, atol=1e-6)


def test_rgac_head_matches_numpy_and_inits_xi_at_3(rng):
  x = _relu_map(rng, (2, 7, 10, 4))
  head = RegionalHead(pooling="gem")
  variables = _init(head, x)
  assert variables["params"]["xi"].shape == ()
  np.testing.assert_allclose(variables["params"]["xi"], 3.0)
  got = _apply(head, _set(variables, "xi", 2.7), x)
  grid = rmac_regions(7, 10, 3)
  for b in range(2):
    np.testing.assert_allclose(got[b], _regional_ref(x[b], grid, "gem", 2.7), rtol=1e-5,
                               atol=1e-6)


def test_regional_head_with_pca_whitening_on_region_vectors(rng):
  x = _relu_map(rng, (4, 6, 9, 6))
  head = RegionalHead(pooling="gem", whiten_dims=4)
  variables = _init(head, x)
  vectors, valid = _apply(head, variables, x, before_whitening=True)
  grid = rmac_regions(6, 9, 3)
  want_vectors = np.stack([_region_vectors_ref(x[b], grid, "gem") for b in range(4)])
  np.testing.assert_allclose(vectors, want_vectors, rtol=1e-5, atol=1e-6)
  assert np.asarray(valid).all()
  rows = np.asarray(vectors)[np.asarray(valid)]  # [B * R, C]
  variables = replace_whitening(variables, learn_head_whitening(rows, "pca", dims=4))
  mean, P = learn_pca_whitening(rows)
  got = _apply(head, variables, x)
  assert got.shape == (4, 4)
  for b in range(4):
    want = _l2n(_l2n((want_vectors[b] - mean) @ P[:4].T).sum(0))
    np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


def test_region_boxes_with_padded_region_lists(rng):
  # Two images with 3 and 1 real proposals, padded to R = 4 with boxes that would change the
  # result (they cover the strongest cells) if they were not masked out.
  x = _relu_map(rng, (2, 6, 8, 5))
  x[:, 5, 7] = 30.0
  boxes = np.array([[[0, 0, 3, 2], [2, 1, 4, 4], [5, 3, 3, 3], [4, 3, 4, 3]],
                    [[1, 1, 5, 3], [0, 0, 8, 6], [6, 4, 2, 2], [7, 5, 1, 1]]], np.int32)
  region_mask = np.array([[True, True, True, False], [True, False, False, False]])
  whiten = learn_head_whitening(_relu_map(rng, (40, 5)) + 0.1, "pca", dims=3)
  assert np.abs(whiten["bias"]).max() > 0.1  # a zeroed region would still add W(0) = bias
  for pooling in ("max", "gem"):
    head = RegionalHead(pooling=pooling, whiten_dims=3)
    variables = replace_whitening(_init(head, x, regions=boxes, region_mask=region_mask),
                                  whiten)
    got = _apply(head, variables, x, regions=boxes, region_mask=region_mask)  # traced boxes
    for b in range(2):
      kept = boxes[b][region_mask[b]]
      want = _regional_ref(x[b], kept, pooling, 3.0, whiten)
      np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5, err_msg=pooling)
      alone = _apply(head, variables, x[b:b + 1], regions=kept[None])
      np.testing.assert_allclose(got[b], alone[0], rtol=1e-5, atol=1e-6, err_msg=pooling)


def test_shared_boxes_and_mask_together(rng):
  # [R, 4] boxes shared by the batch, plus a bucket mask: cells in the padding never count.
  x = np.full((2, 5, 6, 3), 99.0, np.float32)
  x[0, :5, :4] = _relu_map(rng, (5, 4, 3)) + 0.1
  x[1, :5, :6] = _relu_map(rng, (5, 6, 3)) + 0.1
  mask = np.zeros((2, 5, 6), bool)
  mask[0, :5, :4] = mask[1] = True
  boxes = np.array([[0, 0, 3, 3], [1, 2, 3, 3]], np.int32)
  head = RegionalHead(pooling="max")
  got = _apply(head, _init(head, x, regions=boxes), x, mask, regions=boxes)
  np.testing.assert_allclose(got[0], _regional_ref(x[0, :5, :4], [[0, 0, 3, 3], [1, 2, 3, 3]],
                                                   "max"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], _regional_ref(x[1], boxes, "max"), rtol=1e-5, atol=1e-6)


# --- gradients ------------------------------------------------------------------------------------

def _grads(head, variables, x, **kwargs):
  target = jnp.asarray(np.random.default_rng(5).standard_normal(
      _apply(head, variables, x, **kwargs).shape), jnp.float32)
  loss = lambda params: jnp.sum(head.apply({"params": params}, x, **kwargs) * target)
  return _np(jax.jit(jax.grad(loss))(variables["params"]))


@pytest.mark.parametrize("trainable", [True, False])
def test_gradients_reach_p_and_whitening(rng, trainable):
  x = _relu_map(rng, (3, 4, 5, 6)) + 0.01
  head = GlobalPoolHead(whiten_dims=4, whiten_trainable=trainable)
  grads = _grads(head, _init(head, x), x)
  assert np.isfinite(grads["p"]) and grads["p"] != 0
  kernel = grads["whiten"]["kernel"]
  assert np.isfinite(kernel).all()
  if trainable:
    assert np.abs(kernel).max() > 0
  else:
    np.testing.assert_array_equal(kernel, 0.0)
    np.testing.assert_array_equal(grads["whiten"]["bias"], 0.0)


def test_fixed_p_gets_no_gradient(rng):
  x = _relu_map(rng, (2, 4, 5, 3)) + 0.01
  head = GlobalPoolHead(per_channel_p=True, learn_p=False)
  grads = _grads(head, _init(head, x), x)
  np.testing.assert_array_equal(grads["p"], 0.0)


@pytest.mark.parametrize("trainable", [True, False])
def test_gradients_reach_xi_and_region_whitening(rng, trainable):
  x = _relu_map(rng, (2, 6, 8, 5)) + 0.01
  mask = np.ones((2, 6, 8), bool)
  mask[1, 4:] = False
  head = RegionalHead(pooling="gem", whiten_dims=3, whiten_trainable=trainable)
  grads = _grads(head, _init(head, x, mask), x, mask=mask)
  assert np.isfinite(grads["xi"]) and grads["xi"] != 0
  kernel = grads["whiten"]["kernel"]
  assert np.isfinite(kernel).all()
  assert (np.abs(kernel).max() > 0) == trainable


# --- bad input ------------------------------------------------------------------------------------

def test_bad_head_arguments(rng):
  x = _relu_map(rng, (2, 4, 5, 3))
  with pytest.raises(ValueError, match="pooling must be one of"):
    GlobalPoolHead(pooling="max").init(KEY, x)
  with pytest.raises(ValueError, match="pooling must be one of"):
    RegionalHead(pooling="mac").init(KEY, x)
  with pytest.raises(ValueError, match="whiten_dims must be"):
    GlobalPoolHead(whiten_dims=0).init(KEY, x)
  with pytest.raises(ValueError, match="p_init must be"):
    GlobalPoolHead(p_init=0.5).init(KEY, x)
  with pytest.raises(ValueError, match="xi_init must be"):
    RegionalHead(pooling="gem", xi_init=float("nan")).init(KEY, x)
  with pytest.raises(ValueError, match="x must be a 4-D array"):
    RegionalHead().init(KEY, x[0])
  with pytest.raises(ValueError, match="mask must have shape"):
    RegionalHead().init(KEY, x, np.ones((2, 4, 4), bool))
  with pytest.raises(ValueError, match="mask must have shape"):
    GlobalPoolHead().init(KEY, x, np.ones((2, 5, 4), bool))
  boxes = np.array([[[0, 0, 2, 2]], [[1, 1, 2, 2]]], np.int32)
  with pytest.raises(ValueError, match="region_mask needs regions"):
    RegionalHead().init(KEY, x, region_mask=np.ones((2, 1), bool))
  with pytest.raises(ValueError, match=r"region_mask must have shape \[B, R\]"):
    RegionalHead().init(KEY, x, regions=boxes, region_mask=np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="regions row"):
    RegionalHead().init(KEY, x, regions=np.array([[3, 0, 3, 2]], np.int32))


def test_bad_whitening_arguments(rng):
  vectors = rng.random((10, 4))
  with pytest.raises(ValueError, match="method must be 'pca' or 'lw'"):
    learn_head_whitening(vectors, "zca")
  with pytest.raises(ValueError, match="needs query_idx and positive_idx"):
    learn_head_whitening(vectors, "lw")
  with pytest.raises(ValueError, match="only used by method='lw'"):
    learn_head_whitening(vectors, "pca", query_idx=[0])
  head = GlobalPoolHead(whiten_dims=2)
  variables = _init(head, _relu_map(rng, (1, 3, 3, 4)))
  with pytest.raises(ValueError, match=r"whiten\['kernel'\] must have shape \(4, 2\)"):
    replace_whitening(variables, learn_head_whitening(vectors, dims=3))
  plain = GlobalPoolHead().init(KEY, _relu_map(rng, (1, 3, 3, 4)))
  with pytest.raises(ValueError, match="no params\\['whiten'\\]"):
    replace_whitening(plain, learn_head_whitening(vectors, dims=2))
