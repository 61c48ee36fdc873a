"""Puts the next batches on the devices while the current step runs.

Without it the training loop reads a host batch, copies it to the devices and
only then dispatches the step, so the accelerator idles for the read and the
copy. `DevicePrefetcher` does both in a background thread, `size` batches
ahead, and times how long the loop still waits for each batch (the
`input_wait_ms` training metric): near zero when the host keeps up.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_END = object()  # the source is exhausted


class DevicePrefetcher:
  """A checkpointable iterator over `put(batch)` for the batches of `iterator`.

  Its state (`get_state`, saved with the train state) is the source's state
  right after the last batch handed out, not after the ones read ahead, so a
  resumed run continues with the next unseen batch. `set_state` stops the
  reading ahead and restores the source; reading restarts on the next
  `next()` (or `start_prefetch()`). An exception of the source (or of `put`)
  is raised by the `next()` that reaches it; the end of the source ends this
  iterator.

  States are JSON bytes, the form grain's orbax handler exchanges with
  iterators that are not its own DatasetIterator (the source's dict states
  are encoded; a source whose states already are bytes keeps them).

  Args:
    iterator: a checkpointable iterator of host batches (`get_state`,
      `set_state`); only this object reads it from now on.
    put: host batch -> device batch (e.g. `sharding.shard_batch`).
    size: batches held ready on the devices; 0: no thread and no reading
      ahead, each `next()` reads and puts its batch (config.data.
      device_prefetch=0, e.g. for tests that act on the n-th batch read).
  """

  def __init__(self, iterator, put: Callable[[Any], Any], size: int = 2):
    self._iterator = iterator
    self._put = put
    self._size = size
    self._state = iterator.get_state()
    self._bytes_states = isinstance(self._state, bytes)
    self._queue = None
    self._stop = threading.Event()
    self._thread = None
    self._read_ahead = False  # the source may be past `_state`
    self.wait_seconds = 0.0  # total time `next()` waited for a batch

  def _read_one(self):
    """(device batch, source state after it); StopIteration at the end."""
    batch = next(self._iterator)
    return self._put(batch), self._iterator.get_state()

  def _read(self):
    try:
      while not self._stop.is_set():
        try:
          item = self._read_one()
        except StopIteration:
          item = _END
        self._offer(item)
        if item is _END:
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._offer(e)  # raised in the consumer's thread

  def _offer(self, item):
    # Gives up when stopped, so `close` never waits on a full queue.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return
      except queue.Full:
        continue

  def _start(self):
    if self._read_ahead:  # batches read ahead were dropped: read them again
      self._iterator.set_state(self._state)
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self._size)
    self._thread = threading.Thread(target=self._read, daemon=True, name="device_prefetch")
    self._read_ahead = True
    self._thread.start()

  def __iter__(self):
    return self

  def start_prefetch(self) -> None:
    """Starts reading ahead now (orbax calls it after a restore)."""
    if self._size and self._thread is None:
      self._start()

  def __next__(self):
    start = time.perf_counter()
    if not self._size:
      try:
        batch, self._state = self._read_one()
      finally:
        self.wait_seconds += time.perf_counter() - start
      return batch
    self.start_prefetch()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if item is _END:
      self._queue.put(_END)  # every later next() ends too
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> bytes:
    if self._bytes_states:
      return self._state
    return json.dumps(self._state).encode()

  def set_state(self, state: bytes) -> None:
    self.close()
    self._iterator.set_state(state if self._bytes_states else json.loads(state))
    self._state = self._iterator.get_state()
    self._read_ahead = False

  def close(self) -> None:
    """Stops reading ahead; a later `next()` goes on after the last batch
    handed out."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
