"""Probes behind docs/finetuning.md: one fine-tuning run, or the 2D error alone.

  # Fine-tune the demo recipe with overrides, evaluate both crops:
  python benchmarks/finetune_probe.py run --name heatmap_1k \
      model.head=heatmap loss.kp3d_weight=0.1 num_train_steps=1000
  # How fast does the training 2D error leave the per-batch mean?
  python benchmarks/finetune_probe.py uv --backbone resnet_tiny --size 128

`run` starts from `defaults.demo_config('demo')`'s fine-tuning config with
all labels (overrides are `key=value` on it, Python literals) and appends
{name, overrides, metrics per crop, seconds} to <workdir>/results.jsonl.
`uv` trains the heatmap model on the uv loss alone in a plain loop and
prints the training error every 100 steps next to the error of predicting
each batch's mean, optionally adding a heatmap cross-entropy term.
"""

import argparse
import ast
import copy
import json
import os
import time

import common  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peclr_jax import defaults, models
from peclr_jax.evaluation import evaluate_mode
from peclr_jax.hands import augment
from peclr_jax.inputs import datasets, input_pipeline
from peclr_jax.models import heads
from peclr_jax.train import finetune


def _recipe(data_dir):
  config = defaults.demo_config("demo", data_dir, labels=1.0)
  return config.finetune, config.evaluate


def run(args):
  ft, ev = _recipe(args.data_dir)
  for item in args.overrides:
    key, _, value = item.partition("=")
    node = ft
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value if isinstance(node[last], str) else ast.literal_eval(value)
  workdir = os.path.join(args.workdir, args.name)
  t0 = time.perf_counter()
  finetune.train_and_evaluate(ft, os.path.join(workdir, "finetune"))
  seconds = time.perf_counter() - t0
  metrics = {}
  for crop in ("ground_truth", "two_pass"):
    cfg = copy.deepcopy(ev)
    cfg.checkpoint = os.path.join(workdir, "finetune")
    cfg.crop = crop
    cfg.model.backbone = ft.model.backbone
    m = evaluate_mode.run(cfg, os.path.join(workdir, f"evaluate_{crop}"))
    metrics[crop] = {k: float(m[k]) for k in ("epe_cm", "pa_epe_cm")}
  row = {
    "name": args.name,
    "overrides": args.overrides,
    "metrics": metrics,
    "finetune_seconds": seconds,
  }
  print(json.dumps(row))
  with open(os.path.join(args.workdir, "results.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")


def _gaussian_cross_entropy(logits, uv, stride):
  """Cross-entropy of the softmax heatmaps against a Gaussian of one cell."""
  n, h, w, j = logits.shape
  centres = jnp.arange(h) * stride + (stride - 1) / 2
  gx = jnp.exp(-0.5 * ((centres[None, :, None] - uv[:, None, :, 0]) / stride) ** 2)
  gy = jnp.exp(-0.5 * ((centres[None, :, None] - uv[:, None, :, 1]) / stride) ** 2)
  target = gy[:, :, None, :] * gx[:, None, :, :]
  target = target / target.sum((1, 2), keepdims=True)
  log_p = jax.nn.log_softmax(logits.reshape(n, h * w, j), 1)
  return -jnp.mean(jnp.sum(target.reshape(n, h * w, j) * log_p, 1))


def uv_probe(args):
  ft, _ = _recipe(args.data_dir)
  ft.augment.rotation_range = args.rotation
  ft.augment.out_size = args.size
  aug = augment.AugmentConfig.from_config(ft.augment)
  sources = datasets.open_sources(ft.data, "train")
  it = input_pipeline.make_finetune_iterator(
    sources,
    global_batch=32,
    source_size=max(96, args.size * 3 // 2),
    seed=0,
    weights=None,
    labels_fraction=1.0,
    num_workers=0,
  )
  model = models.KeypointModel(args.backbone, rngs=nnx.Rngs(0), head="heatmap")
  opt = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  @jax.jit
  def step(state, batch, key):
    model, opt = nnx.merge(graphdef, state)

    def loss_fn(model):
      views, _, matrix = augment.augment_view(key, batch["image"], batch["keypoints_2d"], aug)
      target = finetune.keypoint_targets(batch["keypoints_3d"], matrix @ batch["K"])["kp2d"]
      head = model.keypoint_head
      logits, depth = head.maps(model.backbone.feature_maps(views))
      stride = head.stride
      uv = heads.integral_2p5d(logits, depth, stride)[..., :2]
      err = jnp.mean(jnp.abs(uv - target)) / args.size
      mean_err = jnp.mean(jnp.abs(target - target.mean(0))) / args.size
      ce = _gaussian_cross_entropy(logits, target, stride)
      return err + args.ce_weight * ce, (err, mean_err)

    (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), aux

  errs = []
  t0 = time.perf_counter()
  for i, host in zip(range(args.steps), it):
    batch = {k: jnp.asarray(host[k]) for k in ("image", "keypoints_2d", "keypoints_3d", "K")}
    state, aux = step(state, batch, jax.random.key(i))
    errs.append([float(a) for a in aux])
    if (i + 1) % 100 == 0:
      err, mean_err = np.mean(errs[-100:], axis=0)
      print(
        f"step {i + 1}: train uv error {err:.4f}, per-batch mean "
        f"{mean_err:.4f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
      )


def main():
  common.ensure_glibc_tunables()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data/tfds")
  sub = parser.add_subparsers(dest="probe", required=True)
  p = sub.add_parser("run")
  p.add_argument("--name", required=True)
  p.add_argument("--workdir", default="workdirs/finetune_probe")
  p.add_argument("overrides", nargs="*")
  p = sub.add_parser("uv")
  p.add_argument("--backbone", default="resnet_tiny")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--rotation", type=float, default=15.0)
  p.add_argument("--ce_weight", type=float, default=0.0)
  args = parser.parse_args()
  run(args) if args.probe == "run" else uv_probe(args)


if __name__ == "__main__":
  main()
