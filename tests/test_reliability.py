"""Faults a long training job meets: kill -9, preemption, several processes,
bad input, a failing disk. Each test states the behaviour RELIABILITY.md
promises and would fail without it.

Real processes are killed here (the command users run, `python -m
peclr_jax.main`); the uninterrupted reference runs in this process, first.
Subprocesses inherit this process's XLA_FLAGS (the suite runs with 4 CPU
devices), so they run the same compiled program, taken from the session's
compilation cache, and parameters must agree bitwise. (A 1-device mesh in a
4-device process was seen to differ from a 1-device process in the last
bits.) The pre-training runs have the length of tests/test_train.py's, so the
suite compiles that program once.
"""

import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from iterator_hooks import HookedIterator
from ml_collections import config_flags

from peclr_jax import main as main_lib
from peclr_jax.inputs import input_pipeline
from peclr_jax.train import checkpoints, finetune, metrics_log, preemption, pretrain, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
CONFIGS = {"pretrain": "peclr.py", "finetune": "finetune_freihand.py"}
# Row fields that differ between two runs of the same computation.
TIMING = ("time", "train_steps_per_sec", "input_wait_ms", "input_wait_fraction")
# Every pre-training run here (and tests/test_train.py's resume test) has
# this many steps: the schedule is compiled into the step, so one length
# means one compilation per session, shared through the compilation cache.
PRETRAIN_STEPS = 4


# ------------------------------------------------------------------ helpers --


def make_config(mode, overrides):
  name = CONFIGS[mode]
  module = config_flags.config_flags._LoadConfigModule(name, os.path.join(REPO, "configs", name))
  config = module.get_config("runlocal")
  config.update_from_flattened_dict(overrides)
  config.lock()
  return config


def cli_args(mode, workdir, overrides):
  return [
    f"--config=configs/{CONFIGS[mode]}:runlocal",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]


def subprocess_env(**extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # Reuse the session's compiled programs; also the small ones (model init),
  # which dominate a subprocess's start-up otherwise.
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.update(extra)
  return env


def launch(args, log_path, *, entry="main", entry_args=(), env=None):
  """Starts `python -m peclr_jax.main args` (entry='main') or the same behind
  one of this module's test entries (`_entry`); output goes to log_path."""
  if entry == "main":
    cmd = [sys.executable, "-m", "peclr_jax.main", *args]
  else:
    code = (
      f"import sys; sys.path.insert(0, {TESTS!r}); "
      "import test_reliability; test_reliability._entry()"
    )
    cmd = [sys.executable, "-c", code, entry, *entry_args, *args]
  log = open(log_path, "w")
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT
  )
  log.close()
  return proc


def finish(proc, log_path, timeout=600):
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  with open(log_path) as f:
    return rc, f.read()


