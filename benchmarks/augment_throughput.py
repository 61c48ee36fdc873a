"""Two-view augmentation pairs/s on ONE core: ours (jitted, batched) against a
per-sample reimplementation of the public OpenCV augmentation; prints JSON.

Both start from uint8 224 x 224 RGB images with 2D keypoints and end with two
normalised 128 x 128 float32 views per image plus their parameters:

* ours: the package's `augment.augment_pair` as it is, under `jax.jit` over
  a batch (rotation, scale and translation in one bilinear warp per view,
  the warped view materialised on CPU, HSV jitter without float mods,
  normalisation);
* the original: `torch_reference.OriginalAugmenter.pair` per sample
  (cv2.warpAffine of the whole image, crop, cv2.resize INTER_AREA,
  uint8 HSV jitter, ToTensor + Normalize); needs
  `pip install opencv-python-headless` (skipped with a message if missing).

The process is pinned to one core (as `taskset -c 0`), XLA runs
single-threaded and OpenCV with one thread. Rounds alternate the two sides.

  .venv/bin/python benchmarks/augment_throughput.py --batch 64 --rounds 7
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  common.ensure_glibc_tunables()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64, help="images per jitted call")
  ap.add_argument(
    "--samples", type=int, default=256, help="images per timed round of the per-sample original"
  )
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--core", type=int, default=0)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--out_size", type=int, default=128)
  args = ap.parse_args()

  common.pin_to_one_core(args.core)
  common.set_xla_flags(single_thread=True)
  import jax  # pylint: disable=g-import-not-at-top

  from peclr_jax.hands import augment  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n = max(args.batch, args.samples)
  images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
  s = args.size
  kps = (s / 2 + rng.uniform(-s / 5, s / 5, (n, 21, 2))).astype(np.float32)
  cfg = augment.AugmentConfig(out_size=args.out_size)

  @jax.jit
  def ours(key, im, kp):
    (v1, v2), (p1, p2), _ = augment.augment_pair(key, im, kp, cfg)
    return v1, v2, p1, p2

  dev_images = jax.device_put(images[: args.batch])
  dev_kps = jax.device_put(kps[: args.batch])
  key = jax.random.key(0)
  t = time.perf_counter()
  jax.block_until_ready(ours(key, dev_images, dev_kps))
  compile_s = time.perf_counter() - t

  def run_ours(i):
    # Host arrays in, as the step receives them from the input pipeline.
    jax.block_until_ready(ours(jax.random.fold_in(key, i), images[: args.batch], kps[: args.batch]))

  original = None
  try:
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)
    cv2.ocl.setUseOpenCL(False)
    import torch_reference  # pylint: disable=g-import-not-at-top

    original = torch_reference.OriginalAugmenter(out_size=args.out_size)
  except ImportError:
    cv2 = None

  def run_original():
    for j in range(args.samples):
      original.pair(images[j], kps[j].astype(np.float64))

  for i in range(2):
    run_ours(i)
  if original is not None:
    run_original()
  # Wall time, and CPU time of this (pinned, single-threaded) process, which
  # other users' load on the shared core inflates much less.
  t_ours, t_orig, c_ours, c_orig, o_ours, o_orig = [], [], [], [], [], []
  for r in range(args.rounds):
    sides = ["ours", "orig"] if r % 2 == 0 else ["orig", "ours"]
    for side in sides:
      if side == "orig" and original is None:
        continue
      with common.Interference() as probe:
        if side == "ours":
          run_ours(100 + r)
        else:
          run_original()
      (t_ours if side == "ours" else t_orig).append(probe.wall)
      (c_ours if side == "ours" else c_orig).append(probe.cpu)
      (o_ours if side == "ours" else o_orig).append(round(probe.others_frac, 2))
  out = {
    "benchmark": "augment_throughput",
    **common.machine(),
    "core": args.core,
    "batch": args.batch,
    "source_px": args.size,
    "view_px": args.out_size,
    "ours_compile_s": round(compile_s, 1),
  }
  so = common.summary(t_ours, args.batch)
  sc = common.summary(c_ours, args.batch)
  out["ours_pairs_per_s"] = so["rate_at_median"]
  out["ours_pairs_per_s_min_max"] = so["rate_min_max"]
  out["ours_pairs_per_cpu_s"] = sc["rate_at_median"]
  out["others_cpu_frac_ours"] = o_ours
  if original is not None:
    sr = common.summary(t_orig, args.samples)
    src = common.summary(c_orig, args.samples)
    out["cv2"] = cv2.__version__
    out["original_pairs_per_s"] = sr["rate_at_median"]
    out["original_pairs_per_s_min_max"] = sr["rate_min_max"]
    out["original_pairs_per_cpu_s"] = src["rate_at_median"]
    out["others_cpu_frac_original"] = o_orig
    out["ratio_ours_over_original"] = round(so["rate_at_median"] / sr["rate_at_median"], 2)
    out["ratio_ours_over_original_cpu_s"] = round(sc["rate_at_median"] / src["rate_at_median"], 2)
  else:
    out["original"] = "skipped: cv2 missing; pip install opencv-python-headless (benchmark only)"
  print(json.dumps(out))


if __name__ == "__main__":
  main()
