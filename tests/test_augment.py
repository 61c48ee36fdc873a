"""Tests for peclr_jax.hands.augment: geometry against independent NumPy/SciPy
references, parameter ranges, determinism under jit, colour jitter against
``colorsys``, and the optional appearance augmentations."""

import colorsys
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from peclr_jax.hands import augment as A
from peclr_jax.hands import crops

S = 32  # view size used throughout (tiny on purpose)
MEAN255 = np.round(np.array(A.IMAGENET_MEAN) * 255.0)

# Tolerances are bounds on float32 rounding, in units of EPS. Two correct
# programs may round differently: XLA:CPU contracts a * b + c into an FMA
# where the ISA has one and vectorises by the CPU's cost model, a jitted
# program fuses what op-by-op dispatch does not, a sharded program is compiled
# for other shapes, GPU math libraries are not glibc's. One rounding moves a
# result by at most EPS / 2 of its size, a sum of n terms in any order by
# (n - 1) EPS of the sum of their sizes. Multiples of EPS below count the
# roundings; the sizes come from the data (`_geometry_scales`, `_slope`).
EPS = float(np.finfo(np.float32).eps)
# Roundings between keypoints and a point of a view, or back from a view pixel
# to a source position: hand box, zoom, cos/sin, the matrix, its inverse,
# the grid point (~25). The keypoints' sums are exact (`_ring_keypoints`).
K_GEOM = 32
# Roundings of a source position recomputed from a given matrix by `warp`
# (the closed-form inverse and M^-1 q).
K_WARP = 16


def _ring_keypoints(rng, batch, center, radius):
  """[B, 21, 2] keypoints: 20 inside a disc plus one exactly on its rim, so
  the base half-side is known: max distance from the mean ~ radius."""
  ang = rng.uniform(0, 2 * np.pi, (batch, 21))
  rad = rng.uniform(0, 0.6 * radius, (batch, 21))
  rad[:, 0] = radius
  kp = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], -1)
  # Multiples of 1/64 px below 1024 px: any sum of 21 of them is exact in
  # float32, so every program finds the same hand centre, however it sums.
  return (np.round((kp + np.asarray(center, np.float64)) * 64) / 64).astype(np.float32)


def _norm2(a):
  """Spectral norms of [..., 2, 2] matrices."""
  return np.linalg.norm(np.asarray(a, np.float64), 2, axis=(-2, -1))


def _geometry_scales(mat, points, out_size):
  """Sizes of the terms in the crop geometry of source -> view matrices M =
  [[A, t], [0, 1]] (view px = A (p - c) + S/2 - z j, t = S/2 - z j - A c):

  x_view bounds every term of M p for source points p within |points| of
  the origin (|z j| <= |t| + S + |A| |c|); x_src every term of a source
  position M^-1 q of a view pixel q (|q| <= sqrt(2) S)."""
  m = np.asarray(mat, np.float64)
  a, t = m[..., :2, :2], np.linalg.norm(m[..., :2, 2], axis=-1)
  p = np.linalg.norm(np.asarray(points, np.float64), axis=-1).max()
  x_view = _norm2(a) * 2 * p + t + out_size
  x_src = _norm2(np.linalg.inv(a)) * (np.sqrt(2) * out_size + t) + p
  return float(np.max(x_view)), float(np.max(x_src))


def _slope(img, fill):
  """How fast bilinear sampling of img (0..255, outside it `fill`) can
  change, in 0..1 units per px of source position: the largest step between
  horizontal neighbours plus the largest between vertical ones."""
  img = np.asarray(img, np.float64)
  pad = np.broadcast_to(np.asarray(fill, np.float64), img.shape[-1:])
  b, h, w, ch = img.shape
  big = np.empty((b, h + 2, w + 2, ch))
  big[:] = pad
  big[:, 1:-1, 1:-1] = img
  steps = [np.abs(np.diff(big, axis=ax)).max() for ax in (1, 2)]
  return sum(steps) / 255.0


def _np_box(kp):
  """Independent NumPy hand centre / base half-side (contract definition)."""
  kp = np.asarray(kp, np.float64)
  c = kp.mean(-2)
  h0 = np.sqrt(((kp - c[..., None, :]) ** 2).sum(-1)).max(-1)
  return c, h0


