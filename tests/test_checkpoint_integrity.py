"""Checkpoints damaged after they were written, and a disk that fills up.

Every step holds the checksums of its files (`checkpoints.MANIFEST`); a
resumed run and every reader (find_step, restore_subtree, read_meta) take the
newest step that matches them. The damage is done to real orbax checkpoints
of a tiny pre-training run; the full disk is a real 3 MB tmpfs, mounted in a
mount namespace of its own for the CLI's subprocess.
"""

import asyncio
import gc
import os
import shlex
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
from test_reliability import (
  PRETRAIN_STEPS,
  assert_trees_equal,
  cli_args,
  load_state,
  logged_steps,
  make_config,
  subprocess_env,
)

from peclr_jax.train import checkpoints, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"num_train_steps": PRETRAIN_STEPS, "checkpoint_every_steps": 1, "eval_every_steps": -1}


@pytest.fixture(scope="module")
def trained(synthetic_data_dir, tmp_path_factory):
  """(config, workdir) of a finished run keeping steps 2, 3 and 4; tests
  damage copies of it."""
  config = make_config("pretrain", {"data.data_dir": synthetic_data_dir, **OVERRIDES})
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  pretrain.train_and_evaluate(config, workdir)
  return config, workdir


def copy_of(workdir, tmp_path):
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  return copy


def step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def read_step(workdir, step):
  """Everything in `state` of one step, read by orbax alone (no checks)."""
  with ocp.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  ) as mgr:
    return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def largest_array_file(workdir, step):
  """The step's biggest file of array data (relative path)."""
  root = os.path.join(step_dir(workdir, step), "state", "ocdbt.process_0", "d")
  name = max(os.listdir(root), key=lambda n: os.path.getsize(os.path.join(root, n)))
  return os.path.relpath(os.path.join(root, name), step_dir(workdir, step))


