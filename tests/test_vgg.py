"""Tests for the plain convolutional stacks (VGG-16/19, AlexNet) and their converters.

References are independent of ``retrieval_jax.models.vgg``: torchvision models (random weights,
eval mode), Keras ``VGG16(weights=None)`` when tensorflow is installed, torch's own
``adaptive_avg_pool2d``, and tap shapes / torchvision tensor names written out by hand.
"""

from __future__ import annotations

import functools

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import vgg
from retrieval_jax.models.common import preprocess

# torchvision's nn.Sequential indices and shapes, written out by hand (not from vgg.py's spec).
_VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
_TV_CONVS = {
    "vgg16": list(zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
                      [3] + _VGG16_WIDTHS[:-1], _VGG16_WIDTHS, [3] * 13)),
    "alexnet": list(zip([0, 3, 6, 8, 10], [3, 64, 192, 384, 256], [64, 192, 384, 256, 256],
                        [11, 5, 3, 3, 3])),
}
_TV_CLASSIFIER = {
    "vgg16": list(zip([0, 3, 6], [512 * 7 * 7, 4096, 4096], [4096, 4096, 1000])),
    "alexnet": list(zip([1, 4, 6], [256 * 6 * 6, 4096, 4096], [4096, 4096, 1000])),
}
# Keras VGG16 layer names and kernel shapes (HWIO).
_KERAS_CONVS = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                for i in range(1, n + 1)]


def _rel_diff(a, b) -> float:
  """Max absolute difference relative to the reference's max magnitude."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _fake_torchvision_state_dict(arch: str, classifier: bool = True) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict of zeros (names and shapes only)."""
  sd = {}
  for idx, cin, cout, k in _TV_CONVS[arch]:
    sd[f"features.{idx}.weight"] = np.zeros((cout, cin, k, k), np.float32)
    sd[f"features.{idx}.bias"] = np.zeros((cout,), np.float32)
  if classifier:
    for idx, fin, fout in _TV_CLASSIFIER[arch]:
      sd[f"classifier.{idx}.weight"] = np.zeros((fout, fin), np.float32)
      sd[f"classifier.{idx}.bias"] = np.zeros((fout,), np.float32)
  return sd


