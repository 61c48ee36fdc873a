"""Fine-tuning of the 2.5D keypoint head and z-root refiner.

The backbone starts from a pre-training checkpoint (or converted PyTorch
weights) by a partial orbax restore of `state/model/backbone`, or from
scratch. Each step makes one geometric view per image on the device and
maps the labels with the same affine: 2D keypoints and K move with the image,
the 3D keypoints in the camera frame stay (the rays K_view^-1 [u, v, 1] still
point at them), so the 2.5D targets are recomputed from K_view.
With `freeze_backbone` only the heads learn (a probe of what the
pre-trained features hold); `pretrained_backbone_lr_scale` < 1 lets a
pre-trained backbone move more slowly than the freshly initialised heads.
"""

import functools
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from peclr_jax import models
from peclr_jax.evaluation import evaluate as evaluate_lib
from peclr_jax.hands import augment, geometry
from peclr_jax.train import checkpoints, losses, optim, sharding, training


class LossWeights(NamedTuple):
  uv: float
  zrel: float
  kp3d: float


def make_model(config, rngs: nnx.Rngs) -> models.KeypointModel:
  return models.KeypointModel(
    config.model.backbone,
    rngs=rngs,
    dtype=models.compute_dtype(config.model.dtype),
    uv_units=config.model.uv_units,
    head=config.model.head,
  )


def keypoint_targets(keypoints_3d, K):
  """2.5D targets with the palm as root.

  Args:
    keypoints_3d: [B, 21, 3] metres, AIT order, wrist root.
    K: [B, 3, 3] intrinsics of the network's input.

  Returns:
    {'kp2d' [B, 21, 2] px, 'zrel' [B, 21], 'kp3d' [B, 21, 3] bone units}.
  """
  palm = geometry.wrist_to_palm(keypoints_3d)
  uv, zrel, bone = geometry.xyz_to_uvd(palm, K)
  return {"kp2d": uv, "zrel": zrel, "kp3d": palm / bone[:, None, None]}


def keypoint_loss(model, batch, key, *, aug_cfg, weights: LossWeights):
  view, _, matrix = augment.augment_view(key, batch["image"], batch["keypoints_2d"], aug_cfg)
  k_view = matrix @ batch["K"]
  target = keypoint_targets(batch["keypoints_3d"], k_view)
  pred = model(view, k_view)
  terms = losses.keypoint_losses(
    pred, target, batch["valid"], crop_size=aug_cfg.out_size, weights=weights._asdict()
  )
  return terms["loss"], {
    "train_loss": terms["loss"],
    "train_loss_uv": terms["loss_uv"],
    "train_loss_zrel": terms["loss_zrel"],
    "train_loss_kp3d": terms["loss_kp3d"],
  }


@functools.partial(jax.jit, static_argnums=(0, 3))
def _predict_ground_truth_crop(graphdef, state, batch, out_size):
  """Metric 3D keypoints (wrist root) from evaluate mode's ground-truth crop."""
  model = nnx.merge(graphdef, state)
  model.eval()
  images = evaluate_lib.warp_and_normalise(batch["image"], batch["matrix"], out_size)
  pred = model(images, batch["matrix"] @ batch["K"])
  # Bone units, palm root -> metres, wrist root (the labels' frame).
  return geometry.palm_to_wrist(pred["kp3d"]) * batch["scale"][:, None, None]


def make_evaluator(config, mesh, sources, out_size: int, *, max_batches=-1):
  """evaluate(model, step) -> eval_* FreiHAND metrics over the split, on
  evaluate mode's ground-truth crop (its two-pass protocol is not run here)."""
  # The data modules (grain) only when a run reads data: the step alone
  # imports without them (benchmarks/accelerator_suite.sh).
  from peclr_jax.inputs import input_pipeline  # pylint: disable=g-import-not-at-top

  def evaluate(model, step):
    del step
    graphdef, state = nnx.split(model)
    acc = evaluate_lib.KeypointMetricsAccumulator()
    for _, source in sources:
      # The whole image, as evaluate mode reads it.
      it = input_pipeline.make_eval_iterator(
        source, global_batch=config.batch_size, source_size=config.data.source_size, crop="none"
      )
      with jax.set_mesh(mesh):
        for i, host_batch in enumerate(it):
          if 0 <= max_batches <= i:
            break
          matrix = evaluate_lib.ground_truth_matrix(host_batch["keypoints_2d"], out_size).astype(
            np.float32
          )
          batch = sharding.shard_batch(
            {"matrix": matrix, **{k: host_batch[k] for k in ("image", "K", "scale")}}, mesh
          )
          kp3d = np.asarray(_predict_ground_truth_crop(graphdef, state, batch, out_size))
          acc.update(
            kp3d, host_batch["keypoints_3d"], mask=host_batch["mask"] & host_batch["valid"].all(-1)
          )
    result = acc.result()
    return {f"eval_{k}": v for k, v in evaluate_lib.summary(result).items()}

  return evaluate


