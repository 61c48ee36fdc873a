"""A run's metrics on disk: metrics.jsonl (JSON lines) and TensorBoard events."""

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricWriter:
  """JSON lines (read by tests and benchmarks) plus TensorBoard events.

  TensorBoard files are written by tensorboardX, which needs no TensorFlow.
  Only process 0 writes.

  Args:
    workdir: where metrics.jsonl and tensorboard/ go.
    enabled: write at all (default: on process 0 only).
    resume_step: the step a resumed run restarts after. Rows logged after it
      by an interrupted run are about to be redone, so they are dropped (and
      TensorBoard is told to purge them) and the log reads as one run.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        truncate_metrics(path, resume_step)
      self._jsonl = open(path, "a")
      # Imported here: tensorboardX imports torch when it is installed
      # (~2.5 s), which a step alone never needs.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=None if resume_step is None else resume_step + 1,
      )

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _parse_rows(lines):
  """Parsed JSON rows; a torn last line (the process was killed while
  writing it) is skipped, a bad line elsewhere is an error."""
  rows = []
  lines = [line for line in lines if line.strip()]
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def truncate_metrics(path: str, step: int):
  """Keeps the rows of metrics.jsonl with row['step'] <= step.

  Rewritten through a temporary file and an atomic rename, so a kill during
  the rewrite leaves the old log, never a half one.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  rows = _parse_rows(lines)
  kept = [r for r in rows if r.get("step", 0) <= step]
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """The metrics.jsonl rows of a run, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return _parse_rows(f.readlines())
