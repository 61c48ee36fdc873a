"""Keep XLA:CPU from recomputing elementwise chains in every consumer.

XLA:CPU fuses cheap elementwise producers into each of their consumers. For a
residual block's input (a BatchNorm/add/ReLU chain) or a warped image read by
several colour-jitter fusions, that means the same chain is recomputed once
per consumer, and the gathers or strided reads it contains dominate the step
(BENCHMARKS.md, section 2). `lax.optimization_barrier` cannot stop it on CPU:
the CPU compiler expands barriers before fusion. The operands and results of
a conditional are real buffers, which does stop it.

On GPU and TPU the fusion heuristics do not duplicate work this way, and a
conditional would cost a predicate read, so `materialise` is the identity
there. It is also the identity when there are several devices (simulated
CPU devices in tests, multi-process CPU runs): the predicate would read one
element of a batch-sharded array, which costs an all-reduce per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def materialise(x: jax.Array) -> jax.Array:
  """`x`, computed once into a buffer on one CPU device; else `x` unchanged.

  The conditional's predicate ("the first element is not NaN") is true for
  any usable `x`; when it is NaN the whole result becomes NaN, which a
  training run already stops on. Differentiable (the cond's VJP is the
  identity on the taken branch).
  """
  if jax.default_backend() != "cpu" or jax.device_count() > 1:
    return x
  first = x.reshape(-1)[0]
  return lax.cond(first == first, lambda v: v, lambda v: v * jnp.nan, x)
