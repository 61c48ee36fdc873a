"""Pre-cropped copies of a dataset split: the host's hand crops, decoded once.

The pre-training pipeline spends nearly all its host time decoding a JPEG and
warping the hand-centred `source_size` crop out of it (~740 images/s per core,
BENCHMARKS.md section 4), far less than an accelerator step consumes. A store
keeps, for every example of a split, exactly what
`input_pipeline.decode_and_crop` returns (the same function writes it), as raw
arrays; the pipeline then only reads rows and batches them. Batches from a
store equal the JPEG pipeline's bit for bit for the same seed.

Built with (for each training dataset, at the config's data.source_size):

  python -m peclr_jax.data precrop <name> [--config <builder config>] \\
      --data_dir <dir> [--split train] [--source_size 224]

and used with `--config.data.precropped=True`. Raw pixels are large: S*S*3
bytes an example (150 KB at 224 px: ~20 GB for FreiHAND's 130k training
images), read memory-mapped, so they live in the page cache or on a fast disk.

Layout, <data_dir>/precropped/<tfds name>/<split>-<S>px/:
  image.npy uint8 [N, S, S, 3], keypoints_2d.npy float32 [N, 21, 2] (crop
  pixels), keypoints_3d.npy float32 [N, 21, 3], K.npy float32 [N, 3, 3] (crop
  pixels), scale.npy float32 [N], valid.npy bool [N, 21], and meta.json (the
  TFDS dataset's full name and version, split, N, source_size, crop_margin,
  fill, crop_centre). A store is written into a temporary folder that is
  renamed when complete, so an interrupted build never leaves a store that
  looks usable.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import grain
import numpy as np
from tqdm import tqdm

from peclr_jax.hands import crops, joints
from peclr_jax.inputs import input_pipeline

NJ = joints.NUM_JOINTS
META_FILE = "meta.json"


def _features(size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Stored arrays: name -> (per-example shape, dtype)."""
  return {
    "image": ((size, size, 3), np.uint8),
    "keypoints_2d": ((NJ, 2), np.float32),
    "keypoints_3d": ((NJ, 3), np.float32),
    "K": ((3, 3), np.float32),
    "scale": ((), np.float32),
    "valid": ((NJ,), np.bool_),
  }


def store_dir(data_dir: str | os.PathLike, name: str, split: str, source_size: int) -> str:
  """Where the store of TFDS dataset `name` ('synthetic_hands/small'), split
  and crop side lives."""
  return os.path.join(os.fspath(data_dir), "precropped", name, f"{split}-{int(source_size)}px")


def build_command(name: str, split: str, source_size: int, data_dir: str | os.PathLike) -> str:
  """The command line that builds a store (for error messages and docs)."""
  base, _, config = name.partition("/")
  config_flag = f" --config {config}" if config else ""
  return (
    f"python -m peclr_jax.data precrop {base}{config_flag} --split "
    f"{split} --source_size {source_size} --data_dir "
    f"{os.fspath(data_dir)}"
  )


def build(
  name: str,
  split: str,
  data_dir: str | os.PathLike,
  *,
  source_size: int,
  crop_margin: float = input_pipeline.DEFAULT_CROP_MARGIN,
  fill: int = 0,
  num_threads: int = 4,
  chunk: int = 64,
  progress: bool = False,
) -> str:
  """Decodes and crops every example of a built TFDS split into a store.

  Replaces an existing store of the same name, split and size.

  Args:
    name: TFDS name with builder config ('synthetic_hands/small'), as
      `datasets.open_sources` names it.
    split: split name.
    data_dir: the TFDS data directory (the store goes under it).
    source_size: crop side S (config.data.source_size).
    crop_margin / fill: as `input_pipeline.decode_and_crop`.
    num_threads: decoding threads.
    chunk: examples decoded per batch.
    progress: show a progress bar.

  Returns:
    The store's directory.
  """
  source = input_pipeline.open_source(name, split, data_dir)
  n = len(source)
  out = store_dir(data_dir, name, split, source_size)
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    arrays = {
      k: np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), "w+", dtype, (n,) + shape)
      for k, (shape, dtype) in _features(source_size).items()
    }
    # The pipeline's own decode step, in source order.
    batches = (
      grain.MapDataset.source(source)
      .map(input_pipeline.DecodeAndCrop(source_size, "hand", crop_margin, fill))
      .batch(chunk)
      .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
    )
    with tqdm(total=n, desc=f"precrop {name} {split}", unit="image", disable=not progress) as bar:
      for t, batch in enumerate(batches):
        for k, arr in arrays.items():
          arr[t * chunk : t * chunk + len(batch[k])] = batch[k]
        bar.update(len(batch["image"]))
    for arr in arrays.values():
      arr.flush()
    del arrays
    meta = {
      "dataset": source.dataset_info.full_name,
      "split": split,
      "num_examples": n,
      "source_size": int(source_size),
      "crop_margin": float(crop_margin),
      "fill": int(fill),
      "crop_centre": crops.CROP_CENTRE,
    }
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


