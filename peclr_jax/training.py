"""What pre-training and fine-tuning share: the mesh, the optimiser, logging.

Data parallelism is `jax.jit` over a one-axis mesh named 'data': the train
state is replicated and the batch is sharded along its first axis. XLA then
inserts the gradient all-reduce and computes BatchNorm statistics and the
NT-Xent similarity matrix over the *global* batch, with no collective written
by hand. This is what `jax.pmap` now lowers to (pmap is in maintenance mode
and implemented on jit + shard_map), and the same code runs on one CPU, a
multi-GPU host or a multi-host TPU pod after `jax.distributed.initialize()`.
"""

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from peclr_jax import checkpoints
from peclr_jax import device_prefetch
from peclr_jax import config_checks

DATA_AXIS = "data"


# ---------------------------------------------------------------- sharding --

def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis mesh over all (or the given) devices.

  The axis is `Auto` (XLA propagates shardings), not JAX 0.10's default
  `Explicit`: the model and augmentation code stays free of sharding
  annotations, and only the batch's input sharding is stated.
  """
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
  """Puts identical host (or single-device) values on every device of mesh.

  With several processes, `device_put` refuses a sharding that spans other
  processes' devices; each process then builds the global array from its
  own copy (all copies are equal: same seed, or the same checkpoint).
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = put(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


def shard_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles this process's part of the batch into global sharded arrays."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def check_batch_divisible(global_batch: int, mesh, name: str = "batch_size"):
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
        f"config.{name}={global_batch} must be divisible by the {n} devices "
        f"and {jax.process_count()} processes it is split across.")


# --------------------------------------------------------------- optimiser --

