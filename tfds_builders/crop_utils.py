"""Hand-centred square crops shared by the in-the-wild builders.

`youtube3d_hands` and `hand_crops` store one fixed-size square crop per hand
instead of the full frame: frames are large, hands are small, and
pre-training only ever looks at the hand. The crop is centred on the mean
2D keypoint c with half-side h0 x `margin` (1.5, the largest augmentation
margin) x sqrt(2) (room for a 45 degree rotation), h0 the largest keypoint
distance from c; crop pixel q = z (p - c) + (S - 1) / 2 with z = S / (2h),
pixel centres at integers. It is one bilinear affine warp with a constant
fill outside the frame, so the hand is never stretched (the public PeCLR
code truncated boxes at the border, then stretched them); large downscales
are box-reduced first so they do not alias. docs/datasets.md#crops has the
geometry.

This module also holds the small pieces both builders share: image loading
that reports unreadable files, the skipped-example log and a bounded ordered
thread-pool map (PIL releases the GIL while decoding and warping).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

# Rotation room: a square rotated by 45 degrees needs sqrt(2) x its half-side.
ROTATION_ROOM = math.sqrt(2.0)
DEFAULT_CROP_SIZE = 256
DEFAULT_MARGIN = 1.5
# Guards the zoom against degenerate hands (all keypoints at one point).
MIN_HALF_SIDE = 4.0
JPEG_QUALITY = 95
NUM_KEYPOINTS = 21

# Errors PIL raises for unreadable, truncated or absurd files.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError,
                           Image.DecompressionBombError)

_T = TypeVar('_T')
_R = TypeVar('_R')


@dataclasses.dataclass(eq=False)
class CropBuilderConfig(tfds.core.BuilderConfig):
  """Builder config of the hand-crop builders.

  Attributes:
    crop_size: side S in pixels of the stored square crops.
    margin: largest crop margin the augmentation will sample; the stored crop
      has half-side h0 * margin * sqrt(2).
  """
  crop_size: int = DEFAULT_CROP_SIZE
  margin: float = DEFAULT_MARGIN


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def square_from_keypoints(keypoints_2d: np.ndarray,
                          margin: float = DEFAULT_MARGIN,
                          rotation_room: float = ROTATION_ROOM,
                          min_half_side: float = MIN_HALF_SIDE):
  """Square crop around a hand given by its 2D keypoints.

  Args:
    keypoints_2d: [J, 2] (x, y) pixels.
    margin: factor on the base half-side (max keypoint distance from the mean).
    rotation_room: extra factor so that rotated views stay inside the crop.
    min_half_side: lower bound of the returned half-side in pixels.

  Returns:
    (centre [2] float64, half_side float).
  """
  kp = np.asarray(keypoints_2d, np.float64)
  if kp.ndim != 2 or kp.shape[-1] != 2 or not kp.shape[0]:
    raise ValueError(f'keypoints_2d must be [J, 2], got {kp.shape}')
  if not np.all(np.isfinite(kp)):
    raise ValueError('keypoints_2d contain NaN or inf')
  centre = kp.mean(axis=0)
  h0 = float(np.max(np.linalg.norm(kp - centre, axis=-1)))
  return centre, max(h0 * margin * rotation_room, min_half_side)


def box_pseudo_keypoints(box, num_keypoints: int = NUM_KEYPOINTS) -> np.ndarray:
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


def crop_matrix(centre, half_side: float, out_size: int) -> np.ndarray:
  """Affine map from source pixels to the pixels of an S x S square crop.

  Args:
    centre: [2] crop centre (x, y) in source pixels.
    half_side: half the crop side in source pixels.
    out_size: S.

  Returns:
    [3, 3] float64 homogeneous matrix, q = z (p - c) + (S - 1) / 2.
  """
  z = out_size / (2.0 * half_side)
  cx, cy = (float(v) for v in centre)
  off = (out_size - 1) / 2.0
  return np.array([[z, 0.0, off - z * cx],
                   [0.0, z, off - z * cy],
                   [0.0, 0.0, 1.0]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Maps [..., 2] points through a [3, 3] homogeneous affine."""
  points = np.asarray(points, np.float64)
  return points @ matrix[:2, :2].T + matrix[:2, 2]


