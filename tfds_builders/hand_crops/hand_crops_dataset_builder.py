"""Unlabelled in-the-wild hand images as hand-centred crops for pre-training.

Input (the manual dir): any folder tree of images and, optionally, one boxes
file at its top (`boxes.csv` with columns image,x0,y0,x1,y1, or
`boxes.json`; or `boxes_path=` to the builder), one box per hand in pixels
of the image as displayed (after EXIF orientation). Without a boxes file
every image is one hand filling its centre square.

Stored (one example per hand): the hand-centred square crop of the box
(`tfds_builders.hand_builder`), with 21 pseudo-keypoints on the circle of
radius max(w, h) / 2 about the box centre, which reproduce exactly the
crop of the box's bounding square; they are not joints (valid all False).

Unreadable images and, with a boxes file, unboxed images are skipped and
counted; a bad boxes file or box is an error naming it.
docs/datasets.md#in-the-wild-hand-crops gives the formats and every rule.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from peclr_jax.hands import crops
from tfds_builders import hand_builder, image_files, parallel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BOX_FILES = ("boxes.csv", "boxes.json")

_DESCRIPTION = """\
Unlabelled hand images (a user folder, optionally with hand boxes) stored as
hand-centred square crops for PeCLR pre-training. keypoints_2d are
pseudo-keypoints on the box's inscribed circle (mean = box centre, max
distance = half the box side); no label is valid.
"""


def list_images(root: epath.Path) -> list[str]:
  """Sorted '/'-separated paths of the image files under root."""
  found = []
  for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
    dirnames.sort()
    rel = os.path.relpath(dirpath, os.fspath(root))
    for name in filenames:
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        found.append(name if rel == "." else os.path.join(rel, name).replace(os.sep, "/"))
  return sorted(found)


def _check_box(box: Any, where: str) -> tuple[float, float, float, float]:
  try:
    vals = tuple(float(v) for v in box)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: box {box!r} is not 4 numbers") from None
  if len(vals) != 4:
    raise ValueError(f"{where}: box {box!r} must be [x0, y0, x1, y1]")
  if not all(math.isfinite(v) for v in vals):
    raise ValueError(f"{where}: box {box!r} contains NaN or inf")
  x0, y0, x1, y1 = vals
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"{where}: box {box!r} has non-positive size (expected x1 > x0 and y1 > y0)")
  return vals


def read_boxes(path: epath.Path) -> dict[str, list[tuple[float, ...]]]:
  """Reads a boxes.csv / boxes.json into {image: [box, ...]} (file order)."""
  boxes: dict[str, list] = {}

  def add(image, box, where):
    if not isinstance(image, str) or not image:
      raise ValueError(f"{where}: missing image name")
    name = image.replace("\\", "/")
    name = name[2:] if name.startswith("./") else name
    boxes.setdefault(name, []).append(_check_box(box, where))

  suffix = path.suffix.lower()
  if suffix == ".csv":
    with open(os.fspath(path), newline="") as f:  # csv wants newline=''
      reader = csv.DictReader(f)
      need = {"image", "x0", "y0", "x1", "y1"}
      if reader.fieldnames is None or not need <= set(reader.fieldnames):
        raise ValueError(f"{path}: header must contain image,x0,y0,x1,y1; got {reader.fieldnames}")
      for i, row in enumerate(reader, start=2):
        add(row["image"], [row[k] for k in ("x0", "y0", "x1", "y1")], f"{path} line {i}")
  elif suffix == ".json":
    try:
      with path.open("r") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict):
      for image, val in data.items():
        val = (
          val if (isinstance(val, list) and val and isinstance(val[0], (list, tuple))) else [val]
        )
        for j, box in enumerate(val):
          add(image, box, f"{path} [{image!r}][{j}]")
    elif isinstance(data, list):
      for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "image" not in rec or "box" not in rec:
          raise ValueError(f'{path} entry {i}: expected {{"image": ..., "box": [x0, y0, x1, y1]}}')
        add(rec["image"], rec["box"], f"{path} entry {i}")
    else:
      raise ValueError(f"{path}: expected a list or an object")
  else:
    raise ValueError(f"{path}: boxes file must be .csv or .json")
  return boxes


def centre_square_box(width: int, height: int) -> tuple[float, ...]:
  """Centre square of side min(W, H), about the image centre (W/2, H/2) of
  `crops.full_image_box`."""
  side = min(width, height)
  cx, cy = width / 2, height / 2
  return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


class Builder(hand_builder.CropBuilder):
  """In-the-wild hand crops (see module docstring).

  Example:
    builder = Builder(data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir='/path/to/hand/images'))
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Hand-centred crops with box pseudo-keypoints.",
    "1.1.0": (
      "Crops put the box centre on (S/2, S/2), the pixel convention "
      "of the test-time crop (1.0.0: (S - 1)/2, half a pixel up and "
      "left); the default box is centred on (W/2, H/2)."
    ),
  }
  BUILDER_CONFIGS = [
    hand_builder.CropBuilderConfig(
      name="crop256", description="256 px crops, margin 1.5 x sqrt(2)", crop_size=256, margin=1.5
    )
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put hand images (.jpg/.jpeg/.png/.bmp/.webp, any sub-folders) in the manual
  dir. Optionally add boxes.csv (columns image,x0,y0,x1,y1) or boxes.json
  ([{"image": relpath, "box": [x0, y0, x1, y1]}, ...]) with one row per hand,
  paths relative to the manual dir; without it each image counts as one hand
  filling its centre square.
  """

  def __init__(
    self,
    *,
    boxes_path: os.PathLike | str | None = None,
    num_workers: int | None = None,
    **kwargs: Any,
  ):
    """Args: boxes_path: boxes file (default: boxes.csv/boxes.json in the
    manual dir, if any); num_workers: decode/crop threads; **kwargs:
    `tfds.core.GeneratorBasedBuilder` arguments."""
    super().__init__(num_workers=num_workers, **kwargs)
    self._boxes_path = boxes_path
    self._remember(boxes_path=boxes_path)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, as the other builders: dataset_info_from_configs
    # reads README/CITATIONS package resources (fails for namespace-package
    # or non-editable installs without package data).
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=hand_builder.hand_features(),
      supervised_keys=None,
      metadata=tfds.core.MetadataDict(),
    )

  def _boxes_file(self, manual: epath.Path) -> epath.Path | None:
    if self._boxes_path is not None:
      path = epath.Path(self._boxes_path)
      if not path.exists():
        raise FileNotFoundError(f"boxes file {path} does not exist")
      return path
    found = [manual / n for n in BOX_FILES if (manual / n).exists()]
    if len(found) > 1:
      raise ValueError(
        f"{manual} holds both boxes.csv and boxes.json; keep one or pass boxes_path="
      )
    return found[0] if found else None

  def _split_generators(self, dl_manager):
    try:
      manual = epath.Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS raises AssertionError for this.
      raise FileNotFoundError(f"hand_crops: {e}") from None
    images = list_images(manual)
    if not images:
      raise FileNotFoundError(f"hand_crops: no image files ({IMAGE_EXTENSIONS}) under {manual}")
    boxes_file = self._boxes_file(manual)
    items: list[tuple[str, list | None]] = []  # (image, boxes or None)
    if boxes_file is None:
      items = [(im, None) for im in images]
    else:
      boxes = read_boxes(boxes_file)
      present = set(images)
      unknown = sorted(set(boxes) - present)
      if unknown:
        raise ValueError(
          f"{boxes_file}: boxes for images that are not under {manual}: {unknown[:10]}"
        )
      for im in images:
        if im in boxes:
          items.append((im, boxes[im]))
        else:
          self._skips.add("train", "no_box", im)
    # sample_id = position in sorted (image, box) order.
    work, next_id = [], 0
    for im, bxs in items:
      work.append((im, bxs, next_id))
      next_id += 1 if bxs is None else len(bxs)
    return {
      "train": hand_builder.SizedExamples(
        lambda: self._generate_examples("train", manual, work, boxes_file), next_id
      )
    }

  def _process_image(self, manual: epath.Path, item, boxes_file) -> list:
    """Decodes one image and crops each of its boxes."""
    name, boxes, first_id = item
    try:
      image = image_files.load_rgb(manual / name, exif_transpose=True)
    except image_files.UNREADABLE_IMAGE_ERRORS as e:
      logging.warning("hand_crops: skipping unreadable %s: %s", manual / name, e)
      return [("skip", "unreadable_image", name)] * (len(boxes or [None]))
    if boxes is None:
      boxes = [centre_square_box(image.width, image.height)]
    cfg = self.builder_config
    out = []
    for j, box in enumerate(boxes):
      x0, y0, x1, y1 = box
      if x1 < -0.5 or y1 < -0.5 or x0 > image.width - 0.5 or y0 > image.height - 0.5:
        raise ValueError(
          f"{boxes_file}: box {list(box)} of {name} lies "
          f"outside the {image.width}x{image.height} image"
        )
      kp = crops.box_pseudo_keypoints(box)
      crop = hand_builder.make_hand_crop(image, kp, cfg.crop_size, cfg.margin)
      sid = first_id + j
      out.append(
        (
          "ok",
          sid,
          {
            "image": crop.jpeg,
            "K": crop.matrix.astype(np.float32),  # K = M @ identity
            "keypoints_3d": np.zeros((21, 3), np.float32),
            "keypoints_2d": crop.keypoints_2d.astype(np.float32),
            "scale": np.float32(0.0),
            "valid": np.zeros((21,), np.bool_),
            "sample_id": np.int64(sid),
            "version": np.int32(0),
          },
        )
      )
    return out

  def _generate_examples(self, split, manual, work, boxes_file):
    num_ok = 0
    results = parallel.imap_bounded(
      lambda it: self._process_image(manual, it, boxes_file), work, self._num_workers
    )
    for group in results:
      for kind, a, b in group:
        if kind == "ok":
          num_ok += 1
          yield a, b
        else:
          self._skips.add(split, a, b)
    self.info.metadata.update(self._skips.as_metadata())
    skipped = self._skips.counts(split)
    if skipped:
      logging.warning("hand_crops[%s]: %d examples written, skipped %s", split, num_ok, skipped)
    if not num_ok:
      raise RuntimeError(
        f"hand_crops: nothing usable under {manual} (skipped {skipped}); "
        f"examples: {self._skips.as_metadata()['skipped_examples']}"
      )
