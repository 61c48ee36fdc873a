"""Reading PyTorch ``.pth`` checkpoints without torch.

PyTorch is never a runtime dependency, and unpickling an arbitrary file can
run code. `load_pth` reads the zip format of ``torch.save`` (torch >= 1.6)
with an unpickler that only knows the globals a state dict needs (tensor
rebuilders, storage types, OrderedDict); anything else is refused with a
`TorchFileError` naming the file. Tensors come back as NumPy arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import tarfile
import zipfile
from typing import Any

import numpy as np

__all__ = ['TorchFileError', 'load_pth']


class TorchFileError(ValueError):
  """The file is not a readable, safe torch (>= 1.6 zip) checkpoint."""


try:  # ml_dtypes ships with jax; only needed for bfloat16 storages.
  import ml_dtypes
  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None

_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': _BF16,
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'UntypedStorage': np.dtype(np.uint8),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a ``torch.*Storage`` class named in the pickle."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage record of the archive: a flat array of ``dtype``."""
  key: str
  data: np.ndarray  # 1-D


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2 -> a numpy copy of the strided view.

  Bounds are checked before ``as_strided`` so a crafted file cannot read
  memory outside the storage.
  """
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TorchFileError('tensor without a storage record')
  size, stride = tuple(size), tuple(stride)
  if (not _is_int(storage_offset) or storage_offset < 0
      or len(size) != len(stride)
      or not all(_is_int(s) and s >= 0 for s in size + stride)):
    raise TorchFileError(f'invalid tensor geometry: offset={storage_offset!r} '
                         f'size={size!r} stride={stride!r}')
  data = storage.data
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:
    raise TorchFileError(
        f'tensor of size {size}, stride {stride}, offset {storage_offset} '
        f'reads past its storage {storage.key!r} ({data.size} elements)')
  item = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      data[storage_offset:], shape=size,
      strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       state=None):
  """torch._utils._rebuild_parameter[_with_state]: the parameter's data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise TorchFileError('parameter without tensor data')
  return data


# Every global the pickle may name. Anything else is refused before it is
# imported, so a crafted file cannot run code (os.system, eval, ...).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    # Plain containers that harmlessly appear in metadata of checkpoints.
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
}
_ALLOWED_GLOBALS.update({('torch', name): _StorageType(name, dtype)
                         for name, dtype in _STORAGE_DTYPES.items()
                         if dtype is not None})


class _SafeUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` of a torch zip archive with an allow-list."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str,
               big_endian: bool):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._root = root
    self._big_endian = big_endian
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise TorchFileError(
          f'refusing to load: the file references the Python global '
          f'{module}.{name}, which is not a tensor or plain container. Files '
          f'holding pickled Python objects can run code when loaded; only '
          f'tensors, dicts, lists and numbers are accepted. Save just the '
          f'state dict (torch.save({{"state_dict": model.state_dict()}}, '
          f'path)) to convert it.') from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not _is_int(pid[4])):
      raise TorchFileError(f'unsupported persistent id {pid!r:.200}')
    _, storage_type, key, _location, numel = pid
    if key in self._storages:
      storage = self._storages[key]
      if storage.data.dtype != storage_type.dtype:
        # One storage viewed with two dtypes: not written by torch.save for
        # state dicts; refuse rather than guess.
        raise TorchFileError(f'storage {key!r} used with two dtypes')
      return storage
    name = f'{self._root}data/{key}'
    try:
      raw = self._archive.read(name)
    except KeyError:
      raise TorchFileError(f'missing storage record {name!r}') from None
    dtype = storage_type.dtype
    if numel < 0 or len(raw) < numel * dtype.itemsize:
      raise TorchFileError(f'storage record {name!r} holds {len(raw)} bytes, '
                           f'fewer than {numel} x {dtype}')
    data = np.frombuffer(raw, dtype.newbyteorder('>' if self._big_endian
                                                 else '<'), count=numel)
    data = data.astype(dtype)  # native byte order, writable copy
    storage = _Storage(key, data)
    self._storages[key] = storage
    return storage


_LEGACY_HINT = (
    'Re-save it in the zip format with torch >= 1.6, e.g. python -c "import '
    'torch; torch.save(torch.load(\'OLD.pth\', weights_only=True), '
    '\'NEW.pth\')", and convert NEW.pth.')


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
      torch archive, a malformed archive, or a pickle naming any global
      outside the allow-list (the global is never imported or called).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchFileError(f'{path}: no such file')
  if not zipfile.is_zipfile(path):
    if tarfile.is_tarfile(path):
      raise TorchFileError(
          f'{path} is in the oldest (tar) torch serialization format, which '
          f'is not supported. {_LEGACY_HINT}')
    with open(path, 'rb') as f:
      head = f.read(2)
    if head[:1] == b'\x80':  # a pickle protocol marker: legacy torch.save
      raise TorchFileError(
          f'{path} is in the legacy (pre-1.6, non-zip) torch serialization '
          f'format, which this reader refuses (it interleaves pickles and raw '
          f'storages). {_LEGACY_HINT}')
    raise TorchFileError(f'{path} is not a torch checkpoint (not a zip '
                         f'archive)')
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist()
           if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkl) != 1:
      raise TorchFileError(f'{path}: expected one <archive>/data.pkl record, '
                           f'found {pkl}')
    root = pkl[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{root}byteorder' in archive.namelist():
      byteorder = archive.read(f'{root}byteorder').decode().strip()
    if byteorder not in ('little', 'big'):
      raise TorchFileError(f'{path}: unknown byte order {byteorder!r}')
    unpickler = _SafeUnpickler(archive.read(pkl[0]), archive, root,
                               big_endian=byteorder == 'big')
    try:
      return unpickler.load()
    except TorchFileError as e:
      raise TorchFileError(f'{path}: {e}') from None
    except Exception as e:  # any parser failure on untrusted bytes
      raise TorchFileError(f'{path}: malformed pickle: '
                           f'{type(e).__name__}: {e}') from e
