"""Training step on an accelerator: images/s, MFU, compile time, memory,
scaling over devices; prints JSON.

The step is the real one (see pretrain_step.py: `training.make_train_step` +
`pretrain.contrastive_loss` (or, with `--step finetune`,
`finetune.keypoint_loss`) and `optim.make_optimizer`, state donated,
batch sharded on the 'data' mesh). FLOPs per step come from XLA's cost
analysis of the one-device step as traced (`jitted.lower(...)
.cost_analysis()['flops']`: forward, backward and optimiser arithmetic, the
same count on every platform; the compiled executable's count is reported
next to it). Model FLOP utilisation = flops/step * steps/s / (peak *
devices) with the chip's dense peak for the dtype (table below, or
--peak_tflops).
Peak memory is `device.memory_stats()['peak_bytes_in_use']` (absent on CPU,
where the compiled memory analysis is reported instead).

Scaling: weak scaling over the first 1, 2, 4, ... devices with `--pairs`
images per device (global batch = pairs x devices).

  # GPU/TPU (the paper's 128 pairs per step, bf16):
  python benchmarks/accelerator_step.py --pairs 128 --dtype bfloat16
  # CPU smoke check (tiny sizes, 2 simulated devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python \
      benchmarks/accelerator_step.py --smoke
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import pretrain_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s per chip, (bfloat16, float32), from the vendors' sheets.
# float32 on NVIDIA is the non-tensor-core rate (XLA uses TF32 only when
# asked through matmul precision).
PEAK_TFLOPS = {
  "H200": (989.4, 66.9),
  "H100": (989.4, 66.9),
  "A100": (312.0, 19.5),
  "L4": (121.0, 30.3),
  "TPU v4": (275.0, 275.0),
  "TPU v5 lite": (197.0, 197.0),
  "TPU v5p": (459.0, 459.0),
  "TPU v6 lite": (918.0, 918.0),
}


def peak_for(kind: str, dtype: str):
  for name, (bf16, fp32) in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  pretrain_step.add_step_arguments(
    ap, pairs=128, dtype="bfloat16", pairs_help="images per step per device"
  )
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="override the chip's dense peak (TFLOP/s per device)",
  )
  ap.add_argument("--max_devices", type=int, default=0)
  ap.add_argument(
    "--smoke", action="store_true", help="tiny sizes for a CPU check: resnet_tiny, 2 pairs, 32 px"
  )
  args = ap.parse_args()
  if args.smoke:
    args.backbone, args.pairs, args.out_size, args.source_size = "resnet_tiny", 2, 32, 64
    args.steps, args.warmup = 3, 1

  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  if args.max_devices:
    devices = devices[: args.max_devices]
  kind = devices[0].device_kind
  peak = args.peak_tflops or peak_for(kind, args.dtype)
  views = pretrain_step.views_per_example(args)
  out = {
    "benchmark": "accelerator_step",
    **common.machine(),
    "platform": devices[0].platform,
    "device_kind": kind,
    "num_devices": len(devices),
    "step": args.step,
    "dtype": args.dtype,
    "backbone": args.backbone,
    "pairs_per_device": args.pairs,
    "out_size": args.out_size,
    "peak_tflops_per_device": peak,
    "scaling": [],
  }
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(devices)]
  flops_per_image = None
  for n in counts:
    step_args = argparse.Namespace(**vars(args))
    step_args.pairs = args.pairs * n
    info = {}
    run, flops, compile_s = pretrain_step.make_jax_step(step_args, devices=devices[:n], info=info)
    print(
      f"accelerator_step: {args.step} {args.backbone}, {n} device(s), "
      f"{step_args.pairs} pairs: compiled in {compile_s:.0f} s",
      file=sys.stderr,
      flush=True,
    )
    if n == 1:
      flops_per_image = flops / (views * args.pairs)  # images through the network
    for _ in range(args.warmup):
      run()
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      loss = run()
      times.append(time.perf_counter() - t)
    s = common.summary(times, views * step_args.pairs)
    row = {
      "devices": n,
      "global_pairs": step_args.pairs,
      "compile_s": round(compile_s, 1),
      "images_per_s": s["rate_at_median"],
      "images_per_s_min_max": s["rate_min_max"],
      "step_s_median": s["median_s"],
      "loss_last": loss,
      "model_flops_per_step": flops,
      **info,
    }
    if flops_per_image:
      achieved = flops_per_image * s["rate_at_median"]
      row["achieved_tflops"] = round(achieved / 1e12, 3)
      if peak:
        row["mfu"] = round(achieved / (peak * 1e12 * n), 4)
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row["peak_memory_gib_device0"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    if out["scaling"]:
      base = out["scaling"][0]["images_per_s"]
      row["scaling_efficiency"] = round(s["rate_at_median"] / (base * n), 3)
    out["scaling"].append(row)
  out["xla_flops_per_image"] = flops_per_image
  print(json.dumps(out))


if __name__ == "__main__":
  main()
