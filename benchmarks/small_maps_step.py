"""A ResNet step on small images, with and without im2col for tiny maps.

  python benchmarks/small_maps_step.py --backbone resnet18 --size 64
  python benchmarks/small_maps_step.py --layers   # single convolutions

XLA:CPU runs 3x3 convolutions whose output is 2 x 2 pixels or smaller
very slowly; `models.resnet.conv_general_dilated` routes them through
im2col + one matmul on CPU. This times a fine-tuning-like step (keypoint
model with the paper's linear head, forward + backward + Adam, batch 32,
random data) with that route off and on, alternating the two in rounds, and
prints one JSON object (median seconds per step of each, and the ratio).
With --layers it times single 3x3 convolutions (forward + backward, batch
32) through `lax.conv_general_dilated` and through the package's hook.
"""

import argparse
import json
import time

import common  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peclr_jax import models
from peclr_jax.models import resnet


def make_step(backbone, size, batch):
  model = models.KeypointModel(backbone, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  target = jax.random.uniform(jax.random.key(1), (batch, 21, 2)) * size

  @jax.jit
  def step(state):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.abs(m(images)["kp2d"] - target)))(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  return step, state


def _median_seconds(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_layers():
  """{layer: {lax_ms, hook_ms}} for 3x3 convolutions on small maps."""
  out = {}
  for hw, ch, stride in [(2, 64, 1), (2, 256, 1), (2, 512, 1), (4, 512, 2), (4, 256, 1)]:
    x = jax.random.normal(jax.random.key(0), (32, hw, hw, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.01
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    row = {}
    for name, conv in (
      ("lax", jax.lax.conv_general_dilated),
      ("hook", resnet.conv_general_dilated),
    ):
      f = jax.jit(
        jax.grad(
          lambda x, w, conv=conv, stride=stride, dn=dn: jnp.sum(
            conv(x, w, (stride, stride), [(1, 1), (1, 1)], dimension_numbers=dn) ** 2
          ),
          argnums=(0, 1),
        )
      )
      row[f"{name}_ms"] = 1000 * _median_seconds(f, x, w)
    out[f"{hw}x{hw}x{ch} stride {stride}"] = row
  return out


def main():
  common.ensure_glibc_tunables()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backbone", default="resnet18")
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--layers", action="store_true")
  args = ap.parse_args()
  if args.layers:
    print(json.dumps({"conditions": common.machine(), "layers": time_layers()}, indent=1))
    return
  limits = {"lax": 0, "im2col": resnet._IM2COL_MAX_OUTPUT_PIXELS}  # pylint: disable=protected-access
  steps, times = {}, {name: [] for name in limits}
  for name, limit in limits.items():
    # The route is chosen while tracing: build and compile each variant once.
    resnet._IM2COL_MAX_OUTPUT_PIXELS = limit  # pylint: disable=protected-access
    step, state = make_step(args.backbone, args.size, args.batch)
    t0 = time.perf_counter()
    state, loss = step(state)
    jax.block_until_ready(loss)
    steps[name] = [step, state, time.perf_counter() - t0]
  for _ in range(args.rounds):
    for name in limits:
      step, state, _ = steps[name]
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, loss = step(state)
        jax.block_until_ready(loss)
        times[name].append(time.perf_counter() - t0)
      steps[name][1] = state
  out = {"conditions": common.machine(), "args": vars(args)}
  for name in limits:
    out[name] = {"median_s_per_step": float(np.median(times[name])), "first_call_s": steps[name][2]}
  out["speedup"] = out["lax"]["median_s_per_step"] / out["im2col"]["median_s_per_step"]
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
