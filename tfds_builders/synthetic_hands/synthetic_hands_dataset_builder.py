"""Synthetic hands: procedural right-hand images with exact 3D labels (TFDS).

The embedded default dataset: nothing is downloaded, every example is
rendered by `render.render_sample` (a kinematic 21-joint hand drawn as shaded
capsules and a palm slab by a numpy z-buffer rasteriser, over random textured
backgrounds; see hand_model.py and render.py for the geometry, joint limits
and camera).

Determinism: example i of split s is rendered from the seed
`(config.seed, SPLIT_IDS[s], i)` alone, so its content does not depend on
the generation order or on parallelism, and a rebuild gives the same images
(same numpy/PIL versions). Splits of 10000+ examples are rendered by a
process pool (`SYNTHETIC_HANDS_WORKERS`, default: the CPU count, up to 8;
see `generate`), smaller ones in-process.

Features (float32 unless noted), the same as `freihand`: `image` (JPEG bytes
encoded with PIL), `K` [3, 3], `keypoints_3d` [21, 3] metres, camera frame,
AIT order, wrist = joint 0; `keypoints_2d` [21, 2] pixels (x, y) =
K-projection of keypoints_3d; `scale` [] metres = |kp3d[3] - kp3d[8]| (middle
MCP-PIP bone); `valid` [21] bool (all True: every label is exact);
`sample_id` int64 (= the example index i); `version` int32 (0).

Configs: `small` (tests: 64 px, 32/8/8), `demo` (the CPU demo: 128 px,
4000/500/500), `full` (224 px like FreiHAND, 50000/2000/4000); the
`*_upright` variants keep hands within 60 degrees of upright, and
`demo_upright_large` is demo_upright with 40000 training images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from peclr_jax.hands import joints
from tfds_builders import hand_builder
from tfds_builders.synthetic_hands import render

SPLIT_IDS = {"train": 0, "validation": 1, "evaluation": 2}
# Splits at least this large are rendered by a process pool (only `full`'s
# train split by default: smaller ones build fast enough serially).
PARALLEL_MIN_EXAMPLES = 10000

_DESCRIPTION = (
  "Procedurally rendered right hands (kinematic 21-joint model with joint "
  "limits, shaded capsules, random textured backgrounds, FreiHAND-like "
  "camera) with exact 3D keypoints in AIT order. Deterministic per example."
)


@dataclasses.dataclass(eq=False)
class SyntheticHandsConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of a synthetic-hands dataset."""

  image_size: int = 128
  num_train: int = 4000
  num_validation: int = 500
  num_evaluation: int = 500
  seed: int = 0
  jpeg_quality: int = 92
  supersample: int = 2
  # In-plane roll within this many degrees of upright; 180: any roll.
  max_roll_deg: float = 180.0

  @property
  def render_values(self) -> tuple:
    """What `make_example` needs (a picklable tuple for the process pool)."""
    return (self.seed, self.image_size, self.jpeg_quality, self.supersample, self.max_roll_deg)


def example_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
  """The seed of example `index` of `split`: a function of these alone."""
  return np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)])


def make_example(config_values: tuple, split: str, index: int) -> dict:
  """Renders and encodes example `index` of `split` (a TFDS feature dict).

  Args:
    config_values: `SyntheticHandsConfig.render_values`.
    split: a key of SPLIT_IDS.
    index: example index within the split.
  """
  seed, image_size, quality, supersample, max_roll_deg = config_values
  s = render.render_sample(
    example_seed(seed, split, index), image_size, supersample=supersample, max_roll_deg=max_roll_deg
  )
  buf = io.BytesIO()
  # 4:4:4 (no chroma subsampling): per-finger colours and colour noise on
  # small images survive; halves the error of PIL's default 4:2:0 here.
  PIL.Image.fromarray(s["image"]).save(buf, format="JPEG", quality=quality, subsampling=0)
  return {
    "image": buf.getvalue(),
    "K": s["K"],
    "keypoints_3d": s["keypoints_3d"],
    "keypoints_2d": s["keypoints_2d"],
    "scale": s["scale"],
    "valid": np.ones(joints.NUM_JOINTS, np.bool_),
    "sample_id": np.int64(index),
    "version": np.int32(0),
  }


def _make_chunk(config_values: tuple, split: str, start: int, stop: int) -> list[tuple[int, dict]]:
  return [(i, make_example(config_values, split, i)) for i in range(start, stop)]


def num_workers() -> int:
  """Worker processes for large splits (env SYNTHETIC_HANDS_WORKERS)."""
  env = os.environ.get("SYNTHETIC_HANDS_WORKERS")
  if env:
    return max(1, int(env))
  return max(1, min(os.cpu_count() or 1, 8))


