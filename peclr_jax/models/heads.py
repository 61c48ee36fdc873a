"""Heads on top of the pooled backbone features.

* ``ProjectionHead``: the PeCLR/SimCLR projection MLP.
* ``KeypointHead``: one Linear to the 2.5D representation (u, v, z_rel) x 21.
* ``HeatmapHead``: the same representation by integral regression over
  upsampled 2.5D heatmaps (a config choice; the paper uses the linear head).
* ``ZRootRefiner``: closed-form scale-normalised root depth from the
  reference bone (Iqbal et al. 2018, eq. 6-7), gradient stopped, clamped to
  [4, 50], then refined by a small MLP (docs/method.md#root-depth).

Linear layers use torch's default ``nn.Linear`` initialisation, so training
from scratch behaves like the public PyTorch code. BatchNorm layers start in
train mode; ``model.eval()`` / ``model.train()`` switch them (see resnet.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peclr_jax.hands import geometry, joints
from peclr_jax.models import resnet
from peclr_jax.models.resnet import conv_init

# Clamp range of the closed-form root depth (bone units), as the public code.
ZROOT_MIN, ZROOT_MAX = 4.0, 50.0

# torch nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# variance_scaling(1/3, fan_in, uniform) has bound sqrt(3 * (1/3) / fan_in).
_torch_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class _UniformInit:
  """U(-bound, bound) initialiser; a value-comparable object (not a closure)
  so that two identically built models have equal graphdefs (jit cache hits).
  """

  bound: float

  def __call__(self, key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -self.bound, self.bound)


def _linear(
  in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32
) -> nnx.Linear:
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_torch_linear_kernel_init,
    bias_init=_UniformInit(1.0 / in_features**0.5),
    rngs=rngs,
  )


class ProjectionHead(nnx.Module):
  """Linear(in->hidden, bias) -> BatchNorm -> ReLU -> Linear(hidden->out, no bias)."""

  def __init__(
    self, in_features: int, hidden: int = 512, out: int = 128, *, rngs: nnx.Rngs, dtype=jnp.float32
  ):
    """Builds the head.

    Args:
      in_features: width of the pooled backbone features.
      hidden: hidden width (512 in the paper).
      out: projection width (128 in the paper).
      rngs: parameter RNGs.
      dtype: compute dtype; parameters stay float32.
    """
    self.linear1 = _linear(in_features, hidden, rngs=rngs, dtype=dtype)
    self.bn = resnet.batch_norm(hidden, rngs=rngs, dtype=dtype)
    self.linear2 = _linear(hidden, out, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, in_features] -> [N, out] float32."""
    x = jax.nn.relu(self.bn(self.linear1(x)))
    return self.linear2(x).astype(jnp.float32)


