"""Tests for peclr_jax.models: backbones, heads, PeCLRModel, KeypointModel.

Big ResNets are only built abstractly (nnx.eval_shape); real forward passes
use resnet_tiny / resnet18 / a tiny bottleneck net at 32-40 px. The torch
references below are written from torchvision's and the public PeCLR code's
documented behaviour (functional ops), not imported from them.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from peclr_jax import models
from peclr_jax.cpu_fusion import materialise
from peclr_jax.hands import geometry
from peclr_jax.models import heads as heads_lib
from peclr_jax.models import resnet as resnet_lib

torch = pytest.importorskip("torch")
F = torch.nn.functional

# torchvision parameter counts without fc (sum of p.numel() over parameters()).
TORCHVISION_PARAMS = {
  "resnet18": (11_176_512, 512),
  "resnet34": (21_284_672, 512),
  "resnet50": (23_508_032, 2048),
  "resnet101": (42_500_160, 2048),
  "resnet152": (58_143_808, 2048),
}


def _abstract(name, dtype=jnp.float32):
  return nnx.eval_shape(lambda: models.get_backbone(name, rngs=nnx.Rngs(0), dtype=dtype))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


_SUFFIX = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def to_torch_state_dict(module):
  """nnx state -> torchvision-style {key: np.ndarray} (kernels OIHW / [out, in])."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module)):
    key = ".".join(str(p) for p in path[:-1]) + "." + _SUFFIX[path[-1]]
    value = np.asarray(var.get_value())
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[key] = value
  return out


# --------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
  model = _abstract(name)
  n_params, n_features = TORCHVISION_PARAMS[name]
  assert _count(nnx.state(model, nnx.Param)) == n_params
  assert model.num_features == n_features
  # BatchNorm running statistics exist but are not parameters.
  assert _count(nnx.state(model, nnx.BatchStat)) > 0


def test_resnet50_state_dict_keys_are_torchvision():
  sd = _abstract_state_shapes("resnet50")
  # torchvision resnet50.state_dict(): 320 entries = 53 conv weights +
  # 53 BN x (weight, bias, running_mean, running_var, num_batches_tracked)
  # + fc.weight + fc.bias; we have neither fc nor num_batches_tracked.
  assert len(sd) == 320 - 2 - 53
  assert sd["conv1.weight"] == (64, 3, 7, 7)
  assert sd["layer1.0.conv1.weight"] == (64, 64, 1, 1)
  # v1.5: the stride-2 conv of layer2.0 is the 3x3 conv2 (checked by parity
  # below); shapes of the downsample branch:
  assert sd["layer2.0.conv2.weight"] == (128, 128, 3, 3)
  assert sd["layer2.0.downsample.0.weight"] == (512, 256, 1, 1)
  assert sd["layer2.0.downsample.1.running_var"] == (512,)
  assert sd["layer4.2.bn3.weight"] == (2048,)
  assert "layer1.1.downsample.0.weight" not in sd


def _abstract_state_shapes(name):
  model = _abstract(name)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key = ".".join(str(p) for p in path[:-1]) + "." + _SUFFIX[path[-1]]
    shape = var.get_value().shape
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1])
    out[key] = shape
  return out


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_output_shapes_abstract(name):
  def fwd():
    model = models.get_backbone(name, rngs=nnx.Rngs(0))
    return model(jnp.zeros((2, 64, 64, 3)))

  out = nnx.eval_shape(fwd)
  assert out.shape == (2, TORCHVISION_PARAMS[name][1])
  assert out.dtype == jnp.float32


@pytest.mark.parametrize(
  "name,size,features", [("resnet_tiny", 32, 64), ("resnet_small", 32, 128), ("resnet18", 32, 512)]
)
def test_forward_shapes(name, size, features):
  model = models.get_backbone(name, rngs=nnx.Rngs(0))
  out = model(jnp.ones((2, size, size, 3)))
  assert model.num_features == features
  assert out.shape == (2, features)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_unknown_backbone_raises():
  with pytest.raises(ValueError):
    models.get_backbone("resnet19", rngs=nnx.Rngs(0))


def test_conv_init_is_kaiming_fan_out():
  model = models.get_backbone("resnet18", rngs=nnx.Rngs(0))
  k = np.asarray(model.layer3[0].conv2.kernel.get_value())  # 3x3, 256 -> 256
  expected_std = np.sqrt(2.0 / (256 * 3 * 3))
  assert abs(k.std() / expected_std - 1) < 0.02
  assert abs(k.mean()) < 1e-3
  bn = model.layer3[0].bn2
  np.testing.assert_array_equal(bn.scale.get_value(), 1.0)
  np.testing.assert_array_equal(bn.bias.get_value(), 0.0)


def torch_resnet_forward(sd, x_nhwc, *, bottleneck, train):
  """Functional torchvision ResNet (v1.5) forward on a state dict (numpy)."""
  sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  x = torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2)
  return torch_resnet(sd, x, bottleneck=bottleneck, train=train).numpy()


