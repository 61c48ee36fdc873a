"""Host input pipelines (grain) for pre-training, fine-tuning and evaluation.

Host work is only: read, decode, one fixed-size hand-centred source crop and
batching. All per-view randomness (rotation, scale, jitter, colour) happens on
the accelerator in `peclr_jax.hands.augment`, which cuts its 128 px views out of the
`source_size` px crop made here. Every step is deterministic for a seed, and
process p takes local batch p of every group of process_count, so the global
batch is the same whatever the number of processes. The iterator's state
(`it.get_state()`, JSON) is saved in every checkpoint.

docs/design.md#input-pipeline shows the pipeline, why sources are mixed in
exact proportion without replacement, the crop, and how the iterator state
is checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from peclr_jax.hands import crops, joints

# Half-side factor of the source crop over the max keypoint distance: the
# largest margin of the view augmentation (1.5) times sqrt(2) so a view rotated
# by up to 45 degrees stays inside the crop.
DEFAULT_CROP_MARGIN = crops.DEFAULT_MARGIN * crops.ROTATION_ROOM

# Keys of every batch (evaluation adds 'mask').
BATCH_KEYS = ("image", "keypoints_2d", "keypoints_3d", "K", "scale", "valid", "source", "index")

Source = Any  # random access: __len__ and __getitem__(int) -> feature dict


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """Opens a prepared TFDS dataset as a random-access source, images undecoded.

  `image` comes back as the encoded bytes (JPEG/PNG) so decoding happens in
  `decode_and_crop` (PIL, with JPEG DCT downscaling for large frames), without
  TensorFlow. The dataset must already be built in `data_dir`; its builder
  module need not be imported (TFDS reads the dataset_info.json).

  Args:
    name: TFDS name, optionally with config/version: 'freihand/small:1.0.0'.
    split: split spec, e.g. 'train', 'test', 'train[:90%]'.
    data_dir: the TFDS data directory.

  Returns:
    A picklable random-access data source (`len`, `[i]` -> feature dict);
    a damaged shard is a `data.DamagedShardError` naming the file.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from peclr_jax import data  # pylint: disable=g-import-not-at-top

  return data.NamedShards(
    tfds.data_source(
      name,
      split=split,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
  )


class _Tagged:
  """Random access view of a source (optionally a subset) that adds ids.

  Each example gets `index` (int64, position in the *original* source) and
  `source` (int32 id). Evaluation mode also lays the data out in padded,
  process-sharded global batches and adds `mask`.
  """

  def __init__(self, source: Source, source_id: int, indices: np.ndarray | None = None):
    self._source = source
    self._source_id = int(source_id)
    self._indices = indices

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def __getitem__(self, k: int) -> dict[str, Any]:
    i = int(k) if self._indices is None else int(self._indices[k])
    ex = dict(self._source[i])
    ex["index"] = np.int64(i)
    ex["source"] = np.int32(self._source_id)
    return ex


class _PaddedEvalShard:
  """This process's share of evaluation batches, padded to whole batches.

  Global batch t holds examples t*G .. t*G+G-1 (G = global batch); process p
  reads slots p*b .. p*b+b-1 of it (b = G / process_count), so concatenating
  the process-local batches in process order restores the source order. Slots
  past the end repeat example 0 with `mask` False: real pixels and geometry
  keep padded rows finite, and an unmasked scatter by `index` would only
  rewrite example 0 with its own prediction.
  """

  def __init__(
    self, source: Source, source_id: int, global_batch: int, process_index: int, process_count: int
  ):
    self._source = source
    self._source_id = int(source_id)
    self._n = len(source)
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self.num_batches = -(-self._n // global_batch)

  def __len__(self) -> int:
    return self.num_batches * self._local

  def __getitem__(self, k: int) -> dict[str, Any]:
    t, s = divmod(int(k), self._local)
    g = t * self._global + self._offset + s
    real = g < self._n
    i = g if real else 0
    ex = dict(self._source[i])
    ex["index"] = np.int64(i)
    ex["source"] = np.int32(self._source_id)
    ex["mask"] = np.bool_(real)
    return ex


# ----------------------------------------------------------------------------
# Decoding and the host crop (its geometry: peclr_jax/hands/crops.py)
# ----------------------------------------------------------------------------
def _open_image(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(image)))
  if isinstance(image, (str, os.PathLike)):
    return Image.open(image)
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
  return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def image_size(image: Any) -> tuple[int, int]:
  """(height, width) of an encoded / array image (reads only the header)."""
  if isinstance(image, np.ndarray):
    return int(image.shape[0]), int(image.shape[1])
  w, h = _open_image(image).size
  return h, w


def decode_and_crop(
  ex: Mapping[str, Any],
  *,
  size: int,
  crop: str = "hand",
  margin: float = DEFAULT_CROP_MARGIN,
  fill: int = 0,
) -> dict[str, np.ndarray]:
  """One example -> fixed-size crop with its geometry mapped into the crop.

  Missing label features default to zeros with `valid` False (K: identity).

  Args:
    ex: features ('image' encoded or decoded; 'keypoints_2d' [21, 2] and
      optional 'keypoints_3d', 'K', 'scale', 'valid', 'index', 'source',
      'mask').
    size: output side S.
    crop: 'hand' (box around the keypoints) or 'none' (whole image, resized so
      the longer side is S and centred).
    margin: half-side over the max keypoint distance from the mean keypoint
      (`crops.hand_box`).
    fill: constant value outside the image.

  Returns:
    dict: image uint8 [S, S, 3], keypoints_2d float32 [21, 2] (crop pixels),
    keypoints_3d float32 [21, 3], K float32 [3, 3] (crop pixels), scale
    float32 [], valid bool [21], source int32 [], index int64 [] and, when
    present in `ex`, mask bool [].
  """
  image = _open_image(ex["image"])  # parses only the header until warped
  hw = (image.size[1], image.size[0])
  kp2d = np.asarray(ex.get("keypoints_2d", np.zeros((joints.NUM_JOINTS, 2))), np.float64)
  if crop == "hand":
    centre, half = crops.hand_box(kp2d, hw, margin=margin)
  elif crop == "none":
    centre, half = crops.full_image_box(hw)
  else:
    raise ValueError(f"crop must be 'hand' or 'none', got {crop!r}")
  m = crops.crop_matrix(centre, half, size)
  k_in = np.asarray(ex.get("K", np.eye(3)), np.float64).reshape(3, 3)
  out = {
    "image": crops.warp_crop(image, m, size, fill=fill),
    "keypoints_2d": crops.apply_affine(m, kp2d).astype(np.float32),
    "keypoints_3d": np.asarray(
      ex.get("keypoints_3d", np.zeros((joints.NUM_JOINTS, 3))), np.float32
    ).reshape(joints.NUM_JOINTS, 3),
    "K": (m @ k_in).astype(np.float32),
    "scale": np.float32(ex.get("scale", 0.0)),
    "valid": np.asarray(ex.get("valid", np.zeros(joints.NUM_JOINTS, bool)), np.bool_).reshape(
      joints.NUM_JOINTS
    ),
    "source": np.int32(ex.get("source", 0)),
    "index": np.int64(ex.get("index", -1)),
  }
  if "mask" in ex:
    out["mask"] = np.bool_(ex["mask"])
  return out


@dataclasses.dataclass(frozen=True)
class DecodeAndCrop:
  """`decode_and_crop` as a picklable map step (mp_prefetch sends the
  pipeline to worker processes; `precrop` builds its stores with it)."""

  size: int
  crop: str
  margin: float
  fill: int

  def __call__(self, ex):
    return decode_and_crop(ex, size=self.size, crop=self.crop, margin=self.margin, fill=self.fill)


# ----------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------
def _is_precropped(name: str, src: Source, decode: DecodeAndCrop) -> bool:
  """Whether `src` yields finished crops (`precrop.Store`) made with the
  pipeline's crop settings; other settings are a ValueError."""
  made = getattr(src, "crop_settings", None)
  if made is None:
    return False
  wanted = {
    "source_size": decode.size,
    "crop_margin": decode.margin,
    "fill": decode.fill,
    "crop_centre": crops.CROP_CENTRE,
  }
  for key, value in wanted.items():
    if made[key] != value:
      raise ValueError(
        f"source {name!r} was pre-cropped with {key}={made[key]!r} but the "
        f"pipeline crops with {key}={value!r}; build the pre-cropped copy "
        "for these settings or turn config.data.precropped off"
      )
  return True


def _process_layout(
  global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
      f"global_batch={global_batch} must be a positive multiple of the "
      f"number of processes ({process_count})"
    )
  return process_index, process_count, global_batch // process_count


def _source_seed(seed: int, i: int) -> int:
  # Independent, stable 32-bit shuffle seed per source (grain needs < 2**32).
  return int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])


