"""A data-iterator wrapper for tests that must act on each batch."""

import json


class HookedIterator:
  """Calls `on_batch(count, batch)` for every batch of a grain iterator.

  Checkpoints through the wrapped iterator: grain's orbax handler exchanges
  JSON bytes with iterators that are not its own DatasetIterator.
  """

  def __init__(self, iterator, on_batch):
    self._it, self._on_batch, self.count = iterator, on_batch, 0

  def __next__(self):
    batch = next(self._it)
    self.count += 1
    self._on_batch(self.count, batch)
    return batch

  def get_state(self):
    return json.dumps(self._it.get_state()).encode()

  def set_state(self, state):
    self._it.set_state(json.loads(state))

  def start_prefetch(self):
    pass