def torch_resnet(sd, x, *, bottleneck, train):
  """The same on torch tensors (NCHW): differentiable with torch autograd."""

  def bn(h, p):
    # Clones: torch updates running stats in place in training mode.
    return F.batch_norm(
      h,
      sd[p + ".running_mean"].clone(),
      sd[p + ".running_var"].clone(),
      sd[p + ".weight"],
      sd[p + ".bias"],
      training=train,
      momentum=0.1,
      eps=1e-5,
    )

  def conv(h, p, stride, pad):
    return F.conv2d(h, sd[p + ".weight"], stride=stride, padding=pad)

  x = F.relu(bn(conv(x, "conv1", 2, 3), "bn1"))
  x = F.max_pool2d(x, 3, 2, 1)
  for stage in range(1, 5):
    i = 0
    while f"layer{stage}.{i}.conv1.weight" in sd:
      p = f"layer{stage}.{i}"
      s = 2 if (stage > 1 and i == 0) else 1
      if bottleneck:
        y = F.relu(bn(conv(x, p + ".conv1", 1, 0), p + ".bn1"))
        y = F.relu(bn(conv(y, p + ".conv2", s, 1), p + ".bn2"))
        y = bn(conv(y, p + ".conv3", 1, 0), p + ".bn3")
      else:
        y = F.relu(bn(conv(x, p + ".conv1", s, 1), p + ".bn1"))
        y = bn(conv(y, p + ".conv2", 1, 1), p + ".bn2")
      if p + ".downsample.0.weight" in sd:
        x = bn(conv(x, p + ".downsample.0", s, 0), p + ".downsample.1")
      x = F.relu(x + y)
      i += 1
  return x.mean(dim=(2, 3))


def _randomise_bn_stats(model, seed):
  """Non-trivial running stats and affine params so eval parity means something."""
  rng = np.random.default_rng(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      c = module.num_features
      module.mean.set_value(jnp.asarray(rng.normal(0, 0.3, c), jnp.float32))
      module.var.set_value(jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32))
      module.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32))
      module.bias.set_value(jnp.asarray(rng.normal(0, 0.2, c), jnp.float32))


def _tiny_resnet(bottleneck: bool):
  """A tiny basic or bottleneck ResNet with non-trivial BatchNorm statistics."""
  if bottleneck:
    model = resnet_lib.ResNet(resnet_lib.Bottleneck, (1, 2, 1, 1), width=4, rngs=nnx.Rngs(1))
  else:
    model = models.get_backbone("resnet_tiny", rngs=nnx.Rngs(1))
  _randomise_bn_stats(model, seed=2)
  return model


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_parity_with_torch_functional_resnet(bottleneck, train):
  model = _tiny_resnet(bottleneck)
  sd = to_torch_state_dict(model)
  # 40 px: conv1, max-pool and layer2 see even sizes (where 'SAME' padding
  # would be asymmetric, unlike torch), layer3/4 odd ones (floor rounding).
  x = jax.random.normal(jax.random.key(3), (3, 40, 40, 3))
  if train:
    model.train()
  else:
    model.eval()
  ours = np.asarray(model(x))
  ref = torch_resnet_forward(sd, x, bottleneck=bottleneck, train=train)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
def test_gradients_match_torch_autograd(bottleneck):
  # Train mode (batch statistics, as in PeCLR training): the gradients w.r.t.
  # the input and every parameter go through the 1x1-as-matmul convs (both
  # strides), the stem max-pool's custom VJP and the blocks' `materialise`.
  model = _tiny_resnet(bottleneck)
  sd = {
    k: torch.tensor(v, requires_grad=not k.endswith(("running_mean", "running_var")))
    for k, v in to_torch_state_dict(model).items()
  }
  x = jax.random.normal(jax.random.key(3), (3, 40, 40, 3))
  r = jax.random.normal(jax.random.key(4), (3, model.num_features))

  def loss(m, x):
    return jnp.sum(m(x) * r)

  # Jitted: eagerly, every cond and custom VJP compiles on its own (~5x).
  g_model, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(model, x)
  xt = torch.tensor(np.array(x)).permute(0, 3, 1, 2).requires_grad_()
  # Without oneDNN: its AVX-512 1x1 kernel-gradient segfaulted on these tiny
  # channel counts (torch 2.13 CPU; intermittently, depending on what ran
  # before in the process).
  mkldnn_enabled = torch.backends.mkldnn.enabled
  torch.backends.mkldnn.enabled = False
  try:
    out = torch_resnet(sd, xt, bottleneck=bottleneck, train=True)
    (out * torch.tensor(np.array(r))).sum().backward()
  finally:
    torch.backends.mkldnn.enabled = mkldnn_enabled

  def check(ours, ref):
    ref = ref.detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())

  check(np.asarray(g_x), xt.grad.permute(0, 2, 3, 1))
  ours = to_torch_state_dict(g_model)
  assert len(ours) == sum(v.requires_grad for v in sd.values())
  for key, value in ours.items():
    check(value, sd[key].grad)


