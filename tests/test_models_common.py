"""Backbone conventions: batch-norm modes and folding, taps, preprocessing, conversion checks,
and the orbax round trip of variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import common
from retrieval_jax.models.variables_io import load_variables, save_variables


class _ConvBn(nn.Module):
  """conv -> BN -> ReLU -> conv -> BN, following the "<name>" / "<name>_bn" convention."""
  norm: str = "frozen"

  @nn.compact
  def __call__(self, x, train: bool = False):
    bias = self.norm == "folded"
    x = nn.Conv(4, (3, 3), use_bias=bias, name="conv1")(x)
    x = common.batch_norm(self.norm, train, epsilon=1e-3, name="conv1_bn", dtype=jnp.float32)(x)
    x = nn.relu(x)
    x = nn.Conv(5, (1, 1), use_bias=bias, name="conv2")(x)
    return common.batch_norm(self.norm, train, epsilon=1e-3, name="conv2_bn",
                             dtype=jnp.float32)(x)


def _random_bn_variables(rng):
  variables = _ConvBn().init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  for name, c in (("conv1_bn", 4), ("conv2_bn", 5)):
    variables["params"][name] = {"scale": rng.uniform(0.5, 2, c), "bias": rng.normal(size=c)}
    variables["batch_stats"][name] = {"mean": rng.normal(size=c), "var": rng.uniform(0.1, 3, c)}
  return variables


def test_fold_batch_norm_matches_frozen_model(rng):
  variables = _random_bn_variables(rng)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  frozen = _ConvBn("frozen").apply(variables, x)
  folded_vars = common.fold_batch_norm(variables, epsilon=1e-3)
  assert set(folded_vars) == {"params"}
  assert set(folded_vars["params"]) == {"conv1", "conv2"}
  folded = _ConvBn("folded").apply(folded_vars, x)
  np.testing.assert_allclose(folded, frozen, rtol=1e-5, atol=1e-5)


def test_frozen_norm_never_updates_statistics_train_norm_does(rng):
  variables = _random_bn_variables(rng)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  _, frozen = _ConvBn("frozen").apply(variables, x, train=True, mutable=["batch_stats"])
  _, trained = _ConvBn("train").apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(frozen["batch_stats"]["conv1_bn"]["mean"],
                                variables["batch_stats"]["conv1_bn"]["mean"])
  assert not np.allclose(trained["batch_stats"]["conv1_bn"]["mean"],
                         variables["batch_stats"]["conv1_bn"]["mean"])
  with pytest.raises(ValueError, match="norm must be one of"):
    common.batch_norm("batch", False, epsilon=1e-5, name="x", dtype=jnp.float32)


def test_preprocess_modes_match_their_formulas():
  img = np.array([[[[0, 128, 255]]]], np.uint8)
  np.testing.assert_allclose(common.preprocess(img, "torchvision")[0, 0, 0],
                             [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224,
                              (1 - 0.406) / 0.225], rtol=1e-6)
  np.testing.assert_allclose(common.preprocess(img, "efficientnet_lite")[0, 0, 0],
                             [-127 / 128, 1 / 128, 1.0], rtol=1e-6)
  np.testing.assert_allclose(common.preprocess(img, "caffe")[0, 0, 0],
                             [255 - 103.939, 128 - 116.779, 0 - 123.68], rtol=1e-6)
  np.testing.assert_allclose(common.preprocess(img, "inception")[0, 0, 0],
                             [-1.0, 128 / 127.5 - 1, 1.0], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="images must be"):
    common.preprocess(np.zeros((2, 2, 3)), "caffe")
  with pytest.raises(ValueError, match="mode must be one of"):
    common.preprocess(img, "keras")


def test_select_taps():
  feats = {"stem": 1, "stage1": 2, "stage2": 3}
  assert common.select_taps(feats, None, "stage2", "m") == 3
  assert common.select_taps(feats, ("stage1", "stem"), "stage2", "m") == {"stage1": 2, "stem": 1}
  with pytest.raises(ValueError, match=r"m has no tap 'stage9'; available taps: \['stem'"):
    common.select_taps(feats, ("stage9",), "stage2", "m")
  with pytest.raises(ValueError, match="sequence of names"):
    common.check_taps("stage1", list(feats), "m")


def test_assemble_variables_reports_missing_unexpected_and_shapes():
  module = _ConvBn()
  good = {("params", "conv1", "kernel"): np.zeros((3, 3, 3, 4)),
          ("params", "conv2", "kernel"): np.zeros((1, 1, 4, 5))}
  for name, c in (("conv1_bn", 4), ("conv2_bn", 5)):
    good.update({("params", name, "scale"): np.ones(c), ("params", name, "bias"): np.zeros(c),
                 ("batch_stats", name, "mean"): np.zeros(c),
                 ("batch_stats", name, "var"): np.ones(c)})
  out = common.assemble_variables(good, module, (1, 8, 8, 3), "test ckpt", "convbn")
  assert out["params"]["conv1"]["kernel"].dtype == np.float32
  bad = dict(good)
  del bad[("params", "conv2", "kernel")]
  bad[("params", "conv3", "kernel")] = np.zeros(1)
  bad[("params", "conv1", "kernel")] = np.zeros((5, 5, 3, 4))
  with pytest.raises(ValueError) as err:
    common.assemble_variables(bad, module, (1, 8, 8, 3), "test ckpt", "convbn")
  msg = str(err.value)
  assert "1 missing, first ['params/conv2/kernel']" in msg
  assert "1 unexpected, first ['params/conv3/kernel']" in msg
  assert "params/conv1/kernel: (5, 5, 3, 4) != (3, 3, 3, 4)" in msg
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\), first \['fc.weight'\]"):
    common.check_source_keys(["a", "fc.weight"], ["a"], "torchvision state dict", "resnet50")


def test_variables_round_trip_and_errors(tmp_path, rng):
  variables = _random_bn_variables(rng)
  save_variables(tmp_path / "ckpt", variables)
  restored = load_variables(tmp_path / "ckpt")
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, variables)
  with pytest.raises(ValueError, match="already exists"):
    save_variables(tmp_path / "ckpt", variables)
  save_variables(tmp_path / "ckpt", {"params": {"w": np.ones(2)}}, force=True)
  assert list(load_variables(tmp_path / "ckpt")["params"]) == ["w"]
  with pytest.raises(ValueError, match="does not exist"):
    load_variables(tmp_path / "missing")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "file.txt").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="not a readable orbax checkpoint"):
    load_variables(tmp_path / "junk")
