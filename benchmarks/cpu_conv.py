"""Convolution formulations that suit XLA:CPU better; run it for a parity check.

Why (measured, BENCHMARKS.md "What holds the CPU step back"): XLA:CPU lowers
the kernel gradient of a convolution to another convolution whose operands
are the activations and output gradients with batch and feature axes swapped.
Its layout assignment then materialises both as transposed copies
([N,H,W,C] -> [C,H,W,N] and [H,W,N,C]) and fuses the producers' elementwise
work (BatchNorm, ReLU, residual adds) into those transposes, so the forward
elementwise chain is recomputed with strided writes. In the ResNet-50 step
those transposes took about a third of all thunk time, and the swapped-axis
convolutions themselves run at a fraction of the forward convolutions' rate.

The alternatives here keep the model's parameters and outputs exactly (same
HWIO kernels, same padding) and change only how XLA sees the arithmetic:

* `dot1x1`: 1x1 convolutions (about half of ResNet-50's FLOPs) as a dot over
  the channel axis (stride 2: slice first). Their gradients become plain
  dots; 3x3/7x7 convolutions stay native.
* `wgrad_dot`: as `dot1x1`, and the kernel gradient of every other
  convolution as im2col^T @ dy (a custom VJP); forward and input gradient stay
  native convolutions.
* `im2col`: every convolution as patches @ kernel (autodiff derives the rest).
* `...+barrier` / `barrier`: the same with `lax.optimization_barrier` on each
  convolution's input and output (see `with_barriers`).

`install(name)` makes `peclr_jax.models.resnet` build its convs with one of
them through `nnx.Conv(conv_general_dilated=...)`, the hook flax offers; the
package change this suggests is the same one line in `resnet._conv`.
"""