# --------------------------------------------------------------------------
# CPU formulations: 1x1 conv hook, stem max-pool, block materialisation
# --------------------------------------------------------------------------


def _primitive_counts(fn, *args):
  """{primitive name: count} over the jaxpr of fn, sub-jaxprs included."""
  counts = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
      for param in eqn.params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(p, "eqns"):
            walk(p)
          elif hasattr(getattr(p, "jaxpr", None), "eqns"):
            walk(p.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, stride, pad, **kw):
  return lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad),) * 2, dimension_numbers=_DN, **kw
  )


def _hook_conv(x, w, stride, pad, **kw):
  # As nnx.Conv calls it (ConvDimensionNumbers, list of pairs, out_sharding).
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _DN)
  return resnet_lib.conv_general_dilated(
    x,
    w,
    (stride, stride),
    [(pad, pad)] * 2,
    lhs_dilation=(1, 1),
    rhs_dilation=(1, 1),
    dimension_numbers=dn,
    feature_group_count=1,
    out_sharding=None,
    **kw,
  )


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_hook_1x1_is_a_matmul_with_lax_values_and_gradients(stride):
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 7, 9, 5))  # odd sizes: stride 2 rounds up
  w = jax.random.normal(kw, (1, 1, 5, 6))
  out_hw = (7 - 1) // stride + 1, (9 - 1) // stride + 1
  r = jax.random.normal(kr, (2,) + out_hw + (6,))

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, stride, 0)) * r)

  counts = _primitive_counts(loss(_hook_conv), x, w)
  assert counts.get("dot_general") == 1
  assert "conv_general_dilated" not in counts
  y, y_ref = _hook_conv(x, w, stride, 0), _lax_conv(x, w, stride, 0)
  assert y.shape == y_ref.shape == (2,) + out_hw + (6,)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  grads = jax.grad(loss(_hook_conv), argnums=(0, 1))(x, w)
  grads_ref = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, w)
  for g, g_ref in zip(grads, grads_ref):
    assert g.shape == g_ref.shape
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  if stride == 2:  # rows / columns the stride skips get no gradient
    assert float(jnp.abs(grads[0][:, 1::2]).max()) == 0.0


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 1)])
def test_conv_hook_other_convolutions_go_to_lax_unchanged(kernel, stride, pad):
  # (1, 1, 1): a padded 1x1 kernel is not a plain matmul either.
  x = jax.random.normal(jax.random.key(1), (2, 7, 8, 4))
  w = jax.random.normal(jax.random.key(2), (kernel, kernel, 4, 3))
  counts = _primitive_counts(lambda x, w: _hook_conv(x, w, stride, pad), x, w)
  assert counts == {"conv_general_dilated": 1}
  np.testing.assert_array_equal(_hook_conv(x, w, stride, pad), _lax_conv(x, w, stride, pad))


@pytest.mark.parametrize("hw,stride,pad", [(2, 1, 1), (4, 2, 1), (3, 2, 1), (1, 1, 1), (4, 1, 0)])
def test_conv_hook_small_outputs_are_im2col_with_lax_values_and_gradients(hw, stride, pad):
  # Outputs of at most 2 x 2 pixels. In float64 the rewrite must agree with
  # lax to rounding (~1e-15 relative): any wrong tap or stride is O(1).
  with jax.enable_x64(True):
    kx, kw, kr = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, hw, hw, 5), jnp.float64)
    w = jax.random.normal(kw, (3, 3, 5, 4), jnp.float64)
    y_ref = _lax_conv(x, w, stride, pad)
    assert y_ref.shape[1] * y_ref.shape[2] <= 4
    r = jax.random.normal(kr, y_ref.shape, jnp.float64)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, stride, pad)) * r)
    counts = _primitive_counts(loss(_hook_conv), x, w)
    if jax.default_backend() == "cpu":
      assert "conv_general_dilated" not in counts
    y = _hook_conv(x, w, stride, pad)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    grads = jax.grad(loss(_hook_conv), argnums=(0, 1))(x, w)
    grads_ref = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, w)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_conv_hook_dtypes_and_precision():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  w = jax.random.normal(jax.random.key(1), (1, 1, 8, 4))
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y16 = _hook_conv(x16, w16, 2, 0)
  assert y16.dtype == jnp.bfloat16
  ref = _lax_conv(x16.astype(jnp.float32), w16.astype(jnp.float32), 2, 0)
  np.testing.assert_allclose(y16.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
  y32 = _hook_conv(x16, w16, 2, 0, preferred_element_type=jnp.float32)
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5)
  # The precision flax passes reaches the dot.
  jaxpr = jax.make_jaxpr(lambda x, w: _hook_conv(x, w, 1, 0, precision=lax.Precision.HIGHEST))(x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1
  assert dots[0].params["precision"] == (lax.Precision.HIGHEST,) * 2
  # Through nnx.Conv, as the backbone builds it: bf16 compute, f32 params.
  conv = resnet_lib.conv_layer(8, 4, 1, 2, 0, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  assert conv.kernel.get_value().dtype == jnp.float32
  y = conv(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 3, 4)
  k16 = conv.kernel.get_value().astype(jnp.bfloat16)
  np.testing.assert_allclose(
    y.astype(jnp.float32),
    _lax_conv(x16, k16, 2, 0, preferred_element_type=jnp.float32),
    rtol=2e-2,
    atol=2e-2,
  )


def _reference_max_pool(x):
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (1, 10, 11, 2), (1, 1, 2, 1)])
def test_max_pool_matches_reduce_window(shape):
  x = jax.random.normal(jax.random.key(0), shape)  # no ties
  y = resnet_lib.max_pool_3x3_s2(x)
  y_ref = _reference_max_pool(x)
  assert y.shape == y_ref.shape
  np.testing.assert_array_equal(y, y_ref)
  r = jax.random.normal(jax.random.key(1), y.shape)
  grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * r)))(x)
  g, g_ref = grad(resnet_lib.max_pool_3x3_s2), grad(_reference_max_pool)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
  assert "reduce_window_max" not in _primitive_counts(
    jax.grad(lambda x: jnp.sum(resnet_lib.max_pool_3x3_s2(x))), x
  )