def logged_steps(workdir):
  try:
    return [r["step"] for r in metrics_log.read_metrics(workdir) if "train_loss" in r]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def wait_for_step(workdir, step, procs, timeout=300):
  """Returns once metrics.jsonl has a training row of `step` or later."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if any(s >= step for s in logged_steps(workdir)):
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process ended before step {step}")
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def load_state(workdir):
  """(step, everything in state: model, opt, rng) of the latest finished step,
  read with no template: every array on disk is read back."""
  directory, step = checkpoints.find_step(workdir)
  with ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  ) as mgr:
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def rows(workdir):
  return [
    {k: v for k, v in r.items() if k not in TIMING} for r in metrics_log.read_metrics(workdir)
  ]


def tmp_dirs(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return [d for d in os.listdir(directory) if "orbax-checkpoint-tmp" in d]


def image_hashes(batch):
  return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in batch["image"]]


# ------------------------------------------- entries run in subprocesses --


def _entry():
  """`python -c ... <entry> <entry arg> <main flags>`: main with a fault or a
  probe added (the functions below)."""
  entry, arg = sys.argv.pop(1), sys.argv.pop(1)
  {
    "kill_in_save": _kill_while_saving,
    "sigterm_at": _sigterm_at,
    "sigint_at": _sigint_at,
    "record_batches": _record_batches,
  }[entry](arg)
  from absl import app  # pylint: disable=g-import-not-at-top

  sys.argv[0] = "peclr_jax.main"
  app.run(main_lib.main)


def _kill_while_saving(step):
  """SIGKILLs this process while checkpoint `step` is being saved: its
  temporary directory is complete (even commit_success.txt is in it) but not
  yet renamed into place, the last moment a kill can cut a save."""
  # Private orbax module: if it moves, the process is not killed and the
  # test fails on the exit status rather than passing vacuously.
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    final = self.get_final()
    if final.parent.name == "checkpoints" and final.name == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


# The hooks below act on the n-th batch read from the pipeline as the n-th
# step's: no batches read ahead for the devices (training.fit's prefetch).
AT_THE_NTH_BATCH = {"data.device_prefetch": 0}


def _wrap_iterator(on_batch):
  real = input_pipeline.make_pretrain_iterator
  input_pipeline.make_pretrain_iterator = lambda *a, **k: HookedIterator(real(*a, **k), on_batch)


def _sigterm_at(step):
  """Sends this process SIGTERM while it trains step `step` (the n-th batch
  of this run counts from the restored step)."""

  def on_batch(count, batch):
    start = int(os.environ.get("RESTORED_STEP", "0"))
    if start + count == int(step):
      os.kill(os.getpid(), signal.SIGTERM)

  _wrap_iterator(on_batch)


def _sigint_at(step):
  """Presses Ctrl-C (SIGINT to this process) while it trains step `step`.
  SIGINT gets Python's handler first, as in a terminal: a test runner started
  in the background may have passed it on ignored."""
  signal.signal(signal.SIGINT, signal.default_int_handler)

  def on_batch(count, batch):
    if count == int(step):
      os.kill(os.getpid(), signal.SIGINT)

  _wrap_iterator(on_batch)


def _record_batches(prefix):
  """Appends each local batch's image hashes to <prefix>.p<process>.jsonl;
  waits $PACE_SECONDS a batch (so that a SIGTERM lands before the end)."""
  pace = float(os.environ.get("PACE_SECONDS", "0"))

  def on_batch(count, batch):
    with open(f"{prefix}.p{jax.process_index()}.jsonl", "a") as f:
      f.write(json.dumps(image_hashes(batch)) + "\n")
    time.sleep(pace)

  _wrap_iterator(on_batch)


# ----------------------------------------------- kill -9 and preemption --


def test_pretrain_killed_then_preempted_resumes_exactly(synthetic_data_dir, tmp_path, capsys):
  """kill -9 while a checkpoint is being saved; the re-run is preempted
  (SIGTERM); the next re-run finishes. Same parameters, bit for bit, and the
  same metrics log as an uninterrupted run."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are set in the main thread only")
  steps = PRETRAIN_STEPS
  rng = random.Random(20261120)
  kill_step = rng.randint(1, steps - 2)  # 1: before any checkpoint exists
  term_step = rng.randint(kill_step + 1, steps - 1)
  overrides = {
    "data.data_dir": synthetic_data_dir,
    "num_train_steps": steps,
    "checkpoint_every_steps": 1,
    "eval_every_steps": -1,
    **AT_THE_NTH_BATCH,
  }
  config = make_config("pretrain", overrides)
  work, straight = tmp_path / "work", tmp_path / "straight"
  # The uninterrupted reference first: it compiles what the others reuse.
  pretrain.train_and_evaluate(config, str(straight))
  args = cli_args("pretrain", work, overrides)

  rc, log = finish(
    launch(args, tmp_path / "a.log", entry="kill_in_save", entry_args=[str(kill_step)]),
    tmp_path / "a.log",
  )
  assert rc == -signal.SIGKILL, log[-3000:]
  # The cut save is a temporary directory that nothing reads; the step
  # before it is complete: every array reads back.
  assert any(d.startswith(f"{kill_step}.") for d in tmp_dirs(work))
  restored = kill_step - 1
  if restored:
    assert load_state(work)[0] == restored
    assert checkpoints.read_meta(work)["kind"] == "pretrain"
  else:
    with pytest.raises(checkpoints.CheckpointError, match="no finished"):
      checkpoints.find_step(work)
  # Saves are asynchronous: the next step may have run (and been logged)
  # before the kill.
  assert logged_steps(work)[:kill_step] == list(range(1, kill_step + 1))

  # Re-run the same command: it continues, and stops cleanly on SIGTERM.
  rc, log = finish(
    launch(
      args,
      tmp_path / "b.log",
      entry="sigterm_at",
      entry_args=[str(term_step)],
      env=subprocess_env(RESTORED_STEP=str(restored)),
    ),
    tmp_path / "b.log",
  )
  assert rc == 0, log[-3000:]
  assert (f"Resumed from {work}/checkpoints/{restored}." in log) == bool(restored)
  assert (
    f"Preempted at step {term_step}: checkpoint saved in "
    f"{work}/checkpoints; re-run the same command to continue."
  ) in log
  assert not tmp_dirs(work)  # the cut save's directory, removed on start
  assert load_state(work)[0] == term_step
  assert logged_steps(work) == list(range(1, term_step + 1))

  # Re-run again (in-process: the same code as the command, one interpreter
  # start less), with a SIGTERM handler of the caller's that fit must put
  # back when it ends.
  def callers_handler(*args):
    del args

  previous = signal.signal(signal.SIGTERM, callers_handler)
  try:
    capsys.readouterr()
    pretrain.train_and_evaluate(config, str(work))
    assert signal.getsignal(signal.SIGTERM) is callers_handler
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert f"Resumed from {work}/checkpoints/{term_step}." in (capsys.readouterr().out)
  (step_a, state_a), (step_b, state_b) = load_state(work), load_state(straight)
  assert step_a == step_b == steps
  assert_trees_equal(state_a, state_b)
  # The redone steps are logged once: the log reads as one run.
  assert logged_steps(work) == list(range(1, steps + 1))
  assert rows(work) == rows(straight)