def labelled_subset(num_examples: int, fraction: float, *, seed: int = 0) -> np.ndarray:
  """Indices kept by `labels_fraction`: a stable, nested, seeded subset.

  The first round(fraction * N) entries (at least 1) of
  `np.random.default_rng(seed).permutation(N)`, sorted. For one seed a smaller
  fraction is a subset of a larger one, and the choice does not depend on the
  shuffle seed, the batch size or the process layout.

  Args:
    num_examples: N, the source length.
    fraction: in (0, 1].
    seed: selection seed.

  Returns:
    int64 [n] sorted source indices.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"labels_fraction must be in (0, 1], got {fraction}")
  n = max(1, int(round(fraction * num_examples)))
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[:n]).astype(np.int64)


def _named(sources) -> list[tuple[str, Source]]:
  out = []
  for i, s in enumerate(sources):
    name, src = s if isinstance(s, tuple) else (f"source{i}", s)
    if len(src) == 0:
      raise ValueError(f"source {name!r} is empty")
    out.append((name, src))
  if not out:
    raise ValueError("need at least one source")
  return out


def _train_dataset(
  sources,
  *,
  global_batch,
  source_size,
  seed,
  weights,
  process_index,
  process_count,
  labels_fraction,
  labels_seed,
  crop_margin,
  fill,
) -> tuple[grain.MapDataset, int]:
  p, n_proc, local_batch = _process_layout(global_batch, process_index, process_count)
  sources = _named(sources)
  if weights is not None:
    weights = [float(w) for w in weights]
    if len(weights) != len(sources) or min(weights) <= 0:
      raise ValueError(f"need one positive weight per source, got {weights}")
  decode = DecodeAndCrop(source_size, "hand", crop_margin, fill)
  parts = []
  for i, (name, src) in enumerate(sources):
    indices = (
      None
      if labels_fraction is None
      else labelled_subset(len(src), labels_fraction, seed=labels_seed)
    )
    ds = grain.MapDataset.source(_Tagged(src, i, indices))
    # Shuffle before repeat: a new permutation of the whole source per epoch.
    ds = ds.shuffle(seed=_source_seed(seed, i)).repeat()
    # Decoding is per source (mixing only picks elements, so the batches are
    # the same as decoding after the mix): pre-cropped sources skip it.
    parts.append(ds if _is_precropped(name, src, decode) else ds.map(decode))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  # Batch before going to threads/processes: each mp worker then makes whole
  # batches of the mixed stream (mp_prefetch slices the dataset right before
  # to_iter_dataset; slicing elements would give single-source batches).
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds[p::n_proc], local_batch


def _to_iter(
  ds: grain.MapDataset, num_threads: int, num_workers: int, prefetch: int
) -> grain.IterDataset:
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))
  )
  if num_workers > 0:
    # grain reads absl flags when it starts workers; outside absl.app.run
    # (tests, notebooks) nothing has parsed them yet, so use the defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch))
    )
  return it


def make_pretrain_dataset(
  sources: Sequence[tuple[str, Source]] | Sequence[Source],
  *,
  global_batch: int,
  source_size: int = 224,
  seed: int = 0,
  weights: Sequence[float] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_workers: int = 0,
  num_threads: int = 2,
  prefetch: int = 2,
  crop_margin: float = DEFAULT_CROP_MARGIN,
  fill: int = 0,
  labels_fraction: float | None = None,
  labels_seed: int = 0,
) -> grain.IterDataset:
  """Endless, shuffled, mixed, process-sharded batches (see the module doc).

  Args:
    sources: (name, random-access source) pairs (or bare sources); `source`
      in the batch is the position in this list.
    global_batch: batch over all JAX processes; each process gets
      global_batch // process_count (must divide).
    source_size: side S of the hand crop.
    seed: shuffle seed (each source gets its own derived seed).
    weights: mixing proportions per source (default equal: each source gives
      the same share of every batch, whatever its length).
    process_index / process_count: default jax.process_index()/count().
    num_workers: grain worker processes (0: none, everything in this process).
    num_threads: threads decoding batches in each process (PIL releases the
      GIL while decoding and warping).
    prefetch: batches buffered (per process / per worker).
    crop_margin: source crop half-side over the keypoint spread.
    fill: pixel value outside the image.
    labels_fraction: keep only this fraction of each source
      (`labelled_subset`); None keeps everything.
    labels_seed: seed of that selection.

  Returns:
    A grain IterDataset (`make_pretrain_iterator`: `iter()` of it, a
    checkpointable grain DatasetIterator) of dicts: image uint8 [b, S, S, 3], keypoints_2d float32 [b, 21, 2],
    keypoints_3d float32 [b, 21, 3], K float32 [b, 3, 3], scale float32 [b],
    valid bool [b, 21], source int32 [b], index int64 [b] (index in source).
  """
  ds, _ = _train_dataset(
    sources,
    global_batch=global_batch,
    source_size=source_size,
    seed=seed,
    weights=weights,
    process_index=process_index,
    process_count=process_count,
    labels_fraction=labels_fraction,
    labels_seed=labels_seed,
    crop_margin=crop_margin,
    fill=fill,
  )
  return _to_iter(ds, num_threads, num_workers, prefetch)


@functools.wraps(make_pretrain_dataset)  # same signature and documentation
def make_pretrain_iterator(sources, **kwargs) -> grain.DatasetIterator:
  return iter(make_pretrain_dataset(sources, **kwargs))


def make_finetune_iterator(
  sources, *, labels_fraction: float | None = None, labels_seed: int = 0, **kwargs
) -> grain.DatasetIterator:
  """Fine-tuning batches: the pre-training pipeline on labelled sources.

  Args:
    sources: (name, source) pairs (usually just FreiHAND training).
    labels_fraction: semi-supervised experiments: use only this fraction of
      each source, the subset `labelled_subset(len, labels_fraction,
      seed=labels_seed)` (stable across runs, nested across fractions).
    labels_seed: seed of the subset.
    **kwargs: as `make_pretrain_dataset` (global_batch, source_size, seed, ...).

  Returns:
    Checkpointable iterator of batches with the keys of
    `make_pretrain_dataset`; keypoints_2d and K are in crop pixels.
  """
  return iter(
    make_pretrain_dataset(
      sources, labels_fraction=labels_fraction, labels_seed=labels_seed, **kwargs
    )
  )


def make_eval_dataset(
  source: Source,
  *,
  global_batch: int,
  source_size: int = 224,
  crop: str = "hand",
  source_id: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int = 2,
  prefetch: int = 2,
  crop_margin: float = DEFAULT_CROP_MARGIN,
  fill: int = 0,
) -> grain.IterDataset:
  """One pass in source order, the last batch padded; see `make_eval_iterator`."""
  p, n_proc, local_batch = _process_layout(global_batch, process_index, process_count)
  if len(source) == 0:
    raise ValueError("evaluation source is empty")
  if crop not in ("hand", "none"):
    raise ValueError(f"crop must be 'hand' or 'none', got {crop!r}")
  shard = _PaddedEvalShard(source, source_id, global_batch, p, n_proc)
  ds = (
    grain.MapDataset.source(shard)
    .map(DecodeAndCrop(source_size, crop, crop_margin, fill))
    .batch(local_batch)
  )
  return _to_iter(ds, num_threads, 0, prefetch)


def make_eval_iterator(source: Source, **kwargs) -> grain.DatasetIterator:
  """Evaluation batches: deterministic order, every example exactly once.

  ceil(N / global_batch) batches on every process (equal counts, so jitted
  collectives never wait on a finished process). Global batch t holds source
  examples t*G .. t*G+G-1, process p gets its slice p*b .. p*b+b-1.

  Args:
    source: random-access source.
    **kwargs: global_batch, source_size (S), crop ('hand': the training
      source crop; 'none': the whole image resized so its longer side is S,
      centred, i.e. unchanged for FreiHAND at S=224, for the two-pass
      test-time crop), source_id, process_index, process_count, num_threads,
      prefetch, crop_margin, fill.

  Returns:
    Iterator of dicts with the keys of `make_pretrain_dataset` plus mask bool
    [b] (False on padding, which repeats example 0) and index int64 [b] (the
    example's position in `source`).
  """
  return iter(make_eval_dataset(source, **kwargs))


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  """Number of batches `make_eval_iterator` yields on every process."""
  return -(-num_examples // global_batch)