def test_flipped_bytes_resume_from_the_previous_step(trained, tmp_path, capsys):
  """8 bytes of step 4's biggest array file overwritten: the re-run skips
  step 4 with a warning naming it and why, keeps it as 4.damaged, resumes
  from step 3 and trains step 4 again to the very values it had."""
  config, original = trained
  workdir = copy_of(original, tmp_path)
  step_4 = read_step(workdir, 4)
  rel = largest_array_file(workdir, 4)
  with open(os.path.join(step_dir(workdir, 4), rel), "r+b") as f:
    f.seek(os.path.getsize(f.name) // 2)
    f.write(b"\xff" * 8)
  with open(os.path.join(step_dir(workdir, 4), rel), "rb") as f:
    damaged_bytes = f.read()

  capsys.readouterr()
  pretrain.train_and_evaluate(config, workdir)
  out, err = capsys.readouterr()
  kept = step_dir(workdir, 4) + checkpoints.DAMAGED_SUFFIX
  assert (
    f"warning: skipping damaged checkpoint {step_dir(workdir, 4)}: "
    f"{step_dir(workdir, 4)}/{rel} differs from what was written "
    f"(SHA-256); moved to {kept}; using step 3."
  ) in err, err
  assert f"Resumed from {workdir}/checkpoints/3." in out, out
  # Kept as it is for inspection; the re-run's saves and orbax's clean-up
  # of old steps passed it by.
  with open(os.path.join(kept, rel), "rb") as f:
    assert f.read() == damaged_bytes
  # Step 3 was restored whole (model, optimiser, key, data position): step 4
  # redone from it is bitwise the step 4 the first run wrote.
  step, state = load_state(workdir)
  assert step == 4
  assert_trees_equal(state, step_4)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4", "4.damaged"]
  assert logged_steps(workdir) == list(range(1, PRETRAIN_STEPS + 1))


def test_truncated_or_deleted_files_are_skipped_by_readers(trained, tmp_path, capsys):
  """Readers (fine-tuning's init, evaluate, predict) skip a truncated step 4
  and a step 3 missing a file, touch neither, and read step 2; with no step
  intact, one CheckpointError names the directory. A step without checksums
  (an older version's) is read, said to be unverified."""
  _, original = trained
  workdir = copy_of(original, tmp_path)
  directory = os.path.join(workdir, "checkpoints")
  step_2 = read_step(workdir, 2)
  truncated = largest_array_file(workdir, 4)
  path = os.path.join(step_dir(workdir, 4), truncated)
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  os.remove(os.path.join(step_dir(workdir, 3), "meta", "metadata"))

  capsys.readouterr()
  assert checkpoints.find_step(workdir) == (directory, 2)
  assert checkpoints.read_meta(workdir)["kind"] == "pretrain"
  restored = checkpoints.restore_subtree(workdir, ("model",), step_2["model"])
  assert_trees_equal(restored, step_2["model"])
  err = capsys.readouterr().err
  # Each skipped step named once, however many readers passed it.
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert warnings == [
    f"warning: skipping damaged checkpoint {step_dir(workdir, 4)}: {path} "
    f"has {size // 2} bytes, {size} were written; using step 2.",
    f"warning: skipping damaged checkpoint {step_dir(workdir, 3)}: "
    f"{step_dir(workdir, 3)}/meta/metadata is missing; using step 2.",
  ], err
  assert sorted(os.listdir(directory)) == ["2", "3", "4"]  # not moved
  with pytest.raises(
    checkpoints.CheckpointError, match="is damaged: .*/3/meta/metadata is missing"
  ):
    checkpoints.find_step(step_dir(workdir, 3))

  with open(os.path.join(step_dir(workdir, 2), checkpoints.MANIFEST), "r+b") as f:
    f.write(b"#")
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.find_step(workdir)
  message = str(info.value)
  assert (
    message.startswith(f"no intact checkpoint step in {directory}: {path} has")
    and "\n" not in message
  ), message
  assert f"{step_dir(workdir, 2)}/{checkpoints.MANIFEST} is unreadable" in message, message

  os.remove(os.path.join(step_dir(workdir, 2), checkpoints.MANIFEST))
  assert checkpoints.find_step(workdir) == (directory, 2)
  assert (
    f"warning: checkpoint {step_dir(workdir, 2)} has no {checkpoints.MANIFEST}"
  ) in capsys.readouterr().err


def test_unretrieved_write_failures_of_a_failed_save_are_not_logged(caplog):
  """Each array write of a save that failed on the disk is an asyncio task or
  future whose exception nobody retrieves; asyncio logs each when it is
  collected (a timing-dependent flood after the CLI's one error line). Those
  are dropped; an unretrieved exception that is not a write failure is not."""
  checkpoints._quiet_failed_saves()  # pylint: disable=protected-access
  write_failure = ValueError("RESOURCE_EXHAUSTED: Failed writing: ... [os_error_code='28']")
  bug = ValueError("an unrelated failure")
  loop = asyncio.new_event_loop()
  try:
    for exc in (write_failure, bug):
      future = loop.create_future()
      future.set_exception(exc)
      del future  # collected unretrieved: asyncio logs it
      gc.collect()
  finally:
    loop.close()
  logged = [r.exc_info[1] for r in caplog.records if r.name == "asyncio" and r.exc_info]
  assert logged == [bug]


def _can_mount_tmpfs(where):
  try:
    return (
      subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
        capture_output=True,
        timeout=30,
      ).returncode
      == 0
    )
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_full_disk_is_one_error_line_from_the_cli(synthetic_data_dir, tmp_path):
  """The command on a 3 MB tmpfs: step 1 (about 2.1 MB) fits, step 2 does
  not, and tensorstore's ValueError(RESOURCE_EXHAUSTED ... [os_error_code=
  '28']) is raised in orbax's threads. The CLI prints one `error:` line
  naming the step and "No space left on device" (and the traceback hint),
  nothing from orbax's threads, and exits 1 with step 1 intact."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if not _can_mount_tmpfs(disk):
    pytest.skip("needs `unshare -rm` and tmpfs mounts (root or user namespaces)")
  workdir, after = disk / "w", tmp_path / "after"
  overrides = {"data.data_dir": synthetic_data_dir, **OVERRIDES}
  main = shlex.join(
    [sys.executable, "-m", "peclr_jax.main", *cli_args("pretrain", workdir, overrides)]
  )
  # The tmpfs lives as long as the namespace: its contents are copied out
  # before the shell ends.
  script = (
    f"mount -t tmpfs -o size=3m tmpfs {shlex.quote(str(disk))} || "
    f"exit 99; {main}; rc=$?; cp -a {shlex.quote(str(workdir))} "
    f"{shlex.quote(str(after))}; exit $rc"
  )
  proc = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  # All of stderr but the progress bar's redraws.
  lines = [
    line
    for line in proc.stderr.replace("\r", "\n").splitlines()
    if line.strip() and not line.startswith("pretrain: ")
  ]
  assert lines == [
    f"error: [Errno 28] writing checkpoint {workdir}/checkpoints/2 failed: "
    "No space left on device; step 1 is intact. Fix the disk (space, "
    "permissions) and re-run the same command to continue from there.",
    "(set PECLR_TRACEBACK=1 for the traceback)",
  ], proc.stderr[-3000:]
  directory = after / "checkpoints"
  assert checkpoints.find_step(after) == (str(directory), 1)
  assert set(os.listdir(directory)) == {"1", "2.orbax-checkpoint-tmp"}
  read_step(str(after), 1)  # every array reads back
