"""Tests for peclr_jax.augment: geometry against independent NumPy/SciPy
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

from peclr_jax import augment as A

S = 32  # view size used throughout (tiny on purpose)
MEAN255 = np.round(np.array(A.IMAGENET_MEAN) * 255.0)


def _ring_keypoints(rng, batch, center, radius):
  """[B, 21, 2] keypoints: 20 inside a disc plus one exactly on its rim, so
  the base half-side is known: max distance from the mean ~ radius."""
  ang = rng.uniform(0, 2 * np.pi, (batch, 21))
  rad = rng.uniform(0, 0.6 * radius, (batch, 21))
  rad[:, 0] = radius
  kp = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], -1)
  return (kp + np.asarray(center, np.float64)).astype(np.float32)


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
  rot = np.stack([np.stack([np.cos(t), np.sin(t)], -1),
                  np.stack([-np.sin(t), np.cos(t)], -1)], -2)
  a = z[:, None, None] * rot
  shift = out_size / 2.0 + translation * out_size - np.einsum('bij,bj->bi', a, c)
  m = np.zeros((len(z), 3, 3))
  m[:, :2, :2], m[:, :2, 2], m[:, 2, 2] = a, shift, 1.0
  return m


def _np_apply(m, pts):
  """NumPy homogeneous affine map of points [B, J, 2] by [B, 3, 3]."""
  m, pts = np.asarray(m, np.float64), np.asarray(pts, np.float64)
  return np.einsum('bij,bnj->bni', m[:, :2, :2], pts) + m[:, None, :2, 2]


def _cfg(**kw):
  return A.AugmentConfig(out_size=S, **kw)


# Everything runs jitted: eager dispatch of the many small ops is far slower
# than one compile per configuration on the shared 2-core test machine.
_view = jax.jit(A.augment_view, static_argnames=('cfg', 'photometric'))
_pair = jax.jit(A.augment_pair, static_argnames=('cfg',))


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def test_warp_matches_scipy_bilinear_with_constant_border():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, (2, 20, 24, 3)).astype(np.float32)
  fill = np.array([10.0, 50.0, 200.0], np.float32)
  mats = np.stack([
      np.asarray(A.crop_matrix(np.array([11.3, 9.7]), 13.0, 16, 30.0,
                               np.array([4.0, 1.5]))),
      np.array([[1.7, 0.2, -3.1], [-0.4, 1.1, 2.6], [0, 0, 1]], np.float32),
  ])
  out = np.asarray(A.warp(img, mats, (16, 18), fill))
  assert out.shape == (2, 16, 18, 3)
  # Reference: scipy bilinear sampling at M^-1 q with constant taps outside.
  ys, xs = np.mgrid[0:16, 0:18].astype(np.float64)
  for b in range(2):
    inv = np.linalg.inv(mats[b].astype(np.float64))
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    for ch in range(3):
      ref = ndimage.map_coordinates(img[b, :, :, ch].astype(np.float64),
                                    [sy, sx], order=1, mode='grid-constant',
                                    cval=fill[ch])
      np.testing.assert_allclose(out[b, :, :, ch], ref, atol=2e-2)
  # The second matrix pushes part of the view off the source: fill shows.
  assert np.any(np.all(np.isclose(out[1], fill, atol=1e-3), -1))


@pytest.mark.parametrize('seed', [0, 1, 2, 3, 4])
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
  blob = 120.0 * np.exp(-((xs[None] - dot[:, 0, None, None]) ** 2 +
                          (ys[None] - dot[:, 1, None, None]) ** 2) / (2 * 2.0 ** 2))
  img = np.clip(np.round(MEAN255 + blob[..., None]), 0, 255).astype(np.uint8)
  cfg = _cfg(color_jitter=False)
  view, _, mat = _view(jax.random.key(seed), img, kp, cfg=cfg)
  view, mat = np.asarray(view), np.asarray(mat)
  # Background (mean colour) normalises to ~0, so the dot is the only signal.
  wgt = np.clip(view.sum(-1) - 0.3, 0, None)
  vy, vx = np.mgrid[0:S, 0:S]
  found = np.stack([(wgt * vx).sum((1, 2)), (wgt * vy).sum((1, 2))], -1)
  found /= wgt.sum((1, 2))[:, None]
  expect = np.einsum('bij,bj->bi', mat[:, :2, :2], dot) + mat[:, :2, 2]
  assert np.all((expect > 3) & (expect < S - 4))
  np.testing.assert_array_less(np.linalg.norm(found - expect, axis=-1), 0.5)


def test_params_within_ranges():
  rng = np.random.default_rng(1)
  batch = 256
  kp = _ring_keypoints(rng, batch, rng.uniform(12, 20, (batch, 1, 2)), 10.0)
  img = np.zeros((batch, 32, 32, 3), np.uint8)
  _, params, _ = _view(jax.random.key(7), img, kp, cfg=_cfg())
  rot = np.asarray(params['rotation'])
  scale = np.asarray(params['scale'])
  trans = np.asarray(params['translation'])
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
  assert np.all(trans <= 1e-7) and np.all(-trans <= bound + 1e-6)
  assert np.mean(-trans > 0.5 * bound) > 0.3  # spread over the range


def test_matrix_equals_documented_formula():
  rng = np.random.default_rng(2)
  batch = 16
  kp = _ring_keypoints(rng, batch, rng.uniform(20, 40, (batch, 1, 2)), 15.0)
  img = np.zeros((batch, 60, 60, 3), np.uint8)
  for key in range(3):
    _, params, mat = _view(jax.random.key(key), img, kp, cfg=_cfg())
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    c, h0 = _np_box(kp)
    ref = _np_matrix(c, h0, S, p['rotation'], p['scale'], p['translation'])
    np.testing.assert_allclose(np.asarray(mat), ref, rtol=1e-5, atol=1e-4)
    # Meaning of `translation`: where the hand centre lands, relative to
    # the view centre, as a fraction of the view size.
    landed = _np_apply(mat, c[:, None])[:, 0]
    np.testing.assert_allclose((landed - S / 2) / S, p['translation'],
                               atol=1e-5)


def test_crop_matrix_known_answer_and_inverse():
  c = np.array([[40.0, 25.0]])
  mat = np.asarray(A.crop_matrix(c, np.array([20.0]), 32, np.array([0.0]),
                                 np.array([[4.0, 2.0]])))
  # z = 32 / 40 = 0.8: the crop origin c - 20 + j maps to (0, 0).
  corner = np.array([[[40 - 20 + 4.0, 25 - 20 + 2.0]]])
  np.testing.assert_allclose(_np_apply(mat, corner), 0.0,
                             atol=1e-5)
  np.testing.assert_allclose(mat[0, :2, :2], 0.8 * np.eye(2), atol=1e-6)
  m = np.asarray(A.crop_matrix(c, np.array([13.0]), 32, np.array([33.0])))
  np.testing.assert_allclose(np.asarray(A.invert_affine(m)) @ m,
                             np.eye(3)[None], atol=1e-5)


def test_positive_rotation_is_counter_clockwise_on_screen():
  c = np.array([[16.0, 16.0]])
  mat = A.crop_matrix(c, np.array([16.0]), S, np.array([90.0]))  # z = 1
  right = np.array([[[26.0, 16.0]]])  # 10 px right of the centre
  q = _np_apply(mat, right)[0, 0]
  np.testing.assert_allclose(q, [16.0, 6.0], atol=1e-4)  # now 10 px above
  mat45 = A.crop_matrix(c, np.array([16.0]), S, np.array([45.0]))
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
  view, _, mat = _view(jax.random.key(0), img, kp,
                       cfg=_cfg(rotate=False, crop=False))
  assert np.all(np.isfinite(np.asarray(view)))
  # Whole image: centre (20, 12), half-side 20, margin 1.25 -> z = 32 / 50.
  np.testing.assert_allclose(np.asarray(mat)[:, 0, 0], 32 / 50, rtol=1e-6)
  centre = np.broadcast_to([[[20.0, 12.0]]], (2, 1, 2))
  np.testing.assert_allclose(_np_apply(mat, centre), S / 2, atol=1e-4)


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
  np.testing.assert_array_equal(np.asarray(pa1['rotation']),
                                np.asarray(pb1['rotation']))
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
  np.testing.assert_allclose(np.asarray(view), np.asarray(ref), atol=1e-4)
  # Border (mean colour) normalises to exactly 0 in the view corner.
  np.testing.assert_allclose(np.asarray(view)[:, 0, 0], 0.0, atol=1e-5)
  # With colour jitter on (same key -> same geometry) the content changes.
  jit_view, _, mat2 = _view(jax.random.key(1), img, kp, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(mat), np.asarray(mat2))
  assert not np.allclose(np.asarray(view), np.asarray(jit_view), atol=1e-2)


@pytest.mark.skipif(len(jax.devices()) < 2, reason='needs several devices')
def test_sharded_batch_needs_no_collectives():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  n = len(jax.devices())
  img, kp = _small_batch(batch=2 * n, seed=2)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  shard = NamedSharding(mesh, P('data'))
  f = partial(_pair, cfg=_cfg())
  args = (jax.random.key(0), jax.device_put(img, shard),
          jax.device_put(kp, shard))
  hlo = _pair.lower(*args, cfg=_cfg()).compile().as_text()
  for op in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce'):
    assert op not in hlo, op
  out = f(*args)[0][0]
  ref = f(jax.random.key(0), img, kp)[0][0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


# --------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------


def _hsv_test_pixels(rng, n=512):
  """[n, 3] RGB in [0, 1]: uniform floats, then the special cases first."""
  px = rng.uniform(0, 1, (n, 3)).astype(np.float32)
  special = [
      [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [0.2, 0.2, 0.2],  # greys
      [1, 0, 0], [0, 1, 0], [0, 0, 1],  # primaries
      [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.2, 0.9, 0.9],  # secondaries
      # Red is the maximum and blue just above green: hue just below 1, the
      # wrap of h / 6 < 0 (and just above 0 with green above blue).
      [1, 0, 1e-3], [0.9, 0.3, 0.30001], [0.7, 0.5, 0.5 + 1e-4],
      [1, 1e-3, 0], [0.9, 0.30001, 0.3],
  ]
  px[:len(special)] = special
  return px


def test_hsv_round_trip_is_identity():
  px = _hsv_test_pixels(np.random.default_rng(3))
  hsv = np.asarray(A.rgb_to_hsv(px))
  assert np.all((hsv >= 0) & (hsv <= 1))  # hue wrapped into [0, 1]
  np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(hsv)), px, atol=2e-6)
  # Also as [B, H, W, 3] images (the shape the augmentation passes).
  img = px[:504].reshape(2, 12, 21, 3)
  np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(A.rgb_to_hsv(img))),
                             img, atol=2e-6)


def test_hsv_conversions_match_colorsys():
  rng = np.random.default_rng(8)
  px = _hsv_test_pixels(rng)
  hsv = np.asarray(A.rgb_to_hsv(px))
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in px.astype(np.float64)])
  assert np.all((hsv[:, 0] >= 0) & (hsv[:, 0] <= 1))
  # Hue is circular: 1 - 1e-9 (float64) and 1.0 (float32) are the same hue.
  dh = (hsv[:, 0] - ref[:, 0] + 0.5) % 1.0 - 0.5
  np.testing.assert_allclose(dh, 0.0, atol=1e-5)
  np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:], atol=1e-6)
  # The inverse on independent random HSV, hue over the whole [0, 1].
  hsv = rng.uniform(0, 1, (512, 3)).astype(np.float32)
  hsv[:4, 0] = [0.0, 1.0, 1 - 1e-6, 5 / 6]
  ref = np.array([colorsys.hsv_to_rgb(*p) for p in hsv.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(hsv)), ref, atol=2e-6)


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
  np.testing.assert_allclose(out[:, 0, 0], known, atol=1e-5)
  for b in range(4):  # every pixel: colorsys with the hue taken mod 1
    for i in range(2):
      for j in range(3):
        h, s, v = colorsys.rgb_to_hsv(*img[b, i, j].astype(np.float64))
        ref = colorsys.hsv_to_rgb(min(h * hue[b], 1.0) % 1.0, s, v)
        np.testing.assert_allclose(out[b, i, j], ref, atol=1e-5)


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
            min(h * hue[b], 1.0), min(s * sat[b], 1.0),
            min(max(v * alpha[b] + beta[b], 0.0), 1.0))
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_grayscale_and_blur_known_answers():
  rng = np.random.default_rng(5)
  img = rng.uniform(0, 1, (2, 6, 7, 3)).astype(np.float32)
  g = np.asarray(A.grayscale(img))
  np.testing.assert_allclose(g[..., 0], img @ np.array([0.299, 0.587, 0.114]),
                             atol=1e-6)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  # Impulse response = outer product of the normalised 1D Gaussian.
  imp = np.zeros((2, 15, 15, 1), np.float32)
  imp[:, 7, 7] = 1.0
  sig = np.array([0.8, 1.7], np.float32)
  out = np.asarray(A.gaussian_blur(imp, sig, 7))[..., 0]
  for b in range(2):
    k = np.exp(-0.5 * (np.arange(-3, 4) / sig[b]) ** 2)
    k /= k.sum()
    np.testing.assert_allclose(out[b, 4:11, 4:11], np.outer(k, k), atol=1e-6)
    assert abs(out[b].sum() - 1.0) < 1e-5
  const = np.full((1, 9, 9, 3), 0.3, np.float32)  # reflect border: unchanged
  np.testing.assert_allclose(np.asarray(A.gaussian_blur(const, [2.0], 7)),
                             const, atol=1e-6)


@pytest.mark.parametrize('flag', ['blur', 'noise', 'color_drop', 'cutout'])
def test_optional_augmentation_hits_about_half_the_samples(flag):
  img, kp = _small_batch(batch=64, seed=6)
  base = _cfg(color_jitter=False, cutout_fraction=(0.3, 0.5))
  cfg = dataclasses.replace(base, **{flag: True})
  plain = np.asarray(_view(jax.random.key(9), img, kp, cfg=base)[0])
  aug = np.asarray(_view(jax.random.key(9), img, kp, cfg=cfg)[0])
  changed = np.any(np.abs(aug - plain) > 1e-3, axis=(1, 2, 3))
  assert 14 <= changed.sum() <= 50, changed.sum()
  if flag == 'color_drop':
    rgb = aug * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)
    np.testing.assert_allclose(rgb[changed][..., 0], rgb[changed][..., 2],
                               atol=1e-5)
  if flag == 'cutout':  # one flat grey box per hit sample
    rgb = aug * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)
    for b in np.flatnonzero(changed):
      box = rgb[b][np.any(np.abs(aug[b] - plain[b]) > 1e-3, -1)]
      np.testing.assert_allclose(box, box[0, 0], atol=1e-5)