class Store:
  """Random-access source over a store: examples come out already cropped.

  `crop_settings` tells `input_pipeline` to skip decoding for it (and to
  check the settings against its own). Picklable (grain worker processes):
  the memory maps are reopened in each process.

  Args:
    directory: the store (`store_dir`).
    reference: the TFDS source it was built from; its dataset version and
      length must match the store's (a rebuilt dataset makes a store stale).

  Raises:
    FileNotFoundError: no complete store in `directory`.
    ValueError: a damaged or stale store (the message names the file).
  """

  def __init__(self, directory: str | os.PathLike, reference=None):
    self.directory = os.fspath(directory)
    meta_path = os.path.join(self.directory, META_FILE)
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      self.num_examples = int(meta["num_examples"])
      self.crop_settings = {k: meta[k] for k in ("source_size", "crop_margin", "fill")}
      # Stores written before the key existed crop about (S - 1)/2.
      self.crop_settings["crop_centre"] = meta.get("crop_centre", "(S - 1)/2")
      self.dataset = str(meta["dataset"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"{meta_path}: damaged pre-cropped store metadata ({type(e).__name__}: {e}); build it again"
      ) from None
    if reference is not None:
      full_name = reference.dataset_info.full_name
      if (full_name, len(reference)) != (self.dataset, self.num_examples):
        raise ValueError(
          f"{meta_path}: stale pre-cropped store of {self.dataset} "
          f"({self.num_examples} examples), the dataset is now {full_name} "
          f"({len(reference)} examples); build it again"
        )
    self._arrays = None
    self._open()  # checks every file now, not in a worker later

  def _open(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      arrays = {}
      size = self.crop_settings["source_size"]
      for k, (shape, dtype) in _features(size).items():
        path = os.path.join(self.directory, f"{k}.npy")
        try:
          arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
          raise ValueError(
            f"{path}: unreadable pre-cropped array ({e}); build the store again"
          ) from None
        want = (self.num_examples,) + shape
        if arr.shape != want or arr.dtype != dtype:
          raise ValueError(
            f"{path}: {arr.dtype} {arr.shape}, expected "
            f"{np.dtype(dtype)} {want}; build the store again"
          )
        # Plain ndarray views of the maps: rows stack into ordinary arrays.
        arrays[k] = arr.view(np.ndarray)
      self._arrays = arrays
    return self._arrays

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    return {k: arr[i] for k, arr in self._open().items()}


def is_built(data_dir: str | os.PathLike, name: str, split: str, source_size: int) -> bool:
  """Whether the store of (name, split, source_size) was completed (an
  interrupted build leaves only its temporary folder)."""
  return os.path.exists(os.path.join(store_dir(data_dir, name, split, source_size), META_FILE))


def open_store(
  data_dir: str | os.PathLike, name: str, split: str, source_size: int, reference=None
) -> Store:
  """The store of (name, split, source_size); a missing one is a
  FileNotFoundError that gives the command building it."""
  directory = store_dir(data_dir, name, split, source_size)
  if not is_built(data_dir, name, split, source_size):
    raise FileNotFoundError(
      f"no pre-cropped copy of {name} ({split}, {source_size} px) in "
      f"{directory} (config.data.precropped=True); build it with: "
      f"{build_command(name, split, source_size, data_dir)}"
    )
  return Store(directory, reference)
