"""Stopping a run cleanly, with a checkpoint, on SIGTERM or a first Ctrl-C."""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped on SIGTERM (or a first Ctrl-C) after saving a
  checkpoint of `step`.

  An exception rather than a normal return, so that callers running several
  phases (the demo: pre-train, then fine-tune) stop too instead of starting
  the next phase on a machine that is going away; main exits 0 on it.
  `cause` starts the message: 'Preempted' (SIGTERM) or 'Interrupted (Ctrl-C)'.
  """

  def __init__(self, step: int, directory: str, cause: str = "Preempted"):
    super().__init__(
      f"{cause} at step {step}: checkpoint saved in {directory}; re-run "
      "the same command to continue."
    )
    self.step = step
    self.directory = directory
    self.cause = cause


class PreemptionWatch:
  """Whether a SIGTERM (the usual preemption notice) or a Ctrl-C has arrived.

  One process: a SIGTERM handler that only sets a flag (the loop saves at the
  end of the step; dying mid-step would lose the steps since the last
  checkpoint). A first Ctrl-C (SIGINT) does the same; a second one goes to
  the handler that was there before (Python's: KeyboardInterrupt), to abort
  at once without the checkpoint. SIGINT is left alone where it was ignored
  or set to the system default (a background job), as it was not Python's
  to handle. Several processes: they must all stop after the same step, or
  the ones still training wait forever in the next step's collectives, so
  JAX's preemption sync manager is asked instead: `jax.distributed.initialize`
  installs its own SIGTERM listener, which agrees on a step across processes
  (SIGINT keeps its default there: KeyboardInterrupt).
  """

  INTERRUPTED = "Interrupted (Ctrl-C)"

  def __init__(self):
    self._signalled = False
    self.cause = "Preempted"
    self._previous = {}  # signal number -> handler to put back
    self._distributed = jax.distributed.is_initialized()

  def __enter__(self):
    # signal.signal only works in the main thread (fit may run in another,
    # e.g. under a notebook kernel); there, preemption is not handled.
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
      if callable(signal.getsignal(signal.SIGINT)):
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler)
    return self

  def _handler(self, signum, frame):
    if signum == signal.SIGINT:
      if self._signalled:  # the second Ctrl-C: abort now
        return self._previous[signal.SIGINT](signum, frame)
      self.cause = self.INTERRUPTED
      # os.write: print() from a handler can hit stderr mid-write (the
      # progress bar) and fail with a reentrant-call error.
      os.write(
        2,
        b"\nCtrl-C: stopping after this step with a checkpoint; "
        b"press Ctrl-C again to stop at once without one.\n",
      )
    self._signalled = True

  @property
  def signalled(self) -> bool:
    """One process: a SIGTERM or Ctrl-C has arrived (any time, e.g. after
    the loop)."""
    return self._signalled

  def reached(self, step: int) -> bool:
    """Must be called after every step, on every process."""
    if self._distributed:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off
        return False
    return self._signalled

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      # None: the previous handler was not set from Python; the default.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
    return False
