"""Tiny fake hand-image folder (optionally with a boxes file), for tests.

Written under `root`:
  a.jpg       41 x 31, two hands (boxes [5, 5, 17, 19] and [22, 8, 36, 24])
  sub/b.png   33 x 33, one hand (box [10, 12, 20, 20])
  c.jpg       25 x 35, no box (skipped as `no_box` when a boxes file exists)
  broken.jpg  (with broken=True) a truncated JPEG: skipped as unreadable
  boxes.csv | boxes.json   (boxes='csv' | 'json'; none for boxes=None)
Bright 3 x 3 blobs sit on every box centre and on every image's centre pixel
(odd sizes, so both are integer pixels) on a dark noisy background: the
centre of every stored crop must be bright.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

_IMAGES = {  # name: ((W, H), boxes)
  "a.jpg": ((41, 31), [(5.0, 5.0, 17.0, 19.0), (22.0, 8.0, 36.0, 24.0)]),
  "sub/b.png": ((33, 33), [(10.0, 12.0, 20.0, 20.0)]),
  "c.jpg": ((25, 35), None),
}


def write_fake_hand_crops(
  root: os.PathLike | str, *, boxes: str | None = None, broken: bool = True, seed: int = 0
) -> dict:
  """Writes the fake folder; see the module docstring.

  Args:
    root: manual dir to create.
    boxes: None, 'csv' or 'json' (list-of-records form).
    broken: also write a truncated JPEG.
    seed: RNG seed.

  Returns:
    {'root', 'sizes': {name: (W, H)}, 'boxes': {name: [box, ...]} (only the
     boxed images; None without a boxes file), 'boxes_file': path or None,
     'expected': {sample_id: (name, box or None)} of the stored examples,
     'skipped': {reason: count}}.
  """
  rng = np.random.default_rng(seed)
  root = os.fspath(root)
  for name, ((w, h), bxs) in _IMAGES.items():
    px = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
    centres = [((w - 1) // 2, (h - 1) // 2)]
    centres += [(int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)) for b in bxs or []]
    for cx, cy in centres:
      px[cy - 1 : cy + 2, cx - 1 : cx + 2] = 255
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(px).save(path, **({"quality": 95} if name.endswith(".jpg") else {}))
  skipped: dict[str, int] = {}
  if broken:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(buf, format="JPEG")
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
      f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    if boxes is None:
      skipped["unreadable_image"] = 1

  boxed = {n: b for n, (_, b) in _IMAGES.items() if b}
  boxes_file = None
  if boxes == "csv":
    boxes_file = os.path.join(root, "boxes.csv")
    with open(boxes_file, "w", newline="") as f:
      wr = csv.writer(f)
      wr.writerow(["image", "x0", "y0", "x1", "y1", "score"])
      for n, bxs in boxed.items():
        for b in bxs:
          wr.writerow([n, *b, 0.9])
  elif boxes == "json":
    boxes_file = os.path.join(root, "boxes.json")
    with open(boxes_file, "w") as f:
      json.dump([{"image": n, "box": list(b)} for n, bxs in boxed.items() for b in bxs], f)
  elif boxes is not None:
    raise ValueError(f"boxes must be None, 'csv' or 'json', got {boxes!r}")

  # Builder order: sorted names; ids count unreadable files too.
  names = sorted(list(_IMAGES) + (["broken.jpg"] if broken else []))
  expected: dict[int, tuple[str, Any]] = {}
  next_id = 0
  for n in names:
    if boxes is None:
      if n != "broken.jpg":
        expected[next_id] = (n, None)
      next_id += 1
    elif n in boxed:
      for b in boxed[n]:
        expected[next_id] = (n, b)
        next_id += 1
  if boxes is not None:
    skipped["no_box"] = 1 + int(broken)
  return dict(
    root=root,
    sizes={n: s for n, (s, _) in _IMAGES.items()},
    boxes=boxed if boxes else None,
    boxes_file=boxes_file,
    expected=expected,
    skipped=skipped,
  )