def _np_matrix(c, h0, out_size, rotation, scale, translation):
  """Contract formula, rebuilt from the returned params:
  q = z R (p - c) + S/2 - z j with z = S/(2 m h0), 1/m = scale,
  -z j / S = translation; R = OpenCV getRotationMatrix2D rotation."""
  z = out_size * scale / (2.0 * h0)
  t = np.deg2rad(rotation)
  rot = np.stack([np.stack([np.cos(t), np.sin(t)], -1), np.stack([-np.sin(t), np.cos(t)], -1)], -2)
  a = z[:, None, None] * rot
  shift = out_size / 2.0 + translation * out_size - np.einsum("bij,bj->bi", a, c)
  m = np.zeros((len(z), 3, 3))
  m[:, :2, :2], m[:, :2, 2], m[:, 2, 2] = a, shift, 1.0
  return m


def _np_apply(m, pts):
  """NumPy homogeneous affine map of points [B, J, 2] by [B, 3, 3]."""
  m, pts = np.asarray(m, np.float64), np.asarray(pts, np.float64)
  return np.einsum("bij,bnj->bni", m[:, :2, :2], pts) + m[:, None, :2, 2]


def _cfg(**kw):
  return A.AugmentConfig(out_size=S, **kw)


# Everything runs jitted: eager dispatch of the many small ops is far slower
# than one compile per configuration on the shared 2-core test machine.
_view = jax.jit(A.augment_view, static_argnames=("cfg", "photometric"))
_pair = jax.jit(A.augment_pair, static_argnames=("cfg",))


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def test_warp_matches_scipy_bilinear_with_constant_border():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, (2, 20, 24, 3)).astype(np.float32)
  fill = np.array([10.0, 50.0, 200.0], np.float32)
  mats = np.stack(
    [
      np.asarray(crops.crop_matrix(np.array([11.3, 9.7]), 13.0, 16, 30.0, np.array([4.0, 1.5]))),
      np.array([[1.7, 0.2, -3.1], [-0.4, 1.1, 2.6], [0, 0, 1]], np.float32),
    ]
  )
  out = np.asarray(A.warp(img, mats, (16, 18), fill))
  assert out.shape == (2, 16, 18, 3)
  # Reference: scipy bilinear sampling at M^-1 q with constant taps outside.
  ys, xs = np.mgrid[0:16, 0:18].astype(np.float64)
  for b in range(2):
    inv = np.linalg.inv(mats[b].astype(np.float64))
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    for ch in range(3):
      ref = ndimage.map_coordinates(
        img[b, :, :, ch].astype(np.float64), [sy, sx], order=1, mode="grid-constant", cval=fill[ch]
      )
      # The reference samples at the exact M^-1 q; the warp's own position
      # is off by K_WARP EPS x_src, its four-tap blend by 8 EPS of 255.
      _, x_src = _geometry_scales(mats[b], np.zeros(2), 16)
      tol = 255 * (_slope(img[b : b + 1], fill) * K_WARP * EPS * x_src + 8 * EPS)
      np.testing.assert_allclose(out[b, :, :, ch], ref, rtol=0, atol=tol)
  # The second matrix pushes part of the view off the source: fill shows.
  assert np.any(np.all(np.isclose(out[1], fill, atol=1e-3), -1))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_bright_dot_lands_where_matrix_maps_it(seed):
  rng = np.random.default_rng(seed)
  batch, hw, center = 6, 64, np.array([30.3, 33.7])
  kp = _ring_keypoints(rng, batch, center, 24.0)
  kc, _ = _np_box(kp)
  # Dot at an offset (5, 5) from the hand centre: its direction stays in the
  # view's lower-right quadrant for |theta| <= 45, so with jitter <= 15 px it
  # stays >= ~5 px inside the 32 px view for every draw.
  dot = kc + 5.0
  ys, xs = np.mgrid[0:hw, 0:hw].astype(np.float64)
  blob = 120.0 * np.exp(
    -((xs[None] - dot[:, 0, None, None]) ** 2 + (ys[None] - dot[:, 1, None, None]) ** 2)
    / (2 * 2.0**2)
  )
  img = np.clip(np.round(MEAN255 + blob[..., None]), 0, 255).astype(np.uint8)
  cfg = _cfg(color_jitter=False)
  view, _, mat = _view(jax.random.key(seed), img, kp, cfg=cfg)
  view, mat = np.asarray(view), np.asarray(mat)
  # Background (mean colour) normalises to ~0, so the dot is the only signal.
  wgt = np.clip(view.sum(-1) - 0.3, 0, None)
  vy, vx = np.mgrid[0:S, 0:S]
  found = np.stack([(wgt * vx).sum((1, 2)), (wgt * vy).sum((1, 2))], -1)
  found /= wgt.sum((1, 2))[:, None]
  expect = np.einsum("bij,bj->bi", mat[:, :2, :2], dot) + mat[:, :2, 2]
  assert np.all((expect > 3) & (expect < S - 4))
  np.testing.assert_array_less(np.linalg.norm(found - expect, axis=-1), 0.5)