class KeypointHead(nnx.Module):
  """Linear -> 21 x (u, v, z_rel).

  The released PyTorch weights have 64 outputs (the last unused); a converter
  keeps the first 63 rows.
  """

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """Builds the head.

    Args:
      in_features: width of the pooled backbone features.
      rngs: parameter RNGs.
      dtype: compute dtype. float32 by default: pixel coordinates up to a few
        hundred need more than bfloat16's 8 mantissa bits.
    """
    self.linear = _linear(in_features, 3 * joints.NUM_JOINTS, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, in_features] -> [N, 21, 3] float32, last axis (u, v, z_rel)."""
    y = self.linear(x).astype(jnp.float32)
    # Row-major view: output 3j + k is joint j, component k (torch .view).
    return y.reshape(y.shape[:-1] + (joints.NUM_JOINTS, 3))


class HeatmapHead(nnx.Module):
  """2.5D heatmaps with integral regression on the last feature map.

  The stride-32 map is upsampled ``num_upsample`` times (nearest x2, 3x3 conv,
  BatchNorm, ReLU), then a 1x1 conv gives per joint a heatmap logit and a
  depth map. (u, v) is the soft-argmax of the heatmap (its expectation over
  the cell centres, in input pixels) and z_rel the heatmap-weighted depth
  (Iqbal et al. 2018's 2.5D heatmaps, Sun et al. 2018's integral
  regression). Unlike the pooled linear head it keeps where things are in
  the image, so a small network learns positions from few examples.

  With ``skip_features``, each upsampled map also gets a 1x1 projection of
  the backbone stage of the same stride (16, 8, 4) added before its
  BatchNorm, as FPN's lateral connections or a U-Net's skips: at 64 px the
  stride-32 map is 2x2, too coarse to place joints to a pixel, while the
  earlier stages still hold where edges are.
  """

  def __init__(
    self,
    in_features: int,
    *,
    width: int = 64,
    num_upsample: int = 3,
    skip_features: tuple[int, ...] = (),
    rngs: nnx.Rngs,
    dtype=jnp.float32,
  ):
    """Builds the head.

    Args:
      in_features: channels of the backbone's last feature map.
      width: channels of the upsampling convolutions.
      num_upsample: x2 upsamplings of the stride-32 map (3: stride 4).
      skip_features: () for no skips, or the channels of the backbone's
        stages in stride order (``ResNet.stage_features``, last = stride
        32); the ``num_upsample`` stages before the last feed the skips.
      rngs: parameter RNGs.
      dtype: compute dtype of the convolutions; the soft-argmax is float32.
    """
    if skip_features and len(skip_features) <= num_upsample:
      raise ValueError(
        f"skip_features={skip_features}: need more than num_upsample={num_upsample} stages"
      )
    self.stride = 32 // 2**num_upsample
    convs, bns, laterals = [], [], []
    for i in range(num_upsample):
      # The backbone's conv (its CPU-friendly hook) and BatchNorm.
      convs.append(
        resnet.conv_layer(in_features if i == 0 else width, width, 3, 1, 1, rngs=rngs, dtype=dtype)
      )
      bns.append(resnet.batch_norm(width, rngs=rngs, dtype=dtype))
      if skip_features:
        # Stage of stride 32 / 2**(i + 1): counted back from the last.
        laterals.append(
          resnet.conv_layer(skip_features[-2 - i], width, 1, 1, 0, rngs=rngs, dtype=dtype)
        )
    self.up_convs = nnx.List(convs)
    self.up_bns = nnx.List(bns)
    self.laterals = nnx.List(laterals)
    self.out = nnx.Conv(
      width if num_upsample else in_features,
      2 * joints.NUM_JOINTS,
      (1, 1),
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=conv_init,
      rngs=rngs,
    )

  def maps(self, stages: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """Backbone stage outputs (``ResNet.feature_maps``; the last, [N, h, w,
    C], is upsampled) -> (heatmap logits, depth maps), each [N, H, W, 21]
    float32 at `self.stride` input pixels per cell."""
    x = stages[-1]
    for i, (conv, bn) in enumerate(zip(self.up_convs, self.up_bns)):
      x = conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
      if self.laterals:
        skip = stages[-2 - i]
        # Stage sizes halve rounding up, so the x2 map can be a cell larger
        # than the stage (100 px: 4x4 -> 8x8 against 7x7): crop it.
        x = x[:, : skip.shape[1], : skip.shape[2]] + self.laterals[i](skip)
      x = jax.nn.relu(bn(x))
    y = self.out(x.astype(jnp.float32))  # [N, H, W, 42]
    return y[..., : joints.NUM_JOINTS], y[..., joints.NUM_JOINTS :]

  def __call__(self, stages: tuple[jax.Array, ...]) -> jax.Array:
    """Backbone stage outputs -> [N, 21, 3] float32, last axis (u, v,
    z_rel), (u, v) in pixels of the network's input (pixel centres at
    integers)."""
    return integral_2p5d(*self.maps(stages), self.stride)


def integral_2p5d(logits: jax.Array, depth: jax.Array, stride: int) -> jax.Array:
  """Soft-argmax (u, v) and heatmap-weighted z_rel.

  Args:
    logits: [N, H, W, J] heatmap logits (softmax over H x W).
    depth: [N, H, W, J] per-cell relative depth.
    stride: input pixels per cell. Cell (i, j) covers input pixels
      [j s, j s + s) x [i s, i s + s); its centre, j s + (s - 1) / 2, is
      where a one-hot heatmap puts the joint (pixel centres at integers), so
      the grid is symmetric about the image centre.

  Returns:
    [N, J, 3] float32: (u, v) input pixels, z_rel.
  """
  n, h, w, j = logits.shape
  prob = jax.nn.softmax(logits.reshape(n, h * w, j).astype(jnp.float32), 1)
  centre = lambda k: jnp.arange(k, dtype=jnp.float32) * stride + (stride - 1) / 2
  cy, cx = jnp.meshgrid(centre(h), centre(w), indexing="ij")
  grid = jnp.stack([cx.ravel(), cy.ravel()], -1)  # [H*W, 2] (x, y)
  uv = jnp.einsum("npj,pc->njc", prob, grid)
  zrel = jnp.einsum("npj,npj->nj", prob, depth.reshape(n, h * w, j).astype(jnp.float32))
  return jnp.concatenate([uv, zrel[..., None]], axis=-1)


class ZRootRefiner(nnx.Module):
  """Scale-normalised root depth: closed form, then an additive MLP refinement.

  MLP input is ``concat([z_rel (21), rays xy (42, joint-major x, y),
  z_root (1)])`` -> 128 (BN, LeakyReLU) -> 128 (BN, LeakyReLU) -> 1.
  Always computed in float32: the closed form subtracts nearly equal numbers.
  """

  def __init__(self, *, rngs: nnx.Rngs, bone: tuple[int, int] = (3, 8)):
    """Builds the MLP.

    Args:
      rngs: parameter RNGs.
      bone: reference bone (AIT joint indices) whose length is the unit.
    """
    self.bone = tuple(bone)
    din = joints.NUM_JOINTS + 2 * joints.NUM_JOINTS + 1
    self.linear1 = _linear(din, 128, rngs=rngs)
    self.bn1 = resnet.batch_norm(128, rngs=rngs, dtype=jnp.float32)
    self.linear2 = _linear(128, 128, rngs=rngs)
    self.bn2 = resnet.batch_norm(128, rngs=rngs, dtype=jnp.float32)
    self.linear3 = _linear(128, 1, rngs=rngs)

  def initial_zroot(self, uv: jax.Array, zrel: jax.Array, K: jax.Array) -> jax.Array:
    """Closed-form root depth, gradient stopped and clamped to [4, 50].

    Args:
      uv: [N, 21, 2] pixels.
      zrel: [N, 21] relative depths in bone units.
      K: [N, 3, 3] intrinsics.

    Returns:
      [N] scale-normalised root depth (no gradient flows through it).
    """
    z = geometry.solve_zroot(uv, zrel, K, bone=self.bone)
    z = jax.lax.stop_gradient(z)
    return jnp.clip(z, ZROOT_MIN, ZROOT_MAX)

  def __call__(self, uv: jax.Array, zrel: jax.Array, K: jax.Array) -> jax.Array:
    """Refined root depth: ``initial_zroot + MLP(...)``.

    Args:
      uv: [N, 21, 2] pixels.
      zrel: [N, 21] relative depths in bone units (root already 0).
      K: [N, 3, 3] intrinsics.

    Returns:
      [N] refined scale-normalised root depth, float32.
    """
    uv = uv.astype(jnp.float32)
    zrel = zrel.astype(jnp.float32)
    K = K.astype(jnp.float32)
    zroot = self.initial_zroot(uv, zrel, K)
    rays = geometry.unproject(uv, jnp.ones_like(zrel), K)
    n = zrel.shape[0]
    h = jnp.concatenate(
      [
        zrel.reshape(n, joints.NUM_JOINTS),
        rays[..., :2].reshape(n, 2 * joints.NUM_JOINTS),
        zroot.reshape(n, 1),
      ],
      axis=-1,
    )
    # jax.nn.leaky_relu's default slope 0.01 equals torch's nn.LeakyReLU.
    h = jax.nn.leaky_relu(self.bn1(self.linear1(h)))
    h = jax.nn.leaky_relu(self.bn2(self.linear2(h)))
    return zroot + self.linear3(h)[:, 0]
