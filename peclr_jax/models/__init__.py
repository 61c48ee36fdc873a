"""PeCLR models: ResNet backbones, projection / keypoint heads, full models.

Train/eval mode (flax 0.12 NNX): every BatchNorm is created in train mode
(batch statistics, running averages updated). ``model.eval()`` switches all
nested BatchNorms to their running averages, ``model.train()`` switches back;
both mutate the module in place (``nnx.Module.set_attributes`` on
``use_running_average``). ``nnx.view(model, use_running_average=True)`` returns
an eval-mode view sharing the same arrays without changing ``model``.

Dtypes: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16`` on
accelerators, or its name as a string); parameters and BatchNorm statistics are
float32 and model outputs are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peclr_jax.hands import geometry
from peclr_jax.models.heads import HeatmapHead, KeypointHead, ProjectionHead, ZRootRefiner
from peclr_jax.models.resnet import BACKBONES, BasicBlock, Bottleneck, ResNet, get_backbone

__all__ = [
  "BACKBONES",
  "BasicBlock",
  "Bottleneck",
  "ResNet",
  "get_backbone",
  "ProjectionHead",
  "KeypointHead",
  "HeatmapHead",
  "ZRootRefiner",
  "PeCLRModel",
  "KEYPOINT_HEADS",
  "KeypointModel",
  "default_intrinsics",
  "compute_dtype",
]

# Default camera of the public fine-tuned model, for a 224 x 224 crop.
_DEFAULT_FX = 388.9018310596544
_DEFAULT_FY = 388.71231836584275
_DEFAULT_SIZE = 224.0


def default_intrinsics(height: int, width: int | None = None) -> jax.Array:
  """Public code's default K (224 px crop) scaled to an H x W input.

  Args:
    height: input height in pixels.
    width: input width (defaults to ``height``).

  Returns:
    [3, 3] float32 intrinsics: fx=388.90, fy=388.71, cx=cy=112 at 224 px,
    every entry of the first two rows scaled by size / 224.
  """
  width = height if width is None else width
  sx, sy = width / _DEFAULT_SIZE, height / _DEFAULT_SIZE
  half = _DEFAULT_SIZE / 2
  return jnp.array(
    [[_DEFAULT_FX * sx, 0.0, half * sx], [0.0, _DEFAULT_FY * sy, half * sy], [0.0, 0.0, 1.0]],
    jnp.float32,
  )


def compute_dtype(name: str):
  """The jnp compute dtype named by config.model.dtype."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(
      f"config.model.dtype={name!r}; expected float32, bfloat16 or float16"
    ) from None


class PeCLRModel(nnx.Module):
  """Backbone + projection head for contrastive pre-training."""

  def __init__(
    self,
    backbone_name: str,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    proj_hidden: int = 512,
    proj_dim: int = 128,
  ):
    """Builds the model.

    Args:
      backbone_name: a name accepted by ``get_backbone``.
      rngs: parameter RNGs.
      dtype: compute dtype.
      proj_hidden: hidden width of the projection MLP.
      proj_dim: output width of the projection MLP.
    """
    dtype = jnp.dtype(dtype)
    self.backbone = get_backbone(backbone_name, rngs=rngs, dtype=dtype)
    self.projection = ProjectionHead(
      self.backbone.num_features, proj_hidden, proj_dim, rngs=rngs, dtype=dtype
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] normalised images -> [N, proj_dim] float32 projections."""
    return self.projection(self.backbone(images))


#: 'linear': the paper's Linear on pooled features; 'heatmap': integral
#: regression over 2.5D heatmaps upsampled from the last feature map
#: (``HeatmapHead``); 'heatmap_skip': the same with skip connections from the
#: earlier stages.
KEYPOINT_HEADS = ("linear", "heatmap", "heatmap_skip")


class KeypointModel(nnx.Module):
  """2.5D keypoint model (Iqbal et al. 2018) with z-root refinement.

  Outputs use the palm as root (joint 0, AIT order) and the reference bone
  (AIT 3 -> 8) as the unit of depth and of ``kp3d``.
  """

  def __init__(
    self,
    backbone_name: str,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    uv_units: str = "normalized",
    head: str = "linear",
  ):
    """Builds the model.

    Args:
      backbone_name: a name accepted by ``get_backbone``.
      rngs: parameter RNGs.
      dtype: compute dtype of the backbone; the heads run in float32.
      uv_units: 'normalized': raw head outputs r map to pixels as
        (r + 1) * S / 2 (targets O(1) when training from scratch);
        'pixels': raw outputs are pixels (the released PyTorch weights).
        The heatmap heads always give pixels.
      head: one of ``KEYPOINT_HEADS``.
    """
    if uv_units not in ("normalized", "pixels"):
      raise ValueError(f"uv_units={uv_units!r}")
    if head not in KEYPOINT_HEADS:
      raise ValueError(f"head={head!r}; expected one of {KEYPOINT_HEADS}")
    self.uv_units = "pixels" if head.startswith("heatmap") else uv_units
    self.head = head
    self.backbone = get_backbone(backbone_name, rngs=rngs, dtype=jnp.dtype(dtype))
    if head.startswith("heatmap"):
      skips = self.backbone.stage_features if head == "heatmap_skip" else ()
      self.keypoint_head = HeatmapHead(
        self.backbone.num_features, skip_features=skips, rngs=rngs, dtype=jnp.dtype(dtype)
      )
    else:
      self.keypoint_head = KeypointHead(self.backbone.num_features, rngs=rngs)
    self.zroot_refiner = ZRootRefiner(rngs=rngs)

  def __call__(self, images: jax.Array, K: jax.Array | None = None) -> dict[str, jax.Array]:
    """Predicts 2.5D and 3D keypoints.

    Args:
      images: [N, S, S, 3] normalised images.
      K: [N, 3, 3] intrinsics of the input crop, or None for
        ``default_intrinsics(S)``.

    Returns:
      Dict of float32 arrays:
        kp2d: [N, 21, 2] (u, v) pixels of the input.
        zrel: [N, 21] relative depth in bone units, root (joint 0) = 0.
        zroot: [N] refined scale-normalised root depth.
        kp3d: [N, 21, 3] K^-1 [u, v, 1] * (zrel + zroot), bone units.
    """
    n, h, w = images.shape[:3]
    if K is None:
      K = jnp.broadcast_to(default_intrinsics(h, w), (n, 3, 3))
    K = jnp.asarray(K, jnp.float32)
    if self.head.startswith("heatmap"):
      raw = self.keypoint_head(self.backbone.feature_maps(images))
    else:
      raw = self.keypoint_head(self.backbone(images))  # [N, 21, 3]
    uv = raw[..., :2]
    if self.uv_units == "normalized":
      uv = (uv + 1.0) * jnp.array([w, h], jnp.float32) / 2.0
    zrel = raw[..., 2].at[:, 0].set(0.0)
    zroot = self.zroot_refiner(uv, zrel, K)
    rays = geometry.unproject(uv, jnp.ones_like(zrel), K)
    kp3d = rays * (zrel + zroot[:, None])[..., None]
    return {"kp2d": uv, "zrel": zrel, "zroot": zroot, "kp3d": kp3d}
