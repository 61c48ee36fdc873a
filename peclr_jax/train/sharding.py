"""Data parallelism: the device mesh, replicated state and sharded batches.

Data parallelism is `jax.jit` over a one-axis mesh named 'data': the train
state is replicated and the batch is sharded along its first axis. XLA then
inserts the gradient all-reduce and computes BatchNorm statistics and the
NT-Xent similarity matrix over the *global* batch, with no collective written
by hand. This is what `jax.pmap` now lowers to (pmap is in maintenance mode
and implemented on jit + shard_map), and the same code runs on one CPU, a
multi-GPU host or a multi-host TPU pod after `jax.distributed.initialize()`.
"""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis mesh over all (or the given) devices.

  The axis is `Auto` (XLA propagates shardings), not JAX 0.10's default
  `Explicit`: the model and augmentation code stays free of sharding
  annotations, and only the batch's input sharding is stated.
  """
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(
    np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


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
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def check_batch_divisible(global_batch: int, mesh, name: str = "batch_size"):
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
      f"config.{name}={global_batch} must be divisible by the {n} devices "
      f"and {jax.process_count()} processes it is split across."
    )
