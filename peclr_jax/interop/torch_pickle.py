"""Reading PyTorch ``.pth`` checkpoints without torch.

PyTorch is never a runtime dependency, and unpickling an arbitrary file can
run code. `load_pth` reads the zip format of ``torch.save`` (torch >= 1.6)
with an unpickler that only knows the globals a state dict needs (tensor
rebuilders, storage types, OrderedDict); anything else is refused with a
`TorchFileError` naming the file. Tensors come back as NumPy arrays.

A crafted file cannot make the reader allocate more than a checkpoint of the
largest supported model needs: declared entry sizes are checked before
anything is read, every read stops at the size checked, and a tensor must lie
in its storage as a state dict's tensors do (no stride-0 expansion, no
overlap) before it is built.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import tarfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["TorchFileError", "load_pth"]


class TorchFileError(ValueError):
  """The file is not a readable, safe torch (>= 1.6 zip) checkpoint."""


try:  # ml_dtypes ships with jax; only needed for bfloat16 storages.
  import ml_dtypes

  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None

_STORAGE_DTYPES = {
  "FloatStorage": np.dtype(np.float32),
  "DoubleStorage": np.dtype(np.float64),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": _BF16,
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "UntypedStorage": np.dtype(np.uint8),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a ``torch.*Storage`` class named in the pickle."""

  name: str
  dtype: np.dtype


# The largest state dict the converter takes: torchvision's ResNet-152 with
# its 1000-class classifier, as in the released peclr_rn152_yt3dh_fh.pth (932
# tensors: 60.2 M float32 parameters and BatchNorm statistics).
_RESNET152_STATE_DICT_BYTES = 241_378_168
# A file's entries together, and the tensors built from them together, may
# hold at most this: four ResNet-152 state dicts, room for float64 copies or
# extras such as a projection head or optimiser moments. Loading any file
# then takes about twice this at most (storages and tensors) plus the
# pickle's objects.
_MAX_TENSOR_BYTES = 4 * _RESNET152_STATE_DICT_BYTES
# A ResNet-152 state dict's data.pkl is 107 kB (one short record per tensor).
# Unpickling builds about 240 bytes of objects per pickle byte at worst (a
# one-byte EMPTY_SET opcode makes a 216-byte set), so this bounds them at
# about 240 MiB (measured).
_MAX_PICKLE_BYTES = 1 << 20
_MAX_BYTEORDER_BYTES = 16  # 'little' or 'big'


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage record of the archive: a flat array of ``dtype``."""

  entry: str  # its archive entry, for messages
  data: np.ndarray  # 1-D


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _read_entry(archive: zipfile.ZipFile, name: str, max_bytes: int, why: str) -> bytes:
  """Entry ``name``, refused unread when it declares more than ``max_bytes``.

  ``why`` ends the refusal (where the limit comes from). The read stops at
  ``max_bytes`` whatever the data inflates to.
  """
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise TorchFileError(f"missing archive entry {name!r}") from None
  if info.file_size > max_bytes:
    raise TorchFileError(
      f"archive entry {name!r} declares {info.file_size} bytes, more than {max_bytes} ({why})"
    )
  with archive.open(info) as f:
    return f.read(max_bytes)


def _is_dense(size: tuple, stride: tuple) -> bool:
  """Whether ``stride`` lays ``size`` out without gaps or overlaps.

  True for C order and its permutations (a transposed or channels_last
  tensor), as a state dict's tensors are; False for a stride-0 expansion or
  overlapping elements. Strides of size-1 dimensions are never used.
  """
  expected = 1
  for step, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
    if step != expected:
      return False
    expected *= n
  return True


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """torch._utils._rebuild_parameter[_with_state]: the parameter's data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise TorchFileError("parameter without tensor data")
  return data


_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
# Every global the pickle may name. Anything else is refused before it is
# imported, so a crafted file cannot run code (os.system, eval, ...).
# _REBUILD_TENSOR maps to the unpickler's method, which keeps the tally.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch", "Size"): tuple,
  # Plain containers that harmlessly appear in metadata of checkpoints.
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("builtins", "slice"): slice,
  ("builtins", "complex"): complex,
}
_ALLOWED_GLOBALS.update(
  {
    ("torch", name): _StorageType(name, dtype)
    for name, dtype in _STORAGE_DTYPES.items()
    if dtype is not None
  }
)


