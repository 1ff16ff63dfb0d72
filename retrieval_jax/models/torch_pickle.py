"""Reading PyTorch checkpoints (``torch.save`` files) into numpy, without importing torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the pickle names, so
``pickle.load`` on a downloaded checkpoint can execute arbitrary code. This module unpickles with
an allow-list instead: the only globals a checkpoint may name are ``collections.OrderedDict``,
torch's tensor/parameter rebuild functions, the torch storage classes and ``torch.<dtype>``
objects, and each of them is replaced by a small function here that builds numpy arrays.
Anything else (``posix.system``, ``builtins.eval``, a model class, ...) raises
:class:`UnsafeCheckpointError` before anything is called.

Two on-disk formats are read:

- the zip format (``torch.save`` since torch 1.6): ``<dir>/data.pkl`` is the object pickle, its
  persistent ids ``('storage', storage_type, key, location, numel)`` name storages whose raw
  bytes are the records ``<dir>/data/<key>``; ``<dir>/byteorder`` says their byte order.
- the legacy format (``_use_new_zipfile_serialization=False``, and every checkpoint written
  before torch 1.6): four pickles back to back (magic number, protocol version, system info,
  the object whose persistent ids ``('storage', storage_type, key, location, numel, view)``
  name storages), a pickled list of the storage keys, then for each key an int64 element count
  and the storage's raw little-endian bytes.

The very old tar format (torch < 0.4) and TorchScript archives are not supported.

References:
  ``torch/serialization.py`` (``_save``, ``_legacy_save``, ``_load``, ``_legacy_load``) and
  ``torch/_utils.py`` (``_rebuild_tensor_v2``) in PyTorch, which define both formats.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "load_torch_pickle", "load_torch_state_dict"]

# The legacy format starts with these two pickled integers (torch/serialization.py).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Wrapper keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class UnsafeCheckpointError(ValueError):
  """A checkpoint names a global outside the allow-list; nothing from it was executed."""


# --- what the allow-listed globals turn into ---------------------------------------------------

# Legacy storage class names (``torch.FloatStorage`` ...) and the element type they hold.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# ``torch.<dtype>`` objects (named by ``_rebuild_tensor_v3`` for dtypes without a legacy
# storage class, which then pairs them with an untyped byte storage).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128), "cdouble": np.dtype(np.complex128),
}


class _StorageType:
  """Stands for a torch storage class: only its element type matters."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _TorchDtype:
  """Stands for a ``torch.<dtype>`` object."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage:
  """A storage named by a persistent id; its bytes are attached once they have been read.

  ``offset``/``numel`` (in elements) describe a legacy storage view into the root storage.
  """

  def __init__(self, key: str, dtype: np.dtype, numel: int, offset: int = 0):
    self.key, self.dtype, self.numel, self.offset = key, dtype, numel, offset


class _TensorRef:
  """A tensor whose storage bytes may not have been read yet (legacy files store them after
  the object pickle); :func:`_materialize` turns it into a numpy array."""

  def __init__(self, storage: _Storage, offset: int, size, stride, dtype: np.dtype | None = None):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}, not a "
                                   f"storage persistent id")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    self.dtype = storage.dtype if dtype is None else dtype
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f"tensor size {self.size} and stride {self.stride} differ "
                                   f"in length")


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  # requires_grad, hooks and conj/neg metadata do not change the stored values.
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  if not isinstance(dtype, _TorchDtype):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
  return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      # torch.Size pickles as a tuple subclass; a plain tuple holds the same numbers.
      ("torch", "Size"): tuple,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  # Untyped byte storages (torch >= 1.12 names them for byte views and v3 tensors).
  for module in ("torch", "torch.storage"):
    for name in ("UntypedStorage", "_UntypedStorage"):
      allowed[(module, name)] = _StorageType(name, np.dtype(np.uint8))
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _TorchDtype(name, dtype)
  return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals through the allow-list only and storages through ``storages``.

  ``find_class`` is the single place where the pickle machinery turns a name into a callable
  (GLOBAL, STACK_GLOBAL, INST, OBJ and the copyreg EXT opcodes all go through it), so refusing
  there means nothing outside the allow-list can ever be called.
  """

  def __init__(self, file: BinaryIO, path: str, storages: dict[str, _Storage] | None = None):
    super().__init__(file)
    self._path = path
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load global '{module}.{name}'; a checkpoint may only hold "
          f"tensors, storages and (ordered) dicts/lists of them. Nothing was executed.") from None

  def persistent_load(self, pid: Any) -> _Storage:
    if self._storages is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    if not isinstance(pid, tuple) or len(pid) not in (5, 6):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id type {kind!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage type {storage_type!r} is not a storage class")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    root = self._storages.get(key)
    if root is None:
      root = self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    # Legacy storage views (torch < 0.4 wrote them; later versions never do): a window of the
    # root storage, offset and size in elements.
    _view_key, offset, view_numel = view
    return _Storage(key, root.dtype, int(view_numel), int(offset))


def _unpickle(data: bytes | BinaryIO, path: str, storages: dict[str, _Storage] | None) -> Any:
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  return _RestrictedUnpickler(file, path, storages).load()


# --- materialising tensors ---------------------------------------------------------------------

def _materialize(obj: Any, buffers: Mapping[str, np.ndarray], path: str) -> Any:
  """Replaces every :class:`_TensorRef` in ``obj`` (dicts, lists, tuples) by a numpy array.

  ``buffers[key]`` is the root storage ``key`` as a 1-D array of its element type. Strides and
  offsets are honoured, and bounds are checked first, since ``as_strided`` trusts them.
  """
  if isinstance(obj, _TensorRef):
    storage = obj.storage
    buf = buffers.get(storage.key)
    if buf is None:
      raise ValueError(f"{path}: storage {storage.key!r} is referenced but not stored in the "
                       f"file; expected a complete torch.save checkpoint.")
    # Elements of the storage (or legacy view) this tensor may read: [first, limit).
    first, limit = storage.offset, min(buf.size, storage.offset + storage.numel)
    if obj.dtype != buf.dtype:
      # An untyped byte storage viewed as another dtype (_rebuild_tensor_v3).
      if buf.dtype != np.uint8 or buf.size % obj.dtype.itemsize or storage.offset:
        raise ValueError(f"{path}: storage {storage.key!r} of {buf.dtype} cannot hold "
                         f"{obj.dtype} tensors.")
      buf = buf.view(obj.dtype)
      first, limit = 0, buf.size
    start = first + obj.offset
    if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride) or obj.offset < 0:
      raise ValueError(f"{path}: tensor with negative size/stride/offset {obj.size} "
                       f"{obj.stride} {obj.offset}.")
    if 0 in obj.size:
      return np.zeros(obj.size, obj.dtype)
    last = start + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
    if last >= limit:
      raise ValueError(f"{path}: tensor of size {obj.size}, stride {obj.stride} at offset "
                       f"{obj.offset} reads past its storage of {limit - first} elements; the "
                       f"file is corrupt.")
    item = buf.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(buf[start:], shape=obj.size,
                                           strides=tuple(s * item for s in obj.stride),
                                           writeable=False)
    return np.array(view, dtype=view.dtype.newbyteorder("="), copy=True)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v, buffers, path)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v, buffers, path) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v, buffers, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, buffers, path) for v in obj)
  if isinstance(obj, (_Storage, _StorageType, _TorchDtype)):
    raise ValueError(f"{path}: bare storages and dtypes are not supported; expected tensors.")
  return obj