def test_params_within_ranges():
  rng = np.random.default_rng(1)
  batch = 256
  kp = _ring_keypoints(rng, batch, rng.uniform(12, 20, (batch, 1, 2)), 10.0)
  img = np.zeros((batch, 32, 32, 3), np.uint8)
  _, params, _ = _view(jax.random.key(7), img, kp, cfg=_cfg())
  rot = np.asarray(params["rotation"])
  scale = np.asarray(params["scale"])
  trans = np.asarray(params["translation"])
  assert rot.shape == scale.shape == (batch,) and trans.shape == (batch, 2)
  np.testing.assert_array_equal(rot, np.round(rot))  # whole degrees
  assert rot.min() >= -45 and rot.max() <= 45
  assert rot.min() <= -35 and rot.max() >= 35 and len(np.unique(rot)) > 40
  assert scale.min() >= 1 / 1.5 - 1e-6 and scale.max() <= 1 / 0.9 + 1e-6
  assert scale.max() - scale.min() > 0.3
  # translation = -z j / S with j in [0, 15]^2 source px, z = S*scale/(2 h0).
  _, h0 = _np_box(kp)
  z = S * scale / (2 * h0)
  bound = (15.0 * z / S)[:, None]
  # The sign of -z j / S is exact; its size carries the rounding of the
  # geometry (K_GEOM EPS, relative).
  assert np.all(trans <= 0) and np.all(-trans <= bound * (1 + K_GEOM * EPS))
  assert np.mean(-trans > 0.5 * bound) > 0.3  # spread over the range


def test_wide_fraction_frames_that_share_of_views_wider_and_keeps_the_rest():
  rng = np.random.default_rng(1)
  batch = 512
  kp = _ring_keypoints(rng, batch, rng.uniform(12, 20, (batch, 1, 2)), 10.0)
  img = np.zeros((batch, 32, 32, 3), np.uint8)
  key = jax.random.key(7)
  _, plain, _ = _view(key, img, kp, cfg=_cfg())
  fraction, wide_range = 0.3, (2.0, 3.0)  # disjoint from margin_range (0.9, 1.5)
  cfg = _cfg(wide_fraction=fraction, wide_margin_range=wide_range)
  _, mixed, _ = _view(key, img, kp, cfg=cfg)
  margin, plain_margin = 1 / np.asarray(mixed["scale"]), 1 / np.asarray(plain["scale"])
  wide = margin > 1.75
  # Binomial share within 4 standard deviations.
  assert abs(wide.mean() - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / batch)
  rel = 1e-5  # 1 / (1 / m) in float32: a few roundings of m
  assert np.all(margin[wide] >= wide_range[0] * (1 - rel))
  assert np.all(margin[wide] <= wide_range[1] * (1 + rel))
  assert margin[wide].max() - margin[wide].min() > 0.5
  # The other views are drawn exactly as without wide views.
  np.testing.assert_array_equal(margin[~wide], plain_margin[~wide])


def test_negative_jitter_min_shifts_the_hand_both_ways():
  rng = np.random.default_rng(1)
  batch = 256
  kp = _ring_keypoints(rng, batch, rng.uniform(12, 20, (batch, 1, 2)), 10.0)
  img = np.zeros((batch, 32, 32, 3), np.uint8)
  _, params, _ = _view(jax.random.key(7), img, kp, cfg=_cfg(jitter_min=-15.0))
  scale = np.asarray(params["scale"])
  trans = np.asarray(params["translation"])
  _, h0 = _np_box(kp)
  bound = (15.0 * scale / (2 * h0))[:, None]  # z j / S at |j| = 15
  assert np.all(np.abs(trans) <= bound * (1 + K_GEOM * EPS))
  for side in (trans > 0.5 * bound, trans < -0.5 * bound):
    assert side.mean() > 0.15  # both directions, spread over each half


