"""3D hand keypoints for arbitrary images: the ``Predictor`` API and a CLI.

Python::

    predictor = Predictor.from_checkpoint("workdir")   # or Predictor(model, 224)
    out = predictor.predict([img_a, img_b])           # uint8, any sizes
    out["kp3d"]  # [N, 21, 3] reference-bone units (x scale if given)
    out["kp2d"]  # [N, 21, 2] pixels of each original image

Command line::

    python -m peclr_jax.predict --checkpoint <dir> --images <dir or files...> \
        --out preds.json [--viz <outdir>] [--scale 0.03] [--batch-size 16]

The public FreiHAND two-pass test-time crop (:mod:`peclr_jax.evaluation.evaluate`),
then FreiHAND joint order with the wrist as root. docs/predict.md gives the
procedure, the assumed camera when ``K`` is None, the units, and why
images of mixed sizes share zero-padded batches.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peclr_jax import models
from peclr_jax.evaluation import evaluate
from peclr_jax.hands.crops import (
  BOX_FILL,
  INITIAL_BOX_FRACTION,
  TEST_CROP_SIZE,
  initial_box,
  map_box,
)
from peclr_jax.models import restore
from peclr_jax.train import checkpoints

DEFAULT_BATCH_SIZE = 16
DEFAULT_INPUT_SIZE = TEST_CROP_SIZE
# The CLI decodes larger images reduced (decode_image): the network sees
# crops of input_size pixels cut from boxes of about half the image, so a
# 4096 px side is already several times more detail than it uses, while a
# 13000 x 13000 image is 0.5 GB as RGB before any padding or copies.
MAX_DECODE_PIXELS = 4096 * 4096
# Most pixels of a chunk's padded canvas (rows x height x width, 3 bytes
# each): 200 MB, four images of MAX_DECODE_PIXELS or 12 MP photos.
PIXEL_BUDGET = 1 << 26
# Most pixels of an image the CLI's --viz plots: its figures are 500 px wide,
# and matplotlib takes 0.8 GB and seconds to draw a 10 Mpx image.
VIZ_PIXELS = 1 << 20

__all__ = ["Predictor", "image_intrinsics", "to_rgb", "decode_image", "load_image", "main"]


# ==========================================================================
# Helpers
# ==========================================================================


def image_intrinsics(height: int, width: int) -> np.ndarray:
  """Assumed camera of an H x W image when none is given.

  The public default K for 224 px (``models.default_intrinsics(224)``)
  scaled by ``max(H, W) / 224`` (square pixels), principal point at
  (W / 2, H / 2) as ``default_intrinsics``. Equal to
  ``models.default_intrinsics(H, W)`` for square images.

  Args:
      height, width: image size in pixels.

  Returns:
      [3, 3] float64 intrinsics.
  """
  side = max(int(height), int(width))
  K = np.array(models.default_intrinsics(side, side), np.float64)
  K[0, 2] = width / 2.0
  K[1, 2] = height / 2.0
  return K


def to_rgb(image, name: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] from a uint8 grayscale, RGB or RGBA image.

  Args:
      image: uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped).
      name: how errors call the argument.

  Returns:
      uint8 [H, W, 3] (the input itself when already RGB).

  Raises:
      ValueError: another dtype, rank or channel count, or an empty image.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(
      f"{name} must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
      f"got dtype {image.dtype} (convert to uint8 0..255 first)"
    )
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"{name} must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {image.shape}"
    )
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{name} is empty: shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    return np.ascontiguousarray(image[..., :3])
  return image


def _as_image_list(images) -> list[np.ndarray]:
  """Validated list of uint8 [H, W, 3] images."""
  if isinstance(images, np.ndarray) or isinstance(images, jax.Array):
    arr = np.asarray(images)
    if arr.ndim != 4:
      raise ValueError(
        "images must be a list of uint8 [H, W(, C)] arrays or a uint8 array "
        f"[N, H, W, C] with C in (1, 3, 4); got an array of shape {arr.shape} "
        "(for one image pass [image] or image[None])"
      )
    images = list(arr)
  elif not isinstance(images, (list, tuple)):
    raise ValueError(
      "images must be a list of uint8 [H, W(, C)] arrays or a uint8 "
      f"array [N, H, W, C]; got {type(images).__name__}"
    )
  return [to_rgb(im, f"images[{i}]") for i, im in enumerate(images)]


def _per_image(value, n: int, shape: tuple[int, ...], name: str, allow_shared: bool):
  """value as float64 [n, *shape] (a shared [*shape] value broadcast if allowed)."""
  dims = ", ".join(map(str, shape))
  want = f"[N, {dims}]" if shape else "[N]"
  if allow_shared:
    want = (f"[{dims}] or " if shape else "a scalar or ") + want
  arr = np.asarray(value, np.float64)
  if arr.shape == shape and allow_shared:
    arr = np.broadcast_to(arr, (n,) + shape)
  if arr.shape != (n,) + shape:
    raise ValueError(f"{name} must be {want} with N={n} images; got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains non-finite values")
  return np.array(arr)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _canvas_side(n: int) -> int:
  """n rounded up to a multiple of 2**(floor(log2 n) - 2) (>= 8)."""
  step = max(8, 1 << max(0, int(n).bit_length() - 3))
  return -(-int(n) // step) * step


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, crops, K):
  # Merging makes a fresh module, so switching it to eval mode here never
  # changes the caller's model (which may be in the middle of training).
  model = nnx.merge(graphdef, state)
  model.eval()
  out = model(crops, K)
  return out["kp2d"], out["kp3d"]


# ==========================================================================
# Predictor
# ==========================================================================


class Predictor:
  """Two-pass 3D hand keypoint prediction on uint8 images of any size.

  Attributes:
      model: the :class:`peclr_jax.models.KeypointModel` (never mutated:
          each call runs an eval-mode copy).
      input_size: side S of the network's square input (crop) in pixels.
      batch_size: most images per model call.
      fill, box_fraction: the protocol's box fill of the crop (0.7) and
          first-box side relative to the image's longer side (0.33).
      pixel_budget: most pixels of one model call's padded image canvas.
  """

  def __init__(
    self,
    model: models.KeypointModel,
    input_size: int = DEFAULT_INPUT_SIZE,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fill: float = BOX_FILL,
    box_fraction: float = INITIAL_BOX_FRACTION,
    pixel_budget: int = PIXEL_BUDGET,
  ):
    """Wraps an in-memory keypoint model (e.g. right after fine-tuning).

    Args:
        model: a KeypointModel; its current weights are read at every call.
        input_size: crop side S the model was trained for.
        batch_size: most images per model call (device memory bound).
        fill: fraction of the crop covered by a box's longer side.
        box_fraction: first box side / image's longer side (boxes=None).
        pixel_budget: most pixels (rows x height x width) of the zero-padded
            canvas one model call crops from (host memory bound); an image
            larger than that is predicted alone.
    """
    if not isinstance(model, models.KeypointModel):
      raise ValueError(f"model must be a models.KeypointModel, got {type(model).__name__}")
    if int(input_size) < 1 or int(batch_size) < 1:
      raise ValueError(
        f"input_size and batch_size must be positive, got {input_size}, {batch_size}"
      )
    self.model = model
    self.input_size = int(input_size)
    self.batch_size = int(batch_size)
    self.fill = float(fill)
    self.box_fraction = float(box_fraction)
    self.pixel_budget = int(pixel_budget)
    self.meta: dict[str, Any] = {}
    self.path: str | None = None

  @classmethod
  def from_checkpoint(
    cls, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE, dtype=jnp.float32, **kwargs
  ) -> Predictor:
    """Loads a fine-tuned or converted keypoint model
    (:func:`peclr_jax.models.restore.keypoint_model`).

    Args:
        path: a fine-tuning workdir (its ``best/`` is used when it holds a
            step, else its latest checkpoint), a checkpoints directory, or a
            step directory. The meta must have kind 'finetune' or 'keypoint'.
        batch_size: most images per model call.
        dtype: compute dtype of the backbone (bfloat16 on accelerators).
        **kwargs: passed to the constructor (fill, box_fraction, pixel_budget).

    Returns:
        A Predictor with ``meta`` (the checkpoint's meta) and ``path``
        (the directory actually read) set.

    Raises:
        peclr_jax.train.checkpoints.CheckpointError: no checkpoint, or one of
            another kind (e.g. a pre-training checkpoint).
    """
    restored = restore.keypoint_model(path, dtype=dtype)
    predictor = cls(restored.model, restored.input_size, batch_size=batch_size, **kwargs)
    predictor.meta = restored.meta
    predictor.path = restored.path
    return predictor

  # ----------------------------------------------------------------------

  def _rows(self, n: int) -> int:
    return min(self.batch_size, _next_pow2(n))

  def predict_crops(self, crops, K_crop) -> dict[str, np.ndarray]:
    """The model on ready crops (batched, padded, jitted).

    Args:
        crops: float32 [M, S, S, 3] ImageNet-normalised crops.
        K_crop: [M, 3, 3] intrinsics of the crops.

    Returns:
        float64 NumPy ``kp2d`` [M, 21, 2] crop pixels and ``kp3d``
        [M, 21, 3] bone units, in the model's frame (AIT order, palm root).
    """
    crops = jnp.asarray(crops, jnp.float32)
    K_crop = np.asarray(K_crop, np.float32)
    s = self.input_size
    if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
      raise ValueError(f"crops must be [M, {s}, {s}, 3]; got shape {crops.shape}")
    m = crops.shape[0]
    if K_crop.shape != (m, 3, 3):
      raise ValueError(f"K_crop must be [{m}, 3, 3]; got shape {K_crop.shape}")
    graphdef, state = nnx.split(self.model)
    kp2d, kp3d = [], []
    for start in range(0, m, self.batch_size):
      x = crops[start : start + self.batch_size]
      k = K_crop[start : start + self.batch_size]
      n = x.shape[0]
      rows = self._rows(n)
      if rows > n:  # pad with copies of the first row, dropped below
        x = jnp.concatenate([x, jnp.repeat(x[:1], rows - n, axis=0)])
        k = np.concatenate([k, np.repeat(k[:1], rows - n, axis=0)])
      u, p = _forward(graphdef, state, x, jnp.asarray(k))
      kp2d.append(np.asarray(u, np.float64)[:n])
      kp3d.append(np.asarray(p, np.float64)[:n])
    if not kp2d:
      return {"kp2d": np.zeros((0, 21, 2)), "kp3d": np.zeros((0, 21, 3))}
    return {"kp2d": np.concatenate(kp2d), "kp3d": np.concatenate(kp3d)}

  def _chunks(self, sizes: np.ndarray, order: Sequence[int]):
    """Runs of ``order`` of at most batch_size images whose padded canvas
    (as :meth:`_two_pass` builds it) stays within pixel_budget."""
    chunk: list[int] = []
    for i in order:
      grown = chunk + [i]
      canvas = (
        self._rows(len(grown))
        * _canvas_side(sizes[grown, 0].max())
        * _canvas_side(sizes[grown, 1].max())
      )
      if chunk and (len(grown) > self.batch_size or canvas > self.pixel_budget):
        yield chunk
        grown = [i]
      chunk = grown
    if chunk:
      yield chunk

  def _two_pass(
    self, images: list[np.ndarray], K: np.ndarray, first: np.ndarray, scale: np.ndarray
  ) -> dict[str, np.ndarray]:
    """:func:`evaluate.two_pass_predict` on a chunk of at most batch_size
    images, placed top-left on one zero-padded canvas (coordinates kept)."""
    n = len(images)
    rows = self._rows(n)
    height = _canvas_side(max(im.shape[0] for im in images))
    width = _canvas_side(max(im.shape[1] for im in images))
    canvas = np.zeros((rows, height, width, 3), np.uint8)
    for i, im in enumerate(images):
      canvas[i, : im.shape[0], : im.shape[1]] = im
    # Rows past n (black, with the first image's camera and box) keep the
    # crops' and the model's batch at a power of two; dropped below.
    pad = np.zeros(rows - n, np.int64)
    out = evaluate.two_pass_predict(
      self.predict_crops,
      canvas,
      np.concatenate([K, K[pad]]),
      np.concatenate([scale, scale[pad]]),
      self.input_size,
      fill=self.fill,
      first_box=np.concatenate([first, first[pad]]),
    )
    return {k: v[:n] for k, v in out.items()}

  def predict(self, images, K=None, boxes=None, scale=None) -> dict[str, np.ndarray]:
    """Predicts 3D and 2D hand keypoints (one right or left hand per image).

    Args:
        images: list of uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]
            images of any sizes, or a uint8 array [N, H, W, C].
        K: None (assumed camera, :func:`image_intrinsics`), [3, 3] shared
            or [N, 3, 3] intrinsics of the original images.
        boxes: None (centred first box) or [N, 4] hand boxes (x0, y0, x1,
            y1) in image pixels for the first crop.
        scale: None (bone units), a scalar or [N]: metric length of the
            reference bone (middle MCP -> PIP); kp3d is multiplied by it.

    Returns:
        dict of float64 NumPy arrays, FreiHAND joint order, wrist root:
            ``kp3d`` [N, 21, 3] camera frame (bone units or x scale);
            ``kp2d`` [N, 21, 2] pixels of the original images;
            ``box`` [N, 4] second-pass box (image pixels);
            ``affine`` [N, 3, 3] second-pass transform image -> crop;
            ``K`` [N, 3, 3] intrinsics used for the original images.

    Raises:
        ValueError: images, K, boxes or scale of a wrong type or shape.
    """
    ims = _as_image_list(images)
    n = len(ims)
    sizes = np.array([im.shape[:2] for im in ims], np.int64).reshape(n, 2)
    if K is None:
      K = np.stack([image_intrinsics(h, w) for h, w in sizes]) if n else np.zeros((0, 3, 3))
    else:
      K = _per_image(K, n, (3, 3), "K", allow_shared=True)
    if boxes is None:
      first = (
        np.stack([initial_box((h, w), self.box_fraction) for h, w in sizes])
        if n
        else np.zeros((0, 4))
      )
    else:
      first = _per_image(boxes, n, (4,), "boxes", allow_shared=False)
      side = np.maximum(first[:, 2] - first[:, 0], first[:, 3] - first[:, 1])
      bad = np.flatnonzero((first[:, 2] < first[:, 0]) | (first[:, 3] < first[:, 1]) | (side <= 0))
      if bad.size:
        raise ValueError(
          f"boxes must be (x0, y0, x1, y1) with x1 >= x0, y1 >= y0 and "
          f"a positive side; boxes[{bad[0]}] = {first[bad[0]].tolist()}"
        )
    factor = np.ones(n) if scale is None else _per_image(scale, n, (), "scale", allow_shared=True)
    if np.any(factor <= 0):
      raise ValueError(f"scale must be positive; got {np.asarray(scale).tolist()}")

    result = {
      "kp2d": np.zeros((n, 21, 2)),
      "kp3d": np.zeros((n, 21, 3)),
      "box": np.zeros((n, 4)),
      "affine": np.zeros((n, 3, 3)),
      "K": K,
    }
    # Similar sizes share a chunk (and a small canvas); results go back
    # to the caller's order.
    order = sorted(
      range(n), key=lambda i: (_canvas_side(sizes[i, 0]), _canvas_side(sizes[i, 1]), i)
    )
    for chunk in self._chunks(sizes, order):
      idx = np.array(chunk)
      out = self._two_pass([ims[i] for i in idx], K[idx], first[idx], factor[idx])
      result["kp2d"][idx] = out["kp2d"]
      result["kp3d"][idx] = out["kp3d_metres"]  # x scale: bone units when None
      result["box"][idx] = out["box"]
      result["affine"][idx] = out["affine"]
    return result


# ==========================================================================
# Command line
# ==========================================================================


def _reduction(width: int, height: int, max_pixels: int | None) -> int:
  """Smallest integer f with ceil(W / f) * ceil(H / f) <= max_pixels (1 if None)."""
  if max_pixels is None:
    return 1
  f = max(1, math.ceil(math.sqrt(width * height / max_pixels)))
  while -(-width // f) * -(-height // f) > max_pixels:
    f += 1
  return f


def _eight_bit(img):
  """A 16-bit grayscale PIL image (mode I;16*, or I as PIL gives 16-bit PGM
  and TIFF) as mode L scaled by the bit depth, 65535 -> 255 (PIL's own
  conversion clips at 255: almost all white)."""
  from PIL import Image

  lut = np.round(np.arange(65536) * (255 / 65535)).astype(np.uint8)
  return Image.fromarray(lut[np.clip(np.asarray(img), 0, 65535)], "L")


def decode_image(path: str, max_pixels: int | None = MAX_DECODE_PIXELS):
  """Reads an image file as uint8 RGB, reduced when it has over max_pixels.

  A larger image is decoded reduced by an integer factor f: JPEGs first by
  libjpeg's DCT scaling (``draft``: 1/2, 1/4 or 1/8, the full size never in
  memory), then any format by averaging f x f blocks (``reduce``). Decoded
  pixel (x, y) is the mean of the original pixels [f x, f x + f) x
  [f y, f y + f) (:func:`decoded_to_original`). 16-bit grayscale is scaled by
  its bit depth; alpha is dropped, not composited (pixels as stored). EXIF
  orientation is applied (as OpenCV's imread does), so sizes and pixels are
  the image as viewers display it.

  Args:
      path: image file.
      max_pixels: most decoded pixels; None: always the full size.

  Returns:
      (image, f, (H, W)): uint8 [ceil(H / f), ceil(W / f), 3], the
      reduction f >= 1, and the displayed full size.

  Raises:
      ValueError: a broken symbolic link, an empty, unreadable or non-image
          file (the message says why).
  """
  from PIL import ExifTags, Image, UnidentifiedImageError

  if os.path.islink(path) and not os.path.exists(path):
    raise ValueError(f"broken symbolic link (to {os.readlink(path)!r})")
  if os.path.getsize(path) == 0:
    raise ValueError("empty file")
  try:
    with Image.open(path) as img:
      width, height = img.size
      # Read from the file itself: reduced or converted copies lose TIFF tags.
      orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
      f = _reduction(width, height, max_pixels)
      # JPEG only: a power of two <= f (None for other formats).
      drafted = img.draft(None, (-(-width // f), -(-height // f))) if f > 1 else None
      factor = round(width / drafted[1][2]) if drafted else 1
      img.load()
      if img.mode.startswith("I;16") or img.mode == "I":
        img = _eight_bit(img)
      elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
      rest = _reduction(img.width, img.height, max_pixels)
      factor *= rest
      img = img.reduce(rest)
      # As ImageOps.exif_transpose, which reads the tags from its argument.
      method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
      }.get(orientation)
      if method is not None:
        img = img.transpose(method)
      rgb = np.asarray(img.convert("RGB"), np.uint8)
  except UnidentifiedImageError:
    raise ValueError("not an image (unrecognised format)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode: {e}") from None
  if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise ValueError(f"empty image {rgb.shape}")
  size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
  return rgb, factor, size


def load_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB at full size (EXIF
  orientation applied, 16-bit grayscale scaled to 8 bits).

  Raises:
      ValueError: empty, unreadable or non-image file (message says why).
  """
  return decode_image(path, max_pixels=None)[0]


def decoded_to_original(factor: int) -> np.ndarray:
  """[3, 3] decoded pixels -> full-size pixels for a reduction by factor.

  Pixel centres at integer coordinates (OpenCV, :func:`peclr_jax.hands.augment.warp`):
  decoded pixel x averages original pixels f x .. f x + f - 1, so it sits at
  f x + (f - 1) / 2.
  """
  f = float(factor)
  return np.array([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1]])