def _frombuffer(raw: bytes, dtype: np.dtype, byteorder: str, key: str, path: str) -> np.ndarray:
  if len(raw) % dtype.itemsize:
    raise ValueError(f"{path}: storage {key!r} has {len(raw)} bytes, not a multiple of the "
                     f"{dtype} element size; the file is corrupt.")
  if dtype.itemsize > 1 and byteorder == "big":
    dtype = dtype.newbyteorder(">")
  return np.frombuffer(raw, dtype=dtype)


def _load_zip(file: BinaryIO, path: str) -> Any:
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
      raise ValueError(f"{path}: zip archive without '<dir>/data.pkl'; expected a torch.save "
                       f"checkpoint.")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
      raise ValueError(f"{path}: a TorchScript archive (torch.jit.save); expected a torch.save "
                       f"checkpoint.")
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byteorder record {byteorder!r}.")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(archive.read(pickles[0]), path, storages)
    buffers = {}
    for key, storage in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"{path}: storage record {record!r} is missing; expected a complete "
                         f"torch.save checkpoint.")
      nbytes = storage.numel * storage.dtype.itemsize
      if archive.getinfo(record).file_size < nbytes:
        raise ValueError(f"{path}: storage record {record!r} holds "
                         f"{archive.getinfo(record).file_size} bytes, {nbytes} expected; the "
                         f"file is truncated or corrupt.")
      # Read only the declared size (a hostile archive cannot make us inflate more).
      with archive.open(record) as member:
        raw = member.read(nbytes)
      buffers[key] = _frombuffer(raw, storage.dtype, byteorder, key, path)
  return _materialize(obj, buffers, path)