def test_max_pool_gradient_goes_to_every_tied_maximum():
  x = jnp.array([[1.0, 5.0, 2.0], [5.0, 0.0, 3.0], [4.0, 1.0, 2.0]])[None, :, :, None]
  # Windows (rows/cols -1..1 and 1..3 of the -inf padded input):
  # top-left {1, 5, 5, 0}: both 5s; top-right {5, 2, 0, 3}: the 5 at (0, 1);
  # bottom-left {5, 0, 4, 1}: the 5 at (1, 0); bottom-right {0, 3, 1, 2}: 3.
  np.testing.assert_array_equal(resnet_lib.max_pool_3x3_s2(x)[0, :, :, 0], [[5.0, 5.0], [5.0, 3.0]])
  g = jnp.array([[1.0, 10.0], [100.0, 1000.0]])[None, :, :, None]
  _, vjp = jax.vjp(resnet_lib.max_pool_3x3_s2, x)
  (dx,) = vjp(g)
  np.testing.assert_array_equal(
    dx[0, :, :, 0], [[0.0, 11.0, 0.0], [101.0, 0.0, 1000.0], [0.0, 0.0, 0.0]]
  )
  # reduce_window's VJP (like torch) gives the top-left window's cotangent
  # to one of the two 5s only.
  _, vjp_ref = jax.vjp(_reference_max_pool, x)
  assert float(vjp_ref(g)[0].sum()) == float(dx.sum()) - 1.0


def test_materialise_is_the_identity_in_value_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  np.testing.assert_array_equal(materialise(x), x)
  f = lambda x: jnp.sum(jnp.sin(materialise(x) * 2.0))
  np.testing.assert_allclose(jax.grad(f)(x), 2.0 * jnp.cos(2.0 * x), rtol=1e-6, atol=1e-6)


_COMPILES_A_CONDITIONAL = """
import jax, jax.numpy as jnp
from peclr_jax.cpu_fusion import materialise
f = jax.jit(lambda x: jnp.sin(materialise(x) * 2.0))
print('conditional' in f.lower(jnp.ones((4, 3))).compile().as_text())
"""


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only")
def test_materialise_is_a_conditional_on_one_cpu_device_only():
  # With several devices the predicate would cost an all-reduce per call, so
  # materialise steps aside. The device count is fixed per process, hence
  # one fresh interpreter per count.
  def compiles_a_conditional(devices: int) -> bool:
    env = dict(
      os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )
    out = subprocess.run(
      [sys.executable, "-c", _COMPILES_A_CONDITIONAL],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    return out.stdout.strip().splitlines()[-1] == "True"

  assert compiles_a_conditional(1)
  assert not compiles_a_conditional(2)


def test_resnet_uses_the_cpu_formulations():
  model = resnet_lib.ResNet(resnet_lib.Bottleneck, (1, 1, 1, 1), width=4, rngs=nnx.Rngs(0))
  model.eval()  # no batch-statistic updates inside make_jaxpr
  counts = _primitive_counts(lambda x: model(x), jnp.ones((2, 20, 20, 3)))
  # 20 px: stages at 5, 3, 2 and 1 px. Native: the 7x7 stem and the 3x3
  # convs of the first two stages; the 12 1x1 convs (conv1, conv3 and
  # downsample of each block) and, on CPU, the last two stages' 3x3 convs
  # (outputs of at most 2 x 2 pixels) are dots.
  im2col = 2 if jax.default_backend() == "cpu" else 0
  assert counts.get("conv_general_dilated") == 5 - im2col
  assert counts.get("dot_general") == 12 + im2col
  assert not any(k.startswith("reduce_window") for k in counts)
  # One conditional per block input on one CPU device (none elsewhere).
  one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  assert counts.get("cond", 0) == (4 if one_cpu else 0)


def test_batchnorm_statistics_train_vs_eval():
  model = models.get_backbone("resnet_tiny", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + 0.5
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  model.eval()
  y_eval = model(x)
  after_eval = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, before, after_eval)
  # Eval output of an example does not depend on the rest of the batch.
  np.testing.assert_allclose(model(x[:1]), y_eval[:1], rtol=1e-5, atol=1e-5)

  model.train()
  y_train = model(x)
  after_train = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  m0, m1 = before["bn1"]["mean"], after_train["bn1"]["mean"]
  assert not np.allclose(m0, m1)
  # torch momentum 0.1: running <- 0.9 running + 0.1 batch_mean (zeros start).
  xc = model.conv1(x)
  np.testing.assert_allclose(m1, 0.1 * np.asarray(xc.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)
  # Train mode normalises with batch statistics: outputs differ from eval.
  assert not np.allclose(y_train, y_eval, atol=1e-3)


def test_eval_view_and_train_eval_reach_heads():
  model = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0))
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  assert all(not bn.use_running_average for bn in bns)
  view = nnx.view(model, use_running_average=True)
  assert all(not bn.use_running_average for bn in bns)  # original untouched
  assert view.zroot_refiner.bn2.use_running_average
  model.eval()
  assert all(bn.use_running_average for bn in bns)
  model.train()
  assert all(not bn.use_running_average for bn in bns)


