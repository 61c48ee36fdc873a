"""PeCLR losses: latent-space inversion of view transforms, NT-Xent, 2.5D keypoint L1.

Pre-training (docs/method.md#latent-inversion): each view's projection is
L2-normalised, seen as D/2 points in 2-D, the view's geometric augmentation
is undone on those points, the result is re-normalised, and the two views
are compared with NT-Xent.

``invert=('translate', 'rotate')`` with ``translation_mode='extent'`` is the
public code's behaviour (``PAPER_CODE_INVERT``); the project default also
undoes scale.

Conventions for the per-view parameters (dicts from ``augment``):

* ``rotation`` [B], degrees, positive = counter-clockwise on screen (OpenCV
  ``getRotationMatrix2D`` sense). The view is undone by rotating the latent
  points by ``-rotation`` with the OpenCV matrix about their centroid.
* ``scale`` [B], the view's zoom; undone by multiplying the points' offsets
  from their centroid by ``1 / scale``.
* ``translation`` [B, 2], fraction of the view size; undone by subtracting
  it (``'exact'``) or it times the per-axis extent of the points
  (``'extent'``, public code), i.e. ``x -= t_x * (max x - min x)``.
  ``augment`` reports the displacement of the image content in the view,
  which has the sign of the public code's ``jitter_x / size`` (there
  ``jitter_x = centre - side - origin``, the negated crop-origin shift), so
  ``undo_transforms`` moves the latent the way the public code does. The
  public value is source pixels over view pixels; ours is in view pixels
  (it includes the crop's zoom, close to 1 for FreiHAND at 128 px).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

INVERSIONS = ("translate", "rotate", "scale")
DEFAULT_INVERT = ("translate", "rotate", "scale")
#: The public PyTorch code undoes translation (extent mode) and rotation only.
PAPER_CODE_INVERT = ("translate", "rotate")
TRANSLATION_MODES = ("extent", "exact")

# F.normalize's default eps: keeps the zero vector finite.
_NORM_EPS = 1e-12


def l2_normalize(x, axis: int = -1, eps: float = _NORM_EPS):
  """x / max(|x|, eps) along ``axis`` (torch.nn.functional.normalize semantics).

  Args:
      x: [..., D] array.
      axis: axis to normalise.
      eps: lower bound of the norm.

  Returns:
      Array of x's shape with unit norm along ``axis``.
  """
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nt_xent(z1, z2, temperature: float = 0.5):
  """NT-Xent (SimCLR) loss over the 2B views, computed with logsumexp.

  For view i with positive p(i): loss_i = -s_ip / T + logsumexp_{k != i} s_ik / T
  with s = z z^T; the denominator includes the positive. Returns the mean
  over all 2B views. Inputs are NOT normalised here (as the public code's
  ``vanila_contrastive_loss``); pass L2-normalised vectors for cosine
  similarity. Computed in float32 whatever the input dtype.

  Args:
      z1: [B, D] projections of the first views.
      z2: [B, D] projections of the second views (row i pairs with z1[i]).
      temperature: softmax temperature T.

  Returns:
      Scalar loss (float32).
  """
  z1 = jnp.asarray(z1, jnp.float32)
  z2 = jnp.asarray(z2, jnp.float32)
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"z1, z2 must both be [B, D], got {z1.shape} and {z2.shape}")
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2], axis=0)
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  # Exclude self-similarity from the denominator; -inf contributes exp(.) = 0
  # and logsumexp's gradient (a softmax) is 0 there.
  logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.sum(z1 * z2, axis=-1) / temperature
  pos = jnp.concatenate([pos, pos], axis=0)
  return jnp.mean(lse - pos)


def _check_invert(invert) -> tuple[str, ...]:
  if isinstance(invert, str):
    # Accept "translate,rotate" (handy from config strings); a bare string
    # must not be iterated character by character.
    invert = tuple(s.strip() for s in invert.split(",") if s.strip())
  try:
    invert = tuple(invert)
  except TypeError:
    raise TypeError(f"invert must be a sequence of {INVERSIONS}, got {invert!r}") from None
  bad = [v for v in invert if v not in INVERSIONS]
  if bad:
    raise ValueError(f"unknown inversion(s) {bad!r} in invert={invert!r}; allowed: {INVERSIONS}")
  return invert


def _check_mode(translation_mode: str) -> str:
  if translation_mode not in TRANSLATION_MODES:
    raise ValueError(
      f"translation_mode must be one of {TRANSLATION_MODES}, got {translation_mode!r}"
    )
  return translation_mode


def undo_transforms(
  z,
  rotation,
  scale,
  translation,
  *,
  invert: Sequence[str] = DEFAULT_INVERT,
  translation_mode: str = "extent",
):
  """Undoes a view's geometric augmentation in latent space.

  Steps (each optional via ``invert``, always in this order, which reverses
  the view's rotate/scale-then-translate):
    1. L2-normalise z and view it as D/2 points (x, y) (consecutive pairs).
    2. 'translate': ``'extent'``: p -= t * (max - min over points) per axis,
       extent without gradient (public code); ``'exact'``: p -= t.
    3. 'rotate': rotate by -rotation (degrees) about the centroid (no
       gradient), OpenCV matrix: with a = cos(-theta), b = sin(-theta),
       x' = a x + b y + (1 - a) cx - b cy, y' = -b x + a y + b cx + (1 - a) cy.
    4. 'scale': offsets from the centroid (no gradient) times 1 / scale.
    5. Flatten and L2-normalise.

  Args:
      z: [B, D] projections, D even.
      rotation: [B] view rotation in degrees (CCW on screen positive).
      scale: [B] view zoom (> 0).
      translation: [B, 2] view translation, fraction of the view size.
      invert: which of 'translate', 'rotate', 'scale' to undo (a
          comma-separated string is accepted too).
      translation_mode: 'extent' (public code) or 'exact'.

  Returns:
      [B, D] float32 unit vectors.

  Raises:
      ValueError: unknown inversion or mode, odd D.
  """
  invert = _check_invert(invert)
  _check_mode(translation_mode)
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 2 or z.shape[-1] % 2:
    raise ValueError(f"z must be [B, D] with D even, got {z.shape}")
  bsz, dim = z.shape
  pts = l2_normalize(z).reshape(bsz, dim // 2, 2)

  if "translate" in invert:
    t = jnp.asarray(translation, jnp.float32).reshape(bsz, 1, 2)
    if translation_mode == "extent":
      ref = jax.lax.stop_gradient(pts)
      extent = jnp.max(ref, axis=1, keepdims=True) - jnp.min(ref, axis=1, keepdims=True)
      t = t * extent
    pts = pts - t

  if "rotate" in invert or "scale" in invert:
    # Rotation about the centroid keeps it, so one centroid serves both.
    centre = jax.lax.stop_gradient(jnp.mean(pts, axis=1, keepdims=True))
    d = pts - centre
    if "rotate" in invert:
      phi = -jnp.deg2rad(jnp.asarray(rotation, jnp.float32)).reshape(bsz, 1)
      a, b = jnp.cos(phi), jnp.sin(phi)
      dx, dy = d[..., 0], d[..., 1]
      d = jnp.stack([a * dx + b * dy, -b * dx + a * dy], axis=-1)
    if "scale" in invert:
      s = jnp.asarray(scale, jnp.float32).reshape(bsz, 1, 1)
      d = d / s
    pts = centre + d

  return l2_normalize(pts.reshape(bsz, dim))


def _undo(p, t, invert, translation_mode):
  return undo_transforms(
    p, t["rotation"], t["scale"], t["translation"], invert=invert, translation_mode=translation_mode
  )


def contrastive_metrics(z1, z2) -> dict:
  """How well the views find each other, for logging (no gradient).

  Args:
      z1: [B, D] unit latents of the first views (after any inversion).
      z2: [B, D] unit latents of their positives.

  Returns:
      {'pos_sim': mean cosine similarity of the positive pairs,
       'contrastive_acc': fraction of the 2B views whose most similar other
       view is their positive}.
  """
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  z = jnp.concatenate([z1, z2], axis=0)
  n = z.shape[0]
  sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, z @ z.T)
  target = jnp.concatenate([jnp.arange(n // 2) + n // 2, jnp.arange(n // 2)])
  acc = jnp.mean((jnp.argmax(sim, axis=-1) == target).astype(jnp.float32))
  return {"pos_sim": jnp.mean(jnp.sum(z1 * z2, axis=-1)), "contrastive_acc": acc}


def peclr_latents(
  p1,
  p2,
  t1: Mapping,
  t2: Mapping,
  *,
  invert: Sequence[str] = DEFAULT_INVERT,
  translation_mode: str = "extent",
):
  """Both views' unit latents with their transforms undone: (z1, z2)."""
  return (_undo(p1, t1, invert, translation_mode), _undo(p2, t2, invert, translation_mode))


def peclr_loss(
  p1,
  p2,
  t1: Mapping,
  t2: Mapping,
  *,
  temperature: float = 0.5,
  invert: Sequence[str] = DEFAULT_INVERT,
  translation_mode: str = "extent",
):
  """PeCLR loss: undo each view's transforms in latent space, then NT-Xent.

  With ``invert=PAPER_CODE_INVERT`` and ``translation_mode='extent'`` this
  equals the public code (normalise -> translate_encodings(-t) ->
  rotate_encoding(-theta) -> normalise -> vanila_contrastive_loss).

  Args:
      p1: [B, D] raw projections of the first views (D even).
      p2: [B, D] raw projections of the second views.
      t1: view-1 parameters {'rotation' [B] deg, 'scale' [B], 'translation' [B, 2]}.
      t2: view-2 parameters, same keys.
      temperature: NT-Xent temperature.
      invert: inversions to apply (see :func:`undo_transforms`).
      translation_mode: 'extent' or 'exact'.

  Returns:
      Scalar float32 loss.
  """
  z1, z2 = peclr_latents(p1, p2, t1, t2, invert=invert, translation_mode=translation_mode)
  return nt_xent(z1, z2, temperature)


def _masked_mean(err, valid):
  """Mean of err [B, J, C] over valid joints and C; 0 when nothing is valid."""
  mask = jnp.broadcast_to(valid[..., None], err.shape)
  # where (not multiply) so NaN/inf in unlabelled joints cannot leak in.
  total = jnp.sum(jnp.where(mask, err, 0.0))
  count = jnp.sum(mask.astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def keypoint_losses(
  pred: Mapping,
  target: Mapping,
  valid,
  crop_size: float,
  *,
  weights: Mapping[str, float] | None = None,
):
  """L1 losses for 2.5D fine-tuning, masked mean over valid joints.

  Each term is the mean absolute error over valid joints and coordinates
  (the public ``cal_l1_loss`` / ``cal_3d_loss`` weighting: valid / valid.sum()
  over the whole batch, divided by the number of coordinates). An all-invalid
  batch gives 0 (not NaN) and zero gradients.

  Args:
      pred: {'kp2d' [B, 21, 2] pixels, 'zrel' [B, 21], 'kp3d' [B, 21, 3] bone units}.
      target: same keys and units.
      valid: [B, 21] bool, joints with usable labels.
      crop_size: input side in pixels; uv errors are divided by it so they are O(1).
      weights: optional {'uv', 'zrel', 'kp3d'} multipliers for the total
          (default 1 each).

  Returns:
      {'loss_uv', 'loss_zrel', 'loss_kp3d', 'loss'} float32 scalars;
      'loss' is the weighted sum of the three.
  """
  w = {"uv": 1.0, "zrel": 1.0, "kp3d": 1.0}
  if weights:
    unknown = set(weights) - set(w)
    if unknown:
      raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; allowed {sorted(w)}")
    w.update(weights)
  valid = jnp.asarray(valid).astype(bool)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  err_uv = jnp.abs(f32(pred["kp2d"]) - f32(target["kp2d"])) / crop_size
  err_z = jnp.abs(f32(pred["zrel"]) - f32(target["zrel"]))[..., None]
  err_3d = jnp.abs(f32(pred["kp3d"]) - f32(target["kp3d"]))
  out = {
    "loss_uv": _masked_mean(err_uv, valid),
    "loss_zrel": _masked_mean(err_z, valid),
    "loss_kp3d": _masked_mean(err_3d, valid),
  }
  out["loss"] = (
    w["uv"] * out["loss_uv"] + w["zrel"] * out["loss_zrel"] + w["kp3d"] * out["loss_kp3d"]
  )
  return out
