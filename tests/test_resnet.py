"""ResNet / ResNeXt / ResNet v2: parity with torchvision and Keras, taps, norm modes, dtypes and
the converters' error messages.

The references are the frameworks themselves: randomly initialised torchvision models (with
random batch-norm statistics and affine, so every norm is exercised) and, when tensorflow is
installed, Keras' ``ResNet50V2``. Inputs have odd sizes (70 x 102) so that any padding that is not
torch's/Keras' (e.g. "SAME" at stride 2) shows up as a shifted map.
"""

from __future__ import annotations

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import common
from retrieval_jax.models import resnet as R

H, W = 70, 102  # odd sizes: torch's floor arithmetic and explicit padding matter
TAPS = ("stem", "stage1", "stage2", "stage3", "stage4")


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _random_init(model: R.ResNet, rng: np.random.Generator, shape=(1, 32, 32, 3)):
  """Random variables of ``model`` drawn with numpy (He-normal kernels, random biases, batch-norm
  statistics and affine, so that no norm is an identity). Only the shapes come from Flax:
  ``jax.eval_shape`` is instant, while compiling ``model.init`` (threefry for every kernel) takes
  seconds on CPU."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5 if name == "scale" else 2.0, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.2, leaf.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


# --------------------------------------------------------------------------------------------
# torchvision parity.


def _torch_model(arch: str, seed: int = 0):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(seed)
  model = getattr(torchvision.models, arch)(weights=None).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(0.0, 0.2, generator=gen)
        module.running_mean.normal_(0.0, 0.2, generator=gen)
        module.running_var.uniform_(0.5, 2.0, generator=gen)
  return model


def _numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _torch_taps(model, x_nchw) -> dict[str, np.ndarray]:
  """torchvision's own modules run one by one: the stem, each ``layerN``, and the logits."""
  import torch
  with torch.no_grad():
    y = model.maxpool(model.relu(model.bn1(model.conv1(x_nchw))))
    out = {"stem": y}
    for s in range(1, 5):
      y = getattr(model, f"layer{s}")(y)
      out[f"stage{s}"] = y
    out["logits"] = model(x_nchw)
  # NCHW -> NHWC
  return {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in out.items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_matches_torchvision_on_every_tap(arch, rng):
  model = _torch_model(arch)  # skips without torch/torchvision
  import torch
  x = rng.normal(size=(2, H, W, 3)).astype(np.float32)
  want = _torch_taps(model, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))

  variables = R.resnet_from_torchvision(_numpy_state_dict(model), arch, num_classes=1000)
  net = R.get_resnet(arch, taps=TAPS + ("logits",), num_classes=1000)
  got = jax.jit(net.apply)(variables, x)
  for tap in TAPS + ("logits",):
    assert _relative_error(got[tap], want[tap]) < 1e-4, tap

  # Without taps: the last conv map; the classifier in the state dict is then ignored.
  plain = R.resnet_from_torchvision(_numpy_state_dict(model), arch)
  assert "fc" not in plain["params"]
  last = jax.jit(R.get_resnet(arch).apply)(plain, x)
  assert _relative_error(last, want["stage4"]) < 1e-4


@pytest.fixture(scope="module")
def torch_state_dicts():
  """State dicts of resnet18 and resnet50 (torch's random init; values do not matter here)."""
  return {arch: _numpy_state_dict(_torch_model(arch)) for arch in ("resnet18", "resnet50")}