def _apply(module, variables, x, **kwargs):
  """``module.apply`` compiled as one program (op-by-op dispatch compiles every layer alone)."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


def _images(rng: np.random.Generator, shape, mode: str) -> np.ndarray:
  return np.asarray(preprocess(rng.integers(0, 256, shape).astype(np.float32), mode))


# ---------------------------------------------------------------------------------------------
# Adaptive average pooling.


@pytest.mark.parametrize("size_in,size_out", [((7, 7), 7), ((3, 4), 7), ((9, 10), 7),
                                              ((8, 13), 6), ((1, 1), 6), ((14, 14), 7)])
def test_adaptive_avg_pool_matches_torch(rng, size_in, size_out):
  torch = pytest.importorskip("torch")
  x = rng.standard_normal((2, *size_in, 5)).astype(np.float32)
  want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                                 size_out).numpy().transpose(0, 2, 3, 1)
  got = vgg.adaptive_avg_pool(jnp.asarray(x), size_out)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_adaptive_avg_pool_bins_by_hand():
  # 3 -> 2 cells: torch bins [0, 2) and [1, 3) overlap on the middle cell.
  x = jnp.asarray([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
  np.testing.assert_allclose(np.asarray(vgg.adaptive_avg_pool(x, (2, 1))).ravel(), [1.5, 3.0])
  # 2 -> 3 cells (upsampling): bins [0, 1), [0, 2), [1, 2).
  x = jnp.asarray([2.0, 4.0]).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(np.asarray(vgg.adaptive_avg_pool(x, (1, 3))).ravel(),
                             [2.0, 3.0, 4.0])


# ---------------------------------------------------------------------------------------------
# Parity with torchvision (random weights, eval mode).


def _torchvision(arch: str):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None).eval()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return torch, model, state


@pytest.fixture(scope="module")
def torch_vgg16():
  torch, model, state = _torchvision("vgg16")
  return torch, model, state, vgg.plain_from_torchvision(state, "vgg16", num_classes=1000)


@pytest.fixture(scope="module")
def torch_alexnet():
  torch, model, state = _torchvision("alexnet")
  return torch, model, state, vgg.plain_from_torchvision(state, "alexnet", num_classes=1000)


def _torch_outputs(torch, model, x_nhwc):
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    conv = model.features[:-1](x).numpy().transpose(0, 2, 3, 1)
    return conv, model(x).numpy()


@pytest.mark.slow
def test_vgg16_matches_torchvision(rng, torch_vgg16):
  # 100x130: conv5_3 6x8, pool5 3x4, which adaptive pooling upsamples to 7x7 with repeated
  # cells (AlexNet below covers downsampling with overlapping bins; Keras covers 224 px).
  torch, model, _, variables = torch_vgg16
  x = _images(rng, (2, 100, 130, 3), "torchvision")
  conv, logits = _torch_outputs(torch, model, x)
  out = _apply(vgg.vgg16(taps=("conv5_3", "logits"), num_classes=1000), variables, x)
  assert _rel_diff(out["conv5_3"], conv) < 1e-4
  assert _rel_diff(out["logits"], logits) < 1e-4
  # The default output of the feature extractor (no classifier) is the same map.
  features = {"params": {k: v for k, v in variables["params"].items() if k.startswith("conv")}}
  assert _rel_diff(_apply(vgg.vgg16(), features, x), conv) < 1e-4


@pytest.mark.parametrize("size", [(100, 130), (300, 290)])
def test_alexnet_matches_torchvision(rng, torch_alexnet, size):
  # 100x130: pool3 2x3 (upsampled to 6x6); 300x290: pool3 8x8 -> 6x6, overlapping bins.
  torch, model, _, variables = torch_alexnet
  x = _images(rng, (2, *size, 3), "torchvision")
  conv, logits = _torch_outputs(torch, model, x)
  out = _apply(vgg.alexnet(taps=("conv5", "logits"), num_classes=1000), variables, x)
  assert _rel_diff(out["conv5"], conv) < 1e-4
  assert _rel_diff(out["logits"], logits) < 1e-4


def test_vgg19_features_match_torchvision(rng):
  torch, model, state = _torchvision("vgg19")
  # The full state dict converts without a classifier: classifier.* is ignored.
  variables = vgg.plain_from_torchvision(state, "vgg19")
  x = _images(rng, (2, 64, 48, 3), "torchvision")
  conv, _ = _torch_outputs(torch, model, x)
  out = _apply(vgg.vgg19(), variables, x)
  assert out.shape == (2, 4, 3, 512)
  assert _rel_diff(out, conv) < 1e-4


def test_classifier_flattens_like_torch(rng):
  """fc6 applied to torch's NCHW flatten, in numpy, without torch."""
  arch = vgg.PlainArch("tiny", (vgg.ConvSpec("c1", 3, 3), vgg.PoolSpec("p1", 2, 2)),
                       classifier_pool=2, hidden=5)
  # A torchvision-layout state dict of this tiny net: fc6 input is (C=3, 2, 2) flattened.
  state = {"features.0.weight": rng.standard_normal((3, 3, 3, 3)).astype(np.float32),
           "features.0.bias": rng.standard_normal(3).astype(np.float32),
           "classifier.0.weight": rng.standard_normal((5, 12)).astype(np.float32),
           "classifier.0.bias": rng.standard_normal(5).astype(np.float32),
           "classifier.3.weight": rng.standard_normal((5, 5)).astype(np.float32),
           "classifier.3.bias": rng.standard_normal(5).astype(np.float32),
           "classifier.6.weight": rng.standard_normal((4, 5)).astype(np.float32),
           "classifier.6.bias": rng.standard_normal(4).astype(np.float32)}
  variables = vgg.plain_from_torchvision(state, arch, num_classes=4)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  out = _apply(vgg.ConvStack(arch, taps=("p1", "logits"), num_classes=4), variables, x)
  flat = np.asarray(out["p1"]).transpose(0, 3, 1, 2).reshape(2, -1)  # torch's (C, H, W) order
  h = np.maximum(flat @ state["classifier.0.weight"].T + state["classifier.0.bias"], 0)
  h = np.maximum(h @ state["classifier.3.weight"].T + state["classifier.3.bias"], 0)
  want = h @ state["classifier.6.weight"].T + state["classifier.6.bias"]
  np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Keras VGG16 .h5 files.


