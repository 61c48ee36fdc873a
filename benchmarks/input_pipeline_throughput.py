"""Input pipeline images/s (read + decode + hand crop + batch); prints JSON.

Reads a built dataset through `input_pipeline.make_pretrain_iterator` exactly
as pre-training does (shuffle, repeat, mix, decode JPEG with PIL, one
fixed-size hand-centred crop, batch) and times whole batches after a warm-up,
for several thread / core settings. Compare with what the step consumes:
`pairs` source images per step (each gives two views), i.e. half of the
step's images/s from benchmarks/pretrain_step.py.

  # a full-size fake FreiHAND copy (224 px JPEGs), kept after building:
  .venv/bin/python benchmarks/build_freihand.py --num_unique 2000 --keep
  .venv/bin/python benchmarks/input_pipeline_throughput.py \
      --data_dir /tmp/peclr_bench/build/tfds_2000 --name freihand
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def measure(args, threads: int, workers: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from peclr_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.open_source(args.name, args.split, args.data_dir)
  it = input_pipeline.make_pretrain_iterator(
      [(args.name, source)], global_batch=args.batch,
      source_size=args.source_size, seed=0, num_workers=workers,
      num_threads=threads, prefetch=max(2, threads), process_index=0,
      process_count=1)
  for _ in range(args.warmup):
    batch = next(it)
  t = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  seconds = time.perf_counter() - t
  assert batch["image"].shape == (args.batch, args.source_size, args.source_size, 3)
  assert batch["image"].dtype == np.uint8
  return {"images_per_s": round(args.batches * args.batch / seconds, 1),
          "seconds": round(seconds, 2), "source_len": len(source)}


def main():
  common.ensure_glibc_tunables()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", default="/tmp/peclr_bench/build/tfds_2000")
  ap.add_argument("--name", default="freihand")
  ap.add_argument("--split", default="train")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--source_size", type=int, default=224)
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--setting", default="",
                  help="internal: 'cores,threads,workers' for one child run")
  args = ap.parse_args()

  if args.setting:  # child: one setting in a fresh process
    cores, threads, workers = (int(v) for v in args.setting.split(","))
    if cores == 1:
      common.pin_to_one_core(0)
    print(json.dumps(measure(args, threads, workers)))
    return

  out = {"benchmark": "input_pipeline_throughput", **common.machine(),
         "dataset": f"{args.name} ({args.split}) in {args.data_dir}",
         "batch": args.batch, "source_px": args.source_size, "results": {}}
  for cores, threads, workers in [(1, 1, 0), (2, 1, 0), (2, 2, 0),
                                  (2, 4, 0), (2, 1, 2)]:
    cmd = [sys.executable, os.path.abspath(__file__), "--setting",
           f"{cores},{threads},{workers}"] + [
               f"--{k}={v}" for k, v in vars(args).items()
               if k != "setting"]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    key = f"cores={cores} threads={threads} workers={workers}"
    try:
      res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
      res = {"error": proc.stderr[-1500:]}
    res["load_before"] = round(load, 2)
    out["results"][key] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