def test_finetune_killed_at_random_step_resumes_exactly(synthetic_data_dir, tmp_path, capsys):
  rng = random.Random(7)
  steps = 6
  # From step 3 on, a finished checkpoint exists whatever the timing: the
  # save of step k - 2 completed before the save of k - 1 started.
  kill_after, delay = rng.randint(3, 4), rng.uniform(0.0, 0.3)
  overrides = {
    "data.data_dir": synthetic_data_dir,
    "num_train_steps": steps,
    "checkpoint_every_steps": 1,
    "eval_every_steps": 3,
    **AT_THE_NTH_BATCH,
  }
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  config = make_config("finetune", overrides)
  finetune.train_and_evaluate(config, str(straight))
  proc = launch(cli_args("finetune", killed, overrides), tmp_path / "a.log")
  wait_for_step(killed, kill_after, [proc])
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  rc, log = finish(proc, tmp_path / "a.log")
  assert rc == -signal.SIGKILL, log[-3000:]
  # Wherever the kill landed, the latest finished step reads back whole.
  step, _ = load_state(killed)
  assert kill_after - 2 <= step < steps, (step, kill_after)

  # Re-run (here in-process: the same code as the command, without a
  # second interpreter start; the pre-training test re-runs the command).
  capsys.readouterr()
  finetune.train_and_evaluate(config, str(killed))
  assert f"Resumed from {killed}/checkpoints/{step}." in capsys.readouterr().out
  (step_a, state_a), (step_b, state_b) = load_state(killed), load_state(straight)
  assert step_a == step_b == steps
  assert_trees_equal(state_a, state_b)
  assert rows(killed) == rows(straight)
  # The best checkpoint (chosen on evaluation) is the same one, and
  # best.json names it.
  best = [os.path.join(w, "best") for w in (killed, straight)]
  (_, best_a), (_, best_b) = load_state(best[0]), load_state(best[1])
  assert_trees_equal(best_a, best_b)
  with (
    open(os.path.join(best[0], "best.json")) as fa,
    open(os.path.join(best[1], "best.json")) as fb,
  ):
    assert json.load(fa) == json.load(fb)


def test_ctrl_c_saves_and_exits_like_preemption(synthetic_data_dir, tmp_path, capsys):
  """A first Ctrl-C stops after the current step with a checkpoint of it and
  exits 0 with a message, as SIGTERM does; re-running continues. (It used to
  raise KeyboardInterrupt mid-step and lose the steps since the last
  checkpoint.)"""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are set in the main thread only")
  steps, stop = PRETRAIN_STEPS, 2
  # A checkpoint at the last step only: the one at `stop` is the Ctrl-C's.
  overrides = {
    "data.data_dir": synthetic_data_dir,
    "num_train_steps": steps,
    "checkpoint_every_steps": steps,
    "eval_every_steps": -1,
    **AT_THE_NTH_BATCH,
  }
  work = tmp_path / "work"
  rc, log = finish(
    launch(
      cli_args("pretrain", work, overrides),
      tmp_path / "a.log",
      entry="sigint_at",
      entry_args=[str(stop)],
    ),
    tmp_path / "a.log",
  )
  assert rc == 0, log[-3000:]
  assert "Ctrl-C: stopping after this step with a checkpoint" in log
  assert (
    f"Interrupted (Ctrl-C) at step {stop}: checkpoint saved in "
    f"{work}/checkpoints; re-run the same command to continue."
  ) in log
  assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
  assert load_state(work)[0] == stop
  assert logged_steps(work) == list(range(1, stop + 1))
  assert not os.path.exists(work / ".lock")  # released on the way out

  # Re-run (in-process through main.run: the command's code, its workdir lock
  # taken again by fit); the caller's SIGINT handler is put back.
  previous = signal.getsignal(signal.SIGINT)
  capsys.readouterr()
  main_lib.run(make_config("pretrain", overrides), str(work))
  assert signal.getsignal(signal.SIGINT) is previous
  assert f"Resumed from {work}/checkpoints/{stop}." in capsys.readouterr().out
  assert load_state(work)[0] == steps
  assert logged_steps(work) == list(range(1, steps + 1))
  assert not os.path.exists(work / ".lock")


