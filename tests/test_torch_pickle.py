"""Memory bombs against the torch-free ``.pth`` reader (`torch_pickle`).

Each crafted file is at most a megabyte or two yet would make a reader that
trusts it allocate gigabytes. The bombs are loaded in a child process whose
address space is limited to 1 GiB more than it had after its imports
(RLIMIT_AS), so a reader that does allocate fails there with a MemoryError
instead of taking the machine down; each must be refused with its one-line
reason, and the child's peak resident memory must stay small. Files a state
dict really is (torch.save'd, including transposed and channels_last tensors)
are loaded bit-exactly in test_convert_torch.py.
"""

import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peclr_jax.interop import torch_pickle

MiB = 1 << 20


class _Storage:
  """A storage in a hand-made data.pkl: torch's persistent id fields."""

  def __init__(self, key, numel, storage_type="FloatStorage"):
    self.pid = ("storage", getattr(torch, storage_type), key, "cpu", numel)


class _Tensor:
  """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, _Storage) else None


def _data_pkl(obj) -> bytes:
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _write_pth(path, data_pkl: bytes, storages: dict[str, bytes]):
  """A torch-layout archive (``bomb/data.pkl``, ``bomb/data/<key>``)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("bomb/data.pkl", data_pkl)
    for key, raw in storages.items():
      z.writestr(f"bomb/data/{key}", raw)


def _write_zip_with_deflate_bomb(path, data_pkl: bytes, key: str, size_mib: int):
  """``bomb/data/<key>`` inflates to ``size_mib`` MiB of zeros from ~1 kB/MiB.

  Written by hand: zipfile would have to compress the gigabytes. The stream
  is 1 MiB of zeros deflated without history and flushed to a byte boundary,
  repeated, then a final empty block. The CRC is left 0: the reader must
  refuse the entry before reading it, long before a CRC check.
  """

  def raw_deflate():
    return zlib.compressobj(9, zlib.DEFLATED, -15)

  co = raw_deflate()
  block = co.compress(bytes(MiB)) + co.flush(zlib.Z_FULL_FLUSH)
  end = raw_deflate().flush()
  assert zlib.decompress(block * 2 + end, -15) == bytes(2 * MiB)
  stream = block * size_mib + end
  entries = [
    ("bomb/data.pkl", 0, data_pkl, zlib.crc32(data_pkl), len(data_pkl)),
    (f"bomb/data/{key}", 8, stream, 0, size_mib * MiB),
  ]
  with open(path, "wb") as f:
    central = b""
    for name, method, raw, crc, size in entries:
      offset = f.tell()
      name = name.encode()
      f.write(
        struct.pack(
          "<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc, len(raw), size, len(name), 0
        )
        + name
        + raw
      )
      central += (
        struct.pack(
          "<4s6H3L5H2L",
          b"PK\x01\x02",
          20,
          20,
          0,
          method,
          0,
          33,
          crc,
          len(raw),
          size,
          len(name),
          0,
          0,
          0,
          0,
          0,
          offset,
        )
        + name
      )
    start = f.tell()
    f.write(
      central
      + struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0
      )
    )


# Loads each file in a child limited to 1 GiB more address space than its
# imports took; prints one JSON line per file and the peak RSS growth. VmHWM,
# not ru_maxrss: the latter carries the parent's peak across exec.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    from peclr_jax.interop import torch_pickle
    def status_kib(field):
      with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))
    limit = (status_kib('VmSize:') << 10) + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = status_kib('VmHWM:')
    for path, max_tensor_bytes in json.loads(sys.argv[1]):
      if max_tensor_bytes:
        torch_pickle._MAX_TENSOR_BYTES = max_tensor_bytes
      try:
        torch_pickle.load_pth(path)
        result = ['loaded', '']
      except Exception as e:
        result = [type(e).__name__, str(e)]
      print(json.dumps([path] + result), flush=True)
    print(json.dumps(['peak_rss_growth_kib', status_kib('VmHWM:') - before]))