def _write_keras2(path, layers: dict[str, list[np.ndarray]], full_model: bool) -> None:
  """Writes the Keras 2 legacy layout by hand: ``[model_weights/]<layer>/<layer>/kernel:0``."""
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if full_model else f
    root.attrs["layer_names"] = np.array([n.encode() for n in ["input_1", *layers]])
    root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
    for name, (kernel, bias) in layers.items():
      group = root.create_group(name)
      group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(),
                                              f"{name}/bias:0".encode()])
      group.create_dataset(f"{name}/kernel:0", data=kernel)
      group.create_dataset(f"{name}/bias:0", data=bias)


def _write_keras3_weights(path, layers: dict[str, list[np.ndarray]]) -> None:
  """Writes Keras 3's ``.weights.h5`` layout by hand: ``layers/conv2d[_i]/vars/{0,1}``."""
  with h5py.File(path, "w") as f:
    counts: dict[str, int] = {}
    for name, (kernel, bias) in layers.items():
      kind = "conv2d" if kernel.ndim == 4 else "dense"
      i = counts.get(kind, 0)
      counts[kind] = i + 1
      group = f.create_group(f"layers/{kind if i == 0 else f'{kind}_{i}'}/vars")
      group.create_dataset("0", data=kernel)
      group.create_dataset("1", data=bias)
    f.create_group("layers/max_pooling2d/vars")  # weightless layers are stored empty
    f.create_group("vars")


@pytest.fixture(scope="module")
def keras_like_convs() -> dict[str, list[np.ndarray]]:
  """Random VGG16 conv weights under Keras names, HWIO."""
  rng = np.random.default_rng(1)
  widths = [3] + _VGG16_WIDTHS
  return {name: [rng.standard_normal((3, 3, widths[i], widths[i + 1]), np.float32) * 0.05,
                 rng.standard_normal(widths[i + 1], np.float32)]
          for i, name in enumerate(_KERAS_CONVS)}


@pytest.mark.parametrize("layout", ["keras2_weights", "keras2_model", "keras3_weights"])
def test_keras_layouts_read_every_layer(tmp_path, keras_like_convs, layout):
  path = tmp_path / "vgg16.h5"
  if layout == "keras3_weights":
    _write_keras3_weights(path, keras_like_convs)
  else:
    _write_keras2(path, keras_like_convs, full_model=layout == "keras2_model")
  params = vgg.vgg16_from_keras_h5(path)["params"]
  assert sorted(params) == sorted(f"conv{n[5]}_{n[-1]}" for n in _KERAS_CONVS)
  for name, (kernel, bias) in keras_like_convs.items():
    ours = params[f"conv{name[5]}_{name[-1]}"]
    np.testing.assert_array_equal(ours["kernel"], kernel)
    np.testing.assert_array_equal(ours["bias"], bias)
  with h5py.File(path, "r") as f:  # an open file works too
    assert sorted(vgg.vgg16_from_keras_h5(f)["params"]) == sorted(params)


def test_keras_missing_layer_is_named(tmp_path):
  tiny = [np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)]
  layers = {name: tiny for name in _KERAS_CONVS if name != "block3_conv2"}
  _write_keras2(tmp_path / "w.h5", layers, full_model=False)
  with pytest.raises(ValueError, match=r"1 missing layer.*block3_conv2"):
    vgg.vgg16_from_keras_h5(tmp_path / "w.h5")


def test_keras_notop_file_has_no_classifier(tmp_path, keras_like_convs):
  _write_keras2(tmp_path / "notop.h5", keras_like_convs, full_model=False)
  with pytest.raises(ValueError, match=r"missing layer.*'fc1', 'fc2', 'predictions'"):
    vgg.vgg16_from_keras_h5(tmp_path / "notop.h5", num_classes=1000)


