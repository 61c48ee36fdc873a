"""A bounded, ordered thread-pool map for the builders' decode-and-crop work
(PIL releases the GIL while decoding and warping)."""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


def imap_bounded(
  fn: Callable[[_T], _R], items: Iterable[_T], num_workers: int, max_in_flight: int | None = None
) -> Iterator[_R]:
  """Ordered `map(fn, items)` on a thread pool with bounded look-ahead.

  Unlike `Executor.map`, at most `max_in_flight` results wait in memory, so a
  slow consumer (the TFDS writer) never makes the whole dataset pile up.
  Exceptions raised by `fn` propagate when their result is reached.
  """
  if num_workers <= 1:
    yield from map(fn, items)
    return
  max_in_flight = max_in_flight or 4 * num_workers
  pool = concurrent.futures.ThreadPoolExecutor(num_workers)
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= max_in_flight:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def default_num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))
