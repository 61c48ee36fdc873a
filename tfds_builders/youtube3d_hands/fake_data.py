"""Tiny fake YouTube3DHands copy in the real on-disk format, for tests.

Layout written under `root/<subdir>` (docs/datasets.md#youtube3dhands):
  youtube_{train,val,test}.json
  youtube/<VIDEO>/video/frames/<FRAME>.{png,jpg}

Content (frames width x height, default 64 x 48, dark noise):
  train       image 1 (.png): a right hand (id 10) and a left hand (id 11)
              image 2 (JSON says .png, file is .jpg): a right hand (id 12)
              image 3: file missing -> annotation 13 is skipped
  validation  image 4 (.png): a left hand (id 20)
  test        image 5 (.jpg): a right hand (id 30)
Each hand is a disc of 778 random vertices of radius `hand_radius`; its thumb
tip (vertex 744) sits on an integer pixel where a bright 3 x 3 blob is drawn,
so tests can check that the stored crop and its keypoints agree (and that left
hands are mirrored with the right convention).

MANO's regressor cannot be shipped: `write_fake_regressor` writes a random
sparse row-stochastic 16 x 778 matrix (.npy) and `write_fake_mano_pkl` a
MANO_RIGHT.pkl look-alike (scipy.sparse J_regressor next to a chumpy object,
pickled through a throw-away `chumpy` module since chumpy is not installed).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from typing import Any

import numpy as np
from PIL import Image

THUMB_TIP_VERTEX = 744

# (split, json name, [(image id, name in JSON, file written or None,
#  [(annotation id, is_left, hand centre (x, y))])])
_LAYOUT = [
  (
    "train",
    "youtube_train.json",
    [
      (1, "youtube/vidA/video/frames/1.png", ".png", [(10, 0, (16, 24)), (11, 1, (47, 24))]),
      (2, "youtube/vidA/video/frames/2.png", ".jpg", [(12, 0, (30, 22))]),
      (3, "youtube/vidB/video/frames/7.png", None, [(13, 0, (30, 24))]),
    ],
  ),
  (
    "validation",
    "youtube_val.json",
    [
      (4, "youtube/vidC/video/frames/4.png", ".png", [(20, 1, (40, 25))]),
    ],
  ),
  (
    "test",
    "youtube_test.json",
    [
      (5, "youtube/vidD/video/frames/5.jpg", ".jpg", [(30, 0, (24, 23))]),
    ],
  ),
]


def fake_regressor(seed: int = 0, nnz_per_row: int = 6) -> np.ndarray:
  """Random row-stochastic [16, 778] matrix with a few vertices per joint.

  Sparse rows keep the 16 regressed joints apart (a dense random row would
  put every joint on the vertex centroid, hiding ordering mistakes).
  """
  rng = np.random.default_rng(seed)
  reg = np.zeros((16, 778))
  for row in reg:
    ids = rng.choice(778, nnz_per_row, replace=False)
    row[ids] = rng.dirichlet(np.ones(nnz_per_row))
  return reg


def write_fake_regressor(path: os.PathLike | str, seed: int = 0) -> np.ndarray:
  """Writes `fake_regressor(seed)` as .npy and returns it ([16, 778])."""
  reg = fake_regressor(seed)
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  np.save(path, reg)
  return reg


def write_fake_mano_pkl(
  path: os.PathLike | str, regressor: np.ndarray, with_chumpy: bool = True
) -> None:
  """Writes a MANO_RIGHT.pkl look-alike (needs scipy).

  Args:
    path: output file.
    regressor: [16, 778] dense matrix stored as a scipy csc J_regressor.
    with_chumpy: also store an object whose class is `chumpy.ch.Ch`, as the
      real file does; a temporary stand-in module makes it picklable.
  """
  import scipy.sparse  # pylint: disable=g-import-not-at-top

  content: dict[str, Any] = {
    "J_regressor": scipy.sparse.csc_matrix(regressor),
    "v_template": np.zeros((778, 3)),
    "f": np.zeros((1538, 3), np.uint32),
    "bs_style": "lbs",
  }
  saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
  try:
    if with_chumpy:
      ch_mod = types.ModuleType("chumpy.ch")

      class Ch:  # mimics chumpy.ch.Ch: an object with array state
        def __init__(self, x):
          self.x = x

      Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
      ch_mod.Ch = Ch
      pkg = types.ModuleType("chumpy")
      pkg.ch = ch_mod
      sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, ch_mod
      content["shapedirs"] = Ch(np.zeros((778, 3, 10)))
    with open(path, "wb") as f:
      pickle.dump(content, f, protocol=2)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _hand_vertices(rng, centre, radius: float) -> np.ndarray:
  """[778, 3] vertices in a disc; the thumb tip on an integer pixel."""
  r = radius * np.sqrt(rng.random(778))
  t = 2 * np.pi * rng.random(778)
  v = np.stack(
    [centre[0] + r * np.cos(t), centre[1] + r * np.sin(t), rng.normal(0.0, 5.0, 778)], axis=-1
  )
  v[THUMB_TIP_VERTEX, :2] = np.round(np.asarray(centre) + [-1.0, -radius + 1])
  return v


def write_fake_youtube3d(
  root: os.PathLike | str,
  *,
  width: int = 64,
  height: int = 48,
  hand_radius: float = 6.0,
  subdir: str = "data",
  seed: int = 0,
) -> dict:
  """Writes the fake copy; see the module docstring.

  Args:
    root: manual dir to create.
    width, height: frame size.
    hand_radius: radius in pixels of each fake hand's vertex disc.
    subdir: folder under root that holds the JSONs ('' for root itself).
    seed: RNG seed.

  Returns:
    {'data_root': path, 'width', 'height', 'splits': {split:
     {'num_examples', 'num_skipped', 'annotations': [{'id', 'is_left',
     'vertices' [778, 3], 'thumb_tip' (x, y), 'frame' path or None,
     'image_id'}]}}}.
  """
  rng = np.random.default_rng(seed)
  data_root = os.path.join(os.fspath(root), subdir)
  info: dict[str, Any] = dict(data_root=data_root, width=width, height=height, splits={})
  for split, json_name, images in _LAYOUT:
    js = {"images": [], "annotations": []}
    anns_info = []
    num_ok = num_skipped = 0
    for image_id, name, ext, anns in images:
      js["images"].append(dict(name=name, width=width, height=height, id=image_id))
      pixels = rng.integers(0, 50, (height, width, 3)).astype(np.uint8)
      frame = None
      if ext is not None:
        frame = os.path.join(data_root, os.path.splitext(name)[0] + ext)
      for ann_id, is_left, centre in anns:
        verts = _hand_vertices(rng, centre, hand_radius)
        tx, ty = (int(v) for v in verts[THUMB_TIP_VERTEX, :2])
        pixels[ty - 1 : ty + 2, tx - 1 : tx + 2] = 255
        js["annotations"].append(
          dict(vertices=verts.tolist(), is_left=is_left, image_id=image_id, id=ann_id)
        )
        anns_info.append(
          dict(
            id=ann_id,
            is_left=bool(is_left),
            vertices=verts,
            thumb_tip=(tx, ty),
            frame=frame,
            image_id=image_id,
          )
        )
        num_ok += frame is not None
        num_skipped += frame is None
      if frame is not None:
        os.makedirs(os.path.dirname(frame), exist_ok=True)
        Image.fromarray(pixels).save(frame, **({"quality": 95} if ext == ".jpg" else {}))
    os.makedirs(data_root, exist_ok=True)
    with open(os.path.join(data_root, json_name), "w") as f:
      json.dump(js, f)
    info["splits"][split] = dict(
      num_examples=num_ok, num_skipped=num_skipped, annotations=anns_info
    )
  return info


write_fake_youtube3d_hands = write_fake_youtube3d  # contract name