# --------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------


def test_projection_head():
  head = heads_lib.ProjectionHead(64, rngs=nnx.Rngs(0))
  assert head.linear1.kernel.get_value().shape == (64, 512)
  assert head.linear1.bias is not None
  assert head.linear2.kernel.get_value().shape == (512, 128)
  assert head.linear2.bias is None
  x = jax.random.normal(jax.random.key(0), (5, 64))
  y = head(x)
  assert y.shape == (5, 128) and y.dtype == jnp.float32
  # Independent computation: Linear -> batch-stat BN -> ReLU -> Linear.
  h = x @ head.linear1.kernel.get_value() + head.linear1.bias.get_value()
  h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
  ref = jax.nn.relu(h) @ head.linear2.kernel.get_value()
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_torch_like_linear_init():
  head = heads_lib.ProjectionHead(256, rngs=nnx.Rngs(0))
  k = np.asarray(head.linear1.kernel.get_value())
  b = np.asarray(head.linear1.bias.get_value())
  bound = 1 / np.sqrt(256)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
  assert np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound


def test_keypoint_head_layout():
  head = heads_lib.KeypointHead(16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 16))
  y = head(x)
  assert y.shape == (3, 21, 3)
  flat = x @ head.linear.kernel.get_value() + head.linear.bias.get_value()
  # Output 3j + k is joint j, component k (torch's .view(-1, 21, 3)).
  np.testing.assert_allclose(y[:, 5, 2], flat[:, 17], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[:, 20, 0], flat[:, 60], rtol=1e-5, atol=1e-6)


