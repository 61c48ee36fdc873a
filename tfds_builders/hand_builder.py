"""What the hand builders share: the stored features, the stored crop, the
skipped-example log and the base of the builders that decode and crop.

`youtube3d_hands` and `hand_crops` store one fixed-size square crop per hand
instead of the full frame (`peclr_jax.hands.crops` has the geometry): frames are
large, hands are small, and pre-training only ever looks at the hand. The
crop has half-side h0 x `margin` (1.5, the largest augmentation margin) x
sqrt(2) (room for a 45 degree rotation).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from peclr_jax.hands import crops
from tfds_builders import image_files, parallel

DEFAULT_CROP_SIZE = 256


@dataclasses.dataclass(eq=False)
class CropBuilderConfig(tfds.core.BuilderConfig):
  """Builder config of the hand-crop builders.

  Attributes:
    crop_size: side S in pixels of the stored square crops.
    margin: largest crop margin the augmentation will sample; the stored crop
      has half-side h0 * margin * sqrt(2).
  """

  crop_size: int = DEFAULT_CROP_SIZE
  margin: float = crops.DEFAULT_MARGIN


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


def make_hand_crop(
  image: Image.Image,
  keypoints_2d: np.ndarray,
  out_size: int = DEFAULT_CROP_SIZE,
  margin: float = crops.DEFAULT_MARGIN,
) -> HandCrop:
  """Crops, warps, JPEG-encodes and maps keypoints for one hand.

  Args:
    image: RGB PIL image (already flipped for left hands).
    keypoints_2d: [J, 2] source pixels.
    out_size: S.
    margin: see `crops.square_from_keypoints`.

  Returns:
    A `HandCrop`.
  """
  centre, half = crops.square_from_keypoints(keypoints_2d, margin)
  matrix = crops.crop_matrix(centre, half, out_size)
  crop = Image.fromarray(crops.warp_crop(image, matrix, out_size))
  return HandCrop(image_files.encode_jpeg(crop), matrix, crops.apply_affine(matrix, keypoints_2d))


def hand_features() -> tfds.features.FeaturesDict:
  """The features every hand builder stores.

  docs/datasets.md#stored-features lists them with shapes and units.
  """
  f32 = np.float32
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "K": tfds.features.Tensor(shape=(3, 3), dtype=f32),
      "keypoints_3d": tfds.features.Tensor(shape=(21, 3), dtype=f32),
      "keypoints_2d": tfds.features.Tensor(shape=(21, 2), dtype=f32),
      "scale": tfds.features.Tensor(shape=(), dtype=f32),
      "valid": tfds.features.Tensor(shape=(21,), dtype=np.bool_),
      "sample_id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "version": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
  )


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
      "skipped": {s: dict(c) for s, c in self._counts.items()},
      "skipped_examples": {s: {r: list(n) for r, n in d.items()} for s, d in self._names.items()},
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
    kwargs["file_format"] = kwargs.get("file_format") or "array_record"
    super().__init__(**kwargs)
    self._num_workers = num_workers or parallel.default_num_workers()
    self._skips = SkipLog()
    self._remember(num_workers=num_workers, file_format=kwargs["file_format"])

  def _remember(self, **constructor_kwargs: Any) -> None:
    # Pickling (TFDS's Beam and multiprocessing paths) re-runs __init__ with
    # _original_state, so our keywords must be in it.
    self._original_state.update(constructor_kwargs)

  def skipped_summary(self) -> dict[str, dict[str, int]]:
    """{split: {reason: count}} skipped in the last build."""
    return dict(self.info.metadata.get("skipped", {}))
