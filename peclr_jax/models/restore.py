"""A keypoint model restored from a checkpoint, as its metadata describes it.

Fine-tuning workdirs and converted PyTorch weights (kind 'finetune' or
'keypoint') store the architecture, head, uv units and input size in their
meta; evaluation, the Predictor and the notebooks all rebuild the model from
it here. Kept out of ``peclr_jax.models``' namespace so that building models
does not import orbax::

    from peclr_jax.models import restore
    model, input_size, meta, path = restore.keypoint_model("workdirs/ft_rn50")
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from peclr_jax import models
from peclr_jax.train import checkpoints

KEYPOINT_KINDS = ("finetune", "keypoint")
# Crop side of keypoint checkpoints whose meta has no 'input_size' (written
# before the field existed): the released models' 224 px.
LEGACY_INPUT_SIZE = 224


class RestoredKeypointModel(NamedTuple):
  """What :func:`keypoint_model` returns.

  Attributes:
      model: the KeypointModel, in eval mode, weights on the default device.
      input_size: side S of its square input crop in pixels.
      meta: the checkpoint's metadata, as stored.
      path: absolute path of the directory actually read.
  """

  model: models.KeypointModel
  input_size: int
  meta: dict[str, Any]
  path: str


def prefer_best(path: str) -> str:
  """`<path>/best` when it holds a finished step (fine-tuning workdirs), else path."""
  best = os.path.join(os.fspath(path), "best")
  if os.path.isdir(best):
    try:
      checkpoints.find_step(best)
      return best
    except checkpoints.CheckpointError:
      pass
  return os.fspath(path)


def keypoint_model(path: str, *, dtype=jnp.float32) -> RestoredKeypointModel:
  """Rebuilds and restores the keypoint model of a checkpoint.

  Args:
      path: a fine-tuning workdir (its ``best/`` when it holds a step, else
          its latest checkpoint), a checkpoints directory, or a step
          directory. The meta must have kind 'finetune' or 'keypoint'.
      dtype: compute dtype of the backbone (bfloat16 on accelerators).

  Returns:
      RestoredKeypointModel (model, input_size, meta, path).

  Raises:
      peclr_jax.train.checkpoints.CheckpointError: no checkpoint, or one of
          another kind (e.g. a pre-training checkpoint).
  """
  path = prefer_best(path)
  meta = checkpoints.read_meta(path)
  if meta.get("kind") not in KEYPOINT_KINDS:
    raise checkpoints.CheckpointError(
      f"{path} holds a {meta.get('kind')!r} checkpoint; a keypoint model "
      f"(kind in {KEYPOINT_KINDS}) is needed: fine-tune one first"
    )
  # Meta without the field: converted weights are the released models (pixels).
  uv_units = meta.get("uv_units") or ("pixels" if meta["kind"] == "keypoint" else "normalized")
  # Abstract build (no random init of a ResNet-152), then real arrays.
  model = nnx.eval_shape(
    lambda: models.KeypointModel(
      meta["backbone"],
      rngs=nnx.Rngs(0),
      dtype=dtype,
      uv_units=uv_units,
      head=meta.get("head", "linear"),
    )
  )
  checkpoints.restore_module(path, model)
  # restore_module leaves host NumPy arrays; put them on the device once
  # rather than transferring the weights at every model call.
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
  model.eval()
  return RestoredKeypointModel(
    model, int(meta.get("input_size") or LEGACY_INPUT_SIZE), dict(meta), os.path.abspath(path)
  )
