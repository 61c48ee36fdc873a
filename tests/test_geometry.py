"""Tests for peclr_jax.hands.geometry: round trips, known answers, scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation

from peclr_jax.hands import geometry as g
from peclr_jax.hands import joints


def _hand(rng, batch=3):
  """Random 'hands': 21 joints ~ 4 cm around a centre 0.4-0.9 m in front of the camera."""
  centre = np.stack(
    [rng.uniform(-0.1, 0.1, batch), rng.uniform(-0.1, 0.1, batch), rng.uniform(0.4, 0.9, batch)], -1
  )
  return (centre[:, None, :] + rng.normal(scale=0.04, size=(batch, 21, 3))).astype(np.float32)


def _cams(rng, batch=3):
  k = np.zeros((batch, 3, 3), np.float32)
  k[:, 0, 0] = rng.uniform(300, 600, batch)
  k[:, 1, 1] = rng.uniform(300, 600, batch)
  k[:, 0, 2] = rng.uniform(90, 130, batch)
  k[:, 1, 2] = rng.uniform(90, 130, batch)
  k[:, 2, 2] = 1.0
  return k


# ---------------------------------------------------------------- joint orders

FH_NAMES = ["wrist"] + [
  f"{f}_{p}"
  for f in ("thumb", "index", "middle", "ring", "pinky")
  for p in ("mcp", "pip", "dip", "tip")
]
AIT_NAMES = ["wrist"] + [
  f"{f}_{p}"
  for p in ("mcp", "pip", "dip", "tip")
  for f in ("thumb", "index", "middle", "ring", "pinky")
]
MANO_NAMES = (
  ["wrist"]
  + [
    f"{f}_{p}" for f in ("index", "middle", "pinky", "ring", "thumb") for p in ("mcp", "pip", "dip")
  ]
  + [f"{f}_tip" for f in ("thumb", "index", "middle", "ring", "pinky")]
)


def test_joint_maps_match_names():
  """The index arrays move each named joint to its place (independent name lists)."""
  fh = np.array(FH_NAMES)[:, None]
  assert list(g.freihand_to_ait(fh)[:, 0]) == AIT_NAMES
  assert list(g.ait_to_freihand(np.array(AIT_NAMES)[:, None])[:, 0]) == FH_NAMES
  assert list(np.array(MANO_NAMES)[joints.MANO_TO_AIT]) == AIT_NAMES
  assert joints.AIT_NAMES == tuple(AIT_NAMES)
  assert joints.FREIHAND_NAMES == tuple(FH_NAMES)
  # The reference bone is the middle finger MCP -> PIP, FreiHAND's 9 -> 10.
  assert (
    AIT_NAMES[joints.REF_BONE[0]] == "middle_mcp" and AIT_NAMES[joints.REF_BONE[1]] == "middle_pip"
  )


def test_joint_maps_invert_each_other():
  x = np.random.default_rng(0).normal(size=(2, 21, 3)).astype(np.float32)
  np.testing.assert_array_equal(g.ait_to_freihand(g.freihand_to_ait(x)), x)
  np.testing.assert_array_equal(g.freihand_to_ait(g.ait_to_freihand(x)), x)
  y = g.freihand_to_ait(jnp.asarray(x))
  assert isinstance(y, jax.Array)
  np.testing.assert_array_equal(np.asarray(y), g.freihand_to_ait(x))
  assert isinstance(g.freihand_to_ait(x), np.ndarray)


def test_palm_wrist_round_trip():
  x = np.random.default_rng(1).normal(size=(4, 21, 2)).astype(np.float32)
  palm = g.wrist_to_palm(x)
  np.testing.assert_allclose(palm[:, 0], (x[:, 0] + x[:, 3]) / 2, rtol=1e-6)
  np.testing.assert_array_equal(palm[:, 1:], x[:, 1:])
  np.testing.assert_allclose(g.palm_to_wrist(palm), x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(g.palm_to_wrist(g.wrist_to_palm(jnp.asarray(x)))), x, rtol=1e-6, atol=1e-6
  )


# ---------------------------------------------------------------- camera


def test_project_matches_freihand_formula_and_unprojects():
  rng = np.random.default_rng(2)
  xyz, k = _hand(rng), _cams(rng)
  uv = np.asarray(g.project(xyz, k))
  # Reference in float64 (a float32 one would be OpenBLAS's, whose kernel
  # depends on the CPU). float32 K xyz sums 3 products, f x + c z, which may
  # cancel (u near 0): its error is relative to |K| |xyz|, not to u; then one
  # division by z. <= 4 eps |K| |xyz| / z px.
  x64, k64 = xyz.astype(np.float64), k.astype(np.float64)
  ref = np.einsum("bij,bnj->bni", k64, x64)
  size = np.einsum("bij,bnj->bni", np.abs(k64), np.abs(x64))[..., :2] / x64[..., 2:]
  np.testing.assert_allclose(
    uv, ref[..., :2] / ref[..., 2:], rtol=0, atol=4 * np.finfo(np.float32).eps * size.max()
  )
  back = np.asarray(g.unproject(uv, xyz[..., 2], k))
  np.testing.assert_allclose(back, xyz, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 2.5D


def test_uvd_round_trip_and_zroot():
  rng = np.random.default_rng(4)
  xyz, k = g.wrist_to_palm(_hand(rng, 5)), _cams(rng, 5)
  uv, z_rel, bone = g.xyz_to_uvd(xyz, k)
  bone_np = np.linalg.norm(xyz[:, 8] - xyz[:, 3], axis=-1)
  np.testing.assert_allclose(np.asarray(bone), bone_np, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(z_rel), (xyz[..., 2] - xyz[:, :1, 2]) / bone_np[:, None], rtol=1e-5, atol=1e-5
  )
  assert np.all(np.asarray(z_rel)[:, 0] == 0)

  z_root = jax.jit(g.solve_zroot)(uv, z_rel, k)
  true_root = xyz[:, 0, 2] / bone_np
  np.testing.assert_allclose(np.asarray(z_root), true_root, rtol=1e-4)

  kp3d = np.asarray(g.unproject(uv, z_rel + z_root[:, None], k))
  # Scale-normalised: the reference bone has unit length.
  np.testing.assert_allclose(np.linalg.norm(kp3d[:, 8] - kp3d[:, 3], axis=-1), 1.0, rtol=1e-4)
  rel = np.linalg.norm(kp3d * bone_np[:, None, None] - xyz) / np.linalg.norm(xyz)
  assert rel < 1e-4


def test_solve_zroot_degenerate_is_finite():
  k = _cams(np.random.default_rng(5), 2)
  uv = jnp.full((2, 21, 2), 100.0)  # all joints on one pixel: a = 0
  z_rel = jnp.zeros((2, 21))  # and c = -1
  z = g.solve_zroot(uv, z_rel, k)
  assert np.all(np.isfinite(np.asarray(z)))
  grad = jax.grad(lambda u: g.solve_zroot(u, z_rel, k).sum())(uv)
  assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- Procrustes


def _official_align(gt, pred):
  """The official FreiHAND align_w_scale(gt, pred), rewritten for the test."""
  t1, t2 = gt.mean(0), pred.mean(0)
  a, b = gt - t1, pred - t2
  s1 = np.linalg.norm(a) + 1e-8
  s2 = np.linalg.norm(b) + 1e-8
  r, s = orthogonal_procrustes(a / s1, b / s2)
  return (b / s2) @ r.T * s * s1 + t1


def test_procrustes_recovers_similarity():
  rng = np.random.default_rng(6)
  gt = _hand(rng, 4).astype(np.float64)
  rots = Rotation.random(4, random_state=7).as_matrix()
  pred = 1.7 * np.einsum("bij,bkj->bki", rots, gt) + rng.normal(size=(4, 1, 3))
  out = np.asarray(g.procrustes_align(pred.astype(np.float32), gt.astype(np.float32)))
  np.testing.assert_allclose(out, gt, atol=1e-5)


def test_procrustes_matches_scipy_reference_including_reflection():
  rng = np.random.default_rng(8)
  gt = _hand(rng, 3).astype(np.float64)
  pred = gt + rng.normal(scale=0.02, size=gt.shape)
  pred[2] = gt[2] * np.array([-1.0, 1.0, 1.0])  # mirror image: no reflection fix expected
  out = np.asarray(g.procrustes_align(pred.astype(np.float32), gt.astype(np.float32)))
  for i in range(3):
    np.testing.assert_allclose(out[i], _official_align(gt[i], pred[i]), atol=2e-5)
  # scipy semantics align a mirror image perfectly (det R = -1).
  np.testing.assert_allclose(out[2], gt[2], atol=2e-5)