def test_keras_unexpected_layer_and_wrong_shape(tmp_path, keras_like_convs):
  extra = dict(keras_like_convs, block6_conv1=keras_like_convs["block5_conv3"])
  _write_keras2(tmp_path / "extra.h5", extra, full_model=True)
  with pytest.raises(ValueError, match=r"unexpected.*block6_conv1"):
    vgg.vgg16_from_keras_h5(tmp_path / "extra.h5")
  bad = dict(keras_like_convs, block2_conv1=[keras_like_convs["block2_conv1"][0],
                                             np.zeros(7, np.float32)])
  _write_keras2(tmp_path / "bad.h5", bad, full_model=False)
  with pytest.raises(ValueError, match=r"wrong shapes.*conv2_1/bias: \(7,\) != \(128,\)"):
    vgg.vgg16_from_keras_h5(tmp_path / "bad.h5")
  # A VGG19 saved by Keras 3 (16 conv2d layers) is not a VGG16.
  vgg19_like = dict(keras_like_convs, **{f"x{i}": keras_like_convs["block5_conv3"]
                                         for i in range(3)})
  _write_keras3_weights(tmp_path / "v19.weights.h5", vgg19_like)
  with pytest.raises(ValueError, match=r"3 unexpected.*conv2d_13"):
    vgg.vgg16_from_keras_h5(tmp_path / "v19.weights.h5")


@pytest.fixture(scope="module")
def keras_vgg16_notop(tmp_path_factory):
  """Keras VGG16 (random weights, no top) saved in the three layouts, and its outputs."""
  pytest.importorskip("tensorflow")
  keras = pytest.importorskip("keras")
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 80, 3))
  x = _images(np.random.default_rng(0), (2, 64, 80, 3), "caffe")
  reference = keras.Model(model.input, [model.get_layer("block5_conv3").output, model.output])
  conv, pool = reference.predict(x, verbose=0)
  directory = tmp_path_factory.mktemp("keras")
  paths = {"keras3_weights": directory / "vgg16.weights.h5",
           "keras_model": directory / "vgg16_model.h5",
           "keras2_weights": directory / "vgg16_keras2.h5"}
  model.save_weights(paths["keras3_weights"])
  model.save(paths["keras_model"])
  _write_keras2(paths["keras2_weights"],
                {layer.name: layer.get_weights() for layer in model.layers if layer.weights},
                full_model=False)
  return paths, x, conv, pool


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside Keras
@pytest.mark.parametrize("layout", ["keras3_weights", "keras_model", "keras2_weights"])
def test_vgg16_matches_keras(keras_vgg16_notop, layout):
  paths, x, conv, pool = keras_vgg16_notop
  variables = vgg.vgg16_from_keras_h5(paths[layout])
  out = _apply(vgg.vgg16(taps=("conv5_3", "pool5")), variables, x)
  assert _rel_diff(out["conv5_3"], conv) < 1e-4
  assert _rel_diff(out["pool5"], pool) < 1e-4
  assert _rel_diff(_apply(vgg.vgg16(keep_last_pool=True), variables, x), pool) < 1e-4


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside Keras
def test_vgg16_logits_match_keras(tmp_path):
  pytest.importorskip("tensorflow")
  keras = pytest.importorskip("keras")
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, classes=10, classifier_activation=None)
  x = _images(np.random.default_rng(0), (1, 224, 224, 3), "caffe")
  logits = model.predict(x, verbose=0)
  model.save(tmp_path / "vgg16.h5")
  variables = vgg.vgg16_from_keras_h5(tmp_path / "vgg16.h5", num_classes=10)
  assert _rel_diff(_apply(vgg.vgg16(taps=("logits",), num_classes=10), variables, x)["logits"],
                   logits) < 1e-4
  # Without num_classes, the classifier layers are ignored.
  assert "fc6" not in vgg.vgg16_from_keras_h5(tmp_path / "vgg16.h5")["params"]


# ---------------------------------------------------------------------------------------------
# Taps, shapes, dtypes.


