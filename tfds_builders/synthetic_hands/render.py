"""Procedural hand images with exact 3D labels: a numpy z-buffer rasteriser.

The hand (`hand_model`) is drawn as shaded capsules whose projected width
follows perspective (one per bone, plus metacarpals, thenar/hypothenar pads
and a forearm) and a palm slab (two planar polygons, shaded as gently domed),
composited with a z-buffer at `supersample` x the output resolution and
box-filtered down (anti-aliasing), over a random textured background
(`backgrounds`), then sensor noise and sometimes a slight blur.
Per-finger tints are mixed into a random skin tone; the light direction is
random. Each primitive is rasterised as a distance field over its own bounding
box only, and only the hand's bounding box is supersampled, so a 128 px image
takes ~5 ms of CPU (224 px: ~12 ms).

Public entry point: `render_sample(seed, image_size)`.

Randomness: one generator per sample is split into independent streams for the
pose, the appearance, the background and the sensor noise, so rendering with
`draw_hand=False` gives exactly the same background (the tests rely on this).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageFilter

from tfds_builders.synthetic_hands import backgrounds
from tfds_builders.synthetic_hands import hand_model as hm

# Per-finger tints (thumb..pinky), mixed into the skin tone so fingers are
# distinguishable, as in coloured-glove data, while the hand stays hand-like.
FINGER_TINTS = np.array(
  [
    [230, 60, 60],
    [60, 200, 70],
    [70, 110, 235],
    [235, 210, 50],
    [200, 70, 220],
  ],
  np.float64,
)


class _Canvas:
  """Supersampled colour + depth buffers over a window of the image.

  Only the hand's bounding box is rasterised: the buffers cover supersampled
  pixels [ox, ox + w) x [oy, oy + h) of the full (size * ss) grid.
  """

  def __init__(self, K: np.ndarray, ss: int, origin: tuple[int, int], shape: tuple[int, int]):
    self.K, self.ss = K, ss
    self.ox, self.oy = origin
    self.h, self.w = shape
    self.z = np.full(shape, np.inf)
    self.rgb = np.zeros(shape + (3,))

  def to_px(self, xyz: np.ndarray) -> np.ndarray:
    """Camera points [..., 3] -> canvas pixel coordinates (x, y) [..., 2]."""
    q = self.ss * (hm.project(xyz, self.K) + 0.5) - 0.5
    return q - np.array([self.ox, self.oy])

  def window(self, lo: np.ndarray, hi: np.ndarray):
    """Integer pixel window covering [lo, hi] (x, y), clipped; None if empty."""
    x0, y0 = np.maximum(np.floor(lo).astype(int), 0)
    x1 = min(int(np.ceil(hi[0])), self.w - 1)
    y1 = min(int(np.ceil(hi[1])), self.h - 1)
    if x1 < x0 or y1 < y0:
      return None
    return x0, x1, y0, y1


def _shade(normal_x, normal_y, normal_z, colour, light):
  """Lambert + ambient + a weak Blinn highlight (viewer along -z)."""
  d, h = light["dir"], light["half"]
  lam = np.maximum(normal_x * d[0] + normal_y * d[1] + normal_z * d[2], 0)
  spec = np.maximum(normal_x * h[0] + normal_y * h[1] + normal_z * h[2], 0) ** 20
  return (light["ambient"] + light["diffuse"] * lam)[..., None] * colour + (
    light["specular"] * 255 * spec
  )[..., None]


def _draw_capsules(cv: _Canvas, P0, P1, R0, R1, colours, light):
  """Rasterises tapered capsules P0[c] -> P1[c] (camera, metres), radii R0/R1.

  Silhouette: pixels within the linearly interpolated projected radius of the
  projected segment (a distance field over the capsule's bounding box only).
  Depth: the axis depth minus the sphere bulge, so joints and crossing
  fingers occlude correctly. Normals: of the screen-space tube.

  Args:
    cv: the canvas (updated in place).
    P0, P1: [C, 3] end points. R0, R1: [C] radii. colours: [C, 3].
    light: from `_sample_look`.
  """
  # Per-capsule set-up for all capsules at once (tiny-array numpy calls are
  # what costs here, not the pixels).
  p0, p1 = cv.to_px(P0), cv.to_px(P1)
  f = cv.ss * cv.K[0, 0]
  r0, r1 = f * R0 / P0[:, 2], f * R1 / P1[:, 2]
  lo = np.maximum(np.floor(np.minimum(p0 - r0[:, None], p1 - r1[:, None])), 0)
  hi = np.minimum(np.ceil(np.maximum(p0 + r0[:, None], p1 + r1[:, None])), [cv.w - 1, cv.h - 1])
  seg = p1 - p0
  l2 = np.maximum((seg * seg).sum(1), 1e-9)
  for c in range(len(P0)):
    x0, y0 = int(lo[c, 0]), int(lo[c, 1])
    x1, y1 = int(hi[c, 0]), int(hi[c, 1])
    if x1 < x0 or y1 < y0:
      continue
    sx, sy = seg[c]
    wx = np.arange(x0 - p0[c, 0], x1 + 1 - p0[c, 0])[None, :]
    wy = np.arange(y0 - p0[c, 1], y1 + 1 - p0[c, 1])[:, None]
    t = np.clip((wx * sx + wy * sy) / l2[c], 0, 1)
    dx, dy = wx - t * sx, wy - t * sy
    r = r0[c] + t * (r1[c] - r0[c])
    rho2 = (dx * dx + dy * dy) / (r * r)
    iy, ix = np.nonzero(rho2 < 1)
    if not len(iy):
      continue
    # From here on only the covered pixels are processed.
    t, dx, dy, r, rho2 = t[iy, ix], dx[iy, ix], dy[iy, ix], r[iy, ix], rho2[iy, ix]
    nz = np.sqrt(1 - rho2)
    depth = P0[c, 2] + t * (P1[c, 2] - P0[c, 2]) - (R0[c] + t * (R1[c] - R0[c])) * nz
    zwin = cv.z[y0 : y1 + 1, x0 : x1 + 1]
    upd = depth < zwin[iy, ix]
    iy, ix = iy[upd], ix[upd]
    zwin[iy, ix] = depth[upd]
    cv.rgb[y0 : y1 + 1, x0 : x1 + 1][iy, ix] = _shade(
      dx[upd] / r[upd], dy[upd] / r[upd], -nz[upd], colours[c], light
    )


def _draw_polygon(cv: _Canvas, V, colour, light, dome: float = 0.0):
  """Rasterises a planar polygon V [M, 3] (camera, metres) with exact depth.

  `dome` > 0 shades it as a gently curved surface (normals tilt outwards from
  the vertex centroid by `dome` per metre) so a palm does not look cut out of
  paper; the geometry and depth stay planar.
  """
  q = cv.to_px(V)
  win = cv.window(q.min(0), q.max(0))
  if win is None:
    return
  x0, x1, y0, y1 = win
  xs = np.arange(x0, x1 + 1, dtype=np.float64)[None, :]
  ys = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]
  inside = np.zeros((y1 - y0 + 1, x1 - x0 + 1), bool)
  for a, b in zip(q, np.roll(q, -1, axis=0)):  # even-odd rule
    if a[1] == b[1]:
      continue
    cross = (a[1] > ys) != (b[1] > ys)
    x_int = a[0] + (ys - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
    inside ^= cross & (xs < x_int)
  n = np.cross(V[1] - V[0], V[2] - V[0])
  n = n / np.linalg.norm(n)
  if n @ V[0] > 0:  # face the camera
    n = -n
  # Ray through each (ordinary) pixel, intersected with the plane n.X = n.V0.
  K = cv.K
  u = (xs + cv.ox + 0.5) / cv.ss - 0.5
  v = (ys + cv.oy + 0.5) / cv.ss - 0.5
  denom = n[0] * (u - K[0, 2]) / K[0, 0] + n[1] * (v - K[1, 2]) / K[1, 1] + n[2]
  depth = (n @ V[0]) / np.where(np.abs(denom) < 1e-9, 1e-9, denom)
  zwin = cv.z[y0 : y1 + 1, x0 : x1 + 1]
  upd = inside & (depth > 0) & (depth < zwin)
  if not upd.any():
    return
  zwin[upd] = depth[upd]
  iy, ix = np.nonzero(upd)
  z = depth[iy, ix]
  X = np.stack([(u[0, ix] - K[0, 2]) / K[0, 0] * z, (v[iy, 0] - K[1, 2]) / K[1, 1] * z, z], -1)
  d = X - V.mean(0)
  d -= (d @ n)[:, None] * n  # in-plane offset from the centre
  nrm = n + dome * d
  nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
  cv.rgb[y0 : y1 + 1, x0 : x1 + 1][iy, ix] = _shade(nrm[:, 0], nrm[:, 1], nrm[:, 2], colour, light)


def _sample_look(rng: np.random.Generator) -> dict:
  """Colours and lighting of one sample."""
  skin = np.clip(
    backgrounds.SKIN_TONES[rng.integers(7)] * rng.uniform(0.85, 1.1) + rng.normal(0, 8, 3), 0, 255
  )
  tint = rng.uniform(0.25, 0.55)
  fingers = (1 - tint) * skin + tint * FINGER_TINTS
  palm = np.clip(skin * rng.uniform(0.92, 1.05, 3), 0, 255)
  sleeve = backgrounds.random_colour(rng) if rng.uniform() < 0.6 else palm
  d = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), -1.0])
  d = d / np.linalg.norm(d)
  half = d + np.array([0.0, 0.0, -1.0])  # Blinn half-vector, viewer along -z
  return dict(
    fingers=fingers,
    palm=palm,
    sleeve=sleeve,
    forearm=rng.uniform() < 0.75,
    forearm_len=rng.uniform(0.08, 0.2),
    light=dict(
      dir=d,
      half=half / np.linalg.norm(half),
      ambient=rng.uniform(0.3, 0.5),
      diffuse=rng.uniform(0.45, 0.75),
      specular=rng.uniform(0.0, 0.15),
    ),
  )


def _primitives(hand: dict, kp: np.ndarray, look: dict):
  """Hand-frame primitives: capsules (P0, P1, R0, R1, colour, is_forearm)
  and polygons (V, colour)."""
  s = hand["size"]
  caps, polys = [], []
  for f in range(5):
    chain = hm.ait_chain(f)
    radii = hand["radii"][f]
    for k in range(3):
      a, b = kp[chain[k]], kp[chain[k + 1]]
      if k == 2:  # the tip keypoint is on the surface: end the axis inside
        d = b - a
        b = b - radii[3] * d / np.linalg.norm(d)
      caps.append((a, b, radii[k], radii[k + 1], look["fingers"][f], False))
  palm = look["palm"]
  # The palm is a slab: two copies of its outline (front and back faces),
  # tangent to metacarpal capsules that round its sides when seen edge-on.
  h = 0.0105 * s
  for f in range(1, 5):
    base = np.array([hand["mcp"][f][0] * 0.5, 0.012 * s, 0.0])
    caps.append((base, kp[1 + f], h, h, palm, False))
  thenar_end = 0.5 * (kp[1] + kp[6])
  caps.append(
    (np.array([0.008, 0.012, 0.002]) * s, thenar_end, 0.013 * s, hand["radii"][0][0], palm, False)
  )
  caps.append(
    (np.array([-0.022, 0.014, 0.0]) * s, np.array([-0.031, 0.058, 0.0]) * s, h, h, palm, False)
  )
  outline = (
    np.array(
      [
        [-0.024, 0.0],
        [0.020, 0.0],
        [0.026, 0.030],
        [0.028, 0.068],
        [0.022, 0.0845],
        [0.0, 0.087],
        [-0.019, 0.082],
        [-0.0365, 0.0735],
        [-0.040, 0.060],
        [-0.034, 0.025],
      ]
    )
    * s
  )
  outline[4:8] = hand["mcp"][1:5, :2]  # snap to the actual (jittered) MCPs
  for z in (h * 1.01, -h * 1.01):
    polys.append((np.concatenate([outline, np.full((len(outline), 1), z)], 1), palm))
  if look["forearm"]:
    # Forearm along -y; shortened when it points at the camera so that it
    # cannot swallow the image.
    caps.append(
      (
        np.array([0.0, 0.004, 0.0]) * s,
        np.array([0.0, -look["forearm_len"], 0.0]),
        0.020 * s,
        0.024 * s,
        look["sleeve"],
        True,
      )
    )
  return caps, polys


def _box_down(a: np.ndarray, ss: int) -> np.ndarray:
  """Mean over ss x ss blocks of the first two axes (strided adds: faster
  than a reshape-mean on the non-contiguous view)."""
  out = np.zeros_like(a[::ss, ::ss])
  for i in range(ss):
    for j in range(ss):
      out += a[i::ss, j::ss]
  return out / (ss * ss)


def _joint_radii(hand: dict) -> np.ndarray:
  r = np.full(21, 0.02 * hand["size"])
  for f in range(5):
    r[hm.ait_chain(f)] = hand["radii"][f]
  return r


def render_sample(
  seed_or_rng,
  image_size: int,
  *,
  draw_hand: bool = True,
  supersample: int = 2,
  max_roll_deg: float = 180.0,
) -> dict:
  """Renders one synthetic hand image with its labels.

  Args:
    seed_or_rng: anything `numpy.random.default_rng` accepts (int, sequence of
      ints, SeedSequence); a Generator must have been seeded from a
      SeedSequence (it is split with `.spawn`). Same seed -> same sample.
    image_size: side S of the square image in pixels.
    draw_hand: False renders the background (and sensor noise) alone, with the
      same labels; for tests and visualisation.
    supersample: anti-aliasing factor of the rasteriser.
    max_roll_deg: in-plane roll within this many degrees of upright (180:
      any roll; see `hand_model.random_rotation`).

  Returns:
    dict with image uint8 [S, S, 3]; K float32 [3, 3]; keypoints_3d float32
    [21, 3] (camera frame, metres, AIT order, wrist = joint 0);
    keypoints_2d float32 [21, 2] (pixels, (x, y), = projection of
    keypoints_3d with K); scale float32 [] (|kp3d[3] - kp3d[8]|, metres);
    mask bool [S, S] (hand and forearm coverage > 1/2); visible bool [21]
    (the joint is not hidden behind another part of the hand; all False
    when draw_hand is False).
  """
  rng = np.random.default_rng(seed_or_rng)
  pose_rng, look_rng, bg_rng, noise_rng = rng.spawn(4)

  hand = hm.sample_hand(pose_rng)
  kp_hand = hm.forward_kinematics(hand)
  K = hm.random_intrinsics(pose_rng, image_size)
  R, t = hm.place_in_camera(pose_rng, kp_hand, K, image_size, max_roll_deg=max_roll_deg)
  kp3d = kp_hand @ R.T + t
  look = _sample_look(look_rng)
  bg = backgrounds.random_background(bg_rng, image_size)

  n, ss = image_size, supersample
  img = bg.astype(np.float32)
  mask = np.zeros((n, n), bool)
  visible = np.zeros(21, bool)
  if draw_hand:
    caps, polys = _primitives(hand, kp_hand, look)
    P0, P1, R0, R1, colours, forearm = (np.array(x) for x in zip(*caps))
    P0, P1 = P0 @ R.T + t, P1 @ R.T + t
    # A forearm pointing at the camera is cut where it gets 15% closer than
    # the wrist, so that it cannot swallow the image (and the hand).
    cut = forearm & (P1[:, 2] < 0.85 * P0[:, 2])
    frac = 0.15 * P0[:, 2] / np.maximum(P0[:, 2] - P1[:, 2], 1e-9)
    P1 = np.where(cut[:, None], P0 + (P1 - P0) * frac[:, None], P1)
    polys = [(V @ R.T + t, colour) for V, colour in polys]

    # Bounding box of everything, in output pixels, clipped to the image.
    pts = np.concatenate([P0, P1] + [V for V, _ in polys])
    uv = hm.project(pts, K)
    rad = K[0, 0] * np.concatenate([R0, R1]).max() / pts[:, 2].min()
    x0, y0 = np.clip(np.floor(uv.min(0) - rad - 1).astype(int), 0, n - 1)
    x1, y1 = np.clip(np.ceil(uv.max(0) + rad + 1).astype(int), 0, n - 1)
    cv = _Canvas(K, ss, (x0 * ss, y0 * ss), ((y1 - y0 + 1) * ss, (x1 - x0 + 1) * ss))
    # Polygons first: the z-test is strict, so they win ties with the
    # capsules they are tangent to.
    for V, colour in polys:
      _draw_polygon(cv, V, colour, look["light"], dome=14 / hand["size"])
    _draw_capsules(cv, P0, P1, R0, R1, colours, look["light"])

    # Visibility: the nearest surface at the joint's pixel is its own.
    q = np.round(cv.to_px(kp3d)).astype(int)
    q = np.clip(q, 0, [cv.w - 1, cv.h - 1])
    visible = cv.z[q[:, 1], q[:, 0]] > kp3d[:, 2] - 1.5 * _joint_radii(hand)

    cover = _box_down(np.isfinite(cv.z).astype(np.float32), ss)
    colour = _box_down(cv.rgb.astype(np.float32), ss)  # premultiplied
    win = img[y0 : y1 + 1, x0 : x1 + 1]
    win *= 1 - cover[..., None]
    win += colour
    mask[y0 : y1 + 1, x0 : x1 + 1] = cover > 0.5

  sigma = noise_rng.uniform(0, 5)
  img += noise_rng.standard_normal(img.shape, dtype=np.float32) * sigma
  blur = noise_rng.uniform(0, 0.8) if noise_rng.uniform() < 0.3 else 0.0
  np.clip(img, 0, 255, out=img)
  img = (img + 0.5).astype(np.uint8)  # round half up (img >= 0)
  if blur > 0:
    img = np.asarray(
      PIL.Image.fromarray(img).filter(PIL.ImageFilter.GaussianBlur(blur * image_size / 128))
    )

  kp2d = hm.project(kp3d, K)
  return dict(
    image=img,
    K=K.astype(np.float32),
    keypoints_3d=kp3d.astype(np.float32),
    keypoints_2d=kp2d.astype(np.float32),
    scale=np.float32(np.linalg.norm(kp3d[3] - kp3d[8])),
    mask=mask,
    visible=visible,
  )