def display_name(path: str) -> str:
  """path as valid UTF-8 text: bytes of a non-UTF-8 file name (held by Python
  as lone surrogates, which JSON parsers and fonts reject) shown as \\xNN."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def list_inputs(paths: Sequence[str]) -> list[str]:
  """Files named on the command line; a directory adds its (non-hidden)
  regular files and broken symbolic links, sorted, not recursively. Missing
  paths and broken links are kept so they are reported as unreadable."""
  files = []
  for p in paths:
    if os.path.isdir(p):
      for f in sorted(os.listdir(p)):
        path = os.path.join(p, f)
        if not f.startswith(".") and (os.path.isfile(path) or not os.path.exists(path)):
          files.append(path)
    else:
      files.append(p)
  return files


def _unique_stem(path: str, used: set[str]) -> str:
  stem = os.path.splitext(os.path.basename(display_name(path)))[0] or "image"
  name, k = stem, 1
  while name in used:
    name, k = f"{stem}_{k}", k + 1
  used.add(name)
  return name


def _write_viz(
  outdir: str, path: str, image: np.ndarray, kp2d, kp3d, used: set[str], unit: str
) -> list[str]:
  from PIL import Image

  from peclr_jax.evaluation import visualize  # matplotlib only when asked for

  f = _reduction(image.shape[1], image.shape[0], VIZ_PIXELS)
  image = np.asarray(Image.fromarray(image).reduce(f))
  kp2d = (np.asarray(kp2d) - (f - 1) / 2) / f  # as decoded_to_original
  stem = _unique_stem(path, used)
  title = os.path.basename(display_name(path))
  return [
    display_name(p)
    for p in (
      visualize.plot_keypoints_2d(
        image, kp2d, os.path.join(outdir, f"{stem}_2d.png"), order="freihand", title=title
      ),
      visualize.plot_skeleton_3d(
        kp3d, os.path.join(outdir, f"{stem}_3d.png"), order="freihand", title=f"{title} ({unit})"
      ),
    )
  ]


def _reason(e: Exception) -> str:
  """One line of UTF-8 text saying why a file failed (messages may quote a
  non-UTF-8 path; a bare MemoryError has no message)."""
  text = display_name(" ".join(str(e).split()))
  if isinstance(e, (ValueError, OSError)):
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_output_dir(directory: str, flag: str):
  """Creates directory and a file in it, so a bad --out or --viz fails
  before any work rather than after it.

  Raises:
      ValueError: the path is a file, or nothing can be written there.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{flag}: {display_name(directory)} is not a directory")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(
      f"{flag}: cannot write in {display_name(directory)}: {e.strerror or e}"
    ) from None