def _meta_shapes(arch: str) -> dict[str, np.ndarray]:
  """A torchvision state dict with the right shapes and no memory: built on torch's meta
  device, each tensor replaced by a broadcast zero of its shape."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  with torch.device("meta"):
    model = getattr(torchvision.models, arch)(weights=None)
  zero = np.zeros((), np.float32)
  return {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152", "resnext101_32x8d"])
def test_deep_architectures_take_torchvision_shapes(arch):
  variables = R.resnet_from_torchvision(_meta_shapes(arch), arch, num_classes=1000)
  n_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
  # torchvision's documented parameter counts.
  assert n_params == {"resnet34": 21_797_672, "resnet101": 44_549_160,
                      "resnet152": 60_192_808, "resnext101_32x8d": 88_791_336}[arch]


def test_resnext101_32x4d_has_the_published_size():
  shapes = jax.eval_shape(R.resnext101_32x4d(num_classes=1000).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))
  # 44.18 M parameters (Xie et al. Table; Cadene's pretrainedmodels resnext101_32x4d).
  assert sum(np.size(v) for v in jax.tree_util.tree_leaves(shapes["params"])) == 44_177_704


def test_torchvision_converter_errors_name_the_tensors(torch_state_dicts):
  sd18, sd50 = torch_state_dicts["resnet18"], torch_state_dicts["resnet50"]
  # Another architecture: resnet18 lacks the bottlenecks' conv3 ...
  with pytest.raises(ValueError, match=r"missing.*layer1\.0\.conv3\.weight"):
    R.resnet_from_torchvision(sd18, "resnet50")
  # ... and resnet50 has tensors resnet18 does not use.
  with pytest.raises(ValueError, match=r"unexpected.*layer1\.0\.bn3\.bias"):
    R.resnet_from_torchvision(sd50, "resnet18")
  # A missing tensor.
  broken = dict(sd18)
  del broken["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"1 missing.*layer3\.1\.bn2\.running_var"):
    R.resnet_from_torchvision(broken, "resnet18")
  # An unexpected tensor.
  extra = dict(sd18, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected.*layer5\.0\.conv1\.weight"):
    R.resnet_from_torchvision(extra, "resnet18")
  # A wrong shape (reported with the Flax path and both shapes).
  wrong = dict(sd18, **{"layer2.0.conv1.weight": np.zeros((128, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"wrong shapes.*stage2_block0/conv1/kernel: "
                                       r"\(1, 1, 64, 128\) != \(3, 3, 64, 128\)"):
    R.resnet_from_torchvision(wrong, "resnet18")
  # The classifier is required when asked for, and its size must match.
  no_fc = {k: v for k, v in sd18.items() if not k.startswith("fc.")}
  with pytest.raises(ValueError, match=r"missing.*fc\.weight"):
    R.resnet_from_torchvision(no_fc, "resnet18", num_classes=1000)
  with pytest.raises(ValueError, match=r"fc/kernel: \(512, 1000\) != \(512, 10\)"):
    R.resnet_from_torchvision(sd18, "resnet18", num_classes=10)
  with pytest.raises(ValueError, match="unknown ResNet architecture"):
    R.resnet_from_torchvision(sd18, "resnet19")
  with pytest.raises(ValueError, match="pre-activation"):
    R.resnet_from_torchvision(sd50, "resnet50_v2")


# --------------------------------------------------------------------------------------------
# Keras ResNet50V2.


def _keras_layout_h5(path, weights: dict[str, np.ndarray], *, full_model: bool, suffix: str):
  """Writes ``{"<layer>/<weight>": array}`` as Keras' legacy HDF5 does: one group per layer
  (under ``model_weights/`` for a full model), each listing its datasets in ``weight_names``
  (``<layer>/<weight>:0`` in Keras 2, without ``:0`` in Keras 3)."""
  layers: dict[str, list[str]] = {}
  for key in weights:
    layer, weight = key.split("/")
    layers.setdefault(layer, []).append(weight)
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if full_model else f
    root.attrs["layer_names"] = [n.encode() for n in ["input_1", *layers, "avg_pool"]]
    root.create_group("input_1").attrs["weight_names"] = []
    root.create_group("avg_pool").attrs["weight_names"] = []
    for layer, names in layers.items():
      group = root.create_group(layer)
      group.attrs["weight_names"] = [f"{layer}/{n}{suffix}".encode() for n in names]
      for n in names:
        group.create_dataset(f"{layer}/{n}{suffix}", data=weights[f"{layer}/{n}"])


def _keras_names_of_tiny_v2(variables) -> dict[str, np.ndarray]:
  """The Keras names of tiny_resnet_v2's variables, spelled out from Keras' ``resnet.py``:
  ``conv{stage+1}_block{block+1}_{preact_bn | 0_conv | k_conv | k_bn}``."""
  p, s = variables["params"], variables["batch_stats"]
  out = {"conv1_conv/kernel": p["conv1"]["kernel"], "conv1_conv/bias": p["conv1"]["bias"]}

  def bn(keras, params, stats):
    out.update({f"{keras}/gamma": params["scale"], f"{keras}/beta": params["bias"],
                f"{keras}/moving_mean": stats["mean"], f"{keras}/moving_variance": stats["var"]})

  for stage, blocks in enumerate((2, 1, 1, 2), start=1):
    for b in range(blocks):
      name, keras = f"stage{stage}_block{b}", f"conv{stage + 1}_block{b + 1}"
      bn(f"{keras}_preact_bn", p[name]["preact_bn"], s[name]["preact_bn"])
      for k in (1, 2):
        out[f"{keras}_{k}_conv/kernel"] = p[name][f"conv{k}"]["kernel"]
        bn(f"{keras}_{k}_bn", p[name][f"conv{k}_bn"], s[name][f"conv{k}_bn"])
      out[f"{keras}_3_conv/kernel"] = p[name]["conv3"]["kernel"]
      out[f"{keras}_3_conv/bias"] = p[name]["conv3"]["bias"]
      if b == 0:
        out[f"{keras}_0_conv/kernel"] = p[name]["downsample"]["kernel"]
        out[f"{keras}_0_conv/bias"] = p[name]["downsample"]["bias"]
  bn("post_bn", p["post_bn"], s["post_bn"])
  out["predictions/kernel"], out["predictions/bias"] = p["fc"]["kernel"], p["fc"]["bias"]
  return out


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("full_model,suffix", [(True, ""), (False, ":0")])
def test_keras_h5_layouts_convert(tmp_path, rng, full_model, suffix):
  variables = _random_init(R.tiny_resnet_v2(num_classes=5), rng)
  path = tmp_path / "w.h5"
  _keras_layout_h5(path, _keras_names_of_tiny_v2(variables), full_model=full_model,
                   suffix=suffix)
  _assert_trees_equal(R.resnet_v2_from_keras_h5(path, 5, arch="tiny_resnet_v2"), variables)
  # An open file works too; without num_classes the classifier is skipped.
  with h5py.File(path, "r") as f:
    headless = R.resnet_v2_from_keras_h5(f, arch="tiny_resnet_v2")
  assert "fc" not in headless["params"]


def test_keras_h5_errors_name_the_layers(tmp_path, rng):
  names = _keras_names_of_tiny_v2(_random_init(R.tiny_resnet_v2(num_classes=5), rng))
  missing = {k: v for k, v in names.items() if not k.startswith("conv3_block1_preact_bn/")}
  _keras_layout_h5(tmp_path / "missing.h5", missing, full_model=False, suffix=":0")
  with pytest.raises(ValueError, match=r"4 missing.*conv3_block1_preact_bn/gamma"):
    R.resnet_v2_from_keras_h5(tmp_path / "missing.h5", arch="tiny_resnet_v2")

  extra = dict(names, **{"conv6_block1_1_conv/kernel": np.zeros((1, 1, 1, 1), np.float32)})
  _keras_layout_h5(tmp_path / "extra.h5", extra, full_model=True, suffix="")
  with pytest.raises(ValueError, match=r"unexpected.*conv6_block1_1_conv/kernel"):
    R.resnet_v2_from_keras_h5(tmp_path / "extra.h5", arch="tiny_resnet_v2")

  # Keras 3's native format has no layer names to map.
  with h5py.File(tmp_path / "k3.weights.h5", "w") as f:
    f.create_dataset("layers/conv2d/vars/0", data=np.zeros((7, 7, 3, 64), np.float32))
    f.create_group("vars")
  with pytest.raises(ValueError, match="Keras 3 '.weights.h5'"):
    R.resnet_v2_from_keras_h5(tmp_path / "k3.weights.h5")
  with pytest.raises(ValueError, match="not a pre-activation"):
    R.resnet_v2_from_keras_h5(tmp_path / "missing.h5", arch="resnet50")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # keras' get_weights and numpy 2
def test_matches_keras_resnet50v2(tmp_path, rng):
  tf = pytest.importorskip("tensorflow")
  keras = tf.keras
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50V2(weights=None, include_top=True, input_shape=(H, W, 3),
                                        classifier_activation=None)
  for layer in model.layers:  # random norms and biases, so every mapping is exercised
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.get_weights()[0].shape
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                         rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.2, bias.shape)])

  outputs = {"stem": "pool1_pool", "stage1": "conv2_block3_out", "stage2": "conv3_block4_out",
             "stage3": "conv4_block6_out", "stage4": "post_relu", "logits": "predictions"}
  probe = keras.Model(model.input, [model.get_layer(n).output for n in outputs.values()])
  x = rng.uniform(-1, 1, size=(2, H, W, 3)).astype(np.float32)
  want = dict(zip(outputs, [np.asarray(o) for o in probe(x, training=False)]))

  # The legacy full-model file Keras writes, and a weights-only file in the layout of the
  # Keras applications' downloads (Keras 2 names with ":0").
  model.save(tmp_path / "full.h5")
  weights = {f"{layer.name}/{w.path.split('/')[-1]}": np.asarray(w)
             for layer in model.layers for w in layer.weights}
  _keras_layout_h5(tmp_path / "weights.h5", weights, full_model=False, suffix=":0")
  variables = R.resnet_v2_from_keras_h5(tmp_path / "full.h5", num_classes=1000)
  _assert_trees_equal(R.resnet_v2_from_keras_h5(tmp_path / "weights.h5", num_classes=1000),
                      variables)

  net = R.resnet50_v2(taps=tuple(outputs), num_classes=1000)
  got = jax.jit(net.apply)(variables, x)
  for tap in outputs:
    assert _relative_error(got[tap], want[tap]) < 1e-4, tap
  assert net.tap_strides() == {"stem": 4, "stage1": 8, "stage2": 16, "stage3": 32, "stage4": 32}


# --------------------------------------------------------------------------------------------
# Taps, norm modes, dtypes, configuration errors.


@pytest.mark.parametrize("arch", ["tiny_resnet", "tiny_resnet_v2"])
def test_tap_shapes_follow_strides_and_channels(arch, rng):
  net = R.get_resnet(arch, taps=TAPS + ("logits",), num_classes=7)
  variables = _random_init(net, rng)
  out = jax.jit(net.apply)(variables, rng.normal(size=(2, H, W, 3)).astype(np.float32))
  assert set(out) == set(TAPS) | {"logits"}
  strides, channels = net.tap_strides(), net.tap_channels()
  for tap in TAPS:
    s = strides[tap]
    assert out[tap].shape == (2, -(-H // s), -(-W // s), channels[tap]), tap
  assert out["logits"].shape == (2, 7)
  expected = ({"stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}
              if arch == "tiny_resnet" else
              {"stem": 4, "stage1": 8, "stage2": 16, "stage3": 32, "stage4": 32})
  assert strides == expected
  # Without taps: the last stage's map.
  last = jax.jit(R.get_resnet(arch, num_classes=7).apply)(
      variables, rng.normal(size=(1, 64, 64, 3)).astype(np.float32))
  assert last.shape == (1, 2, 2, channels["stage4"])


@pytest.mark.parametrize("arch", ["tiny_resnet", "tiny_resnet_v2"])
def test_early_stop_equals_full_run_and_skips_later_stages(arch, rng):
  full_net = R.get_resnet(arch, taps=TAPS)
  variables = _random_init(full_net, rng)
  x = rng.normal(size=(1, 40, 56, 3)).astype(np.float32)
  full = full_net.apply(variables, x)
  for tap in ("stem", "stage2"):
    early = R.get_resnet(arch, taps=(tap,)).apply(variables, x)
    np.testing.assert_array_equal(early[tap], full[tap])
  # Stopping at stage2 never touches stage3/stage4, so their variables are not needed.
  trimmed = {col: {k: v for k, v in tree.items()
                   if not k.startswith(("stage3", "stage4", "post_bn"))}
             for col, tree in variables.items()}
  out = R.get_resnet(arch, taps=("stage2", "stage1")).apply(trimmed, x)
  assert list(out) == ["stage2", "stage1"]
  np.testing.assert_array_equal(out["stage1"], full["stage1"])


def test_init_builds_every_variable_whatever_the_taps():
  shapes = [jax.eval_shape(R.tiny_resnet(taps=taps, num_classes=3).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 32, 32, 3)))
            for taps in (None, ("stem",), ("logits",))]
  assert all(jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(shapes[0])
             for s in shapes)
  assert "fc" in shapes[1]["params"]


def test_bad_taps_are_rejected_before_computing():
  with pytest.raises(ValueError, match=r"no tap 'stage5'.*available taps: \['stem', 'stage1'"):
    R.tiny_resnet(taps=("stage1", "stage5"))
  with pytest.raises(ValueError, match=r"no tap 'logits'"):
    R.resnet50(taps=("logits",))  # logits need num_classes
  with pytest.raises(ValueError, match="sequence of names"):
    R.tiny_resnet(taps="stage1")


def test_frozen_norm_keeps_statistics_train_norm_updates_them(rng):
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _random_init(R.tiny_resnet(), rng)
  eval_out = R.tiny_resnet().apply(variables, x)
  frozen_out, frozen = R.tiny_resnet(norm="frozen").apply(variables, x, train=True,
                                                          mutable=["batch_stats"])
  _assert_trees_equal(frozen["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(frozen_out, eval_out, rtol=1e-6, atol=1e-6)
  _, trained = R.tiny_resnet(norm="train").apply(variables, x, train=True,
                                                 mutable=["batch_stats"])
  before = variables["batch_stats"]["stage2_block0"]["conv1_bn"]["mean"]
  after = trained["batch_stats"]["stage2_block0"]["conv1_bn"]["mean"]
  assert not np.allclose(before, after)


def test_folded_norm_matches_frozen(rng):
  variables = _random_init(R.tiny_resnet(), rng)
  x = rng.normal(size=(2, 40, 40, 3)).astype(np.float32)
  folded = common.fold_batch_norm(variables, epsilon=R.TORCHVISION_BN_EPSILON)
  assert set(folded) == {"params"}
  want = R.tiny_resnet().apply(variables, x)
  got = R.tiny_resnet(norm="folded").apply(folded, x)
  assert _relative_error(got, want) < 1e-5
  with pytest.raises(ValueError, match="not available for pre-activation"):
    R.tiny_resnet_v2(norm="folded")


@pytest.mark.parametrize("arch", ["tiny_resnet", "tiny_resnet_v2"])
def test_bfloat16_compute_is_close_to_float32(arch, rng):
  variables = _random_init(R.get_resnet(arch), rng)
  x = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
  ref = jax.jit(R.get_resnet(arch).apply)(variables, x)
  low = jax.jit(R.get_resnet(arch, dtype=jnp.bfloat16).apply)(variables, x)
  assert low.dtype == jnp.bfloat16
  assert _relative_error(low, ref) < 0.1
  assert np.corrcoef(np.ravel(low.astype(np.float32)), np.ravel(ref))[0, 1] > 0.99


def test_configuration_errors():
  with pytest.raises(ValueError, match="block must be one of"):
    R.ResNet(block="wide")
  with pytest.raises(ValueError, match="basic blocks support only groups=1"):
    R.ResNet(stage_sizes=(2, 2, 2, 2), block="basic", groups=32)
  with pytest.raises(ValueError, match="norm must be one of"):
    R.resnet18(norm="batch")
  with pytest.raises(TypeError, match="unexpected option"):
    R.resnet50(stage_sizes=(1, 1, 1, 1))
  with pytest.raises(ValueError, match=r"x must be \[B, H, W, C\]"):
    R.tiny_resnet().init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
  assert set(R.RESNET_ARCHS) >= {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                 "resnext50_32x4d", "resnext101_32x8d", "resnext101_32x4d",
                                 "resnet50_v2", "tiny_resnet"}
  assert R.resnet50().preprocessing == "torchvision"
  assert R.resnet50_v2().preprocessing == "inception"
