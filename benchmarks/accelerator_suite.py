"""Every accelerator number of BENCHMARKS.md section 7 in one run; one JSON.

Runs each part of PARTS as its own process (accelerator_step.py,
evaluate_throughput.py, pretrain_step.py), most wanted first, each under its
own time limit inside one overall budget. A part that fails, runs out of
memory or overruns is recorded (its error and the end of its output) and the
next part starts; the JSON is rewritten after every part, so a run cut short
keeps what it measured. Own processes also free the accelerator's memory
between parts and keep each part's peak memory its own.

`--smoke` runs the same parts at tiny sizes, PyTorch on the CPU and
torch.compile with the aot_eager backend (tests/test_benchmarks.py).
accelerator_suite.sh starts it and says how to run it on the GPU machine.

  python benchmarks/accelerator_suite.py --out suite.json [--smoke]
"""

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_JAX_STEP = [
  "--dtype",
  "bfloat16",
  "--source_size",
  "224",
  "--max_devices",
  "1",
  "--steps",
  "20",
  "--warmup",
  "3",
]
_TORCH_STEP = [
  "--no_jax",
  "--dtype",
  "bfloat16",
  "--out_size",
  "128",
  "--torch_device",
  "cuda",
  "--rounds",
  "10",
  "--warmup",
  "3",
  "--settle_s",
  "0",
]

# (name, script, arguments, seconds allowed), most wanted first: the overall
# budget may run out before the last ones.
PARTS = (
  (
    "pretrain_resnet50_128",
    "accelerator_step.py",
    ["--backbone", "resnet50", "--pairs", "128", "--out_size", "128"] + _JAX_STEP,
    110,
  ),
  (
    "torch_resnet50_128",
    "pretrain_step.py",
    ["--backbone", "resnet50", "--pairs", "128"] + _TORCH_STEP,
    70,
  ),
  (
    "pretrain_resnet50_256",
    "accelerator_step.py",
    ["--backbone", "resnet50", "--pairs", "256", "--out_size", "128"] + _JAX_STEP,
    90,
  ),
  (
    "finetune_resnet50_128",
    "accelerator_step.py",
    ["--step", "finetune", "--backbone", "resnet50", "--pairs", "128", "--out_size", "224"]
    + _JAX_STEP,
    90,
  ),
  (
    "evaluate_resnet50",
    "evaluate_throughput.py",
    [
      "--backbone",
      "resnet50",
      "--batch",
      "128",
      "--crop_size",
      "224",
      "--dtype",
      "bfloat16",
      "--rounds",
      "5",
    ],
    70,
  ),
  (
    "pretrain_resnet152_128",
    "accelerator_step.py",
    ["--backbone", "resnet152", "--pairs", "128", "--out_size", "128"] + _JAX_STEP,
    130,
  ),
  (
    "pretrain_resnet152_256",
    "accelerator_step.py",
    ["--backbone", "resnet152", "--pairs", "256", "--out_size", "128"] + _JAX_STEP,
    110,
  ),
  (
    "torch_compile_resnet50_128",
    "pretrain_step.py",
    ["--backbone", "resnet50", "--pairs", "128", "--torch_compile", "inductor"] + _TORCH_STEP,
    150,
  ),
)

# --smoke: these options' values in every part. Equal sizes for both
# backbones and batch sizes give equal programs, so the compilation cache
# (below) compiles each kind of step once.
SMOKE_VALUES = {
  "--backbone": "resnet_tiny",
  "--pairs": "2",
  "--batch": "2",
  "--out_size": "32",
  "--source_size": "64",
  "--crop_size": "32",
  "--steps": "2",
  "--warmup": "1",
  "--rounds": "1",
  "--torch_device": "cpu",
  "--torch_compile": "aot_eager",
}
MIN_PART_S = 20  # a part is skipped when less than this is left of the budget


def smoke_arguments(argv):
  """argv with SMOKE_VALUES put in (the same options, tiny values)."""
  out = list(argv)
  for i, arg in enumerate(out[:-1]):
    if arg in SMOKE_VALUES:
      out[i + 1] = SMOKE_VALUES[arg]
  return out