def test_matrix_equals_documented_formula():
  rng = np.random.default_rng(2)
  batch = 16
  kp = _ring_keypoints(rng, batch, rng.uniform(20, 40, (batch, 1, 2)), 15.0)
  img = np.zeros((batch, 60, 60, 3), np.uint8)
  for key in range(3):
    _, params, mat = _view(jax.random.key(key), img, kp, cfg=_cfg())
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    c, h0 = _np_box(kp)
    ref = _np_matrix(c, h0, S, p["rotation"], p["scale"], p["translation"])
    # float32 against float64 from the same parameters: K_GEOM roundings of
    # the zoom and rotation (relative) and of the terms of t (x_view).
    x_view, _ = _geometry_scales(mat, kp, S)
    mat = np.asarray(mat)
    np.testing.assert_allclose(
      mat[:, :2, :2], ref[:, :2, :2], rtol=0, atol=K_GEOM * EPS * _norm2(ref[:, :2, :2]).max()
    )
    np.testing.assert_allclose(mat[:, :2, 2], ref[:, :2, 2], rtol=0, atol=K_GEOM * EPS * x_view)
    np.testing.assert_array_equal(mat[:, 2], [[0, 0, 1]] * batch)
    # Meaning of `translation`: where the hand centre lands, relative to
    # the view centre, as a fraction of the view size.
    landed = _np_apply(mat, c[:, None])[:, 0]
    np.testing.assert_allclose(
      (landed - S / 2) / S, p["translation"], rtol=0, atol=K_GEOM * EPS * x_view / S
    )


def test_crop_matrix_known_answer_and_inverse():
  c = np.array([[40.0, 25.0]])
  mat = np.asarray(
    crops.crop_matrix(c, np.array([20.0]), 32, np.array([0.0]), np.array([[4.0, 2.0]]))
  )
  # z = 32 / 40 = 0.8: the crop origin c - 20 + j maps to (0, 0). About 8
  # roundings (z, z j, A c, t) of terms up to |A c| = 32 px.
  corner = np.array([[[40 - 20 + 4.0, 25 - 20 + 2.0]]])
  np.testing.assert_allclose(_np_apply(mat, corner), 0.0, atol=8 * EPS * 32)
  # cos 0 and sin 0 are exact; 32 / 40 is one division (GPU: 2 ulp).
  np.testing.assert_allclose(mat[0, :2, :2], 0.8 * np.eye(2), rtol=0, atol=2 * EPS)
  m = np.asarray(crops.crop_matrix(c, np.array([13.0]), 32, np.array([33.0])))
  # Checked in float64: only the float32 inverse's error remains, a few EPS
  # of A^-1 (det and a division) and of the terms of -A^-1 t.
  prod = np.asarray(A.invert_affine(m), np.float64) @ m.astype(np.float64)
  a_inv = _norm2(np.linalg.inv(m[0, :2, :2].astype(np.float64)))
  np.testing.assert_allclose(
    prod[0, :2, :2], np.eye(2), rtol=0, atol=8 * EPS * a_inv * _norm2(m[0, :2, :2])
  )
  np.testing.assert_allclose(
    prod[0, :2, 2], 0.0, rtol=0, atol=8 * EPS * a_inv * np.linalg.norm(m[0, :2, 2])
  )
  np.testing.assert_array_equal(prod[0, 2], [0, 0, 1])


def test_positive_rotation_is_counter_clockwise_on_screen():
  c = np.array([[16.0, 16.0]])
  mat = crops.crop_matrix(c, np.array([16.0]), S, np.array([90.0]))  # z = 1
  right = np.array([[[26.0, 16.0]]])  # 10 px right of the centre
  q = _np_apply(mat, right)[0, 0]
  # float32 cos(deg2rad(90)) is -4.4e-8, not 0 (x 26 px), plus ~8
  # roundings of terms up to |A c| = 23 px.
  np.testing.assert_allclose(q, [16.0, 6.0], atol=16 * EPS * 32)  # 10 px above
  mat45 = crops.crop_matrix(c, np.array([16.0]), S, np.array([45.0]))
  q45 = _np_apply(mat45, right)[0, 0]
  assert q45[0] > 16 and q45[1] < 16  # up-right: CCW on screen
  # The image content follows the matrix: a dot right of centre shows above.
  img = np.zeros((1, 32, 32, 1), np.float32)
  img[0, 16, 26] = 1.0
  out = np.asarray(A.warp(img, mat, S))[0, :, :, 0]
  assert np.unravel_index(np.argmax(out), out.shape) == (6, 16)


