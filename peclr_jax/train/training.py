"""The train step and the loop that pre-training and fine-tuning share.

`fit` runs, or resumes, a run on the 'data' mesh (`sharding`): checkpoints,
metrics (`metrics_log`), periodic evaluation with the best checkpoint kept,
a stop on a non-finite loss, and a clean stop on preemption (`preemption`).
"""

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from peclr_jax import config_checks
from peclr_jax.inputs import device_prefetch
from peclr_jax.train import checkpoints, metrics_log, preemption, resume_checks, sharding


class NonFiniteLossError(FloatingPointError):
  pass


def check_finite(step: int, metrics: Mapping[str, float], name="train_loss"):
  value = float(metrics[name])
  if not math.isfinite(value):
    raise NonFiniteLossError(
      f"{name} is {value} at step {step}; stopping. Lower the learning rate "
      "(config.optim.base_lr) or use float32 (config.model.dtype)."
    )


def make_train_step(graphdef, loss_fn):
  """The jitted step `(state, batch, rng, step) -> (state, metrics)`.

  `state` is `nnx.state((model, optimizer))` and is donated. The step's
  randomness is `fold_in(rng, step)`, so a resumed run draws the same views.
  """

  def train_step(state, batch, rng, step):
    model, optimizer = nnx.merge(graphdef, state)
    key = jax.random.fold_in(rng, step)
    grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, key), has_aux=True)
    (_, metrics), grads = grad_fn(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, donate_argnums=0)


def _pure(tree):
  return nnx.to_pure_dict(tree)


def fit(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  mesh,
  model,
  tx,
  train_iter,
  loss_fn,
  num_steps: int,
  meta: dict,
  evaluate=None,
  best_metric: tuple[str, str] | None = None,
  desc: str = "train",
):
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
    preemption.Preempted: on SIGTERM or a first Ctrl-C, once the checkpoint of
      the current step is saved (a second Ctrl-C: KeyboardInterrupt).
    NonFiniteLossError: on a NaN/inf training loss.
    checkpoints.CheckpointWriteError: a checkpoint could not be written; the
      previous one is left intact.
    checkpoints.WorkdirBusyError: another process is running in `workdir`.
    ValueError: a value of the config is not allowed
      (`config_checks.check_config`), or
      the workdir's checkpoint was trained with a config that differs in a
      key that changes the result (`resume_checks.check_config_change`;
      allowed with PECLR_ALLOW_CONFIG_CHANGE=1).
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
    resume_checks.check_config_change(stored, config, where)
    return _fit(
      config,
      workdir,
      mesh=mesh,
      model=model,
      tx=tx,
      train_iter=train_iter,
      loss_fn=loss_fn,
      num_steps=num_steps,
      meta=meta,
      evaluate=evaluate,
      best_metric=best_metric,
      desc=desc,
    )


def _fit(
  config,
  workdir,
  *,
  mesh,
  model,
  tx,
  train_iter,
  loss_fn,
  num_steps,
  meta,
  evaluate,
  best_metric,
  desc,
):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  rng = jax.random.key(config.seed)
  # The next batches go to the devices while a step runs; checkpoints hold
  # the state after the batches consumed, not after those read ahead.
  train_iter = device_prefetch.DevicePrefetcher(
    train_iter, lambda batch: sharding.shard_batch(batch, mesh), size=config.data.device_prefetch
  )

  manager = checkpoints.CheckpointManager(workdir, max_to_keep=config.keep_checkpoints)
  start = manager.latest_step() or 0
  if start:
    template = {"model": _pure(state[0]), "opt": _pure(state[1]), "rng": jax.random.key_data(rng)}
    restored = manager.restore(start, template, expect_meta=meta, data_iter=train_iter)
    nnx.replace_by_pure_dict(state, {0: restored["model"], 1: restored["opt"]})
    rng = jax.random.wrap_key_data(jnp.asarray(restored["rng"]))
    print(f"Resumed from {manager.directory}/{start}.", flush=True)
  state, rng = sharding.replicate((state, rng), mesh)

  train_step = make_train_step(graphdef, loss_fn)
  last_saved = start

  def save(step):
    nonlocal last_saved
    host = jax.device_get(state)
    manager.save(
      step,
      {"model": _pure(host[0]), "opt": _pure(host[1]), "rng": np.asarray(jax.random.key_data(rng))},
      meta=meta,
      config=config,
      data_iter=train_iter,
    )
    last_saved = step

  def current_model():
    return nnx.merge(graphdef, state)[0]

  # Steps after `start` logged by an interrupted run are about to be redone.
  writer = metrics_log.MetricWriter(workdir, resume_step=start)
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
    better = best_value is None or (value < best_value if mode == "min" else value > best_value)
    # A resumed run re-evaluates steps whose best checkpoint the interrupted
    # run already saved (orbax refuses to save a step twice).
    if better and step not in best_manager.all_steps():
      best_value = value
      host = jax.device_get(state)
      best_manager.save(step, {"model": _pure(host[0])}, meta={**meta, name: value}, config=config)
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
    watch = cleanup.enter_context(preemption.PreemptionWatch())
    if best_manager is not None:
      cleanup.callback(best_manager.close)
    cleanup.callback(manager.close)
    cleanup.callback(train_iter.close)
    cleanup.enter_context(jax.set_mesh(mesh))
    bar = tqdm(
      total=num_steps,
      initial=start,
      desc=desc,
      unit="step",
      dynamic_ncols=True,
      disable=jax.process_index() != 0,
    )
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
      if evaluate is not None and (
        is_last or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
      ):
        last_metrics = {**last_metrics, **run_evaluation(step)}
      if is_last or step % config.checkpoint_every_steps == 0:
        save(step)
      # Every step on every process (the multi-process sync point needs it).
      # Also at the last step: the run is complete, but a caller with more
      # phases must still stop.
      if watch.reached(step):
        if last_saved != step:
          save(step)
        manager.wait()
        raise preemption.Preempted(step, manager.directory, watch.cause)
    manager.wait()
    if watch.signalled:  # while the last checkpoint was being written
      raise preemption.Preempted(num_steps, manager.directory, watch.cause)
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