def init_backbone_from_checkpoint(model: models.KeypointModel, path: str, backbone: str):
  """Partial restore of state/model/backbone from a pre-training checkpoint
  or converted PyTorch weights; nothing else in the checkpoint is read."""
  meta = checkpoints.read_meta(path)
  checkpoints.check_meta(meta, {"backbone": backbone}, path)
  checkpoints.restore_module(path, model.backbone, subtree=("model", "backbone"))
  print(f"Initialised the backbone from {path} ({meta.get('kind')}).", flush=True)


def _in_backbone(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "backbone", params)


def freeze_backbone(
  model: models.KeypointModel, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """Probes the backbone instead of training it: its BatchNorms switch to
  their (pre-trained) running averages and its parameters get zero updates,
  so only the keypoint head and the z-root refiner learn."""
  model.backbone.eval()
  return optax.chain(tx, optax.masked(optax.set_to_zero(), _in_backbone))


def scale_backbone_updates(
  tx: optax.GradientTransformation, scale: float
) -> optax.GradientTransformation:
  """The backbone's updates times `scale`: with Adam, its learning rate
  times `scale` at every step of the schedule, the heads' unchanged."""
  return optax.chain(tx, optax.masked(optax.scale(scale), _in_backbone))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Fine-tunes (or resumes) in `workdir`; returns (model, last metrics)."""
  from peclr_jax.inputs import datasets, input_pipeline

  mesh = sharding.make_mesh()
  sharding.check_batch_divisible(config.batch_size, mesh)
  sources = datasets.open_sources(
    config.data, config.data.train_split, precropped=config.data.precropped
  )
  train_iter = input_pipeline.make_finetune_iterator(
    sources,
    global_batch=config.batch_size,
    source_size=config.data.source_size,
    seed=config.seed,
    weights=config.data.weights,
    labels_fraction=config.data.labels_fraction,
    num_workers=config.data.num_workers,
  )
  num_examples = sum(len(s) for _, s in sources)
  num_examples = max(int(num_examples * config.data.labels_fraction), 1)
  tx, steps, _ = optim.optimizer_for(config, num_examples)

  model = make_model(config, nnx.Rngs(config.seed))
  if config.init:
    init_backbone_from_checkpoint(model, config.init, config.model.backbone)
  backbone_note = ""
  if config.freeze_backbone:
    tx = freeze_backbone(model, tx)
    backbone_note = ", backbone frozen"
  elif config.init and config.pretrained_backbone_lr_scale != 1:
    tx = scale_backbone_updates(tx, config.pretrained_backbone_lr_scale)
    backbone_note = f", backbone at {config.pretrained_backbone_lr_scale:g}x the learning rate"

  aug_cfg = augment.AugmentConfig.from_config(config.augment)
  weights = LossWeights(config.loss.uv_weight, config.loss.zrel_weight, config.loss.kp3d_weight)
  loss_fn = functools.partial(keypoint_loss, aug_cfg=aug_cfg, weights=weights)
  eval_sources = datasets.open_sources(config.data, config.data.eval_split, missing_ok=True)
  evaluator = None
  if eval_sources:
    evaluator = make_evaluator(
      config, mesh, eval_sources, aug_cfg.out_size, max_batches=config.eval_batches
    )
  meta = {
    "kind": "finetune",
    "backbone": config.model.backbone,
    "uv_units": model.uv_units,
    "head": config.model.head,
    "input_size": aug_cfg.out_size,
  }
  print(
    f"Fine-tuning {config.model.backbone} "
    f"({'from ' + config.init if config.init else 'from scratch'}) on "
    f"{[n for n, _ in sources]} ({num_examples} labelled images{backbone_note}): "
    f"{steps} steps of {config.batch_size}.",
    flush=True,
  )
  return training.fit(
    config,
    workdir,
    mesh=mesh,
    model=model,
    tx=tx,
    train_iter=train_iter,
    loss_fn=loss_fn,
    num_steps=steps,
    meta=meta,
    evaluate=evaluator,
    best_metric=("eval_pa_epe_cm", "min"),
    desc="finetune",
  )