def test_degenerate_keypoints_fall_back_to_whole_image():
  img = np.full((2, 24, 40, 3), 200, np.uint8)
  kp = np.zeros((2, 21, 2), np.float32)  # missing labels
  view, _, mat = _view(jax.random.key(0), img, kp, cfg=_cfg(rotate=False, crop=False))
  assert np.all(np.isfinite(np.asarray(view)))
  # Whole image: centre (20, 12), half-side 20, margin 1.25 -> z = 32 / 50.
  # 1.25 * 20 and 2 * 25 are exact, 32 / 50 is one division (GPU: 2 ulp).
  np.testing.assert_allclose(np.asarray(mat)[:, 0, 0], 32 / 50, rtol=4 * EPS)
  centre = np.broadcast_to([[[20.0, 12.0]]], (2, 1, 2))
  x_view, _ = _geometry_scales(mat, centre, S)
  np.testing.assert_allclose(_np_apply(mat, centre), S / 2, rtol=0, atol=K_GEOM * EPS * x_view)


# --------------------------------------------------------------------------
# Determinism, jit, geometric-only path, sharding
# --------------------------------------------------------------------------


def _small_batch(batch=4, hw=40, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (batch, hw, hw, 3), dtype=np.uint8)
  kp = _ring_keypoints(rng, batch, (hw / 2, hw / 2), hw / 4)
  return img, kp


def test_jit_determinism_and_key_dependence():
  img, kp = _small_batch()
  cfg = _cfg(blur=True, noise=True, cutout=True, color_drop=True)
  f = partial(_pair, cfg=cfg)
  (a1, a2), (pa1, _), (ma1, _) = f(jax.random.key(3), img, kp)
  (b1, b2), (pb1, _), _ = f(jax.random.key(3), img, kp)
  (c1, _), _, _ = f(jax.random.key(4), img, kp)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(b1))
  np.testing.assert_array_equal(np.asarray(a2), np.asarray(b2))
  np.testing.assert_array_equal(np.asarray(pa1["rotation"]), np.asarray(pb1["rotation"]))
  assert a1.shape == (4, S, S, 3) and a1.dtype == jnp.float32
  assert ma1.shape == (4, 3, 3)
  assert np.all(np.isfinite(np.asarray(a1)))
  assert not np.allclose(np.asarray(a1), np.asarray(a2))  # two views differ
  assert not np.allclose(np.asarray(a1), np.asarray(c1))  # keys differ


def test_geometric_only_view_is_normalised_warp_with_zero_border():
  img, kp = _small_batch(seed=5)
  cfg = _cfg(margin_range=(5.0, 5.0))  # crop far larger than the image
  view, _, mat = _view(jax.random.key(1), img, kp, cfg=cfg, photometric=False)
  fill = np.array(A.IMAGENET_MEAN) * 255.0
  ref = A.normalise(A.warp(img, mat, S, fill) / 255.0)
  # Jitted (fused, FMAs) against op by op from the same matrix: the source
  # positions may differ by K_WARP EPS x_src, which bilinear sampling turns
  # into at most slope times that; the blend and normalisation add 8 EPS.
  _, x_src = _geometry_scales(mat, kp, S)
  tol = (_slope(img, fill) * K_WARP * EPS * x_src + 8 * EPS) / min(A.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(view), np.asarray(ref), rtol=0, atol=tol)
  # Border (mean colour) normalises to 0 in the view corner: all four taps
  # outside, so the pixel is the fill itself; / 255, - mean, / std round.
  np.testing.assert_allclose(
    np.asarray(view)[:, 0, 0], 0.0, rtol=0, atol=4 * EPS / min(A.IMAGENET_STD)
  )
  # With colour jitter on (same key -> same geometry) the content changes.
  jit_view, _, mat2 = _view(jax.random.key(1), img, kp, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(mat), np.asarray(mat2))
  assert not np.allclose(np.asarray(view), np.asarray(jit_view), atol=1e-2)


# The colour jitter is Lipschitz away from black and from red's hue wrap.
# With v the max channel, delta = max - min, s = delta / v, h as colorsys,
# the output is V (1 - S f(n + 6 h')) with V = alpha v + beta <= v + beta
# (beta <= 20 / 255), S <= s, h' = h * U(0.01, 1). Per unit of input
# change it moves by at most 1 through V, 2 + 3 beta / v through V S, and
# 4 (1 + beta / v) through the hue (h moves by <= 4 / (6 delta), which
# V S <= delta (1 + beta / v) times 6 scales). With v >= 70 / 255
# (`_smooth_jitter_safe_batch`): 7 (1 + 20 / 70) = 9. Measured: ~3.
L_JITTER = 9.0