def _load_legacy(file: BinaryIO, path: str) -> Any:
  magic = _unpickle(file, path, None)
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path}: a pickle without the torch.save magic number; expected a "
                     f"PyTorch checkpoint.")
  protocol = _unpickle(file, path, None)
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"{path}: unsupported torch.save protocol version {protocol!r}.")
  sys_info = _unpickle(file, path, None)
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  storages: dict[str, _Storage] = {}
  obj = _unpickle(file, path, storages)
  keys = _unpickle(file, path, None)
  if not isinstance(keys, list):
    raise ValueError(f"{path}: expected the list of storage keys after the object pickle.")
  buffers = {}
  for key in keys:
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    storage = storages.get(key)
    if storage is None:
      raise ValueError(f"{path}: storage key {key!r} was not referenced by the object pickle.")
    header = file.read(8)
    if len(header) != 8:
      raise ValueError(f"{path}: file ends before storage {key!r}; the file is truncated.")
    # The element count is written little-endian whatever the machine (torch's
    # THPStorage_writeFileRaw); the payload in the writer's byte order.
    (numel,) = struct.unpack("<q", header)
    nbytes = numel * storage.dtype.itemsize
    if numel < 0 or numel < storage.numel:
      raise ValueError(f"{path}: storage {key!r} claims {numel} elements, {storage.numel} "
                       f"expected; the file is corrupt.")
    raw = file.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f"{path}: storage {key!r} has {len(raw)} of its {nbytes} bytes; the file "
                       f"is truncated.")
    buffers[key] = _frombuffer(raw, storage.dtype, "little" if little else "big", key, path)
  return _materialize(obj, buffers, path)


def load_torch_pickle(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file into Python containers of numpy arrays, without torch.

  Tensors (and ``nn.Parameter``) become numpy arrays of the same dtype (bfloat16 as
  ``ml_dtypes.bfloat16``), copied out of their storages honouring offset and strides, so views
  that shared a storage in torch are independent arrays here. Dicts, ordered dicts, lists,
  tuples, numbers and strings are kept.

  Args:
    path: the checkpoint file (zip or legacy format).

  Returns:
    The unpickled object.

  Raises:
    UnsafeCheckpointError: the file names a global outside the allow-list (e.g. a pickled
      ``os.system`` call or a whole ``nn.Module``); nothing from the file was executed.
    ValueError: the file is missing, truncated, not a torch checkpoint, or in an unsupported
      format; the message names the file.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as file:
      head = file.read(4)
      file.seek(0)
      if head.startswith(b"PK"):
        return _load_zip(file, path)
      if head[:1] == b"\x80":  # the PROTO opcode every torch.save pickle starts with
        return _load_legacy(file, path)
  except UnsafeCheckpointError:
    raise
  except FileNotFoundError as err:
    raise ValueError(f"{path}: no such file; expected a PyTorch checkpoint.") from err
  except ValueError as err:
    if str(err).startswith(path):
      raise
    raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({err}).") from err
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, AttributeError, TypeError,
          IndexError, KeyError, OverflowError, MemoryError, RecursionError, struct.error,
          UnicodeDecodeError) as err:
    raise ValueError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(err).__name__}: "
                     f"{err}).") from err
  raise ValueError(f"{path}: not a PyTorch checkpoint; expected a zip archive (torch >= 1.6) or "
                   f"a legacy torch.save pickle, found leading bytes {head!r}.")


def _flatten_state(obj: Mapping[Any, Any], prefix: str, out: dict[str, np.ndarray],
                   path: str) -> None:
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, Mapping):
      _flatten_state(value, f"{name}.", out, path)
    else:
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                       f"expected a state dict of tensors.")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as ``{name: numpy array}``, without importing torch.

  Common wrappers are unwrapped: a dict holding ``"state_dict"``, ``"model_state_dict"`` or
  ``"model"`` (as training scripts save ``{"epoch": ..., "state_dict": ...}``) yields that
  entry; nested dicts are flattened with ``"."``; and a ``"module."`` prefix on every key
  (``nn.DataParallel``) is stripped. Dtypes are kept (float32 stays float32).

  Args:
    path: the ``.pth``/``.pt`` file.

  Returns:
    ``{name: np.ndarray}`` in file order.

  Raises:
    UnsafeCheckpointError: see :func:`load_torch_pickle`.
    ValueError: unreadable file, or entries that are not tensors.
  """
  path = os.fspath(path)
  obj = load_torch_pickle(path)
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a state dict (a mapping "
                     f"of names to tensors).")
  out: dict[str, np.ndarray] = {}
  _flatten_state(obj, "", out, path)
  if out and all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out