def _shift(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def warp_crop(image: Image.Image, matrix: np.ndarray, out_size: int,
              fill=(0, 0, 0), prefilter: bool = True) -> Image.Image:
  """Warps `image` into an S x S crop: crop pixel q samples source M^-1 q.

  Args:
    image: RGB PIL image.
    matrix: [3, 3] source -> crop pixels (pixel-centre convention).
    out_size: S.
    fill: colour outside the source image.
    prefilter: box-reduce first when the warp shrinks by more than 2x.

  Returns:
    RGB PIL image of size S x S.
  """
  matrix = np.asarray(matrix, np.float64)
  src_to_out = matrix
  zoom = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
  factor = int(math.floor(1.0 / zoom)) if zoom > 0 else 1
  if prefilter and factor >= 2:
    # Source region the crop needs (pixel-edge coordinates), plus one block.
    inv = np.linalg.inv(matrix)
    s = out_size - 0.5
    corners = apply_affine(inv, np.array([[-0.5, -0.5], [s, -0.5],
                                          [-0.5, s], [s, s]])) + 0.5
    lo = np.floor(corners.min(axis=0)).astype(int) - factor
    hi = np.ceil(corners.max(axis=0)).astype(int) + factor
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], image.width), min(hi[1], image.height)
    if x1 > x0 and y1 > y0:
      image = image.reduce(factor, box=(x0, y0, x1, y1))
      # reduce: edge coordinate e -> (e - box0) / f; centres p = e - 1/2.
      reduced_from_src = np.array(
          [[1.0 / factor, 0.0, (0.5 - x0) / factor - 0.5],
           [0.0, 1.0 / factor, (0.5 - y0) / factor - 0.5],
           [0.0, 0.0, 1.0]])
      src_to_out = matrix @ np.linalg.inv(reduced_from_src)
  # PIL works in pixel-edge coordinates (a pixel's centre is at +0.5) and
  # wants the output -> input map.
  out_to_src = _shift(0.5, 0.5) @ np.linalg.inv(src_to_out) @ _shift(-0.5, -0.5)
  return image.transform((out_size, out_size), Image.Transform.AFFINE,
                         tuple(out_to_src[:2].ravel()),
                         resample=Image.Resampling.BILINEAR, fillcolor=fill)


@dataclasses.dataclass(frozen=True)
class HandCrop:
  """One stored crop.

  Attributes:
    jpeg: encoded JPEG bytes of the S x S crop.
    matrix: [3, 3] float64 source pixels -> crop pixels.
    keypoints_2d: [J, 2] float64 keypoints in crop pixels.
  """
  jpeg: bytes
  matrix: np.ndarray
  keypoints_2d: np.ndarray


def make_hand_crop(image: Image.Image, keypoints_2d: np.ndarray,
                   out_size: int = DEFAULT_CROP_SIZE,
                   margin: float = DEFAULT_MARGIN) -> HandCrop:
  """Crops, warps, JPEG-encodes and maps keypoints for one hand.

  Args:
    image: RGB PIL image (already flipped for left hands).
    keypoints_2d: [J, 2] source pixels.
    out_size: S.
    margin: see `square_from_keypoints`.

  Returns:
    A `HandCrop`.
  """
  centre, half = square_from_keypoints(keypoints_2d, margin)
  matrix = crop_matrix(centre, half, out_size)
  crop = warp_crop(image, matrix, out_size)
  return HandCrop(encode_jpeg(crop), matrix, apply_affine(matrix, keypoints_2d))


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def load_rgb(path: os.PathLike | str, exif_transpose: bool = False) -> Image.Image:
  """Fully decodes an image file to RGB.

  Args:
    path: image file.
    exif_transpose: apply the EXIF orientation (phone photos).

  Returns:
    RGB PIL image.

  Raises:
    One of UNREADABLE_IMAGE_ERRORS for unreadable or truncated files (PIL
    raises on truncation because ImageFile.LOAD_TRUNCATED_IMAGES is left off).
  """
  with Image.open(path) as im:
    im.load()
    if exif_transpose:
      im = ImageOps.exif_transpose(im)
    return im.convert('RGB')


# ---------------------------------------------------------------------------
# Builder helpers
# ---------------------------------------------------------------------------