def _smooth_jitter_safe_batch(batch, hw=40, seed=0):
  """Images whose views are Lipschitz functions of the sampling positions.

  Random colours on a coarse 6 x 6 grid, bilinearly upsampled and faded into
  the fill colour over the outer 8 px, so neighbouring pixels differ little
  (`_slope` measures by how much). Green >= 70 and blue <= green - 20, and
  the fill colour has green 116, blue 104: every bilinear mix keeps its
  value >= 70 / 255 and green above blue, i.e. its hue off red's wrap from
  1 back to 0, where the hue scaling h * U(0.01, 1) jumps from ~0 to ~U.
  """
  rng = np.random.default_rng(seed)
  coarse = np.empty((batch, 6, 6, 3))
  coarse[..., 1] = rng.uniform(70, 250, coarse.shape[:-1])
  coarse[..., 0] = rng.uniform(40, 250, coarse.shape[:-1])
  coarse[..., 2] = coarse[..., 1] - rng.uniform(20, 70, coarse.shape[:-1])
  img = ndimage.zoom(coarse, (1, hw / 6, hw / 6, 1), order=1, grid_mode=True, mode="nearest")
  edge = np.minimum(np.arange(hw), np.arange(hw)[::-1])
  fade = np.clip(np.minimum(edge[:, None], edge[None, :]) / 8.0, 0, 1)
  fill = 255.0 * np.array(A.IMAGENET_MEAN)
  img = fill + fade[None, :, :, None] * (img - fill)
  img = np.clip(np.round(img), 0, 255).astype(np.uint8)
  kp = _ring_keypoints(rng, batch, (hw / 2, hw / 2), hw / 4)
  return img, kp


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs several devices")
def test_sharded_batch_needs_no_collectives():
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  n = len(jax.devices())
  img, kp = _smooth_jitter_safe_batch(batch=2 * n, seed=2)
  green, blue = img[..., 1].astype(int), img[..., 2].astype(int)
  assert green.min() >= 70 and (green - blue).min() >= 11
  mesh = Mesh(np.array(jax.devices()), ("data",))
  shard = NamedSharding(mesh, P("data"))
  cfg = _cfg()
  args = (jax.random.key(0), jax.device_put(img, shard), jax.device_put(kp, shard))
  hlo = _pair.lower(*args, cfg=cfg).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in hlo, op
  out = jax.device_get(_pair(*args, cfg=cfg))
  ref = jax.device_get(_pair(jax.random.key(0), img, kp, cfg=cfg))
  # The sharded program is compiled for 2-sample shards: it may vectorise,
  # fuse and contract FMAs differently, so the results agree up to float32
  # rounding, bounded here. A wrong key, shard or sample is off by O(1).
  slope = _slope(img, cfg.fill_value)
  for (view, par, mat), (rview, rpar, rmat) in zip(zip(*out), zip(*ref)):
    # Same random bits: whole degrees exactly, 1 / U(0.9, 1.5) within its
    # three roundings.
    np.testing.assert_array_equal(par["rotation"], rpar["rotation"])
    np.testing.assert_allclose(par["scale"], rpar["scale"], rtol=4 * EPS)
    # Geometry: K_GEOM roundings of terms up to x_view (view px).
    x_view, x_src = _geometry_scales(rmat, kp, S)
    np.testing.assert_allclose(
      par["translation"], rpar["translation"], rtol=0, atol=K_GEOM * EPS * x_view / S
    )
    np.testing.assert_allclose(
      _np_apply(mat, kp), _np_apply(rmat, kp), rtol=0, atol=K_GEOM * EPS * x_view
    )
    # Views: source positions within K_GEOM EPS x_src, which sampling turns
    # into slope times that (0..1 units), blending and the colour jitter's
    # ~20 roundings add K_GEOM EPS; the jitter multiplies by at most
    # L_JITTER, normalising divides by std.
    tol = L_JITTER * (slope * K_GEOM * EPS * x_src + K_GEOM * EPS) / min(A.IMAGENET_STD)
    np.testing.assert_allclose(view, rview, rtol=0, atol=tol)


# --------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------