class _SafeUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` of a torch zip archive with an allow-list."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, big_endian: bool):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._root = root
    self._big_endian = big_endian
    self._storages: dict[str, _Storage] = {}
    self._tensor_bytes = 0  # of the tensors built so far

  def find_class(self, module: str, name: str):
    if (module, name) == _REBUILD_TENSOR:
      return self._rebuild_tensor_v2
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise TorchFileError(
        f"refusing to load: the file references the Python global "
        f"{module}.{name}, which is not a tensor or plain container. Files "
        f"holding pickled Python objects can run code when loaded; only "
        f"tensors, dicts, lists and numbers are accepted. Save just the "
        f'state dict (torch.save({{"state_dict": model.state_dict()}}, '
        f"path)) to convert it."
      ) from None

  def persistent_load(self, pid):
    if (
      not isinstance(pid, tuple)
      or len(pid) != 5
      or pid[0] != "storage"
      or not isinstance(pid[1], _StorageType)
      or not isinstance(pid[2], str)
      or not _is_int(pid[4])
    ):
      raise TorchFileError(f"unsupported persistent id {pid!r:.200}")
    _, storage_type, key, _location, numel = pid
    if key in self._storages:
      storage = self._storages[key]
      if storage.data.dtype != storage_type.dtype:
        # One storage viewed with two dtypes: not written by torch.save for
        # state dicts; refuse rather than guess.
        raise TorchFileError(f"storage {key!r} used with two dtypes")
      return storage
    name = f"{self._root}data/{key}"
    dtype = storage_type.dtype
    nbytes = numel * dtype.itemsize
    if numel < 0:
      raise TorchFileError(f"storage record {name!r} has {numel} elements")
    # torch.save writes exactly the storage's bytes; a larger entry is refused
    # unread (its size also counts against _MAX_TENSOR_BYTES in load_pth).
    raw = _read_entry(self._archive, name, nbytes, f"data.pkl says it holds {numel} x {dtype}")
    if len(raw) != nbytes:
      raise TorchFileError(
        f"storage record {name!r} holds {len(raw)} bytes, fewer than {numel} x {dtype}"
      )
    data = np.frombuffer(raw, dtype.newbyteorder(">" if self._big_endian else "<"))
    data = data.astype(dtype)  # native byte order, writable copy
    storage = _Storage(name, data)
    self._storages[key] = storage
    return storage

  def _rebuild_tensor_v2(
    self,
    storage,
    storage_offset,
    size,
    stride,
    requires_grad=False,
    backward_hooks=None,
    metadata=None,
  ):
    """torch._utils._rebuild_tensor_v2 -> a numpy copy of the tensor.

    Everything is checked before anything is allocated: the tensor must lie
    in its storage as a state dict's do (densely, see `_is_dense`; so it
    holds at most its storage's elements and never reads outside it), and the
    tensors together must stay within ``_MAX_TENSOR_BYTES`` (many tensors can
    view one storage).
    """
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
      raise TorchFileError("tensor without a storage record")
    size, stride = tuple(size), tuple(stride)
    what = (
      f"tensor of size {size!r:.100}, stride {stride!r:.100}, offset "
      f"{storage_offset!r:.30} on storage record {storage.entry!r}"
    )
    if (
      not _is_int(storage_offset)
      or storage_offset < 0
      or len(size) != len(stride)
      or not all(_is_int(s) and s >= 0 for s in size + stride)
    ):
      raise TorchFileError(
        f"{what}: invalid geometry (a negative or non-integer size, stride or offset)"
      )
    if not _is_dense(size, stride):
      raise TorchFileError(
        f"{what}: its strides do not lay it out densely "
        f"(a stride-0 expansion, overlapping elements or "
        f"gaps), as no state dict tensor is"
      )
    item = storage.data.dtype.itemsize
    # Bounds the sizes of an empty tensor too, which numpy could overflow.
    if math.prod(max(n, 1) for n in size) * item > _MAX_TENSOR_BYTES:
      raise TorchFileError(
        f"{what}: larger than the {_MAX_TENSOR_BYTES} bytes allowed (four ResNet-152 state dicts)"
      )
    numel = math.prod(size)
    if storage_offset + numel > storage.data.size:
      raise TorchFileError(f"{what}: reads past its storage ({storage.data.size} elements)")
    self._tensor_bytes += numel * item
    if self._tensor_bytes > _MAX_TENSOR_BYTES:
      raise TorchFileError(
        f"{what}: the tensors so far take {self._tensor_bytes} bytes, more "
        f"than the {_MAX_TENSOR_BYTES} allowed (four ResNet-152 state "
        f"dicts)"
      )
    if numel == 0:
      return np.zeros(size, storage.data.dtype)
    view = np.lib.stride_tricks.as_strided(
      storage.data[storage_offset:],
      shape=size,
      strides=tuple(s * item if n > 1 else 0 for n, s in zip(size, stride)),
      writeable=False,
    )
    return np.array(view, copy=True)

  def load(self):
    """The unpickled object; any failure is a one-line `TorchFileError`."""
    try:
      return super().load()
    except (TorchFileError, zipfile.BadZipFile):  # load_pth names the latter
      raise
    except Exception as e:  # any parser failure on untrusted bytes
      raise TorchFileError(f"malformed pickle: {type(e).__name__}: {e}") from e


_LEGACY_HINT = (
  'Re-save it in the zip format with torch >= 1.6, e.g. python -c "import '
  "torch; torch.save(torch.load('OLD.pth', weights_only=True), "
  "'NEW.pth')\", and convert NEW.pth."
)


def _load_archive(archive: zipfile.ZipFile) -> Any:
  """`load_pth` of an open archive; refusals do not name the file yet."""
  infos = archive.infolist()
  total = sum(info.file_size for info in infos)
  if total > _MAX_TENSOR_BYTES:
    largest = max(infos, key=lambda info: info.file_size)
    raise TorchFileError(
      f"its entries declare {total} bytes (the largest, "
      f"{largest.filename!r}, {largest.file_size}), more than the "
      f"{_MAX_TENSOR_BYTES} allowed (four ResNet-152 state dicts)"
    )
  pkl = [
    info.filename
    for info in infos
    if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1
  ]
  if len(pkl) != 1:
    raise TorchFileError(f"expected one <archive>/data.pkl record, found {pkl!r:.200}")
  root = pkl[0][: -len("data.pkl")]
  byteorder = "little"
  if f"{root}byteorder" in archive.namelist():
    byteorder = _read_entry(
      archive, f"{root}byteorder", _MAX_BYTEORDER_BYTES, "it names 'little' or 'big'"
    )
    byteorder = byteorder.decode(errors="replace").strip()
  if byteorder not in ("little", "big"):
    raise TorchFileError(f"unknown byte order {byteorder!r}")
  data = _read_entry(
    archive, pkl[0], _MAX_PICKLE_BYTES, "about ten times a ResNet-152 state dict's"
  )
  return _SafeUnpickler(data, archive, root, big_endian=byteorder == "big").load()


def load_pth(path: str | os.PathLike) -> Any:
  """Reads a torch >= 1.6 ``.pth`` (zip) file without torch.

  Tensors come back as numpy arrays (contiguous copies in the stored dtype:
  float32, float16, bfloat16, int64, ...); dicts, lists and numbers as Python
  objects.

  Args:
    path: the file.

  Returns:
    The unpickled object.

  Raises:
    TorchFileError: the legacy (pre-1.6, non-zip) format, a file that is not a
      torch archive, a malformed archive, a pickle naming any global outside
      the allow-list (the global is never imported or called), or sizes
      beyond a state dict's: entries declaring more bytes than their tensors
      need or than ``_MAX_TENSOR_BYTES`` in all, overlapping (e.g. stride-0)
      tensors, tensors adding up to more than ``_MAX_TENSOR_BYTES`` (all
      refused before the memory is allocated).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchFileError(f"{path}: no such file")
  if not zipfile.is_zipfile(path):
    if tarfile.is_tarfile(path):
      raise TorchFileError(
        f"{path} is in the oldest (tar) torch serialization format, which "
        f"is not supported. {_LEGACY_HINT}"
      )
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":  # a pickle protocol marker: legacy torch.save
      raise TorchFileError(
        f"{path} is in the legacy (pre-1.6, non-zip) torch serialization "
        f"format, which this reader refuses (it interleaves pickles and raw "
        f"storages). {_LEGACY_HINT}"
      )
    raise TorchFileError(f"{path} is not a torch checkpoint (not a zip archive)")
  try:
    with zipfile.ZipFile(path) as archive:
      return _load_archive(archive)
  except TorchFileError as e:
    raise TorchFileError(f"{path}: {e}") from None
  except Exception as e:  # zipfile's: BadZipFile (CRC), zlib.error, ...
    raise TorchFileError(f"{path}: damaged zip archive: {type(e).__name__}: {e}") from e
