"""Orbax checkpoints: restore-or-init, and partial restore of a backbone.

A checkpoint step holds four items:
  state     {'model': ..., 'opt': ..., 'rng': ...} as plain nested dicts of
            arrays (`nnx.to_pure_dict`), so it does not depend on NNX classes;
  data_iter the grain iterator state (absent for converted weights);
  config    the run's config as JSON;
  meta      {'kind': 'pretrain'|'finetune'|'backbone'|'keypoint', 'backbone': name, ...}.
Converted PyTorch weights use the same layout with only state['model'], so
fine-tuning, evaluation and the Predictor read both the same way.

Every step also holds `checksums.json`: the size and SHA-256 of each of its
files, computed in orbax's background thread once the step is complete and
before it is renamed into place (so a step is never visible without it).
Every read (`find_step`, hence `read_meta`, `read_config`, `restore_subtree`,
`restore_module`; `CheckpointManager.latest_step`, hence resuming) takes the
newest step whose files match it: a step damaged later (bit rot, a
truncated or deleted file) is skipped with a one-line warning naming the
file, and the run that holds the workdir's lock moves it aside to
`<step>.damaged` (a name orbax ignores) for inspection. Steps written before
checksums existed are read unverified.
"""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINT_SUBDIR = "checkpoints"
LOCK_FILE = ".lock"
MANIFEST = "checksums.json"
DAMAGED_SUFFIX = ".damaged"
# Orbax writes step N into N + this suffix and renames it when complete.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Orbax's bookkeeping of a step, rewritten at the rename (commit time),
# after the checksums: not checked.
_UNCHECKED = ("_CHECKPOINT_METADATA",)


class CheckpointError(ValueError):
  pass


class CheckpointWriteError(OSError):
  """A checkpoint step could not be written (disk full, I/O error, ...).

  An OSError, as its cause. Orbax writes each step into a temporary
  directory renamed into place only when complete, so the steps before the
  failed one stay restorable.
  """


class WorkdirBusyError(OSError):
  """Another run (process) holds the workdir's lock.

  An OSError, so main prints it as one `error:` line and exits 1.
  """


# realpath of a held lock file -> [fd (None: not lockable), count]. A run
# locks its workdir in main.run and again in training.fit (and the demo's
# stages lock their sub-workdirs): one process takes each lock once and
# counts. flock alone is not re-entrant: two open() of one file are two
# locks that exclude each other, even in one process.
_held: dict[str, list] = {}
_held_guard = threading.Lock()


def _describe_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info.get("pid"):  # the holder is between its lock and its write
    return "another process"
  return f"pid {info['pid']} on host {info.get('host', '?')}, since {info.get('since', '?')}"


def _acquire(path: str):
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
        f"{directory} is in use by another run ({holder}; lock file "
        f"{path}). Wait for it to end, or use another directory."
      ) from None
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      print(
        f"warning: cannot lock {path} ({e.strerror}); nothing stops "
        "another run from using this directory at the same time.",
        file=sys.stderr,
        flush=True,
      )
      return None
    # A holder that was releasing may have unlinked the file between our
    # open and our lock: the lock is then on a file nobody else sees.
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  info = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "since": datetime.datetime.now().isoformat(timespec="seconds"),
    "argv": sys.argv,
  }
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  return fd


def _release(path: str, fd):
  if fd is None:
    return
  try:
    # Unlinked while still locked (see _acquire), so that a finished run
    # leaves nothing behind; a killed run leaves the file, but the kernel has
    # dropped its lock, so the next run takes it.
    os.unlink(path)
  except FileNotFoundError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def lock_workdir(workdir: str):
  """Holds an exclusive lock on `workdir` (`<workdir>/.lock`) while inside.

  Refuses at once, with WorkdirBusyError naming the holder (pid, host, start
  time, written into the lock file), when another process holds it: two runs
  in one workdir would delete each other's in-progress checkpoints at
  start-up and write the metrics log twice. Re-entrant within a process.
  The lock is `flock`, so the kernel drops it when its process dies: a killed
  run leaves no stale lock. Only process 0 of a multi-process run takes it
  (the processes of one run share the workdir; process 0 is the one that
  cleans up and writes the arrays and the logs); other processes of a second
  run stop when their process 0 is refused.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(os.path.realpath(os.fspath(workdir)), LOCK_FILE)
  with _held_guard:
    if path in _held:
      _held[path][1] += 1
    else:
      _held[path] = [_acquire(path), 1]
  try:
    yield
  finally:
    with _held_guard:
      entry = _held[path]
      entry[1] -= 1
      if entry[1] == 0:
        del _held[path]
        _release(path, entry[0])


def checkpoint_dir(path: str) -> str:
  """The directory of steps for a workdir, a checkpoints dir or a step dir."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    return os.path.join(path, CHECKPOINT_SUBDIR)
  return path