def _hsv_test_pixels(rng, n=512):
  """[n, 3] RGB in [0, 1]: uniform floats, then the special cases first."""
  px = rng.uniform(0, 1, (n, 3)).astype(np.float32)
  special = [
    [0.5, 0.5, 0.5],
    [0, 0, 0],
    [1, 1, 1],
    [0.2, 0.2, 0.2],  # greys
    [1, 0, 0],
    [0, 1, 0],
    [0, 0, 1],  # primaries
    [1, 1, 0],
    [0, 1, 1],
    [1, 0, 1],
    [0.2, 0.9, 0.9],  # secondaries
    # Red is the maximum and blue just above green: hue just below 1, the
    # wrap of h / 6 < 0 (and just above 0 with green above blue).
    [1, 0, 1e-3],
    [0.9, 0.3, 0.30001],
    [0.7, 0.5, 0.5 + 1e-4],
    [1, 1e-3, 0],
    [0.9, 0.30001, 0.3],
  ]
  px[: len(special)] = special
  return px


def test_hsv_round_trip_is_identity():
  px = _hsv_test_pixels(np.random.default_rng(3))
  hsv = np.asarray(A.rgb_to_hsv(px))
  assert np.all((hsv >= 0) & (hsv <= 1))  # hue wrapped into [0, 1]
  # The hue comes back through 6 h + n <= 11 (steps of 8 EPS) and 4 - k:
  # with the forward hue's own error (~12 EPS once times 6), <= ~22 EPS,
  # scaled by v s <= 1.
  np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(hsv)), px, rtol=0, atol=24 * EPS)
  # Also as [B, H, W, 3] images (the shape the augmentation passes).
  img = px[:504].reshape(2, 12, 21, 3)
  np.testing.assert_allclose(
    np.asarray(A.hsv_to_rgb(A.rgb_to_hsv(img))), img, rtol=0, atol=24 * EPS
  )


def test_hsv_conversions_match_colorsys():
  rng = np.random.default_rng(8)
  px = _hsv_test_pixels(rng)
  hsv = np.asarray(A.rgb_to_hsv(px))
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in px.astype(np.float64)])
  assert np.all((hsv[:, 0] >= 0) & (hsv[:, 0] <= 1))
  # Hue is circular: 1 - 1e-9 (float64) and 1.0 (float32) are the same hue.
  # A difference, a reciprocal, a product, + 2 or 4, / 6, + 1: <= ~4 EPS.
  dh = (hsv[:, 0] - ref[:, 0] + 0.5) % 1.0 - 0.5
  np.testing.assert_allclose(dh, 0.0, rtol=0, atol=8 * EPS)
  np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:], rtol=0, atol=8 * EPS)
  # The inverse on independent random HSV, hue over the whole [0, 1].
  hsv = rng.uniform(0, 1, (512, 3)).astype(np.float32)
  hsv[:4, 0] = [0.0, 1.0, 1 - 1e-6, 5 / 6]
  ref = np.array([colorsys.hsv_to_rgb(*p) for p in hsv.astype(np.float64)])
  # 6 h (2 EPS), + n (4 EPS), 4 - k (2 EPS), v - v s f (1.5 EPS).
  np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(hsv)), ref, rtol=0, atol=16 * EPS)


def test_hsv_jitter_hue_past_one_known_answer():
  # (1, 0, 0.5) has h = 11/12 (red maximum, blue above green), s = v = 1.
  # Scaled hues: 11/12 (unchanged), 23/24, 1.1 -> clipped to 1 (= 0, red),
  # and 1/2 (cyan). Every channel's sector index n + 6h passes 6 for the
  # first three, so each needs the wrap back into [0, 6).
  img = np.broadcast_to(np.float32([1.0, 0.0, 0.5]), (4, 2, 3, 3)).copy()
  img[:, 1, 2] = [0.9, 0.3, 0.8]  # h = 31/36, s = 2/3, v = 0.9
  hue = np.array([1.0, 23 / 22, 1.2, 6 / 11], np.float32)
  ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
  out = np.asarray(A.hsv_jitter(img, hue, ones, ones, zeros))
  known = np.array([[1, 0, 0.5], [1, 0, 0.25], [1, 0, 0], [0, 1, 1]])
  # The round trip's 24 EPS, plus the scaled hue, saturation and value.
  tol = 32 * EPS
  np.testing.assert_allclose(out[:, 0, 0], known, rtol=0, atol=tol)
  for b in range(4):  # every pixel: colorsys with the hue taken mod 1
    for i in range(2):
      for j in range(3):
        h, s, v = colorsys.rgb_to_hsv(*img[b, i, j].astype(np.float64))
        ref = colorsys.hsv_to_rgb(min(h * hue[b], 1.0) % 1.0, s, v)
        np.testing.assert_allclose(out[b, i, j], ref, rtol=0, atol=tol)


