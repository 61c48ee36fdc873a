"""Pre-training step images/s: peclr_jax against the PyTorch reference; JSON.

The JAX side is the real step: `training.make_train_step` with
`pretrain.contrastive_loss` (on-device two-view augmentation of uint8 224 px
source crops, ResNet + projection head on both views, latent inversion,
NT-Xent) and `optim.make_optimizer` (Adam + LARS trust ratio, weight decay,
warm-up/cosine schedule), the state donated, the host batch sharded onto the
'data' mesh every step as `training.fit` does. The reference is
`torch_reference.TorchStep` (the public hybrid2 step; its views arrive
pre-augmented, as from the public data loader's workers). Both update the
weights every step (no gradient accumulation).

The two steps ("jax", the package as it is, and "torch") alternate in one
process, round by round, in rotating order, after warm-up; "images" are views
through the network (2 per pair).

  .venv/bin/python benchmarks/pretrain_step.py --pairs 16 --dtype float32 \
      --rounds 9 --wait_idle
  # Work per image (CPU time) on one core, robust to other users' load:
  .venv/bin/python benchmarks/pretrain_step.py --pairs 16 --one_core
  # An XLA flag on the JAX side alone (here: Eigen instead of YNNPACK):
  .venv/bin/python benchmarks/pretrain_step.py --pairs 16 --no_torch \
      --xla_flags=--xla_cpu_experimental_ynn_fusion_type=
  # The PyTorch reference alone on a GPU, bf16 autocast, torch.compiled
  # (benchmarks/accelerator_suite.py runs this):
  python benchmarks/pretrain_step.py --no_jax --pairs 128 --dtype bfloat16 \
      --torch_device cuda --torch_compile inductor --settle_s 0

GLIBC_TUNABLES is set for the whole process (the script re-executes itself,
unless GLIBC_TUNABLES was set already).
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def add_step_arguments(ap, *, pairs: int, dtype: str, pairs_help: str):
  """The arguments `make_jax_step` reads (shared with accelerator_step.py)."""
  ap.add_argument(
    "--step",
    default="pretrain",
    choices=["pretrain", "finetune"],
    help="finetune: the 2.5D keypoint step, one view per image "
    "(--pairs images per step; its recipe's --out_size is 224)",
  )
  ap.add_argument("--pairs", type=int, default=pairs, help=pairs_help)
  ap.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])
  ap.add_argument("--backbone", default="resnet50")
  ap.add_argument("--out_size", type=int, default=128)
  ap.add_argument("--source_size", type=int, default=224)


def views_per_example(args) -> int:
  """Images through the network per batch element (2 views when pre-training)."""
  return 2 if args.step == "pretrain" else 1


def parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_arguments(
    ap, pairs=16, dtype="float32", pairs_help="images per step (each gives 2 views)"
  )
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--no_jax", action="store_true")
  ap.add_argument("--torch_device", default="cpu", help="e.g. cuda")
  ap.add_argument(
    "--torch_compile",
    default="",
    help="torch.compile the model with this backend (inductor, aot_eager, ...); empty: eager",
  )
  ap.add_argument("--torch_channels_last", action="store_true")
  ap.add_argument(
    "--max_load",
    type=float,
    default=0.0,
    help="wait (<= 5 min) for the 1-min load to drop below this first",
  )
  ap.add_argument(
    "--wait_idle", action="store_true", help="wait (<= 10 min) for a quiet 5 s window before timing"
  )
  ap.add_argument(
    "--one_core",
    action="store_true",
    help="pin to core 0, XLA and torch single-threaded: compares "
    "work per image (CPU time), robust to other users' load",
  )
  ap.add_argument(
    "--clean",
    type=float,
    default=0.1,
    help="a step is 'clean' when other processes used less than "
    "this fraction of the machine's CPU during it",
  )
  ap.add_argument(
    "--settle_s",
    type=float,
    default=1.0,
    help="pause before each timed step: the other side's worker "
    "threads (torch's OpenMP, XLA's pool) spin-wait for a "
    "while after their step and would slow the next one",
  )
  args = ap.parse_args()
  if args.step == "finetune" and not args.no_torch:
    ap.error("--step finetune has no PyTorch reference: add --no_torch")
  return args


def make_jax_step(args, devices=None, info=None):
  """(run_one_step() -> loss, model flops per step, compile seconds).

  args.step picks the pre-training step (two views per image) or the
  fine-tuning step (one view, 2.5D keypoint losses). Model flops are XLA's
  count of the step as traced, before the compiler rewrites it (the same on
  every platform, whatever the compiler fuses, recomputes or hands to a
  library).
  `devices`: the mesh's devices (default all); the global batch is
  args.pairs. `info`, a dict, receives the compiled memory analysis and the
  compiled executable's flop count.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from peclr_jax import defaults  # pylint: disable=g-import-not-at-top  # pylint: disable=g-import-not-at-top
  from peclr_jax.hands import augment  # pylint: disable=g-import-not-at-top  # pylint: disable=g-import-not-at-top
  from peclr_jax.train import finetune, optim, pretrain, sharding, training  # pylint: disable=g-import-not-at-top  # pylint: disable=g-import-not-at-top

  finetuning = args.step == "finetune"
  cfg = defaults.finetune_config() if finetuning else defaults.pretrain_config()
  cfg.model.dtype = args.dtype
  cfg.model.backbone = args.backbone
  cfg.augment.out_size = args.out_size
  aug_cfg = augment.AugmentConfig.from_config(cfg.augment)
  if finetuning:
    model = finetune.make_model(cfg, nnx.Rngs(cfg.seed))
    loss_fn = functools.partial(
      finetune.keypoint_loss,
      aug_cfg=aug_cfg,
      weights=finetune.LossWeights(cfg.loss.uv_weight, cfg.loss.zrel_weight, cfg.loss.kp3d_weight),
    )
  else:
    model = pretrain.make_model(cfg, nnx.Rngs(cfg.seed))
    loss_fn = functools.partial(
      pretrain.contrastive_loss,
      aug_cfg=aug_cfg,
      loss_cfg=pretrain.LossSettings.from_config(cfg.loss),
    )
  tx = optim.make_optimizer(
    cfg.optim, effective_batch=2048, total_updates=100_000, warmup_updates=1000, grad_accum_steps=1
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  mesh = sharding.make_mesh(devices)
  state = sharding.replicate(state, mesh)
  rng = sharding.replicate(jax.random.key(cfg.seed), mesh)
  train_step = training.make_train_step(graphdef, loss_fn)

  r = np.random.default_rng(0)
  b, s = args.pairs, args.source_size
  host_batch = {
    "image": r.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
    # A hand filling about half of the crop, as the input pipeline makes it.
    "keypoints_2d": (s / 2 + r.uniform(-s / 4, s / 4, (b, 21, 2))).astype(np.float32),
  }
  if finetuning:
    # A hand 10 cm across at 60 cm, and its 2D keypoints projected through
    # FreiHAND's intrinsics, so the 2.5D targets are finite and consistent.
    f = 388.9 * s / 224
    xyz = np.concatenate(
      [r.uniform(-0.05, 0.05, (b, 21, 2)), r.uniform(0.57, 0.63, (b, 21, 1))], -1
    )
    host_batch.update(
      keypoints_3d=xyz.astype(np.float32),
      keypoints_2d=(f * xyz[..., :2] / xyz[..., 2:] + s / 2).astype(np.float32),
      K=np.tile(np.array([[f, 0, s / 2], [0, f, s / 2], [0, 0, 1]], np.float32), (b, 1, 1)),
      valid=np.ones((b, 21), bool),
    )
  with jax.set_mesh(mesh):
    batch = sharding.shard_batch(host_batch, mesh)
    t = time.perf_counter()
    lowered = train_step.lower(state, batch, rng, jnp.int32(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
  flops = _flops(lowered.cost_analysis())
  if info is not None:
    info["xla_flops_per_step_compiled"] = _flops(compiled.cost_analysis())
    mem = compiled.memory_analysis()
    for k in (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
    ):
      if mem is not None and hasattr(mem, k):
        info[k] = int(getattr(mem, k))
  holder = {"state": state, "step": 0}

  def run():
    with jax.set_mesh(mesh):
      holder["step"] += 1
      batch = sharding.shard_batch(host_batch, mesh)
      # The AOT-compiled executable, the one timed and cost-analysed above:
      # `lower().compile()` need not fill the jitted function's dispatch
      # cache, so calling `train_step` could trace and compile it again.
      holder["state"], metrics = compiled(holder["state"], batch, rng, jnp.int32(holder["step"]))
      return float(jax.device_get(metrics["train_loss"]))

  return run, flops, compile_s


def _flops(cost) -> float:
  """The 'flops' entry of a cost analysis (older jax: a list of one dict)."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def make_torch_step(args):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  if args.one_core:
    torch.set_num_threads(1)
  step = torch_reference.TorchStep(
    args.backbone,
    args.dtype,
    channels_last=args.torch_channels_last,
    device=args.torch_device,
    compile_backend=args.torch_compile,
  )
  views = torch_reference.random_views(args.pairs, args.out_size, device=args.torch_device)
  return (lambda: step.step(*views)), torch.get_num_threads()


def main():
  common.ensure_glibc_tunables()
  args = parse()
  if args.one_core:
    common.pin_to_one_core(0)
  common.set_xla_flags(args.xla_flags, single_thread=args.one_core)
  if args.max_load:
    common.wait_for_quiet(args.max_load)
  per = views_per_example(args) * args.pairs
  out = {
    "benchmark": "pretrain_step",
    "step": args.step,
    "one_core": args.one_core,
    "pairs": args.pairs,
    "images_per_step": per,
    "dtype": args.dtype,
    "backbone": args.backbone,
    "out_size": args.out_size,
    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
  }
  runners = {}
  flops = 0.0
  if not args.no_jax:
    runners["jax"], flops, compile_s = make_jax_step(args)
    out["jax_compile_s"] = round(compile_s, 1)
    out["model_flops_per_step"] = flops
  if not args.no_torch:
    runners["torch"], out["torch_threads"] = make_torch_step(args)
    out["torch_device"] = args.torch_device
    out["torch_compile"] = args.torch_compile
  names = list(runners)
  losses = {n: [] for n in names}
  first_s = {}
  for n in names:  # warm-up (the first call's dispatch caches, torch.compile)
    for i in range(args.warmup):
      t = time.perf_counter()
      losses[n].append(runners[n]())
      if i == 0:
        first_s[n] = time.perf_counter() - t
  times = {n: [] for n in names}
  cpu = {n: [] for n in names}
  others = {n: [] for n in names}
  loads = [os.getloadavg()[0]]
  if args.wait_idle:
    out["idle_before_start"] = common.wait_for_idle()
  for r in range(args.rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    for n in order:
      time.sleep(args.settle_s)
      with common.Interference() as probe:
        losses[n].append(runners[n]())
      times[n].append(probe.wall)
      cpu[n].append(probe.cpu)
      others[n].append(probe.others_frac)
    loads.append(os.getloadavg()[0])
  out.update(common.machine())
  out["loadavg_during"] = [round(x, 2) for x in loads]
  for n in names:
    s = common.summary(times[n], per)
    out[n] = {
      "images_per_s": s["rate_at_median"],
      "first_step_s": round(first_s[n], 2) if n in first_s else None,
      "images_per_s_min_max": s["rate_min_max"],
      "step_s": s,
      "losses_first_last": [losses[n][0], losses[n][-1]],
      # CPU seconds of this process per step (all threads, spin-waits
      # included): less sensitive than wall time to other users' load.
      "cpu_s_per_step_median": round(statistics.median(cpu[n]), 3),
      "images_per_cpu_s": round(per / statistics.median(cpu[n]), 2),
      "others_cpu_frac_per_step": [round(v, 2) for v in others[n]],
    }
    clean = [t for t, o in zip(times[n], others[n]) if o < args.clean]
    if clean:
      out[n]["clean_steps"] = len(clean)
      out[n]["images_per_s_clean_median"] = round(per / statistics.median(clean), 2)
    if flops:
      out[n]["gflops_per_s_at_median"] = round(flops / s["median_s"] / 1e9, 1)
  if "torch" in runners and args.torch_device.startswith("cuda"):
    import torch  # pylint: disable=g-import-not-at-top

    out["torch"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
  if len(runners) == 2:
    # Per-round ratios pair each JAX step with the torch step of the same
    # round, so load that comes and goes hits both sides alike.
    per_round = [tt / tj for tj, tt in zip(times["jax"], times["torch"])]
    ratio = out["ratio jax / torch"] = {
      "at_medians": round(statistics.median(times["torch"]) / statistics.median(times["jax"]), 3),
      "median_of_rounds": round(statistics.median(per_round), 3),
      "min_max_of_rounds": [round(min(per_round), 3), round(max(per_round), 3)],
      "at_median_cpu_s": round(statistics.median(cpu["torch"]) / statistics.median(cpu["jax"]), 3),
    }
    both = [
      tt / tj
      for tj, tt, oj, ot in zip(times["jax"], times["torch"], others["jax"], others["torch"])
      if oj < args.clean and ot < args.clean
    ]
    if both:
      ratio["clean_rounds"] = len(both)
      ratio["median_of_clean_rounds"] = round(statistics.median(both), 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