def test_second_ctrl_c_aborts_at_once():
  """The first Ctrl-C only asks fit to stop after the step; the second goes
  to the handler that was there before (Python's: KeyboardInterrupt)."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are set in the main thread only")
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    watch = preemption.PreemptionWatch()
    with watch:
      try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(500):  # the handler runs between bytecodes
          if watch.signalled:
            break
          time.sleep(0.01)
      except KeyboardInterrupt:
        pytest.fail("the first Ctrl-C raised KeyboardInterrupt")
      assert watch.reached(1)
      assert watch.cause == "Interrupted (Ctrl-C)"
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(500):
          time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is not watch._handler  # pylint: disable=protected-access
  finally:
    signal.signal(signal.SIGINT, previous)


def test_main_exit_status_and_message(monkeypatch, capsys):
  """Preemption is a success (exit 0, the message); a failed checkpoint write
  or a foreign checkpoint is one 'error:' line (exit 1)."""
  monkeypatch.setattr(main_lib, "FLAGS", type("F", (), {"config": None, "workdir": "w"}))
  monkeypatch.delenv("PECLR_TRACEBACK", raising=False)
  cases = [
    (
      preemption.Preempted(7, "/w/checkpoints"),
      0,
      "Preempted at step 7: checkpoint saved in /w/checkpoints; re-run the "
      "same command to continue.",
      "out",
    ),
    (
      checkpoints.CheckpointWriteError(
        errno.ENOSPC,
        "writing checkpoint /w/checkpoints/3 failed: No space left on device; step 2 is intact.",
      ),
      1,
      "error: [Errno 28] writing checkpoint /w/checkpoints/3 failed",
      "err",
    ),
    (
      checkpoints.CheckpointError("/w holds a checkpoint with kind="),
      1,
      "error: /w holds a checkpoint with kind=",
      "err",
    ),
  ]
  for exc, code, message, stream in cases:

    def fail(config, workdir, exc=exc):
      raise exc

    monkeypatch.setattr(main_lib, "run", fail)
    with pytest.raises(SystemExit) as info:
      main_lib.main(["main"])
    assert info.value.code == code
    out = capsys.readouterr()
    assert message in (out.out if stream == "out" else out.err)


# ------------------------------------------------------- two processes --


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_two_devices(
  synthetic_data_dir, tmp_path, monkeypatch
):
  """2 processes x 1 CPU device == 1 process x 2 devices: same global batch,
  mesh and math. Also: each process reads its own half of every batch, a
  SIGTERM to one process stops both after the same step with one complete
  checkpoint, and both resume from it."""
  if jax.device_count() < 2:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count>=2")
  steps = 6  # its own program anyway (two devices)
  overrides = {
    "data.data_dir": synthetic_data_dir,
    "num_train_steps": steps,
    "checkpoint_every_steps": 1,
    "eval_every_steps": -1,
    **AT_THE_NTH_BATCH,
  }
  workdir = tmp_path / "two"
  prefix = str(tmp_path / "batches")

  def run_pair(tag, sigterm_after=None):
    port = free_port()
    procs = []
    for i in range(2):
      # Explicit settings only (no cluster to detect); CPU collectives are
      # gloo by default in JAX 0.10.
      env = subprocess_env(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PACE_SECONDS="0.3" if sigterm_after else "0",
      )
      procs.append(
        launch(
          cli_args("pretrain", workdir, overrides),
          tmp_path / f"{tag}{i}.log",
          entry="record_batches",
          entry_args=[prefix],
          env=env,
        )
      )
    if sigterm_after is not None:
      wait_for_step(workdir, sigterm_after, procs)
      procs[1].send_signal(signal.SIGTERM)  # one process only
    return [finish(p, tmp_path / f"{tag}{i}.log") for i, p in enumerate(procs)]

  first = run_pair("a", sigterm_after=1)
  for rc, log in first:
    assert rc == 0, log[-3000:]
  stopped = [int(log.split("Preempted at step ")[1].split(":")[0]) for _, log in first]
  assert stopped[0] == stopped[1] < steps, stopped
  stop = stopped[0]
  # One complete checkpoint: arrays written by process 0 only, each
  # process's data-iterator position next to them.
  step_dir = workdir / "checkpoints" / str(stop)
  assert sorted(os.listdir(step_dir / "data_iter")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  assert not (step_dir / "state" / "ocdbt.process_1").exists()
  assert not tmp_dirs(workdir)

  second = run_pair("b")
  for rc, log in second:
    assert rc == 0, log[-3000:]
    assert f"Resumed from {workdir}/checkpoints/{stop}." in log

  local = []
  for i in range(2):
    with open(f"{prefix}.p{i}.jsonl") as f:
      local.append([json.loads(line) for line in f])
  assert len(local[0]) == len(local[1]) == steps
  two_process_batches = [local[0][t] + local[1][t] for t in range(steps)]

  # The reference: one process, two of this process's devices. It must read
  # the same global batches in the same order as the two processes together
  # (then every image also gets the same view), each process a disjoint half.
  single_process_batches = []

  def as_two_processes(count, batch):
    hashes = image_hashes(batch)
    single_process_batches.append(hashes)
    assert not set(local[0][count - 1]) & set(local[1][count - 1]), (
      f"step {count}: the processes' shards overlap"
    )
    assert hashes == two_process_batches[count - 1], (
      f"step {count}: the processes together read other examples, or in "
      "another order, than one process does"
    )

  real_mesh, real_iter = sharding.make_mesh, input_pipeline.make_pretrain_iterator
  monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: real_mesh(jax.devices()[:2]))
  monkeypatch.setattr(
    input_pipeline,
    "make_pretrain_iterator",
    lambda *a, **k: HookedIterator(real_iter(*a, **k), as_two_processes),
  )
  reference = str(tmp_path / "one")
  pretrain.train_and_evaluate(make_config("pretrain", overrides), reference)

  loss = lambda w: [r["train_loss"] for r in metrics_log.read_metrics(w)]
  assert logged_steps(workdir) == list(range(1, steps + 1))
  np.testing.assert_allclose(loss(workdir), loss(reference), rtol=1e-5, atol=1e-5)
  # Parameters only roughly: Adam's g / (|g| + eps) turns the float noise of
  # a different reduction order in tiny gradients into ~1e-4 differences.
  _, state_two = load_state(workdir)
  _, state_one = load_state(reference)
  for a, b in zip(jax.tree.leaves(state_two), jax.tree.leaves(state_one)):
    np.testing.assert_allclose(a, b, atol=1e-3)

  assert single_process_batches == two_process_batches


# ----------------------------------------------------------- bad input --


def test_cli_bad_config_is_one_line_error(synthetic_data_dir, tmp_path):
  # A value of the wrong type fails in absl's flag parsing, an unknown mode
  # in main; both before anything is written.
  cases = {
    "--config.batch_size=abc": "flag --config.batch_size=abc: invalid literal for int()",
    "--config.mode=train": "error: config.mode='train', but it must be one of",
  }
  procs = {}
  for i, flag in enumerate(cases):
    args = cli_args("pretrain", tmp_path / "w", {"data.data_dir": synthetic_data_dir}) + [flag]
    procs[flag] = (launch(args, tmp_path / f"{i}.log"), tmp_path / f"{i}.log")
  for flag, (proc, log_path) in procs.items():
    rc, log = finish(proc, log_path)
    assert rc == 1, (flag, log[-2000:])
    assert cases[flag] in log, (flag, log[-2000:])
    assert "Traceback" not in log, (flag, log[-2000:])
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize(
  "key, value, message",
  [
    (
      "model.backbone",
      "resnet51",
      "config.model.backbone='resnet51', but it must be one of 'resnet18'",
    ),
    ("loss.kind", "simclrr", "config.loss.kind='simclrr', but it must be one of 'peclr', 'simclr'"),
    ("batch_size", 3, "config.batch_size=3, but it must be an integer >= 1 divisible by the"),
  ],
)
def test_bad_config_value_is_a_value_error(
  synthetic_data_dir, tmp_path, monkeypatch, key, value, message
):
  """ValueErrors (main prints them as one 'error:' line, exit 1: see
  test_main_exit_status_and_message), raised before anything is written."""
  real = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: real(jax.devices()[:2]))
  if jax.device_count() < 2 and key == "batch_size":
    pytest.skip("needs 2 devices")
  config = make_config("pretrain", {"data.data_dir": synthetic_data_dir, key: value})
  with pytest.raises(ValueError) as info:
    main_lib.run(config, str(tmp_path / "w"))
  assert message in str(info.value)
  assert not os.path.exists(tmp_path / "w")  # checked before it is made


def test_cli_nonpositive_counts_are_one_line_error(synthetic_data_dir, tmp_path):
  """keep_checkpoints=0 used to train, exit 0 and leave no checkpoint; the
  other counts divided by zero or misbehaved later. Each bad field is named
  with its value and what is allowed, in one `error:` line, before the
  workdir is created; in the demo's nested configs too."""

  def pretrain_args(name, **bad):
    return cli_args("pretrain", tmp_path / name, {"data.data_dir": synthetic_data_dir, **bad})

  cases = {
    "keep": (
      pretrain_args("keep", keep_checkpoints=0),
      ["config.keep_checkpoints=0, but it must be an integer >= 1"],
    ),
    "all": (
      pretrain_args(
        "all", checkpoint_every_steps=0, log_every_steps=-1, batch_size=0, grad_accum_steps=0
      ),
      [
        "config.checkpoint_every_steps=0, but it must be an integer >= 1",
        "config.log_every_steps=-1, but it must be",
        "config.batch_size=0, but it must be",
        "config.grad_accum_steps=0, but it must be",
      ],
    ),
    "demo": (
      [
        "--config=configs/demo.py",
        f"--workdir={tmp_path / 'demo'}",
        "--config.finetune.keep_checkpoints=0",
      ],
      ["config.finetune.keep_checkpoints=0, but it must be an integer >= 1"],
    ),
  }
  procs = {name: launch(args, tmp_path / f"{name}.log") for name, (args, _) in cases.items()}
  for name, (_, messages) in cases.items():
    rc, log = finish(procs[name], tmp_path / f"{name}.log")
    assert rc == 1, (name, log[-2000:])
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, (name, log[-2000:])
    for message in messages:
      assert message in errors[0], (name, message, errors[0])
    assert "Traceback" not in log, (name, log[-2000:])
    assert not os.path.exists(tmp_path / name)  # no checkpoint, nothing


