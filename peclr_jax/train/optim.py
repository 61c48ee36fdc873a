"""The optimiser: Adam with an optional LARS trust ratio and weight decay,
warm-up then cosine to 0, over a schedule whose length comes from the config.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def decay_mask(params):
  """Weight decay and trust ratio apply to kernels only: not to biases or
  BatchNorm scales/offsets, which are the only 1-D parameters here."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def learning_rate(optim: ml_collections.ConfigDict, effective_batch: int):
  if optim.scale_lr_by_sqrt_batch:
    return optim.base_lr * math.sqrt(effective_batch)
  return optim.base_lr


def make_optimizer(
  optim: ml_collections.ConfigDict,
  *,
  effective_batch: int,
  total_updates: int,
  warmup_updates: int,
  grad_accum_steps: int,
) -> optax.GradientTransformation:
  """Adam, optionally with a LARS trust ratio, warm-up then cosine to 0.

  The public code wraps Adam in a LARS wrapper that rescales each layer's
  (weight-decayed) gradient by its trust ratio before Adam sees it; the chain
  below does the same in that order.
  """
  peak = learning_rate(optim, effective_batch)
  total_updates = max(total_updates, 1)
  warmup_updates = int(min(max(warmup_updates, 0), total_updates - 1))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_updates,
    decay_steps=total_updates,
    end_value=0.0,
  )
  parts = [optax.add_decayed_weights(optim.weight_decay, mask=decay_mask)]
  if optim.lars:
    parts.append(
      optax.masked(
        optax.scale_by_trust_ratio(trust_coefficient=optim.trust_coefficient), decay_mask
      )
    )
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
    total_updates=updates,
    warmup_updates=warmup,
    grad_accum_steps=config.grad_accum_steps,
  )
  return tx, steps, updates
