"""DARAC head (Schall et al. §III-B/C) against a numpy implementation of the paper's pipeline,
its parameter count, padded buckets, batch-norm modes and folding, gradients and PCA-w."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models.darac import (DaracHead, aggregation_parameter_count,
                                        darac_init_whitening, darac_region_matrix,
                                        fold_darac_batch_norm)
from retrieval_jax.regions import rmac_regions

EPS = 1e-3  # the head's batch-norm epsilon (TensorFlow default)


def _l2n(v):
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def _pooled_ref(x, regions):
  """42 x C per image: max over each of the 21 regions, then the average over each."""
  x = np.asarray(x, np.float64)
  maxima = [x[:, y:y + h, x0:x0 + w].max((1, 2)) for x0, y, w, h in regions]
  means = [x[:, y:y + h, x0:x0 + w].mean((1, 2)) for x0, y, w, h in regions]
  return np.stack(maxima + means, axis=1)  # [B, 42, C]


def _darac_ref(x, regions, params, stats=None, train=False):
  """§III-C: 42x1 conv with l kernels shared over channels, ReLU, batch norm over the l rows,
  l x 1 conv -> C-vector. Returns (y, batch mean, batch var)."""
  v = _pooled_ref(x, regions)
  k1, b1 = (np.asarray(params["region_conv"][k], np.float64) for k in ("kernel", "bias"))
  h = np.maximum(np.einsum("bjc,jk->bck", v, k1) + b1, 0.0)  # [B, C, l]
  mean, var = h.mean((0, 1)), h.var((0, 1))
  if "norm" in params:
    if not train:
      mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
    h = (h - mean) / np.sqrt(var + EPS) * params["norm"]["scale"] + params["norm"]["bias"]
  k2, b2 = (np.asarray(params["kernel_conv"][k], np.float64) for k in ("kernel", "bias"))
  return h @ k2[:, 0] + b2[0], mean, var


def _random_variables(head, x, rng):
  """Random parameters and running statistics of the initialised shapes."""
  shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
  rand = lambda s: rng.normal(size=s.shape).astype(np.float32)
  out = jax.tree_util.tree_map(rand, shapes)
  if "batch_stats" in out:
    out["batch_stats"]["norm"]["var"] = np.abs(out["batch_stats"]["norm"]["var"]) + 0.5
  return out


@pytest.fixture
def fmap(rng):
  # A 768x1024 image at stride 32 (24x32 map), post-ReLU-like with exact zeros.
  return np.maximum(rng.normal(size=(3, 24, 32, 8)), 0).astype(np.float32)


def test_region_matrix_is_max_then_average_over_21_regions(fmap):
  regions = rmac_regions(24, 32, 3)  # the full map + 20 regions (Fig. 3)
  assert len(regions) == 21
  got = jax.jit(darac_region_matrix)(fmap)
  assert got.shape == (3, 42, 8)
  np.testing.assert_allclose(got, _pooled_ref(fmap, regions), rtol=1e-5, atol=1e-6)


def test_parameter_count_matches_the_paper():
  """§III-C: "The two aggregation layers ... only add 43l + l + 1 (incl. bias) learnable
  parameters", l = 16, on ResNet50 V2's 2048-channel last convolution: 705, whatever C."""
  l = 16
  paper = 43 * l + l + 1
  assert paper == 705 == aggregation_parameter_count(kernels=16, levels=3)
  x = jax.ShapeDtypeStruct((1, 10, 10, 2048), jnp.float32)  # 299x299 crops at stride 32
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
  frozen = jax.eval_shape(DaracHead().init, jax.random.PRNGKey(0), x)["params"]
  assert frozen["region_conv"]["kernel"].shape == (42, 16)  # one 42x1 kernel per output row
  assert frozen["kernel_conv"]["kernel"].shape == (16, 1)
  assert count({k: frozen[k] for k in ("region_conv", "kernel_conv")}) == paper
  assert count(frozen["norm"]) == 2 * l  # batch-norm scale and offset, not in the paper's count
  folded = jax.eval_shape(DaracHead(norm="folded").init, jax.random.PRNGKey(0), x)["params"]
  assert count(folded) == paper


@pytest.mark.parametrize("whiten_dims", [None, 5])
def test_head_matches_numpy_pipeline(fmap, rng, whiten_dims):
  head = DaracHead(whiten_dims=whiten_dims)
  variables = _random_variables(head, fmap, rng)
  y, _, _ = _darac_ref(fmap, rmac_regions(24, 32, 3), variables["params"],
                       variables["batch_stats"]["norm"])
  run = jax.jit(lambda v, x: (head.apply(v, x), head.apply(v, x, raw=True),
                              head.apply(v, x, whiten=False)))
  out, raw, unwhitened = run(variables, fmap)
  np.testing.assert_allclose(raw, y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(unwhitened, _l2n(y), rtol=1e-4, atol=1e-5)
  if whiten_dims is None:
    np.testing.assert_allclose(out, _l2n(y), rtol=1e-4, atol=1e-5)
  else:
    w = variables["params"]["whiten"]
    want = _l2n(_l2n(y) @ np.asarray(w["kernel"], np.float64) + w["bias"])
    assert out.shape == (3, whiten_dims)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_train_mode_uses_batch_statistics_over_batch_and_channels(fmap, rng):
  head = DaracHead(norm="train")
  variables = _random_variables(head, fmap, rng)
  (raw, updates) = jax.jit(lambda v, x: head.apply(v, x, train=True, raw=True,
                                                   mutable=["batch_stats"]))(variables, fmap)
  y, mean, var = _darac_ref(fmap, rmac_regions(24, 32, 3), variables["params"], train=True)
  np.testing.assert_allclose(raw, y, rtol=1e-4, atol=1e-4)
  old = variables["batch_stats"]["norm"]
  np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"],
                             0.99 * old["mean"] + 0.01 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["norm"]["var"],
                             0.99 * old["var"] + 0.01 * var, rtol=1e-5, atol=1e-6)


