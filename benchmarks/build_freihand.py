"""FreiHAND build rate and peak memory on a full-size fake copy; prints JSON.

Writes fake FreiHAND v2 files at the real image size (224 px JPEGs, 4
versions per unique sample, masks, JSON labels; tfds_builders/freihand/
fake_data.py), then builds them with the project's CLI in a child process
(`python -m peclr_jax.data build freihand ...`, the command users run) and
reports images/s and the child's peak resident memory. Run it for two sizes
to see whether memory grows with the dataset, then extrapolate to the real
130,240 training + 3,960 evaluation images.

  GLIBC_TUNABLES=... .venv/bin/python benchmarks/build_freihand.py \
      --num_unique 2000 --work /tmp/peclr_bench/build
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

REAL_TRAIN_IMAGES = 130_240
REAL_EVAL_IMAGES = 3_960
REAL_UNIQUE = 32_560


def _dir_bytes(path):
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num_unique", type=int, default=2000)
  ap.add_argument("--work", default="/tmp/peclr_bench/build")
  ap.add_argument(
    "--config", default="default", help="builder config (default holds out 5%% as validation)"
  )
  ap.add_argument("--keep", action="store_true", help="keep the built files")
  args = ap.parse_args()

  manual = os.path.join(args.work, f"manual_{args.num_unique}")
  data_dir = os.path.join(args.work, f"tfds_{args.num_unique}")
  num_eval = max(1, round(REAL_EVAL_IMAGES * args.num_unique / REAL_UNIQUE))
  out = {
    "benchmark": "build_freihand",
    **common.machine(),
    "num_unique": args.num_unique,
    "num_eval": num_eval,
    "config": args.config,
  }

  if not os.path.exists(os.path.join(manual, "training_xyz.json")):
    from tfds_builders.freihand import fake_data  # pylint: disable=g-import-not-at-top

    t = time.perf_counter()
    fake_data.write_fake_freihand(
      manual, num_unique=args.num_unique, num_eval=num_eval, image_size=224
    )
    out["write_fake_s"] = round(time.perf_counter() - t, 1)
  rgb = os.path.join(manual, "training", "rgb")
  jpgs = os.listdir(rgb)
  out["train_images"] = len(jpgs)
  out["mean_jpeg_kb"] = round(_dir_bytes(rgb) / len(jpgs) / 1024, 1)

  shutil.rmtree(data_dir, ignore_errors=True)
  cli = [
    "build",
    "freihand",
    "--data_dir",
    data_dir,
    "--manual_dir",
    manual,
    "--config",
    args.config,
  ]
  cmd = [sys.executable, "-m", "peclr_jax.data"] + cli
  load0 = os.getloadavg()[0]
  t = time.perf_counter()
  # The build child's own rusage (os.wait4): RUSAGE_CHILDREN would also count
  # the worker processes that wrote the fake copy.
  with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
    child = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout.seek(0)
    stderr.seek(0)
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout.read(), stderr.read())
  seconds = time.perf_counter() - t
  if proc.returncode:
    out["error"] = proc.stderr[-2000:]
    print(json.dumps(out))
    return 1
  peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
  images = out["train_images"] + num_eval
  # Python start-up + imports, measured the same way, to separate the fixed cost.
  t = time.perf_counter()
  subprocess.run(
    [
      sys.executable,
      "-c",
      "import tensorflow_datasets, tfds_builders.freihand.freihand_dataset_builder",
    ],
    check=True,
    capture_output=True,
  )
  startup = time.perf_counter() - t
  rate = images / max(seconds - startup, 1e-9)
  out.update(
    {
      "command": " ".join(cmd),
      "load_before": round(load0, 2),
      "load_after": round(os.getloadavg()[0], 2),
      "images_built": images,
      "wall_s": round(seconds, 1),
      "startup_s": round(startup, 1),
      "images_per_s": round(rate, 1),
      "peak_rss_mib": round(peak_mib, 1),
      "output_mib": round(_dir_bytes(data_dir) / 2**20, 1),
      "extrapolated_full_s": round(startup + (REAL_TRAIN_IMAGES + REAL_EVAL_IMAGES) / rate, 0),
      "cli_summary_tail": proc.stdout.strip().splitlines()[-3:],
    }
  )
  if not args.keep:
    shutil.rmtree(data_dir, ignore_errors=True)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