def test_hsv_jitter_matches_colorsys_reference():
  rng = np.random.default_rng(4)
  img = rng.integers(0, 256, (3, 4, 5, 3)).astype(np.float32) / 255.0
  img[0, 0, 0] = 0.6  # a grey pixel
  hue = np.array([0.01, 0.5, 1.0], np.float32)
  sat = np.array([0.3, 1.0, 0.01], np.float32)
  alpha = np.array([0.5, 0.75, 1.0], np.float32)
  beta = np.array([5.0, 12.0, 20.0], np.float32) / 255.0
  out = np.asarray(A.hsv_jitter(img, hue, sat, alpha, beta))
  ref = np.empty_like(out)
  for b in range(3):
    for i in range(4):
      for j in range(5):
        h, s, v = colorsys.rgb_to_hsv(*img[b, i, j].astype(np.float64))
        ref[b, i, j] = colorsys.hsv_to_rgb(
          min(h * hue[b], 1.0), min(s * sat[b], 1.0), min(max(v * alpha[b] + beta[b], 0.0), 1.0)
        )
  # As the round trip (24 EPS) plus the scaling of h, s and v.
  np.testing.assert_allclose(out, ref, rtol=0, atol=32 * EPS)


def test_grayscale_and_blur_known_answers():
  rng = np.random.default_rng(5)
  img = rng.uniform(0, 1, (2, 6, 7, 3)).astype(np.float32)
  g = np.asarray(A.grayscale(img))
  # Three products and two sums of terms summing to <= 1, the weights
  # themselves rounded: <= 4 EPS.
  np.testing.assert_allclose(g[..., 0], img @ np.array([0.299, 0.587, 0.114]), rtol=0, atol=8 * EPS)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  # Impulse response = outer product of the normalised 1D Gaussian.
  imp = np.zeros((2, 15, 15, 1), np.float32)
  imp[:, 7, 7] = 1.0
  sig = np.array([0.8, 1.7], np.float32)
  out = np.asarray(A.gaussian_blur(imp, sig, 7))[..., 0]
  for b in range(2):
    k = np.exp(-0.5 * (np.arange(-3, 4) / sig[b]) ** 2)
    k /= k.sum()
    # Each tap: exp (a few ulp), the 7-term sum and the division: ~12 EPS
    # relative; the outer product of two passes twice that.
    np.testing.assert_allclose(
      out[b, 4:11, 4:11], np.outer(k, k), rtol=0, atol=32 * EPS * np.outer(k, k).max()
    )
    assert abs(out[b].sum() - 1.0) < 64 * EPS  # and 225 terms summed
  # Reflect border: unchanged. Per pass 7 products and sums of taps that sum
  # to 1 within 8 EPS: ~20 EPS of 0.3 for both passes.
  const = np.full((1, 9, 9, 3), 0.3, np.float32)
  np.testing.assert_allclose(
    np.asarray(A.gaussian_blur(const, [2.0], 7)), const, rtol=0, atol=32 * EPS * 0.3
  )


@pytest.mark.parametrize("flag", ["blur", "noise", "color_drop", "cutout"])
def test_optional_augmentation_hits_about_half_the_samples(flag):
  img, kp = _small_batch(batch=64, seed=6)
  base = _cfg(color_jitter=False, cutout_fraction=(0.3, 0.5))
  cfg = dataclasses.replace(base, **{flag: True})
  plain = np.asarray(_view(jax.random.key(9), img, kp, cfg=base)[0])
  aug = np.asarray(_view(jax.random.key(9), img, kp, cfg=cfg)[0])
  changed = np.any(np.abs(aug - plain) > 1e-3, axis=(1, 2, 3))
  assert 14 <= changed.sum() <= 50, changed.sum()
  if flag == "color_drop":
    rgb = aug * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)
    np.testing.assert_allclose(rgb[changed][..., 0], rgb[changed][..., 2], atol=1e-5)
  if flag == "cutout":  # one flat grey box per hit sample
    rgb = aug * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)
    for b in np.flatnonzero(changed):
      box = rgb[b][np.any(np.abs(aug[b] - plain[b]) > 1e-3, -1)]
      np.testing.assert_allclose(box, box[0, 0], atol=1e-5)
