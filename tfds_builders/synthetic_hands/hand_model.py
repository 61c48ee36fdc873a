"""A kinematic 21-joint right hand and its random placement in front of a camera.

Everything here is numpy and deterministic given a `numpy.random.Generator`.

Hand frame (metres, right-handed): origin at the wrist, +y from the wrist to the
middle-finger MCP (distal), +x towards the thumb (radial), +z out of the palm
(palmar). The four finger MCPs lie in the plane z = 0, so the palm plane, its
normal and the finger rest directions can be recovered exactly from the
keypoints (the tests do that independently of this module).

Joint order is AIT (docs/datasets.md#joint-orders): 0 wrist; 1-5 MCP
(thumb..pinky; for the thumb this is its carpometacarpal joint, as in
FreiHAND/MANO); 6-10 PIP (thumb: MCP); 11-15 DIP (thumb: IP); 16-20 tips.

Kinematics (all angles in degrees; limits below are the sampling limits and are
never exceeded):
- Fingers (index..pinky): the proximal phalanx starts along the finger's rest
  direction in the palm plane (`FINGER_REST_SPREAD_DEG` from +y towards the
  thumb), is abducted about the palm normal, then flexed towards the palm about
  the lateral axis `a = f x n`; PIP and DIP are hinges about the same axis, so
  a finger's four points are coplanar.
- Thumb: the metacarpal (CMC -> MCP) points along azimuth `alpha` (in the palm
  plane, from +y towards +x) and elevation `beta` out of the palm towards the
  palmar side; opposition raises beta, lowers alpha and turns the thumb's own
  flexion plane (`twist`). MCP and IP are hinges about one axis.
"""

from __future__ import annotations

import numpy as np

from peclr_jax.hands import joints

# ------------------------------------------------------------------ skeleton --
# Nominal (scale 1) geometry, metres. The middle MCP->PIP bone (AIT 3->8, the
# FreiHAND `scale`) is 3.0 cm; ratios follow the MANO mean hand roughly.
# MCP positions (thumb: CMC), hand frame. Fingers in the plane z = 0.
NOMINAL_MCP = np.array(
  [
    [0.0220, 0.0280, 0.0080],  # thumb CMC (slightly palmar, in the thenar)
    [0.0225, 0.0845, 0.0],  # index
    [0.0, 0.0870, 0.0],  # middle (defines +y)
    [-0.0190, 0.0820, 0.0],  # ring
    [-0.0365, 0.0735, 0.0],  # pinky
  ]
)
# Segment lengths per finger: (MCP->PIP, PIP->DIP, DIP->tip); thumb:
# (CMC->MCP, MCP->IP, IP->tip).
NOMINAL_BONES = np.array(
  [
    [0.0340, 0.0290, 0.0250],
    [0.0280, 0.0185, 0.0195],
    [0.0300, 0.0205, 0.0205],
    [0.0280, 0.0195, 0.0200],
    [0.0220, 0.0150, 0.0180],
  ]
)
# Capsule radii at (MCP, PIP, DIP, tip), metres (used by the renderer).
NOMINAL_RADII = np.array(
  [
    [0.0135, 0.0115, 0.0100, 0.0092],
    [0.0106, 0.0095, 0.0084, 0.0075],
    [0.0108, 0.0097, 0.0086, 0.0077],
    [0.0102, 0.0092, 0.0081, 0.0073],
    [0.0092, 0.0082, 0.0073, 0.0065],
  ]
)
REFERENCE_BONE = (3, 8)  # AIT middle MCP -> PIP

# Global hand size factor and independent per-segment jitter (multiplicative).
HAND_SCALE_RANGE = (0.87, 1.13)
BONE_JITTER = 0.03
# Any segment's length lies in nominal * BONE_LENGTH_FACTOR_RANGE; the middle
# MCP-PIP bone therefore lies in [2.53, 3.49] cm.
BONE_LENGTH_FACTOR_RANGE = (
  HAND_SCALE_RANGE[0] * (1 - BONE_JITTER),
  HAND_SCALE_RANGE[1] * (1 + BONE_JITTER),
)

# ------------------------------------------------------------- joint limits --
FINGER_REST_SPREAD_DEG = np.array([8.0, 0.0, -7.0, -14.0])  # index..pinky
FINGER_ABDUCTION_DEG = (-15.0, 15.0)  # about the palm normal, added to rest
FINGER_MCP_FLEX_DEG = (-15.0, 90.0)  # negative = hyperextension
FINGER_PIP_FLEX_DEG = (0.0, 110.0)
FINGER_DIP_FLEX_DEG = (0.0, 90.0)
THUMB_AZIMUTH_DEG = (10.0, 70.0)  # metacarpal, in-plane from +y to +x
THUMB_ELEVATION_DEG = (0.0, 60.0)  # metacarpal, out of the palm (palmar)
THUMB_TWIST_DEG = (-45.0, 50.0)  # roll of the thumb's flexion plane
THUMB_MCP_FLEX_DEG = (0.0, 60.0)
THUMB_IP_FLEX_DEG = (-15.0, 80.0)