def test_folding_the_batch_norm_is_exact(fmap, rng):
  head = DaracHead()
  variables = _random_variables(head, fmap, rng)
  folded = fold_darac_batch_norm(variables)
  assert "norm" not in folded["params"]
  run = jax.jit(lambda v, x, h: h.apply(v, x, raw=True), static_argnums=2)
  np.testing.assert_allclose(run(folded, fmap, DaracHead(norm="folded")),
                             run(variables, fmap, head), rtol=1e-4, atol=1e-5)


def test_masked_bucket_equals_unpadded_images(rng):
  head = DaracHead()
  full = np.maximum(rng.normal(size=(1, 12, 16, 6)), 0).astype(np.float32)
  small = full[:, :9, :13]
  bucket = np.concatenate([np.pad(small, ((0, 0), (0, 3), (0, 3), (0, 0)),
                                  constant_values=50.0), full])
  mask = np.ones((2, 12, 16), bool)
  mask[0, 9:] = False
  mask[0, :, 13:] = False
  variables = _random_variables(head, full, rng)
  got = np.asarray(jax.jit(head.apply)(variables, bucket, mask))
  for i, image in enumerate([small, full]):
    # Each image on the reference grid of its own map (one extra long-side window at 9x13).
    y, _, _ = _darac_ref(image, rmac_regions(image.shape[1], image.shape[2], 3),
                         variables["params"], variables["batch_stats"]["norm"])
    np.testing.assert_allclose(got[i], _l2n(y)[0], rtol=1e-4, atol=1e-5)


def test_square_maps_also_give_42_rows(rng):
  # The paper trains on 299x299 crops (10x10 maps), where the reference grid has 14 + 1 regions.
  x = np.maximum(rng.normal(size=(2, 10, 10, 4)), 0).astype(np.float32)
  assert len(rmac_regions(10, 10, 3)) == 15
  assert jax.eval_shape(darac_region_matrix, x).shape == (2, 42, 4)


def test_gradients_reach_the_convolutions(fmap, rng):
  head = DaracHead()
  variables = _random_variables(head, fmap, rng)
  stats = variables["batch_stats"]

  def loss(params):
    d = head.apply({"params": params, "batch_stats": stats}, fmap, raw=True)
    return jnp.sum((d[0] - d[1]) ** 2) - jnp.sum((d[0] - d[2]) ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for layer in ("region_conv", "kernel_conv", "norm"):
    for name, g in grads[layer].items():
      g = np.asarray(g)
      assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, (layer, name)


def test_pca_whitening_post_processing(rng):
  head = DaracHead(whiten_dims=4)
  x = np.maximum(rng.normal(size=(40, 6, 8, 8)), 0).astype(np.float32)
  variables = _random_variables(head, x, rng)
  describe = jax.jit(lambda v, x: head.apply(v, x, whiten=False))
  descriptors = np.asarray(describe(variables, x), np.float64)
  whitened_vars = darac_init_whitening(variables, descriptors)
  w = whitened_vars["params"]["whiten"]
  # §III-C: PCA whitening of the L2-normalised training descriptors: the kept components are
  # centred, decorrelated, unit variance, in decreasing order of variance.
  z = descriptors @ np.asarray(w["kernel"], np.float64) + np.asarray(w["bias"], np.float64)
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-3)
  np.testing.assert_allclose(jax.jit(head.apply)(whitened_vars, x), _l2n(z), rtol=1e-3, atol=1e-4)
  # The whitening is fixed: no gradient reaches it.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(head.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, x)[:, 0])))(
          whitened_vars["params"])
  assert float(jnp.abs(grads["whiten"]["kernel"]).sum()) == 0.0


def test_bad_inputs_name_the_argument(fmap, rng):
  check = lambda head, *args: jax.eval_shape(head.init, jax.random.PRNGKey(0), *args)
  with pytest.raises(ValueError, match="x must be a 4-D"):
    check(DaracHead(), fmap[0])
  with pytest.raises(ValueError, match="norm must be one of"):
    check(DaracHead(norm="batch"), fmap)
  with pytest.raises(ValueError, match="kernels must be a positive"):
    check(DaracHead(kernels=0), fmap)
  with pytest.raises(ValueError, match="levels must be a positive"):
    check(DaracHead(levels=0), fmap)
  with pytest.raises(ValueError, match="whiten_dims"):
    check(DaracHead(whiten_dims=9), fmap)
  with pytest.raises(ValueError, match="mask"):
    check(DaracHead(), fmap, np.ones((3, 24, 31), bool))
  variables = _random_variables(DaracHead(), fmap, rng)
  with pytest.raises(ValueError, match="whiten_dims"):
    darac_init_whitening(variables, rng.random((10, 8)))
  with pytest.raises(ValueError, match="descriptors must be"):
    darac_init_whitening(_random_variables(DaracHead(whiten_dims=3), fmap, rng),
                         rng.random((10, 7)))
  with pytest.raises(ValueError, match="batch_stats"):
    fold_darac_batch_norm({"params": variables["params"]})
