"""Crop geometry, written once: hand boxes, crop matrices, the host warp and
the input normalisation constants.

Pixel convention (docs/method.md#conventions): pixel (row i, column j) has
its centre at (x = j, y = i). A square crop of side S about centre c with
half-side h (rotated by theta, its origin shifted by j) is the affine map

  q = z R(theta) (p - c) + S/2 - z j,   z = S / (2 h),

so a box centre lands on (S/2, S/2), as in the public test-time crop
(`box_affine`, on which the FreiHAND protocol numbers depend). The whole
image is the box about (W/2, H/2), so an S x S image cropped to S is the
identity. Everything here uses this one convention: the builders' stored
crops, the host pipeline crop, the augmentation views and the test-time
crops.

The host crops run on NumPy; `crop_matrix` and `apply_affine` also run on
JAX arrays inside `jax.jit` (the augmentation), choosing jax.numpy only when
given a JAX array, so this module imports without JAX (the TFDS builders use
it). The device warp is `augment.warp`; the host warp is `warp_crop` (which
also pre-filters shrinks of 2x or more), and tests/test_crops.py checks that
they agree.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from PIL import Image

from peclr_jax.hands import joints

# Where every crop puts its box centre (module docstring). Pre-cropped stores
# record it, so crops made under the earlier (S - 1)/2 are refused.
CROP_CENTRE = "S/2"

# ImageNet statistics: every model input is (x / 255 - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stored crops: a square rotated by 45 degrees needs sqrt(2) x its half-side.
ROTATION_ROOM = math.sqrt(2.0)
# The largest crop margin the augmentation samples.
DEFAULT_MARGIN = 1.5
# Guards the stored crops' zoom against degenerate hands.
MIN_HALF_SIDE = 4.0

# Public test-time cropping constants (testing/pred_fh.py, fh_utils.py).
TEST_CROP_SIZE = 224
INITIAL_BOX_FRACTION = 0.33
BOX_FILL = 0.7


def _xp(*arrays):
  """jax.numpy if any argument is a JAX array (tracers included), else NumPy.

  JAX is looked up only in the modules already imported: a caller holding a
  JAX array has imported it, and a NumPy caller never pays for it.
  """
  jax = sys.modules.get("jax")
  if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
    return jax.numpy
  return np


def _float(xp):
  """The working float type: float64 on the host, float32 on the device."""
  return np.float64 if xp is np else xp.float32


# ---------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------


def full_image_box(image_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
  """The square holding the whole image, centred (letterboxing a non-square
  one): an S x S crop of it is the image resized by S / max(H, W), the
  identity when H = W = S.

  Args:
    image_hw: (height, width).

  Returns:
    (centre [2] (x, y), half_side).
  """
  h, w = image_hw
  return np.array([w / 2.0, h / 2.0]), max(h, w) / 2.0


def hand_box(
  keypoints_2d, image_hw: tuple[int, int] | None = None, *, margin=1.0, min_half_side: float = 1.0
):
  """Square about a hand: centre = mean keypoint, half-side = margin x spread.

  The spread is the largest keypoint distance from the mean. NumPy in
  (float64) or JAX in (float32, traceable).

  Args:
    keypoints_2d: [..., J, 2] (x, y) pixels.
    image_hw: (H, W) of the image. When given, hands whose spread is below
      `min_half_side` or not finite (missing labels are zeros) fall back to
      `full_image_box`, so a crop never divides by zero.
    margin: [...] or scalar factor on the spread.
    min_half_side: threshold of the fallback, pixels.

  Returns:
    centre [..., 2], half_side [...].
  """
  xp = _xp(keypoints_2d, margin)
  kp = xp.asarray(keypoints_2d, _float(xp))
  centre = xp.mean(kp, axis=-2)
  spread = xp.sqrt(xp.max(xp.sum((kp - centre[..., None, :]) ** 2, -1), -1))
  half = spread * margin
  if image_hw is not None:
    whole_centre, whole_half = full_image_box(image_hw)
    bad = ~(xp.isfinite(spread) & (spread >= min_half_side))
    centre = xp.where(bad[..., None], xp.asarray(whole_centre, kp.dtype), centre)
    half = xp.where(bad, whole_half, half)
  return centre, half


def square_from_keypoints(
  keypoints_2d: np.ndarray,
  margin: float = DEFAULT_MARGIN,
  rotation_room: float = ROTATION_ROOM,
  min_half_side: float = MIN_HALF_SIDE,
):
  """The stored crop's square around a hand given by its 2D keypoints.

  Args:
    keypoints_2d: [J, 2] (x, y) pixels.
    margin: factor on the spread (max keypoint distance from the mean).
    rotation_room: extra factor so that rotated views stay inside the crop.
    min_half_side: lower bound of the returned half-side in pixels.

  Returns:
    (centre [2] float64, half_side float).
  """
  kp = np.asarray(keypoints_2d, np.float64)
  if kp.ndim != 2 or kp.shape[-1] != 2 or not kp.shape[0]:
    raise ValueError(f"keypoints_2d must be [J, 2], got {kp.shape}")
  if not np.all(np.isfinite(kp)):
    raise ValueError("keypoints_2d contain NaN or inf")
  centre, spread = hand_box(kp)
  return centre, max(float(spread) * margin * rotation_room, min_half_side)


def box_pseudo_keypoints(box, num_keypoints: int = joints.NUM_JOINTS) -> np.ndarray:
  """Pseudo-keypoints that encode a hand box for keypoint-driven crops.

  Pre-training uses keypoints only through their mean (crop centre) and their
  largest distance from the mean (crop size). Points evenly spread on the
  circle of radius max(w, h) / 2 around the box centre have exactly the box
  centre as mean (the unit roots sum to zero) and max(w, h) / 2 as largest
  distance, so every keypoint-driven crop of them equals the crop of the box's
  bounding square.

  Args:
    box: (x0, y0, x1, y1) pixels, x1 > x0, y1 > y0.
    num_keypoints: number of points.

  Returns:
    [num_keypoints, 2] float64 (x, y).
  """
  x0, y0, x1, y1 = (float(v) for v in box)
  centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
  radius = max(x1 - x0, y1 - y0) / 2
  theta = 2 * np.pi * np.arange(num_keypoints) / num_keypoints
  return centre + radius * np.stack([np.cos(theta), np.sin(theta)], axis=-1)


# ---------------------------------------------------------------------------
# Test-time boxes (the public testing/pred_fh.py two-pass crop)
# ---------------------------------------------------------------------------


def initial_box(image_size, fraction: float = INITIAL_BOX_FRACTION) -> np.ndarray:
  """First-pass box: a square about the image centre, `fraction` of its side.

  As the public `modify_bbox([0, 0, W, H], 0.33)`: centre (W/2, H/2), side
  `fraction * max(W, H)` (73.92 px for FreiHAND's 224 px images; the 0.7 fill
  of `box_affine` then zooms the image centre by ~2.1x).

  Args:
    image_size: side of a square image, or (height, width).
    fraction: side of the box relative to the image's longer side.

  Returns:
    [4] float64 box (x1, y1, x2, y2) in image pixels.
  """
  if np.ndim(image_size) == 0:
    height = width = float(image_size)
  else:
    height, width = (float(s) for s in image_size)
  cx, cy = width / 2.0, height / 2.0
  half = fraction * max(width, height) / 2.0
  return np.array([cx - half, cy - half, cx + half, cy + half], np.float64)


def keypoint_box(kp2d) -> np.ndarray:
  """Integer bounding box of 2D keypoints, as the public `get_bbox_from_pose`.

  The public code casts with Python `int()`, i.e. truncation toward zero
  (equal to floor for the usual non-negative coordinates), for both the
  minimum and the maximum; NaN keypoints are ignored.

  Args:
    kp2d: [..., J, 2] keypoints (x, y).

  Returns:
    [..., 4] float64 boxes (x1, y1, x2, y2) with integer values.
  """
  kp2d = np.asarray(kp2d, np.float64)
  lo = np.trunc(np.nanmin(kp2d, axis=-2))
  hi = np.trunc(np.nanmax(kp2d, axis=-2))
  return np.concatenate([lo, hi], axis=-1)


def map_box(matrix, box) -> np.ndarray:
  """Maps a box's two corners through an affine transform.

  Args:
    matrix: [..., 3, 3] affine transforms.
    box: [..., 4] (x1, y1, x2, y2).

  Returns:
    [..., 4] float64, the mapped corners (exact for scale + translation).
  """
  corners = np.asarray(box, np.float64).reshape(np.shape(box)[:-1] + (2, 2))
  mapped = apply_affine(np.asarray(matrix, np.float64), corners)
  return mapped.reshape(mapped.shape[:-2] + (4,))


# ---------------------------------------------------------------------------
# Crop matrices
# ---------------------------------------------------------------------------


def rotation_2d(theta_deg):
  """OpenCV-sense rotation [..., 2, 2]: CCW on screen (y down) positive."""
  xp = _xp(theta_deg)
  t = xp.deg2rad(xp.asarray(theta_deg, _float(xp)))
  c, s = xp.cos(t), xp.sin(t)
  return xp.stack([xp.stack([c, s], -1), xp.stack([-s, c], -1)], -2)


def _zoom_matrix(zoom, centre, out_size: int, rotation, jitter):
  """[..., 3, 3] q = zoom R(rotation) (p - centre) + S/2 - zoom jitter."""
  xp = _xp(zoom, centre, rotation, jitter)
  dtype = _float(xp)
  zoom = xp.asarray(zoom, dtype)
  centre = xp.asarray(centre, dtype)
  batch = xp.broadcast_shapes(centre.shape[:-1], zoom.shape)
  rot = xp.zeros(batch, dtype) if rotation is None else rotation
  shift = xp.zeros(batch + (2,), dtype) if jitter is None else jitter
  a = zoom[..., None, None] * rotation_2d(rot)
  t = (
    out_size / 2.0
    - zoom[..., None] * xp.asarray(shift, dtype)
    - xp.einsum("...ij,...j->...i", a, centre)
  )
  top = xp.concatenate([a, t[..., None]], -1)
  bottom = xp.broadcast_to(xp.asarray([0.0, 0.0, 1.0], dtype), top.shape[:-2] + (1, 3))
  return xp.concatenate([top, bottom], -2)


def crop_matrix(centre, half_side, out_size: int, rotation=None, jitter=None):
  """Source -> crop pixels of a square crop (optionally rotated, jittered).

  q = z R(rotation) (p - centre) + S/2 - z jitter with z = S / (2 half_side):
  the centre lands on (S/2, S/2) (module docstring). A test-time crop of a box
  of half-side b that should fill a fraction f of the crop is
  crop_matrix(box_centre, b / f, S).

  Args:
    centre: [..., 2] crop centre (x, y), source pixels.
    half_side: [...] crop half-side, source pixels.
    out_size: S, the crop side in pixels.
    rotation: [...] degrees, CCW on screen positive (None: 0).
    jitter: [..., 2] crop-origin shift in source pixels along the crop axes
      (None: 0).

  Returns:
    [..., 3, 3] homogeneous affine matrices: NumPy float64, or float32 JAX
    arrays when any argument is one.
  """
  xp = _xp(centre, half_side, rotation, jitter)
  zoom = out_size / (2.0 * xp.asarray(half_side, _float(xp)))
  return _zoom_matrix(zoom, centre, out_size, rotation, jitter)


def box_affine(
  box, crop_size: int = TEST_CROP_SIZE, fill: float = BOX_FILL, min_side: float = 1e-6
) -> np.ndarray:
  """Scale + translation mapping a box to the centre of a square crop.

  As the public `create_affine_transform_from_bbox`: the box centre goes to
  (S/2, S/2) and the box's longer side to `fill * S` (no rotation).

  Args:
    box: [..., 4] boxes (x1, y1, x2, y2) in source pixels.
    crop_size: S, output side in pixels.
    fill: fraction of the crop covered by the box's longer side.
    min_side: lower bound on the box side (a degenerate box would give an
      infinite zoom; the public code has no guard and would fail).

  Returns:
    [..., 3, 3] float64 homogeneous matrices, source pixels -> crop pixels.
  """
  box = np.asarray(box, np.float64)
  side = np.maximum(np.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]), min_side)
  centre = 0.5 * np.stack([box[..., 0] + box[..., 2], box[..., 1] + box[..., 3]], -1)
  return _zoom_matrix(fill * crop_size / side, centre, crop_size, None, None)


def apply_affine(matrix, points):
  """Maps points through homogeneous affine matrices.

  Args:
    matrix: [..., 3, 3] (last row (0, 0, 1)); a [..., 2, 3] matrix works too.
      Leading dims broadcast with those of points.
    points: [..., J, 2] (x, y).

  Returns:
    [..., J, 2] M @ [x, y, 1]: NumPy, or JAX when either input is JAX.
  """
  xp = _xp(matrix, points)
  matrix = xp.asarray(matrix)
  lin = xp.swapaxes(matrix[..., :2, :2], -1, -2)
  return xp.matmul(xp.asarray(points), lin) + matrix[..., None, :2, 2]


# ---------------------------------------------------------------------------
# Host warp
# ---------------------------------------------------------------------------


def _shift(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _shrunk_from_src(factor: float, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
  """Pixel centres of the image whose pixel-edge coordinates are
  (e - (x0, y0)) / factor (a reduced or DCT-scaled decode of a region):
  p' = (p + 1/2 - (x0, y0)) / factor - 1/2."""
  return np.array(
    [
      [1.0 / factor, 0.0, (0.5 - x0) / factor - 0.5],
      [0.0, 1.0 / factor, (0.5 - y0) / factor - 0.5],
      [0.0, 0.0, 1.0],
    ]
  )


