"""Input pipeline images/s (read + decode + hand crop + batch); prints JSON.

Reads a built dataset through `input_pipeline.make_pretrain_iterator` exactly
as pre-training does (shuffle, repeat, mix, decode JPEG with PIL, one
fixed-size hand-centred crop, batch) and times whole batches after a warm-up,
for several thread / core / worker-process settings, from the JPEGs and from
the pre-cropped store (`peclr_jax.inputs.precrop`, built here first if missing;
config.data.precropped=True). Compare with what the step consumes: `pairs`
source images per step (each gives two views), i.e. half of the step's
images/s from benchmarks/pretrain_step.py.

  # a full-size fake FreiHAND copy (224 px JPEGs), kept after building:
  .venv/bin/python benchmarks/build_freihand.py --num_unique 2000 --keep
  .venv/bin/python benchmarks/input_pipeline_throughput.py \
      --data_dir /tmp/peclr_bench/build/tfds_2000 --name freihand/default
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

# (cores, threads, worker processes, path)
SETTINGS = [
  (1, 1, 0, "jpeg"),
  (2, 2, 0, "jpeg"),
  (2, 1, 2, "jpeg"),
  (1, 0, 0, "precropped"),
  (1, 1, 0, "precropped"),
  (2, 2, 0, "precropped"),
  (2, 1, 2, "precropped"),
]


def measure(args, threads: int, workers: int, path: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from peclr_jax.inputs import input_pipeline, precrop

  source = input_pipeline.open_source(args.name, args.split, args.data_dir)
  if path == "precropped":
    source = precrop.open_store(
      args.data_dir, args.name, args.split, args.source_size, reference=source
    )
  it = input_pipeline.make_pretrain_iterator(
    [(args.name, source)],
    global_batch=args.batch,
    source_size=args.source_size,
    seed=0,
    num_workers=workers,
    num_threads=threads,
    prefetch=max(2, threads),
    process_index=0,
    process_count=1,
  )
  for _ in range(args.warmup):
    batch = next(it)
  times = []
  # At least --batches batches and --min_seconds: the fast path is timed
  # over enough batches to see through the buffering.
  while len(times) < args.batches or sum(times) < args.min_seconds:
    t = time.perf_counter()
    batch = next(it)
    times.append(time.perf_counter() - t)
  assert batch["image"].shape == (args.batch, args.source_size, args.source_size, 3)
  assert batch["image"].dtype == np.uint8
  # The median batch time hides the machine's noise (other processes); the
  # mean over all batches includes it, and the buffering between them.
  return {
    "images_per_s_median": round(args.batch / np.median(times), 1),
    "images_per_s_mean": round(len(times) * args.batch / sum(times), 1),
    "batches": len(times),
    "seconds": round(sum(times), 2),
    "source_len": len(source),
  }


def main():
  common.ensure_glibc_tunables()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", default="/tmp/peclr_bench/build/tfds_2000")
  ap.add_argument("--name", default="freihand/default")
  ap.add_argument("--split", default="train")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--source_size", type=int, default=224)
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--min_seconds", type=float, default=3.0)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument(
    "--setting", default="", help="internal: 'cores,threads,workers' for one child run"
  )
  args = ap.parse_args()

  if args.setting:  # child: one setting in a fresh process
    cores, threads, workers, path = args.setting.split(",")
    if int(cores) == 1:
      common.pin_to_one_core(0)
    print(json.dumps(measure(args, int(threads), int(workers), path)))
    return

  from peclr_jax.inputs import precrop  # pylint: disable=g-import-not-at-top

  store = precrop.store_dir(args.data_dir, args.name, args.split, args.source_size)
  if not os.path.exists(os.path.join(store, precrop.META_FILE)):
    precrop.build(args.name, args.split, args.data_dir, source_size=args.source_size)

  out = {
    "benchmark": "input_pipeline_throughput",
    **common.machine(),
    "dataset": f"{args.name} ({args.split}) in {args.data_dir}",
    "batch": args.batch,
    "source_px": args.source_size,
    "results": {},
  }
  for cores, threads, workers, path in SETTINGS:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--setting",
      f"{cores},{threads},{workers},{path}",
    ] + [f"--{k}={v}" for k, v in vars(args).items() if k != "setting"]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    key = f"{path} cores={cores} threads={threads} workers={workers}"
    try:
      res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
      res = {"error": proc.stderr[-1500:]}
    res["load_before"] = round(load, 2)
    out["results"][key] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
