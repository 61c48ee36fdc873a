"""Shared helpers of the benchmark scripts; run directly it prints the machine.

Every benchmark prints one JSON object that starts with `machine()`: CPU model
and cores, load average, library versions, GLIBC_TUNABLES and XLA_FLAGS, so a
number is never read without its conditions.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

# glibc's malloc returns freed big blocks to the OS by default (mmap/trim),
# so every step pays page faults again. mmap_max=0 and a huge trim threshold
# stop that for the main arena only: XLA's worker threads allocate from
# per-thread arenas (64 MiB heaps), which still mmap every bigger buffer and
# unmap it when freed (~760k page faults, ~1.4 s of system time per 32-pair
# ResNet-50 step). arena_max=1 sends every thread to the main arena. Both
# sides of every CPU comparison run with this setting (BENCHMARKS.md).
GLIBC_TUNABLES = (
  "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=34359738368:glibc.malloc.arena_max=1"
)


def ensure_glibc_tunables():
  """Re-executes this script with GLIBC_TUNABLES set (glibc reads it at start),
  unless the caller set GLIBC_TUNABLES itself (even to "", glibc's defaults)."""
  if "GLIBC_TUNABLES" not in os.environ:
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def set_xla_flags(extra: str = "", *, single_thread: bool = False):
  """Appends flags to XLA_FLAGS; call before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if single_thread:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  if extra:
    flags += " " + extra
  os.environ["XLA_FLAGS"] = flags.strip()
  return os.environ["XLA_FLAGS"]


def pin_to_one_core(core: int = 0):
  """Like `taskset -c <core>`: this process and the threads it starts later."""
  os.sched_setaffinity(0, {core})


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine() -> dict:
  info = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "cpu": _cpu_model(),
    "cpus_online": os.cpu_count(),
    "cpus_allowed": len(os.sched_getaffinity(0)),
    "loadavg_1m": round(os.getloadavg()[0], 2),
    "python": sys.version.split()[0],
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  for mod in ("jax", "flax", "torch", "cv2", "grain"):
    if mod in sys.modules:
      info[mod] = getattr(sys.modules[mod], "__version__", "?")
  return info


def summary(times, per_call: float = 1.0) -> dict:
  """Median, min and max of per-call seconds, and the rate at the median."""
  times = list(times)
  med = statistics.median(times)
  return {
    "n": len(times),
    "median_s": round(med, 4),
    "min_s": round(min(times), 4),
    "max_s": round(max(times), 4),
    "rate_at_median": round(per_call / med, 2),
    "rate_min_max": [round(per_call / max(times), 2), round(per_call / min(times), 2)],
  }


def cpu_busy_seconds() -> float:
  """Busy CPU seconds of the whole machine so far (all cores, /proc/stat)."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Interference:
  """Measures how much CPU *other* processes used while a call ran.

  others = machine busy seconds - this process's CPU seconds, as a fraction
  of the call's wall time x cores. A call with others < 0.1 ran on an
  (almost) quiet machine; benchmarks report medians over those "clean"
  calls next to the medians over all calls.
  """

  def __enter__(self):
    self.t = time.perf_counter()
    self.busy = cpu_busy_seconds()
    self.own = time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t
    self.cpu = time.process_time() - self.own
    others = cpu_busy_seconds() - self.busy - self.cpu
    cores = os.cpu_count()
    self.others_frac = max(0.0, others) / max(self.wall * cores, 1e-9)
    return False


def wait_for_idle(max_busy: float = 0.15, timeout_s: float = 600.0, window_s: float = 5.0) -> float:
  """Waits until the machine was at most `max_busy` busy over a window."""
  t0 = time.time()
  while True:
    b0, w0 = cpu_busy_seconds(), time.time()
    time.sleep(window_s)
    busy = (cpu_busy_seconds() - b0) / ((time.time() - w0) * os.cpu_count())
    if busy <= max_busy or time.time() - t0 > timeout_s:
      return round(busy, 3)


def wait_for_quiet(max_load: float, timeout_s: float = 300.0, poll_s: float = 10.0) -> float:
  """Waits (up to timeout) until the 1-minute load average is below max_load."""
  t0 = time.time()
  while os.getloadavg()[0] > max_load and time.time() - t0 < timeout_s:
    time.sleep(poll_s)
  return os.getloadavg()[0]


if __name__ == "__main__":
  print(
    json.dumps({"benchmark": "machine", **machine(), "recommended_GLIBC_TUNABLES": GLIBC_TUNABLES})
  )


def keypoint_model_on_eval_split(checkpoint: str, ev, batch_size: int = 64):
  """(predict_fn on ready crops, crop size, checkpoint path, iterator over
  the evaluation split's whole images) for scripts that evaluate a fine-tuned
  model their own way. Imports grain/TFDS here, not at the module's top:
  the accelerator scripts import this module on an image without them."""
  from peclr_jax import predict  # pylint: disable=g-import-not-at-top
  from peclr_jax.inputs import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  from peclr_jax.models import restore  # pylint: disable=g-import-not-at-top

  model, crop_size, _, path = restore.keypoint_model(checkpoint)
  predict_fn = predict.Predictor(model, crop_size, batch_size=batch_size).predict_crops
  ((_, source),) = datasets.open_sources(ev.data, ev.data.eval_split)
  it = input_pipeline.make_eval_iterator(
    source,
    global_batch=batch_size,
    source_size=ev.data.source_size,
    crop="none",
    process_index=0,
    process_count=1,
  )
  return predict_fn, crop_size, path, it