import functools
import json

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _window(x, w, strides, padding):
  kh, kw, _, _ = w.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  _, h, wd, _ = x.shape
  return (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1


def patches(x, w, strides, padding):
  """im2col: [N, Ho, Wo, kh*kw*Cin] in the order of w.reshape(-1, Cout)."""
  kh, kw, _, _ = w.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  ho, wo = _window(x, w, strides, padding)
  if kh == kw == 1 and pt == pb == pl == pr == 0:
    return x[:, ::sh, ::sw, :][:, :ho, :wo]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def _channel_dot(p, w2):
  # As a 2-D matmul: XLA:CPU then needs no transposed copies for the
  # gradients (a 4-D dot_general measured about 2x slower fwd+bwd).
  y = jnp.dot(p.reshape(-1, p.shape[-1]), w2)
  return y.reshape(p.shape[:-1] + (w2.shape[-1],))


def _native(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _check(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count):
  # Only what the ResNets use: NHWC/HWIO, no dilation, no groups.
  ok_dil = lambda d: d is None or all(v == 1 for v in d)
  if not (ok_dil(lhs_dilation) and ok_dil(rhs_dilation)
          and feature_group_count == 1):
    raise NotImplementedError("dilated or grouped convolutions")
  del dimension_numbers


def conv_im2col(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **unused):
  del precision, unused
  _check(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count)
  kh, kw, cin, cout = rhs.shape
  return _channel_dot(patches(lhs, rhs, window_strides, padding),
                      rhs.reshape(kh * kw * cin, cout))


def conv_dot1x1(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **unused):
  del precision, unused
  _check(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count)
  kh, kw, cin, cout = rhs.shape
  if kh == kw == 1:
    return _channel_dot(patches(lhs, rhs, window_strides, padding),
                        rhs.reshape(cin, cout))
  return _native(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_dot_wgrad(x, w, strides, padding):
  return _native(x, w, strides, padding)


def _wgrad_fwd(x, w, strides, padding):
  return _native(x, w, strides, padding), (x, w)


def _wgrad_bwd(strides, padding, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _native(x_, w, strides, padding), x)
  dx, = vjp_x(g)
  p = patches(x, w, strides, padding)
  dw = lax.dot_general(p.reshape(-1, p.shape[-1]),
                       g.reshape(-1, w.shape[-1]).astype(p.dtype),
                       (((0,), (0,)), ((), ())))
  return dx, dw.reshape(w.shape).astype(w.dtype)


_conv_dot_wgrad.defvjp(_wgrad_fwd, _wgrad_bwd)


def conv_wgrad_dot(lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None,
                   feature_group_count=1, precision=None, **unused):
  del precision, unused
  _check(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count)
  kh, kw, _, _ = rhs.shape
  if kh == kw == 1:
    return conv_dot1x1(lhs, rhs, window_strides, padding)
  return _conv_dot_wgrad(lhs, rhs, tuple(window_strides),
                         tuple(map(tuple, padding)))


def conv_native(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **unused):
  del precision, unused
  _check(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count)
  return _native(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


def with_barriers(fn):
  """conv(barrier(x)) -> barrier(y): x, y and (by the barrier's transpose
  rule) dy are materialised once, so XLA cannot fuse (and so recompute) the
  elementwise chains that produce them into every consumer, e.g. the
  transposed copies the kernel gradient needs."""
  barrier = lax.optimization_barrier

  def conv(lhs, rhs, *a, **k):
    return barrier(fn(barrier(lhs), rhs, *a, **k))

  conv.__name__ = f"{getattr(fn, '__name__', 'conv')}_barrier"
  return conv


def max_pool_3x3_s2(x):
  """torch MaxPool2d(3, 2, padding=1) as the max of 9 strided slices.

  The same values as `nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`;
  its gradient is elementwise selects and pads instead of the variadic
  reduce-window (argmax with iotas) and scatter XLA:CPU runs for the
  reduce_window VJP. Ties send the gradient to every maximal input (they only
  occur between zeros after a ReLU, whose gradient is zero anyway).
  """
  n, h, w, c = x.shape
  ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      s = xp[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2, :]
      out = s if out is None else jnp.maximum(out, s)
  return out


@jax.custom_vjp
def max_pool_3x3_s2_eq(x):
  """`max_pool_3x3_s2` whose VJP routes g to every input equal to its window
  max: 9 compares and interior-padded adds, fused into one pass."""
  return max_pool_3x3_s2(x)


def _mp_fwd(x):
  out = max_pool_3x3_s2(x)
  return out, (x, out)


def _mp_bwd(res, g):
  x, out = res
  n, h, w, c = x.shape
  ho, wo = out.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  zero = jnp.zeros((), g.dtype)
  dxp = None
  for i in range(3):
    for j in range(3):
      s = xp[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2, :]
      contrib = jnp.where(s == out, g, zero)
      # Back onto the padded grid: offset (i, j), stride 2 (interior 1).
      padded = lax.pad(contrib, zero, ((0, 0, 0),
                                      (i, h + 2 - i - (2 * (ho - 1) + 1), 1),
                                      (j, w + 2 - j - (2 * (wo - 1) + 1), 1),
                                      (0, 0, 0)))
      dxp = padded if dxp is None else dxp + padded
  return (dxp[:, 1:h + 1, 1:w + 1, :],)


max_pool_3x3_s2_eq.defvjp(_mp_fwd, _mp_bwd)


_POOL = [max_pool_3x3_s2]


def install_max_pool_eq():
  """As install_max_pool, with the equality-mask VJP (`max_pool_3x3_s2_eq`)."""
  _POOL[0] = max_pool_3x3_s2_eq
  install_max_pool()


def install_max_pool():
  """Routes the ResNet stem's `nnx.max_pool` call to `max_pool_3x3_s2`
  (or what install_max_pool_eq chose)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  original = nnx.max_pool

  def max_pool(x, window_shape, strides=None, padding="VALID"):
    if (tuple(window_shape) == (3, 3) and tuple(strides) == (2, 2)
        and tuple(map(tuple, padding)) == ((1, 1), (1, 1))):
      return _POOL[0](x)
    return original(x, window_shape, strides, padding)

  class _Nnx:  # the resnet module's view of `nnx`, with max_pool replaced
    def __getattr__(self, name):
      return max_pool if name == "max_pool" else getattr(nnx, name)

  resnet.nnx = _Nnx()


IMPLS = {"package": None, "dot1x1": conv_dot1x1, "wgrad_dot": conv_wgrad_dot,
         "im2col": conv_im2col, "barrier": with_barriers(conv_native),
         "dot1x1+barrier": with_barriers(conv_dot1x1),
         "wgrad_dot+barrier": with_barriers(conv_wgrad_dot)}


def install_fast_variance():
  """ResNet BatchNorms with use_fast_variance=True (E[x^2] - E[x]^2)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top

  def _bn(num_features, *, rngs, dtype):
    return nnx.BatchNorm(
        num_features, use_running_average=False, momentum=resnet.BN_MOMENTUM,
        epsilon=resnet.BN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
        use_fast_variance=True, rngs=rngs)

  resnet._bn = _bn  # pylint: disable=protected-access


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """Training-mode BatchNorm over all but the last axis with torch's backward.

  Returns (y, batch mean, biased batch variance); statistics in float32 with
  the two-pass variance (as `use_fast_variance=False`). The VJP is the
  closed form dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)):
  two reductions and one elementwise pass, instead of the chain autodiff
  derives from the forward ops.
  """
  return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_stats(x):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axes)
  var = jnp.mean(jnp.square(x32 - mean), axes)
  return x32, mean, var


def _bn_fwd(x, scale, bias, epsilon):
  x32, mean, var = _bn_stats(x)
  inv = lax.rsqrt(var + epsilon)
  y = ((x32 - mean) * (inv * scale) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _bn_bwd(epsilon, res, cts):
  del epsilon
  g = cts[0]  # the statistics' cotangents only feed running averages: zero
  x, mean, inv, scale = res
  axes = tuple(range(x.ndim - 1))
  g32 = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * inv
  dbias = jnp.sum(g32, axes)
  dscale = jnp.sum(g32 * xhat, axes)
  n = x.size // x.shape[-1]
  dx = (scale * inv) * (g32 - dbias / n - xhat * (dscale / n))
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def install_custom_bn():
  """ResNet BatchNorms whose training path is `batch_norm_train` (same
  parameter and statistic names as nnx.BatchNorm: scale, bias, mean, var)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top

  class BatchNorm(nnx.Module):

    def __init__(self, num_features, *, rngs, dtype):
      del rngs
      self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
      self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
      self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
      self.use_running_average = False
      self.momentum, self.epsilon = resnet.BN_MOMENTUM, resnet.BN_EPSILON
      self.dtype = dtype

    def __call__(self, x):
      if self.use_running_average:
        inv = lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
        y = (x.astype(jnp.float32) - self.mean[...]) * inv + self.bias[...]
        return y.astype(self.dtype)
      y, mean, var = batch_norm_train(
          jnp.asarray(x, self.dtype), self.scale[...], self.bias[...],
          self.epsilon)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1 - m) * lax.stop_gradient(var)
      return y

  def _bn(num_features, *, rngs, dtype):
    return BatchNorm(num_features, rngs=rngs, dtype=dtype)

  resnet._bn = _bn  # pylint: disable=protected-access


def install_block_barrier():
  """Materialises every residual block's input with an optimization barrier.

  The block input feeds conv1 and the shortcut add; unmaterialised, XLA
  fuses the whole chain of earlier blocks' BatchNorm/add/ReLU into each
  consumer (fusions with 20-37 inputs were seen), recomputing it.
  """
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  for cls in (resnet.Bottleneck, resnet.BasicBlock):
    original = cls.__call__

    def call(self, x, _original=original):
      return _original(self, lax.optimization_barrier(x))

    cls.__call__ = call


def materialise(x):
  """x, computed once and stored: a conditional on a runtime predicate.

  XLA:CPU duplicates cheap elementwise producers into every consumer fusion
  (recomputing e.g. a chain of BatchNorm/add/ReLU per consumer), and it
  expands `optimization_barrier` before fusion, so a barrier cannot stop
  that. A conditional's operands and results are buffers, which does. The
  predicate (first element is not NaN) is true for any finite x; a NaN
  there turns the whole result into NaN, which a training run stops on.
  """
  first = x.reshape(-1)[0]
  return lax.cond(first == first, lambda v: v, lambda v: v * jnp.nan, x)


def install_block_cond():
  """`materialise` on every residual block's input (see `materialise`)."""
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  for cls in (resnet.Bottleneck, resnet.BasicBlock):
    original = cls.__call__

    def call(self, x, _original=original):
      return _original(self, materialise(x))

    cls.__call__ = call


SUFFIXES = (("+blockcond", install_block_cond),("+fastvar", install_fast_variance), ("+pool", install_max_pool),
            ("+custombn", install_custom_bn), ("+pooleq", install_max_pool_eq),
            ("+blockbarrier", install_block_barrier))


def saved_state():
  """What `install` changes, to put back with `restore`."""
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  return (resnet._conv, resnet._bn, resnet.nnx,  # pylint: disable=protected-access
          resnet.Bottleneck.__call__, resnet.BasicBlock.__call__)


def restore(saved):
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  (resnet._conv, resnet._bn, resnet.nnx,  # pylint: disable=protected-access
   resnet.Bottleneck.__call__, resnet.BasicBlock.__call__) = saved


def install(name: str):
  """Builds `peclr_jax.models.resnet` convs with IMPLS[name] from now on.

  Suffixes (any order): "+pool": the stem max-pool uses `max_pool_3x3_s2`;
  "+blockcond": every residual block's input `materialise`d;
  "+fastvar": BatchNorm with use_fast_variance=True; "+custombn":
  BatchNorm with a closed-form VJP (`batch_norm_train`); "+blockbarrier": an
  optimization barrier on every residual block's input.
  """
  changed = True
  while changed:
    changed = False
    for suffix, fn in SUFFIXES:
      if name.endswith(suffix):
        fn()
        name = name[:-len(suffix)] or "package"
        changed = True
  fn = IMPLS[name]
  if fn is None:
    return
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top

  def _conv(in_ch, out_ch, kernel, stride, pad, *, rngs, dtype):
    return nnx.Conv(
        in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=resnet.conv_init, rngs=rngs,
        conv_general_dilated=fn)

  resnet._conv = _conv  # pylint: disable=protected-access


def parity() -> dict:
  """Max |difference| of value and both gradients against lax's conv."""
  key = jax.random.key(0)
  out = {}
  for k, s, p, cin in [(1, 1, 0, 16), (1, 2, 0, 16), (3, 1, 1, 8),
                       (3, 2, 1, 8), (7, 2, 3, 3)]:
    kx, kw = jax.random.split(jax.random.fold_in(key, k * 10 + s))
    x = jax.random.normal(kx, (2, 16, 16, cin))
    w = jax.random.normal(kw, (k, k, cin, 5))
    pad = ((p, p), (p, p))
    ref = lambda x, w: jnp.sum(jnp.sin(_native(x, w, (s, s), pad)))
    rv, rg = jax.value_and_grad(ref, (0, 1))(x, w)
    for name, fn in IMPLS.items():
      if fn is None:
        continue
      f = lambda x, w, fn=fn: jnp.sum(jnp.sin(fn(x, w, (s, s), pad)))
      v, g = jax.value_and_grad(f, (0, 1))(x, w)
      err = max(float(jnp.max(jnp.abs(v - rv))),
                *(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                  for a, b in zip(g, rg)))
      out[f"{name} k{k} s{s}"] = err
  return out


def bn_parity() -> float:
  """custom-VJP BatchNorm against autodiff of the textbook formula."""
  x = jax.random.normal(jax.random.key(4), (4, 5, 6, 8)) * 3 + 1
  r = jax.random.normal(jax.random.key(5), (4, 5, 6, 8))
  eps = 1e-5

  def ref(x):
    m = jnp.mean(x, (0, 1, 2))
    v = jnp.mean(jnp.square(x - m), (0, 1, 2))
    return (x - m) / jnp.sqrt(v + eps)

  f_ref = lambda x: jnp.sum(jnp.sin(ref(x)) * r)
  f_new = lambda x: jnp.sum(jnp.sin(batch_norm_train(
      x, jnp.ones(8), jnp.zeros(8), eps)[0]) * r)
  (v1, g1), (v2, g2) = jax.value_and_grad(f_ref)(x), jax.value_and_grad(f_new)(x)
  return max(float(jnp.abs(v1 - v2)), float(jnp.max(jnp.abs(g1 - g2))))


def pool_parity() -> float:
  """Both pools against nnx.max_pool: values and (tie-free) gradients."""
  x = jax.random.normal(jax.random.key(3), (2, 17, 16, 4))
  r = jax.random.normal(jax.random.key(6), (2, 9, 8, 4))
  from flax import nnx  # pylint: disable=g-import-not-at-top
  ref = lambda x: nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  err = 0.0
  for fn in (max_pool_3x3_s2, max_pool_3x3_s2_eq):
    err = max(err, float(jnp.max(jnp.abs(fn(x) - ref(x)))))
    g1 = jax.grad(lambda x: jnp.sum(ref(x) * r))(x)
    g2 = jax.grad(lambda x, fn=fn: jnp.sum(fn(x) * r))(x)
    err = max(err, float(jnp.max(jnp.abs(g1 - g2))))
  return err


if __name__ == "__main__":
  errs = parity()
  errs["max_pool value+grad"] = pool_parity()
  errs["batch_norm_train value+grad"] = bn_parity()
  print(json.dumps({"benchmark": "cpu_conv_parity", "max_rel_err": errs,
                    "ok": max(errs.values()) < 1e-4}))