def test_finetune_refuses_pretrain_workdir_and_keeps_it(synthetic_data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  pretrain.train_and_evaluate(
    make_config(
      "pretrain",
      {
        "data.data_dir": synthetic_data_dir,
        "num_train_steps": PRETRAIN_STEPS,
        "eval_every_steps": -1,
      },
    ),
    workdir,
  )
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    metrics_before = f.read()
  _, state_before = load_state(workdir)

  config = make_config(
    "finetune", {"data.data_dir": synthetic_data_dir, "model.backbone": "resnet_tiny"}
  )
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"kind='pretrain', but this run needs "
    r"kind='finetune'",
  ):
    finetune.train_and_evaluate(config, workdir)
  # Nothing already written is lost or changed.
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    assert f.read() == metrics_before
  assert checkpoints.read_meta(workdir)["kind"] == "pretrain"
  assert_trees_equal(load_state(workdir)[1], state_before)
  assert not os.path.exists(os.path.join(workdir, "best"))


# Orbax's background thread reports the failure to an event loop it has
# already closed; the error itself reaches fit (asserted below).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failing_disk_keeps_previous_checkpoint(synthetic_data_dir, tmp_path, monkeypatch):
  """The disk fills up in the middle of writing step 2's arrays (after the
  first array): a clear error naming the step, step 1 intact, and the same
  command continues once there is space. The write fails as tensorstore
  fails on a full disk (seen on a 3 MB tmpfs): not an OSError but a
  ValueError carrying the OS error code. (The CLI on a real full disk:
  test_checkpoint_integrity.py.)"""
  from orbax.checkpoint._src.serialization import type_handlers  # pylint: disable=g-import-not-at-top

  original = type_handlers.NumpyHandler._open_and_write
  written = []

  async def full_disk(self, value, tspec, ts_context):
    if "/2.orbax-checkpoint-tmp" in json.dumps(tspec):
      if written:
        raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "model.w/0" in OCDBT database '
          f'at local file "{tspec}": Failed to write 432688 bytes to file '
          "6: No space left on device [os_error_code='28']"
        )
      written.append(tspec)
    return await original(self, value, tspec, ts_context)

  config = make_config(
    "pretrain",
    {
      "data.data_dir": synthetic_data_dir,
      "num_train_steps": PRETRAIN_STEPS,
      "checkpoint_every_steps": 1,
      "eval_every_steps": -1,
    },
  )
  workdir = str(tmp_path / "w")
  with monkeypatch.context() as m:
    m.setattr(type_handlers.NumpyHandler, "_open_and_write", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
      pretrain.train_and_evaluate(config, workdir)
  assert written, "the failure was not injected mid-save"
  message = str(info.value)
  assert info.value.errno == errno.ENOSPC
  assert (
    f"writing checkpoint {workdir}/checkpoints/2 failed: No space left "
    "on device; step 1 is intact" in message
  ), message
  assert load_state(workdir)[0] == 1  # every array of step 1 reads back

  pretrain.train_and_evaluate(config, workdir)
  assert load_state(workdir)[0] == PRETRAIN_STEPS
  assert logged_steps(workdir) == list(range(1, PRETRAIN_STEPS + 1))


def test_convert_cli_rejects_pth_of_other_architecture(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from peclr_jax import convert  # pylint: disable=g-import-not-at-top

  # A ResNet-18 state dict (views of one buffer: a small file).
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, c):
    shapes.update(
      {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    )

  bn("bn1", 64)
  cin = 64
  for layer, width in enumerate((64, 128, 256, 512), 1):
    for block in range(2):
      p = f"layer{layer}.{block}"
      shapes[f"{p}.conv1.weight"] = (width, cin if block == 0 else width, 3, 3)
      shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
      bn(f"{p}.bn1", width)
      bn(f"{p}.bn2", width)
      if block == 0 and cin != width:
        shapes[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
        bn(f"{p}.downsample.1", width)
    cin = width
  pool = torch.zeros(max(int(np.prod(s)) for s in shapes.values()))
  torch.save(
    {"state_dict": {k: pool[: int(np.prod(s))].view(s) for k, s in shapes.items()}},
    tmp_path / "rn18.pth",
  )
  torch.save({"encoder.0.weight": torch.zeros(4, 3)}, tmp_path / "mlp.pth")

  cases = [
    ("rn18.pth", ["--arch", "resnet50"], "the keys look like resnet18, not resnet50"),
    ("mlp.pth", [], "found no torchvision ResNet in the state dict"),
  ]
  for name, extra, message in cases:
    out = tmp_path / f"out_{name}"
    assert convert.main(["--torch", str(tmp_path / name), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err[:2000]
    assert not os.path.exists(out / "checkpoints" / "0")


# ------------------------------------------------- one run per workdir --


def tree_snapshot(root):
  """Every path under root with its mtime (and a file's content hash)."""
  snap = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      stat = os.stat(path)
      digest = None
      if name in filenames:
        with open(path, "rb") as f:
          digest = hashlib.sha1(f.read()).hexdigest()
      snap[os.path.relpath(path, root)] = (stat.st_mtime_ns, digest)
  snap["."] = (os.stat(root).st_mtime_ns, None)
  return snap


def test_second_run_on_a_workdir_is_refused(synthetic_data_dir, tmp_path):
  """While a process holds a workdir (its lock), `main` and `convert` on it
  are refused at once with one `error:` line naming the holder, and leave
  everything as it was: the live run's in-progress save (which orbax would
  delete at start-up) and its metrics log (which a new run would truncate).
  A holder killed with -9 leaves no stale lock."""
  work = tmp_path / "work"
  in_progress = work / "checkpoints" / "3.orbax-checkpoint-tmp-1764000000"
  (in_progress / "state").mkdir(parents=True)
  (in_progress / "state" / "part").write_bytes(b"being written")
  (work / "metrics.jsonl").write_text(
    "".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (1, 2, 3))
  )
  code = (
    "import sys, time; from peclr_jax.train import checkpoints; "
    "lock = checkpoints.lock_workdir(sys.argv[1]); lock.__enter__(); "
    "print('held', flush=True); time.sleep(600)"
  )
  holder = subprocess.Popen(
    [sys.executable, "-c", code, str(work)], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE
  )
  try:
    assert holder.stdout.readline() == b"held\n"
    names_holder = f"pid {holder.pid} on host {socket.gethostname()}"
    before = tree_snapshot(work)
    with pytest.raises(checkpoints.WorkdirBusyError, match=re.escape(names_holder)):
      with checkpoints.lock_workdir(work):
        pass
    procs = {
      "main": launch(
        cli_args("pretrain", work, {"data.data_dir": synthetic_data_dir}), tmp_path / "main.log"
      )
    }
    with open(tmp_path / "convert.log", "w") as log:
      procs["convert"] = subprocess.Popen(
        [
          sys.executable,
          "-m",
          "peclr_jax.convert",
          "--torch",
          str(tmp_path / "weights.pth"),
          "--out",
          str(work),
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    for name, status in (("main", 1), ("convert", 2)):
      rc, log = finish(procs[name], tmp_path / f"{name}.log")
      assert rc == status, (name, log[-2000:])
      errors = [line for line in log.splitlines() if line.startswith("error:")]
      assert (
        len(errors) == 1
        and f"{work} is in use by another run" in (errors[0])
        and names_holder in errors[0]
      ), (name, log[-2000:])
      assert "Traceback" not in log, (name, log[-2000:])
    assert tree_snapshot(work) == before
  finally:
    holder.kill()
    holder.wait()
  # Killed holding it: the kernel dropped the lock; the file stays, naming
  # the dead holder, until the next holder rewrites it.
  with checkpoints.lock_workdir(work):
    with open(work / ".lock") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(work / ".lock")
  assert in_progress.exists()


# ------------------------------------------------------------- metrics --


def test_metrics_log_truncated_on_resume_and_torn_line_tolerated(tmp_path):
  path = tmp_path / "metrics.jsonl"
  good = [{"step": s, "train_loss": float(s)} for s in (1, 2, 2, 3)]
  text = "".join(json.dumps(r) + "\n" for r in good)
  path.write_text(text + '{"step": 4, "train_lo')  # killed mid-write
  assert metrics_log.read_metrics(tmp_path) == good
  metrics_log.truncate_metrics(str(path), 2)
  assert metrics_log.read_metrics(tmp_path) == good[:3]
  path.write_text('{"step": 1\n' + text)  # not the last line: an error
  with pytest.raises(json.JSONDecodeError):
    metrics_log.read_metrics(tmp_path)


# ------------------------------------------------- config change on resume --


def test_keys_added_later_resume_old_checkpoints_at_their_old_behaviour():
  """A run written before `freeze_backbone` (or any key added later) existed
  resumes with it False (what it did then) and is refused with it True."""
  from peclr_jax import defaults  # pylint: disable=g-import-not-at-top
  from peclr_jax.train import resume_checks  # pylint: disable=g-import-not-at-top

  config = defaults.finetune_config()
  stored = json.loads(config.to_json_best_effort())
  for key in resume_checks.ADDED_KEYS:
    *parents, last = key.split(".")
    node = stored
    for part in parents:
      node = node[part]
    del node[last]
  assert resume_checks.check_config_change(stored, config, "old run") == []
  config.freeze_backbone = True
  with pytest.raises(ValueError, match=r"freeze_backbone: False -> True"):
    resume_checks.check_config_change(stored, config, "old run")


def test_inversion_settings_are_inert_for_simclr_only():
  """SimCLR never reads the latent inversion's keys, so changing them resumes
  a SimCLR run (a sweep over PeCLR's inversions reuses its SimCLR
  pre-training) and still refuses a PeCLR one, or a switch between the two."""
  from peclr_jax import defaults  # pylint: disable=g-import-not-at-top
  from peclr_jax.train import resume_checks  # pylint: disable=g-import-not-at-top

  for kind in ("simclr", "peclr"):
    config = defaults.pretrain_config()
    config.loss.kind = kind
    stored = json.loads(config.to_json_best_effort())
    config.loss.invert = ("translate", "rotate")
    config.loss.translation_mode = "exact"
    if kind == "simclr":
      assert resume_checks.check_config_change(stored, config, "old run") == []
    else:
      with pytest.raises(ValueError, match=r"loss.invert: .*loss.translation_mode: "):
        resume_checks.check_config_change(stored, config, "old run")
  config.loss.kind = "simclr"  # stored: peclr
  with pytest.raises(ValueError, match=r"loss.invert: .*loss.kind: 'peclr' -> 'simclr'"):
    resume_checks.check_config_change(stored, config, "old run")


def test_resume_with_changed_config_is_refused_unless_safe(synthetic_data_dir, tmp_path):
  """A re-run on a workdir with a config that changes the result (seed,
  learning rate) used to resume silently and report the new values over the
  old numbers. Now: one `error:` line naming every changed key with its old
  and new value, exit 1, the workdir untouched. Changing only the logging
  cadence and the run's length resumes and names the changed keys;
  PECLR_ALLOW_CONFIG_CHANGE=1 lets a refused change continue."""
  work = tmp_path / "w"
  base = {
    "data.data_dir": synthetic_data_dir,
    "num_train_steps": PRETRAIN_STEPS,
    "eval_every_steps": -1,
  }

  def run(name, overrides, **env):
    proc = launch(
      cli_args("pretrain", work, {**base, **overrides}),
      tmp_path / f"{name}.log",
      env=subprocess_env(**env),
    )
    return finish(proc, tmp_path / f"{name}.log")

  rc, log = run("first", {})
  assert rc == 0, log[-2000:]

  def snapshot():
    snap = tree_snapshot(work)
    del snap["."]  # the lock file comes and goes
    return snap

  before = snapshot()
  rc, log = run("refused", {"seed": 7, "optim.base_lr": 0.5})
  assert rc == 1, log[-2000:]
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, log[-2000:]
  assert re.search(r"seed: \d+ -> 7", errors[0]), errors[0]
  assert re.search(r"optim\.base_lr: [0-9.e-]+ -> 0\.5", errors[0]), errors[0]
  assert "PECLR_ALLOW_CONFIG_CHANGE=1" in errors[0], errors[0]
  assert "Traceback" not in log, log[-2000:]
  assert snapshot() == before

  steps = PRETRAIN_STEPS + 2
  rc, log = run("safe", {"log_every_steps": 2, "num_train_steps": steps})
  assert rc == 0, log[-2000:]
  (line,) = [row for row in log.splitlines() if "changed keys" in row]
  assert "log_every_steps: " in line and (
    f"num_train_steps: {PRETRAIN_STEPS} -> {steps}" in line
  ), line
  assert "error" not in log, log[-2000:]
  assert logged_steps(work)[-1] == steps
  assert load_state(work)[0] == steps

  rc, log = run(
    "allowed",
    {"log_every_steps": 2, "num_train_steps": steps, "seed": 7},
    PECLR_ALLOW_CONFIG_CHANGE="1",
  )
  assert rc == 0, log[-2000:]
  assert re.search(r"changed config .*seed: \d+ -> 7", log), log[-2000:]
  assert "error:" not in log, log[-2000:]