class SkipLog:
  """Counts skipped examples per split and reason, keeping a few names.

  Stored in `builder.info.metadata` as {'skipped': {split: {reason: n}},
  'skipped_examples': {split: {reason: [name, ...]}}} (JSON).
  """

  def __init__(self, max_names: int = 20):
    self._max_names = max_names
    self._counts = collections.defaultdict(collections.Counter)
    self._names = collections.defaultdict(lambda: collections.defaultdict(list))

  def add(self, split: str, reason: str, name: str) -> None:
    self._counts[split][reason] += 1
    names = self._names[split][reason]
    if len(names) < self._max_names:
      names.append(str(name))

  def total(self, split: str) -> int:
    return sum(self._counts[split].values())

  def counts(self, split: str) -> dict[str, int]:
    return dict(self._counts[split])

  def as_metadata(self) -> dict[str, Any]:
    return {
        'skipped': {s: dict(c) for s, c in self._counts.items()},
        'skipped_examples': {s: {r: list(n) for r, n in d.items()}
                             for s, d in self._names.items()},
    }


class SizedExamples(Iterable):
  """Iterable of `(key, example)` pairs with a `len()` (the expected count).

  Returned per split by `_split_generators` so TFDS's tqdm bar gets a total
  and an ETA (peclr_jax/data.py protocol). `make_iterator` is called afresh
  on every iteration.
  """

  def __init__(self, make_iterator: Callable[[], Iterator[Any]], length: int):
    self._make_iterator = make_iterator
    self._length = int(length)

  def __iter__(self) -> Iterator[Any]:
    return iter(self._make_iterator())

  def __len__(self) -> int:
    return self._length


class CropBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the builders that decode and crop images share (YT3D, hand crops).

  array_record by default (TFDS's default, tfrecord, needs TensorFlow),
  a thread count for decoding and cropping, and a `SkipLog`. A subclass takes
  its own keywords, calls `super().__init__(num_workers=..., **kwargs)` and
  records them with `_remember(...)`.
  """

  def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
    kwargs['file_format'] = kwargs.get('file_format') or 'array_record'
    super().__init__(**kwargs)
    self._num_workers = num_workers or default_num_workers()
    self._skips = SkipLog()
    self._remember(num_workers=num_workers, file_format=kwargs['file_format'])

  def _remember(self, **constructor_kwargs: Any) -> None:
    # Pickling (TFDS's Beam and multiprocessing paths) re-runs __init__ with
    # _original_state, so our keywords must be in it.
    self._original_state.update(constructor_kwargs)

  def skipped_summary(self) -> dict[str, dict[str, int]]:
    """{split: {reason: count}} skipped in the last build."""
    return dict(self.info.metadata.get('skipped', {}))


def imap_bounded(fn: Callable[[_T], _R], items: Iterable[_T],
                 num_workers: int, max_in_flight: int | None = None
                 ) -> Iterator[_R]:
  """Ordered `map(fn, items)` on a thread pool with bounded look-ahead.

  Unlike `Executor.map`, at most `max_in_flight` results wait in memory, so a
  slow consumer (the TFDS writer) never makes the whole dataset pile up.
  Exceptions raised by `fn` propagate when their result is reached.
  """
  if num_workers <= 1:
    yield from map(fn, items)
    return
  max_in_flight = max_in_flight or 4 * num_workers
  pool = concurrent.futures.ThreadPoolExecutor(num_workers)
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= max_in_flight:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def default_num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def hand_features() -> tfds.features.FeaturesDict:
  """The features every hand builder stores.

  docs/datasets.md#stored-features lists them with shapes and units.
  """
  f32 = np.float32
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format='jpeg'),
      'K': tfds.features.Tensor(shape=(3, 3), dtype=f32),
      'keypoints_3d': tfds.features.Tensor(shape=(21, 3), dtype=f32),
      'keypoints_2d': tfds.features.Tensor(shape=(21, 2), dtype=f32),
      'scale': tfds.features.Tensor(shape=(), dtype=f32),
      'valid': tfds.features.Tensor(shape=(21,), dtype=np.bool_),
      'sample_id': tfds.features.Tensor(shape=(), dtype=np.int64),
      'version': tfds.features.Tensor(shape=(), dtype=np.int32),
  })
