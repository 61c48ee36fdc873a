"""Contrastive pre-training: PeCLR (equivariant) or SimCLR (invariant).

One jitted step: two augmented views per image made on the device ->
backbone + projection head on all 2B views at once (BatchNorm sees both) ->
`peclr_loss` (latent inversion + NT-Xent) or plain `nt_xent` -> update.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from peclr_jax import models
from peclr_jax.hands import augment
from peclr_jax.train import checkpoints, losses, optim, sharding, training


class LossSettings(NamedTuple):
  """The loss part of the config, hashable so jit can treat it as static."""

  kind: str
  temperature: float
  invert: tuple[str, ...]
  translation_mode: str

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> "LossSettings":
    if loss.kind not in ("peclr", "simclr"):
      raise ValueError(f"config.loss.kind={loss.kind!r}; expected 'peclr' or 'simclr'")
    return cls(loss.kind, float(loss.temperature), tuple(loss.invert), loss.translation_mode)


def make_model(config, rngs: nnx.Rngs) -> models.PeCLRModel:
  return models.PeCLRModel(
    config.model.backbone,
    rngs=rngs,
    dtype=models.compute_dtype(config.model.dtype),
    proj_hidden=config.model.proj_hidden,
    proj_dim=config.model.proj_dim,
  )


def restore_encoder(config, path: str) -> models.PeCLRModel:
  """The PeCLRModel of `config` with the weights of the pre-training
  checkpoint (workdir) at `path`."""
  model = make_model(config, nnx.Rngs(config.seed))
  checkpoints.restore_module(path, model)
  return model


def contrastive_loss(model, batch, key, *, aug_cfg, loss_cfg):
  """Augment on the device, embed both views, compare. Returns (loss, aux)."""
  (v1, v2), (t1, t2), _ = augment.augment_pair(key, batch["image"], batch["keypoints_2d"], aug_cfg)
  z = model(jnp.concatenate([v1, v2], axis=0)).astype(jnp.float32)
  z1, z2 = jnp.split(z, 2, axis=0)
  if loss_cfg.kind == "peclr":
    z1, z2 = losses.peclr_latents(
      z1, z2, t1, t2, invert=loss_cfg.invert, translation_mode=loss_cfg.translation_mode
    )
  else:  # SimCLR: invariant, nothing undone.
    normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    z1, z2 = normalise(z1), normalise(z2)
  loss = losses.nt_xent(z1, z2, temperature=loss_cfg.temperature)
  metrics = losses.contrastive_metrics(z1, z2)
  return loss, {"train_loss": loss, **{f"train_{k}": v for k, v in metrics.items()}}


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _eval_loss(graphdef, state, batch, key, aug_cfg, loss_cfg):
  model = nnx.merge(graphdef, state)
  model.eval()
  return contrastive_loss(model, batch, key, aug_cfg=aug_cfg, loss_cfg=loss_cfg)[0]


def _validation(config, mesh, aug_cfg, loss_cfg):
  """Returns evaluate(model, step) -> {'eval_loss'}: the contrastive loss in
  eval mode over fixed batches of the validation split, with fixed views."""
  # The data modules (grain) only when a run reads data: the step alone
  # imports without them (benchmarks/accelerator_suite.sh).
  from peclr_jax.inputs import datasets, input_pipeline

  sources = datasets.open_sources(config.data, config.data.eval_split, missing_ok=True)
  if not sources or config.eval_every_steps <= 0:
    return None

  def evaluate(model, step):
    del step
    graphdef, state = nnx.split(model)
    it = input_pipeline.make_pretrain_iterator(
      sources,
      global_batch=config.batch_size,
      source_size=config.data.source_size,
      seed=config.seed,
      weights=config.data.weights,
      num_workers=0,
    )
    values = []
    with jax.set_mesh(mesh):
      for i in range(config.eval_batches):
        batch = sharding.shard_batch(next(it), mesh)
        values.append(
          float(_eval_loss(graphdef, state, batch, jax.random.key(i), aug_cfg, loss_cfg))
        )
    return {"eval_loss": float(np.mean(values))}

  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Pre-trains (or resumes) in `workdir`; returns (model, last metrics)."""
  from peclr_jax.inputs import datasets, input_pipeline

  mesh = sharding.make_mesh()
  sharding.check_batch_divisible(config.batch_size, mesh)
  sources = datasets.open_sources(
    config.data, config.data.train_split, precropped=config.data.precropped
  )
  num_examples = sum(len(s) for _, s in sources)
  tx, steps, updates = optim.optimizer_for(config, num_examples)

  model = make_model(config, nnx.Rngs(config.seed))
  train_iter = input_pipeline.make_pretrain_iterator(
    sources,
    global_batch=config.batch_size,
    source_size=config.data.source_size,
    seed=config.seed,
    weights=config.data.weights,
    num_workers=config.data.num_workers,
  )

  aug_cfg = augment.AugmentConfig.from_config(config.augment)
  loss_cfg = LossSettings.from_config(config.loss)
  loss_fn = functools.partial(contrastive_loss, aug_cfg=aug_cfg, loss_cfg=loss_cfg)
  meta = {"kind": "pretrain", "backbone": config.model.backbone, "proj_dim": config.model.proj_dim}
  print(
    f"Pre-training {config.model.backbone} with {loss_cfg.kind} on "
    f"{[n for n, _ in sources]} ({num_examples} images): {steps} steps of "
    f"{config.batch_size} images, {updates} updates, "
    f"{mesh.devices.size} device(s).",
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
    evaluate=_validation(config, mesh, aug_cfg, loss_cfg),
    desc="pretrain",
  )