def _is_step_dir(path: str) -> bool:
  # A step whose `state` was deleted still has its manifest: it is damaged,
  # not absent.
  return os.path.basename(path).isdigit() and (
    os.path.isdir(os.path.join(path, "state")) or os.path.isfile(os.path.join(path, MANIFEST))
  )


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Saves and restores whole training runs in `<workdir>/checkpoints`.

  Saves are asynchronous: a write that fails in the background (disk full)
  is raised by the next `save`, `wait` or `close` as CheckpointWriteError
  naming the step and the last complete one. The checksums of a step are
  computed in the same background thread.
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        # Temporary directories of saves cut short by a kill are never
        # read; remove them (process 0 only) so they do not pile up.
        cleanup_tmp_directories=not read_only,
        # Always orbax's asynchronous checkpointer: only it calls back
        # between the complete write and the rename, where the
        # checksums are written. async_save=False waits in `save`.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
      ),
    )
    self._async = async_save
    self._pending = None  # the step being written in the background
    if not read_only:
      _quiet_failed_saves()

  def latest_step(self) -> int | None:
    """The newest intact step (damaged newer ones skipped, see the module
    docstring), None when none was written.

    Raises:
      CheckpointError: every step is damaged.
    """
    step = _newest_intact(self.directory)
    # Orbax lists the steps once; one may have just been moved aside.
    self._manager.reload()
    return step

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  @contextlib.contextmanager
  def _writing(self, step):
    """Turns a failed write of `step` into CheckpointWriteError: an OSError,
    or tensorstore's ValueError carrying the OS error code (a full disk is
    `ValueError('RESOURCE_EXHAUSTED: Error writing "<array>" in OCDBT
    database ...: No space left on device [os_error_code='28']')`)."""
    try:
      yield
    except (OSError, ValueError) as e:
      if isinstance(e, CheckpointWriteError):
        raise
      if isinstance(e, OSError):
        code, reason = e.errno, e.strerror or str(e)
      else:
        found = re.search(r"os_error_code='(\d+)'", str(e))
        if found is None:  # not an I/O error: a bug, shown as it is
          raise
        code = int(found.group(1))
        reason = os.strerror(code)
      self._pending = None
      where = self.directory if step is None else f"{self.directory}/{step}"
      # What is on disk, not orbax's list, which may name the failed step.
      done = _finished_steps(self.directory)
      kept = f"step {done[-1]} is intact" if done else "no earlier step was written"
      raise CheckpointWriteError(
        code,
        f"writing checkpoint {where} failed: {reason}; "
        f"{kept}. Fix the disk (space, permissions) and re-run the same "
        "command to continue from there.",
      ) from e

  def save(self, step: int, state: dict, *, meta: dict, config=None, data_iter=None):
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    if data_iter is not None:
      items["data_iter"] = _grain_save(data_iter)
    # Orbax first waits for the previous save: its failure surfaces here.
    self.wait()
    self._pending = step  # read by _write_checksums, maybe before save returns
    with self._writing(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if not self._async:
      self.wait()

  def _write_checksums(self):
    """Orbax's callback, in its background thread on process 0, once every
    process has written step `_pending` and before it is renamed."""
    _write_manifest(os.path.join(self.directory, f"{self._pending}{_TMP_SUFFIX}"))

  def restore(self, step: int, state_template: dict, *, expect_meta: dict, data_iter=None) -> dict:
    """Restores `state` shaped like `state_template` (and the data iterator
    in place). Fails clearly when the workdir holds another model."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_meta(meta, expect_meta, os.path.join(self.directory, str(step)))
    items = dict(state=ocp.args.StandardRestore(_abstract(state_template)))
    if data_iter is not None:
      items["data_iter"] = _grain_restore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
        f"Checkpoint {self.directory}/{step} does not match this model ({expect_meta}): {e}"
      ) from e
    return restored.state

  def wait(self):
    with self._writing(self._pending):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


# grain only where a data iterator is saved or restored: the steps and the
# Predictor import without it (benchmarks/accelerator_suite.sh carries no
# grain to the GPU machine).
def _grain_save(it):
  import grain  # pylint: disable=g-import-not-at-top

  return grain.checkpoint.CheckpointSave(it)


def _grain_restore(it):
  import grain  # pylint: disable=g-import-not-at-top

  return grain.checkpoint.CheckpointRestore(it)


def check_meta(meta: dict, expect: dict, where: str):
  for key, want in expect.items():
    have = meta.get(key)
    if isinstance(want, (tuple, list, set)):
      ok = have in want
    else:
      ok = have == want
    if not ok:
      raise CheckpointError(
        f"{where} holds a checkpoint with {key}={have!r}, but this run needs "
        f"{key}={want!r}. Use another --workdir, or set the config to match."
      )


class _Damaged(Exception):
  """The files of a step differ from its manifest (the message says how)."""


# The steps this process found intact, with the (inode, size, mtime) of each
# of their files, and the warnings it printed: a step is read by several
# helpers in a row (a run's start, fine-tuning's init, evaluation).
_verified: set[tuple] = set()
_reported: set[str] = set()


def _warn_once(message: str):
  if message not in _reported:
    _reported.add(message)
    print(message, file=sys.stderr, flush=True)


def _checksums(step_dir: str) -> dict[str, list]:
  """{path relative to step_dir: [size in bytes, SHA-256]} of its files
  (but the manifest and `_UNCHECKED`)."""
  sums = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST and rel not in _UNCHECKED:
        with open(path, "rb") as f:
          sums[rel] = [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]
  return sums


def _write_manifest(step_dir: str):
  with open(os.path.join(step_dir, MANIFEST), "w") as f:
    json.dump(_checksums(step_dir), f, indent=0)


def _verify(step_dir: str):
  """Checks the files of a finished step against its manifest.

  A step without one (written before checksums existed) is accepted, with a
  warning that it is unverified.

  Raises:
    _Damaged: a file is missing, of another size or content, or the manifest
      itself is unreadable.
  """
  try:
    with open(os.path.join(step_dir, MANIFEST), "rb") as f:
      want = [(rel, int(size), str(digest)) for rel, (size, digest) in json.load(f).items()]
  except FileNotFoundError:
    _warn_once(
      f"warning: checkpoint {step_dir} has no {MANIFEST} (written "
      "by an older version): read unverified."
    )
    return
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise _Damaged(f"{os.path.join(step_dir, MANIFEST)} is unreadable: {e}") from None
  stats = []
  for rel, _, _ in [(MANIFEST, 0, ""), *want]:
    try:
      st = os.stat(os.path.join(step_dir, rel))
    except FileNotFoundError:
      raise _Damaged(f"{os.path.join(step_dir, rel)} is missing") from None
    stats.append((rel, st.st_ino, st.st_size, st.st_mtime_ns))
  key = (step_dir, tuple(stats))
  if key in _verified:
    return
  for rel, size, digest in want:
    path = os.path.join(step_dir, rel)
    with open(path, "rb") as f:
      have = os.fstat(f.fileno()).st_size
      if have != size:
        raise _Damaged(f"{path} has {have} bytes, {size} were written")
      if hashlib.file_digest(f, "sha256").hexdigest() != digest:
        raise _Damaged(f"{path} differs from what was written (SHA-256)")
  _verified.add(key)


def _owned(path: str) -> bool:
  """Whether this process holds the lock of a workdir that contains path."""
  path = os.path.realpath(path)
  with _held_guard:
    return any(path.startswith(os.path.dirname(lock) + os.sep) for lock in _held)


def _set_aside(step_dir: str) -> str:
  """Renames a damaged step to <step>.damaged (or .damaged2, ...), which
  orbax neither lists nor deletes, so that the step can be written again."""
  target, n = step_dir + DAMAGED_SUFFIX, 1
  while os.path.exists(target):
    n += 1
    target = f"{step_dir}{DAMAGED_SUFFIX}{n}"
  os.rename(step_dir, target)
  return target


def _newest_intact(directory: str) -> int | None:
  """The newest finished step of `directory` that `_verify` accepts; None
  when there is no step.

  Each damaged newer step is named in a warning. The process that holds the
  workdir's lock (a run about to write those step numbers again) moves it
  aside; other readers only skip it.

  Raises:
    CheckpointError: every step is damaged (none is moved).
  """
  damaged = []
  for step in reversed(_finished_steps(directory)):
    step_dir = os.path.join(directory, str(step))
    try:
      _verify(step_dir)
    except _Damaged as e:
      damaged.append((step_dir, str(e)))
      continue
    for bad_dir, why in damaged:
      kept = f"; moved to {_set_aside(bad_dir)}" if _owned(bad_dir) else ""
      _warn_once(f"warning: skipping damaged checkpoint {bad_dir}: {why}{kept}; using step {step}.")
    return step
  if damaged:
    raise CheckpointError(
      f"no intact checkpoint step in {directory}: " + "; ".join(why for _, why in damaged)
    )
  return None


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  """An orbax manager that only reads `directory` (a context manager).

  Orbax warns at every read-only open (a restore opens two): about each
  option it has to change (given here as it wants them), and always "Given
  directory is read only", dropped by `_DropReadOnlyNotice`.
  """
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropReadOnlyNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_DropReadOnlyNotice())
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
  )


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's notice that a read-only manager was opened read-only."""

  def filter(self, record):
    return record.msg != "Given directory is read only=%s"


class _DropOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save at ERROR, with a traceback, from
  each thread the failure passes through; the failure itself is raised by
  the next save, wait or close (as CheckpointWriteError), so these records
  only repeat it, hundreds of lines long."""

  def filter(self, record):
    return not (record.levelno == logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _DropUnretrievedWriteErrors(logging.Filter):
  """asyncio reports a failed array write whose task or future nobody
  awaited any more (orbax stopped at the first failure of the same save) as
  "Task (or Future) exception was never retrieved", with a traceback, when
  the object is collected; the failure is raised anyway."""

  UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    # tensorstore raises a failed write as ValueError naming the OS error.
    write_error = isinstance(exc, OSError) or (
      isinstance(exc, ValueError) and "os_error_code=" in str(exc)
    )
    return not (str(record.msg).startswith(self.UNRETRIEVED) and write_error)


def _quiet_failed_saves():
  """Installs (once per process) `_DropOrbaxErrors`,
  `_DropUnretrievedWriteErrors` and an unraisable hook
  that drops tensorstore's reports of writes completing after orbax closed
  the event loop that awaited them (each other array write of a failed
  save: `RuntimeError: Event loop is closed`, one traceback each)."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxErrors())
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropUnretrievedWriteErrors) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropUnretrievedWriteErrors())
  if getattr(sys.unraisablehook, "drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
    ):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _finished_steps(directory: str) -> list[int]:
  """Steps renamed into place (orbax's temporary directories excluded)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if _is_step_dir(os.path.join(directory, d)))


def find_step(path: str) -> tuple[str, int]:
  """(steps directory, step) of the latest intact step under `path` (a
  workdir, its checkpoints directory, or one step directory, which must be
  intact itself); damaged newer steps are skipped with a warning."""
  path = os.path.abspath(os.fspath(path))
  if _is_step_dir(path):
    try:
      _verify(path)
    except _Damaged as e:
      raise CheckpointError(f"checkpoint {path} is damaged: {e}") from None
    return os.path.dirname(path), int(os.path.basename(path))
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint directory at {path}")
  step = _newest_intact(directory)
  if step is None:
    raise CheckpointError(f"{directory} holds no finished checkpoint step")
  return directory, step


def read_meta(path: str) -> dict:
  """The metadata stored with the latest step under `path` (kind, backbone,
  ...). A missing, garbled or incomplete one is a CheckpointError naming
  the step's `meta` item, not a JSON or orbax traceback."""
  directory, step = find_step(path)
  where = os.path.join(directory, str(step), "meta")
  try:
    with _read_only_manager(directory) as mgr:
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # orbax wraps JSON and file errors in many types
    raise CheckpointError(
      f"cannot read the checkpoint metadata {where}: "
      f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    ) from e
  if not isinstance(meta, dict) or not {"kind", "backbone"} <= set(meta):
    raise CheckpointError(
      f"the checkpoint metadata {where} is not a dict with 'kind' and "
      f"'backbone' (got {str(meta)[:200]}): not a checkpoint of this "
      "package, or damaged"
    )
  return dict(meta)


