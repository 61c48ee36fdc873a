"""The streaming JSON array reader (tfds_builders/freihand/json_stream.py).

Expected values come from `json.loads` of the same text.
"""

import io
import json

import numpy as np
import pytest

from tfds_builders.freihand import json_stream

_DOCUMENTS = [
  "[]",
  " \n[ \t]\n",
  "[1]",
  "[12345678, -0.000123, 1.5e-3, 7E+2, 0]",
  "[[1, 2], [3, [4, 5]], []]",
  '["a,]b", "\\u00e9\\"[", {"k": [1, 2], "l": {}}, true, false, null]',
  json.dumps(np.random.default_rng(0).normal(size=(7, 21, 3)).tolist(), indent=2),
  json.dumps([[float(x)] for x in np.random.default_rng(1).normal(size=50)]),
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("doc", range(len(_DOCUMENTS)))
def test_iter_json_list_matches_json_loads(doc, chunk_size):
  text = _DOCUMENTS[doc]
  got = list(json_stream.iter_json_list(io.StringIO(text), chunk_size=chunk_size))
  assert got == json.loads(text)


@pytest.mark.parametrize(
  "text, message",
  [
    ("", "empty file"),
    ('{"a": 1}', "not an array"),
    ("[1, 2", "truncated"),
    ("[[1, 2], [3", "truncated"),
    ("[1, 2,]", "trailing comma"),
    ("[1 2]", "expected ','"),
    ("[1] x", "after the array"),
    ("[1, @]", "element 1"),
  ],
)
@pytest.mark.parametrize("chunk_size", [1, 4, 1 << 20])
def test_iter_json_list_errors(text, message, chunk_size):
  with pytest.raises(ValueError, match=message) as err:
    list(json_stream.iter_json_list(io.StringIO(text), chunk_size=chunk_size, name="f.json"))
  assert "f.json" in str(err.value)


class _CountingReader(io.StringIO):
  """Records how much was read and the largest single read."""

  def __init__(self, text):
    super().__init__(text)
    self.total = 0
    self.largest = 0

  def read(self, size=-1):
    assert size is not None and size > 0, "the reader must read in chunks"
    data = super().read(size)
    self.total += len(data)
    self.largest = max(self.largest, len(data))
    return data


def test_iter_json_list_streams_in_bounded_chunks():
  elements = [[[float(i), 0.5, -1.25]] * 21 for i in range(500)]
  text = json.dumps(elements)
  reader = _CountingReader(text)
  it = json_stream.iter_json_list(reader, chunk_size=256)
  first = next(it)
  assert first == elements[0]
  # Only enough for one element (~400 characters) has been read.
  assert reader.total <= 2 * len(json.dumps(elements[0])) + 256
  assert list(it) == elements[1:]
  assert reader.largest <= 256 and reader.total == len(text)


def test_iter_json_list_bounds_a_runaway_element():
  text = '["' + "a" * 10_000  # never closed
  with pytest.raises(ValueError, match="longer than 100"):
    list(json_stream.iter_json_list(io.StringIO(text), chunk_size=16, max_element_chars=100))
