"""Crop geometry (peclr_jax/hands/crops.py): boxes, crop matrices, the host warp.

The warp is checked against a known answer: bilinear interpolation and box
averaging reproduce a linear intensity ramp exactly, so every crop pixel q
must equal the ramp at M^-1 q (pixel-centre convention) up to uint8
rounding. The pixel convention is checked against the public test-time crop
written out, and the host warp against the device warp (augment.warp).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from peclr_jax.hands import augment, crops

ROOM = 1.5 * np.sqrt(2)


@pytest.mark.parametrize(
  "size,grad,centre,half,out",
  [
    ((40, 30), (3, 4), (20.3, 14.7), 6.0, 32),  # zoom in, z = 2.7
    ((120, 100), (1, 1), (60.0, 50.0), 45.0, 16),  # z = 0.18: reduce
  ],
)
def test_warp_matches_ramp_at_inverse_mapped_points(size, grad, centre, half, out):
  (w, h), (gx, gy) = size, grad
  ys, xs = np.mgrid[:h, :w]
  ramp = gx * xs + gy * ys + 10  # integers <= 255: the source is exact
  pil = Image.fromarray(np.repeat(ramp[..., None], 3, -1).astype(np.uint8))
  m = crops.crop_matrix(centre, half, out)
  crop = crops.warp_crop(pil, m, out).astype(np.float64)[..., 0]
  qy, qx = np.mgrid[:out, :out].astype(np.float64)
  src = crops.apply_affine(np.linalg.inv(m), np.stack([qx, qy], -1).reshape(-1, 2))
  want = (gx * src[:, 0] + gy * src[:, 1] + 10).reshape(out, out)
  err = crop - want
  # PIL rounds or truncates its 8-bit output (Pillow 13 truncates: mean
  # -0.5); a half-pixel geometric slip would move the mean by >= 1.
  assert np.abs(err).max() <= 1.01
  assert -0.65 < err.mean() < 0.15


def test_crop_matrix_maps_the_square_onto_the_crop_centred_on_s_over_2():
  m = crops.crop_matrix((10.0, 20.0), 5.0, 8)
  corners = crops.apply_affine(m, np.array([[5.0, 15.0], [15.0, 25.0], [10.0, 20.0]]))
  # Source square [c - h, c + h] -> [0, S], its centre -> (S/2, S/2).
  np.testing.assert_allclose(corners, [[0.0, 0.0], [8.0, 8.0], [4.0, 4.0]])


@pytest.mark.parametrize("xp", [np, jnp])
def test_apply_affine_matches_homogeneous_product(xp):
  rng = np.random.default_rng(3)
  m = np.tile(np.eye(3, dtype=np.float32), (2, 1, 1))
  m[:, :2, :] = rng.normal(size=(2, 2, 3))
  pts = rng.normal(size=(2, 21, 2)).astype(np.float32)
  hom = np.concatenate([pts, np.ones((2, 21, 1), np.float32)], -1)
  ref = np.einsum("bij,bkj->bki", m, hom)[..., :2]
  got = crops.apply_affine(xp.asarray(m), xp.asarray(pts))
  assert type(got) is type(xp.asarray(pts))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_warp_outside_image_is_fill():
  pil = Image.new("RGB", (20, 20), (200, 200, 200))
  m = crops.crop_matrix((500.0, 500.0), 4.0, 8)
  assert np.asarray(crops.warp_crop(pil, m, 8)).max() == 0


def test_box_pseudo_keypoints_encode_the_box():
  box = (3.0, 10.0, 23.0, 18.0)  # w 20, h 8
  kp = crops.box_pseudo_keypoints(box)
  assert kp.shape == (21, 2)
  np.testing.assert_allclose(kp.mean(0), [13.0, 14.0], atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(kp - [13, 14], axis=1), 10.0)
  c, h = crops.square_from_keypoints(kp, margin=1.5)
  np.testing.assert_allclose(c, [13.0, 14.0], atol=1e-12)
  np.testing.assert_allclose(h, 10.0 * ROOM)


def test_square_from_keypoints_and_errors():
  kp = np.array([[0.0, 0.0], [40.0, 0.0], [20.0, 30.0]])
  c, h = crops.square_from_keypoints(kp, margin=1.0, rotation_room=1.0)
  np.testing.assert_allclose(c, [20.0, 10.0])
  np.testing.assert_allclose(h, np.sqrt(500.0))
  _, h2 = crops.square_from_keypoints(kp)  # margin 1.5, sqrt(2) room
  np.testing.assert_allclose(h2, np.sqrt(500.0) * ROOM)
  _, h = crops.square_from_keypoints(np.zeros((21, 2)))
  assert h == crops.MIN_HALF_SIDE
  with pytest.raises(ValueError, match="NaN"):
    crops.square_from_keypoints(np.full((21, 2), np.nan))


# ---------------------------------------------------------------------------
# One pixel convention, host and device
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("box", [(10.0, 20.0, 50.0, 60.0), (3.0, 40.0, 23.0, 121.0)])
def test_crop_matrix_centres_a_box_as_the_public_test_time_crop(box):
  # The public create_affine_transform_from_bbox, written out: zoom
  # a = 0.7 S / longer side, box centre -> (S/2, S/2).
  s, fill = 224, 0.7
  x1, y1, x2, y2 = box
  a = fill * s / max(x2 - x1, y2 - y1)
  public = np.array(
    [[a, 0.0, s / 2 - a * (x1 + x2) / 2], [0.0, a, s / 2 - a * (y1 + y2) / 2], [0.0, 0.0, 1.0]]
  )
  half = max(x2 - x1, y2 - y1) / (2 * fill)
  m = crops.crop_matrix(((x1 + x2) / 2, (y1 + y2) / 2), half, s)
  np.testing.assert_allclose(m, public, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(crops.box_affine(np.array(box), s, fill), public)


def test_whole_image_box_is_the_identity():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (12, 12, 3), np.uint8)
  centre, half = crops.full_image_box((12, 12))
  m = crops.crop_matrix(centre, half, 12)
  np.testing.assert_array_equal(m, np.eye(3))
  np.testing.assert_array_equal(crops.warp_crop(Image.fromarray(image), m, 12), image)
  np.testing.assert_array_equal(np.asarray(augment.warp(image[None], m[None], 12))[0], image)


def test_hand_box_numpy_and_jax_agree_and_fall_back_to_the_image():
  rng = np.random.default_rng(4)
  kp = rng.uniform(10, 50, (3, 21, 2))
  kp[1] = 7.0  # one point: no extent
  kp[2, 3] = np.nan  # missing label
  centre, half = crops.hand_box(kp, (60, 80), margin=1.5)
  want_centre = kp[0].mean(0)
  want_half = 1.5 * np.linalg.norm(kp[0] - want_centre, axis=-1).max()
  np.testing.assert_allclose(centre[0], want_centre, rtol=1e-12)
  np.testing.assert_allclose(half[0], want_half, rtol=1e-12)
  np.testing.assert_array_equal(centre[1:], [[40.0, 30.0]] * 2)
  np.testing.assert_array_equal(half[1:], [40.0, 40.0])
  jc, jh = jax.jit(lambda k: crops.hand_box(k, (60, 80), margin=1.5))(jnp.asarray(kp, jnp.float32))
  np.testing.assert_allclose(jc, centre, rtol=1e-5)
  np.testing.assert_allclose(jh, half, rtol=1e-5)


def test_crop_matrix_and_apply_affine_run_on_numpy_and_inside_jit():
  rng = np.random.default_rng(5)
  centre = rng.uniform(0, 100, (4, 2))
  half = rng.uniform(5, 50, (4,))
  theta = rng.uniform(-45, 45, (4,))
  jitter = rng.uniform(0, 15, (4, 2))
  kp = rng.uniform(0, 100, (4, 21, 2))
  m = crops.crop_matrix(centre, half, 64, theta, jitter)
  assert isinstance(m, np.ndarray) and m.dtype == np.float64
  # Independent reference: q = z R (p - c) + S/2 - z j, R = [[c, s], [-s, c]].
  t = np.deg2rad(theta)
  rot = np.stack([np.stack([np.cos(t), np.sin(t)], -1), np.stack([-np.sin(t), np.cos(t)], -1)], -2)
  z = 64 / (2 * half)
  want = (
    z[:, None, None] * np.einsum("bij,bnj->bni", rot, kp - centre[:, None])
    + 32
    - z[:, None, None] * jitter[:, None]
  )
  np.testing.assert_allclose(crops.apply_affine(m, kp), want, rtol=1e-12, atol=1e-9)

  @jax.jit
  def on_device(c, h, r, j, p):
    return crops.apply_affine(crops.crop_matrix(c, h, 64, r, j), p)

  got = on_device(*(jnp.asarray(a, jnp.float32) for a in (centre, half, theta, jitter, kp)))
  assert got.dtype == jnp.float32
  # float32: |q| <= ~1e3 px, a few roundings of relative 6e-8 each.
  np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize(
  "zoom,theta", [(1.0, 0.0), (2.7, 0.0), (0.6, 0.0), (1.3, 30.0), (0.8, -45.0)]
)
def test_host_and_device_warps_agree(zoom, theta):
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, (30, 40, 3), np.uint8)
  s = 24
  m = crops.crop_matrix((19.3, 14.6), s / (2 * zoom), s, theta)
  host = crops.warp_crop(Image.fromarray(image), m, s).astype(np.float64)
  device = np.asarray(augment.warp(image[None], m[None], s))[0]
  # Compare where all four bilinear taps lie inside the image (the two
  # treat the one-pixel edge differently: cv2's constant border blends with
  # the fill, PIL's does not).
  qy, qx = np.mgrid[:s, :s].astype(np.float64)
  src = crops.apply_affine(np.linalg.inv(m), np.stack([qx, qy], -1).reshape(-1, 2))
  inside = ((src[:, 0] >= 0) & (src[:, 0] <= 39) & (src[:, 1] >= 0) & (src[:, 1] <= 29)).reshape(
    s, s
  )
  assert inside.mean() > 0.3
  err = (host - device)[inside]
  # PIL's 8-bit output is rounded or truncated (Pillow 13: truncated); a
  # half-pixel disagreement would move pixels of this noise image by ~30.
  assert np.abs(err).max() <= 1.01
  assert -0.65 < err.mean() < 0.15


def test_crops_imports_without_jax():
  code = 'import sys, peclr_jax.hands.crops; sys.exit(1 if "jax" in sys.modules else 0)'
  subprocess.run([sys.executable, "-c", code], check=True)