def _random_variables(module, input_shape, seed: int = 2):
  """He-scaled random weights drawn in numpy (``module.init`` costs seconds of compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))

  def draw(leaf):
    if len(leaf.shape) == 1:
      return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)
    std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape, np.float32) * std).astype(np.float32)

  return jax.tree_util.tree_map(draw, shapes)


@pytest.fixture(scope="module")
def vgg16_variables():
  return _random_variables(vgg.vgg16(), (1, 64, 64, 3))


def test_vgg16_tap_shapes_and_strides():
  strides = {"conv1_1": 1, "conv1_2": 1, "pool1": 2, "conv2_1": 2, "conv2_2": 2, "pool2": 4,
             "conv3_1": 4, "conv3_2": 4, "conv3_3": 4, "pool3": 8, "conv4_1": 8, "conv4_2": 8,
             "conv4_3": 8, "pool4": 16, "conv5_1": 16, "conv5_2": 16, "conv5_3": 16,
             "pool5": 32}
  channels = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
  assert vgg.PLAIN_ARCHS["vgg16"].tap_strides() == strides
  out, _ = jax.eval_shape(vgg.vgg16(taps=tuple(strides)).init_with_output,
                          jax.random.PRNGKey(0), jnp.zeros((2, 64, 96, 3)))
  assert sorted(out) == sorted(strides)  # (eval_shape sorts dict keys; order: early-stop test)
  for name, s in strides.items():
    assert out[name].shape == (2, 64 // s, 96 // s, channels[int(name[4])]), name
  default, _ = jax.eval_shape(vgg.vgg16().init_with_output, jax.random.PRNGKey(0),
                              jnp.zeros((1, 64, 96, 3)))
  assert default.shape == (1, 4, 6, 512)  # conv5_3, stride 16
  v19, _ = jax.eval_shape(vgg.vgg19(taps=("conv5_4", "pool5")).init_with_output,
                          jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)))
  assert v19["conv5_4"].shape == (1, 4, 6, 512) and v19["pool5"].shape == (1, 2, 3, 512)


def test_alexnet_tap_shapes():
  # 100x130: conv1 (11x11/4, pad 2) 24x31, pool1 (3/2) 11x15, pool2 5x7, pool3 2x3.
  want = {"conv1": (24, 31, 64), "pool1": (11, 15, 64), "conv2": (11, 15, 192),
          "pool2": (5, 7, 192), "conv3": (5, 7, 384), "conv4": (5, 7, 256),
          "conv5": (5, 7, 256), "pool3": (2, 3, 256), "logits": (7,)}
  out, _ = jax.eval_shape(vgg.alexnet(taps=tuple(want), num_classes=7).init_with_output,
                          jax.random.PRNGKey(0), jnp.zeros((3, 100, 130, 3)))
  assert {k: v.shape for k, v in out.items()} == {k: (3, *v) for k, v in want.items()}


def test_early_stop_equals_full_run_and_init_builds_every_layer(rng, vgg16_variables):
  x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
  early = vgg.vgg16(taps=("conv3_1", "pool1"))
  params = jax.eval_shape(early.init, jax.random.PRNGKey(0), x)["params"]
  assert sorted(params) == sorted(vgg16_variables["params"])  # one variable set for any taps
  # Applying stops at conv3_1: the later layers' variables are not even needed.
  needed = {"params": {k: v for k, v in vgg16_variables["params"].items()
                       if k in ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")}}
  np.testing.assert_array_equal(_apply(early, needed, x)["conv3_1"],
                                _apply(early, vgg16_variables, x)["conv3_1"])
  full = _apply(vgg.vgg16(taps=("pool1", "conv3_1", "conv5_3")), vgg16_variables, x)
  got = _apply(early, vgg16_variables, x)
  assert list(got) == ["conv3_1", "pool1"]  # in the order asked
  for name in got:  # separately compiled programs: equal up to float reassociation
    np.testing.assert_allclose(got[name], full[name], rtol=1e-6,
                               atol=1e-6 * float(np.abs(full[name]).max()))


def test_bad_taps_are_rejected_before_computing():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match=r"no tap 'conv5_4'.*'conv5_3', 'pool5'"):
    vgg.vgg16(taps=("conv1_1", "conv5_4")).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"no tap 'logits'"):  # no classifier
    vgg.alexnet(taps=("logits",)).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"sequence of names"):
    vgg.vgg16(taps="conv5_3").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"unknown plain architecture 'vgg11'.*alexnet"):
    vgg.ConvStack("vgg11").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"\(1, 12, 64, 3\) is too small.*pool4"):
    jax.eval_shape(vgg.vgg16().init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 64, 3)))


def test_bfloat16_close_to_float32(rng, vgg16_variables):
  x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
  f32 = jax.jit(vgg.vgg16().apply)(vgg16_variables, x)
  b16 = jax.jit(vgg.vgg16(dtype=jnp.bfloat16).apply)(vgg16_variables, x)
  assert b16.dtype == jnp.bfloat16 and f32.dtype == jnp.float32
  assert _rel_diff(b16, f32) < 0.1


def test_dropout_only_in_training(rng):
  arch = vgg.PlainArch("tiny", (vgg.ConvSpec("c1", 4, 3), vgg.PoolSpec("p1", 2, 2)),
                       classifier_pool=2, hidden=16)
  model = vgg.ConvStack(arch, taps=("logits",), num_classes=3)
  x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
  variables = _random_variables(model, x.shape)
  evaluated = _apply(model, variables, x)
  np.testing.assert_array_equal(_apply(model, variables, x, train=False)["logits"],
                                evaluated["logits"])
  train = jax.jit(
      lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key})["logits"])
  evaluated = evaluated["logits"]
  a = train(variables, jax.random.PRNGKey(1))
  b = train(variables, jax.random.PRNGKey(1))
  c = train(variables, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, evaluated) and not np.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# torchvision converter errors (state dicts of zeros; no torch needed).


@pytest.mark.slow  # shares the VGG-16 fixture (torch init + conversion, ~5 s)
def test_torchvision_state_dict_names_match_the_hand_written_ones(torch_vgg16, torch_alexnet):
  # Keeps the zero state dicts below honest: same names and shapes as torchvision's.
  for arch, (_, _, state, _) in (("vgg16", torch_vgg16), ("alexnet", torch_alexnet)):
    want = _fake_torchvision_state_dict(arch)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in want.items()}


def test_converter_missing_key():
  state = _fake_torchvision_state_dict("vgg16", classifier=False)
  del state["features.12.weight"]
  with pytest.raises(ValueError, match=r"1 missing tensor.*'features.12.weight'"):
    vgg.plain_from_torchvision(state, "vgg16")
  state = _fake_torchvision_state_dict("vgg16", classifier=False)
  with pytest.raises(ValueError, match=r"6 missing.*'classifier.0.weight'"):
    vgg.plain_from_torchvision(state, "vgg16", num_classes=1000)


def test_converter_other_architecture_and_unexpected_key():
  state = _fake_torchvision_state_dict("alexnet", classifier=False)
  with pytest.raises(ValueError, match=r"missing.*'features.2.weight'.*unexpected.*"
                                       r"'features.3.bias'"):
    vgg.plain_from_torchvision(state, "vgg16")
  state = _fake_torchvision_state_dict("alexnet", classifier=False)
  state["features.12.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r"1 unexpected tensor.*'features.12.weight'"):
    vgg.plain_from_torchvision(state, "alexnet")


def test_converter_wrong_shape():
  state = _fake_torchvision_state_dict("alexnet")
  state["features.3.bias"] = np.zeros((191,), np.float32)
  state["classifier.1.weight"] = np.zeros((4096, 1000), np.float32)
  with pytest.raises(ValueError, match=r"2 with wrong shapes.*conv2/bias: \(191,\) != \(192,\)"
                                       r".*fc6/kernel: \(1000, 4096\) != \(9216, 4096\)"):
    vgg.plain_from_torchvision(state, "alexnet", num_classes=1000)
  with pytest.raises(ValueError, match=r"fc8/bias: \(1000,\) != \(10,\)"):
    vgg.plain_from_torchvision(_fake_torchvision_state_dict("alexnet"), "alexnet",
                               num_classes=10)


def test_mask_makes_a_padded_bucket_equal_the_unpadded_image(rng):
  arch = vgg.PlainArch("tiny", (vgg.ConvSpec("c1", 4, 3), vgg.PoolSpec("p1", 2, 2),
                                vgg.ConvSpec("c2", 5, 3), vgg.PoolSpec("p2", 2, 2),
                                vgg.ConvSpec("c3", 6, 3)), classifier_pool=2, hidden=8)
  model = vgg.ConvStack(arch, taps=("c3",))
  variables = _random_variables(model, (1, 16, 16, 3))
  image = rng.standard_normal((1, 12, 8, 3)).astype(np.float32)
  bucket = np.full((1, 16, 16, 3), 7.0, np.float32)  # padding that would leak if unmasked
  bucket[:, :12, :8] = image
  mask = np.zeros((1, 16, 16), bool)
  mask[:, :12, :8] = True
  alone = _apply(model, variables, image)["c3"]
  padded = jax.jit(lambda v, x, m: model.apply(v, x, mask=m))(variables, bucket, mask)["c3"]
  np.testing.assert_allclose(padded[:, :3, :2], alone, rtol=1e-5, atol=1e-5)