def run_part(name, argv, limit_s, env):
  """Runs one part; (status, its JSON or None, error, last output lines)."""
  tail = collections.deque(maxlen=20)
  with tempfile.TemporaryFile("w+") as stdout:
    # Own session: a timeout kills the part's helpers too (torch.compile's
    # compile workers), not just its main process.
    proc = subprocess.Popen(
      argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )

    def relay():  # progress lines as they come, and the end for the report
      for line in proc.stderr:
        tail.append(line.rstrip())
        print(f"  [{name}] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
      code = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      timed_out = True
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:  # it ended in between
        pass
      code = proc.wait()
    reader.join(timeout=10)
    stdout.seek(0)
    lines = [line for line in stdout.read().splitlines() if line.startswith("{")]
  if timed_out:
    return "timed out", None, f"killed after its {limit_s:.0f} s", list(tail)
  if code != 0:
    return "failed", None, f"exit status {code}", list(tail)
  try:
    return "ok", json.loads(lines[-1]), None, []
  except (IndexError, json.JSONDecodeError) as e:
    return "failed", None, f"no JSON line in its output ({e})", list(tail)


def _row(r):
  """The table's numbers in one part's JSON."""
  if r["benchmark"] == "accelerator_step":
    one = r["scaling"][0]
    return {
      "device": r["device_kind"],
      "images_per_s": one["images_per_s"],
      "mfu": one.get("mfu"),
      "compile_s": one["compile_s"],
      "peak_memory_gib": one.get("peak_memory_gib_device0"),
    }
  if r["benchmark"] == "evaluate_throughput":
    return {"images_per_s": r["images_per_s"], "first_call_s": r["first_call_s"]}
  t = r["torch"]  # pretrain_step, the PyTorch side alone
  return {
    "images_per_s": t["images_per_s"],
    "first_step_s": t["first_step_s"],
    "peak_memory_gib": t.get("peak_memory_gib"),
  }


def summarise(parts):
  """The section 7 table: one row per part, and PyTorch against JAX."""
  rows = {}
  for name, part in parts.items():
    rows[name] = {"status": part["status"]}
    if "result" in part:
      try:
        rows[name].update(_row(part["result"]))
      except (KeyError, IndexError, TypeError) as e:  # a part's JSON changed
        rows[name]["summary_error"] = repr(e)
  # PyTorch's MFU counts the JAX step's model flops per image (same network).
  jax_part = parts.get("pretrain_resnet50_128", {}).get("result", {})
  flops_per_image = jax_part.get("xla_flops_per_image")
  peak = jax_part.get("peak_tflops_per_device")
  jax_rate = rows.get("pretrain_resnet50_128", {}).get("images_per_s")
  for name in ("torch_resnet50_128", "torch_compile_resnet50_128"):
    rate = rows.get(name, {}).get("images_per_s")
    if rate and flops_per_image and peak:
      rows[name]["mfu"] = round(flops_per_image * rate / (peak * 1e12), 4)
    if rate and jax_rate:
      rows[name]["jax_over_torch"] = round(jax_rate / rate, 3)
  return {"peak_tflops": peak, "rows": rows}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_out = (
    os.path.join(os.environ["OUT"], "accelerator_suite.json") if os.environ.get("OUT") else None
  )
  ap.add_argument(
    "--out",
    default=default_out,
    required=default_out is None,
    help="the JSON to write (default: $OUT/accelerator_suite.json)",
  )
  ap.add_argument(
    "--budget_s",
    type=float,
    default=420.0,
    help="all parts together; a part gets min(its own, what is left)",
  )
  ap.add_argument(
    "--smoke", action="store_true", help="tiny sizes on the CPU: checks every part runs"
  )
  ap.add_argument("--only", nargs="+", choices=[p[0] for p in PARTS], help="run these parts alone")
  args = ap.parse_args()

  here = os.path.dirname(os.path.abspath(__file__))
  # Parts that compile the same program (the smoke sizes) compile it once;
  # full-size parts differ and only pay the write. A cache given is kept.
  own_cache = not os.environ.get("JAX_COMPILATION_CACHE_DIR")
  cache = (
    tempfile.mkdtemp(prefix="accelerator_suite_jax_cache_")
    if own_cache
    else os.environ["JAX_COMPILATION_CACHE_DIR"]
  )
  env = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  # glibc's default malloc in every part unless one is given: the CPU
  # benchmarks' arena_max=1 would put an accelerator run's compile threads
  # on one lock.
  env.setdefault("GLIBC_TUNABLES", "")
  if args.smoke:  # checks that the parts run, not how fast: compile less
    env["XLA_FLAGS"] = " ".join(
      [
        env.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
      ]
    )
  report = {
    "benchmark": "accelerator_suite",
    **common.machine(),
    "smoke": args.smoke,
    "budget_s": args.budget_s,
    "parts": {},
  }
  start = time.perf_counter()
  deadline = start + args.budget_s

  def write():
    report["summary"] = summarise(report["parts"])
    report["wall_s"] = round(time.perf_counter() - start, 1)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, args.out)  # a reader never sees half a file

  for name, script, argv, budget in PARTS:
    if args.only is not None and name not in args.only:
      continue
    if args.smoke:
      argv = smoke_arguments(argv)
    command = [sys.executable, os.path.join(here, script)] + argv
    limit = min(budget, deadline - time.perf_counter())
    elapsed = time.perf_counter() - start
    if limit < MIN_PART_S:
      print(f"[suite {elapsed:.0f} s] {name}: skipped, budget spent", flush=True)
      report["parts"][name] = {"status": "skipped", "error": "budget spent"}
      write()
      continue
    print(f"[suite {elapsed:.0f} s] {name}: start, limit {limit:.0f} s", flush=True)
    t = time.perf_counter()
    try:
      status, result, error, tail = run_part(name, command, limit, env)
    except OSError as e:  # could not be started
      status, result, error, tail = "failed", None, repr(e), []
    part = {
      "status": status,
      "seconds": round(time.perf_counter() - t, 1),
      "limit_s": round(limit),
      "command": " ".join(command[1:]),
    }
    if result is not None:
      part["result"] = result
    if error:
      part["error"], part["output_tail"] = error, tail
    report["parts"][name] = part
    write()
    row = report["summary"]["rows"][name]
    print(
      f"[suite {time.perf_counter() - start:.0f} s] {name}: {status} in "
      f"{part['seconds']:.0f} s {error or json.dumps(row)}",
      flush=True,
    )
  if own_cache:
    shutil.rmtree(cache, ignore_errors=True)
  print(json.dumps(report["summary"]), flush=True)
  print(f"[suite] wrote {args.out}", flush=True)


if __name__ == "__main__":
  main()
