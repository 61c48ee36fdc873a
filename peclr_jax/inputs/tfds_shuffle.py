"""Let TFDS spill large splits to disk without TensorFlow.

While generating a split, TFDS's shuffler keeps the serialised examples in
memory up to `tensorflow_datasets.core.shuffle.MAX_MEM_BUFFER_SIZE` (1000 MiB
in 4.9) and then moves them into ~1000 temporary bucket files. Those files are
written and read with `tf.io.gfile`, so without TensorFlow a split larger
than 1000 MiB (full-size FreiHAND's train split is ~1.8 GB) fails with
`ModuleNotFoundError: No module named 'tensorflow'` part-way through.

`spill_without_tensorflow()` swaps in a bucket that does the same file I/O
with `epath` (local disks and anything epath reaches), so memory stays
bounded and large builds finish. The file format is TFDS's own (key, size,
bytes records), so shuffling order and output are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Iterator

from etils import epath
from tensorflow_datasets.core import shuffle


class _EpathBucket(shuffle._Bucket):  # pylint: disable=protected-access
  """TFDS's temporary shuffle bucket, with epath file I/O instead of tf.io."""

  def add(self, key, data: bytes) -> None:
    if not self._fobj:
      epath.Path(self._path).parent.mkdir(parents=True, exist_ok=True)
      try:
        self._fobj = epath.Path(self._path).open("wb")
      except OSError as e:
        if e.errno != errno.EMFILE:
          raise
        # ~1000 buckets are open at once: more than a default soft limit of
        # 1024 descriptors allows next to everything else.
        shuffle._increase_open_files_limit()  # pylint: disable=protected-access
        self._fobj = epath.Path(self._path).open("wb")
    self._fobj.write(shuffle._hkey_to_bytes(key))  # pylint: disable=protected-access
    # '=Q': standard 8-byte size, as TFDS's reader expects.
    self._fobj.write(struct.pack("=Q", len(data)))
    self._fobj.write(data)
    self._length += 1
    self._size += len(data)

  def read_values(self) -> Iterator[tuple[int, bytes]]:
    self.flush()
    path = epath.Path(self._path)
    if not path.exists():  # a bucket nothing hashed into
      return
    with path.open("rb") as f:
      while buff := f.read(shuffle.HKEY_SIZE_BYTES):
        (size,) = struct.unpack("=Q", f.read(8))
        yield shuffle._read_hkey(buff), f.read(size)  # pylint: disable=protected-access

  def del_file(self) -> None:
    epath.Path(self._path).unlink(missing_ok=True)


@contextlib.contextmanager
def spill_without_tensorflow():
  """Within the block, TFDS shuffle buckets use epath, not tf.io.gfile."""
  original = shuffle._Bucket  # pylint: disable=protected-access
  shuffle._Bucket = _EpathBucket  # pylint: disable=protected-access
  try:
    yield
  finally:
    shuffle._Bucket = original  # pylint: disable=protected-access
