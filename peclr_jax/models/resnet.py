"""ResNet backbones (torchvision v1.5 layout) in Flax NNX.

The attribute tree mirrors torchvision's ``state_dict`` keys one-to-one
(``conv1``, ``bn1``, ``layer1..layer4[i].conv1/bn1/...``, ``downsample[0]/[1]``)
so converted PyTorch weights can be loaded by name. Padding is explicit and
symmetric, exactly as torch's, so converted weights give the same outputs.

The ``fc`` layer is omitted: a backbone returns globally average-pooled
features ``[N, C]``.

Train/eval mode: BatchNorm layers are created in train mode
(``use_running_average=False``). Call ``model.eval()`` to switch every nested
BatchNorm to its running averages and ``model.train()`` to switch back (flax
0.12 ``nnx.Module.train/eval``, in place); ``nnx.view(model,
use_running_average=True)`` gives an eval-mode view without mutating ``model``.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), i.e. an
# untruncated normal with variance 2 / (out_channels * kh * kw).
conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# torch BatchNorm momentum 0.1 updates running = 0.9 * running + 0.1 * batch;
# flax's momentum weights the old value, hence 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, pad: int, *,
          rngs: nnx.Rngs, dtype) -> nnx.Conv:
  """Bias-free conv with torch-style explicit symmetric padding."""
  return nnx.Conv(
      in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=conv_init, rngs=rngs)


def _bn(num_features: int, *, rngs: nnx.Rngs, dtype) -> nnx.BatchNorm:
  """BatchNorm matching torch's defaults (eps 1e-5, momentum 0.1)."""
  # use_fast_variance=False: E[(x - mean)^2] rather than E[x^2] - mean^2,
  # closer to torch for large activations (statistics are float32 anyway).
  return nnx.BatchNorm(
      num_features, use_running_average=False, momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
      use_fast_variance=False, rngs=rngs)


def _downsample(in_ch: int, out_ch: int, stride: int, *, rngs, dtype):
  """torchvision's ``downsample = Sequential(conv1x1, bn)`` or None."""
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([_conv(in_ch, out_ch, 1, stride, 0, rngs=rngs, dtype=dtype),
                   _bn(out_ch, rngs=rngs, dtype=dtype)])


def _shortcut(downsample, x: jax.Array) -> jax.Array:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int = 1, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    """Initialises the block.

    Args:
      in_ch: input channels.
      width: channels of the block (output = width * expansion).
      stride: spatial stride of the first conv.
      rngs: parameter RNGs.
      dtype: compute dtype.
    """
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 3, stride, 1, rngs=rngs, dtype=dtype)
    self.bn1 = _bn(width, rngs=rngs, dtype=dtype)
    self.conv2 = _conv(width, out_ch, 3, 1, 1, rngs=rngs, dtype=dtype)
    self.bn2 = _bn(out_ch, rngs=rngs, dtype=dtype)
    # nnx.data: the attribute is a module on some paths and None on others.
    self.downsample = nnx.data(
        _downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, H, W, in_ch] -> [N, H/stride, W/stride, out_ch]."""
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 bottleneck (ResNet-50/101/152)."""

  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int = 1, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    """Initialises the block.

    Args:
      in_ch: input channels.
      width: bottleneck channels (output = width * 4).
      stride: spatial stride, applied on the 3x3 conv (torchvision v1.5).
      rngs: parameter RNGs.
      dtype: compute dtype.
    """
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 1, 1, 0, rngs=rngs, dtype=dtype)
    self.bn1 = _bn(width, rngs=rngs, dtype=dtype)
    self.conv2 = _conv(width, width, 3, stride, 1, rngs=rngs, dtype=dtype)
    self.bn2 = _bn(width, rngs=rngs, dtype=dtype)
    self.conv3 = _conv(width, out_ch, 1, 1, 0, rngs=rngs, dtype=dtype)
    self.bn3 = _bn(out_ch, rngs=rngs, dtype=dtype)
    self.downsample = nnx.data(
        _downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, H, W, in_ch] -> [N, H/stride, W/stride, 4 * width]."""
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class ResNet(nnx.Module):
  """torchvision ResNet without ``fc``: images -> pooled features.

  Attributes:
    num_features: channels of the pooled output (``fc.in_features``).
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck],
               layers: Sequence[int], *, width: int = 64, rngs: nnx.Rngs,
               dtype=jnp.float32):
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
    self.conv1 = _conv(3, width, 7, 2, 3, rngs=rngs, dtype=dtype)
    self.bn1 = _bn(width, rngs=rngs, dtype=dtype)
    in_ch = width
    for stage, n_blocks in enumerate(layers):
      stage_width = width * 2**stage
      stride = 1 if stage == 0 else 2
      blocks = []
      for i in range(n_blocks):
        blocks.append(block(in_ch, stage_width, stride if i == 0 else 1,
                            rngs=rngs, dtype=dtype))
        in_ch = stage_width * block.expansion
      setattr(self, f'layer{stage + 1}', nnx.List(blocks))
    self.num_features = in_ch

  def __call__(self, x: jax.Array) -> jax.Array:
    """Forward pass.

    Args:
      x: images ``[N, H, W, 3]`` (any float dtype; normalised).

    Returns:
      Globally average-pooled features ``[N, num_features]``, float32.
    """
    x = jnp.asarray(x, self.dtype)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    # torch pads max-pool inputs with -inf (flax's max_pool does the same).
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in layer:
        x = blk(x)
    # Pool in float32: the mean over many bf16 values loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


_SPECS: dict[str, tuple[type, tuple[int, ...], int]] = {
    'resnet18': (BasicBlock, (2, 2, 2, 2), 64),
    'resnet34': (BasicBlock, (3, 4, 6, 3), 64),
    'resnet50': (Bottleneck, (3, 4, 6, 3), 64),
    'resnet101': (Bottleneck, (3, 4, 23, 3), 64),
    'resnet152': (Bottleneck, (3, 8, 36, 3), 64),
    # For tests: one BasicBlock per stage, width 8 (num_features 64).
    'resnet_tiny': (BasicBlock, (1, 1, 1, 1), 8),
}

BACKBONES: tuple[str, ...] = tuple(_SPECS)

# Short aliases used in configs of the public code ("rn50", "rn152").
_ALIASES = {'rn18': 'resnet18', 'rn34': 'resnet34', 'rn50': 'resnet50',
            'rn101': 'resnet101', 'rn152': 'resnet152', 'tiny': 'resnet_tiny'}


def canonical_name(name: str) -> str:
  """'rn50' -> 'resnet50'; a full name is returned as is; else ValueError."""
  name = _ALIASES.get(name, name)
  if name not in _SPECS:
    raise ValueError(f'Unknown backbone {name!r}; choose from {BACKBONES} '
                     f'or the aliases {tuple(_ALIASES)}.')
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


resnet18: Callable[..., ResNet] = functools.partial(get_backbone, 'resnet18')
resnet34: Callable[..., ResNet] = functools.partial(get_backbone, 'resnet34')
resnet50: Callable[..., ResNet] = functools.partial(get_backbone, 'resnet50')
resnet101: Callable[..., ResNet] = functools.partial(get_backbone, 'resnet101')
resnet152: Callable[..., ResNet] = functools.partial(get_backbone, 'resnet152')
resnet_tiny: Callable[..., ResNet] = functools.partial(get_backbone,
                                                       'resnet_tiny')
