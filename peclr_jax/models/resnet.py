"""ResNet backbones (torchvision v1.5 layout) in Flax NNX.

The attribute tree mirrors torchvision's ``state_dict`` keys one-to-one
(``conv1``, ``bn1``, ``layer1..layer4[i].conv1/bn1/...``, ``downsample[0]/[1]``)
so converted PyTorch weights can be loaded by name. Padding is explicit and
symmetric, exactly as torch's, so converted weights give the same outputs.

The ``fc`` layer is omitted: a backbone returns globally average-pooled
features ``[N, C]``; ``feature_map`` gives the unpooled last stage.

CPU-friendly formulations (BENCHMARKS.md, section 2; each keeps parameters
and outputs, and is harmless on GPU/TPU): 1x1 convolutions run as 2-D
matmuls (`conv_general_dilated`), the stem max-pool is a max of strided slices
with an elementwise VJP (`max_pool_3x3_s2`), and every residual block's input
is `cpu_fusion.materialise`d (the identity except on a single CPU device).

Train/eval mode: BatchNorm layers are created in train mode
(``use_running_average=False``). Call ``model.eval()`` to switch every nested
BatchNorm to its running averages and ``model.train()`` to switch back (flax
0.12 ``nnx.Module.train/eval``, in place); ``nnx.view(model,
use_running_average=True)`` gives an eval-mode view without mutating ``model``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from peclr_jax.cpu_fusion import materialise

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), i.e. an
# untruncated normal with variance 2 / (out_channels * kh * kw).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch BatchNorm momentum 0.1 updates running = 0.9 * running + 0.1 * batch;
# flax's momentum weights the old value, hence 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _is_plain_nhwc(
  lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, kwargs
) -> bool:
  """NHWC/HWIO, explicit padding, undilated, ungrouped, unsharded."""
  if lhs.ndim != 4 or isinstance(padding, str):
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
    return False
  unit = lambda d: d is None or all(v == 1 for v in d)
  # flax always passes out_sharding (None unless explicit sharding is used).
  return (
    unit(lhs_dilation)
    and unit(rhs_dilation)
    and feature_group_count == 1
    and kwargs.get("batch_group_count", 1) == 1
    and kwargs.get("out_sharding") is None
  )


# Output maps of at most this many pixels go through im2col on CPU.
_IM2COL_MAX_OUTPUT_PIXELS = 4


def _im2col_conv(x, rhs, strides, padding, precision, preferred_element_type):
  """A kh x kw convolution as one matmul over the kh*kw shifted slices."""
  kh, kw, cin, cout = rhs.shape
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  # Tap order (row, column, channel) is the HWIO kernel's reshape order.
  cols = jnp.concatenate(
    [
      x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  )
  y = lax.dot(
    cols.reshape(-1, kh * kw * cin),
    rhs.reshape(-1, cout),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(x.shape[0], ho, wo, cout)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  preferred_element_type=None,
  **kwargs,
):
  """`lax.conv_general_dilated`, with two CPU-friendly rewrites as matmuls.

  The hook `nnx.Conv(conv_general_dilated=...)` calls, with the same
  signature; both rewrites do the same products and sums (in another order)
  for plain NHWC/HWIO convolutions (explicit padding, no dilation or groups):

  * an unpadded 1x1 kernel, any stride, is
    `x[:, ::s, ::s, :].reshape(-1, Cin) @ w.reshape(Cin, Cout)`. XLA:CPU
    computes a convolution's kernel gradient as another convolution with
    batch and feature axes swapped, and materialises transposed copies of
    both operands for it; as a 2-D matmul, dW = X^T dY is one GEMM that
    reads the transposed operand in place. ResNet-50 fwd+bwd on one core:
    4.66 -> 2.63 s. (A 4-D `dot_general` is about 2x slower than 2-D.)
  * on CPU, any kernel with an output of at most 2 x 2 pixels is im2col +
    one matmul. XLA:CPU runs such convolutions at 3-12 GFLOP/s against
    ~170 at 4 x 4 (fwd+bwd, batch 32, jaxlib 0.10.2): a 3x3x512 convolution
    on 2 x 2 maps took 539 ms, so a ResNet's last stage on 64 px inputs
    dominated the step.
  Everything else goes to `lax.conv_general_dilated` unchanged.
  """
  plain = _is_plain_nhwc(
    lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, kwargs
  )
  sh, sw = window_strides
  if plain and rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
    x = lhs if sh == sw == 1 else lhs[:, ::sh, ::sw, :]
    cin, cout = rhs.shape[2:]
    y = lax.dot(
      x.reshape(-1, cin),
      rhs.reshape(cin, cout),
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    return y.reshape(x.shape[:3] + (cout,))
  if plain and jax.default_backend() == "cpu":
    out_hw = [
      (lhs.shape[1 + a] + sum(padding[a]) - rhs.shape[a]) // window_strides[a] + 1 for a in (0, 1)
    ]
    if out_hw[0] * out_hw[1] <= _IM2COL_MAX_OUTPUT_PIXELS:
      return _im2col_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type)
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
    **kwargs,
  )


def conv_layer(
  in_ch: int, out_ch: int, kernel: int, stride: int, pad: int, *, rngs: nnx.Rngs, dtype
) -> nnx.Conv:
  """Bias-free conv with torch-style explicit symmetric padding."""
  return nnx.Conv(
    in_ch,
    out_ch,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_init,
    rngs=rngs,
    conv_general_dilated=conv_general_dilated,
  )


def batch_norm(num_features: int, *, rngs: nnx.Rngs, dtype) -> nnx.BatchNorm:
  """BatchNorm matching torch's defaults (eps 1e-5, momentum 0.1)."""
  # use_fast_variance=False: E[(x - mean)^2] rather than E[x^2] - mean^2,
  # closer to torch for large activations (statistics are float32 anyway).
  return nnx.BatchNorm(
    num_features,
    use_running_average=False,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    use_fast_variance=False,
    rngs=rngs,
  )


