"""Hand-pose geometry: camera projection, the 2.5D representation, joint orders.

Everything is batched over arbitrary leading dimensions and jit-able. Functions
that only reindex or mix joints (joint-order maps, palm <-> wrist) also accept
NumPy arrays and then return NumPy arrays, so the input pipeline can use them
without pulling in JAX device arrays.

Conventions (see the project contracts):

* Pixel coordinates are continuous, pixel (row i, col j) centred at (x=j, y=i).
* Camera-frame 3D points ``xyz`` project as ``uvw = K @ xyz``, ``uv = uvw[:2] / uvw[2]``.
* The 2.5D representation (Iqbal et al., ECCV 2018) of a hand is
  ``(uv, z_rel)`` with ``z_rel = (z - z_root) / bone_length`` where
  ``bone_length`` is the length of the reference bone (AIT 3 -> 8, middle
  finger MCP -> PIP). Recovering 3D needs the *scale-normalised* root depth
  ``z_root / bone_length``, which :func:`solve_zroot` finds in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from peclr_jax.hands import joints

# --------------------------------------------------------------------------
# Joint orders
# --------------------------------------------------------------------------

# The tables themselves are in joints.py (NumPy only, shared with the
# dataset builders).


def _xp(x):
  """NumPy for NumPy inputs, jax.numpy otherwise (keeps pipeline code host-side)."""
  return np if isinstance(x, np.ndarray) else jnp


def _reorder(x, idx: np.ndarray):
  if x.shape[-2] != idx.shape[0]:
    raise ValueError(f"expected {idx.shape[0]} joints on axis -2, got shape {x.shape}")
  return x[..., idx, :]


def freihand_to_ait(x):
  """Reorders joints from FreiHAND order to AIT order.

  Args:
      x: [..., 21, D] joints in FreiHAND order (NumPy or JAX).

  Returns:
      [..., 21, D] joints in AIT order (same array type).
  """
  return _reorder(x, joints.FREIHAND_TO_AIT)


def ait_to_freihand(x):
  """Reorders joints from AIT order to FreiHAND order.

  Args:
      x: [..., 21, D] joints in AIT order.

  Returns:
      [..., 21, D] joints in FreiHAND order.
  """
  return _reorder(x, joints.AIT_TO_FREIHAND)


def wrist_to_palm(kp):
  """Replaces joint 0 (wrist) by the palm centre, (wrist + middle MCP) / 2.

  Args:
      kp: [..., 21, D] AIT-order joints with the wrist at index 0 (any D).

  Returns:
      [..., 21, D] with the palm at index 0; other joints unchanged.
  """
  xp = _xp(kp)
  mcp = joints.AIT_MIDDLE_MCP
  palm = 0.5 * (kp[..., 0:1, :] + kp[..., mcp : mcp + 1, :])
  return xp.concatenate([palm, kp[..., 1:, :]], axis=-2)


def palm_to_wrist(kp):
  """Inverse of :func:`wrist_to_palm`: wrist = 2 * palm - middle MCP.

  Args:
      kp: [..., 21, D] AIT-order joints with the palm at index 0.

  Returns:
      [..., 21, D] with the wrist at index 0.
  """
  xp = _xp(kp)
  mcp = joints.AIT_MIDDLE_MCP
  wrist = 2.0 * kp[..., 0:1, :] - kp[..., mcp : mcp + 1, :]
  return xp.concatenate([wrist, kp[..., 1:, :]], axis=-2)


# --------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------


def _swap(m):
  return jnp.swapaxes(m, -1, -2)


def project(xyz, K):
  """Pinhole projection.

  Args:
      xyz: [..., J, 3] camera-frame points (z > 0).
      K: [..., 3, 3] intrinsics, leading dims broadcastable with xyz's.

  Returns:
      uv: [..., J, 2] pixel coordinates.
  """
  uvw = jnp.matmul(xyz, _swap(K))
  return uvw[..., :2] / uvw[..., 2:3]


def pixel_rays(uv, K):
  """Back-projects pixels to rays with unit depth, K^-1 [u, v, 1].

  Args:
      uv: [..., J, 2] pixel coordinates.
      K: [..., 3, 3] intrinsics.

  Returns:
      [..., J, 3] rays whose z component is 1 for any upper-triangular K
      with K[2] = (0, 0, 1).
  """
  uv1 = jnp.concatenate([uv, jnp.ones_like(uv[..., :1])], axis=-1)
  return jnp.matmul(uv1, _swap(jnp.linalg.inv(K)))


def unproject(uv, depth, K):
  """Inverse of :func:`project` given per-point depth.

  Args:
      uv: [..., J, 2] pixels.
      depth: [..., J] z coordinate of each point.
      K: [..., 3, 3] intrinsics.

  Returns:
      xyz: [..., J, 3] = K^-1 [u, v, 1] * depth.
  """
  return pixel_rays(uv, K) * depth[..., None]


def bone_length(xyz, bone: Sequence[int] = joints.REF_BONE):
  """Length of the reference bone.

  Args:
      xyz: [..., J, 3] points.
      bone: (m, n) joint indices.

  Returns:
      [...] Euclidean distance between joints m and n.
  """
  m, n = bone
  return jnp.linalg.norm(xyz[..., n, :] - xyz[..., m, :], axis=-1)


# --------------------------------------------------------------------------
# 2.5D representation
# --------------------------------------------------------------------------


def xyz_to_uvd(xyz, K, root: int = 0, bone: Sequence[int] = joints.REF_BONE):
  """3D keypoints to the scale-invariant 2.5D representation.

  The model uses the palm as root: call :func:`wrist_to_palm` first so that
  joint 0 is the palm.

  Args:
      xyz: [..., 21, 3] camera-frame keypoints (any metric unit).
      K: [..., 3, 3] intrinsics.
      root: index of the root joint.
      bone: reference bone (m, n).

  Returns:
      uv: [..., 21, 2] pixels.
      z_rel: [..., 21] (z - z_root) / bone_length (0 at the root).
      bone_length: [...] reference bone length in xyz's unit.
  """
  uv = project(xyz, K)
  length = bone_length(xyz, bone)
  z = xyz[..., 2]
  z_rel = (z - z[..., root : root + 1]) / length[..., None]
  return uv, z_rel, length


def solve_zroot(uv, z_rel, K, bone: Sequence[int] = joints.REF_BONE, eps: float = 1e-8):
  """Closed-form scale-normalised root depth (Iqbal et al. ECCV 2018, eq. 6-7).

  With rays r_j = K^-1 [u_j, v_j, 1] (so r_j = (X_j, Y_j, 1)), the
  scale-normalised keypoints are P_j = r_j (z_rel_j + Z). Requiring the
  reference bone to have unit length, |P_n - P_m|^2 = 1, is a quadratic
  a Z^2 + b Z + c = 0 in Z; the larger (+) root is the physical solution
  (the hand lies in front of the camera). As in the public code, ``a`` and
  the discriminant are clamped below at ``eps`` so that degenerate inputs
  (e.g. an untrained network) give finite values.

  No gradient stop and no clamping of the result happen here: the 2.5D model
  stops the gradient and clamps to [4, 50] itself
  (``models.heads.ZRootRefiner``; docs/method.md#root-depth).

  Args:
      uv: [..., 21, 2] pixels.
      z_rel: [..., 21] relative depths in bone units.
      K: [..., 3, 3] intrinsics.
      bone: reference bone (m, n).
      eps: lower clamp for ``a`` and the discriminant.

  Returns:
      z_root: [...] root depth divided by the reference bone length.
  """
  m, n = bone
  rays = pixel_rays(uv, K)
  xm, ym = rays[..., m, 0], rays[..., m, 1]
  xn, yn = rays[..., n, 0], rays[..., n, 1]
  zm, zn = z_rel[..., m], z_rel[..., n]
  a = (xn - xm) ** 2 + (yn - ym) ** 2
  b = 2.0 * (zn * (xn**2 + yn**2 - xn * xm - yn * ym) + zm * (xm**2 + ym**2 - xn * xm - yn * ym))
  c = (xn * zn - xm * zm) ** 2 + (yn * zn - ym * zm) ** 2 + (zn - zm) ** 2 - 1.0
  disc = b**2 - 4.0 * a * c
  a = jnp.maximum(a, eps)
  disc = jnp.maximum(disc, eps)
  return (-b + jnp.sqrt(disc)) / (2.0 * a)


# --------------------------------------------------------------------------
# Alignment and 2D transforms
# --------------------------------------------------------------------------


def procrustes_align(pred, gt, eps: float = 1e-8):
  """Similarity (Procrustes) alignment of ``pred`` onto ``gt``, as FreiHAND's eval.

  Mirrors the official ``align_w_scale(gt, pred)``: centre both sets, divide
  each by its Frobenius norm (+ eps), solve orthogonal Procrustes
  ``min_R |gt_n R - pred_n|`` with scipy semantics (R = U V^T from
  SVD(gt_n^T pred_n), scale s = sum of singular values, *no* reflection
  correction), then map pred' = pred_n R^T s |gt_c| + mean(gt).

  Args:
      pred: [..., J, 3] predicted points.
      gt: [..., J, 3] ground truth points.
      eps: added to the Frobenius norms (as the official script).

  Returns:
      [..., J, 3] aligned prediction.
  """
  t_gt = jnp.mean(gt, axis=-2, keepdims=True)
  t_pred = jnp.mean(pred, axis=-2, keepdims=True)
  gt_c = gt - t_gt
  pred_c = pred - t_pred
  s_gt = jnp.sqrt(jnp.sum(gt_c**2, axis=(-2, -1), keepdims=True)) + eps
  s_pred = jnp.sqrt(jnp.sum(pred_c**2, axis=(-2, -1), keepdims=True)) + eps
  a = gt_c / s_gt
  b = pred_c / s_pred
  u, sv, vt = jnp.linalg.svd(jnp.matmul(_swap(a), b), full_matrices=False)
  r = jnp.matmul(u, vt)
  scale = jnp.sum(sv, axis=-1)[..., None, None]
  return jnp.matmul(b, _swap(r)) * scale * s_gt + t_gt
