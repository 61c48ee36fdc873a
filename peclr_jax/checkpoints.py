"""Orbax checkpoints: restore-or-init, and partial restore of a backbone.

A checkpoint step holds four items:
  state     {'model': ..., 'opt': ..., 'rng': ...} as plain nested dicts of
            arrays (`nnx.to_pure_dict`), so it does not depend on NNX classes;
  data_iter the grain iterator state (absent for converted weights);
  config    the run's config as JSON;
  meta      {'kind': 'pretrain'|'finetune'|'backbone'|'keypoint', 'backbone': name, ...}.
Converted PyTorch weights use the same layout with only state['model'], so
fine-tuning, evaluation and the Predictor read both the same way.
"""

import contextlib
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
  pass


class CheckpointWriteError(OSError):
  """A checkpoint step could not be written (disk full, I/O error, ...).

  An OSError, as its cause. Orbax writes each step into a temporary
  directory renamed into place only when complete, so the steps before the
  failed one stay restorable.
  """


def checkpoint_dir(path: str) -> str:
  """The directory of steps for a workdir, a checkpoints dir or a step dir."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    return os.path.join(path, CHECKPOINT_SUBDIR)
  return path


def _is_step_dir(path: str) -> bool:
  return os.path.basename(path).isdigit() and os.path.isdir(
      os.path.join(path, "state"))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Saves and restores whole training runs in `<workdir>/checkpoints`.

  Saves are asynchronous: a write that fails in the background (disk full)
  is raised by the next `save`, `wait` or `close` as CheckpointWriteError
  naming the step and the last complete one.
  """

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            read_only=read_only,
            # Temporary directories of saves cut short by a kill are never
            # read; remove them (process 0 only) so they do not pile up.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save))
    self._pending = None  # the step being written in the background

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  @contextlib.contextmanager
  def _writing(self, step):
    """Turns an OSError of the write of `step` into CheckpointWriteError."""
    try:
      yield
    except OSError as e:
      if isinstance(e, CheckpointWriteError):
        raise
      self._pending = None
      where = self.directory if step is None else f"{self.directory}/{step}"
      # What is on disk, not orbax's list, which may name the failed step.
      done = _finished_steps(self.directory)
      kept = (f"step {done[-1]} is intact" if done
              else "no earlier step was written")
      raise CheckpointWriteError(
          e.errno, f"writing checkpoint {where} failed: {e.strerror or e}; "
          f"{kept}. Fix the disk (space, permissions) and re-run the same "
          "command to continue from there.") from e

  def save(self, step: int, state: dict, *, meta: dict, config=None,
           data_iter=None):
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(meta))
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    if data_iter is not None:
      items["data_iter"] = _grain_save(data_iter)
    # Orbax first waits for the previous save: its failure surfaces here.
    self.wait()
    with self._writing(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._pending = step

  def restore(self, step: int, state_template: dict, *, expect_meta: dict,
              data_iter=None) -> dict:
    """Restores `state` shaped like `state_template` (and the data iterator
    in place). Fails clearly when the workdir holds another model."""
    meta = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_meta(meta, expect_meta, os.path.join(self.directory, str(step)))
    items = dict(state=ocp.args.StandardRestore(_abstract(state_template)))
    if data_iter is not None:
      items["data_iter"] = _grain_restore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"Checkpoint {self.directory}/{step} does not match this model "
          f"({expect_meta}): {e}") from e
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


def _grain_save(it):
  return grain.checkpoint.CheckpointSave(it)


def _grain_restore(it):
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
          f"{key}={want!r}. Use another --workdir, or set the config to match.")


def _finished_steps(directory: str) -> list[int]:
  """Steps renamed into place (orbax's temporary directories excluded)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if _is_step_dir(os.path.join(directory, d)))


def find_step(path: str) -> tuple[str, int]:
  """(steps directory, step) of the latest step under `path` (a workdir, its
  checkpoints directory, or one step directory)."""
  path = os.path.abspath(os.fspath(path))
  if _is_step_dir(path):
    return os.path.dirname(path), int(os.path.basename(path))
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint directory at {path}")
  steps = _finished_steps(directory)
  if not steps:
    raise CheckpointError(f"{directory} holds no finished checkpoint step")
  return directory, steps[-1]


def read_meta(path: str) -> dict:
  directory, step = find_step(path)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False)) as mgr:
    return dict(mgr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def restore_subtree(path: str, subtree: tuple[str, ...], template: Any):
  """Partially restores state[subtree...] (e.g. ('model', 'backbone')) from
  the latest step under `path`; nothing else is read from disk."""
  directory, step = find_step(path)
  target = _abstract(template)
  for key in reversed(subtree):
    target = {key: target}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False)) as mgr:
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"{directory}/{step}: cannot restore {'/'.join(subtree)} with the "
          f"expected structure: {e}") from e
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