""")


def test_memory_bombs_are_refused_before_allocating(tmp_path):
  bombs = {}  # name -> (path, tensor byte cap or None, expected message)

  # 1. A stride-0 expansion: 80 kB of storage viewed as 30000 x 20000
  # floats (2.4 GB when copied out).
  path = tmp_path / "stride0.pth"
  _write_pth(
    path,
    _data_pkl({"w": _Tensor(_Storage("0", 20000), 0, (30000, 20000), (0, 1))}),
    {"0": bytes(20000 * 4)},
  )
  bombs["stride0"] = (path, None, r"stride \(0, 1\).*bomb/data/0.*densely")

  # 2. A 1.5 GiB storage entry deflated to 1.5 MB: refused from the sizes
  # the archive declares, before anything is inflated.
  numel = 1536 * MiB // 4
  path = tmp_path / "zipbomb.pth"
  _write_zip_with_deflate_bomb(
    path, _data_pkl({"w": _Tensor(_Storage("0", numel), 0, (numel,), (1,))}), "0", 1536
  )
  bombs["zipbomb"] = (
    path,
    None,
    (
      r"declare \d+ bytes \(the largest, 'bomb/data/0', "
      r"1610612736\), more than the \d+ allowed"
    ),
  )

  # 3. 300 tensors viewing one 4 MiB storage: 1.2 GiB of copies. Refused
  # once their sum passes the cap, lowered here to 16 MiB so that the child
  # does not have to fill the real one (4 ResNet-152 state dicts) first.
  path = tmp_path / "views.pth"
  storage = _Storage("0", MiB)
  _write_pth(
    path, _data_pkl([_Tensor(storage, 0, (MiB,), (1,)) for _ in range(300)]), {"0": bytes(4 * MiB)}
  )
  bombs["views"] = (
    path,
    16 * MiB,
    (
      r"bomb/data/0.*tensors so far take \d+ bytes, more "
      r"than the 16777216 allowed"
    ),
  )

  # 4. A data.pkl of 8 M one-byte EMPTY_SET opcodes, deflated to 8 kB:
  # unpickled, 8 M sets of 216 bytes (about 1.9 GB).
  path = tmp_path / "pklbomb.pth"
  _write_pth(path, b"\x80\x02" + b"\x8f" * (8 * MiB) + b".", {})
  bombs["pklbomb"] = (
    path,
    None,
    (
      r"'bomb/data.pkl' declares 8388611 bytes, more than "
      r"1048576"
    ),
  )

  assert all(p.stat().st_size < 2 * MiB for p, _, _ in bombs.values())
  spec = json.dumps([[str(p), cap] for p, cap, _ in bombs.values()])
  # Default malloc in the child: heap tunings that keep freed memory
  # resident would hide new allocations from VmHWM.
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, spec],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(env, OPENBLAS_NUM_THREADS="1"),
    check=False,
  )
  assert child.returncode == 0, child.stderr[-2000:]
  lines = [json.loads(row) for row in child.stdout.splitlines()]
  results = {path: (kind, message) for path, kind, message in lines[:-1]}
  for name, (path, _, expected) in bombs.items():
    kind, message = results[str(path)]
    assert kind == "TorchFileError", (name, kind, message)
    assert message.startswith(f"{path}: "), (name, message)
    assert "\n" not in message, (name, message)
    assert re.search(expected, message), (name, message)
  assert lines[-1][0] == "peak_rss_growth_kib"
  assert lines[-1][1] < 64 * 1024, lines[-1]


@pytest.mark.parametrize(
  "size, stride, offset, message",
  [
    ((4, 4), (1, 1), 0, "densely"),  # rows overlap
    ((3, 2), (4, 1), 0, "densely"),  # gaps: a column slice
    ((2, 3), (3, 1), 11, "past its storage"),
    ((-1,), (1,), 0, "negative"),
    ((0, 1 << 62), (1, 1), 0, r"larger than the \d+ bytes allowed"),
  ],
  ids=["overlap", "gaps", "past_storage", "negative", "overflow"],
)
def test_tensor_geometry_unlike_a_state_dict_is_refused(
  tmp_path, capsys, size, stride, offset, message
):
  path = tmp_path / "geometry.pth"
  _write_pth(
    path,
    _data_pkl({"w": _Tensor(_Storage("0", 16), offset, size, stride)}),
    {"0": np.arange(16, dtype="<f4").tobytes()},
  )
  with pytest.raises(torch_pickle.TorchFileError, match=message):
    torch_pickle.load_pth(path)
  # The converter's CLI: one line naming the file and the storage record.
  from peclr_jax import convert  # pylint: disable=g-import-not-at-top

  out = tmp_path / "out"
  assert convert.main(["--torch", str(path), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {path}: tensor of size {size}") and (
    "on storage record 'bomb/data/0'" in err
  ), err
  assert err.count("\n") == 1 and re.search(message, err), err
  assert not out.exists()


def test_storage_entry_larger_than_its_storage_is_refused(tmp_path):
  # data.pkl says 4 floats; the entry holds 1 MiB: refused unread.
  path = tmp_path / "oversized.pth"
  _write_pth(path, _data_pkl({"w": _Tensor(_Storage("0", 4), 0, (4,), (1,))}), {"0": bytes(MiB)})
  with pytest.raises(
    torch_pickle.TorchFileError,
    match=r"'bomb/data/0' declares 1048576 bytes, more than "
    r"16 \(data.pkl says it holds 4 x float32\)",
  ):
    torch_pickle.load_pth(path)