# ------------------------------------------------------------------ camera --
# FreiHAND-like intrinsics at 224 px (the model's default K), scaled to size.
BASE_FOCAL = (388.90, 388.71)
BASE_SIZE = 224.0
FOCAL_JITTER = 0.05  # relative, per sample
PRINCIPAL_JITTER_PX = 2.0  # at 224 px, per sample
ROOT_DEPTH_RANGE = (0.40, 0.70)  # wrist depth, metres
CENTRE_OFFSET = 0.18  # max keypoint-centre offset, fraction of size
BORDER_MARGIN = 0.06  # keypoints stay this far inside, fraction


def _rot(axis: np.ndarray, angle_deg) -> np.ndarray:
  """Rotation matrix [3, 3] about a unit `axis` (Rodrigues)."""
  a = np.deg2rad(angle_deg)
  x, y, z = axis
  c, s, t = np.cos(a), np.sin(a), 1 - np.cos(a)
  return np.array(
    [
      [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
      [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
      [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
    ]
  )


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def ait_chain(finger: int) -> list[int]:
  """AIT indices (MCP, PIP, DIP, tip) of finger 0 (thumb) .. 4 (pinky)."""
  return [1 + finger, 6 + finger, 11 + finger, 16 + finger]


def sample_hand(rng: np.random.Generator) -> dict:
  """Draws a hand: size, segment lengths and joint angles (within the limits).

  Poses come from a global "grasp" level shared by the fingers plus per-finger
  noise, with some fingers drawn independently (pointing, counting gestures).

  Returns:
    dict with `size` [], `mcp` [5, 3] (hand frame, metres), `bones` [5, 3]
    (metres), `radii` [5, 4] (metres) and angles in degrees: `abduction` [4],
    `mcp_flex` [4], `pip_flex` [4], `dip_flex` [4] (index..pinky),
    `thumb` [5] (azimuth, elevation, twist, mcp_flex, ip_flex).
  """
  size = rng.uniform(*HAND_SCALE_RANGE)
  jitter = lambda shape: rng.uniform(1 - BONE_JITTER, 1 + BONE_JITTER, shape)
  mcp = NOMINAL_MCP * size * jitter((5, 1))
  bones = NOMINAL_BONES * size * jitter((5, 3))
  radii = NOMINAL_RADII * size * rng.uniform(0.92, 1.1)

  grasp = rng.uniform(0, 1) ** 1.3
  curl = np.clip(grasp + rng.normal(0, 0.22, 5), 0, 1)
  independent = rng.uniform(size=5) < 0.3
  curl = np.where(independent, rng.uniform(0, 1, 5), curl)
  c = curl[1:]
  clip = lambda x, lim: np.clip(x, *lim)
  mcp_flex = clip(-8 + 88 * c + rng.normal(0, 8, 4), FINGER_MCP_FLEX_DEG)
  pip_flex = clip(5 + 95 * c + rng.normal(0, 10, 4), FINGER_PIP_FLEX_DEG)
  dip_flex = clip(0.65 * pip_flex + rng.normal(0, 8, 4), FINGER_DIP_FLEX_DEG)
  # Flexed fingers close up (adduct); open hands spread.
  spread = rng.uniform(-0.3, 1.0) * (1 - c)
  abduction = clip(
    spread * np.array([8.0, 2.0, -6.0, -12.0]) + rng.normal(0, 3, 4), FINGER_ABDUCTION_DEG
  )

  opp = np.clip(rng.uniform(0, 1) * 0.6 + 0.5 * curl[0] + rng.normal(0, 0.1), 0, 1)
  thumb = np.array(
    [
      clip(55 - 35 * opp + rng.normal(0, 6), THUMB_AZIMUTH_DEG),
      clip(8 + 45 * opp + rng.normal(0, 6), THUMB_ELEVATION_DEG),
      clip(35 - 70 * opp + rng.normal(0, 8), THUMB_TWIST_DEG),
      clip(5 + 45 * curl[0] + rng.normal(0, 6), THUMB_MCP_FLEX_DEG),
      clip(-5 + 70 * curl[0] + rng.normal(0, 8), THUMB_IP_FLEX_DEG),
    ]
  )
  return dict(
    size=size,
    mcp=mcp,
    bones=bones,
    radii=radii,
    abduction=abduction,
    mcp_flex=mcp_flex,
    pip_flex=pip_flex,
    dip_flex=dip_flex,
    thumb=thumb,
  )


def forward_kinematics(hand: dict) -> np.ndarray:
  """Joint positions of `hand` (from `sample_hand`) in the hand frame.

  Returns:
    keypoints [21, 3] float64, metres, AIT order, wrist at the origin.
  """
  kp = np.zeros((joints.NUM_JOINTS, 3))
  for f in range(1, 5):
    chain = ait_chain(f)
    kp[chain[0]] = hand["mcp"][f]
    rest = np.deg2rad(FINGER_REST_SPREAD_DEG[f - 1] + hand["abduction"][f - 1])
    # Flexing by theta about the lateral axis f x n turns the in-plane
    # direction f towards the palm normal n: cos(theta) f + sin(theta) n.
    flex = np.deg2rad(
      np.cumsum([hand["mcp_flex"][f - 1], hand["pip_flex"][f - 1], hand["dip_flex"][f - 1]])
    )
    dirs = np.stack([np.cos(flex) * np.sin(rest), np.cos(flex) * np.cos(rest), np.sin(flex)], -1)
    kp[chain[1:]] = hand["mcp"][f] + np.cumsum(hand["bones"][f][:, None] * dirs, 0)

  az, el, twist, t_mcp, t_ip = np.deg2rad(hand["thumb"])
  t = np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])
  ulnar = np.array([-np.cos(az), np.sin(az), 0.0])  # in-plane, across the palm
  e2 = _unit(ulnar - ulnar @ t * t)
  e3 = np.cross(t, e2)  # palmar-ish when the thumb lies in the palm plane
  bend = np.cos(twist) * e2 + np.sin(twist) * e3  # where flexion moves the tip
  # MCP and IP are hinges about t x bend: rotating t by theta about it gives
  # cos(theta) t + sin(theta) bend.
  flex = np.cumsum([0.0, t_mcp, t_ip])
  dirs = np.cos(flex)[:, None] * t + np.sin(flex)[:, None] * bend
  chain = ait_chain(0)
  kp[chain[0]] = hand["mcp"][0]
  kp[chain[1:]] = hand["mcp"][0] + np.cumsum(hand["bones"][0][:, None] * dirs, 0)
  return kp


def random_rotation(rng: np.random.Generator, max_roll_deg: float = 180.0) -> np.ndarray:
  """Hand-to-camera rotation [3, 3]: palm or back towards the camera, tilted
  up to 80 degrees about a random in-image axis, rolled in the image plane.

  The roll is uniform within `max_roll_deg` of upright (fingers up in the
  image, roll 180); 180 gives any roll. Real hand datasets are mostly
  upright: FreiHAND's hands lie within about 60 degrees of it.
  """
  face = (
    np.diag([1.0, 1.0, 1.0]) if rng.uniform() < 0.5 else np.diag([-1.0, 1.0, -1.0])
  )  # back / palm towards the camera (det stays +1)
  # 180 +- max_roll: with 180 the same draw as U(0, 360) (older builds).
  roll = _rot(np.array([0.0, 0.0, 1.0]), rng.uniform(180.0 - max_roll_deg, 180.0 + max_roll_deg))
  phi = rng.uniform(0, 2 * np.pi)
  tilt_axis = np.array([np.cos(phi), np.sin(phi), 0.0])
  tilt = _rot(tilt_axis, 80 * np.sqrt(rng.uniform()))
  return tilt @ roll @ face


def random_intrinsics(rng: np.random.Generator, image_size: int) -> np.ndarray:
  """FreiHAND-like K [3, 3] for a square image of `image_size` pixels."""
  s = image_size / BASE_SIZE
  f = np.array(BASE_FOCAL) * s * rng.uniform(1 - FOCAL_JITTER, 1 + FOCAL_JITTER)
  c = image_size / 2 + rng.uniform(-PRINCIPAL_JITTER_PX, PRINCIPAL_JITTER_PX, 2) * s
  return np.array([[f[0], 0, c[0]], [0, f[1], c[1]], [0, 0, 1]])


def project(xyz: np.ndarray, K: np.ndarray) -> np.ndarray:
  """Pinhole projection of points [..., 3] to pixels [..., 2]."""
  uvw = xyz @ K.T
  return uvw[..., :2] / uvw[..., 2:]


def place_in_camera(
  rng: np.random.Generator,
  kp_hand: np.ndarray,
  K: np.ndarray,
  image_size: int,
  max_tries: int = 30,
  max_roll_deg: float = 180.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Rotates the hand and moves it in front of the camera, inside the image.

  The wrist goes to a depth in `ROOT_DEPTH_RANGE`, the keypoints' centre to a
  random offset from the principal point; draws are repeated (deterministically)
  until every keypoint lies `BORDER_MARGIN` inside the image, moving the hand
  further away and towards the centre on later tries.

  Returns:
    (R [3, 3], t [3]) with camera = R @ hand + t.
  """
  R = random_rotation(rng, max_roll_deg)
  rel = kp_hand @ R.T
  lo = BORDER_MARGIN * image_size
  hi = image_size - 1 - lo
  for attempt in range(max_tries):
    shrink = 1.0 - attempt / max_tries
    depth = rng.uniform(*ROOT_DEPTH_RANGE) + 0.5 * attempt / max_tries
    target = K[:2, 2] + rng.uniform(-1, 1, 2) * CENTRE_OFFSET * image_size * shrink
    centre = rel.mean(0)
    zc = depth + centre[2]
    xy = (target - K[:2, 2]) / np.diag(K)[:2] * zc - centre[:2]
    t = np.array([xy[0], xy[1], depth])
    uv = project(rel + t, K)
    if np.all(uv >= lo) and np.all(uv <= hi):
      break
  return R, t