def _downsample(in_ch: int, out_ch: int, stride: int, *, rngs, dtype):
  """torchvision's ``downsample = Sequential(conv1x1, bn)`` or None."""
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List(
    [
      conv_layer(in_ch, out_ch, 1, stride, 0, rngs=rngs, dtype=dtype),
      batch_norm(out_ch, rngs=rngs, dtype=dtype),
    ]
  )


def _shortcut(downsample, x: jax.Array) -> jax.Array:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


def _pool_windows(x: jax.Array, out_hw: tuple[int, int]):
  """The 9 [N, Ho, Wo, C] strided views of the -inf padded x, with offsets."""
  ho, wo = out_hw
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  for i in range(3):
    for j in range(3):
      yield i, j, xp[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2, :]


def _pool_out_hw(x: jax.Array) -> tuple[int, int]:
  return (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1) on [N, H, W, C].

  The same values as `nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`
  (padding is -inf, as torch's), computed as the max of 9 strided slices.
  The VJP sends the cotangent to every input equal to its window's max: 9
  compares and interior-padded adds that fuse into one pass. Why: XLA:CPU
  lowers the `reduce_window` VJP to a variadic reduce-window carrying int32
  iota index arrays plus a scatter, ~0.7 s of a ResNet-50 step on one core
  (this: ~0.05 s). The only difference from torch's gradient is a window
  with two equal maximal floats, where torch picks one; after the stem ReLU
  such ties are almost always zeros, whose gradient the ReLU drops anyway.
  """
  out = None
  for _, _, s in _pool_windows(x, _pool_out_hw(x)):
    out = s if out is None else jnp.maximum(out, s)
  return out


def _max_pool_fwd(x):
  out = max_pool_3x3_s2(x)
  return out, (x, out)


def _max_pool_bwd(res, g):
  x, out = res
  h, w = x.shape[1:3]
  ho, wo = out.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  dxp = None
  for i, j, s in _pool_windows(x, (ho, wo)):
    contrib = jnp.where(s == out, g, zero)
    # Back onto the padded grid: rows i, i + 2, ..., i.e. low padding i,
    # one interior zero between neighbours, the rest high padding.
    back = lax.pad(
      contrib,
      zero,
      ((0, 0, 0), (i, h + 1 - i - 2 * (ho - 1), 1), (j, w + 1 - j - 2 * (wo - 1), 1), (0, 0, 0)),
    )
    dxp = back if dxp is None else dxp + back
  return (dxp[:, 1 : h + 1, 1 : w + 1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class BasicBlock(nnx.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int = 1, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """Initialises the block.

    Args:
      in_ch: input channels.
      width: channels of the block (output = width * expansion).
      stride: spatial stride of the first conv.
      rngs: parameter RNGs.
      dtype: compute dtype.
    """
    out_ch = width * self.expansion
    self.conv1 = conv_layer(in_ch, width, 3, stride, 1, rngs=rngs, dtype=dtype)
    self.bn1 = batch_norm(width, rngs=rngs, dtype=dtype)
    self.conv2 = conv_layer(width, out_ch, 3, 1, 1, rngs=rngs, dtype=dtype)
    self.bn2 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
    # nnx.data: the attribute is a module on some paths and None on others.
    self.downsample = nnx.data(_downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch]."""
    # Computed once into a buffer on CPU: x feeds conv1 and the shortcut, and
    # XLA:CPU would otherwise recompute the earlier blocks' BN/add/ReLU chain
    # inside each consumer (see cpu_fusion).
    x = materialise(x)
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 bottleneck (ResNet-50/101/152)."""

  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int = 1, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """Initialises the block.

    Args:
      in_ch: input channels.
      width: bottleneck channels (output = width * 4).
      stride: spatial stride, applied on the 3x3 conv (torchvision v1.5).
      rngs: parameter RNGs.
      dtype: compute dtype.
    """
    out_ch = width * self.expansion
    self.conv1 = conv_layer(in_ch, width, 1, 1, 0, rngs=rngs, dtype=dtype)
    self.bn1 = batch_norm(width, rngs=rngs, dtype=dtype)
    self.conv2 = conv_layer(width, width, 3, stride, 1, rngs=rngs, dtype=dtype)
    self.bn2 = batch_norm(width, rngs=rngs, dtype=dtype)
    self.conv3 = conv_layer(width, out_ch, 1, 1, 0, rngs=rngs, dtype=dtype)
    self.bn3 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
    self.downsample = nnx.data(_downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, H, W, in_ch] -> [N, H/stride, W/stride, 4 * width]."""
    x = materialise(x)  # as in BasicBlock: computed once on CPU
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class ResNet(nnx.Module):
  """torchvision ResNet without ``fc``: images -> pooled features.

  Attributes:
    num_features: channels of the pooled output (``fc.in_features``).
    stage_features: channels of each stage's output (``feature_maps``).
  """

  def __init__(
    self,
    block: type[BasicBlock] | type[Bottleneck],
    layers: Sequence[int],
    *,
    width: int = 64,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
  ):
    """Builds the network.

    Args:
      block: ``BasicBlock`` or ``Bottleneck``.
      layers: number of blocks in each of the four stages.
      width: stem / first-stage width (64 in torchvision).
      rngs: parameter RNGs.
      dtype: compute dtype (e.g. bfloat16); parameters and BatchNorm
        statistics stay float32.
    """
    self.dtype = dtype
    self.conv1 = conv_layer(3, width, 7, 2, 3, rngs=rngs, dtype=dtype)
    self.bn1 = batch_norm(width, rngs=rngs, dtype=dtype)
    in_ch = width
    stage_features = []
    for stage, n_blocks in enumerate(layers):
      stage_width = width * 2**stage
      stride = 1 if stage == 0 else 2
      blocks = []
      for i in range(n_blocks):
        blocks.append(block(in_ch, stage_width, stride if i == 0 else 1, rngs=rngs, dtype=dtype))
        in_ch = stage_width * block.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
      stage_features.append(in_ch)
    self.stage_features = tuple(stage_features)
    self.num_features = in_ch

  def feature_maps(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Images ``[N, H, W, 3]`` (normalised) -> the four stages' outputs, at
    strides 4, 8, 16 and 32, with ``stage_features`` channels, in the
    compute dtype."""
    x = jnp.asarray(x, self.dtype)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    # MaxPool2d(3, 2, padding=1) with -inf padding, as torch's.
    x = max_pool_3x3_s2(x)
    stages = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in layer:
        x = blk(x)
      stages.append(x)
    return tuple(stages)

  def feature_map(self, x: jax.Array) -> jax.Array:
    """Images ``[N, H, W, 3]`` (normalised) -> last stage's features
    ``[N, H/32, W/32, num_features]`` in the compute dtype."""
    return self.feature_maps(x)[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Images ``[N, H, W, 3]`` -> average-pooled features
    ``[N, num_features]``, float32."""
    # Pool in float32: the mean over many bf16 values loses precision.
    return jnp.mean(self.feature_map(x).astype(jnp.float32), axis=(1, 2))


_SPECS: dict[str, tuple[type, tuple[int, ...], int]] = {
  "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
  "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
  "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
  "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
  "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
  # For tests and the CPU demo: one BasicBlock per stage, width 8
  # (num_features 64).
  "resnet_tiny": (BasicBlock, (1, 1, 1, 1), 8),
  # resnet_tiny twice as wide (num_features 128): the next size a CPU
  # benchmark can pre-train.
  "resnet_small": (BasicBlock, (1, 1, 1, 1), 16),
}

BACKBONES: tuple[str, ...] = tuple(_SPECS)

# Short aliases used in configs of the public code ("rn50", "rn152").
_ALIASES = {
  "rn18": "resnet18",
  "rn34": "resnet34",
  "rn50": "resnet50",
  "rn101": "resnet101",
  "rn152": "resnet152",
  "tiny": "resnet_tiny",
}


def canonical_name(name: str) -> str:
  """'rn50' -> 'resnet50'; a full name is returned as is; else ValueError."""
  name = _ALIASES.get(name, name)
  if name not in _SPECS:
    raise ValueError(
      f"Unknown backbone {name!r}; choose from {BACKBONES} or the aliases {tuple(_ALIASES)}."
    )
  return name


def get_backbone(name: str, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ResNet:
  """Returns a freshly initialised backbone by name.

  Args:
    name: one of ``BACKBONES`` (resnet18, resnet34, resnet50, resnet101,
      resnet152, resnet_tiny) or an alias (rn18..rn152, tiny).
    rngs: parameter RNGs.
    dtype: compute dtype.

  Returns:
    A ``ResNet``; ``backbone(x [N, H, W, 3]) -> [N, backbone.num_features]``.
  """
  block, layers, width = _SPECS[canonical_name(name)]
  dtype = jnp.dtype(dtype)
  return ResNet(block, layers, width=width, rngs=rngs, dtype=dtype)


resnet18: Callable[..., ResNet] = functools.partial(get_backbone, "resnet18")
resnet34: Callable[..., ResNet] = functools.partial(get_backbone, "resnet34")
resnet50: Callable[..., ResNet] = functools.partial(get_backbone, "resnet50")
resnet101: Callable[..., ResNet] = functools.partial(get_backbone, "resnet101")
resnet152: Callable[..., ResNet] = functools.partial(get_backbone, "resnet152")
resnet_tiny: Callable[..., ResNet] = functools.partial(get_backbone, "resnet_tiny")
