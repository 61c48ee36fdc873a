"""Tiny fake FreiHAND v2 copies in exactly the released on-disk format.

For tests and benchmarks: the files, names and JSON nesting follow
docs/datasets.md#freihand (training_*.json, training/rgb/%08d.jpg with 4
versions per unique sample, training/mask/%08d.jpg, evaluation_*.json,
evaluation/rgb),
with random but plausible right hands: a skeleton with human proportions,
random finger flexion and global rotation, 0.45-0.8 m in front of a camera
whose focal length matches FreiHAND's (~1.74 x image size), re-sampled until
every joint projects well inside the image. Images show the projected
skeleton on a background that differs per version.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

NUM_VERSIONS = 4
_MARGIN = 0.1  # joints project inside [margin, 1 - margin] x image size

# Canonical right hand (metres, hand frame: fingers along +y, palm facing -z),
# FreiHAND order: wrist; then per finger (thumb, index, middle, ring, pinky)
# the base joint and the direction and lengths of the next three bones.
_FINGER_BASES = np.array(
  [
    [0.022, 0.022, -0.005],
    [0.024, 0.088, 0.0],
    [0.004, 0.092, 0.0],
    [-0.014, 0.087, 0.0],
    [-0.030, 0.077, 0.0],
  ]
)
_FINGER_DIRS = np.array(
  [[0.75, 0.66, -0.1], [0.12, 1.0, 0.0], [0.0, 1.0, 0.0], [-0.1, 1.0, 0.0], [-0.22, 1.0, 0.0]]
)
_BONE_LENGTHS = np.array(
  [
    [0.034, 0.030, 0.026],
    [0.040, 0.024, 0.020],
    [0.042, 0.027, 0.021],
    [0.039, 0.026, 0.020],
    [0.031, 0.019, 0.018],
  ]
)
# Drawn bones as FreiHAND index pairs.
_BONES = [(0, 1 + 4 * f) for f in range(5)] + [
  (1 + 4 * f + j, 2 + 4 * f + j) for f in range(5) for j in range(3)
]


def _rotation(rng: np.random.Generator) -> np.ndarray:
  """A uniformly random 3D rotation (QR of a Gaussian matrix, sign-fixed)."""
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  """Rodrigues rotation about a unit axis."""
  x, y, z = axis / np.linalg.norm(axis)
  c, s = np.cos(angle), np.sin(angle)
  cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
  return c * np.eye(3) + s * cross + (1 - c) * np.outer([x, y, z], [x, y, z])


def random_hand(rng: np.random.Generator) -> np.ndarray:
  """Returns [21, 3] FreiHAND-order joints of a random hand in its own frame."""
  size = rng.uniform(0.85, 1.15)
  joints = [np.zeros(3)]
  for f in range(5):
    joint = _FINGER_BASES[f] * size
    direction = _FINGER_DIRS[f] / np.linalg.norm(_FINGER_DIRS[f])
    # Flexion bends each bone towards the palm (-z) about the finger's side axis.
    side = np.cross(direction, [0.0, 0.0, 1.0])
    joints.append(joint)
    for j in range(3):
      direction = _axis_rotation(side, rng.uniform(0.0, 1.0)) @ direction
      joint = joint + direction * _BONE_LENGTHS[f, j] * size
      joints.append(joint)
  return np.stack(joints)


def _random_camera(rng: np.random.Generator, image_size: int) -> np.ndarray:
  f = image_size * rng.uniform(1.6, 1.9)
  c = image_size / 2 + rng.uniform(-0.01, 0.01, size=2) * image_size
  return np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1.0]])


def _project(xyz: np.ndarray, K: np.ndarray) -> np.ndarray:
  uvw = xyz @ K.T
  return uvw[:, :2] / uvw[:, 2:]


def random_sample(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """A camera and a hand whose joints all project well inside the image.

  Returns:
    (K [3, 3], xyz [21, 3] camera frame, metres, FreiHAND order).
  """
  K = _random_camera(rng, image_size)
  hand = random_hand(rng)
  hand = hand - hand.mean(axis=0)
  lo, hi = _MARGIN * image_size, (1 - _MARGIN) * image_size
  for _ in range(1000):
    xyz = hand @ _rotation(rng).T
    z = rng.uniform(0.45, 0.8)
    # Aim the hand's centre at a point inside the central half of the image.
    centre_uv = image_size * rng.uniform(0.35, 0.65, size=2)
    centre = np.linalg.solve(K, np.array([*centre_uv, 1.0])) * z
    xyz = xyz + centre
    uv = _project(xyz, K)
    if np.all(xyz[:, 2] > 0.1) and np.all((uv >= lo) & (uv <= hi)):
      return K, xyz
  raise RuntimeError("could not place a hand inside the image")


_BACKGROUNDS = ("green", "plain", "noise", "gradient")  # gs, hom, sample, auto


def _render(
  rng: np.random.Generator, uv: np.ndarray, image_size: int, version: int
) -> tuple[Image.Image, Image.Image]:
  """Draws the projected skeleton on a per-version background; and its mask."""
  s = image_size
  kind = _BACKGROUNDS[version % len(_BACKGROUNDS)]
  if kind == "green":
    bg = np.broadcast_to(np.array([40, 160, 60], np.uint8), (s, s, 3)).copy()
  elif kind == "plain":
    bg = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (s, s, 3)).copy()
  elif kind == "noise":
    bg = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
  else:
    ramp = np.linspace(0, 255, s, dtype=np.float64)
    bg = np.stack(
      [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.full((s, s), 128.0)], -1
    ).astype(np.uint8)
  image = Image.fromarray(bg, "RGB")
  mask = Image.new("L", (s, s), 0)
  width = max(1, s // 40)
  for draw, colour in ((ImageDraw.Draw(image), (224, 172, 140)), (ImageDraw.Draw(mask), 255)):
    for a, b in _BONES:
      draw.line([tuple(uv[a]), tuple(uv[b])], fill=colour, width=width)
    for x, y in uv:
      draw.ellipse([x - width, y - width, x + width, y + width], fill=colour)
  return image, mask


def _dump(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def _mano(rng: np.random.Generator, uv_root: np.ndarray, scale: float) -> list[list[float]]:
  """[1][61]: pose (48), shape (10), uv_root (2), scale (1); random filler."""
  return [
    [
      *rng.normal(0, 0.3, 48).tolist(),
      *rng.normal(0, 1, 10).tolist(),
      *uv_root.tolist(),
      float(scale),
    ]
  ]


def _verts(rng: np.random.Generator, xyz: np.ndarray) -> list:
  """[778][3] points scattered around the joints (stands in for MANO verts)."""
  pick = rng.integers(0, len(xyz), 778)
  return (xyz[pick] + rng.normal(0, 0.005, (778, 3))).tolist()


def write_fake_freihand(
  root: str | os.PathLike,
  num_unique: int = 3,
  num_eval: int = 2,
  with_eval_labels: bool = True,
  image_size: int = 224,
  subfolder: str | None = None,
  eval_labels_subfolder: str | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """Writes a tiny FreiHAND v2 copy in the released on-disk format.

  Args:
    root: the manual directory to write into (created if needed).
    num_unique: N unique training samples (4 N training images).
    num_eval: evaluation samples.
    with_eval_labels: also write what FreiHAND_pub_v2_eval.zip adds
      (evaluation_xyz/verts/mano.json).
    image_size: side of the square images (FreiHAND: 224).
    subfolder: write into root/subfolder instead of root (users may unzip
      into a sub-folder).
    eval_labels_subfolder: write the evaluation annotations into
      root/eval_labels_subfolder instead of next to the training files.
    seed: random seed; the same arguments give the same files.

  Returns:
    dict with 'manual_dir' (root), 'root' (folder holding the files),
    'num_unique', 'num_eval', 'image_size', 'eval_labels' and the labels as
    float64 arrays in FreiHAND order: 'K' [N,3,3], 'xyz' [N,21,3],
    'scale' [N], 'eval_K' [M,3,3], 'eval_xyz' [M,21,3] (written only when
    with_eval_labels, returned always), 'eval_scale' [M].
  """
  rng = np.random.default_rng(seed)
  manual_dir = os.fspath(root)
  base = os.path.join(manual_dir, subfolder) if subfolder else manual_dir
  for d in ("training/rgb", "training/mask", "evaluation/rgb"):
    os.makedirs(os.path.join(base, d), exist_ok=True)

  def samples(n):
    Ks, xyzs = [], []
    for _ in range(n):
      K, xyz = random_sample(rng, image_size)
      Ks.append(K)
      xyzs.append(xyz)
    Ks = np.asarray(Ks).reshape(n, 3, 3)
    xyzs = np.asarray(xyzs).reshape(n, 21, 3)
    return Ks, xyzs, np.linalg.norm(xyzs[:, 9] - xyzs[:, 10], axis=-1)

  K, xyz, scale = samples(num_unique)
  for i in range(num_unique):
    uv = _project(xyz[i], K[i])
    for v in range(NUM_VERSIONS):
      image, mask = _render(rng, uv, image_size, v)
      image.save(os.path.join(base, "training/rgb", f"{v * num_unique + i:08d}.jpg"), quality=90)
    mask.save(os.path.join(base, "training/mask", f"{i:08d}.jpg"), quality=90)
  _dump(os.path.join(base, "training_K.json"), K.tolist())
  _dump(os.path.join(base, "training_xyz.json"), xyz.tolist())
  _dump(os.path.join(base, "training_scale.json"), scale.tolist())
  _dump(
    os.path.join(base, "training_mano.json"),
    [_mano(rng, _project(xyz[i], K[i])[0], scale[i]) for i in range(num_unique)],
  )
  _dump(os.path.join(base, "training_verts.json"), [_verts(rng, xyz[i]) for i in range(num_unique)])

  eval_K, eval_xyz, eval_scale = samples(num_eval)
  for i in range(num_eval):
    image, _ = _render(rng, _project(eval_xyz[i], eval_K[i]), image_size, i % NUM_VERSIONS)
    image.save(os.path.join(base, "evaluation/rgb", f"{i:08d}.jpg"), quality=90)
  _dump(os.path.join(base, "evaluation_K.json"), eval_K.tolist())
  _dump(os.path.join(base, "evaluation_scale.json"), eval_scale.tolist())
  if with_eval_labels:
    label_dir = os.path.join(manual_dir, eval_labels_subfolder) if eval_labels_subfolder else base
    os.makedirs(label_dir, exist_ok=True)
    _dump(os.path.join(label_dir, "evaluation_xyz.json"), eval_xyz.tolist())
    _dump(
      os.path.join(label_dir, "evaluation_verts.json"),
      [_verts(rng, eval_xyz[i]) for i in range(num_eval)],
    )
    _dump(
      os.path.join(label_dir, "evaluation_mano.json"),
      [_mano(rng, _project(eval_xyz[i], eval_K[i])[0], eval_scale[i]) for i in range(num_eval)],
    )

  return {
    "manual_dir": manual_dir,
    "root": base,
    "num_unique": num_unique,
    "num_eval": num_eval,
    "image_size": image_size,
    "eval_labels": with_eval_labels,
    "K": K,
    "xyz": xyz,
    "scale": scale,
    "eval_K": eval_K,
    "eval_xyz": eval_xyz,
    "eval_scale": eval_scale,
  }
