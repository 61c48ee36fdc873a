"""Streaming reader of a top-level JSON array, one element at a time.

FreiHAND's label files are JSON lists with one element per sample; `json.load`
would hold the whole document and its parsed tree in memory, whatever the
file's size. `iter_json_list` holds one element and one chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]}")


def iter_json_list(
  fobj: TextIO, *, chunk_size: int = 1 << 20, max_element_chars: int = 1 << 24, name: str = "<json>"
) -> Iterator[Any]:
  """Yields the elements of a top-level JSON array one at a time.

  Reads `fobj` in chunks of `chunk_size` characters and decodes each element
  with the C-accelerated `json.JSONDecoder.raw_decode`, so memory holds at most
  one element plus one chunk, whatever the file size.

  Args:
    fobj: text file object positioned at the start of a JSON document whose
      top-level value is an array.
    chunk_size: characters read per `fobj.read` call.
    max_element_chars: an element whose text exceeds this is reported as an
      error instead of being buffered without bound (a syntax error would
      otherwise make the reader buffer the rest of the file).
    name: file name used in error messages.

  Yields:
    The decoded elements, in order.

  Raises:
    ValueError: the document is not an array, is malformed or is truncated.
  """
  decoder = json.JSONDecoder()
  buf = ""
  pos = 0
  consumed = 0  # characters dropped from the front of `buf` so far
  eof = False

  def fill() -> None:
    nonlocal buf, pos, consumed, eof
    if pos:
      consumed += pos
      buf = buf[pos:]
      pos = 0
    chunk = fobj.read(chunk_size)
    if chunk:
      buf += chunk
    else:
      eof = True

  def skip_whitespace() -> None:
    nonlocal pos
    while True:
      pos = _WHITESPACE.match(buf, pos).end()
      if pos < len(buf) or eof:
        return
      fill()

  def fail(message: str) -> ValueError:
    return ValueError(f"{name}: {message} (at character {consumed + pos})")

  skip_whitespace()
  if pos >= len(buf):
    raise fail("empty file, expected a JSON array")
  if buf[pos] != "[":
    raise fail(f"top-level JSON value is not an array (starts with {buf[pos : pos + 20]!r})")
  pos += 1
  skip_whitespace()
  if pos < len(buf) and buf[pos] == "]":
    pos += 1
  else:
    index = 0
    while True:
      while True:
        if pos >= len(buf) and not eof:
          fill()
          continue
        try:
          value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
          if eof:
            raise fail(f"invalid or truncated JSON in element {index}: {e.msg}") from None
          if len(buf) - pos > max_element_chars:
            raise fail(
              f"element {index} is malformed or longer than {max_element_chars} characters"
            ) from None
          fill()
          continue
        if (
          not eof
          and (end == len(buf) or buf[end] not in _DELIMITERS)
          and len(buf) - pos <= max_element_chars
        ):
          # A number cut by the chunk boundary ("-0" of "-0.5") decodes
          # "successfully": accept a value only once the character after it
          # is seen to end it.
          fill()
          continue
        break
      yield value
      pos = end
      index += 1
      skip_whitespace()
      if pos >= len(buf):
        raise fail(f"truncated: the array is not closed after element {index - 1}")
      if buf[pos] == "]":
        pos += 1
        break
      if buf[pos] != ",":
        raise fail(f"expected ',' or ']' after element {index - 1}, found {buf[pos : pos + 20]!r}")
      pos += 1
      skip_whitespace()
      if pos < len(buf) and buf[pos] == "]":
        raise fail("trailing comma before the closing bracket")
  skip_whitespace()
  if pos < len(buf):
    raise fail(f"unexpected data after the array: {buf[pos : pos + 20]!r}")