def read_config(path: str) -> dict | None:
  """The config (as JSON) stored with the latest finished step under `path`,
  None when there is no step or it holds no config; read-only."""
  try:
    directory, step = find_step(path)
  except CheckpointError:
    return None
  if not os.path.isdir(os.path.join(directory, str(step), "config")):
    return None
  with _read_only_manager(directory) as mgr:
    return dict(mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)


def restore_subtree(path: str, subtree: tuple[str, ...], template: Any):
  """Partially restores state[subtree...] (e.g. ('model', 'backbone')) from
  the latest step under `path`; nothing else is read from disk."""
  directory, step = find_step(path)
  target = _abstract(template)
  for key in reversed(subtree):
    target = {key: target}
  with _read_only_manager(directory) as mgr:
    try:
      restored = mgr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, partial_restore=True)),
      )
    except (ValueError, KeyError) as e:
      raise CheckpointError(
        f"{directory}/{step}: cannot restore {'/'.join(subtree)} with the expected structure: {e}"
      ) from e
  tree = restored.state
  for key in subtree:
    tree = tree[key]
  return tree


def restore_module(path: str, module: nnx.Module, subtree=("model",)):
  """Loads state[subtree] of the latest checkpoint under `path` into module."""
  state = nnx.state(module)
  pure = nnx.to_pure_dict(state)
  restored = restore_subtree(path, tuple(subtree), pure)
  restored = jax.tree.map(np.asarray, restored)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(module, state)
  return module