def _write_json(path: str, obj):
  """Writes obj to a temporary file and renames it to path: a crash leaves
  the previous file or none, never half a report."""
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _predict_files(predictor: Predictor, batch, scale) -> dict[str, np.ndarray]:
  """Predictor.predict on decoded files [(path, image, factor, (H, W))].

  A reduced image is predicted in its decoded pixels with the full image's
  camera and first box mapped into them, so the network sees the crops it
  would see in the full image (block-averaged rather than point-sampled).

  Returns:
      predict's output, plus ``kp2d_decoded`` [N, 21, 2] (decoded pixels);
      ``kp2d`` and ``box`` are in full-size pixels.
  """
  K, first = [], []
  for _, _, f, size in batch:
    to_original = decoded_to_original(f)
    K.append(np.linalg.solve(to_original, image_intrinsics(*size)))
    first.append(map_box(np.linalg.inv(to_original), initial_box(size, predictor.box_fraction)))
  out = predictor.predict(
    [im for _, im, _, _ in batch], K=np.stack(K), boxes=np.stack(first), scale=scale
  )
  f = np.array([f for _, _, f, _ in batch], np.float64)[:, None, None]
  out["kp2d_decoded"] = out["kp2d"]
  out["kp2d"] = f * out["kp2d"] + (f - 1) / 2
  out["box"] = f[:, 0] * out["box"] + (f[:, 0] - 1) / 2
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m peclr_jax.predict",
    description="Predict 3D hand keypoints (FreiHAND order, wrist root) for images.",
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="fine-tuning workdir (best/ preferred), checkpoints dir or step dir",
  )
  parser.add_argument(
    "--images",
    required=True,
    nargs="+",
    help="image files and/or directories (their files, not recursive)",
  )
  parser.add_argument("--out", required=True, help="output JSON file")
  parser.add_argument("--viz", default=None, help="directory for 2D overlays and 3D skeleton PNGs")
  parser.add_argument(
    "--scale",
    type=float,
    default=None,
    help="metric length of the reference bone (m); default: bone units",
  )
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry. Returns the exit status: 0 when at least one image was
  predicted, 1 otherwise (nothing readable, or a bad checkpoint), 2 for a
  bad argument (checked before any work).

  Whatever happens to one file or batch (undecodable, out of memory, a
  failed model call) is recorded under "skipped" with the reason; a failed
  batch is retried image by image. The JSON report is always written.
  """
  from tqdm import tqdm

  args = build_parser().parse_args(argv)
  if args.batch_size < 1:
    print("--batch-size must be positive", file=sys.stderr)
    return 2
  if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
    print("--scale must be a positive number", file=sys.stderr)
    return 2
  try:
    if os.path.isdir(args.out):
      raise ValueError(
        f"--out: {display_name(args.out)} is a directory; name the JSON file to write"
      )
    _check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    if args.viz:
      _check_output_dir(args.viz, "--viz")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
  except (checkpoints.CheckpointError, FileNotFoundError) as e:
    print(
      f"error: cannot load a keypoint model from {display_name(args.checkpoint)}: {e}",
      file=sys.stderr,
    )
    return 1

  files = list_inputs(args.images)
  unit = "bone" if args.scale is None else "metres"
  predictions, skipped, used = [], [], set()
  pending: list[tuple[str, np.ndarray, int, tuple[int, int]]] = []

  def run(batch):
    try:
      out = _predict_files(predictor, batch, args.scale)
    except Exception as e:  # pylint: disable=broad-except
      # One bad image or an oversized batch must not cost the others.
      if len(batch) > 1:
        for item in batch:
          run([item])
      else:
        skipped.append(
          {"file": display_name(batch[0][0]), "error": f"prediction failed: {_reason(e)}"}
        )
      return
    for i, (path, im, f, (h, w)) in enumerate(batch):
      entry = {
        "file": display_name(path),
        "height": h,
        "width": w,
        "reduction": f,
        "kp3d": out["kp3d"][i].tolist(),
        "kp2d": out["kp2d"][i].tolist(),
        "box": out["box"][i].tolist(),
      }
      if args.viz:
        try:
          entry["viz"] = _write_viz(
            args.viz, path, im, out["kp2d_decoded"][i], out["kp3d"][i], used, unit
          )
        except Exception as e:  # pylint: disable=broad-except
          entry["viz_error"] = _reason(e)
      predictions.append(entry)

  def flush():
    if pending:
      run(list(pending))
      bar.update(len(pending))
      pending.clear()

  with tqdm(
    total=len(files), desc="predict", unit="img", file=sys.stderr, disable=args.no_progress
  ) as bar:
    for path in files:
      try:
        pending.append((path, *decode_image(path, MAX_DECODE_PIXELS)))
      except Exception as e:  # pylint: disable=broad-except
        skipped.append({"file": display_name(path), "error": _reason(e)})
        bar.update(1)
        continue
      # Decoded images wait for a full batch: bound them by pixels too.
      if (
        len(pending) >= predictor.batch_size
        or sum(im.shape[0] * im.shape[1] for _, im, _, _ in pending) >= predictor.pixel_budget
      ):
        flush()
    flush()

  report = {
    "checkpoint": display_name(predictor.path),
    "backbone": predictor.meta.get("backbone"),
    "input_size": predictor.input_size,
    "joint_order": "freihand",
    "root": "wrist",
    "kp3d_units": "metres" if args.scale is not None else "reference bone (middle MCP-PIP)",
    "kp2d_units": "pixels of the original image (x, y)",
    "intrinsics": "assumed: 224 px default scaled to the longer image side",
    "reduction": (
      f"images over {MAX_DECODE_PIXELS} pixels are decoded reduced by the "
      "integer factor 'reduction' (f x f pixel blocks averaged)"
    ),
    "predictions": predictions,
    "skipped": skipped,
  }
  _write_json(args.out, report)
  for s in skipped:
    print(f"skipped {s['file']}: {s['error']}", file=sys.stderr)
  print(
    f"predicted {len(predictions)} image(s), skipped {len(skipped)}; "
    f"wrote {display_name(args.out)}",
    file=sys.stderr,
  )
  return 0 if predictions else 1


if __name__ == "__main__":
  sys.exit(main())