def decay_mask(params):
  """Weight decay and trust ratio apply to kernels only: not to biases or
  BatchNorm scales/offsets, which are the only 1-D parameters here."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def learning_rate(optim: ml_collections.ConfigDict, effective_batch: int):
  if optim.scale_lr_by_sqrt_batch:
    return optim.base_lr * math.sqrt(effective_batch)
  return optim.base_lr


def make_optimizer(optim: ml_collections.ConfigDict, *, effective_batch: int,
                   total_updates: int, warmup_updates: int,
                   grad_accum_steps: int) -> optax.GradientTransformation:
  """Adam, optionally with a LARS trust ratio, warm-up then cosine to 0.

  The public code wraps Adam in a LARS wrapper that rescales each layer's
  (weight-decayed) gradient by its trust ratio before Adam sees it; the chain
  below does the same in that order.
  """
  peak = learning_rate(optim, effective_batch)
  total_updates = max(total_updates, 1)
  warmup_updates = int(min(max(warmup_updates, 0), total_updates - 1))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_updates,
      decay_steps=total_updates, end_value=0.0)
  parts = [optax.add_decayed_weights(optim.weight_decay, mask=decay_mask)]
  if optim.lars:
    parts.append(optax.masked(optax.scale_by_trust_ratio(
        trust_coefficient=optim.trust_coefficient), decay_mask))
  parts += [optax.scale_by_adam(), optax.scale_by_learning_rate(schedule)]
  tx = optax.chain(*parts)
  if grad_accum_steps > 1:
    # Accumulates gradients over micro-batches; one update every k steps.
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
  return tx


def schedule_lengths(config, num_examples: int) -> tuple[int, int, int]:
  """(train steps, optimiser updates, warm-up updates) from the config."""
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  if config.num_train_steps > 0:
    steps = config.num_train_steps
  else:
    steps = max(int(config.num_epochs * steps_per_epoch), 1)
  accum = max(config.grad_accum_steps, 1)
  updates = max(steps // accum, 1)
  warmup = int(config.optim.warmup_epochs * steps_per_epoch / accum)
  return steps, updates, warmup


def optimizer_for(config, num_examples: int):
  """(tx, train steps, optimiser updates) of a run over `num_examples`."""
  steps, updates, warmup = schedule_lengths(config, num_examples)
  tx = make_optimizer(
      config.optim,
      effective_batch=config.batch_size * max(config.grad_accum_steps, 1),
      total_updates=updates, warmup_updates=warmup,
      grad_accum_steps=config.grad_accum_steps)
  return tx, steps, updates


# ----------------------------------------------------------------- logging --

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

  def __init__(self, workdir: str, enabled: bool | None = None,
               resume_step: int | None = None):
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
          purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(),
                                  **scalars}) + "\n")
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


class NonFiniteLossError(FloatingPointError):
  pass


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
        "the same command to continue.")
    self.step = step
    self.directory = directory
    self.cause = cause


class _PreemptionWatch:
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
    if (not self._distributed
        and threading.current_thread() is threading.main_thread()):
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM,
                                                     self._handler)
      if callable(signal.getsignal(signal.SIGINT)):
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT,
                                                      self._handler)
    return self

  def _handler(self, signum, frame):
    if signum == signal.SIGINT:
      if self._signalled:  # the second Ctrl-C: abort now
        return self._previous[signal.SIGINT](signum, frame)
      self.cause = self.INTERRUPTED
      # os.write: print() from a handler can hit stderr mid-write (the
      # progress bar) and fail with a reentrant-call error.
      os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; "
               b"press Ctrl-C again to stop at once without one.\n")
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


def check_finite(step: int, metrics: Mapping[str, float], name="train_loss"):
  value = float(metrics[name])
  if not math.isfinite(value):
    raise NonFiniteLossError(
        f"{name} is {value} at step {step}; stopping. Lower the learning rate "
        "(config.optim.base_lr) or use float32 (config.model.dtype).")


def compute_dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
            "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(
        f"config.model.dtype={name!r}; expected float32, bfloat16 or float16"
    ) from None


# -------------------------------------------------------------------- loop --

def make_train_step(graphdef, loss_fn):
  """The jitted step `(state, batch, rng, step) -> (state, metrics)`.

  `state` is `nnx.state((model, optimizer))` and is donated. The step's
  randomness is `fold_in(rng, step)`, so a resumed run draws the same views.
  """

  def train_step(state, batch, rng, step):
    model, optimizer = nnx.merge(graphdef, state)
    key = jax.random.fold_in(rng, step)
    grad_fn = nnx.value_and_grad(
        lambda m: loss_fn(m, batch, key), has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, donate_argnums=0)


def _pure(tree):
  return nnx.to_pure_dict(tree)


# Config keys (of the config `fit` gets) that may change when a run resumes:
# they change when things are logged, saved or evaluated, how many workers
# read the data or whether from pre-cropped stores (the same batches and
# iterator state), how many batches go to the devices ahead, or how long the
# run is. A longer or shorter run recomputes
# the learning-rate schedule for the new length (from the restored step on),
# as the issue asks ("the number of steps"); everything else changes the
# result and is refused unless ALLOW_CONFIG_CHANGE_ENV is set to 1.
RESUME_SAFE_KEYS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_every_steps", "eval_batches", "num_train_steps", "num_epochs",
    "data.num_workers", "data.precropped", "data.device_prefetch"})
ALLOW_CONFIG_CHANGE_ENV = "PECLR_ALLOW_CONFIG_CHANGE"


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def check_config_change(stored: dict | None, config, where: str) -> list[str]:
  """Compares the config stored in a checkpoint with this run's.

  Both are compared as JSON (tuples and lists are equal) with dotted keys.
  Returns the changed keys that are safe on resume (`RESUME_SAFE_KEYS`) as
  "key: old -> new" strings, and prints them in one line. Raises ValueError
  listing every other changed key with its old and new value, unless the
  environment variable PECLR_ALLOW_CONFIG_CHANGE=1 (then they are printed and
  the run continues). `stored` None (no checkpoint, or one without a config)
  is no change.
  """
  if stored is None:
    return []
  new = json.loads(config.to_json_best_effort())
  old, new = _flatten(stored), _flatten(new)
  missing = "<absent>"
  changed = sorted(k for k in set(old) | set(new)
                   if old.get(k, missing) != new.get(k, missing))
  describe = lambda k: f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
  safe = [describe(k) for k in changed if k in RESUME_SAFE_KEYS]
  unsafe = [describe(k) for k in changed if k not in RESUME_SAFE_KEYS]
  allowed = os.environ.get(ALLOW_CONFIG_CHANGE_ENV) == "1"
  if unsafe and not allowed:
    raise ValueError(
        f"the config differs from the one {where} was trained with, in keys "
        f"that change the result: {'; '.join(unsafe)}. Use another --workdir, "
        f"or re-run with the old values, or set {ALLOW_CONFIG_CHANGE_ENV}=1 to "
        "continue with the new ones anyway.")
  if unsafe:
    print(f"Resuming {where} with a changed config "
          f"({ALLOW_CONFIG_CHANGE_ENV}=1): {'; '.join(unsafe + safe)}",
          flush=True)
  elif safe:
    print(f"Resuming {where} with changed keys (allowed on resume): "
          f"{'; '.join(safe)}", flush=True)
  return safe + unsafe


def fit(config: ml_collections.ConfigDict, workdir: str, *, mesh, model, tx,
        train_iter, loss_fn, num_steps: int, meta: dict, evaluate=None,
        best_metric: tuple[str, str] | None = None, desc: str = "train"):
  """Runs, or resumes, a training loop and returns the trained model.

  Args:
    config: the run's config (seed, batch_size, *_every_steps, keep_checkpoints).
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    mesh: the 'data' mesh; the state is replicated and batches sharded on it.
    model: an NNX module in train mode, freshly initialised.
    tx: the optax transformation.
    train_iter: a checkpointable iterator of host batches (dicts of arrays).
    loss_fn: `loss_fn(model, batch, key) -> (loss, metrics)`; pure, jit-able.
    num_steps: train steps (micro-batches) to reach.
    meta: what the checkpoint holds (checked on resume, e.g. the backbone).
    evaluate: optional `evaluate(model, step) -> metrics` run every
      config.eval_every_steps and at the end, on the host.
    best_metric: (name, 'min'|'max'): keep the best evaluated checkpoint in
      `<workdir>/best` as well.

  Returns:
    (trained model, last logged metrics).

  Raises:
    Preempted: on SIGTERM or a first Ctrl-C, once the checkpoint of the
      current step is saved (a second Ctrl-C: KeyboardInterrupt).
    NonFiniteLossError: on a NaN/inf training loss.
    checkpoints.CheckpointWriteError: a checkpoint could not be written; the
      previous one is left intact.
    checkpoints.WorkdirBusyError: another process is running in `workdir`.
    ValueError: a value of the config is not allowed
      (`config_checks.check_config`), or
      the workdir's checkpoint was trained with a config that differs in a
      key that changes the result (`check_config_change`; allowed with
      PECLR_ALLOW_CONFIG_CHANGE=1).
  """
  # main.run has checked the config; callers that go around it have not.
  config_checks.check_config(config, devices=mesh.devices.size)
  # Held for the whole loop (main.run already holds it for CLI runs; the
  # lock is re-entrant): notebooks and the demo's stages call fit directly.
  with checkpoints.lock_workdir(workdir):
    # Before anything in the workdir is opened for writing. A checkpoint of
    # another kind or model is refused by what it is (its metadata), which
    # says more than the list of config keys that differ.
    stored = checkpoints.read_config(workdir)
    where = checkpoints.checkpoint_dir(workdir)
    if stored is not None:
      checkpoints.check_meta(checkpoints.read_meta(workdir), meta, where)
    check_config_change(stored, config, where)
    return _fit(config, workdir, mesh=mesh, model=model, tx=tx,
                train_iter=train_iter, loss_fn=loss_fn, num_steps=num_steps,
                meta=meta, evaluate=evaluate, best_metric=best_metric,
                desc=desc)


def _fit(config, workdir, *, mesh, model, tx, train_iter, loss_fn, num_steps,
         meta, evaluate, best_metric, desc):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  rng = jax.random.key(config.seed)
  # The next batches go to the devices while a step runs; checkpoints hold
  # the state after the batches consumed, not after those read ahead.
  train_iter = device_prefetch.DevicePrefetcher(
      train_iter, lambda batch: shard_batch(batch, mesh),
      size=config.data.device_prefetch)

  manager = checkpoints.CheckpointManager(
      workdir, max_to_keep=config.keep_checkpoints)
  start = manager.latest_step() or 0
  if start:
    template = {"model": _pure(state[0]), "opt": _pure(state[1]),
                "rng": jax.random.key_data(rng)}
    restored = manager.restore(start, template, expect_meta=meta,
                               data_iter=train_iter)
    nnx.replace_by_pure_dict(state, {0: restored["model"],
                                     1: restored["opt"]})
    rng = jax.random.wrap_key_data(jnp.asarray(restored["rng"]))
    print(f"Resumed from {manager.directory}/{start}.", flush=True)
  state, rng = replicate((state, rng), mesh)

  train_step = make_train_step(graphdef, loss_fn)
  last_saved = start

  def save(step):
    nonlocal last_saved
    host = jax.device_get(state)
    manager.save(step, {"model": _pure(host[0]), "opt": _pure(host[1]),
                        "rng": np.asarray(jax.random.key_data(rng))},
                 meta=meta, config=config, data_iter=train_iter)
    last_saved = step

  def current_model():
    return nnx.merge(graphdef, state)[0]

  # Steps after `start` logged by an interrupted run are about to be redone.
  writer = MetricWriter(workdir, resume_step=start)
  best_dir = os.path.join(workdir, "best")
  best_manager = best_value = None
  if best_metric is not None and evaluate is not None:
    best_manager = checkpoints.CheckpointManager(best_dir, max_to_keep=1)
    best_value = _read_best(best_dir, best_metric[0])

  def run_evaluation(step):
    nonlocal best_value
    metrics = evaluate(current_model(), step)
    writer.write(step, metrics)
    if best_manager is None:
      return metrics
    name, mode = best_metric
    value = float(metrics[name])
    better = best_value is None or (
        value < best_value if mode == "min" else value > best_value)
    # A resumed run re-evaluates steps whose best checkpoint the interrupted
    # run already saved (orbax refuses to save a step twice).
    if better and step not in best_manager.all_steps():
      best_value = value
      host = jax.device_get(state)
      best_manager.save(step, {"model": _pure(host[0])},
                        meta={**meta, name: value}, config=config)
      # best.json only names a checkpoint that is complete on disk.
      best_manager.wait()
      if jax.process_index() == 0:
        _write_best(best_dir, step, name, value)
    return metrics

  last_metrics = {}
  with contextlib.ExitStack() as cleanup:
    # Unwound in reverse order, also on errors, each step even if another
    # fails: the checkpoint saves already started are finished (so the latest
    # one on disk is complete) while the SIGTERM handler is still ours, then
    # the previous handlers (SIGTERM, SIGINT) are put back.
    cleanup.callback(writer.close)
    preemption = cleanup.enter_context(_PreemptionWatch())
    if best_manager is not None:
      cleanup.callback(best_manager.close)
    cleanup.callback(manager.close)
    cleanup.callback(train_iter.close)
    cleanup.enter_context(jax.set_mesh(mesh))
    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step",
               dynamic_ncols=True, disable=jax.process_index() != 0)
    # Closed first, also on errors: an open bar is redrawn at exit, after
    # the error message.
    cleanup.callback(bar.close)
    t0, steps_since, wait0 = time.perf_counter(), 0, train_iter.wait_seconds
    for step in range(start + 1, num_steps + 1):
      batch = next(train_iter)
      state, metrics = train_step(state, batch, rng, jnp.int32(step))
      steps_since += 1
      bar.update(1)
      is_last = step == num_steps
      if step % config.log_every_steps == 0 or is_last:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, metrics)
        elapsed = time.perf_counter() - t0
        metrics["train_steps_per_sec"] = steps_since / max(elapsed, 1e-9)
        # Time the loop waited for the host's next batch, per step (near 0:
        # the input pipeline keeps up with the devices).
        waited = train_iter.wait_seconds - wait0
        metrics["input_wait_ms"] = 1000 * waited / steps_since
        metrics["input_wait_fraction"] = waited / max(elapsed, 1e-9)
        t0, steps_since = time.perf_counter(), 0
        wait0 = train_iter.wait_seconds
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
        last_metrics = metrics
      if evaluate is not None and (is_last or (
          config.eval_every_steps > 0
          and step % config.eval_every_steps == 0)):
        last_metrics = {**last_metrics, **run_evaluation(step)}
      if is_last or step % config.checkpoint_every_steps == 0:
        save(step)
      # Every step on every process (the multi-process sync point needs it).
      # Also at the last step: the run is complete, but a caller with more
      # phases must still stop.
      if preemption.reached(step):
        if last_saved != step:
          save(step)
        manager.wait()
        raise Preempted(step, manager.directory, preemption.cause)
    manager.wait()
    if preemption.signalled:  # while the last checkpoint was being written
      raise Preempted(num_steps, manager.directory, preemption.cause)
  return current_model(), last_metrics


def _read_best(best_dir, name):
  """The best value so far: from the best checkpoint itself (its meta), which
  is the truth even if the process died before best.json was written."""
  try:
    return float(checkpoints.read_meta(best_dir)[name])
  except (checkpoints.CheckpointError, KeyError):
    return None


def _write_best(best_dir, step, name, value):
  with open(os.path.join(best_dir, "best.json"), "w") as f:
    json.dump({"step": step, "metric": name, "value": value}, f)