def torch_zroot_reference(sd, kp3d_unnorm, zrel, train):
  """Public code's z-root refinement (eq. 6-7, detach, clamp, MLP), in torch."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  r, zr = t(kp3d_unnorm), t(zrel)[..., None]
  xm, ym, xn, yn = r[:, 3:4, 0:1], r[:, 3:4, 1:2], r[:, 8:9, 0:1], r[:, 8:9, 1:2]
  zm, zn = zr[:, 3:4], zr[:, 8:9]
  a = (xn - xm) ** 2 + (yn - ym) ** 2
  b = 2 * (zn * (xn**2 + yn**2 - xn * xm - yn * ym) + zm * (xm**2 + ym**2 - xn * xm - yn * ym))
  c = (xn * zn - xm * zm) ** 2 + (yn * zn - ym * zm) ** 2 + (zn - zm) ** 2 - 1
  d = b**2 - 4 * a * c
  eps = torch.tensor(1e-8)
  a, d = torch.maximum(eps, a), torch.maximum(eps, d)
  z = torch.clamp(((-b + torch.sqrt(d)) / (2 * a)).detach(), 4.0, 50.0)
  h = torch.cat([zr.reshape(-1, 21), r[..., :2].reshape(-1, 42), z.reshape(-1, 1)], dim=1)
  for i in (1, 2):
    h = h @ t(sd[f"linear{i}.weight"]).T + t(sd[f"linear{i}.bias"])
    h = F.batch_norm(
      h,
      t(sd[f"bn{i}.running_mean"]),
      t(sd[f"bn{i}.running_var"]),
      t(sd[f"bn{i}.weight"]),
      t(sd[f"bn{i}.bias"]),
      training=train,
      eps=1e-5,
    )
    h = F.leaky_relu(h)
  h = h @ t(sd["linear3.weight"]).T + t(sd["linear3.bias"])
  return (z + h.reshape(z.shape)).reshape(-1).numpy()


def _hand(n, seed, depth=0.4, size=128.0):
  """Random 3D hands (metres, palm = joint 0, 3 cm reference bone) in view."""
  rng = np.random.default_rng(seed)
  xyz = rng.normal(0, 0.03, (n, 21, 3))
  xyz[:, 0] = 0.0
  direction = rng.normal(size=(n, 3))
  direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
  xyz[:, 8] = xyz[:, 3] + 0.03 * direction
  xyz += np.array([0.02, -0.01, depth]) + rng.normal(0, 0.01, (n, 1, 3))
  K = np.array(models.default_intrinsics(int(size)))
  K = np.broadcast_to(K, (n, 3, 3)).copy()
  K[:, 0, 0] *= rng.uniform(0.9, 1.1, n)
  uv, zrel, bone = geometry.xyz_to_uvd(jnp.asarray(xyz, jnp.float32), jnp.asarray(K, jnp.float32))
  return (xyz, np.array(uv), np.array(zrel), np.array(bone), K.astype(np.float32))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_zroot_refiner_matches_public_code_order(train):
  refiner = heads_lib.ZRootRefiner(rngs=nnx.Rngs(0))
  _randomise_bn_stats(refiner, seed=1)
  xyz, uv, zrel, _, K = _hand(6, seed=0)
  # Shrink / enlarge two hands about the principal point (far / near) so both
  # ends of the [4, 50] clamp are exercised.
  c = K[:, :2, 2][:, None]
  uv[0] = c[0] + (uv[0] - c[0]) * 0.05
  uv[1] = c[1] + (uv[1] - c[1]) * 5.0
  z0 = refiner.initial_zroot(jnp.asarray(uv), jnp.asarray(zrel), jnp.asarray(K))
  np.testing.assert_allclose(z0[:2], [50.0, 4.0])
  assert bool(jnp.all((z0[2:] > 4) & (z0[2:] < 50)))
  if train:
    refiner.train()
  else:
    refiner.eval()
  ours = np.asarray(refiner(jnp.asarray(uv), jnp.asarray(zrel), jnp.asarray(K)))
  rays = np.asarray(geometry.unproject(jnp.asarray(uv), jnp.ones((6, 21)), jnp.asarray(K)))
  sd = to_torch_state_dict(refiner)
  ref = torch_zroot_reference(sd, rays, zrel, train)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_zroot_closed_form_stops_gradient():
  refiner = heads_lib.ZRootRefiner(rngs=nnx.Rngs(0))
  _, uv, zrel, _, K = _hand(3, seed=1)
  uv, zrel, K = map(jnp.asarray, (uv, zrel, K))
  g_uv, g_z = jax.grad(lambda u, z: refiner.initial_zroot(u, z, K).sum(), argnums=(0, 1))(uv, zrel)
  assert float(jnp.abs(g_uv).max()) == 0.0
  assert float(jnp.abs(g_z).max()) == 0.0
  # Without the stop the same expression has a gradient (the check can fail).
  g_free = jax.grad(lambda u: geometry.solve_zroot(u, zrel, K).sum())(uv)
  assert float(jnp.abs(g_free).max()) > 0.0


# --------------------------------------------------------------------------
# Full models
# --------------------------------------------------------------------------


def test_peclr_model():
  model = models.PeCLRModel("resnet_tiny", rngs=nnx.Rngs(0))
  assert model.projection.linear1.kernel.get_value().shape == (64, 512)
  y = model(jnp.ones((4, 32, 32, 3)))
  assert y.shape == (4, 128) and y.dtype == jnp.float32


def _fix_head(model, raw):
  """Makes the keypoint head output `raw` [21, 3] for any image."""
  model.keypoint_head.linear.kernel.set_value(
    jnp.zeros_like(model.keypoint_head.linear.kernel.get_value())
  )
  model.keypoint_head.linear.bias.set_value(jnp.asarray(raw, jnp.float32).reshape(63))


def _zero_refiner_output(model):
  lin = model.zroot_refiner.linear3
  lin.kernel.set_value(jnp.zeros_like(lin.kernel.get_value()))
  lin.bias.set_value(jnp.zeros_like(lin.bias.get_value()))


@pytest.mark.parametrize("uv_units", ["pixels", "normalized"])
def test_keypoint_model_recovers_known_hand(uv_units):
  size = 32
  model = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), uv_units=uv_units)
  _zero_refiner_output(model)
  xyz, uv, zrel, bone, K = _hand(1, seed=3, size=size)
  raw_uv = uv[0] if uv_units == "pixels" else uv[0] / (size / 2) - 1
  raw_z = zrel[0].copy()
  raw_z[0] = 0.7  # must be overridden: the root's z_rel is 0 by definition
  _fix_head(model, np.concatenate([raw_uv, raw_z[:, None]], -1))
  images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  K2 = jnp.asarray(np.repeat(K, 2, 0))
  out = model(images, K2)
  assert set(out) == {"kp2d", "zrel", "zroot", "kp3d"}
  for k, shape in [("kp2d", (2, 21, 2)), ("zrel", (2, 21)), ("zroot", (2,)), ("kp3d", (2, 21, 3))]:
    assert out[k].shape == shape and out[k].dtype == jnp.float32
  np.testing.assert_allclose(out["kp2d"][0], uv[0], rtol=1e-5, atol=1e-3)
  assert float(out["zrel"][0, 0]) == 0.0
  # Known answer: metric hand / bone length, and z_root = depth / bone.
  np.testing.assert_allclose(out["zroot"][0], xyz[0, 0, 2] / bone[0], rtol=1e-3)
  np.testing.assert_allclose(out["kp3d"][0], xyz[0] / bone[0], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(out["kp3d"][0, 8] - out["kp3d"][0, 3]), 1.0, rtol=1e-3)
  # kp3d is rays * (z_rel + z_root) with the returned quantities.
  rays = geometry.unproject(out["kp2d"], jnp.ones((2, 21)), K2)
  np.testing.assert_allclose(
    out["kp3d"], rays * (out["zrel"] + out["zroot"][:, None])[..., None], rtol=1e-5, atol=1e-5
  )


def test_keypoint_model_default_K_and_clamp():
  size = 32
  model = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), uv_units="pixels")
  _zero_refiner_output(model)
  K224 = np.asarray(models.default_intrinsics(224))
  np.testing.assert_allclose(K224, [[388.9018, 0, 112], [0, 388.7123, 112], [0, 0, 1]], rtol=1e-6)
  scaled = np.array(
    [[K224[0, 0] * size / 224, 0, size / 2], [0, K224[1, 1] * size / 224, size / 2], [0, 0, 1]]
  )
  np.testing.assert_allclose(models.default_intrinsics(size), scaled, rtol=1e-6)
  # A hand 10 m away (z_root far above 50 bone lengths) clamps to 50.
  xyz, uv, zrel, _, K = _hand(1, seed=4, depth=10.0, size=size)
  _fix_head(model, np.concatenate([uv[0], zrel[0][:, None]], -1))
  images = jnp.zeros((2, size, size, 3))
  out_default = model(images)
  out_explicit = model(images, jnp.broadcast_to(models.default_intrinsics(size), (2, 3, 3)))
  np.testing.assert_allclose(out_default["kp3d"], out_explicit["kp3d"])
  np.testing.assert_allclose(out_default["zroot"], 50.0)


def test_keypoint_model_gradients():
  model = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), uv_units="pixels")
  _zero_refiner_output(model)
  _, uv, zrel, _, K = _hand(1, seed=5, size=32)
  _fix_head(model, np.concatenate([uv[0], zrel[0][:, None]], -1))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  K2 = jnp.asarray(np.repeat(K, 2, 0))

  def zroot_sum(m):
    return m(images, K2)["zroot"].sum()

  heads_only = nnx.DiffState(
    0,
    nnx.All(
      nnx.Param, nnx.Any(nnx.PathContains("keypoint_head"), nnx.PathContains("zroot_refiner"))
    ),
  )
  grads = nnx.grad(zroot_sum, argnums=heads_only)(model)
  assert "backbone" not in grads
  # The closed form is gradient-stopped and linear3 is zero, so nothing
  # reaches the keypoint head through z_root; only linear3 gets a gradient.
  head_g = grads["keypoint_head"]
  assert _count(head_g) > 0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(head_g)) == 0.0
  np.testing.assert_allclose(grads["zroot_refiner"]["linear3"]["bias"][...], [2.0])
  # kp3d still back-propagates into the head (through uv and z_rel).
  g3 = nnx.grad(lambda m: m(images, K2)["kp3d"].sum(), argnums=heads_only)(model)
  assert float(jnp.abs(g3["keypoint_head"]["linear"]["bias"][...]).max()) > 0


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------


def test_bfloat16_compute_float32_params_and_outputs():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  m32 = models.PeCLRModel("resnet_tiny", rngs=nnx.Rngs(0))
  m16 = models.PeCLRModel("resnet_tiny", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(nnx.state(m16)):
    assert leaf.dtype == jnp.float32
  y32, y16 = m32(x), m16(x)
  assert y16.dtype == jnp.float32
  # Same weights: close, but not bit-identical (the compute really is bf16).
  assert not np.array_equal(y32, y16)
  np.testing.assert_allclose(y16, y32, atol=0.15 * float(jnp.abs(y32).max()))
  for leaf in jax.tree.leaves(nnx.state(m16, nnx.BatchStat)):
    assert leaf.dtype == jnp.float32

  k16 = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), dtype="bfloat16")
  out = k16(x)
  for v in out.values():
    assert v.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(v)))
  for leaf in jax.tree.leaves(nnx.state(k16)):
    assert leaf.dtype == jnp.float32


def test_identical_models_share_graphdef():
  # Equal graphdefs: a jitted step compiled for one instance is reused for
  # another (and split/merge across instances works).
  make = lambda seed: nnx.eval_shape(
    lambda: models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(seed), dtype="bfloat16")
  )
  assert nnx.graphdef(make(0)) == nnx.graphdef(make(1))


# ------------------------------------------------------------ heatmap head --


def test_integral_2p5d_known_answers():
  n, h, w, j, s = 2, 4, 4, 21, 8
  depth = jax.random.normal(jax.random.key(0), (n, h, w, j))
  # One-hot heatmaps: joint k peaks at cell (row k % h, column k // h % w).
  rows, cols = np.arange(j) % h, (np.arange(j) // h) % w
  logits = np.full((n, h, w, j), -1e4, np.float32)
  logits[:, rows, cols, np.arange(j)] = 0.0
  out = heads_lib.integral_2p5d(jnp.asarray(logits), depth, s)
  assert out.shape == (n, j, 3) and out.dtype == jnp.float32
  # Cell (i, c) covers pixels [c s, c s + s): centre c s + (s - 1) / 2.
  np.testing.assert_allclose(out[0, :, 0], cols * s + (s - 1) / 2)
  np.testing.assert_allclose(out[0, :, 1], rows * s + (s - 1) / 2)
  np.testing.assert_allclose(out[..., 2], depth[:, rows, cols, np.arange(j)], rtol=1e-6)
  # Uniform heatmaps: the image centre (S - 1) / 2 and the mean depth.
  flat = heads_lib.integral_2p5d(jnp.zeros((n, h, w, j)), depth, s)
  np.testing.assert_allclose(flat[..., :2], (h * s - 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(flat[..., 2], depth.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_heatmap_skip_head_is_the_plain_head_plus_its_skips():
  # The skips are added 1x1 projections of earlier stages: with their
  # kernels zero the head is the plain head with the same weights.
  backbone = resnet_lib.get_backbone("resnet_tiny", rngs=nnx.Rngs(0))
  feature_maps = nnx.jit(lambda b, x: b.feature_maps(x))
  stages = feature_maps(backbone, jax.random.normal(jax.random.key(0), (2, 64, 64, 3)))
  assert [int(s.shape[-1]) for s in stages] == list(backbone.stage_features)
  skip = heads_lib.HeatmapHead(
    backbone.num_features, skip_features=backbone.stage_features, rngs=nnx.Rngs(1)
  )
  plain = heads_lib.HeatmapHead(backbone.num_features, rngs=nnx.Rngs(2))
  for part in ("up_convs", "up_bns", "out"):
    nnx.update(getattr(plain, part), nnx.state(getattr(skip, part)))
  with_skips = skip(stages)
  assert with_skips.shape == (2, 21, 3)
  assert float(jnp.abs(with_skips - plain(stages)).max()) > 1e-3
  lateral_kernels = [lateral.kernel.get_value() for lateral in skip.laterals]
  for lateral in skip.laterals:
    lateral.kernel.set_value(jnp.zeros_like(lateral.kernel.get_value()))
  np.testing.assert_allclose(skip(stages), plain(stages), rtol=1e-6, atol=1e-5)
  # 100 px is no multiple of 32: stages of 25, 13, 7 and 4 cells, so each x2
  # map (8, 14, 26) is cropped to the stage it meets, and the stride-4 grid
  # covers the 100 px exactly.
  for lateral, kernel in zip(skip.laterals, lateral_kernels):
    lateral.kernel.set_value(kernel)
  stages = feature_maps(backbone, jax.random.normal(jax.random.key(1), (2, 100, 100, 3)))
  assert [int(s.shape[1]) for s in stages] == [25, 13, 7, 4]
  assert skip.maps(stages)[0].shape == (2, 25, 25, 21)


def test_heatmap_keypoint_model_outputs_and_gradients():
  size = 64
  model = models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), head="heatmap")
  assert model.uv_units == "pixels"
  assert model.keypoint_head.stride == 4
  images = jax.random.normal(jax.random.key(0), (3, size, size, 3))
  K = jnp.broadcast_to(models.default_intrinsics(size), (3, 3, 3))
  # Jitted: op-by-op execution of the model and its gradient took ~30 s.
  out = nnx.jit(lambda m, x, k: m(x, k))(model, images, K)
  assert out["kp2d"].shape == (3, 21, 2) and out["kp3d"].shape == (3, 21, 3)
  # Soft-argmax stays inside the outermost cell centres.
  assert float(out["kp2d"].min()) >= 1.5 and float(out["kp2d"].max()) <= 62.5
  assert float(jnp.abs(out["zrel"][:, 0]).max()) == 0.0
  rays = geometry.unproject(out["kp2d"], jnp.ones((3, 21)), K)
  np.testing.assert_allclose(
    out["kp3d"], rays * (out["zrel"] + out["zroot"][:, None])[..., None], rtol=1e-5, atol=1e-5
  )
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(images, K)["kp2d"])))(model)
  stem = grads["backbone"]["conv1"]["kernel"].get_value()
  assert float(jnp.abs(stem).max()) > 0  # the 2D loss reaches the backbone
  with pytest.raises(ValueError, match="head"):
    models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), head="deconv")