def warp_crop(image: Image.Image, matrix, out_size: int, *, fill: int = 0) -> np.ndarray:
  """Bilinear affine warp of an image into an S x S crop on the host.

  Crop pixel q samples the source at M^-1 q (pixel centres at integers), with
  `fill` outside the source: the operation of the device warp
  `augment.warp`, done with PIL. Shrinking by 2x or more first decodes a JPEG
  at 1/2, 1/4 or 1/8 scale (DCT scaling) and box-reduces the region the crop
  needs by an integer factor, so the final bilinear step never shrinks by 2x
  or more (plain bilinear would alias) and big frames decode fast.

  Args:
    image: PIL image, ideally not yet decoded (a JPEG is then decoded at a
      reduced scale when the crop shrinks it).
    matrix: [3, 3] source pixels -> crop pixels.
    out_size: S.
    fill: grey level outside the source.

  Returns:
    uint8 [S, S, 3].
  """
  matrix = np.asarray(matrix, np.float64)
  if image.size == (out_size, out_size) and np.array_equal(matrix, np.eye(3)):
    return np.asarray(image.convert("RGB"), np.uint8)  # no resampling
  zoom = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
  # Maps source pixels to the pixels of the image actually sampled.
  sampled_from_src = np.eye(3)
  if zoom <= 0.5:
    width, height = image.size
    drafted = image.draft(
      "RGB", (max(1, math.ceil(width * zoom)), max(1, math.ceil(height * zoom)))
    )
    if drafted is not None:  # a JPEG decoded at 1/scale
      sampled_from_src = _shrunk_from_src(width / drafted[1][2])
  if image.mode != "RGB":
    image = image.convert("RGB")
  scale = 1.0 / sampled_from_src[0, 0]
  factor = math.floor(1.0 / (zoom * scale) + 1e-9)
  if factor >= 2:
    # The region the crop needs (pixel edges of the sampled image), plus a
    # block on each side.
    s = out_size - 0.5
    out_corners = np.array([[-0.5, -0.5], [s, -0.5], [-0.5, s], [s, s]])
    corners = apply_affine(sampled_from_src @ np.linalg.inv(matrix), out_corners) + 0.5
    lo = np.floor(corners.min(axis=0)).astype(int) - factor
    hi = np.ceil(corners.max(axis=0)).astype(int) + factor
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], image.width), min(hi[1], image.height)
    if x1 > x0 and y1 > y0:
      image = image.reduce(factor, box=(x0, y0, x1, y1))
      sampled_from_src = _shrunk_from_src(factor, x0, y0) @ sampled_from_src
  # PIL wants the crop -> sampled-image map in pixel-edge coordinates (a
  # pixel's centre at +1/2).
  edge_map = _shift(0.5, 0.5) @ sampled_from_src @ np.linalg.inv(matrix) @ _shift(-0.5, -0.5)
  out = image.transform(
    (out_size, out_size),
    Image.Transform.AFFINE,
    tuple(edge_map[:2].ravel()),
    resample=Image.Resampling.BILINEAR,
    fillcolor=(int(fill),) * 3,
  )
  return np.asarray(out, np.uint8)