def generate(
  config_values: tuple,
  split: str,
  num: int,
  *,
  workers: int | None = None,
  min_parallel: int = PARALLEL_MIN_EXAMPLES,
  chunk: int = 64,
) -> Iterator[tuple[int, dict]]:
  """Yields `(i, make_example(config_values, split, i))` for i < num, in order.

  Splits of at least `min_parallel` examples are rendered by a process pool
  of `workers` (default `num_workers()`) in chunks of `chunk` examples; the
  output is the same either way. The pool uses 'spawn' (forking a process
  that runs JAX or TFDS threads can deadlock), so, as always with spawn, a
  script that builds a large config must guard its entry point with
  `if __name__ == '__main__':` (modules run with -m, notebooks and
  `peclr_jax.main` are fine); SYNTHETIC_HANDS_WORKERS=1 turns the pool off.
  """
  workers = num_workers() if workers is None else workers
  if workers <= 1 or num < max(min_parallel, 1):
    for i in range(num):
      yield i, make_example(config_values, split, i)
    return
  ctx = multiprocessing.get_context("spawn")
  starts = iter(range(0, num, chunk))
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    submit = lambda start: pool.submit(
      _make_chunk, config_values, split, start, min(start + chunk, num)
    )
    # Bounded look-ahead (memory): 4 chunks per worker in flight.
    pending = [submit(start) for _, start in zip(range(4 * workers), starts)]
    while pending:
      yield from pending.pop(0).result()
      start = next(starts, None)
      if start is not None:
        pending.append(submit(start))


_SMALL = SyntheticHandsConfig(
  name="small",
  image_size=64,
  num_train=32,
  num_validation=8,
  num_evaluation=8,
  description="Tiny, for tests: 64 px, 32/8/8.",
)
_DEMO = SyntheticHandsConfig(
  name="demo",
  image_size=128,
  num_train=4000,
  num_validation=500,
  num_evaluation=500,
  description="CPU demo: 128 px, 4000/500/500.",
)
_FULL = SyntheticHandsConfig(
  name="full",
  image_size=224,
  num_train=50000,
  num_validation=2000,
  num_evaluation=4000,
  description="FreiHAND-sized images: 224 px, 50000/2000/4000.",
)
# Hands within 60 degrees of upright, as in real hand datasets. With any
# roll (and palm/back flips) the mean pose is a point, and a small model
# trained on few images learns little more than that mean.
_DEMO_UPRIGHT = dataclasses.replace(
  _DEMO,
  name="demo_upright",
  max_roll_deg=60.0,
  description="As demo, hands within 60 degrees of upright.",
)
_FULL_UPRIGHT = dataclasses.replace(
  _FULL,
  name="full_upright",
  max_roll_deg=60.0,
  description="As full, hands within 60 degrees of upright.",
)
# Ten times the unlabelled images of demo_upright for pre-training, as the
# paper pre-trains on far more images than it has labels for. The seeds are
# per index, so its first 4000 training images and its validation and
# evaluation splits are demo_upright's.
_DEMO_UPRIGHT_LARGE = dataclasses.replace(
  _DEMO_UPRIGHT,
  name="demo_upright_large",
  num_train=40000,
  description="As demo_upright with 40000 training images (the first 4000 are demo_upright's).",
)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Procedural synthetic hands (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_SMALL, _DEMO, _FULL, _DEMO_UPRIGHT, _DEMO_UPRIGHT_LARGE, _FULL_UPRIGHT]
  DEFAULT_CONFIG_NAME = "demo"

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # TFDS defaults to tfrecord, which needs TensorFlow to write and read.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @py_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds this through importlib.resources of the top-level package,
    # which raises NotADirectoryError when `tfds_builders` resolves as a
    # namespace package (editable installs made before its __init__.py
    # existed). Nothing is read from here (no checksums: no downloads).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly (not dataset_info_from_configs, which looks for
    # package resources), as the freihand builder does.
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=hand_builder.hand_features(),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    values = cfg.render_values
    sizes = {
      "train": cfg.num_train,
      "validation": cfg.num_validation,
      "evaluation": cfg.num_evaluation,
    }
    # Nothing is ever skipped (protocol of peclr_jax/data.py).
    self.info.metadata["skipped"] = {s: {} for s in sizes if sizes[s] > 0}
    return {
      split: hand_builder.SizedExamples(
        lambda split=split, num=num: generate(values, split, num), num
      )
      for split, num in sizes.items()
      if num > 0
    }

  def _generate_examples(self, split: str, num: int):
    """Unused (splits are SizedExamples); kept for the abstract interface."""
    yield from generate(self.builder_config.render_values, split, num)
